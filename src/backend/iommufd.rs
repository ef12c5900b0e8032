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
//! - **Map strategy** ([`MapStrategy`]). The identity IOAS doubles as the *staging* IOAS: it
//!   maps every RAM region once, at IOVA = GPA, and an unattached HWPT allocated on it in `open`
//!   (`IOMMU_HWPT_ALLOC` for the first device; no device is ever attached to it) keeps those
//!   pages pinned and holds their PFNs. A guest MAP then becomes `IOMMU_IOAS_COPY` of
//!   `[gpa, gpa + len)` from it: the kernel takes any contiguous run of earlier maps, sub-ranges
//!   included (`iopt_get_pages`; the uAPI comment's "must exactly match" is stricter than the
//!   code, and `set_ram` probes it once), shares the `iopt_pages`, and fills the new domain from
//!   the staging domain's page table instead of `pin_user_pages` (no re-pinning, no
//!   RLIMIT_MEMLOCK charge). The cost is one more IOMMU page table over all guest RAM. A copy
//!   is only tried while the staging IOAS holds the RAM table the domain maps from
//!   (`staged_gen`); otherwise, and on ENOENT/EPERM, the MAP goes straight in. The automatic
//!   choice is Copy > MapFile > Map by capability (measured in `BENCHMARKS-iommufd.md`);
//!   `set_map_strategy` overrides it for measurements.
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
//! Every ioctl goes through [`sys`]: one `#[repr(C)]` struct per request, transcribed from the
//! uAPI headers (`include/uapi/linux/iommufd.h`, `vfio.h`), tied to its request number by a
//! trait, issued by one function that returns the errno.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::{Attachment, BackendError, DmaBackend, HostConstraints, HwDomain, MapOp, Result};
use crate::guest_ram::GuestRam;
use crate::ids::{EndpointId, IovaRange, Perms};
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

/// A VFIO device region (BAR, config space) as `VFIO_DEVICE_GET_REGION_INFO` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

/// The raw uAPI: structs, request numbers and the one ioctl entry point.
pub mod sys {
    use std::mem::size_of;
    use std::os::fd::{AsRawFd, BorrowedFd};

    use libc::c_ulong;

