//! The device the vfio-user server proxies to: the [`AssignedDevice`] trait, and
//! [`VfioCdevDevice`], its implementation over an open, iommufd-bound VFIO device cdev.
//!
//! Every ioctl goes through [`sys`]; region data goes through `pread`/`pwrite` at the
//! region's offset in the device fd, bounded by the region's size.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;

pub use super::protocol::{DeviceInfo, IrqInfo, RegionCap, RegionInfo, SparseArea};
use super::protocol::{
    IRQ_SET_SIZE, IrqSet, MAX_REGION_INFO_SIZE, REGION_INFO_SIZE, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_CAPS,
    parse_cap_chain, u32_at, u64_at,
};

/// An errno with what was being done when it happened. Never 0: a client such as QEMU takes
/// errno 0 for success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Errno {
    pub errno: i32,
    pub context: Cow<'static, str>,
}

impl Errno {
    pub fn new(errno: i32, context: impl Into<Cow<'static, str>>) -> Errno {
        Errno {
            errno: if errno > 0 { errno } else { libc::EIO },
            context: context.into(),
        }
    }

    /// From an I/O error (its raw errno, EIO if it has none).
    pub fn from_io(e: &std::io::Error, context: impl Into<Cow<'static, str>>) -> Errno {
        Errno::new(e.raw_os_error().unwrap_or(libc::EIO), context)
    }

