//! The iommufd and VFIO ioctls the backend issues. The structs are the maintained bindings'
//! (`iommufd-bindings`, `vfio-bindings`: bindgen output of the uAPI headers with layout
//! assertions), the request numbers come from `vmm-sys-util`'s ioctl macros, and [`IoctlArg`]
//! ties each struct to its request. The daemon calls the typed wrappers at the end; the VM tiers'
//! guest programs also issue [`ioctl`] with the structs directly.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

pub use iommufd_bindings as iommu;
use libc::c_ulong;
pub use vfio_bindings::bindings::vfio;
use vmm_sys_util::ioctl::{ioctl as ioctl_no_arg, ioctl_with_mut_ref};
use vmm_sys_util::ioctl_io_nr;

/// An errno from a failed ioctl, with the request's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno {
    pub name: &'static str,
    pub errno: i32,
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.name,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for Errno {}

impl Errno {
    /// The calling thread's last OS error, for request `name`.
    fn last(name: &'static str) -> Errno {
        let errno = std::io::Error::last_os_error().raw_os_error();
        Errno {
            name,
            errno: errno.unwrap_or(libc::EIO),
        }
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::new(std::io::Error::from_raw_os_error(e.errno).kind(), e)
    }
}

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = iommu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = iommu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
pub const IOMMU_IOAS_MAP_READABLE: u32 = iommu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;

pub use vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

pub type IommuDestroy = iommu::iommu_destroy;
pub type IommuIoasAlloc = iommu::iommu_ioas_alloc;
pub type IommuIovaRange = iommu::iommu_iova_range;
pub type IommuIoasIovaRanges = iommu::iommu_ioas_iova_ranges;
pub type IommuIoasMap = iommu::iommu_ioas_map;
pub type IommuIoasUnmap = iommu::iommu_ioas_unmap;
pub type IommuIoasMapFile = iommu::iommu_ioas_map_file;
pub type IommuIoasCopy = iommu::iommu_ioas_copy;
pub type IommuHwptAlloc = iommu::iommu_hwpt_alloc;
pub type IommuIoasChangeProcess = iommu::iommu_ioas_change_process;
pub type VfioDeviceInfo = vfio::vfio_device_info;
pub type VfioRegionInfo = vfio::vfio_region_info;
pub type VfioIrqInfo = vfio::vfio_irq_info;
pub type VfioDeviceBindIommufd = vfio::vfio_device_bind_iommufd;
pub type VfioDeviceAttachIommufdPt = vfio::vfio_device_attach_iommufd_pt;
pub type VfioDeviceDetachIommufdPt = vfio::vfio_device_detach_iommufd_pt;

/// `struct vfio_irq_set` with one eventfd as its data (the bindings end the struct with a
/// flexible array).
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioIrqSetEventfd {
    pub set: vfio::vfio_irq_set,
    pub fd: i32,
}

/// An ioctl argument struct.
///
/// # Safety
/// The implementor must be `#[repr(C)]` with exactly the layout the kernel defines for
/// `request()`, and every bit pattern the kernel may write back must be valid for it (plain
/// integers).
pub unsafe trait IoctlArg: Sized {
    const NAME: &'static str;
    fn request() -> c_ulong;
    /// The struct zeroed but for its leading size field (`size` / `argsz`), which says how
    /// large it is: what every request starts from.
    fn sized() -> Self;
}

/// Issues `T::request()` on `fd` with `arg`.
pub fn ioctl<T: IoctlArg>(fd: BorrowedFd<'_>, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is an exclusive reference to a live `T` whose `IoctlArg` impl guarantees
    // the layout the kernel reads and writes for `T::request()`; the kernel accesses at most the
    // struct (its size/argsz field says how much) and, for requests that carry a user
    // pointer, memory the caller made valid for the call; nothing is retained afterwards.
    let rc = unsafe { ioctl_with_mut_ref(&fd, T::request(), arg) };
    if rc < 0 {
        return Err(Errno::last(T::NAME));
    }
    Ok(())
}

