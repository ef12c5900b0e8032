//! The raw uAPI: structs, request numbers and the one ioctl entry point.

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