    /// An errno from a failed ioctl, with the request's name.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Errno {
        pub name: &'static str,
        pub errno: i32,
    }

    /// `_IO(type, nr)`: iommufd and VFIO requests carry their size in the struct, not the number.
    const fn io(ty: u8, nr: u8) -> c_ulong {
        ((ty as c_ulong) << 8) | nr as c_ulong
    }
    /// `IOMMUFD_TYPE` and `VFIO_TYPE`.
    const TYPE: u8 = b';';
    /// `VFIO_BASE`.
    const VFIO_BASE: u8 = 100;

    pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
    pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
    pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

    pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
    pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
    pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
    pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
    pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

    /// An ioctl argument struct.
    ///
    /// # Safety
    /// The implementor must be `#[repr(C)]` with exactly the layout the kernel defines for `REQ`,
    /// and every bit pattern the kernel may write back must be valid for it (plain integers).
    pub unsafe trait IoctlArg {
        const REQ: c_ulong;
        const NAME: &'static str;
    }

    /// Issues `T::REQ` on `fd` with `arg`.
    pub fn ioctl<T: IoctlArg>(fd: BorrowedFd<'_>, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: `arg` is an exclusive reference to a live `T` whose `IoctlArg` impl guarantees
        // the layout the kernel reads and writes for `T::REQ`; the kernel accesses at most the
        // struct (its size/argsz field says how much) and, for requests that carry a user
        // pointer, memory the caller made valid for the call; nothing is retained afterwards.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), T::REQ as _, arg as *mut T) };
        if rc < 0 {
            return Err(Errno {
                name: T::NAME,
                errno: std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            });
        }
        Ok(())
    }

    /// The struct's size for its leading `size` / `argsz` field.
    pub fn size32<T>() -> u32 {
        u32::try_from(size_of::<T>()).expect("uAPI structs are small")
    }

    macro_rules! arg {
        ($ty:ident, $req:expr, $name:literal) => {
            // SAFETY: the struct below is a field-by-field `#[repr(C)]` transcription of the uAPI
            // struct of this request (u64 fields are `__aligned_u64`, naturally aligned on the
            // 64-bit targets this builds for), made only of integers.
            unsafe impl IoctlArg for $ty {
                const REQ: c_ulong = $req;
                const NAME: &'static str = $name;
            }
        };
    }

    /// `struct iommu_destroy`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuDestroy {
        pub size: u32,
        pub id: u32,
    }
    arg!(IommuDestroy, io(TYPE, 0x80), "IOMMU_DESTROY");

    /// `struct iommu_ioas_alloc`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasAlloc {
        pub size: u32,
        pub flags: u32,
        pub out_ioas_id: u32,
    }
    arg!(IommuIoasAlloc, io(TYPE, 0x81), "IOMMU_IOAS_ALLOC");

    /// `struct iommu_iova_range`
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IommuIovaRange {
        pub start: u64,
        pub last: u64,
    }

    /// `struct iommu_ioas_iova_ranges`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasIovaRanges {
        pub size: u32,
        pub ioas_id: u32,
        pub num_iovas: u32,
        pub reserved: u32,
        /// User pointer to `num_iovas` `IommuIovaRange`s.
        pub allowed_iovas: u64,
        pub out_iova_alignment: u64,
    }
    arg!(
        IommuIoasIovaRanges,
        io(TYPE, 0x84),
        "IOMMU_IOAS_IOVA_RANGES"
    );

    /// `struct iommu_ioas_map`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasMap {
        pub size: u32,
        pub flags: u32,
        pub ioas_id: u32,
        pub reserved: u32,
        pub user_va: u64,
        pub length: u64,
        pub iova: u64,
    }
    arg!(IommuIoasMap, io(TYPE, 0x85), "IOMMU_IOAS_MAP");

    /// `struct iommu_ioas_unmap`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasUnmap {
        pub size: u32,
        pub ioas_id: u32,
        pub iova: u64,
        pub length: u64,
    }
    arg!(IommuIoasUnmap, io(TYPE, 0x86), "IOMMU_IOAS_UNMAP");

    /// `struct iommu_ioas_map_file`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasMapFile {
        pub size: u32,
        pub flags: u32,
        pub ioas_id: u32,
        pub fd: i32,
        pub start: u64,
        pub length: u64,
        pub iova: u64,
    }
    arg!(IommuIoasMapFile, io(TYPE, 0x8f), "IOMMU_IOAS_MAP_FILE");

    /// `struct iommu_ioas_copy`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuIoasCopy {
        pub size: u32,
        pub flags: u32,
        pub dst_ioas_id: u32,
        pub src_ioas_id: u32,
        pub length: u64,
        pub dst_iova: u64,
        pub src_iova: u64,
    }
    arg!(IommuIoasCopy, io(TYPE, 0x83), "IOMMU_IOAS_COPY");

    /// `struct iommu_hwpt_alloc` (no driver data, no fault queue).
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuHwptAlloc {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub pt_id: u32,
        pub out_hwpt_id: u32,
        pub reserved: u32,
        pub data_type: u32,
        pub data_len: u32,
        pub data_uptr: u64,
        pub fault_id: u32,
        pub reserved2: u32,
    }
    arg!(IommuHwptAlloc, io(TYPE, 0x89), "IOMMU_HWPT_ALLOC");

    /// `struct vfio_region_info` (no capability chain: `argsz` is exactly this struct).
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct VfioRegionInfo {
        pub argsz: u32,
        pub flags: u32,
        pub index: u32,
        pub cap_offset: u32,
        pub size: u64,
        pub offset: u64,
    }
    arg!(
        VfioRegionInfo,
        io(TYPE, VFIO_BASE + 8),
        "VFIO_DEVICE_GET_REGION_INFO"
    );

    /// `struct vfio_device_bind_iommufd`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct VfioDeviceBindIommufd {
        pub argsz: u32,
        pub flags: u32,
        pub iommufd: i32,
        pub out_devid: u32,
        /// Read only with VFIO_DEVICE_BIND_FLAG_TOKEN (not used).
        pub token_uuid_ptr: u64,
    }
    arg!(
        VfioDeviceBindIommufd,
        io(TYPE, VFIO_BASE + 18),
        "VFIO_DEVICE_BIND_IOMMUFD"
    );

    /// `struct vfio_device_attach_iommufd_pt`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct VfioDeviceAttachIommufdPt {
        pub argsz: u32,
        pub flags: u32,
        pub pt_id: u32,
        /// Read only with VFIO_DEVICE_ATTACH_PASID (not used).
        pub pasid: u32,
    }
    arg!(
        VfioDeviceAttachIommufdPt,
        io(TYPE, VFIO_BASE + 19),
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT"
    );

    /// `struct vfio_device_detach_iommufd_pt`
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct VfioDeviceDetachIommufdPt {
        pub argsz: u32,
        pub flags: u32,
        /// Read only with VFIO_DEVICE_DETACH_PASID (not used).
        pub pasid: u32,
    }
    arg!(
        VfioDeviceDetachIommufdPt,
        io(TYPE, VFIO_BASE + 20),
        "VFIO_DEVICE_DETACH_IOMMUFD_PT"
    );

    pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
    pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
    pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

    /// `struct vfio_irq_set` with one eventfd as its data.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct VfioIrqSetEventfd {
        pub argsz: u32,
        pub flags: u32,
        pub index: u32,
        pub start: u32,
        pub count: u32,
        pub fd: i32,
    }
    arg!(
        VfioIrqSetEventfd,
        io(TYPE, VFIO_BASE + 10),
        "VFIO_DEVICE_SET_IRQS"
    );

    // Typed wrappers: the only callers of `ioctl`.

    /// Signals `eventfd` when the kernel asks for the device back (`VFIO_PCI_REQ_IRQ_INDEX`:
    /// the host is unbinding it from vfio-pci).
    pub fn set_req_eventfd(dev: BorrowedFd<'_>, eventfd: BorrowedFd<'_>) -> Result<(), Errno> {
        let mut a = VfioIrqSetEventfd {
            argsz: size32::<VfioIrqSetEventfd>(),
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_REQ_IRQ_INDEX,
            start: 0,
            count: 1,
            fd: eventfd.as_raw_fd(),
        };
        ioctl(dev, &mut a)
    }

    pub fn ioas_alloc(iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
        let mut a = IommuIoasAlloc {
            size: size32::<IommuIoasAlloc>(),
            ..Default::default()
        };
        ioctl(iommufd, &mut a)?;
        Ok(a.out_ioas_id)
    }

    pub fn destroy(iommufd: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
        let mut a = IommuDestroy {
            size: size32::<IommuDestroy>(),
            id,
        };
        ioctl(iommufd, &mut a)
    }

    /// Allowed IOVA ranges (inclusive) and the minimum IOVA alignment of an IOAS.
    pub fn ioas_iova_ranges(
        iommufd: BorrowedFd<'_>,
        ioas_id: u32,
    ) -> Result<(Vec<IommuIovaRange>, u64), Errno> {
        let mut ranges = vec![IommuIovaRange::default(); 8];
        loop {
            let mut a = IommuIoasIovaRanges {
                size: size32::<IommuIoasIovaRanges>(),
                ioas_id,
                num_iovas: u32::try_from(ranges.len()).expect("small"),
                allowed_iovas: ranges.as_mut_ptr() as u64,
                ..Default::default()
            };
            // The kernel writes at most `num_iovas` elements into `ranges`, which stays alive
            // and unmoved for the call.
            match ioctl(iommufd, &mut a) {
                Ok(()) => {
                    ranges.truncate(a.num_iovas as usize);
                    return Ok((ranges, a.out_iova_alignment));
                }
                Err(e) if e.errno == libc::EMSGSIZE && a.num_iovas as usize > ranges.len() => {
                    ranges.resize(a.num_iovas as usize, IommuIovaRange::default());
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn ioas_map(
        iommufd: BorrowedFd<'_>,
        ioas_id: u32,
        iova: u64,
        user_va: u64,
        length: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let mut a = IommuIoasMap {
            size: size32::<IommuIoasMap>(),
            flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
            ioas_id,
            user_va,
            length,
            iova,
            ..Default::default()
        };
        ioctl(iommufd, &mut a)
    }

    pub fn ioas_map_file(
        iommufd: BorrowedFd<'_>,
        ioas_id: u32,
        iova: u64,
        file: BorrowedFd<'_>,
        start: u64,
        length: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let mut a = IommuIoasMapFile {
            size: size32::<IommuIoasMapFile>(),
            flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
            ioas_id,
            fd: file.as_raw_fd(),
            start,
            length,
            iova,
        };
        ioctl(iommufd, &mut a)
    }

    /// `IOMMU_IOAS_COPY`: maps at `dst_iova` in `dst_ioas` the pages that `[src_iova, src_iova
    /// + length)` of `src_ioas` maps (any contiguous run of earlier maps, sub-ranges included:
    /// `iopt_get_pages` walks the covering areas), sharing their pinning.
    pub fn ioas_copy(
        iommufd: BorrowedFd<'_>,
        dst_ioas: u32,
        dst_iova: u64,
        src_ioas: u32,
        src_iova: u64,
        length: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let mut a = IommuIoasCopy {
            size: size32::<IommuIoasCopy>(),
            flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
            dst_ioas_id: dst_ioas,
            src_ioas_id: src_ioas,
            length,
            dst_iova,
            src_iova,
        };
        ioctl(iommufd, &mut a)
    }

    /// `IOMMU_HWPT_ALLOC` of a paging HWPT for `dev_id` on IOAS `pt_id`, attached to nothing:
    /// the kernel fills it with every mapping of the IOAS (pinning their pages) and keeps it in
    /// sync. Returns the HWPT id.
    pub fn hwpt_alloc(iommufd: BorrowedFd<'_>, dev_id: u32, pt_id: u32) -> Result<u32, Errno> {
        let mut a = IommuHwptAlloc {
            size: size32::<IommuHwptAlloc>(),
            dev_id,
            pt_id,
            ..Default::default()
        };
        ioctl(iommufd, &mut a)?;
        Ok(a.out_hwpt_id)
    }

    /// Unmaps `[iova, iova + length)`; returns how many bytes the kernel unmapped.
    pub fn ioas_unmap(
        iommufd: BorrowedFd<'_>,
        ioas_id: u32,
        iova: u64,
        length: u64,
    ) -> Result<u64, Errno> {
        let mut a = IommuIoasUnmap {
            size: size32::<IommuIoasUnmap>(),
            ioas_id,
            iova,
            length,
        };
        ioctl(iommufd, &mut a)?;
        Ok(a.length)
    }

    /// Binds a VFIO cdev to an iommufd; returns the device id.
    pub fn bind_iommufd(dev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
        let mut a = VfioDeviceBindIommufd {
            argsz: size32::<VfioDeviceBindIommufd>(),
            iommufd: iommufd.as_raw_fd(),
            ..Default::default()
        };
        ioctl(dev, &mut a)?;
        Ok(a.out_devid)
    }

    pub fn attach_pt(dev: BorrowedFd<'_>, pt_id: u32) -> Result<(), Errno> {
        let mut a = VfioDeviceAttachIommufdPt {
            argsz: size32::<VfioDeviceAttachIommufdPt>(),
            pt_id,
            ..Default::default()
        };
        ioctl(dev, &mut a)
    }

    pub fn detach_pt(dev: BorrowedFd<'_>) -> Result<(), Errno> {
        let mut a = VfioDeviceDetachIommufdPt {
            argsz: size32::<VfioDeviceDetachIommufdPt>(),
            ..Default::default()
        };
        ioctl(dev, &mut a)
    }

    pub fn region_info(dev: BorrowedFd<'_>, index: u32) -> Result<VfioRegionInfo, Errno> {
        let mut a = VfioRegionInfo {
            argsz: size32::<VfioRegionInfo>(),
            index,
            ..Default::default()
        };
        ioctl(dev, &mut a)?;
        Ok(a)
    }
}

/// Turns what `IOMMU_IOAS_IOVA_RANGES` reported into what the guest is told: the granule from
/// `out_iova_alignment` (at least 4 KiB), the input range spanning the allowed ranges (trimmed to
/// whole granules), every hole between them as RESV_MEM RESERVED (minus the MSI window) and the
/// x86 MSI window as RESV_MEM MSI.
pub fn constraints_from_ranges(
    ranges: &[(u64, u64)],
    alignment: u64,
) -> std::result::Result<HostConstraints, String> {
    let granule = alignment
        .max(MIN_GRANULE)
        .checked_next_power_of_two()
        .ok_or_else(|| format!("IOVA alignment {alignment:#x} is not a page size"))?;
    let mut sorted: Vec<(u64, u64)> = ranges.to_vec();
    sorted.sort_unstable();
    for &(s, l) in &sorted {
        if l < s {
            return Err(format!("IOVA range {s:#x}..={l:#x} is reversed"));
        }
    }
    for w in sorted.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(format!(
                "IOVA ranges {:#x}..={:#x} and {:#x}..={:#x} overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
    }
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return Err("no allowed IOVA range".into());
    };
    let mask = granule - 1;
    let start = first
        .0
        .checked_add(mask)
        .map(|s| s & !mask)
        .ok_or("input range start overflows")?;
    let end = match last.1.checked_add(1) {
        None => u64::MAX,
        Some(e) => (e & !mask)
            .checked_sub(1)
            .ok_or("input range is smaller than a granule")?,
    };
    let input_range = IovaRange::new(start, end)
        .ok_or_else(|| format!("allowed IOVAs hold no whole {granule:#x}-byte page"))?;

    let msi = (X86_MSI_WINDOW.0, X86_MSI_WINDOW.1);
    let mut reserved = Vec::new();
    for w in sorted.windows(2) {
        let (hs, he) = (w[0].1 + 1, w[1].0 - 1);
        // Split the hole around the MSI window, which is reported with its own type.
        if he < msi.0 || hs > msi.1 {
            reserved.push((hs, he));
        } else {
            if hs < msi.0 {
                reserved.push((hs, msi.0 - 1));
            }
            if he > msi.1 {
                reserved.push((msi.1 + 1, he));
            }
        }
    }
    let mut out: Vec<ResvMem> = reserved
        .into_iter()
        .map(|(start, end)| ResvMem {
            kind: ResvKind::Reserved,
            start,
            end,
        })
        .collect();
    out.push(ResvMem {
        kind: ResvKind::Msi,
        start: msi.0,
        end: msi.1,
    });
    out.sort_by_key(|r| r.start);
    Ok(HostConstraints {
        page_size_mask: !mask,
        input_range,
        reserved: out,
    })
}

/// The error text for an ENOMEM from a map: which limit, how much is needed.
fn memlock_hint(pinned: u64, len: u64) -> String {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } == 0 {
        if rl.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} bytes", rl.rlim_cur)
        }
    } else {
        "unknown".to_string()
    };
    format!(
        "ENOMEM pinning {len:#x} bytes: RLIMIT_MEMLOCK (now {limit}) must be at least {} bytes \
         ({pinned:#x} already pinned by this backend + this mapping; every IOAS pins guest RAM \
         separately): raise it (ulimit -l, systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
        pinned.saturating_add(len)
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything that can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Device {
    path: PathBuf,
    /// `None` while the host has the device back (unplugged; see "Hot-unplug" in the module
    /// docs).
    file: Option<File>,
    dev_id: u32,
    /// The PCI address behind the cdev (from sysfs), to find the device again after an unplug.
    pci: Option<PciAddress>,
    /// Signalled by the kernel when it wants the device back (request IRQ).
    req: Option<OwnedFd>,
    /// When an ATTACH of the unplugged endpoint was last logged.
    last_warn: Option<Instant>,
}

impl Device {
    fn open(path: &Path, iommufd: &File) -> std::result::Result<Device, IommufdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| IommufdError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let dev_id =
            sys::bind_iommufd(file.as_fd(), iommufd.as_fd()).map_err(|e| IommufdError::Ioctl {
                ioctl: e.name,
                what: path.display().to_string(),
                errno: e.errno,
            })?;
        let pci = path
            .file_name()
            .and_then(|n| {
                std::fs::canonicalize(Path::new("/sys/class/vfio-dev").join(n).join("device")).ok()
            })
            .and_then(|p| p.file_name()?.to_str()?.parse::<PciAddress>().ok());
        let req = request_eventfd(&file, path);
        Ok(Device {
            path: path.to_path_buf(),
            file: Some(file),
            dev_id,
            pci,
            req,
            last_warn: None,
        })
    }

    /// The open cdev; ENODEV while unplugged.
    fn file(&self, endpoint: EndpointId) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| {
            BackendError::new(
                "attach",
                libc::ENODEV,
                format!(
                    "{endpoint} ({}): the device was unplugged from vfio-pci",
                    self.path.display()
                ),
            )
        })
    }
}

