//! The slice of the iommufd and VFIO cdev uAPI the raw-ioctl guest programs issue, transcribed
//! from the uAPI headers of the guest kernel that tests/vm/build-kernel.sh builds
//! (`headers/include/linux/iommufd.h` and `headers/include/linux/vfio.h`, linux-source-7.3).
//! Field names follow the headers. libc only; included with `#[path]` by tests/vm/guest-smoke,
//! tests/guest/guest-traffic and tests/e2e/l2-dma (each uses a subset). The layout and request
//! number tests run with `cargo test` in guest-smoke and guest-traffic.
//!
//! Every argument struct implements [`IoctlArg`], which ties it to its one request number, so an
//! ioctl can only ever be issued with the layout the kernel expects for it.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::c_ulong;

/// `_IO(type, nr)`: no direction bits and no size, as every iommufd/VFIO request is encoded
/// (the size travels in the struct's own `size`/`argsz` field).
const fn io(ty: u8, nr: u8) -> c_ulong {
    ((ty as c_ulong) << 8) | nr as c_ulong
}

/// `IOMMUFD_TYPE` and `VFIO_TYPE` are both `';'`.
const IOCTL_TYPE: u8 = b';';
/// `IOMMUFD_CMD_BASE`.
const IOMMUFD_CMD_BASE: u8 = 0x80;
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
/// The implementor must be `#[repr(C)]` with exactly the layout the kernel defines for `REQ`, and
/// every bit pattern the kernel may write back must be a valid value of the type (plain integers).
pub unsafe trait IoctlArg {
    const REQ: c_ulong;
    const NAME: &'static str;
}

/// Issues `T::REQ` on `fd` with `arg`; the errno on failure, with the request's name.
pub fn ioctl<T: IoctlArg>(fd: BorrowedFd<'_>, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is an exclusive reference to a live `T`, whose `IoctlArg` impl guarantees it
    // has the layout the kernel reads and writes for `T::REQ`; the kernel touches at most
    // `size_of::<T>()` bytes (the struct's size/argsz field says so) and only during the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), T::REQ as _, arg as *mut T) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}: {e}", T::NAME)));
    }
    Ok(())
}

/// The struct's size, for its leading `size`/`argsz` field.
pub fn size32<T>() -> u32 {
    u32::try_from(size_of::<T>()).expect("uAPI structs are a few bytes long")
}

/// `struct iommu_destroy`
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuDestroy {
    pub size: u32,
    pub id: u32,
}
// SAFETY: repr(C) copy of `struct iommu_destroy`, plain integers, used with IOMMU_DESTROY.
unsafe impl IoctlArg for IommuDestroy {
    const REQ: c_ulong = io(IOCTL_TYPE, IOMMUFD_CMD_BASE);
    const NAME: &'static str = "IOMMU_DESTROY";
}

/// `struct iommu_ioas_alloc`
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}
// SAFETY: repr(C) copy of `struct iommu_ioas_alloc`, plain integers, used with IOMMU_IOAS_ALLOC.
unsafe impl IoctlArg for IommuIoasAlloc {
    const REQ: c_ulong = io(IOCTL_TYPE, 0x81);
    const NAME: &'static str = "IOMMU_IOAS_ALLOC";
}

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
// SAFETY: repr(C) copy of `struct iommu_ioas_map` (the u64 fields are `__aligned_u64`, which is
// their natural alignment on x86-64), plain integers, used with IOMMU_IOAS_MAP.
unsafe impl IoctlArg for IommuIoasMap {
    const REQ: c_ulong = io(IOCTL_TYPE, 0x85);
    const NAME: &'static str = "IOMMU_IOAS_MAP";
}

/// `struct iommu_ioas_unmap`
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}
// SAFETY: repr(C) copy of `struct iommu_ioas_unmap`, plain integers, used with IOMMU_IOAS_UNMAP.
unsafe impl IoctlArg for IommuIoasUnmap {
    const REQ: c_ulong = io(IOCTL_TYPE, 0x86);
    const NAME: &'static str = "IOMMU_IOAS_UNMAP";
}