/// The struct's size for its leading `size` / `argsz` field.
pub fn size32<T>() -> u32 {
    u32::try_from(size_of::<T>()).expect("uAPI structs are small")
}

/// Each request: `ioctl_io_nr!` (iommufd and VFIO requests are `_IO(type, nr)`, the struct
/// carries its own size) and, after `=>`, the struct it takes with the path of its size field.
macro_rules! requests {
    ($($req:ident = $kind:ident: $nr:expr $(=> $ty:ident . $($size:ident).+)?;)*) => {
        $(
            ioctl_io_nr!($req, requests!(@type $kind), $nr);
            $(requests!(@arg $ty, $req, $($size).+);)?
        )*
    };
    (@type iommufd) => { iommu::IOMMUFD_TYPE.into() };
    (@type vfio) => { vfio::VFIO_TYPE.into() };
    (@arg $ty:ident, $req:ident, $($size:ident).+) => {
        // SAFETY: the maintained bindings' `#[repr(C)]` struct of this request (bindgen output
        // with layout assertions), made only of integers.
        unsafe impl IoctlArg for $ty {
            const NAME: &'static str = stringify!($req);
            fn request() -> c_ulong {
                $req()
            }
            fn sized() -> Self {
                let mut a = Self::default();
                a.$($size).+ = size32::<Self>();
                a
            }
        }
    };
}
requests! {
    IOMMU_DESTROY = iommufd: iommu::IOMMUFD_CMD_DESTROY => IommuDestroy.size;
    IOMMU_IOAS_ALLOC = iommufd: iommu::IOMMUFD_CMD_IOAS_ALLOC => IommuIoasAlloc.size;
    IOMMU_IOAS_COPY = iommufd: iommu::IOMMUFD_CMD_IOAS_COPY => IommuIoasCopy.size;
    IOMMU_IOAS_IOVA_RANGES = iommufd: iommu::IOMMUFD_CMD_IOAS_IOVA_RANGES
        => IommuIoasIovaRanges.size;
    IOMMU_IOAS_MAP = iommufd: iommu::IOMMUFD_CMD_IOAS_MAP => IommuIoasMap.size;
    IOMMU_IOAS_UNMAP = iommufd: iommu::IOMMUFD_CMD_IOAS_UNMAP => IommuIoasUnmap.size;
    IOMMU_IOAS_CHANGE_PROCESS = iommufd: iommu::IOMMUFD_CMD_IOAS_CHANGE_PROCESS
        => IommuIoasChangeProcess.size;
    IOMMU_HWPT_ALLOC = iommufd: iommu::IOMMUFD_CMD_HWPT_ALLOC => IommuHwptAlloc.size;
    IOMMU_IOAS_MAP_FILE = iommufd: iommu::IOMMUFD_CMD_IOAS_MAP_FILE => IommuIoasMapFile.size;
    VFIO_DEVICE_GET_INFO = vfio: vfio::VFIO_BASE + 7 => VfioDeviceInfo.argsz;
    VFIO_DEVICE_GET_REGION_INFO = vfio: vfio::VFIO_BASE + 8 => VfioRegionInfo.argsz;
    VFIO_DEVICE_GET_IRQ_INFO = vfio: vfio::VFIO_BASE + 9 => VfioIrqInfo.argsz;
    VFIO_DEVICE_SET_IRQS = vfio: vfio::VFIO_BASE + 10 => VfioIrqSetEventfd.set.argsz;
    VFIO_DEVICE_RESET = vfio: vfio::VFIO_BASE + 11;
    VFIO_DEVICE_BIND_IOMMUFD = vfio: vfio::VFIO_BASE + 18 => VfioDeviceBindIommufd.argsz;
    VFIO_DEVICE_ATTACH_IOMMUFD_PT = vfio: vfio::VFIO_BASE + 19 => VfioDeviceAttachIommufdPt.argsz;
    VFIO_DEVICE_DETACH_IOMMUFD_PT = vfio: vfio::VFIO_BASE + 20 => VfioDeviceDetachIommufdPt.argsz;
}

// Typed wrappers.