/// An eventfd registered as the device's request IRQ; `None` (logged) if that fails.
fn request_eventfd(file: &File, path: &Path) -> Option<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; a non-negative return is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        warn!(
            "{}: eventfd for the request IRQ: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    match sys::set_req_eventfd(file.as_fd(), fd.as_fd()) {
        Ok(()) => Some(fd),
        Err(e) => {
            warn!(
                "{}: cannot register the request IRQ ({}): unbinding it from vfio-pci will \
                 block until the daemon stops",
                path.display(),
                std::io::Error::from_raw_os_error(e.errno)
            );
            None
        }
    }
}

/// What the hot-plug watcher ([`IommufdBackend::watch_hotplug`]) reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugEvent {
    /// The host asked for the device back. Called *before* the backend closes its fd: detach
    /// the endpoint in the domain model and drop every duplicate of the fd.
    Unplugging,
    /// The device is bound to vfio-pci again, reopened, bound to the iommufd and blocked (or
    /// identity under bypass): serve it again.
    Replugged,
}

/// The callback of [`IommufdBackend::watch_hotplug`].
pub type HotplugHook = Box<dyn Fn(EndpointId, HotplugEvent) + Send>;

/// How often unplugged devices are looked for in sysfs.
const REPLUG_POLL: Duration = Duration::from_secs(1);
/// At most one log line per endpoint this often for ATTACHes of an unplugged device.
const UNPLUGGED_WARN_EVERY: Duration = Duration::from_secs(10);

