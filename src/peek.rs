//! Messages taken out of a stream socket only once they are answered, so that a daemon killed
//! while handling one leaves it for the next daemon (see `recovery`): the vhost-user and the
//! vfio-user connections peek each message whole, handle it, reply, then consume it. And
//! whether a reply sent before a kill went out.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::scm;

/// What was found first in the socket.
pub enum Peeked {
    /// A whole message (its bytes, exactly as long as its header says) and duplicates of the
    /// fds that came with it, still in the socket.
    Whole {
        bytes: Vec<u8>,
        fds: Vec<OwnedFd>,
        /// The kernel dropped fds that did not fit.
        truncated: bool,
    },
    /// Part of the message came with fds and the rest apart: it can be seen whole only by
    /// reading (consuming) it.
    Apart,
    /// The peer closed the connection between messages.
    Closed,
    /// `give_up` said so while the rest of a message was awaited (it stays in the socket).
    GaveUp,
}

/// Peeks the message first in `sock`: its `header` bytes, from which `len` tells the message's
/// whole length, then all of it. Waits for the rest of a message that is arriving (until
/// `deadline`, or `give_up`). Nothing is taken out of the socket.
pub fn peek_message(
    sock: BorrowedFd<'_>,
    header: usize,
    len: &dyn Fn(&[u8]) -> io::Result<usize>,
    deadline: Instant,
    give_up: &dyn Fn() -> bool,
) -> io::Result<Peeked> {
    // The header, then the message and one byte more. A peek goes on to the next segment in
    // the socket after one without fds, even with nothing left to copy, and brings that one's
    // fds along (Linux's unix_stream_read_generic): fds that come with a byte past the message
    // are the next message's. A peek stops after a segment with fds.
    let mut total = None;
    loop {
        let want = total.map_or(header, |t: usize| t + 1);
        let mut buf = vec![0u8; want];
        let mut fds = Vec::new();
        let (n, truncated) = scm::peek_some(sock, &mut buf, &mut fds)?;
        if n == 0 {
            return Ok(Peeked::Closed);
        }
        if n >= header {
            let t = len(&buf[..header])?.max(header);
            if total.is_none() {
                // The header alone told the length: peek the message and a byte more.
                total = Some(t);
                continue;
            }
            if n >= t {
                let (fds, truncated) = if n == t {
                    (fds, truncated)
                } else {
                    (Vec::new(), false)
                };
                buf.truncate(t);
                return Ok(Peeked::Whole {
                    bytes: buf,
                    fds,
                    truncated,
                });
            }
        }
        if !fds.is_empty() || truncated {
            return Ok(Peeked::Apart);
        }
        // Part of a message: the rest is on its way, unless the peer closed the socket.
        if peer_closed(sock)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the socket mid-message",
            ));
        }
        if give_up() {
            return Ok(Peeked::GaveUp);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer sent {n} bytes of a message and stalled"),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Takes `len` bytes out of the socket (an answered message; the fds that come with them again
/// are closed).
pub fn consume(sock: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    // The bytes are known already: read them into a scratch buffer, a piece at a time.
    let mut scratch = [0u8; 512];
    let mut left = len;
    while left > 0 {
        let mut fds = Vec::new();
        let piece = left.min(scratch.len());
        let (n, _) = scm::recv_some(sock, &mut scratch[..piece], &mut fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the socket under a message being taken out",
            ));
        }
        left -= n;
    }
    Ok(())
}

/// What identifies a message among those a peer sends one after the other (FNV-1a of its
/// bytes, its two low bits clear for the journal's marks, never 0).
pub fn digest(bytes: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.iter().flat_map(|b| b.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & !3 | 4
}

/// Whether the reply sent last on `sock` went out, for a message of `len` bytes still first in
/// the socket: the kernel says so while the reply is unread, or once the peer sent more (it
/// waits for a reply before its next message); a peer that read it and went quiet is waited for
/// up to 100 ms, then taken as not having it.
pub fn reply_went_out(sock: BorrowedFd<'_>, len: usize) -> io::Result<bool> {
    let fd = sock.as_raw_fd();
    let queued = |req: libc::c_ulong| -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ/FIONREAD write one int into `n`.
        if unsafe { libc::ioctl(fd, req, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    };
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        if queued(libc::TIOCOUTQ)? > 0 || queued(libc::FIONREAD)? > len {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the peer shut its side of the connection down.
fn peer_closed(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, without waiting.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0)
}
