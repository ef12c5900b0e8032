//! The kernel backend: iommufd IOASes and VFIO cdev attachments.
//!
//! One VM's devices (VFIO cdevs, `/dev/vfio/devices/vfioN`) are bound to one `/dev/iommu`
//! context. Every guest paging domain is an IOAS ([`HwDomain`]: `IOMMU_IOAS_ALLOC`, `MAP` /
//! `MAP_FILE`, `UNMAP`, `IOMMU_DESTROY` on drop); one shared *identity* IOAS holds all guest RAM
//! at IOVA = GPA and serves [`Attachment::Identity`] (bypass). An endpoint is pointed at an IOAS
//! with `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (a second attach replaces the first atomically, so DMA
//! never sees an intermediate state) and blocked with `VFIO_DEVICE_DETACH_IOMMUFD_PT` (a bound but
//! unattached device sits in the kernel's blocking domain).
//!
//! Design points:
//! - **Mapping source.** A mapping names guest memory twice ([`MapOp::host`]): the daemon's own
//!   VA of it and (for memfd-backed RAM) the file id and offset. When the kernel has
//!   `IOMMU_IOAS_MAP_FILE` (probed once in [`IommufdBackend::open`]) it is used with the region's
//!   memfd, so the pinning does not depend on the daemon's mapping staying in place; otherwise
//!   `IOMMU_IOAS_MAP` by user VA. The backing files come from the RAM table the backend got in
//!   [`DmaBackend::set_ram`]; domains share it through an `Arc` and re-read it only when its
//!   generation counter moved, so the map path takes no lock in the common case.
//! - **Map strategy** ([`MapStrategy`]). The identity IOAS doubles as the *staging* IOAS: when
//!   it holds guest RAM it maps every RAM region once, at IOVA = GPA, and an unattached HWPT
//!   allocated on it in `open`
//!   (`IOMMU_HWPT_ALLOC` for the first device; no device is ever attached to it) keeps those
//!   pages pinned and holds their PFNs. A guest MAP then becomes `IOMMU_IOAS_COPY` of
//!   `[gpa, gpa + len)` from it: the kernel takes any contiguous run of earlier maps, sub-ranges
//!   included (`iopt_get_pages`; the uAPI comment's "must exactly match" is stricter than the
//!   code, and `set_ram` probes it once), shares the `iopt_pages`, and fills the new domain from
//!   the staging domain's page table instead of `pin_user_pages` (no re-pinning, no
//!   RLIMIT_MEMLOCK charge). The cost is one more IOMMU page table over all guest RAM. A copy
//!   is only tried while the staging IOAS holds the RAM table the domain maps from
//!   (`staged_gen`); otherwise, and on ENOENT/EPERM, the MAP goes straight in. The automatic
//!   choice is Copy while all RAM is staged, else MapFile > Map by capability (measured in
//!   BENCHMARKS.md); `set_map_strategy` overrides it for measurements.
//! - **Staging** ([`Staging`]). All guest RAM goes into the identity IOAS (pinned, one more IO
//!   page table over it) only when it is needed: when an endpoint translates identity (boot
//!   bypass, a guest's bypass ATTACH or bypass config field: the device may then reach all of
//!   RAM), or with [`Staging::AllRam`]. By default ([`Staging::OnDemand`]) a memory table costs
//!   no pinning, so a VM starts in the same time whatever its RAM size and pins only what its
//!   guest maps; the first identity attachment pays for staging all of RAM (the guest asked
//!   for it), and from then on MAPs copy from it.
//! - **Mappings without permissions.** The kernel refuses a map with neither READABLE nor
//!   WRITEABLE (EINVAL), but virtio-iommu allows such a MAP (the device may then not access the
//!   range at all). The domain records it without calling the kernel: the IOVA stays
//!   unmapped, so any DMA to it faults, exactly what the mapping means; UNMAP of it forgets it.
//! - **Constraints** (granule, input range, reserved regions) are read once in `open`, with every
//!   device attached to a scratch IOAS (`IOMMU_IOAS_IOVA_RANGES` narrows as devices attach), and
//!   converted by [`constraints_from_ranges`].
//! - **Destroying an attached domain.** The domain model detaches before it destroys, but if a
//!   domain is dropped while an endpoint still points at it (the kernel would refuse with EBUSY)
//!   those endpoints are blocked first, like the soft backend does.
//! - **Hot-unplug.** Each device's request IRQ (`VFIO_PCI_REQ_IRQ_INDEX`) is an eventfd; the
//!   kernel signals it when the host unbinds the device from vfio-pci, and its unbind waits
//!   until every fd of the device is closed. [`IommufdBackend::watch_hotplug`] then lets the
//!   daemon detach the endpoint in the domain model and drop its own duplicates (the vfio-user
//!   front's), closes the device, and polls sysfs for it to come back, when it is reopened,
//!   bound and left blocked (identity under bypass). While unplugged the endpoint counts as
//!   blocked; attaching it to a paging domain fails with ENODEV (the guest sees S_DEVERR).
//! - **RLIMIT_MEMLOCK.** Pinned pages are charged to the daemon user's RLIMIT_MEMLOCK unless it
//!   has CAP_IPC_LOCK, once per IOAS that maps them. An ENOMEM from a map therefore names the
//!   limit and how much this backend has pinned.
//!
//! Every ioctl goes through [`sys`] (the `viommu-uapi` crate): the argument structs of the
//! maintained `iommufd-bindings` and `vfio-bindings`, each tied to its request number by one
//! table, issued by one function that returns the errno.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::{
    Attachment, BackendError, DmaBackend, HostConstraints, HwDomain, HwDomainState, MapOp, Result,
};
use crate::guest_ram::GuestRam;
use crate::ids::{DomainId, EndpointId, IovaRange, Perms};
use crate::metrics::Histogram;
use crate::protocol::{ResvKind, ResvMem};
use crate::vfio::{self, PciAddress, SysfsRoot};