/// Signals `eventfd` for the first interrupt of IRQ index `index` of a VFIO device
/// (`VFIO_DEVICE_SET_IRQS`, DATA_EVENTFD | ACTION_TRIGGER, one vector).
pub fn set_irq_eventfd(
    dev: BorrowedFd<'_>,
    index: u32,
    eventfd: BorrowedFd<'_>,
) -> Result<(), Errno> {
    let mut a = VfioIrqSetEventfd::sized();
    a.set.flags = vfio::VFIO_IRQ_SET_DATA_EVENTFD | vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
    a.set.index = index;
    a.set.count = 1;
    a.fd = eventfd.as_raw_fd();
    ioctl(dev, &mut a)
}

/// Signals `eventfd` when the kernel asks for the device back (`VFIO_PCI_REQ_IRQ_INDEX`:
/// the host is unbinding it from vfio-pci).
pub fn set_req_eventfd(dev: BorrowedFd<'_>, eventfd: BorrowedFd<'_>) -> Result<(), Errno> {
    set_irq_eventfd(dev, VFIO_PCI_REQ_IRQ_INDEX, eventfd)
}

pub fn ioas_alloc(iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut a = IommuIoasAlloc::sized();
    ioctl(iommufd, &mut a)?;
    Ok(a.out_ioas_id)
}

pub fn destroy(iommufd: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
    let mut a = IommuDestroy {
        id,
        ..IommuDestroy::sized()
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
            ioas_id,
            num_iovas: u32::try_from(ranges.len()).expect("small"),
            allowed_iovas: ranges.as_mut_ptr() as u64,
            ..IommuIoasIovaRanges::sized()
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
        flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
        ioas_id,
        user_va,
        length,
        iova,
        ..IommuIoasMap::sized()
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
        flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
        ioas_id,
        fd: file.as_raw_fd(),
        start,
        length,
        iova,
        ..IommuIoasMapFile::sized()
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
        flags: flags | IOMMU_IOAS_MAP_FIXED_IOVA,
        dst_ioas_id: dst_ioas,
        src_ioas_id: src_ioas,
        length,
        dst_iova,
        src_iova,
        ..IommuIoasCopy::sized()
    };
    ioctl(iommufd, &mut a)
}

/// `IOMMU_HWPT_ALLOC` of a paging HWPT for `dev_id` on IOAS `pt_id`, attached to nothing:
/// the kernel fills it with every mapping of the IOAS (pinning their pages) and keeps it in
/// sync. Returns the HWPT id.
pub fn hwpt_alloc(iommufd: BorrowedFd<'_>, dev_id: u32, pt_id: u32) -> Result<u32, Errno> {
    let mut a = IommuHwptAlloc {
        dev_id,
        pt_id,
        ..IommuHwptAlloc::sized()
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
        ioas_id,
        iova,
        length,
        ..IommuIoasUnmap::sized()
    };
    ioctl(iommufd, &mut a)?;
    Ok(a.length)
}

/// `IOMMU_IOAS_CHANGE_PROCESS`: the pinned-page accounting of every map in every IOAS of the
/// context moves to the calling process (after an exec hands the context over). The kernel
/// refuses (EINVAL, nothing changed) while a map that is not `IOMMU_IOAS_MAP_FILE` exists.
pub fn ioas_change_process(iommufd: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut a = IommuIoasChangeProcess::sized();
    ioctl(iommufd, &mut a)
}

/// Binds a VFIO cdev to an iommufd; returns the device id.
pub fn bind_iommufd(dev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut a = VfioDeviceBindIommufd {
        iommufd: iommufd.as_raw_fd(),
        ..VfioDeviceBindIommufd::sized()
    };
    ioctl(dev, &mut a)?;
    Ok(a.out_devid)
}

pub fn attach_pt(dev: BorrowedFd<'_>, pt_id: u32) -> Result<(), Errno> {
    let mut a = VfioDeviceAttachIommufdPt {
        pt_id,
        ..VfioDeviceAttachIommufdPt::sized()
    };
    ioctl(dev, &mut a)
}

pub fn detach_pt(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut a = VfioDeviceDetachIommufdPt::sized();
    ioctl(dev, &mut a)
}

