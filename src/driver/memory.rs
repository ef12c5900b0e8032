//! Guest RAM as the simulated VMM owns it: one memfd, sized with `ftruncate` and mapped
//! `MAP_SHARED` into this process, so the daemon can map the very same pages from the fd it gets
//! in the vhost-user memory table. Every access is bounds-checked against the mapping; ring
//! indices are read and written with atomic accesses because the daemon (another thread or
//! process) touches them concurrently.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::{FileOffset, MmapRegion};

use super::DriverError;

/// A memfd-backed piece of guest-physical memory, `[base, base + size)`.
///
/// [`GuestRam::new`] builds the VM's main RAM at GPA 0; extra regions (hot-added with
/// `ADD_MEM_REG`) use [`GuestRam::new_at`].
///
/// All accesses go through bounds-checked methods that copy bytes or use atomics, so sharing it
/// between threads is no different from sharing the memory with the daemon process.
#[derive(Debug)]
pub struct GuestRam {
    /// The memfd, mapped shared and writable; unmapped when dropped.
    map: MmapRegion,
    base: u64,
    size: u64,
}

impl GuestRam {
    /// Guest RAM at GPA `0..size`.
    pub fn new(size: u64) -> io::Result<Self> {
        Self::new_at(0, size)
    }

    /// A region at GPA `base..base + size`.
    pub fn new_at(base: u64, size: u64) -> io::Result<Self> {
        if size == 0 || base.checked_add(size).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad guest RAM range: base {base:#x} size {size:#x}"),
            ));
        }
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "guest RAM too large"))?;
        let name = CString::new("vhost-user-iommu-guest-ram").expect("no NUL in name");
        // SAFETY: `name` is a valid NUL-terminated string; the call has no other preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let map = MmapRegion::from_file(FileOffset::new(file, 0), len)
            .map_err(|e| io::Error::other(format!("mapping guest RAM: {e}")))?;
        Ok(GuestRam { map, base, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// First guest-physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The memfd (to pass to the daemon).
    pub fn fd(&self) -> RawFd {
        let file = self.map.file_offset().expect("mapped from the memfd");
        file.file().as_raw_fd()
    }

    /// Where the region is mapped in this process (the "userspace address" of the memory table).
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Host address of `gpa` if the whole range `[gpa, gpa + len)` is in this region.
    pub fn host_addr_of(&self, gpa: u64, len: u64) -> Option<u64> {
        self.offset_of(gpa, len).map(|o| self.host_addr() + o)
    }

    /// Whether `[gpa, gpa + len)` is inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.offset_of(gpa, len).is_some()
    }

    fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.base)?;
        let end = off.checked_add(len)?;
        (end <= self.size).then_some(off)
    }

    fn checked(&self, gpa: u64, len: usize) -> Result<*mut u8, DriverError> {
        let off = self
            .offset_of(gpa, len as u64)
            .ok_or(DriverError::OutOfRam {
                gpa,
                len: len as u64,
                base: self.base,
                size: self.size,
            })?;
        // SAFETY: `off + len <= size`, so the result stays inside the mapping.
        Ok(unsafe { self.map.as_ptr().add(off as usize) })
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        let src = self.checked(gpa, buf.len())?;
        // SAFETY: `src..src + len` is inside the mapping (checked) and cannot overlap `buf`, which
        // is ordinary Rust memory. The daemon may write concurrently; we only copy bytes, and
        // callers order the copy after the relevant used-index load.
        unsafe { ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), DriverError> {
        let dst = self.checked(gpa, buf.len())?;
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        Ok(())
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), DriverError> {
        let dst = self.checked(gpa, len)?;
        // SAFETY: the range is inside the mapping (checked).
        unsafe { ptr::write_bytes(dst, byte, len) };
        Ok(())
    }

    /// Reads a little-endian `u16`.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, DriverError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, DriverError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, DriverError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), DriverError> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), DriverError> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), DriverError> {
        self.write(gpa, &v.to_le_bytes())
    }

    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16, DriverError> {
        let p = self.checked(gpa, 2)?;
        if !(p as usize).is_multiple_of(2) {
            return Err(DriverError::Misaligned { gpa, align: 2 });
        }
        // SAFETY: `p` is inside the mapping (checked), 2-byte aligned (checked) and the mapping
        // lives as long as `&self`. The memory is only ever accessed as plain bytes or
        // atomically, which is how shared ring indices are used by both sides.
        Ok(unsafe { &*(p as *const AtomicU16) })
    }

    /// Loads a ring index (`u16`, little-endian host assumed) with acquire ordering.
    pub fn load_u16_acquire(&self, gpa: u64) -> Result<u16, DriverError> {
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(Ordering::Acquire)))
    }

    /// Stores a ring index with release ordering: everything written before is visible to a
    /// reader that acquires the new value.
    pub fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), DriverError> {
        self.atomic_u16(gpa)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_written_and_refuses_out_of_range() {
        let ram = GuestRam::new(0x4000).unwrap();
        ram.write(0x3ff0, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        ram.read(0x3ff0, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(ram.write(0x3ffe, &[0; 4]).is_err());
        assert!(ram.read(u64::MAX, &mut b).is_err());
        ram.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.read_u64(8).unwrap(), 0x1122_3344_5566_7788);
        ram.store_u16_release(2, 0xbeef).unwrap();
        assert_eq!(ram.load_u16_acquire(2).unwrap(), 0xbeef);
        assert_eq!(ram.read_u16(2).unwrap(), 0xbeef);
        assert!(ram.load_u16_acquire(3).is_err());
    }

    #[test]
    fn a_region_at_a_base_is_addressed_by_gpa() {
        let ram = GuestRam::new_at(0x10_0000, 0x1000).unwrap();
        assert!(ram.write(0, &[1]).is_err());
        ram.write(0x10_0fff, &[7]).unwrap();
        let mut b = [0u8];
        ram.read(0x10_0fff, &mut b).unwrap();
        assert_eq!(b, [7]);
        assert!(ram.contains(0x10_0000, 0x1000));
        assert!(!ram.contains(0x10_0000, 0x1001));
    }

    #[test]
    fn the_memfd_shares_the_pages() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(0x1000).unwrap();
        ram.write(0x10, b"hello").unwrap();
        // SAFETY: dup gives us our own fd for the same memfd.
        let f = unsafe { File::from_raw_fd(libc::dup(ram.fd())) };
        let mut b = [0u8; 5];
        f.read_exact_at(&mut b, 0x10).unwrap();
        assert_eq!(&b, b"hello");
    }
}