use super::X86_MSI_WINDOW;

/// The iommufd character device.
pub const IOMMUFD_NODE: &str = "/dev/iommu";

/// The smallest granule ever advertised (the host page size on x86).
const MIN_GRANULE: u64 = 4096;

/// Why the backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IommufdError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{ioctl} on {what} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Ioctl {
        ioctl: &'static str,
        what: String,
        errno: i32,
    },
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(u32),
    #[error("the kernel reports no usable IOVA range for the devices ({0})")]
    NoIovaRange(String),
    #[error("{0}")]
    Constraints(String),
}

impl IommufdError {
    /// The errno, when the failure came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IommufdError::Open { source, .. } => source.raw_os_error(),
            IommufdError::Ioctl { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// How mappings reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapPath {
    /// `IOMMU_IOAS_MAP_FILE` from the region's memfd.
    File,
    /// `IOMMU_IOAS_MAP` from the daemon's mapping of guest RAM.
    UserVa,
}

/// Which ioctl a guest MAP becomes (see "Map strategy" in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapStrategy {
    /// `IOMMU_IOAS_MAP` by the daemon's user VA of guest RAM (pins on every MAP).
    Map,
    /// `IOMMU_IOAS_MAP_FILE` from the region's memfd (pins on every MAP; falls back to `Map` for
    /// RAM without a file or on kernels without MAP_FILE).
    MapFile,
    /// `IOMMU_IOAS_COPY` from the staging IOAS, whose pages are pinned once (falls back to
    /// `MapFile`/`Map` while the staging IOAS does not hold the MAP's memory).
    Copy,
}

impl MapStrategy {
    pub const ALL: [MapStrategy; 3] = [MapStrategy::Map, MapStrategy::MapFile, MapStrategy::Copy];

    pub fn name(self) -> &'static str {
        match self {
            MapStrategy::Map => "IOAS_MAP",
            MapStrategy::MapFile => "IOAS_MAP_FILE",
            MapStrategy::Copy => "IOAS_COPY",
        }
    }

    fn code(s: Option<MapStrategy>) -> u8 {
        match s {
            None => 0,
            Some(MapStrategy::Map) => 1,
            Some(MapStrategy::MapFile) => 2,
            Some(MapStrategy::Copy) => 3,
        }
    }

    fn from_code(c: u8) -> Option<MapStrategy> {
        match c {
            1 => Some(MapStrategy::Map),
            2 => Some(MapStrategy::MapFile),
            3 => Some(MapStrategy::Copy),
            _ => None,
        }
    }
}

