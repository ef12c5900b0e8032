//! edu's registers and a mapped BAR with volatile access: the part of the guest programs' kit
//! that needs nothing but libc (so the end-to-end tier's L2 program, tests/e2e/l2-dma, shares
//! it; edu.rs re-exports it for the VM tier's programs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};

pub type Result<T> = std::result::Result<T, String>;

pub const EDU_VENDOR: &str = "0x1234";
pub const EDU_DEVICE: &str = "0x11e8";
pub const EDU_ID: usize = 0x00;
pub const EDU_DMA_SRC: usize = 0x80;
pub const EDU_DMA_DST: usize = 0x88;
pub const EDU_DMA_COUNT: usize = 0x90;
pub const EDU_DMA_CMD: usize = 0x98;
pub const EDU_CMD_START: u64 = 1;
pub const EDU_CMD_TO_RAM: u64 = 2;
pub const EDU_BUFFER: u64 = 0x40000;
pub const PCI_COMMAND: u64 = 0x04;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const PAGE: u64 = 4096;

pub const EDU_IRQ_STATUS: usize = 0x24;
pub const EDU_IRQ_ACK: usize = 0x64;
pub const EDU_CMD_IRQ: u64 = 4;

/// A mapped BAR, accessed with volatile reads and writes only.
pub struct Bar {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

impl Bar {
    pub fn map(file: &File, offset: u64, len: usize) -> Result<Bar> {
        let off = libc::off_t::try_from(offset).map_err(|_| "BAR offset overflows".to_string())?;
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap BAR0: {}", std::io::Error::last_os_error()));
        }
        Ok(Bar {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned NULL")?,
            len,
        })
    }

    pub fn at<T>(&self, off: usize) -> *mut T {
        assert!(off.is_multiple_of(size_of::<T>()) && off + size_of::<T>() <= self.len);
        // SAFETY: in bounds (asserted) of a mapping that lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast() }
    }

    pub fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: aligned, in bounds, device memory mapped for reading.
        unsafe { ptr::read_volatile(self.at::<u32>(off)) }
    }

    pub fn write_u32(&self, off: usize, v: u32) {
        // SAFETY: aligned, in bounds, device memory mapped for writing.
        unsafe { ptr::write_volatile(self.at::<u32>(off), v) }
    }

    pub fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: aligned, in bounds, device memory mapped for reading.
        unsafe { ptr::read_volatile(self.at::<u64>(off)) }
    }

    pub fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: aligned, in bounds, device memory mapped for writing.
        unsafe { ptr::write_volatile(self.at::<u64>(off), v) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
