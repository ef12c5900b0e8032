//! Reading whole messages (header, payload and passed fds) off the socket, with the stop
//! signal watched while waiting. A message must arrive whole within a time limit of its first
//! byte, and the first message of a connection within a time limit of the connect: a client
//! that stalls mid-message or never says anything does not hold the device's one slot.
//!
//! A message is peeked, not read: it stays in the socket until it is answered (the connection
//! takes it out with [`crate::peek::consume`]), so that a daemon killed while handling it
//! leaves it to the next daemon (see `recovery`), and a handover never splits one.

use super::*;

/// One received message.
pub(super) struct Msg {
    pub(super) hdr: Header,
    pub(super) payload: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) fds_truncated: bool,
    /// Its length, still in the socket (0: read out already).
    pub(super) in_socket: usize,
    /// What identifies it among the client's messages ([`crate::peek::digest`]; 0 when read
    /// out).
    pub(super) digest: u64,
}

/// The largest message left in the socket until it is answered; a larger one (beyond what a
/// socket's buffer surely holds at once) is read out at once, and a daemon killed while it
/// handles it loses it (the client's request times out). A VMM's messages are far smaller:
/// config-space accesses, IRQ and DMA-map setup.
const PEEK_MAX: usize = 64 << 10;

pub(super) enum Received {
    Msg(Msg),
    /// A header whose size is below the header's own: answered, nothing else to read.
    Undersized(Header),
    /// A header whose size is beyond any message we accept: answered, then the stream is
    /// abandoned (its remainder cannot be trusted or skipped).
    Oversized(Header),
    Eof,
    Stopped,
    /// Nothing arrived by the time the first byte was due.
    Silent,
}

/// Reads exactly `buf.len()` bytes (collecting fds) by `deadline`; false if the stream ended
/// first with nothing read (`at_start`) — an end mid-message is an error, and so is the
/// deadline.
fn read_full(
    sock: BorrowedFd<'_>,
    stop: &StopSignal,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
    at_start: bool,
    deadline: Instant,
) -> io::Result<Option<bool>> {
    let mut got = 0;
    while got < buf.len() {
        // A handover waits for the message under way: its bytes would be lost to the next
        // daemon. A stop does not.
        let mid_message = !(at_start && got == 0);
        let wait = if mid_message && stop.handing_over() && !stop.is_stopped() {
            scm::wait_readable_only_until(sock, Some(deadline))?
        } else {
            scm::wait_readable_until(sock, stop.fd(), Some(deadline))?
        };
        match wait {
            scm::Wait::Readable => {}
            // The handover came while waiting: wait again, for the socket alone.
            scm::Wait::Stopped if mid_message && stop.handing_over() && !stop.is_stopped() => {
                continue;
            }
            scm::Wait::Stopped => return Ok(None),
            scm::Wait::TimedOut => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client sent {got} of {} bytes and stalled", buf.len()),
                ));
            }
        }
        let (n, t) = scm::recv_some(sock, &mut buf[got..], fds)?;
        *truncated |= t;
        if fds.len() > MAX_MSG_FDS {
            *truncated = true;
            fds.truncate(MAX_MSG_FDS);
        }
        if n == 0 {
            if at_start && got == 0 {
                return Ok(Some(false));
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the socket mid-message",
            ));
        }
        got += n;
    }
    Ok(Some(true))
}

/// Receives the next message: its first byte by `first_by` (None: no limit, an idle client),
/// the whole of it within `limit` of that. It stays in the socket (see the module).
pub(super) fn receive(
    sock: BorrowedFd<'_>,
    stop: &StopSignal,
    first_by: Option<Instant>,
    limit: Duration,
) -> io::Result<Received> {
    match scm::wait_readable_until(sock, stop.fd(), first_by)? {
        scm::Wait::Readable => {}
        scm::Wait::Stopped => return Ok(Received::Stopped),
        scm::Wait::TimedOut => return Ok(Received::Silent),
    }
    let deadline = Instant::now() + limit;
    let len = |b: &[u8]| -> io::Result<usize> {
        let size = header_of(b).message_size as usize;
        // A header out of bounds, or a message too large to peek: the header alone.
        Ok(if (HEADER_SIZE..=PEEK_MAX).contains(&size) {
            size
        } else {
            HEADER_SIZE
        })
    };
    // A stop or a handover while a message arrives leaves it in the socket.
    let give_up = || stop.is_stopped() || stop.handing_over();
    let (mut bytes, fds, truncated) =
        match crate::peek::peek_message(sock, HEADER_SIZE, &len, deadline, &give_up)? {
            crate::peek::Peeked::Closed => return Ok(Received::Eof),
            crate::peek::Peeked::GaveUp => return Ok(Received::Stopped),
            crate::peek::Peeked::Apart => return read_message(sock, stop, deadline),
            crate::peek::Peeked::Whole {
                bytes,
                fds,
                truncated,
            } => (bytes, fds, truncated),
        };
    let hdr = header_of(&bytes);
    let size = hdr.message_size as usize;
    if size < HEADER_SIZE {
        crate::peek::consume(sock, HEADER_SIZE)?;
        return Ok(Received::Undersized(hdr));
    }
    if size > MAX_MSG_SIZE {
        crate::peek::consume(sock, HEADER_SIZE)?;
        return Ok(Received::Oversized(hdr));
    }
    if size > PEEK_MAX {
        drop(fds);
        return read_message(sock, stop, deadline);
    }
    let digest = crate::peek::digest(&[&bytes]);
    bytes.drain(..HEADER_SIZE);
    Ok(Received::Msg(Msg {
        hdr,
        payload: bytes,
        fds_truncated: truncated || fds.len() > MAX_MSG_FDS,
        fds,
        in_socket: size,
        digest,
    }))
}

/// Reads the message first in the socket out of it (one that cannot be peeked whole), all of
/// it by `deadline`.
fn read_message(
    sock: BorrowedFd<'_>,
    stop: &StopSignal,
    deadline: Instant,
) -> io::Result<Received> {
    let mut fds = Vec::new();
    let mut truncated = false;
    let mut hb = [0u8; HEADER_SIZE];
    match read_full(
        sock,
        stop,
        &mut hb,
        &mut fds,
        &mut truncated,
        true,
        deadline,
    )? {
        None => return Ok(Received::Stopped),
        Some(false) => return Ok(Received::Eof),
        Some(true) => {}
    }
    let hdr = Header::decode(&hb);
    let size = hdr.message_size as usize;
    if size < HEADER_SIZE {
        return Ok(Received::Undersized(hdr));
    }
    if size > MAX_MSG_SIZE {
        return Ok(Received::Oversized(hdr));
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    if read_full(
        sock,
        stop,
        &mut payload,
        &mut fds,
        &mut truncated,
        false,
        deadline,
    )?
    .is_none()
    {
        return Ok(Received::Stopped);
    }
    Ok(Received::Msg(Msg {
        hdr,
        payload,
        fds,
        fds_truncated: truncated,
        in_socket: 0,
        digest: 0,
    }))
}

/// The header at the start of `bytes` (at least a header's length).
fn header_of(bytes: &[u8]) -> Header {
    let mut hb = [0u8; HEADER_SIZE];
    hb.copy_from_slice(&bytes[..HEADER_SIZE]);
    Header::decode(&hb)
}