/// When guest RAM goes into the identity (staging) IOAS, pinned once (see "Staging" in the
/// module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Staging {
    /// When an endpoint first translates identity; until then nothing is staged, a memory
    /// table costs no pinning and guest MAPs pin what they map (MAP_FILE or MAP).
    #[default]
    OnDemand,
    /// All guest RAM at every memory table, before the VMM gets its reply: guest MAPs copy from
    /// it (pinned and charged to RLIMIT_MEMLOCK once, never ENOMEM mid-run), at the price of
    /// pinning all RAM at VM start (measured under nested emulation: ~5 s per GiB of fresh
    /// shmem RAM, ~0.1 s per GiB of populated RAM; BENCHMARKS.md).
    AllRam,
}

/// A VFIO device region (BAR, config space) as `VFIO_DEVICE_GET_REGION_INFO` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

/// The ioctls: structs from the maintained bindings, request numbers, the one entry point (the
/// `viommu-uapi` crate of this repository, shared with the VM tiers' guest programs).
pub use viommu_uapi as sys;

mod constraints;
mod device;
mod diagnostics;
mod domain;
mod handover;
mod hotplug;
mod identity;
mod probe;
mod shared;

pub use constraints::constraints_from_ranges;
use device::{Device, dev_fd};
use domain::IommufdDomain;
pub use handover::{DeviceHandover, IommufdHandover};
use hotplug::request_eventfd;
pub use hotplug::{HotplugEvent, HotplugHook};
use probe::{probe_copy, probe_map_file};
use shared::{IdentityEntry, Shared, Topo, lock, map_flags, memlock_hint, timed};

/// The iommufd backend for one VM's devices.
pub struct IommufdBackend {
    shared: Arc<Shared>,
    constraints: HostConstraints,
}

impl IommufdBackend {
    /// Opens `/dev/iommu`, binds every endpoint's VFIO cdev to it, reads the host constraints
    /// with all devices attached to a scratch IOAS, and leaves each endpoint blocked (or in the
    /// identity IOAS with `boot_bypass`, which holds no RAM until [`DmaBackend::set_ram`]).
    pub fn open(
        endpoints: &[(EndpointId, PathBuf)],
        boot_bypass: bool,
    ) -> std::result::Result<Self, IommufdError> {
        Self::open_with(Path::new(IOMMUFD_NODE), endpoints, boot_bypass)
    }

