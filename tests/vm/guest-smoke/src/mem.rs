//! Memory the check shares with the device: an anonymous DMA buffer and a mapped BAR.
//! Both are accessed only through volatile reads and writes, since the device changes them behind
//! the compiler's back.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};

/// A `len`-byte shared mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Anonymous, zeroed, page-aligned memory (a DMA buffer).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
    }

    /// `len` bytes of `fd` at `offset` (a VFIO region).
    pub fn file(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "region offset overflows off_t")
        })?;
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd(), offset)
    }

    fn map(
        len: usize,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: libc::off_t,
    ) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) cannot alias any Rust object;
        // the arguments are plain values and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, width: usize) {
        assert!(
            offset.is_multiple_of(width)
                && offset.checked_add(width).is_some_and(|end| end <= self.len),
            "access of {width} bytes at {offset:#x} outside a {:#x}-byte mapping",
            self.len
        );
    }

    /// A volatile read of a `T` (an integer) at `offset`.
    fn read<T: Copy>(&self, offset: usize) -> T {
        self.check(offset, size_of::<T>());
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as `self`.
        unsafe { ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<T>()) }
    }

    /// A volatile write of `value` (an integer) at `offset`.
    fn write<T: Copy>(&self, offset: usize, value: T) {
        self.check(offset, size_of::<T>());
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as `self`.
        unsafe { ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<T>(), value) }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        self.read(offset)
    }

    pub fn write_u32(&self, offset: usize, value: u32) {
        self.write(offset, value)
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        self.read(offset)
    }

    pub fn write_u64(&self, offset: usize, value: u64) {
        self.write(offset, value)
    }

    /// Copies the whole mapping out.
    pub fn snapshot(&self) -> Vec<u8> {
        (0..self.len)
            // SAFETY: `i < len`, inside the mapping, which lives as long as `self`.
            .map(|i| unsafe { ptr::read_volatile(self.ptr.as_ptr().add(i)) })
            .collect()
    }

    /// Overwrites the whole mapping with `f(i)` for byte `i`.
    pub fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..self.len {
            // SAFETY: `i < len`, inside the mapping, which lives as long as `self`.
            unsafe { ptr::write_volatile(self.ptr.as_ptr().add(i), f(i)) }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no reference into the mapping
        // outlives `self` (all accesses copy values out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