    /// The calling thread's current errno.
    pub fn last(context: impl Into<Cow<'static, str>>) -> Errno {
        Errno::from_io(&std::io::Error::last_os_error(), context)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.context,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for Errno {}

impl From<viommu_uapi::Errno> for Errno {
    fn from(e: viommu_uapi::Errno) -> Errno {
        Errno::new(e.errno, e.name)
    }
}

/// A device the vfio-user server serves. Offsets given to [`read`](Self::read) and
/// [`write`](Self::write) are relative to the region's start.
pub trait AssignedDevice: Send {
    /// Flags, number of regions and of IRQ indexes (`VFIO_DEVICE_GET_INFO`).
    fn info(&self) -> DeviceInfo;
    /// A region's size, offset in [`region_fd`](Self::region_fd), flags and capabilities.
    fn region_info(&self, index: u32) -> Result<RegionInfo, Errno>;
    /// The fd the VMM mmaps regions from (the VFIO device fd), if regions can be mapped.
    fn region_fd(&self) -> Option<BorrowedFd<'_>>;
    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;
    fn irq_info(&self, index: u32) -> Result<IrqInfo, Errno>;
    /// `VFIO_DEVICE_SET_IRQS`. With `DATA_EVENTFD`, `fds` has `set.count` entries (-1 = none);
    /// with `DATA_BOOL`, `set.data` has `set.count` bytes; otherwise both are empty.
    fn set_irqs(&self, set: &IrqSet<'_>, fds: &[RawFd]) -> Result<(), Errno>;
    fn reset(&self) -> Result<(), Errno>;
}

/// The raw VFIO device uAPI: request numbers and the one ioctl entry point. Arguments are
/// byte buffers laid out as `<linux/vfio.h>` defines them (all fields naturally aligned
/// within the struct; the kernel copies them with copy_from_user, so the buffer itself needs
/// no alignment).
pub mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd};

    use super::Errno;

    /// VFIO requests carry their size in `argsz`: one definition with the iommufd backend's.
    pub use viommu_uapi::{VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_SET_IRQS};

    /// Issues `req` on `fd` with `arg` as its argument (or no argument if `arg` is empty).
    /// `arg` must start with the request's `argsz` field, set to at most `arg.len()`.
    pub fn ioctl(
        fd: BorrowedFd<'_>,
        req: u64,
        name: &'static str,
        arg: &mut [u8],
    ) -> Result<(), Errno> {
        if arg.len() >= 4 {
            let argsz = u32::from_ne_bytes(arg[..4].try_into().expect("4 bytes")) as usize;
            assert!(argsz <= arg.len(), "{name}: argsz larger than the buffer");
        }
        let ptr = if arg.is_empty() {
            std::ptr::null_mut()
        } else {
            arg.as_mut_ptr()
        };
        // SAFETY: `fd` is a live fd borrowed for the call. For VFIO device requests the kernel
        // reads and writes at most `argsz` bytes at `ptr`, and `argsz` was checked above to be
        // within `arg`, which is exclusively borrowed for the call; RESET takes no argument
        // (null). Nothing is retained after the call returns.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ptr) };
        if rc < 0 {
            return Err(Errno::last(name));
        }
        Ok(())
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Bounds of a region, cached when the device is opened, for checking accesses.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    size: u64,
    offset: u64,
}

/// An assigned device over its VFIO device cdev (`/dev/vfio/devices/vfioN`), already bound to
/// an iommufd by its owner. This type never attaches or detaches DMA: it serves regions, IRQs
/// and reset only.
pub struct VfioCdevDevice {
    file: File,
    name: String,
    info: DeviceInfo,
    bounds: Vec<Option<Bounds>>,
}

impl VfioCdevDevice {
    /// Queries the device's info and region bounds. `name` (e.g. the PCI address) is used in
    /// error contexts.
    pub fn new(file: File, name: impl Into<String>) -> Result<VfioCdevDevice, Errno> {
        let name = name.into();
        let a = viommu_uapi::device_info(file.as_fd())
            .map_err(|e| Errno::new(e.errno, format!("{name}: {e}")))?;
        let info = DeviceInfo {
            flags: a.flags,
            num_regions: a.num_regions,
            num_irqs: a.num_irqs,
        };
        let mut dev = VfioCdevDevice {
            file,
            name,
            info,
            bounds: Vec::new(),
        };
        // A region the kernel cannot describe (e.g. VGA on a non-VGA device) stays unusable.
        dev.bounds = (0..info.num_regions.min(256))
            .map(|i| {
                dev.raw_region_info(i).ok().map(|(r, _)| Bounds {
                    size: r.size,
                    offset: r.offset,
                })
            })
            .collect();
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, e: Errno, what: impl fmt::Display) -> Errno {
        Errno::new(e.errno, format!("{} {what}: {}", self.name, e))
    }

    /// GET_REGION_INFO, asking twice when the capability chain does not fit: returns the
    /// info (caps empty) and the whole reply buffer.
    fn raw_region_info(&self, index: u32) -> Result<(RegionInfo, Vec<u8>), Errno> {
        let mut buf = vec![0u8; REGION_INFO_SIZE];
        loop {
            let argsz = buf.len() as u32;
            buf.fill(0);
            put_u32(&mut buf, 0, argsz);
            put_u32(&mut buf, 8, index);
            sys::ioctl(
                self.file.as_fd(),
                sys::VFIO_DEVICE_GET_REGION_INFO(),
                "VFIO_DEVICE_GET_REGION_INFO",
                &mut buf,
            )
            .map_err(|e| self.err(e, format_args!("region {index}")))?;
            let needed = u32_at(&buf, 0) as usize;
            if needed <= buf.len() {
                break;
            }
            if needed > MAX_REGION_INFO_SIZE || buf.len() != REGION_INFO_SIZE {
                return Err(Errno::new(
                    libc::EOVERFLOW,
                    format!(
                        "{} region {index}: the kernel asks for a {needed}-byte info reply",
                        self.name
                    ),
                ));
            }
            buf = vec![0u8; needed];
        }
        let info = RegionInfo {
            flags: u32_at(&buf, 4),
            size: u64_at(&buf, 16),
            offset: u64_at(&buf, 24),
            caps: Vec::new(),
        };
        Ok((info, buf))
    }

    fn check(&self, index: u32, offset: u64, len: usize) -> Result<u64, Errno> {
        let b = self
            .bounds
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or_else(|| Errno::new(libc::EINVAL, format!("{}: no region {index}", self.name)))?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > b.size) {
            return Err(Errno::new(
                libc::EINVAL,
                format!(
                    "{}: access {offset:#x}+{len:#x} outside region {index} (size {:#x})",
                    self.name, b.size
                ),
            ));
        }
        b.offset
            .checked_add(offset)
            .ok_or_else(|| Errno::new(libc::EINVAL, format!("{}: region offset wraps", self.name)))
    }
}

impl AssignedDevice for VfioCdevDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, Errno> {
        let (mut info, buf) = self.raw_region_info(index)?;
        if info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
            info.caps = parse_cap_chain(&buf, u32_at(&buf, 12))
                .map_err(|e| self.err(e, format_args!("region {index} capabilities")))?;
        }
        info.flags &= !VFIO_REGION_INFO_FLAG_CAPS;
        Ok(info)
    }

    fn region_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let at = self.check(index, offset, buf.len())?;
        self.file.read_exact_at(buf, at).map_err(|e| {
            Errno::from_io(
                &e,
                format!("{}: read region {index} at {offset:#x}", self.name),
            )
        })
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let at = self.check(index, offset, data.len())?;
        self.file.write_all_at(data, at).map_err(|e| {
            Errno::from_io(
                &e,
                format!("{}: write region {index} at {offset:#x}", self.name),
            )
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, Errno> {
        let a = viommu_uapi::irq_info(self.file.as_fd(), index)
            .map_err(|e| self.err(e.into(), format_args!("IRQ index {index}")))?;
        Ok(IrqInfo {
            flags: a.flags,
            count: a.count,
        })
    }

    fn set_irqs(&self, set: &IrqSet<'_>, fds: &[RawFd]) -> Result<(), Errno> {
        let &IrqSet {
            flags,
            index,
            start,
            count,
            data,
        } = set;
        let mut payload = Vec::new();
        match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_EVENTFD => {
                if fds.len() != count as usize {
                    return Err(Errno::new(
                        libc::EINVAL,
                        format!("{}: {} eventfds for {count} vectors", self.name, fds.len()),
                    ));
                }
                for fd in fds {
                    payload.extend_from_slice(&fd.to_ne_bytes());
                }
            }
            VFIO_IRQ_SET_DATA_BOOL => {
                if data.len() != count as usize {
                    return Err(Errno::new(
                        libc::EINVAL,
                        format!("{}: {} bools for {count} vectors", self.name, data.len()),
                    ));
                }
                payload.extend_from_slice(data);
            }
            _ => {}
        }
        let mut a = vec![0u8; IRQ_SET_SIZE + payload.len()];
        let argsz = a.len() as u32;
        put_u32(&mut a, 0, argsz);
        put_u32(&mut a, 4, flags);
        put_u32(&mut a, 8, index);
        put_u32(&mut a, 12, start);
        put_u32(&mut a, 16, count);
        a[IRQ_SET_SIZE..].copy_from_slice(&payload);
        sys::ioctl(
            self.file.as_fd(),
            sys::VFIO_DEVICE_SET_IRQS(),
            "VFIO_DEVICE_SET_IRQS",
            &mut a,
        )
        .map_err(|e| {
            self.err(
                e,
                format_args!("IRQ index {index} vectors {start}+{count} flags {flags:#x}"),
            )
        })
    }

    fn reset(&self) -> Result<(), Errno> {
        viommu_uapi::device_reset(self.file.as_fd()).map_err(|e| self.err(e.into(), "reset"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_never_zero() {
        assert_eq!(Errno::new(0, "x").errno, libc::EIO);
        assert_eq!(Errno::new(-3, "x").errno, libc::EIO);
        assert_eq!(Errno::new(libc::ENOENT, "x").errno, libc::ENOENT);
    }

    #[test]
    fn a_file_that_is_not_a_vfio_device_is_refused_with_its_errno() {
        let f = File::open("/dev/null").unwrap();
        let e = VfioCdevDevice::new(f, "test")
            .err()
            .expect("not a VFIO device");
        assert_eq!(e.errno, libc::ENOTTY);
        assert!(e.context.contains("VFIO_DEVICE_GET_INFO"), "{e}");
    }
}
