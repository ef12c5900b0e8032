//! systemd's side of `sd_notify` and of the file descriptor store, as much as the daemon uses,
//! for tests that kill the daemon and start it again as systemd restarts a unit: `FDSTORE=1`
//! with `FDNAME=` keeps the fds sent along, `FDSTOREREMOVE=1` closes them, and a unit started
//! again gets duplicates of all of them at 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! `LISTEN_PID`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

type Store = Arc<Mutex<Vec<(String, OwnedFd)>>>;

/// A notify socket and the store behind it, served by a thread of its own.
pub struct ServiceManager {
    path: PathBuf,
    store: Store,
    synced: Mutex<Receiver<()>>,
}

impl ServiceManager {
    /// Serves a notify socket bound at `path`.
    pub fn start(path: &Path) -> io::Result<ServiceManager> {
        let sock = UnixDatagram::bind(path)?;
        let store: Store = Arc::default();
        let (tx, synced) = channel();
        let s = store.clone();
        std::thread::Builder::new()
            .name("service-manager".into())
            .spawn(move || serve(sock, s, tx))?;
        Ok(ServiceManager {
            path: path.to_path_buf(),
            store,
            synced: Mutex::new(synced),
        })
    }

    /// The notify socket (`NOTIFY_SOCKET`).
    pub fn notify_socket(&self) -> &Path {
        &self.path
    }

    /// Returns once every datagram sent before has been taken into account.
    pub fn sync(&self) -> io::Result<()> {
        let s = UnixDatagram::unbound()?;
        s.send_to(b"SYNC=1", &self.path)?;
        self.synced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the manager thread is silent"))
    }

    /// Duplicates of what the store holds, as a restarted unit gets them.
    pub fn passed(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, fd)| Ok((n.clone(), fd.try_clone()?)))
            .collect()
    }

    /// The names in the store, in the order stored.
    pub fn names(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Starts `cmd` (a program and its arguments; `configure` adds the rest) as a unit of this
    /// manager: with `NOTIFY_SOCKET`, and `passed` at fds 3.. with `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `LISTEN_PID` (set by `/bin/sh`, which keeps its pid through exec).
    pub fn spawn(
        &self,
        cmd: &[&std::ffi::OsStr],
        passed: Vec<(String, OwnedFd)>,
        configure: impl FnOnce(&mut Command),
    ) -> io::Result<Child> {
        // Out of the way of 3.., where they go in the child.
        let high = passed
            .iter()
            .map(|(_, fd)| {
                // SAFETY: F_DUPFD_CLOEXEC of an fd we own; the result is checked and owned.
                let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                if d < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: just created, owned here.
                Ok(unsafe { OwnedFd::from_raw_fd(d) })
            })
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        let raw: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        let names: Vec<String> = passed.iter().map(|(n, _)| n.clone()).collect();
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .args(cmd)
            .env("NOTIFY_SOCKET", &self.path);
        if passed.is_empty() {
            c.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        } else {
            c.env("LISTEN_FDS", passed.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        configure(&mut c);
        // SAFETY: dup2 is async-signal-safe; the closure touches nothing else.
        unsafe {
            c.pre_exec(move || {
                for (i, &fd) in raw.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = c.spawn();
        drop(high);
        child
    }
}

fn serve(sock: UnixDatagram, store: Store, synced: Sender<()>) {
    loop {
        let mut buf = [0u8; 4096];
        let mut fds = [0 as RawFd; 32];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which outlives the call.
        let Ok((n, nfds)) = (unsafe { sock.recv_with_fds(&mut iov, &mut fds) }) else {
            return;
        };
        let fds: Vec<OwnedFd> = fds[..nfds]
            .iter()
            // SAFETY: the fds were just received and are owned here.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let lines: Vec<&str> = text.lines().collect();
        let name = lines
            .iter()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_string();
        let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
        if lines.contains(&"SYNC=1") {
            let _ = synced.send(());
        } else if lines.contains(&"FDSTORE=1") {
            for fd in fds {
                s.push((name.clone(), fd));
            }
        } else if lines.contains(&"FDSTOREREMOVE=1") {
            s.retain(|(n, _)| *n != name);
        }
    }
}
