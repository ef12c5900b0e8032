//! The slice of the iommufd and VFIO cdev uAPI this program issues, transcribed from the uAPI
//! headers of the guest kernel tests/vm/build-kernel.sh builds (`headers/include/linux/iommufd.h`
//! and `vfio.h`, linux-source-7.3). Field names follow the headers.
//!
//! Each argument struct implements [`IoctlArg`], which ties it to its one request number, so an
//! ioctl can only be issued with the layout the kernel expects for it.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::c_ulong;

/// `_IO(';', nr)`: iommufd and VFIO requests carry no size or direction bits (the struct's own
/// `size`/`argsz` field says how long it is).
const fn io(nr: u8) -> c_ulong {
    ((b';' as c_ulong) << 8) | nr as c_ulong
}

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// An ioctl argument struct.
///
/// # Safety
/// The implementor must be `#[repr(C)]` with exactly the layout the kernel defines for `REQ`, made
/// of plain integers only (every bit pattern the kernel writes back is a valid value).
pub unsafe trait IoctlArg {
    const REQ: c_ulong;
    const NAME: &'static str;
}

/// Issues `T::REQ` on `fd` with `arg`; the errno, named after the request, on failure.
pub fn ioctl<T: IoctlArg>(fd: BorrowedFd<'_>, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is an exclusive reference to a live `T` whose `IoctlArg` impl guarantees the
    // layout the kernel reads and writes for `T::REQ`; the kernel touches at most size_of::<T>()
    // bytes (the struct's size field says so) and only during the call.
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

/// `struct iommu_ioas_alloc`
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}
// SAFETY: repr(C) copy of `struct iommu_ioas_alloc`, plain integers.
unsafe impl IoctlArg for IommuIoasAlloc {
    const REQ: c_ulong = io(0x81);
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
// SAFETY: repr(C) copy of `struct iommu_ioas_map` (its `__aligned_u64` fields are naturally
// aligned on x86-64), plain integers.
unsafe impl IoctlArg for IommuIoasMap {
    const REQ: c_ulong = io(0x85);
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
// SAFETY: repr(C) copy of `struct iommu_ioas_unmap`, plain integers.
unsafe impl IoctlArg for IommuIoasUnmap {
    const REQ: c_ulong = io(0x86);
    const NAME: &'static str = "IOMMU_IOAS_UNMAP";
}

/// `struct vfio_device_bind_iommufd`
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
    /// Only read with VFIO_DEVICE_BIND_FLAG_TOKEN (not used).
    pub token_uuid_ptr: u64,
}
// SAFETY: repr(C) copy of `struct vfio_device_bind_iommufd`, plain integers.
unsafe impl IoctlArg for VfioDeviceBindIommufd {
    const REQ: c_ulong = io(100 + 18);
    const NAME: &'static str = "VFIO_DEVICE_BIND_IOMMUFD";
}

/// `struct vfio_device_attach_iommufd_pt`
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    /// Only read with VFIO_DEVICE_ATTACH_PASID (not used).
    pub pasid: u32,
}
// SAFETY: repr(C) copy of `struct vfio_device_attach_iommufd_pt`, plain integers.
unsafe impl IoctlArg for VfioDeviceAttachIommufdPt {
    const REQ: c_ulong = io(100 + 19);
    const NAME: &'static str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
}

/// `struct vfio_region_info` (without capabilities: `argsz` is the bare struct).
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
// SAFETY: repr(C) copy of `struct vfio_region_info`, plain integers.
unsafe impl IoctlArg for VfioRegionInfo {
    const REQ: c_ulong = io(100 + 8);
    const NAME: &'static str = "VFIO_DEVICE_GET_REGION_INFO";
}

pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

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
// SAFETY: repr(C) copy of `struct vfio_irq_set` followed by its one `__s32` of data.
unsafe impl IoctlArg for VfioIrqSetOne {
    const REQ: c_ulong = io(100 + 10);
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
        assert_eq!(size_of::<IommuIoasAlloc>(), 12);
        assert_eq!(size_of::<IommuIoasMap>(), 40);
        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 16);
        assert_eq!(size_of::<VfioRegionInfo>(), 32);
        assert_eq!(size_of::<VfioIrqSetOne>(), 24);
    }

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        assert_eq!(IommuIoasAlloc::REQ, 0x3b81);
        assert_eq!(IommuIoasMap::REQ, 0x3b85);
        assert_eq!(IommuIoasUnmap::REQ, 0x3b86);
        assert_eq!(VfioDeviceBindIommufd::REQ, 0x3b76);
        assert_eq!(VfioDeviceAttachIommufdPt::REQ, 0x3b77);
        assert_eq!(VfioRegionInfo::REQ, 0x3b6c);
        assert_eq!(VfioIrqSetOne::REQ, 0x3b6e);
    }
}