/// `struct vfio_region_info` (without capability chain: `argsz` is exactly this struct).
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
// SAFETY: repr(C) copy of `struct vfio_region_info`, plain integers, used with
// VFIO_DEVICE_GET_REGION_INFO; with argsz = size_of the kernel writes no capability chain.
unsafe impl IoctlArg for VfioRegionInfo {
    const REQ: c_ulong = io(IOCTL_TYPE, VFIO_BASE + 8);
    const NAME: &'static str = "VFIO_DEVICE_GET_REGION_INFO";
}

/// `struct vfio_device_bind_iommufd`
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
    /// Only read with VFIO_DEVICE_BIND_FLAG_TOKEN (not used here).
    pub token_uuid_ptr: u64,
}
// SAFETY: repr(C) copy of `struct vfio_device_bind_iommufd`, plain integers, used with
// VFIO_DEVICE_BIND_IOMMUFD.
unsafe impl IoctlArg for VfioDeviceBindIommufd {
    const REQ: c_ulong = io(IOCTL_TYPE, VFIO_BASE + 18);
    const NAME: &'static str = "VFIO_DEVICE_BIND_IOMMUFD";
}

/// `struct vfio_device_attach_iommufd_pt`
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    /// Only read with VFIO_DEVICE_ATTACH_PASID (not used here).
    pub pasid: u32,
}
// SAFETY: repr(C) copy of `struct vfio_device_attach_iommufd_pt`, plain integers, used with
// VFIO_DEVICE_ATTACH_IOMMUFD_PT.
unsafe impl IoctlArg for VfioDeviceAttachIommufdPt {
    const REQ: c_ulong = io(IOCTL_TYPE, VFIO_BASE + 19);
    const NAME: &'static str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
}

/// `struct vfio_device_detach_iommufd_pt`
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceDetachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    /// Only read with VFIO_DEVICE_DETACH_PASID (not used here).
    pub pasid: u32,
}
// SAFETY: repr(C) copy of `struct vfio_device_detach_iommufd_pt`, plain integers, used with
// VFIO_DEVICE_DETACH_IOMMUFD_PT.
unsafe impl IoctlArg for VfioDeviceDetachIommufdPt {
    const REQ: c_ulong = io(IOCTL_TYPE, VFIO_BASE + 20);
    const NAME: &'static str = "VFIO_DEVICE_DETACH_IOMMUFD_PT";
}

/// `struct vfio_irq_set` carrying exactly one eventfd.
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioIrqSetOne {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub fd: i32,
}
// SAFETY: repr(C) copy of `struct vfio_irq_set` followed by its one `__s32` of data, plain
// integers, used with VFIO_DEVICE_SET_IRQS.
unsafe impl IoctlArg for VfioIrqSetOne {
    const REQ: c_ulong = io(IOCTL_TYPE, VFIO_BASE + 10);
    const NAME: &'static str = "VFIO_DEVICE_SET_IRQS";
}

pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_headers() {
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(size_of::<IommuIoasAlloc>(), 12);
        assert_eq!(size_of::<IommuIoasMap>(), 40);
        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(size_of::<VfioRegionInfo>(), 32);
        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 16);
        assert_eq!(size_of::<VfioDeviceDetachIommufdPt>(), 12);
        assert_eq!(size_of::<VfioIrqSetOne>(), 24);
    }

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        assert_eq!(IommuIoasAlloc::REQ, 0x3b81);
        assert_eq!(IommuIoasMap::REQ, 0x3b85);
        assert_eq!(IommuIoasUnmap::REQ, 0x3b86);
        assert_eq!(VfioRegionInfo::REQ, 0x3b6c);
        assert_eq!(VfioDeviceBindIommufd::REQ, 0x3b76);
        assert_eq!(VfioDeviceAttachIommufdPt::REQ, 0x3b77);
        assert_eq!(VfioDeviceDetachIommufdPt::REQ, 0x3b78);
        assert_eq!(VfioIrqSetOne::REQ, 0x3b6e);
    }
}
