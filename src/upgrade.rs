//! Planned upgrade: the daemon hands its listening socket, its live VMM connection and its
//! device state to a new binary of itself, which it executes in its own place (same PID, so
//! systemd and the VMM see the same process), and which resumes the connection where it
//! stopped: the VMM and the guest notice nothing.
//!
//! What passes: the fds stay open across `execve` (their close-on-exec flag is cleared), and a
//! versioned description of them and of the state goes in a memfd whose number the new process
//! gets as `--resume-state-fd N`. Before it hands over, the daemon asks the new binary which
//! state versions it reads (`--upgrade-state-versions`): if not its own, or if `execve` fails,
//! the old daemon keeps serving. A new binary that fails later (rebuilding the state) exits with
//! the reason, and the VM loses its IOMMU connection: that path is not covered yet.

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::iommufd::IommufdHandover;
use crate::vfio_user;
use crate::vhost::{ConnectionState, DeviceState};

mod exec;

use exec::set_cloexec;
pub use exec::{Rollback, binary_path, exec, own_executable};

/// The newest version of [`UpgradeState`] this binary writes: 2 adds the iommufd backend's
/// kernel objects and the vfio-user servers. A state without them is written as version 1,
/// which the previous release reads too.
pub const UPGRADE_VERSION: u32 = 2;

/// The versions of [`UpgradeState`] this binary reads.
pub const READS: [u32; 2] = [1, 2];

/// The argument that tells a new process to resume from a handed-over state.
pub const RESUME_ARG: &str = "--resume-state-fd";

/// Set in the environment of a previous binary that a failed upgrade went back to: it does not
/// go back again.
pub const ROLLED_BACK: &str = "VHOST_USER_IOMMU_ROLLED_BACK";

/// Test builds (`test-utils`) only: a resumed daemon fails right after rebuilding the state (to
/// test [`Rollback`]).
pub const TEST_FAIL_REBUILD: &str = "VHOST_USER_IOMMU_TEST_FAIL_REBUILD";

/// What one daemon hands the next.
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeState {
    pub version: u32,
    /// The vhost-user listening socket.
    pub listener_fd: RawFd,
    /// The VMM connection being served, if any.
    pub connection: Option<LiveConnection>,
    /// The metrics' counters (`Metrics::export`), so that they continue.
    #[serde(default)]
    pub counters: Vec<u64>,
    /// The iommufd backend's kernel objects (version 2).
    #[serde(default)]
    pub iommufd: Option<IommufdHandover>,
    /// Each vfio-user server (version 2).
    #[serde(default)]
    pub vfio_user: Vec<VfioUserServer>,
    /// The configuration the running daemon read at its start: the resumed one serves the same
    /// VM the same way (a changed file takes effect at the next start, as with SIGHUP).
    #[serde(default)]
    pub config: Option<String>,
    /// The previous binary, opened: a new binary that cannot rebuild the state goes back to it.
    #[serde(default)]
    pub rollback_exe_fd: Option<RawFd>,
    /// The crash journal and what the fd store holds (see `recovery`): the new binary keeps on
    /// with them instead of storing everything again.
    #[serde(default)]
    pub keeper: Option<crate::recovery::KeeperHandover>,
}

impl UpgradeState {
    /// A state of the oldest version that can carry what it holds.
    pub fn new(
        listener_fd: RawFd,
        connection: Option<LiveConnection>,
        counters: Vec<u64>,
        iommufd: Option<IommufdHandover>,
        vfio_user: Vec<VfioUserServer>,
    ) -> Self {
        let version = if iommufd.is_some() || !vfio_user.is_empty() {
            UPGRADE_VERSION
        } else {
            1
        };
        UpgradeState {
            version,
            listener_fd,
            connection,
            counters,
            iommufd,
            vfio_user,
            config: None,
            rollback_exe_fd: None,
            keeper: None,
        }
    }

    /// Every fd the state names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listener_fd];
        v.extend(self.rollback_exe_fd);
        v.extend(self.keeper.as_ref().map(|k| k.journal_fd));
        if let Some(c) = &self.connection {
            v.push(c.socket_fd);
            v.extend(&c.fds);
        }
        if let Some(i) = &self.iommufd {
            v.extend(i.fds());
        }
        for s in &self.vfio_user {
            v.push(s.listener_fd);
            if let Some(c) = &s.connection {
                v.push(c.socket_fd);
                v.extend(c.maps.iter().filter_map(|m| m.fd));
            }
        }
        v
    }
}

/// One vfio-user server: its listening socket and the client it was serving.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VfioUserServer {
    pub endpoint: u32,
    pub listener_fd: RawFd,
    pub connection: Option<VfioUserConnection>,
}

/// A vfio-user client connection as its server left it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VfioUserConnection {
    pub socket_fd: RawFd,
    pub state: vfio_user::ConnectionState,
    pub maps: Vec<DmaMap>,
}

