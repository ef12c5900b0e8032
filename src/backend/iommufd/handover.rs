//! A planned upgrade on the iommufd backend: the kernel objects (the iommufd context, the bound
//! VFIO devices, the identity/staging IOAS and HWPT, every guest domain's IOAS with its
//! mappings) stay as they are, their fds pass to the next daemon across `execve`, and the next
//! daemon takes them over from a description instead of creating them: no mapping is torn down,
//! no device is re-attached, and device DMA goes on throughout.
//!
//! The description names fds by number (they keep their numbers across `execve`). The guest
//! domains' IOASes come back through the domain model: `IommuDevice::restore` hands each to
//! [`DmaBackend::adopt_domains`] and replays the domain state, which `create_domain_for` answers
//! with the adopted IOAS and whose MAPs and ATTACHes the kernel has already done.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use serde::{Deserialize, Serialize};

use super::*;
use crate::protocol::ResvKind;

/// One VFIO device as the backend holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceHandover {
    pub endpoint: u32,
    pub path: PathBuf,
    /// The bound cdev; `None` while the device is unplugged from vfio-pci.
    pub fd: Option<RawFd>,
    pub dev_id: u32,
    pub pci: Option<String>,
    /// The request-IRQ eventfd the kernel signals on a host unbind.
    pub req: Option<RawFd>,
    pub attachment: Attachment,
}

/// One reserved IOVA region of the host constraints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReservedHandover {
    pub start: u64,
    pub end: u64,
    pub msi: bool,
}

/// One RAM region in the identity (staging) IOAS.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityHandover {
    pub start: u64,
    pub end: u64,
    /// `((st_dev, st_ino), offset)` of its file.
    pub file: Option<((u64, u64), u64)>,
    pub host_addr: u64,
}

/// The iommufd backend's kernel objects and what the daemon knows about them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IommufdHandover {
    pub iommufd: RawFd,
    pub devices: Vec<DeviceHandover>,
    pub identity_ioas: u32,
    pub identity: Vec<IdentityHandover>,
    pub staging_hwpt: Option<u32>,
    pub map_file_supported: bool,
    pub use_map_file: bool,
    pub strategy_override: u8,
    pub copy_works: u8,
    /// The previous daemon's pinned-bytes total, written for a binary that reads it; this one
    /// rebuilds the count from the identity regions and the domains (`adopt_ioases`).
    pub pinned: u64,
    pub page_size_mask: u64,
    pub input_range: (u64, u64),
    pub reserved: Vec<ReservedHandover>,
}

impl IommufdHandover {
    /// Every fd the description names (to keep open across `execve`).
    pub fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.iommufd)
            .chain(
                self.devices
                    .iter()
                    .flat_map(|d| d.fd.into_iter().chain(d.req)),
            )
            .collect()
    }
}

fn handover_error(what: impl Into<String>) -> IommufdError {
    IommufdError::Constraints(format!("the handed-over iommufd state: {}", what.into()))
}

impl IommufdBackend {
    /// Describes the backend's kernel objects for the next daemon. The fds it names stay owned
    /// by this backend (the caller keeps them open across `execve`). The guest domains' IOASes
    /// are described by the domain model (`DomainView::hw`).
    pub fn hand_over(&self) -> IommufdHandover {
        self.with_hand_over(|h| h)
    }

    /// Runs `f` on [`hand_over`](Self::hand_over)'s description while no fd it names can be
    /// closed (hot-unplug waits): `f` may duplicate them.
    pub fn with_hand_over<T>(&self, f: impl FnOnce(IommufdHandover) -> T) -> T {
        let topo = lock(&self.shared.topo);
        let devices = lock(&self.shared.devices);
        f(self.describe(&topo, &devices))
    }

    /// [`with_hand_over`](Self::with_hand_over) unless the topology is busy (pinning all guest
    /// RAM into the identity IOAS holds it for seconds): then `None` at once.
    pub fn try_with_hand_over<T>(&self, f: impl FnOnce(IommufdHandover) -> T) -> Option<T> {
        let topo = match self.shared.topo.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let devices = lock(&self.shared.devices);
        Some(f(self.describe(&topo, &devices)))
    }

    fn describe(&self, topo: &Topo, devices: &BTreeMap<EndpointId, Device>) -> IommufdHandover {
        let c = &self.constraints;
        IommufdHandover {
            iommufd: self.shared.iommufd.as_raw_fd(),
            devices: devices
                .iter()
                .map(|(ep, d)| DeviceHandover {
                    endpoint: ep.0,
                    path: d.path.clone(),
                    fd: d.file.as_ref().map(|f| f.as_raw_fd()),
                    dev_id: d.dev_id,
                    pci: d.pci.map(|p| p.to_string()),
                    req: d.req.as_ref().map(|r| r.as_raw_fd()),
                    attachment: d.attached,
                })
                .collect(),
            identity_ioas: self.shared.identity_id,
            identity: topo
                .identity
                .iter()
                .map(|e| IdentityHandover {
                    start: e.gpa.start(),
                    end: e.gpa.end(),
                    file: e.key.0,
                    host_addr: e.key.1,
                })
                .collect(),
            staging_hwpt: self.shared.staging_hwpt,
            map_file_supported: self.shared.map_file_supported,
            use_map_file: self.shared.use_map_file.load(Ordering::Relaxed),
            strategy_override: self.shared.strategy_override.load(Ordering::Relaxed),
            copy_works: self.shared.copy_works.load(Ordering::Relaxed),
            pinned: self.shared.pinned.load(Ordering::Relaxed),
            page_size_mask: c.page_size_mask,
            input_range: (c.input_range.start(), c.input_range.end()),
            reserved: c
                .reserved
                .iter()
                .map(|r| ReservedHandover {
                    start: r.start,
                    end: r.end,
                    msi: r.kind == ResvKind::Msi,
                })
                .collect(),
        }
    }