/// `(file id and offset, host VA)`: what makes two RAM regions the same memory.
type MemoryKey = (Option<((u64, u64), u64)>, u64);

/// One region of guest RAM in the identity IOAS: the same pages keep their mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdentityEntry {
    gpa: IovaRange,
    key: MemoryKey,
}

struct Topo {
    attachments: HashMap<EndpointId, Attachment>,
    identity: Vec<IdentityEntry>,
}

struct Shared {
    iommufd: File,
    /// Locked after `topo` when both are held.
    devices: Mutex<BTreeMap<EndpointId, Device>>,
    identity_id: u32,
    topo: Mutex<Topo>,
    ram: Mutex<Arc<GuestRam>>,
    ram_gen: AtomicU64,
    map_file_supported: bool,
    use_map_file: AtomicBool,
    /// `MapStrategy::code` of the override (0: automatic).
    strategy_override: AtomicU8,
    /// The unattached HWPT on the identity IOAS that keeps the staged guest RAM pinned (and
    /// answers PFN lookups for copies); `None` if `IOMMU_HWPT_ALLOC` failed.
    staging_hwpt: Option<u32>,
    /// The `ram_gen` whose RAM the identity (staging) IOAS holds completely; `u64::MAX` while
    /// `set_ram` is changing it or after it failed.
    staged_gen: AtomicU64,
    /// Whether `IOMMU_IOAS_COPY` of a sub-range of a staged region works (probed at the first
    /// staging): 0 unknown, 1 yes, 2 no.
    copy_works: AtomicU8,
    /// Live paging IOASes (ids), for tests and leak checks.
    domains: Mutex<BTreeMap<u32, ()>>,
    pinned: AtomicU64,
    maps_file: AtomicU64,
    maps_va: AtomicU64,
    maps_copy: AtomicU64,
}