/// One DMA map the client had recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DmaMap {
    pub address: u64,
    pub size: u64,
    pub flags: u32,
    pub offset: u64,
    pub file_id: Option<(u64, u64)>,
    pub fd: Option<RawFd>,
}

/// A vfio-user server's listener and connection, owned again.
pub struct ResumedServer {
    pub listener: std::os::unix::net::UnixListener,
    pub connection: Option<(std::os::unix::net::UnixStream, vfio_user::ConnectionState)>,
    pub maps: Vec<vfio_user::DmaRegion>,
}

impl VfioUserServer {
    /// Describes a handed-over server (its fds stay owned by `h`, kept open across `execve`).
    pub fn describe(endpoint: u32, h: &vfio_user::HandedOverServer) -> Self {
        VfioUserServer::of(
            endpoint,
            &h.listener,
            h.connection.as_ref().map(|(s, st)| (s, st)),
            &h.server.dma_maps(),
        )
    }

    /// Describes a server by its listener, its client and the client's DMA maps (the fds stay
    /// owned by the caller).
    pub fn of(
        endpoint: u32,
        listener: &std::os::unix::net::UnixListener,
        connection: Option<(&std::os::unix::net::UnixStream, &vfio_user::ConnectionState)>,
        maps: &vfio_user::DmaMaps,
    ) -> Self {
        VfioUserServer {
            endpoint,
            listener_fd: listener.as_raw_fd(),
            connection: connection.map(|(stream, state)| VfioUserConnection {
                socket_fd: stream.as_raw_fd(),
                state: state.clone(),
                maps: maps
                    .snapshot()
                    .into_iter()
                    .map(|r| DmaMap {
                        address: r.address,
                        size: r.size,
                        flags: r.flags,
                        offset: r.offset,
                        file_id: r.file_id,
                        fd: r.file.as_ref().map(|f| f.as_raw_fd()),
                    })
                    .collect(),
            }),
        }
    }

    /// Owns the fds the description names.
    ///
    /// # Safety
    /// Every fd the description names must be open and owned by nobody else in this process.
    pub unsafe fn into_resumed(self) -> ResumedServer {
        // SAFETY: the caller hands these fds over (see above); each is taken once.
        unsafe {
            ResumedServer {
                listener: std::os::unix::net::UnixListener::from_raw_fd(self.listener_fd),
                connection: self.connection.as_ref().map(|c| {
                    (
                        std::os::unix::net::UnixStream::from_raw_fd(c.socket_fd),
                        c.state.clone(),
                    )
                }),
                maps: self
                    .connection
                    .into_iter()
                    .flat_map(|c| c.maps)
                    .map(|m| vfio_user::DmaRegion {
                        address: m.address,
                        size: m.size,
                        flags: m.flags,
                        offset: m.offset,
                        file_id: m.file_id,
                        file: m
                            .fd
                            .map(|fd| std::sync::Arc::new(std::fs::File::from_raw_fd(fd))),
                    })
                    .collect(),
            }
        }
    }
}

/// A live VMM connection and the device state it set up.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveConnection {
    pub socket_fd: RawFd,
    pub state: ConnectionState,
    /// The fds `state` refers to by index, by their numbers (the same in both processes).
    pub fds: Vec<RawFd>,
    pub device: DeviceState,
    /// The names `fds` are kept under in the fd store, when they are (see `recovery`).
    #[serde(default)]
    pub kept: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot write the upgrade state: {0}")]
    Write(std::io::Error),
    #[error("cannot read the upgrade state from fd {fd}: {source}")]
    Read { fd: RawFd, source: std::io::Error },
    #[error("the upgrade state is not valid: {0}")]
    Parse(serde_json::Error),
    #[error("upgrade state version {found} (this binary reads versions {READS:?})")]
    Version { found: u32 },
    #[error("cannot keep fd {fd} open across exec: {source}")]
    Keep { fd: RawFd, source: std::io::Error },
    #[error(
        "{exe} does not read this daemon's state (it reads: {said}; this daemon writes upgrade \
         state version {version}, connection state version {})",
        crate::vhost::STATE_VERSION
    )]
    Refused {
        exe: String,
        said: String,
        version: u32,
    },
    #[error("cannot execute {exe}: {source}")]
    Exec { exe: String, source: std::io::Error },
}

/// What `--upgrade-state-versions` prints: the state versions this binary reads, e.g.
/// `upgrade 1 2 connection 1`.
pub fn versions_line() -> String {
    let reads: Vec<String> = READS.iter().map(|v| v.to_string()).collect();
    format!(
        "upgrade {} connection {}",
        reads.join(" "),
        crate::vhost::STATE_VERSION
    )
}