    /// [`IommufdBackend::open`] with another iommufd node.
    pub fn open_with(
        iommufd_node: &Path,
        endpoints: &[(EndpointId, PathBuf)],
        boot_bypass: bool,
    ) -> std::result::Result<Self, IommufdError> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|source| IommufdError::Open {
                    path: p.to_path_buf(),
                    source,
                })
        };
        let ioctl_err = |what: String| {
            move |e: sys::Errno| IommufdError::Ioctl {
                ioctl: e.name,
                what,
                errno: e.errno,
            }
        };
        let iommufd = open(iommufd_node)?;
        let mut devices = BTreeMap::new();
        for (ep, path) in endpoints {
            if devices.contains_key(ep) {
                return Err(IommufdError::DuplicateEndpoint(ep.0));
            }
            let d = Device::open(path, &iommufd).map_err(|e| match e {
                IommufdError::Ioctl { ioctl, errno, .. } => IommufdError::Ioctl {
                    ioctl,
                    what: format!("{ep} ({})", path.display()),
                    errno,
                },
                e => e,
            })?;
            info!(
                "{ep}: {} bound to iommufd, dev_id {}",
                path.display(),
                d.dev_id
            );
            devices.insert(*ep, d);
        }

        // Host constraints with every device attached (the intersection of their limits).
        let scratch =
            sys::ioas_alloc(iommufd.as_fd()).map_err(ioctl_err("the scratch IOAS".to_string()))?;
        let queried = (|| {
            for (ep, d) in &devices {
                sys::attach_pt(dev_fd(d), scratch).map_err(ioctl_err(format!(
                    "{ep} ({}) to scratch IOAS {scratch}",
                    d.path.display()
                )))?;
            }
            let (ranges, align) = sys::ioas_iova_ranges(iommufd.as_fd(), scratch)
                .map_err(ioctl_err(format!("scratch IOAS {scratch}")))?;
            let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.last)).collect();
            info!(
                "allowed IOVA ranges with all devices attached: {}; alignment {align:#x}",
                pairs
                    .iter()
                    .map(|(s, l)| format!("{s:#x}..={l:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if pairs.is_empty() {
                return Err(IommufdError::NoIovaRange(format!("scratch IOAS {scratch}")));
            }
            constraints_from_ranges(&pairs, align).map_err(IommufdError::Constraints)
        })();
        let map_file_supported = probe_map_file(&iommufd, scratch);
        let identity = sys::ioas_alloc(iommufd.as_fd());
        // Boot state: off the scratch IOAS before it goes.
        let mut boot = Ok(());
        for (ep, d) in devices.iter_mut() {
            let r = match (&identity, boot_bypass) {
                (Ok(id), true) => sys::attach_pt(dev_fd(d), *id),
                _ => sys::detach_pt(dev_fd(d)),
            };
            if let Err(e) = r {
                boot = boot.and(Err(ioctl_err(format!("{ep} ({})", d.path.display()))(e)));
            }
            d.attached = if boot_bypass {
                Attachment::Identity
            } else {
                Attachment::Blocked
            };
        }
        if let Err(e) = sys::destroy(iommufd.as_fd(), scratch) {
            warn!("cannot destroy scratch IOAS {scratch}: errno {}", e.errno);
        }
        let constraints = queried?;
        let identity_id = identity.map_err(ioctl_err("the identity IOAS".to_string()))?;
        boot?;
        // The staging HWPT: a domain on the identity IOAS that no device uses, so that guest RAM
        // staged there stays pinned (once) and copies read its PFNs instead of pinning again.
        let staging_hwpt = devices.values().next().and_then(|d| {
            match sys::hwpt_alloc(iommufd.as_fd(), d.dev_id, identity_id) {
                Ok(h) => Some(h),
                Err(e) => {
                    info!(
                        "IOMMU_HWPT_ALLOC of the staging HWPT: {}: no staging + COPY",
                        std::io::Error::from_raw_os_error(e.errno)
                    );
                    None
                }
            }
        });
        info!(
            "iommufd: {} devices, identity (staging) IOAS {identity_id}, staging HWPT {}, \
             IOMMU_IOAS_MAP_FILE {}",
            devices.len(),
            staging_hwpt.map_or("none".to_string(), |h| h.to_string()),
            if map_file_supported {
                "available"
            } else {
                "not available: mapping by user VA"
            }
        );
        Ok(IommufdBackend {
            shared: Arc::new(Shared::new(
                iommufd,
                devices,
                identity_id,
                Topo {
                    identity: Vec::new(),
                },
                map_file_supported,
                staging_hwpt,
            )),
            constraints,
        })
    }

    /// A duplicate of the device's VFIO cdev fd, bound to this backend's iommufd (`None` for
    /// an unknown or unplugged endpoint). **For tests and the vfio-user front**: region access
    /// (BARs, config space) and IRQ setup go through it; the backend alone decides where its
    /// DMA goes, so nothing may attach or detach through it. The holder must drop it (and any
    /// mmap of it) on [`HotplugEvent::Unplugging`], or the host's unbind keeps waiting.
    pub fn device_file(&self, endpoint: EndpointId) -> Option<File> {
        lock(&self.shared.devices)
            .get(&endpoint)?
            .file
            .as_ref()?
            .try_clone()
            .map_err(|e| warn!("{endpoint}: cannot duplicate the VFIO device fd: {e}"))
            .ok()
    }

    /// The iommufd device id of an endpoint's device (`None` while unplugged).
    pub fn dev_id(&self, endpoint: EndpointId) -> Option<u32> {
        lock(&self.shared.devices)
            .get(&endpoint)
            .filter(|d| d.file.is_some())
            .map(|d| d.dev_id)
    }

    /// Whether an endpoint's device is currently unplugged (given back to the host).
    pub fn is_unplugged(&self, endpoint: EndpointId) -> bool {
        lock(&self.shared.devices)
            .get(&endpoint)
            .is_some_and(|d| d.file.is_none())
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` of one region of an endpoint's device.
    pub fn region_info(
        &self,
        endpoint: EndpointId,
        index: u32,
    ) -> std::result::Result<RegionInfo, IommufdError> {
        let devices = lock(&self.shared.devices);
        let d = devices
            .get(&endpoint)
            .filter(|d| d.file.is_some())
            .ok_or_else(|| IommufdError::Constraints(format!("{endpoint} has no device")))?;
        let r = sys::region_info(dev_fd(d), index).map_err(|e| IommufdError::Ioctl {
            ioctl: e.name,
            what: format!("{endpoint} ({}) region {index}", d.path.display()),
            errno: e.errno,
        })?;
        Ok(RegionInfo {
            flags: r.flags,
            size: r.size,
            offset: r.offset,
        })
    }

    /// Where the backend last pointed an endpoint.
    pub fn attachment(&self, endpoint: EndpointId) -> Option<Attachment> {
        lock(&self.shared.devices)
            .get(&endpoint)
            .map(|d| d.attached)
    }

    /// Ids of the live paging IOASes (not the identity one).
    pub fn domain_ids(&self) -> Vec<u32> {
        lock(&self.shared.domains).keys().copied().collect()
    }

    /// When guest RAM is staged from now on; takes effect at the next memory table.
    pub fn set_staging(&self, staging: Staging) {
        self.shared
            .stage_all
            .store(staging == Staging::AllRam, Ordering::Relaxed);
    }

    /// The identity IOAS's id.
    pub fn identity_ioas(&self) -> u32 {
        self.shared.identity_id
    }

    /// Bytes currently pinned by this backend's maps (summed over IOASes).
    pub fn pinned_bytes(&self) -> u64 {
        self.shared.pinned.load(Ordering::Relaxed)
    }
}

impl DmaBackend for IommufdBackend {
    fn name(&self) -> &'static str {
        "iommufd"
    }

    fn constraints(&self) -> HostConstraints {
        self.constraints.clone()
    }

    fn create_domain(&self) -> Result<Box<dyn HwDomain>> {
        Ok(Box::new(IommufdDomain::alloc(&self.shared, None)?))
    }

    fn create_domain_for(&self, guest: DomainId) -> Result<Box<dyn HwDomain>> {
        match lock(&self.shared.adopted).remove(&guest) {
            Some(state) => Ok(Box::new(IommufdDomain::adopt(&self.shared, guest, state))),
            None => Ok(Box::new(IommufdDomain::alloc(&self.shared, Some(guest))?)),
        }
    }

    fn host_id_of(&self, guest: DomainId) -> Option<u32> {
        lock(&self.shared.live).get(&guest).copied()
    }

    fn adopt_domains(&self, domains: Vec<(DomainId, HwDomainState)>) -> Result<()> {
        self.adopt_ioases(domains)
    }

    fn replay_recorded(&self) -> Result<()> {
        self.shared.replay_new.store(true, Ordering::Release);
        self.shared.replaying.store(true, Ordering::Release);
        Ok(())
    }

    fn adoption_done(&self, rebuilt: bool) {
        self.end_adoption(rebuilt);
    }

    fn reconcile(&self) -> Vec<std::result::Result<String, String>> {
        IommufdBackend::reconcile(self)
    }

    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        let mut topo = lock(&self.shared.topo);
        self.shared.point(&mut topo, endpoint, to)
    }

    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        self.stage_ram(ram)
    }
}

#[cfg(test)]
mod tests;