/// `VFIO_DEVICE_GET_INFO`: the device's flags and how many regions and IRQ indexes it has.
pub fn device_info(dev: BorrowedFd<'_>) -> Result<VfioDeviceInfo, Errno> {
    let mut a = VfioDeviceInfo::sized();
    ioctl(dev, &mut a)?;
    Ok(a)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` of IRQ index `index`.
pub fn irq_info(dev: BorrowedFd<'_>, index: u32) -> Result<VfioIrqInfo, Errno> {
    let mut a = VfioIrqInfo {
        index,
        ..VfioIrqInfo::sized()
    };
    ioctl(dev, &mut a)?;
    Ok(a)
}

/// `VFIO_DEVICE_RESET` (the reset method the kernel chose for the device: FLR, PM, bus…).
pub fn device_reset(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: `dev` is a live fd borrowed for the call; the request takes no argument.
    let rc = unsafe { ioctl_no_arg(&dev, VFIO_DEVICE_RESET()) };
    if rc < 0 {
        return Err(Errno::last("VFIO_DEVICE_RESET"));
    }
    Ok(())
}

/// The region's description without its capability chain (see the vfio-user device for the
/// chain).
pub fn region_info(dev: BorrowedFd<'_>, index: u32) -> Result<VfioRegionInfo, Errno> {
    let mut a = VfioRegionInfo {
        index,
        ..VfioRegionInfo::sized()
    };
    ioctl(dev, &mut a)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `size_of::<T>()` and `T::request()` of an argument struct.
    fn layout<T: IoctlArg>() -> (usize, c_ulong) {
        (size_of::<T>(), T::request())
    }

    #[test]
    fn struct_sizes_and_request_numbers_match_the_uapi_headers() {
        // <linux/iommufd.h>: _IO(';', 0x80 + n).
        assert_eq!(layout::<IommuDestroy>(), (8, 0x3b80));
        assert_eq!(layout::<IommuIoasAlloc>(), (12, 0x3b81));
        assert_eq!(layout::<IommuIoasCopy>(), (40, 0x3b83));
        assert_eq!(layout::<IommuIoasIovaRanges>(), (32, 0x3b84));
        assert_eq!(layout::<IommuIoasMap>(), (40, 0x3b85));
        assert_eq!(layout::<IommuIoasUnmap>(), (24, 0x3b86));
        assert_eq!(layout::<IommuHwptAlloc>(), (48, 0x3b89));
        assert_eq!(layout::<IommuIoasMapFile>(), (40, 0x3b8f));
        assert_eq!(size_of::<IommuIovaRange>(), 16);
        // <linux/vfio.h>: _IO(';', 100 + n).
        assert_eq!(layout::<VfioDeviceInfo>(), (24, 0x3b6b));
        assert_eq!(layout::<VfioRegionInfo>(), (32, 0x3b6c));
        assert_eq!(layout::<VfioIrqInfo>(), (16, 0x3b6d));
        assert_eq!(layout::<VfioIrqSetEventfd>(), (24, 0x3b6e));
        assert_eq!(
            std::mem::offset_of!(VfioIrqSetEventfd, fd),
            20,
            "data[] of vfio_irq_set"
        );
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(layout::<VfioDeviceBindIommufd>(), (24, 0x3b76));
        assert_eq!(layout::<VfioDeviceAttachIommufdPt>(), (16, 0x3b77));
        assert_eq!(layout::<VfioDeviceDetachIommufdPt>(), (12, 0x3b78));
    }

    #[test]
    fn a_sized_argument_says_its_own_size() {
        assert_eq!(
            IommuIoasMap::sized().size as usize,
            size_of::<IommuIoasMap>()
        );
        assert_eq!(VfioRegionInfo::sized().argsz as usize, 32);
        let irq = VfioIrqSetEventfd::sized();
        assert_eq!(irq.set.argsz as usize, size_of::<VfioIrqSetEventfd>());
        assert_eq!((irq.set.flags, irq.set.count, irq.fd), (0, 0, 0));
    }
}
