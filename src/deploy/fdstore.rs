//! systemd's file descriptor store, without libsystemd: the daemon hands the service manager
//! copies of what must outlive it (the VMM's sockets, guest memory, the rings' eventfds, the
//! crash journal), and gets them back, by name, when the unit restarts after a crash
//! (sd_notify(3) `FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1`; sd_listen_fds(3) `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`). The unit must allow it with `FileDescriptorStoreMax=`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The first fd a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// How long one notification may wait for room in the manager's socket.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The service manager's store, reached through `$NOTIFY_SOCKET`.
pub struct FdStore {
    sock: UnixDatagram,
}

impl FdStore {
    /// The store of the service manager that started this process, if it gave a notify socket.
    pub fn from_env() -> io::Result<Option<FdStore>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(s) if !s.is_empty() => FdStore::connect(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// The store behind notify socket `socket` (a path, or `@name` in the abstract namespace).
    pub fn connect(socket: &std::ffi::OsStr) -> io::Result<FdStore> {
        let bytes = socket.as_bytes();
        let sock = UnixDatagram::unbound()?;
        // A manager that stops reading must not wedge the daemon: the send fails instead.
        sock.set_write_timeout(Some(SEND_TIMEOUT))?;
        if let Some(name) = bytes.strip_prefix(b"@") {
            sock.connect_addr(&SocketAddr::from_abstract_name(name)?)?;
        } else {
            sock.connect(socket)?;
        }
        Ok(FdStore { sock })
    }

    /// Another handle on the same store.
    pub fn try_clone(&self) -> io::Result<FdStore> {
        Ok(FdStore {
            sock: self.sock.try_clone()?,
        })
    }

    /// Stores `fds` under `name` (letters, digits, `_`, `-`, `.`; at most 255 bytes). Another
    /// store under the same name adds to it.
    pub fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        check_name(name)?;
        let msg = format!("FDSTORE=1\nFDNAME={name}");
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.send(&msg, &raw)
    }

    /// Closes every fd stored under `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
    }

    /// Sends `msg` (sd_notify variables, one per line) with `fds`.
    pub fn send(&self, msg: &str, fds: &[RawFd]) -> io::Result<()> {
        let sent = if fds.is_empty() {
            self.sock.send(msg.as_bytes())?
        } else {
            self.sock
                .send_with_fds(&[msg.as_bytes()], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
        };
        if sent != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "fd store datagram truncated ({sent} of {} bytes)",
                    msg.len()
                ),
            ));
        }
        Ok(())
    }
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid fd store name"),
        ))
    }
}

/// The fds the service manager passed this process, by name, taken over (close-on-exec set)
/// and the `LISTEN_*` variables removed so that nothing takes them twice. Empty unless
/// `LISTEN_PID` is this process. An fd passed without a name is named `unknown`, as
/// sd_listen_fds_with_names(3) does.
pub fn take_listen_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    let var = |n: &str| std::env::var_os(n).map(OsString::into_string);
    let for_us = matches!(var("LISTEN_PID"), Some(Ok(p)) if p.parse() == Ok(std::process::id()));
    let count = match var("LISTEN_FDS") {
        Some(Ok(n)) if for_us => n
            .parse::<RawFd>()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("LISTEN_FDS={n}")))?,
        _ => 0,
    };
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(Ok(n)) if for_us => n.split(':').map(str::to_string).collect(),
        _ => Vec::new(),
    };
    // SAFETY: removing variables this process owns; no other thread reads the environment yet
    // (called first thing at start).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let mut out = Vec::new();
    for i in 0..count.max(0) {
        let fd = LISTEN_FDS_START + i;
        // SAFETY: F_SETFD on an fd the service manager passed: it is open (sd_listen_fds(3)).
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the service manager passed `fd` to this process, which takes it over once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names
            .get(i as usize)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        out.push((name, owned));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fds_reach_the_store_with_their_name_and_remove_names_them() {
        let dir = std::env::temp_dir().join(format!("fdstore-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let manager = UnixDatagram::bind(&dir).unwrap();
        let store = FdStore::connect(dir.as_os_str()).unwrap();
        let f = crate::journal::memfd(c"x").unwrap();
        store.store("vmm-0", &[f.as_fd(), f.as_fd()]).unwrap();
        let mut buf = [0u8; 256];
        let mut fds = [0 as RawFd; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which outlives the call.
        let (n, nfds) = unsafe { manager.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!(&buf[..n], b"FDSTORE=1\nFDNAME=vmm-0");
        assert_eq!(nfds, 2);
        for fd in &fds[..nfds] {
            // SAFETY: received just now, owned here.
            drop(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        store.remove("vmm-0").unwrap();
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=vmm-0");
        assert!(
            store.store("bad:name", &[]).is_err(),
            "':' separates LISTEN_FDNAMES"
        );
        assert!(store.store("", &[]).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