fn map_flags(perms: Perms) -> u32 {
    let mut flags = 0;
    if perms.read {
        flags |= sys::IOMMU_IOAS_MAP_READABLE;
    }
    if perms.write {
        flags |= sys::IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

impl Shared {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.iommufd.as_fd()
    }

    /// The automatic choice (by measurement, see BENCHMARKS-iommufd.md): staging + COPY when
    /// the staging HWPT exists and a sub-range COPY worked, else MAP_FILE when the kernel has
    /// it, else MAP.
    fn auto_strategy(&self) -> MapStrategy {
        if self.staging_hwpt.is_some() && self.copy_works.load(Ordering::Relaxed) != 2 {
            MapStrategy::Copy
        } else if self.map_file_supported {
            MapStrategy::MapFile
        } else {
            MapStrategy::Map
        }
    }

    fn strategy(&self) -> MapStrategy {
        MapStrategy::from_code(self.strategy_override.load(Ordering::Relaxed))
            .unwrap_or_else(|| self.auto_strategy())
    }

    fn path(&self, from_file: bool) -> MapPath {
        let file_wanted =
            match MapStrategy::from_code(self.strategy_override.load(Ordering::Relaxed)) {
                Some(MapStrategy::Map) => false,
                Some(MapStrategy::MapFile) => true,
                _ => self.use_map_file.load(Ordering::Relaxed),
            };
        if from_file && self.map_file_supported && file_wanted {
            MapPath::File
        } else {
            MapPath::UserVa
        }
    }

    /// Maps `len` bytes at `iova` from RAM table `ram`: by file when possible, else by VA.
    fn map(
        &self,
        ram: &GuestRam,
        ioas: u32,
        iova: u64,
        len: u64,
        host: &crate::guest_ram::HostLocation,
        perms: Perms,
    ) -> std::result::Result<MapPath, sys::Errno> {
        let flags = map_flags(perms);
        let file = host.file.and_then(|(id, off)| {
            ram.regions()
                .iter()
                .filter_map(|r| r.backing.as_ref())
                .find(|b| b.file_id == id)
                .map(|b| (b.file.clone(), off))
        });
        let path = self.path(file.is_some());
        match (path, file) {
            (MapPath::File, Some((f, off))) => {
                sys::ioas_map_file(self.fd(), ioas, iova, f.as_fd(), off, len, flags)?;
                self.maps_file.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                sys::ioas_map(self.fd(), ioas, iova, host.host_addr, len, flags)?;
                self.maps_va.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pinned.fetch_add(len, Ordering::Relaxed);
        Ok(path)
    }

    fn unmap(&self, ioas: u32, iova: u64, len: u64) -> std::result::Result<(), sys::Errno> {
        let done = sys::ioas_unmap(self.fd(), ioas, iova, len)?;
        self.pinned.fetch_sub(done.min(len), Ordering::Relaxed);
        if done != len {
            // Cannot happen for a range that is exactly earlier maps; say so loudly if it does.
            error!("IOAS {ioas}: unmap of {len:#x} bytes at {iova:#x} removed {done:#x}");
        }
        Ok(())
    }

    /// Points one device somewhere. Caller holds the topology lock.
    fn point(&self, topo: &mut Topo, endpoint: EndpointId, to: Attachment) -> Result<()> {
        let mut devices = lock(&self.devices);
        let dev = devices.get_mut(&endpoint).ok_or_else(|| {
            BackendError::new("attach", libc::ENODEV, format!("{endpoint}: no device"))
        })?;
        if dev.file.is_none() {
            // Unplugged: no DMA at all, which satisfies blocked and identity; a paging domain
            // is refused (ENODEV: S_DEVERR) until the device is back.
            if let Attachment::Domain(_) = to {
                if dev
                    .last_warn
                    .is_none_or(|t| t.elapsed() >= UNPLUGGED_WARN_EVERY)
                {
                    dev.last_warn = Some(Instant::now());
                    warn!(
                        "{endpoint}: ATTACH refused (S_DEVERR): {} is unplugged from vfio-pci",
                        dev.path.display()
                    );
                }
                return Err(dev.file(endpoint).unwrap_err());
            }
            topo.attachments.insert(endpoint, to);
            return Ok(());
        }
        let file = dev.file(endpoint)?;
        let what = |op: &str| format!("{endpoint} ({}) {op}", dev.path.display());
        let r = match to {
            Attachment::Blocked => sys::detach_pt(file.as_fd()),
            Attachment::Identity => sys::attach_pt(file.as_fd(), self.identity_id),
            Attachment::Domain(id) => sys::attach_pt(file.as_fd(), id),
        };
        r.map_err(|e| {
            let target = match to {
                Attachment::Blocked => "detach".to_string(),
                Attachment::Identity => format!("to identity IOAS {}", self.identity_id),
                Attachment::Domain(id) => format!("to IOAS {id}"),
            };
            BackendError::new(e.name, e.errno, what(&target))
        })?;
        topo.attachments.insert(endpoint, to);
        debug!("{endpoint}: {to:?}");
        Ok(())
    }
}

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
        let mut attachments = HashMap::new();
        let mut boot = Ok(());
        for (ep, d) in &devices {
            let r = match (&identity, boot_bypass) {
                (Ok(id), true) => sys::attach_pt(dev_fd(d), *id),
                _ => sys::detach_pt(dev_fd(d)),
            };
            if let Err(e) = r {
                boot = boot.and(Err(ioctl_err(format!("{ep} ({})", d.path.display()))(e)));
            }
            attachments.insert(
                *ep,
                if boot_bypass {
                    Attachment::Identity
                } else {
                    Attachment::Blocked
                },
            );
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
            shared: Arc::new(Shared {
                iommufd,
                devices: Mutex::new(devices),
                identity_id,
                topo: Mutex::new(Topo {
                    attachments,
                    identity: Vec::new(),
                }),
                ram: Mutex::new(Arc::new(GuestRam::default())),
                ram_gen: AtomicU64::new(0),
                map_file_supported,
                use_map_file: AtomicBool::new(true),
                strategy_override: AtomicU8::new(0),
                staging_hwpt,
                staged_gen: AtomicU64::new(u64::MAX),
                copy_works: AtomicU8::new(0),
                domains: Mutex::new(BTreeMap::new()),
                pinned: AtomicU64::new(0),
                maps_file: AtomicU64::new(0),
                maps_va: AtomicU64::new(0),
                maps_copy: AtomicU64::new(0),
            }),
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

    /// Starts the hot-plug watcher thread: when the kernel signals a device's request IRQ (the
    /// host unbinds it from vfio-pci), `hook(ep, Unplugging)` runs, then the backend closes the
    /// device so the unbind completes; every second unplugged devices are looked for
    /// with [`vfio::discover`], reopened, bound, left blocked (identity under bypass), and
    /// `hook(ep, Replugged)` runs. The thread ends when the backend is dropped.
    pub fn watch_hotplug(
        self: &Arc<Self>,
        root: SysfsRoot,
        hook: HotplugHook,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("iommufd-hotplug".into())
            .spawn(move || {
                while let Some(b) = weak.upgrade() {
                    if !b.hotplug_step(&root, &hook) {
                        return;
                    }
                }
            })
    }

    /// One round of the watcher: waits up to `REPLUG_POLL` for a request IRQ, handles it,
    /// then looks for unplugged devices. `false` when there is nothing to watch.
    fn hotplug_step(&self, root: &SysfsRoot, hook: &HotplugHook) -> bool {
        let mut fds: Vec<(EndpointId, libc::pollfd)> = lock(&self.shared.devices)
            .iter()
            .filter_map(|(ep, d)| {
                d.req.as_ref().map(|r| {
                    (
                        *ep,
                        libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(r),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    )
                })
            })
            .collect();
        let mut p: Vec<libc::pollfd> = fds.iter().map(|f| f.1).collect();
        // SAFETY: `p` is a valid array of pollfds for the call; the fds stay open because only
        // this thread closes them (in `unplug`, below).
        let rc = unsafe {
            libc::poll(
                p.as_mut_ptr(),
                p.len() as libc::nfds_t,
                REPLUG_POLL.as_millis() as i32,
            )
        };
        if rc > 0 {
            for (f, q) in fds.iter_mut().zip(&p) {
                if q.revents != 0 {
                    let mut v = [0u8; 8];
                    // SAFETY: reads 8 bytes into `v` from the (non-blocking) eventfd.
                    unsafe { libc::read(q.fd, v.as_mut_ptr().cast(), v.len()) };
                    info!("{}: the host asks for its device back: unplugging it", f.0);
                    hook(f.0, HotplugEvent::Unplugging);
                    self.unplug(f.0);
                }
            }
        }
        let gone: Vec<(EndpointId, Option<PciAddress>)> = lock(&self.shared.devices)
            .iter()
            .filter(|(_, d)| d.file.is_none())
            .map(|(ep, d)| (*ep, d.pci))
            .collect();
        for (ep, pci) in gone {
            let Some(pci) = pci else { continue };
            let Ok(cdev) = vfio::discover(root, pci) else {
                continue;
            };
            match self.replug(ep, &cdev.node) {
                Ok(()) => hook(ep, HotplugEvent::Replugged),
                Err(e) => debug!("{ep}: not replugged yet: {e}"),
            }
        }
        true
    }

    /// Closes an endpoint's device (its request eventfd too): DMA stops, and the host's unbind
    /// completes once every other duplicate of the fd is closed.
    fn unplug(&self, endpoint: EndpointId) {
        let mut topo = lock(&self.shared.topo);
        let mut devices = lock(&self.shared.devices);
        let Some(d) = devices.get_mut(&endpoint) else {
            return;
        };
        d.req = None;
        if d.file.take().is_some() {
            d.last_warn = None;
            let keep = match topo.attachments.get(&endpoint) {
                Some(Attachment::Identity) => Attachment::Identity,
                _ => Attachment::Blocked,
            };
            topo.attachments.insert(endpoint, keep);
            info!("{endpoint}: {} closed (unplugged)", d.path.display());
        }
    }

    /// Reopens an unplugged endpoint's device at `node`, binds it and points it where the
    /// model has it (blocked or identity).
    fn replug(&self, endpoint: EndpointId, node: &Path) -> std::result::Result<(), IommufdError> {
        let mut topo = lock(&self.shared.topo);
        let mut new = Device::open(node, &self.shared.iommufd)?;
        let to = topo
            .attachments
            .get(&endpoint)
            .copied()
            .unwrap_or(Attachment::Blocked);
        let f = new.file.as_ref().map(|f| f.as_fd()).expect("just opened");
        let r = match to {
            Attachment::Identity => sys::attach_pt(f, self.shared.identity_id),
            _ => sys::detach_pt(f),
        };
        r.map_err(|e| IommufdError::Ioctl {
            ioctl: e.name,
            what: format!("{endpoint} ({})", node.display()),
            errno: e.errno,
        })?;
        let mut devices = lock(&self.shared.devices);
        if let Some(old) = devices.get(&endpoint) {
            new.pci = new.pci.or(old.pci);
        }
        info!(
            "{endpoint}: {} replugged, dev_id {}, {to:?}",
            node.display(),
            new.dev_id
        );
        devices.insert(endpoint, new);
        if to != Attachment::Identity {
            topo.attachments.insert(endpoint, Attachment::Blocked);
        }
        Ok(())
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
        lock(&self.shared.topo).attachments.get(&endpoint).copied()
    }

    /// Ids of the live paging IOASes (not the identity one).
    pub fn domain_ids(&self) -> Vec<u32> {
        lock(&self.shared.domains).keys().copied().collect()
    }

    /// The identity IOAS's id.
    pub fn identity_ioas(&self) -> u32 {
        self.shared.identity_id
    }

    /// Whether the kernel has `IOMMU_IOAS_MAP_FILE` (probed once in `open`).
    pub fn map_file_supported(&self) -> bool {
        self.shared.map_file_supported
    }

    /// Forces MAP_FILE (`true`) or MAP by user VA (`false`) for guest MAPs from now on: the same
    /// as `set_map_strategy(Some(MapFile | Map))`. Mappings already made keep their path.
    pub fn prefer_map_file(&self, on: bool) {
        self.shared.use_map_file.store(on, Ordering::Relaxed);
        self.set_map_strategy(Some(if on {
            MapStrategy::MapFile
        } else {
            MapStrategy::Map
        }));
    }

    /// Overrides the map strategy of guest MAPs from now on (`None`: automatic, by capability:
    /// see `map_strategy`). Measurements only; mappings already made keep theirs.
    pub fn set_map_strategy(&self, s: Option<MapStrategy>) {
        self.shared
            .strategy_override
            .store(MapStrategy::code(s), Ordering::Relaxed);
    }

    /// The strategy the next guest MAP tries first (a `Copy` falls back to a direct map while
    /// its memory is not staged).
    pub fn map_strategy(&self) -> MapStrategy {
        self.shared.strategy()
    }

    /// The automatic strategy this kernel and these devices allow.
    pub fn auto_map_strategy(&self) -> MapStrategy {
        self.shared.auto_strategy()
    }

    /// The HWPT that keeps staged guest RAM pinned, if `IOMMU_HWPT_ALLOC` worked.
    pub fn staging_hwpt(&self) -> Option<u32> {
        self.shared.staging_hwpt
    }

    /// Whether a sub-range `IOMMU_IOAS_COPY` from the staging IOAS worked (`None`: not probed
    /// yet; probed at the first `set_ram` when there is a staging HWPT).
    pub fn copy_works(&self) -> Option<bool> {
        match self.shared.copy_works.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Guest MAPs done by `IOMMU_IOAS_COPY` from the staging IOAS so far.
    pub fn copy_count(&self) -> u64 {
        self.shared.maps_copy.load(Ordering::Relaxed)
    }

    /// The `/dev/iommu` fd (benchmarks: raw ioctl loops on IOASes of this context).
    pub fn iommufd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.fd()
    }

    /// The path the next direct (non-COPY) map of file-backed RAM takes.
    pub fn map_path(&self) -> MapPath {
        self.shared.path(true)
    }

    /// Maps done so far: `(by MAP_FILE, by user VA)`, identity IOAS included.
    pub fn map_counts(&self) -> (u64, u64) {
        (
            self.shared.maps_file.load(Ordering::Relaxed),
            self.shared.maps_va.load(Ordering::Relaxed),
        )
    }

    /// Bytes currently pinned by this backend's maps (summed over IOASes).
    pub fn pinned_bytes(&self) -> u64 {
        self.shared.pinned.load(Ordering::Relaxed)
    }
}

/// The fd of a device that is open (during `open`, all are).
fn dev_fd(d: &Device) -> std::os::fd::BorrowedFd<'_> {
    d.file.as_ref().expect("the device is open").as_fd()
}

/// Tries `IOMMU_IOAS_MAP_FILE` of one memfd page into `ioas` (left as it was).
fn probe_map_file(iommufd: &File, ioas: u32) -> bool {
    let name = c"vhost-user-iommu-probe";
    // SAFETY: `name` is NUL-terminated; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        warn!(
            "memfd_create for the MAP_FILE probe: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if let Err(e) = file.set_len(MIN_GRANULE) {
        warn!("sizing the MAP_FILE probe memfd: {e}");
        return false;
    }
    // Any granule-aligned IOVA the scratch IOAS allows: its allowed ranges, first one.
    let iova = match sys::ioas_iova_ranges(iommufd.as_fd(), ioas) {
        Ok((r, _)) => match r
            .iter()
            .find(|r| r.last.saturating_sub(r.start) >= 2 * MIN_GRANULE)
        {
            Some(r) => (r.start + MIN_GRANULE - 1) & !(MIN_GRANULE - 1),
            None => return false,
        },
        Err(_) => return false,
    };
    let flags = sys::IOMMU_IOAS_MAP_READABLE;
    match sys::ioas_map_file(
        iommufd.as_fd(),
        ioas,
        iova,
        file.as_fd(),
        0,
        MIN_GRANULE,
        flags,
    ) {
        Ok(()) => {
            if let Err(e) = sys::ioas_unmap(iommufd.as_fd(), ioas, iova, MIN_GRANULE) {
                warn!("unmapping the MAP_FILE probe: errno {}", e.errno);
            }
            true
        }
        Err(e) => {
            let why = match e.errno {
                libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL => "not supported by this kernel",
                _ => "failed",
            };
            info!(
                "IOMMU_IOAS_MAP_FILE {why} ({}): mapping by user VA",
                std::io::Error::from_raw_os_error(e.errno)
            );
            false
        }
    }
}

/// A guest paging domain: one IOAS.
struct IommufdDomain {
    id: u32,
    shared: Arc<Shared>,
    ram: Arc<GuestRam>,
    ram_gen: u64,
    /// Mappings without permissions: recorded, not given to the kernel (start → end).
    phantom: BTreeMap<u64, u64>,
    /// Bytes this IOAS pins (released at destroy).
    pinned: u64,
    /// Starts of the mappings made by `IOMMU_IOAS_COPY` (they pin nothing of their own).
    copied: HashSet<u64>,
}

impl IommufdDomain {
    /// The backend's current RAM table; locks only when `set_ram` ran since the last call.
    fn current_ram(&mut self) -> Arc<GuestRam> {
        let g = self.shared.ram_gen.load(Ordering::Acquire);
        if g != self.ram_gen {
            self.ram = lock(&self.shared.ram).clone();
            self.ram_gen = g;
        }
        self.ram.clone()
    }
}

impl HwDomain for IommufdDomain {
    fn id(&self) -> u32 {
        self.id
    }

    fn map(&mut self, op: &MapOp) -> Result<()> {
        let iova = op.iova;
        let ctx = |s: &Self| format!("IOAS {} at {iova} (GPA {:#x})", s.id, op.gpa);
        let len = iova
            .len()
            .ok_or_else(|| BackendError::new("map", libc::EOVERFLOW, ctx(self)))?;
        if !op.perms.read && !op.perms.write {
            if let Some((_, &e)) = self.phantom.range(..=iova.end()).next_back()
                && e >= iova.start()
            {
                return Err(BackendError::new("map", libc::EEXIST, ctx(self)));
            }
            self.phantom.insert(iova.start(), iova.end());
            return Ok(());
        }
        let shared = self.shared.clone();
        let id = self.id;
        let ram = self.current_ram();
        if shared.strategy() == MapStrategy::Copy
            && shared.staged_gen.load(Ordering::Acquire) == self.ram_gen
        {
            // The staging (identity) IOAS maps every RAM region at IOVA = GPA, pinned once.
            match sys::ioas_copy(
                shared.fd(),
                id,
                iova.start(),
                shared.identity_id,
                op.gpa,
                len,
                map_flags(op.perms),
            ) {
                Ok(()) => {
                    shared.maps_copy.fetch_add(1, Ordering::Relaxed);
                    self.copied.insert(iova.start());
                    return Ok(());
                }
                // Not (or no longer) staged: map it directly below.
                Err(e) if e.errno == libc::ENOENT || e.errno == libc::EPERM => {
                    debug!(
                        "IOAS {id}: COPY from staging at GPA {:#x}: errno {}",
                        op.gpa, e.errno
                    );
                }
                Err(e) => return Err(BackendError::new(e.name, e.errno, ctx(self))),
            }
        }
        match shared.map(&ram, id, iova.start(), len, &op.host, op.perms) {
            Ok(_) => {
                self.pinned += len;
                Ok(())
            }
            Err(e) if e.errno == libc::ENOMEM => Err(BackendError::new(
                e.name,
                e.errno,
                format!(
                    "{}: {}",
                    ctx(self),
                    memlock_hint(shared.pinned.load(Ordering::Relaxed), len)
                ),
            )),
            Err(e) => Err(BackendError::new(e.name, e.errno, ctx(self))),
        }
    }

    fn unmap(&mut self, iova: IovaRange) -> Result<()> {
        if self.phantom.get(&iova.start()) == Some(&iova.end()) {
            self.phantom.remove(&iova.start());
            return Ok(());
        }
        let len = iova.len().ok_or_else(|| {
            BackendError::new(
                "unmap",
                libc::EOVERFLOW,
                format!("IOAS {} at {iova}", self.id),
            )
        })?;
        let copied = self.copied.remove(&iova.start());
        let r = if copied {
            sys::ioas_unmap(self.shared.fd(), self.id, iova.start(), len).map(|_| ())
        } else {
            self.shared.unmap(self.id, iova.start(), len)
        };
        if let Err(e) = r {
            if copied {
                self.copied.insert(iova.start());
            }
            return Err(BackendError::new(
                e.name,
                e.errno,
                format!("IOAS {} at {iova}", self.id),
            ));
        }
        if !copied {
            self.pinned = self.pinned.saturating_sub(len);
        }
        Ok(())
    }
}

impl Drop for IommufdDomain {
    fn drop(&mut self) {
        {
            // The kernel refuses to destroy an IOAS a device is attached to: block those first.
            let mut topo = lock(&self.shared.topo);
            let users: Vec<EndpointId> = topo
                .attachments
                .iter()
                .filter(|(_, a)| **a == Attachment::Domain(self.id))
                .map(|(&e, _)| e)
                .collect();
            for e in users {
                warn!(
                    "IOAS {} destroyed while {e} is attached: blocking it",
                    self.id
                );
                if let Err(err) = self.shared.point(&mut topo, e, Attachment::Blocked) {
                    error!("{err}");
                }
            }
        }
        match sys::destroy(self.shared.fd(), self.id) {
            Ok(()) => {
                self.shared.pinned.fetch_sub(self.pinned, Ordering::Relaxed);
                debug!("IOAS {} destroyed", self.id);
            }
            Err(e) => error!(
                "IOMMU_DESTROY of IOAS {}: {}",
                self.id,
                std::io::Error::from_raw_os_error(e.errno)
            ),
        }
        lock(&self.shared.domains).remove(&self.id);
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
        let id = sys::ioas_alloc(self.shared.fd())
            .map_err(|e| BackendError::new(e.name, e.errno, "a paging domain"))?;
        lock(&self.shared.domains).insert(id, ());
        let ram_gen = self.shared.ram_gen.load(Ordering::Acquire);
        let ram = lock(&self.shared.ram).clone();
        debug!("IOAS {id} allocated");
        Ok(Box::new(IommufdDomain {
            id,
            shared: self.shared.clone(),
            ram,
            ram_gen,
            phantom: BTreeMap::new(),
            pinned: 0,
            copied: HashSet::new(),
        }))
    }

    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        let mut topo = lock(&self.shared.topo);
        self.shared.point(&mut topo, endpoint, to)
    }

    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        let ram = Arc::new(ram.clone());
        let mut topo = lock(&self.shared.topo);
        // No copies from the staging IOAS while it changes.
        self.shared.staged_gen.store(u64::MAX, Ordering::Release);
        let generation = {
            *lock(&self.shared.ram) = ram.clone();
            self.shared.ram_gen.fetch_add(1, Ordering::AcqRel) + 1
        };
        let wanted: Vec<IdentityEntry> = ram
            .regions()
            .iter()
            .map(|r| IdentityEntry {
                gpa: r.gpa,
                key: (
                    r.backing.as_ref().map(|b| (b.file_id, b.offset)),
                    r.host_addr,
                ),
            })
            .collect();
        let id = self.shared.identity_id;
        // Unmap what is gone (or changed) first: a new region may reuse its GPAs.
        let mut kept = Vec::new();
        for e in std::mem::take(&mut topo.identity) {
            if wanted.contains(&e) {
                kept.push(e);
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            match self.shared.unmap(id, e.gpa.start(), len) {
                Ok(()) => debug!("identity IOAS: unmapped {}", e.gpa),
                Err(err) => {
                    kept.push(e.clone());
                    topo.identity = kept;
                    return Err(BackendError::new(
                        err.name,
                        err.errno,
                        format!("identity IOAS {id}: removed RAM at {}", e.gpa),
                    ));
                }
            }
        }
        topo.identity = kept;
        for (e, r) in wanted.iter().zip(ram.regions()) {
            if topo.identity.contains(e) {
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            let host = crate::guest_ram::HostLocation {
                host_addr: r.host_addr,
                file: e.key.0,
            };
            match self
                .shared
                .map(&ram, id, e.gpa.start(), len, &host, Perms::RW)
            {
                Ok(path) => {
                    debug!("identity IOAS: mapped {} ({path:?})", e.gpa);
                    topo.identity.push(e.clone());
                }
                Err(err) => {
                    let mut ctx = format!("identity IOAS {id}: RAM at {}", e.gpa);
                    if err.errno == libc::ENOMEM {
                        ctx = format!(
                            "{ctx}: {}",
                            memlock_hint(self.shared.pinned.load(Ordering::Relaxed), len)
                        );
                    }
                    return Err(BackendError::new(err.name, err.errno, ctx));
                }
            }
        }
        if self.shared.staging_hwpt.is_some() && self.shared.copy_works.load(Ordering::Relaxed) == 0
        {
            let works = probe_copy(&self.shared, &ram);
            if let Some(w) = works {
                self.shared
                    .copy_works
                    .store(if w { 1 } else { 2 }, Ordering::Relaxed);
            }
        }
        self.shared.staged_gen.store(generation, Ordering::Release);
        Ok(())
    }
}

/// Tries `IOMMU_IOAS_COPY` of one granule from the middle of the first staged RAM region into a
/// scratch IOAS (destroyed again). `None` when there is nothing to try it on.
fn probe_copy(shared: &Shared, ram: &GuestRam) -> Option<bool> {
    let r = ram
        .regions()
        .iter()
        .find(|r| r.gpa.len().is_some_and(|l| l >= 3 * MIN_GRANULE))?;
    let scratch = match sys::ioas_alloc(shared.fd()) {
        Ok(id) => id,
        Err(e) => {
            warn!("scratch IOAS for the COPY probe: errno {}", e.errno);
            return None;
        }
    };
    let src = r.gpa.start() + MIN_GRANULE;
    let res = sys::ioas_copy(
        shared.fd(),
        scratch,
        src,
        shared.identity_id,
        src,
        MIN_GRANULE,
        sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE,
    );
    if let Err(e) = sys::destroy(shared.fd(), scratch) {
        warn!(
            "cannot destroy the COPY probe IOAS {scratch}: errno {}",
            e.errno
        );
    }
    match res {
        Ok(()) => {
            info!("IOMMU_IOAS_COPY of a sub-range of staged RAM works: MAPs copy from staging");
            Some(true)
        }
        Err(e) => {
            info!(
                "IOMMU_IOAS_COPY of a sub-range of staged RAM fails ({}): MAPs map directly",
                std::io::Error::from_raw_os_error(e.errno)
            );
            Some(false)
        }
    }
}

/// Lets tests (and the vfio-user front) keep a handle on the backend while the daemon owns it.
impl DmaBackend for Arc<IommufdBackend> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn constraints(&self) -> HostConstraints {
        (**self).constraints()
    }
    fn create_domain(&self) -> Result<Box<dyn HwDomain>> {
        (**self).create_domain()
    }
    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        (**self).attach(endpoint, to)
    }
    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        (**self).set_ram(ram)
    }
}

