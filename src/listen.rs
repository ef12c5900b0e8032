//! Listening unix sockets at a path: the vhost-user, vfio-user and control sockets.
//!
//! A socket path names one daemon's socket. Binding it must never take it over from another
//! daemon that still serves there (the VMM would reach the wrong daemon, and the first one
//! would go on without a socket, silently), nor delete a file that is not a socket. So
//! [`bind`] refuses a path that holds anything but a socket, refuses a socket some process
//! still accepts connections on, and replaces only a stale one (a connect() is refused: its
//! daemon is gone, e.g. killed with SIGKILL). The socket file then gets [`SOCKET_MODE`]
//! whatever the process umask: the VMM's group may connect, nobody else (the control socket:
//! [`PRIVATE_SOCKET_MODE`], the daemon's user and root only). This module never removes a
//! socket it did not bind, except a stale one.
//!
//! A socket is only as safe as its directory: whoever may write the directory may remove the
//! socket and listen in its place (and receive the guest's memory from the VMM). [`bind`] warns
//! when the directory is writable by anyone but its owner and has no sticky bit.
//!
//! The probe is a real connection: the live daemon sees a client that leaves at once (before
//! any message) and handles it like any client that disconnects.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode of every socket file the daemon creates: read/write (= may connect) for the daemon's
/// user and group, nothing for others; the unit's `UMask=0007` intends the same.
pub const SOCKET_MODE: u32 = 0o660;

/// Mode of the control socket: it shows every mapping of the VM, which is the operator's to
/// read, not any VMM's (root connects anyway).
pub const PRIVATE_SOCKET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "{path}: in use by a running daemon (it accepts connections); refusing to take it over"
    )]
    InUse { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

impl From<BindError> for io::Error {
    fn from(e: BindError) -> io::Error {
        let kind = match &e {
            BindError::NotASocket { .. } | BindError::InUse { .. } => io::ErrorKind::AddrInUse,
            BindError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> BindError {
    let path = path.to_path_buf();
    move |source| BindError::Io { path, what, source }
}

/// Binds a listening unix socket at `path` (see the module documentation) with mode
/// [`SOCKET_MODE`].
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    bind_with_mode(path, SOCKET_MODE)
}

/// [`bind`] with another mode for the socket file.
pub fn bind_with_mode(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    if let Some(why) = path.parent().and_then(unsafe_directory) {
        log::warn!("{}: {why}", path.display());
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "cannot inspect")(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(BindError::NotASocket { path: path.into() });
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse { path: path.into() }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                log::info!(
                    "{}: removing the stale socket of a daemon gone",
                    path.display()
                );
                std::fs::remove_file(path).map_err(io_err(path, "cannot remove stale socket"))?;
            }
            // EACCES and the like: we cannot tell whether someone serves there.
            Err(e) => return Err(io_err(path, "cannot tell whether the socket is in use")(e)),
        },
    }
    let listener = UnixListener::bind(path).map_err(io_err(path, "cannot bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(path, "cannot set the socket's mode"))?;
    Ok(listener)
}

/// Why a socket in `dir` could be replaced by someone else, if it could: the directory is
/// writable by its group or others without the sticky bit.
pub fn unsafe_directory(dir: &Path) -> Option<String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let m = std::fs::metadata(dir).ok()?;
    let mode = m.permissions().mode();
    let writable = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    (writable && !sticky).then(|| {
        format!(
            "directory {} (mode {:04o}) is writable by its group or others: any of them can remove this socket and listen in its place; make it 0750 or 0755 (the shipped unit and tmpfiles entry do)",
            dir.display(),
            mode & 0o7777
        )
    })
}

/// Removes the socket file at `path` when dropped, if it is still the one that was there
/// when this was created (never a socket a later daemon bound at the same path).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// Call right after [`bind`].
    pub fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.into(),
            id: identity(path),
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && identity(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> crate::testing::TempDir {
        crate::testing::TempDir::named(&format!("listen-{name}"))
    }

    #[test]
    fn a_socket_someone_listens_on_is_refused_and_keeps_serving() {
        let d = dir("live");
        let p = d.join("s.sock");
        let live = bind(&p).unwrap();
        assert!(matches!(bind(&p), Err(BindError::InUse { .. })));
        let _c = UnixStream::connect(&p).unwrap();
        assert!(
            live.accept().is_ok(),
            "the first listener still owns the path"
        );
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let d = dir("stale");
        let p = d.join("s.sock");
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists(), "closing a listener leaves its file");
        let l = bind(&p).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
        let d = dir("other");
        let file = d.join("file");
        std::fs::write(&file, b"x").unwrap();
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for p in [&file, &sub, &link] {
            assert!(
                matches!(bind(p), Err(BindError::NotASocket { .. })),
                "{}",
                p.display()
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        assert!(sub.is_dir());
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }

    #[test]
    fn the_socket_file_gets_socket_mode() {
        let d = dir("mode");
        let p = d.join("s.sock");
        let _l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, SOCKET_MODE);
    }

    #[test]
    fn a_directory_others_may_write_without_the_sticky_bit_is_named() {
        let d = dir("unsafe");
        for (mode, flagged) in [
            (0o770, true),
            (0o757, true),
            (0o1777, false),
            (0o750, false),
            (0o755, false),
        ] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(unsafe_directory(&d).is_some(), flagged, "{mode:o}");
        }
    }

    #[test]
    fn a_socket_file_guard_removes_only_the_socket_it_saw() {
        let d = dir("guard");
        let p = d.join("s.sock");
        let l = bind(&p).unwrap();
        let g = SocketFile::new(&p);
        drop(l);
        drop(g);
        assert!(!p.exists());
        // Another socket bound at the path after the guard was made is not removed.
        let _l = bind(&p).unwrap();
        let g = SocketFile::new(&p);
        std::fs::remove_file(&p).unwrap();
        let _l2 = bind(&p).unwrap();
        drop(g);
        assert!(p.exists());
    }
}
