//! Readiness for systemd: the sd_notify protocol without libsystemd.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

/// Tells the service manager the daemon is ready (`READY=1`), if it asked (`$NOTIFY_SOCKET`).
/// Returns whether a notification was sent. Call it once the vhost-user socket listens.
pub fn notify_ready() -> io::Result<bool> {
    notify("READY=1")
}

/// Sends `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to `$NOTIFY_SOCKET`, if set.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(false),
        Some(s) if s.is_empty() => Ok(false),
        Some(s) => notify_to(&s, state).map(|()| true),
    }
}

/// Sends `state` as one datagram to the notify socket `socket`: an absolute path, or `@name`
/// for a socket in the abstract namespace.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    if !socket.as_bytes().starts_with(b"@") && !socket.as_bytes().starts_with(b"/") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={} is neither an absolute path nor an @abstract name",
                socket.to_string_lossy()
            ),
        ));
    }
    super::fdstore::FdStore::connect(socket)?.send(state, &[])
}