    /// Takes over the kernel objects a previous daemon described in `h`, without an ioctl that
    /// changes them: the devices stay bound and attached where they are, the identity IOAS
    /// keeps its RAM. Then moves the pinned-page accounting to this process
    /// (`IOMMU_IOAS_CHANGE_PROCESS`) where the kernel can.
    ///
    /// # Safety
    /// Every fd `h` names must be open and owned by nobody else in this process: the backend
    /// takes ownership of them (and closes them when dropped).
    pub unsafe fn adopt(h: IommufdHandover) -> std::result::Result<Self, IommufdError> {
        // SAFETY: the caller hands these fds over to the backend alone (see above).
        let iommufd = unsafe { File::from_raw_fd(h.iommufd) };
        let mut devices = BTreeMap::new();
        for d in h.devices {
            let ep = EndpointId(d.endpoint);
            // SAFETY: as above.
            let file = d.fd.map(|fd| unsafe { File::from_raw_fd(fd) });
            // SAFETY: as above.
            let req = d.req.map(|fd| unsafe { EventFd::from_raw_fd(fd) });
            let pci = d
                .pci
                .as_deref()
                .map(|p| p.parse::<PciAddress>())
                .transpose()
                .map_err(|e| handover_error(format!("{ep}: {e}")))?;
            if devices
                .insert(
                    ep,
                    Device {
                        path: d.path,
                        file,
                        dev_id: d.dev_id,
                        pci,
                        req,
                        last_warn: None,
                        attached: d.attachment,
                    },
                )
                .is_some()
            {
                return Err(IommufdError::DuplicateEndpoint(ep.0));
            }
        }
        let mut identity = Vec::new();
        for e in h.identity {
            let gpa = IovaRange::new(e.start, e.end).ok_or_else(|| {
                handover_error(format!("identity range {:#x}..{:#x}", e.start, e.end))
            })?;
            identity.push(IdentityEntry {
                gpa,
                key: (e.file, e.host_addr),
            });
        }
        let input_range = IovaRange::new(h.input_range.0, h.input_range.1)
            .ok_or_else(|| handover_error("empty input range"))?;
        let constraints = HostConstraints {
            page_size_mask: h.page_size_mask,
            input_range,
            reserved: h
                .reserved
                .iter()
                .map(|r| ResvMem {
                    kind: if r.msi {
                        ResvKind::Msi
                    } else {
                        ResvKind::Reserved
                    },
                    start: r.start,
                    end: r.end,
                })
                .collect(),
        };
        // The identity IOAS must still be there: a description of another context is refused.
        sys::ioas_iova_ranges(iommufd.as_fd(), h.identity_ioas).map_err(|e| {
            IommufdError::Ioctl {
                ioctl: e.name,
                what: format!("the handed-over identity IOAS {}", h.identity_ioas),
                errno: e.errno,
            }
        })?;
        match sys::ioas_change_process(iommufd.as_fd()) {
            Ok(()) => info!("iommufd: pinned-page accounting moved to this process"),
            Err(e) => info!(
                "iommufd: IOMMU_IOAS_CHANGE_PROCESS: {} (maps by user VA exist, or the kernel \
                 lacks it): pinned pages stay charged as before the upgrade",
                std::io::Error::from_raw_os_error(e.errno)
            ),
        }
        // The pinned count is rebuilt from what the state records: the identity IOAS's regions
        // here, each domain's own count as it is adopted (`adopt_ioases`), the requests replayed
        // after them. The previous daemon's total (`h.pinned`) was written at another moment
        // than a crash's checkpoint: a MAP recorded between the two would count twice.
        let identity_pinned: u64 = identity
            .iter()
            .map(|e: &IdentityEntry| e.gpa.len().unwrap_or(0))
            .sum();
        info!(
            "iommufd: took over {} devices, identity (staging) IOAS {}, staging HWPT {}, {} \
             bytes pinned by the identity IOAS",
            devices.len(),
            h.identity_ioas,
            h.staging_hwpt.map_or("none".to_string(), |x| x.to_string()),
            identity_pinned
        );
        let shared = Shared::new(
            iommufd,
            devices,
            h.identity_ioas,
            Topo { identity },
            h.map_file_supported,
            h.staging_hwpt,
        );
        // What the previous daemon had learnt or been told, and pins.
        shared.use_map_file.store(h.use_map_file, Ordering::Relaxed);
        shared
            .strategy_override
            .store(h.strategy_override, Ordering::Relaxed);
        shared.copy_works.store(h.copy_works, Ordering::Relaxed);
        shared.pinned.store(identity_pinned, Ordering::Relaxed);
        Ok(IommufdBackend {
            shared: Arc::new(shared),
            constraints,
        })
    }

