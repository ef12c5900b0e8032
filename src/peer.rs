//! Who may connect: the VMM's credentials, checked on every accepted connection.
//!
//! A socket file's mode and directory decide who can reach it; this is the second check, on the
//! connection itself: the kernel's record of the peer (`SO_PEERCRED`, taken at connect time and
//! not forgeable by the peer) against the uid and gid the per-VM config names for its VMM
//! (`vmm_uid`, `vmm_gid`). Another VM's VMM that got hold of a path is refused before it sends a
//! byte that is read.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The credentials of a connected peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Which peers a socket admits: the configured uid and/or gid (each unset = any).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Cred(io::Error),
    #[error(
        "peer pid {} uid {} gid {} is not the VMM (vmm_uid {}, vmm_gid {})",
        .cred.pid, .cred.uid, .cred.gid, show(.policy.uid), show(.policy.gid)
    )]
    Refused { cred: PeerCred, policy: PeerPolicy },
}

fn show(v: Option<u32>) -> String {
    v.map_or_else(|| "any".to_string(), |v| v.to_string())
}

/// The kernel's record of who is on the other end of `s`.
pub fn peer_cred(s: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live, properly sized
    // `ucred`, and updates `len`; the fd is borrowed from a live stream.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

impl PeerPolicy {
    /// Whether anyone who can reach the socket is admitted (no uid or gid configured).
    pub fn is_open(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }

    pub fn admits(&self, c: &PeerCred) -> bool {
        self.uid.is_none_or(|u| u == c.uid) && self.gid.is_none_or(|g| g == c.gid)
    }

    /// The peer of `s` if the policy admits it.
    pub fn check(&self, s: &UnixStream) -> Result<PeerCred, PeerError> {
        let cred = peer_cred(s).map_err(PeerError::Cred)?;
        if self.admits(&cred) {
            Ok(cred)
        } else {
            Err(PeerError::Refused {
                cred,
                policy: *self,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> PeerCred {
        // SAFETY: getpid/geteuid/getegid cannot fail.
        unsafe {
            PeerCred {
                pid: libc::getpid(),
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }

    #[test]
    fn the_kernel_reports_this_process_as_the_peer_of_its_own_socketpair() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_cred(&a).unwrap(), me());
    }

    #[test]
    fn a_policy_admits_only_the_configured_uid_and_gid() {
        let c = me();
        assert!(PeerPolicy::default().admits(&c));
        let uid = |u| PeerPolicy {
            uid: Some(u),
            gid: None,
        };
        let gid = |g| PeerPolicy {
            uid: None,
            gid: Some(g),
        };
        assert!(uid(c.uid).admits(&c));
        assert!(!uid(c.uid.wrapping_add(1)).admits(&c));
        assert!(gid(c.gid).admits(&c));
        assert!(!gid(c.gid.wrapping_add(1)).admits(&c));
        let both = PeerPolicy {
            uid: Some(c.uid),
            gid: Some(c.gid.wrapping_add(1)),
        };
        assert!(!both.admits(&c), "both must match");
        let (a, _b) = UnixStream::pair().unwrap();
        let e = uid(c.uid.wrapping_add(1)).check(&a).unwrap_err();
        assert!(e.to_string().contains("is not the VMM"), "{e}");
    }
}
