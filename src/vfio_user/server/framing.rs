//! Reading whole messages (header, payload and passed fds) off the socket, with the stop
//! signal watched while waiting. A message must arrive whole within a time limit of its first
//! byte, and the first message of a connection within a time limit of the connect: a client
//! that stalls mid-message or never says anything does not hold the device's one slot.

use super::*;

/// One received message.
pub(super) struct Msg {
    pub(super) hdr: Header,
    pub(super) payload: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) fds_truncated: bool,
}

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
/// the whole of it within `limit` of that.
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
    }))
}