/// Whether a binary that answered `said` to `--upgrade-state-versions` reads an upgrade state
/// of version `version` (with this binary's connection state).
fn reads(said: &str, version: u32) -> bool {
    let mut words = said.split_whitespace();
    if words.next() != Some("upgrade") {
        return false;
    }
    let mut upgrade = Vec::new();
    for w in words.by_ref() {
        if w == "connection" {
            break;
        }
        match w.parse::<u32>() {
            Ok(v) => upgrade.push(v),
            Err(_) => return false,
        }
    }
    let connection = words.next().and_then(|w| w.parse::<u32>().ok());
    words.next().is_none()
        && upgrade.contains(&version)
        && connection == Some(crate::vhost::STATE_VERSION)
}

/// Asks the binary at `exe` which state versions it reads; Err unless it reads `version` (an
/// older binary without the question fails it too).
fn preflight(exe: &Path, version: u32) -> Result<(), UpgradeError> {
    let out = std::process::Command::new(exe)
        .arg("--upgrade-state-versions")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|source| UpgradeError::Exec {
            exe: exe.display().to_string(),
            source,
        })?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !reads(&said, version) {
        return Err(UpgradeError::Refused {
            exe: exe.display().to_string(),
            said: if said.is_empty() {
                format!("nothing ({})", out.status)
            } else {
                said
            },
            version,
        });
    }
    Ok(())
}

fn state_memfd(state: &UpgradeState) -> Result<OwnedFd, UpgradeError> {
    let bytes = serde_json::to_vec(state).map_err(|e| UpgradeError::Write(e.into()))?;
    write_memfd(&bytes)
}

fn write_memfd(bytes: &[u8]) -> Result<OwnedFd, UpgradeError> {
    let mut f = crate::journal::memfd(c"vhost-user-iommu-upgrade").map_err(UpgradeError::Write)?;
    f.write_all(bytes).map_err(UpgradeError::Write)?;
    Ok(OwnedFd::from(f))
}

/// Reads (and closes) the state a previous daemon handed over in memfd `fd`; also returns its
/// bytes (for [`Rollback`]).
pub fn read_state(fd: RawFd) -> Result<(UpgradeState, Vec<u8>), UpgradeError> {
    let read_error = |source| UpgradeError::Read { fd, source };
    // SAFETY: fstat only tells whether `fd` is open; `st` is a valid out pointer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if fd < 0 || unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(read_error(std::io::Error::last_os_error()));
    }
    // SAFETY: the fd is open and was handed to this process for it alone (RESUME_ARG).
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut f).map_err(read_error)?;
    f.read_to_end(&mut bytes).map_err(read_error)?;
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(&bytes).map_err(UpgradeError::Parse)?;
    if !READS.contains(&v.version) {
        return Err(UpgradeError::Version { found: v.version });
    }
    let state: UpgradeState = serde_json::from_slice(&bytes).map_err(UpgradeError::Parse)?;
    // The fds came without close-on-exec: put it back, or each later upgrade would pass them on
    // beside the copies it hands over.
    for fd in state.fds() {
        set_cloexec(fd, true).map_err(|source| UpgradeError::Keep { fd, source })?;
    }
    Ok((state, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_comes_back_from_its_memfd_and_a_newer_version_is_refused() {
        let path = std::env::temp_dir().join(format!("viommu-upgrade-test-{}", std::process::id()));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let state = UpgradeState::new(listener.as_raw_fd(), None, vec![1, 2], None, Vec::new());
        assert_eq!(state.version, 1, "nothing of version 2 in it");
        let fd = state_memfd(&state).unwrap();
        let (back, _) = read_state(std::os::fd::IntoRawFd::into_raw_fd(fd)).unwrap();
        assert_eq!(back.listener_fd, listener.as_raw_fd());
        let newer = UpgradeState {
            version: UPGRADE_VERSION + 1,
            ..state
        };
        let fd = state_memfd(&newer).unwrap();
        let e = read_state(std::os::fd::IntoRawFd::into_raw_fd(fd)).unwrap_err();
        assert!(
            e.to_string().contains("this binary reads versions [1, 2]"),
            "{e}"
        );
    }

    #[test]
    fn a_binary_is_asked_for_the_version_the_state_has() {
        let conn = crate::vhost::STATE_VERSION;
        assert!(reads(&versions_line(), 1));
        assert!(reads(&versions_line(), 2));
        assert!(!reads(&versions_line(), 3));
        // The previous release reads version 1 only: a version-2 state is not handed to it.
        let previous = format!("upgrade 1 connection {conn}");
        assert!(reads(&previous, 1));
        assert!(!reads(&previous, 2));
        assert!(!reads(&format!("upgrade 1 2 connection {}", conn + 1), 1));
        assert!(!reads("", 1));
        assert!(!reads("upgrade x connection 1", 1));
        assert!(!reads(&format!("upgrade 1 connection {conn} more"), 1));
    }
}
