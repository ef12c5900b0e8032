//! The side state: what threads other than the device state's owner keep for a restarted
//! daemon (the iommufd backend's kernel objects, the vfio-user servers), with each fd stored
//! under a name that says which object it is, so that storing again is needed only when the
//! object changes (see the parent module).

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, RawFd};

use serde::{Deserialize, Serialize};

use super::{Keeper, lock};
use crate::backend::iommufd::{IommufdBackend, IommufdHandover};
use crate::upgrade::VfioUserServer;

/// What threads other than the device state's owner keep (the journal's side slots): the
/// descriptions name fds by their numbers in the writing process, `names` says under which
/// name the store holds each.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Side {
    pub iommufd: Option<IommufdHandover>,
    pub vfio_user: Vec<VfioUserServer>,
    pub names: BTreeMap<RawFd, String>,
}

/// Every fd a side state names, each once (several DMA maps may share one), with the store
/// name that says which object it is.
pub(super) fn side_fds(
    iommufd: Option<&IommufdHandover>,
    vfio_user: &[VfioUserServer],
) -> Vec<(String, RawFd)> {
    let mut v = Vec::new();
    if let Some(h) = iommufd {
        v.push(("iommufd".to_string(), h.iommufd));
        for d in &h.devices {
            v.extend(d.fd.map(|fd| (format!("dev{}.{}", d.endpoint, d.dev_id), fd)));
            v.extend(
                d.req
                    .map(|fd| (format!("req{}.{}", d.endpoint, d.dev_id), fd)),
            );
        }
    }
    for u in vfio_user {
        let ep = u.endpoint;
        v.push((format!("ul{ep}"), u.listener_fd));
        if let Some(c) = &u.connection {
            let conn = inode(c.socket_fd);
            v.push((format!("uc{ep}.{conn}"), c.socket_fd));
            for m in &c.maps {
                if let Some(fd) = m.fd {
                    let file = m.file_id.map_or_else(|| inode(fd), |(_, ino)| ino);
                    let name = format!("um{ep}.{conn}.{:x}.{file}.{:x}", m.address, m.offset);
                    v.push((name, fd));
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|(_, fd)| seen.insert(*fd));
    v
}

/// The inode number of an open fd (0 if fstat fails): which socket or file it is.
pub(super) fn inode(fd: RawFd) -> u64 {
    // SAFETY: fstat writes only into `st`; an fd that is not open makes it fail.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        st.st_ino
    } else {
        0
    }
}

/// Renumbers every fd a side state's descriptions name with `f`.
pub(super) fn renumber(
    iommufd: Option<&mut IommufdHandover>,
    vfio_user: &mut [VfioUserServer],
    f: &mut dyn FnMut(RawFd) -> Result<RawFd, String>,
) -> Result<(), String> {
    if let Some(h) = iommufd {
        h.iommufd = f(h.iommufd)?;
        for d in &mut h.devices {
            d.fd = d.fd.map(&mut *f).transpose()?;
            d.req = d.req.map(&mut *f).transpose()?;
        }
    }
    for u in vfio_user {
        u.listener_fd = f(u.listener_fd)?;
        if let Some(c) = &mut u.connection {
            c.socket_fd = f(c.socket_fd)?;
            for m in &mut c.maps {
                m.fd = m.fd.map(&mut *f).transpose()?;
            }
        }
    }
    Ok(())
}

/// The keeper's side state: where it comes from, and which names it has in the store.
#[derive(Default)]
pub(super) struct SideSources {
    pub(super) iommufd: Option<std::sync::Arc<IommufdBackend>>,
    pub(super) vfio_user: BTreeMap<u32, VfioUserServer>,
    /// Side names in the store.
    pub(super) stored: std::collections::BTreeSet<String>,
    /// Endpoints whose devices the host is taking back: not kept.
    pub(super) unplugging: std::collections::BTreeSet<u32>,
    /// The backend's description last written (what stands while the backend is busy).
    pub(super) last_iommufd: Option<IommufdHandover>,
}

impl Keeper {
    /// Keeps the iommufd backend's kernel objects from now on (and the IOAS of each ATTACH's
    /// domain in its record).
    pub fn keep_iommufd(&self, b: std::sync::Arc<IommufdBackend>) -> Result<(), String> {
        lock(&self.side).iommufd = Some(b);
        self.write_side()
    }

    /// The vfio-user servers a previous binary handed over, as this process numbers their fds:
    /// kept as they are until each server says more.
    pub fn seed_vfio_user(&self, servers: &[VfioUserServer]) {
        lock(&self.side)
            .vfio_user
            .extend(servers.iter().map(|s| (s.endpoint, s.clone())));
    }

    /// Keeps what a vfio-user server needs (None: the endpoint has no server any more).
    pub fn keep_vfio_user(&self, endpoint: u32, server: Option<VfioUserServer>) {
        {
            let mut side = lock(&self.side);
            match server {
                Some(s) => side.vfio_user.insert(endpoint, s),
                None => side.vfio_user.remove(&endpoint),
            };
        }
        if let Err(e) = self.write_side() {
            log::error!("{e}: a crash now would lose vfio-user endpoint {endpoint}");
        }
    }

    /// Writes the side state as it is now: stores the fds it names that the store does not
    /// hold yet, writes the description, then removes from the store what it no longer names.
    pub fn write_side(&self) -> Result<(), String> {
        let mut side = lock(&self.side);
        // The backend's fds stay open while it describes them (hot-unplug waits).
        let write = |side: &mut SideSources, mut h: IommufdHandover| {
            // Described as unplugged already (a restarted daemon finds them so).
            for d in &mut h.devices {
                if side.unplugging.contains(&d.endpoint) {
                    (d.fd, d.req) = (None, None);
                }
            }
            side.last_iommufd = Some(h.clone());
            self.write_side_with(side, Some(h))
        };
        let stale = match side.iommufd.clone() {
            Some(b) => match b.try_with_hand_over(|h| write(&mut side, h)) {
                Some(r) => r?,
                // The backend is busy pinning guest RAM (seconds, with the topology held): the
                // description written last stands, or a vfio-user reply would wait past the
                // VMM's timeout. Its fds are stored already, and whatever the backend changes
                // meanwhile a restarted daemon finds in the kernel (a region mapped but not
                // recorded is mapped again).
                None => match side.last_iommufd.clone() {
                    Some(h) => write(&mut side, h)?,
                    None => b.with_hand_over(|h| write(&mut side, h))?,
                },
            },
            None => self.write_side_with(&mut side, None)?,
        };
        // Still under the side lock: another writer that wants one of these names again
        // (a client that unmaps and maps the same region again) stores it after this removal,
        // not before it.
        self.forget(&stale);
        drop(side);
        Ok(())
    }

    /// `write_side` with the backend's description: the names to forget.
    fn write_side_with(
        &self,
        side: &mut SideSources,
        iommufd: Option<IommufdHandover>,
    ) -> Result<Vec<String>, String> {
        let vfio_user: Vec<VfioUserServer> = side.vfio_user.values().cloned().collect();
        let wanted = side_fds(iommufd.as_ref(), &vfio_user);
        for (name, fd) in &wanted {
            if side.stored.contains(name) {
                continue;
            }
            // SAFETY: the fd is open for the duration of the borrow: the backend's are held open
            // by `with_hand_over`; a vfio-user server closes its client and DMA map fds only
            // after telling the keeper (a map's fd may be closed just before: then this store
            // fails or stores a stranger under a name the server's next write removes).
            let b = unsafe { BorrowedFd::borrow_raw(*fd) };
            self.store(name, b)
                .map_err(|e| format!("cannot keep {name} in the fd store: {e}"))?;
            side.stored.insert(name.clone());
        }
        let names: BTreeMap<RawFd, String> =
            wanted.iter().map(|(n, fd)| (*fd, n.clone())).collect();
        let description = Side {
            iommufd,
            vfio_user,
            names,
        };
        let bytes =
            serde_json::to_vec(&description).unwrap_or_else(|e| unreachable!("plain data: {e}"));
        lock(&self.journal)
            .write_side(&bytes)
            .map_err(|e| e.to_string())?;
        let keep: std::collections::BTreeSet<&String> = wanted.iter().map(|(n, _)| n).collect();
        let stale: Vec<String> = side
            .stored
            .iter()
            .filter(|n| !keep.contains(n))
            .cloned()
            .collect();
        for n in &stale {
            side.stored.remove(n);
        }
        Ok(stale)
    }

    /// The host takes endpoint `endpoint`'s device back (hot-unplug): the store lets go of it
    /// now, before the backend closes its own fd, and keeps nothing of it until
    /// [`replugged`](Self::replugged).
    pub fn unplugging(&self, endpoint: u32) {
        lock(&self.side).unplugging.insert(endpoint);
        if let Err(e) = self.write_side() {
            log::error!("{e}: the fd store may keep endpoint {endpoint}'s device open");
        }
    }

    /// Endpoint `endpoint`'s device is back: kept again.
    pub fn replugged(&self, endpoint: u32) {
        lock(&self.side).unplugging.remove(&endpoint);
        if let Err(e) = self.write_side() {
            log::error!("{e}: a crash now would lose endpoint {endpoint}'s device");
        }
    }

    /// The IOAS of guest domain `domain`, for an ATTACH's record (0: not kept).
    pub(super) fn host_id_of(&self, domain: crate::ids::DomainId) -> u32 {
        use crate::backend::DmaBackend;
        lock(&self.side)
            .iommufd
            .as_ref()
            .and_then(|b| b.host_id_of(domain))
            .unwrap_or(0)
    }
}