#[cfg(test)]
mod tests {
    use super::sys::*;
    use super::*;
    use std::mem::size_of;

    fn resv(kind: ResvKind, start: u64, end: u64) -> ResvMem {
        ResvMem { kind, start, end }
    }

    #[test]
    fn struct_sizes_and_request_numbers_match_the_uapi_headers() {
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(size_of::<IommuIoasAlloc>(), 12);
        assert_eq!(size_of::<IommuIovaRange>(), 16);
        assert_eq!(size_of::<IommuIoasIovaRanges>(), 32);
        assert_eq!(size_of::<IommuIoasMap>(), 40);
        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(size_of::<IommuIoasMapFile>(), 40);
        assert_eq!(size_of::<IommuIoasCopy>(), 40);
        assert_eq!(size_of::<IommuHwptAlloc>(), 48);
        assert_eq!(IommuIoasCopy::REQ, 0x3b83);
        assert_eq!(IommuHwptAlloc::REQ, 0x3b89);
        assert_eq!(size_of::<VfioRegionInfo>(), 32);
        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 16);
        assert_eq!(size_of::<VfioDeviceDetachIommufdPt>(), 12);
        assert_eq!(IommuDestroy::REQ, 0x3b80);
        assert_eq!(IommuIoasAlloc::REQ, 0x3b81);
        assert_eq!(IommuIoasIovaRanges::REQ, 0x3b84);
        assert_eq!(IommuIoasMap::REQ, 0x3b85);
        assert_eq!(IommuIoasUnmap::REQ, 0x3b86);
        assert_eq!(IommuIoasMapFile::REQ, 0x3b8f);
        assert_eq!(VfioRegionInfo::REQ, 0x3b6c);
        assert_eq!(VfioDeviceBindIommufd::REQ, 0x3b76);
        assert_eq!(VfioDeviceAttachIommufdPt::REQ, 0x3b77);
        assert_eq!(VfioDeviceDetachIommufdPt::REQ, 0x3b78);
        assert_eq!(size_of::<VfioIrqSetEventfd>(), 24);
        assert_eq!(VfioIrqSetEventfd::REQ, 0x3b6e);
    }

    #[test]
    fn intel_like_ranges_become_a_granule_a_span_and_an_msi_window() {
        // What an intel-iommu (39-bit) device reports: everything but the MSI window.
        let c = constraints_from_ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)], 4096)
            .unwrap();
        assert_eq!(c.page_size_mask, !0xfff);
        assert_eq!(c.input_range, IovaRange::new(0, (1 << 39) - 1).unwrap());
        assert_eq!(
            c.reserved,
            vec![resv(ResvKind::Msi, 0xfee0_0000, 0xfeef_ffff)]
        );
    }

    #[test]
    fn holes_become_reserved_and_are_split_around_the_msi_window() {
        let c = constraints_from_ranges(
            &[
                (0x10_0000, 0x7fff_ffff),
                (0x1_0000_0000, u64::MAX),
                (0x8000_1000, 0xfed0_0fff),
            ],
            1,
        )
        .unwrap();
        assert_eq!(c.page_size_mask, !0xfff);
        assert_eq!(c.input_range, IovaRange::new(0x10_0000, u64::MAX).unwrap());
        assert_eq!(
            c.reserved,
            vec![
                resv(ResvKind::Reserved, 0x8000_0000, 0x8000_0fff),
                resv(ResvKind::Reserved, 0xfed0_1000, 0xfedf_ffff),
                resv(ResvKind::Msi, 0xfee0_0000, 0xfeef_ffff),
                resv(ResvKind::Reserved, 0xfef0_0000, 0xffff_ffff),
            ]
        );
    }

    #[test]
    fn the_full_space_and_coarse_alignment() {
        let c = constraints_from_ranges(&[(0, u64::MAX)], 0x1_0000).unwrap();
        assert_eq!(c.page_size_mask, !0xffff);
        assert_eq!(c.input_range, IovaRange::new(0, u64::MAX).unwrap());
        assert_eq!(c.reserved.len(), 1);
        // Unaligned ends are trimmed to whole granules.
        let c = constraints_from_ranges(&[(0x123, 0x5_0122)], 4096).unwrap();
        assert_eq!(c.input_range, IovaRange::new(0x1000, 0x4_ffff).unwrap());
    }

    #[test]
    fn bad_reports_are_refused() {
        assert!(constraints_from_ranges(&[], 4096).is_err());
        assert!(constraints_from_ranges(&[(0, 0xfff), (0x800, 0x1fff)], 4096).is_err());
        assert!(constraints_from_ranges(&[(0x10, 0x20)], 4096).is_err());
        assert!(constraints_from_ranges(&[(5, 4)], 4096).is_err());
    }

    #[test]
    fn memlock_hint_names_the_limit_and_the_need() {
        let h = memlock_hint(0x100_0000, 0x1000);
        assert!(h.contains("RLIMIT_MEMLOCK"), "{h}");
        assert!(h.contains(&format!("{}", 0x100_1000)), "{h}");
        assert!(h.contains("CAP_IPC_LOCK"), "{h}");
    }

    #[test]
    fn open_names_the_node_that_is_missing() {
        let e = IommufdBackend::open_with(Path::new("/nonexistent/iommu"), &[], false)
            .err()
            .expect("no such node");
        assert!(e.to_string().contains("/nonexistent/iommu"), "{e}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }
}
