//! `recvmsg`/`sendmsg` on a unix stream socket with file descriptors as SCM_RIGHTS, and a
//! poll that also watches a stop event: the socket I/O of the vhost-user and vfio-user
//! connections.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most file descriptors one `recv_some` takes (vfio-user's limit; vhost-user messages
/// carry at most 8).
pub const MAX_FDS: usize = 16;

/// Control buffer: room for one SCM_RIGHTS message of `MAX_FDS` fds (cmsghdr 16 bytes + 4 per
/// fd), 8-byte aligned as cmsghdr requires. More fds than fit set MSG_CTRUNC.
type CmsgBuf = [u64; 2 + MAX_FDS.div_ceil(2)];

/// Receives up to `buf.len()` bytes; fds that came with them are appended to `fds` (owned,
/// close-on-exec). Returns the byte count (0 = end of stream) and whether the kernel had to
/// drop fds that did not fit.
pub fn recv_some(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    recv_with(sock, buf, fds, 0)
}

/// [`recv_some`] without consuming anything (`MSG_PEEK`): the same bytes, and duplicates of the
/// fds that came with them, are there for the next call. A peek stops after the first segment
/// that carried fds.
pub fn peek_some(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    recv_with(sock, buf, fds, libc::MSG_PEEK)
}

fn recv_with(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> io::Result<(usize, bool)> {
    let mut cbuf: CmsgBuf = [0; 2 + MAX_FDS.div_ceil(2)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero (null pointers, zero lengths) is
    // a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<CmsgBuf>() as _;
    let n = loop {
        // SAFETY: `msg` points at one iovec covering `buf` (exclusively borrowed) and at
        // `cbuf` with its true length; the kernel writes only within them.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: `msg` was filled by a successful recvmsg; CMSG_FIRSTHDR/NXTHDR only walk the
    // control buffer within `msg_controllen`, which the kernel set to what it wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside `cbuf` returned by the CMSG macros.
        let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is pure arithmetic.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            #[allow(clippy::unnecessary_cast)] // cmsg_len is u32 on some libcs
            let count = (len as usize).saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: `c` is a valid cmsghdr; its data follows the header within `cbuf`.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` fds at `data` (within `cbuf`, `len` bytes);
                // each was installed in this process for us, so we own it and close it once.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: see above: a fresh fd owned by nobody else.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; returns null past the last header.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Sends all of `data`, with `pass` (if any) as SCM_RIGHTS on the first bytes, never raising
/// SIGPIPE. A socket send timeout surfaces as `WouldBlock`.
pub fn send_all(sock: BorrowedFd<'_>, data: &[u8], pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut sent = 0usize;
    let mut pass = pass;
    while sent < data.len() {
        let rest = &data[sent..];
        let mut cbuf: [u64; 4] = [0; 4];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: all-zero is a valid msghdr (see recv_some).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = pass {
            // SAFETY: CMSG_SPACE is pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
            debug_assert!(space <= size_of::<[u64; 4]>());
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer is `space` bytes, enough for one header and one fd,
            // so CMSG_FIRSTHDR is non-null and its data area lies within `cbuf`.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
                libc::CMSG_DATA(c)
                    .cast::<RawFd>()
                    .write_unaligned(fd.as_raw_fd());
            }
        }
        // SAFETY: `msg` points at one iovec over `rest` (read-only for sendmsg) and at a
        // control buffer of the length given; `fd` stays open for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        pass = None;
        sent += n as usize;
    }
    Ok(())
}

/// What a wait for a readable fd ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Readable,
    Stopped,
    TimedOut,
}

/// Waits until `fd` is readable (or hung up), `stop` fires, or `deadline` passes (None: no
/// deadline).
pub fn wait_readable_until(
    fd: BorrowedFd<'_>,
    stop: BorrowedFd<'_>,
    deadline: Option<std::time::Instant>,
) -> io::Result<Wait> {
    wait_until(fd, Some(stop), deadline)
}

/// Waits until `fd` is readable (or hung up) or `deadline` passes, whatever else happens.
pub fn wait_readable_only_until(
    fd: BorrowedFd<'_>,
    deadline: Option<std::time::Instant>,
) -> io::Result<Wait> {
    wait_until(fd, None, deadline)
}

fn wait_until(
    fd: BorrowedFd<'_>,
    stop: Option<BorrowedFd<'_>>,
    deadline: Option<std::time::Instant>,
) -> io::Result<Wait> {
    let mut p = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // poll(2) skips a negative fd.
            fd: stop.map_or(-1, |s| s.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // Round up: poll's unit is the millisecond.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `p` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout) };
        if rc > 0 {
            break;
        }
        if rc == 0 {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(Wait::TimedOut);
            }
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if p[1].revents != 0 {
        return Ok(Wait::Stopped);
    }
    // POLLHUP/POLLERR count as readable: the next read reports them.
    Ok(Wait::Readable)
}

/// Waits until `fd` is readable (or hung up) or `stop` fires; false if `stop` fired.
pub fn wait_readable(fd: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(wait_readable_until(fd, stop, None)? == Wait::Readable)
}

/// Waits until one of `fds` is readable (or hung up); returns the index of the first that is.
pub fn wait_any<const N: usize>(fds: [BorrowedFd<'_>; N]) -> io::Result<usize> {
    let mut p = fds.map(|f| libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `p` is a valid array of `p.len()` pollfds for the duration of the call.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if rc > 0 {
            return Ok(p.iter().position(|x| x.revents != 0).unwrap_or(0));
        }
        let e = io::Error::last_os_error();
        if rc < 0 && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