    /// `DmaBackend::adopt_domains`: checks that each IOAS exists in this context and holds it
    /// for `create_domain_for`; MAPs and ATTACHes replaying the handed-over state are taken as
    /// done until [`IommufdBackend::end_adoption`].
    pub(super) fn adopt_ioases(&self, domains: Vec<(DomainId, HwDomainState)>) -> Result<()> {
        let mut adopted = lock(&self.shared.adopted);
        for (guest, state) in domains {
            sys::ioas_iova_ranges(self.shared.fd(), state.id).map_err(|e| {
                BackendError::new(
                    e.name,
                    e.errno,
                    format!("the handed-over IOAS {} of domain {}", state.id, guest.0),
                )
            })?;
            self.shared
                .pinned
                .fetch_add(state.pinned, Ordering::Relaxed);
            adopted.insert(guest, state);
        }
        self.shared.replaying.store(true, Ordering::Release);
        Ok(())
    }

    /// `DmaBackend::adoption_done`: later MAPs and ATTACHes go to the kernel; IOASes nobody
    /// claimed (a domain the replay did not rebuild) are destroyed after a complete rebuild and
    /// left alone after a failed one.
    pub(super) fn end_adoption(&self, rebuilt: bool) {
        self.shared.replaying.store(false, Ordering::Release);
        self.shared.replay_new.store(false, Ordering::Release);
        let left: Vec<(DomainId, HwDomainState)> = lock(&self.shared.adopted).drain().collect();
        if !rebuilt {
            return;
        }
        for (guest, state) in left {
            warn!(
                "IOAS {} of domain {} was handed over but not rebuilt: destroying it",
                state.id, guest.0
            );
            drop(IommufdDomain::adopt(&self.shared, guest, state));
        }
    }
}

/// How far past the highest id it knows a restarted daemon looks for IOASes a dead one made:
/// the kernel gives each new object the lowest free id, so a leaked IOAS sits below the number
/// of live objects plus the requests that were in flight.
const LEAK_WINDOW: u32 = 4096;

impl IommufdBackend {
    /// After a crash, once the kept state and the records are rebuilt: makes the kernel what
    /// the rebuilt state says where a request the dead daemon was executing left it otherwise
    /// (it is executed again, unanswered as it was). Every device is pointed where the state
    /// has it (a no-op in the kernel where it already is), an IOAS the state has but the kernel
    /// no longer has (an in-flight DETACH destroyed it) is marked gone, and every IOAS the
    /// state does not know (an in-flight ATTACH made it) is destroyed. Returns what it fixed,
    /// and as errors what it could not.
    pub(super) fn reconcile(&self) -> Vec<std::result::Result<String, String>> {
        self.shared.after_crash.store(true, Ordering::Relaxed);
        let mut fixed = Vec::new();
        let known: std::collections::BTreeSet<u32> =
            lock(&self.shared.domains).keys().copied().collect();
        let mut topo = lock(&self.shared.topo);
        for &id in &known {
            if let Err(e) = sys::ioas_iova_ranges(self.shared.fd(), id)
                && e.errno == libc::ENOENT
            {
                lock(&self.shared.vanished).insert(id);
                fixed.push(Ok(format!("IOAS {id} is gone (a DETACH was in flight)")));
            }
        }
        let wanted: Vec<(EndpointId, Attachment)> = lock(&self.shared.devices)
            .iter()
            .map(|(e, d)| (*e, d.attached))
            .collect();
        let vanished = lock(&self.shared.vanished).clone();
        for (ep, mut to) in wanted {
            if let Attachment::Domain(id) = to
                && vanished.contains(&id)
            {
                to = Attachment::Blocked;
            }
            if let Err(e) = self.shared.point(&mut topo, ep, to) {
                fixed.push(Err(format!(
                    "{ep}: cannot point it where the state has it: {e}"
                )));
            }
        }
        drop(topo);
        let top = known
            .iter()
            .copied()
            .chain([self.shared.identity_id])
            .chain(self.shared.staging_hwpt)
            .chain(lock(&self.shared.devices).values().map(|d| d.dev_id))
            .max()
            .unwrap_or(0);
        for id in 1..=top.saturating_add(LEAK_WINDOW) {
            if id == self.shared.identity_id || known.contains(&id) {
                continue;
            }
            if sys::ioas_iova_ranges(self.shared.fd(), id).is_ok() {
                match sys::destroy(self.shared.fd(), id) {
                    Ok(()) => {
                        fixed.push(Ok(format!("IOAS {id} destroyed (an ATTACH was in flight)")))
                    }
                    Err(e) => fixed.push(Err(format!(
                        "IOAS {id} (unknown to the state): IOMMU_DESTROY: {}",
                        std::io::Error::from_raw_os_error(e.errno)
                    ))),
                }
            }
        }
        fixed
    }
}
