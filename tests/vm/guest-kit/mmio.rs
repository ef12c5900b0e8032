//! edu's registers, its discovery in sysfs, and a mapped BAR with volatile access and edu's DMA
//! engine: the part of the guest programs' kit that needs nothing but libc (so the end-to-end
//! tier's L2 program, tests/e2e/l2-dma, and vfio-user-edu, which maps BAR0 from a vfio-user
//! region fd, share it; edu.rs re-exports it for the VM tier's other programs).

use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{self, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, String>;

pub const EDU_VENDOR: &str = "0x1234";
pub const EDU_DEVICE: &str = "0x11e8";
pub const EDU_ID: usize = 0x00;
/// Reads back the complement of what was written (QEMU docs/specs/edu.rst).
pub const EDU_LIVENESS: usize = 0x04;
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
/// How long one edu DMA may take (edu fires it from a 100 ms timer of QEMU's virtual clock).
pub const EDU_DMA_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets memory decoding and bus mastering in the PCI command register of a VFIO device whose
/// config space region starts at `config` in `dev`: QEMU drops the DMA of a device whose
/// bus-master bit is clear, and vfio-pci leaves setting it to the user.
pub fn enable_bus_master(dev: &std::fs::File, config: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut cmd = [0u8; 2];
    dev.read_exact_at(&mut cmd, config + PCI_COMMAND)
        .map_err(|e| format!("read PCI_COMMAND: {e}"))?;
    let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    dev.write_all_at(&cmd.to_le_bytes(), config + PCI_COMMAND)
        .map_err(|e| format!("enable bus mastering: {e}"))
}

/// The BDFs of every edu in /sys/bus/pci/devices, sorted.
pub fn edu_bdfs() -> Result<Vec<String>> {
    let dir = "/sys/bus/pci/devices";
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))? {
        let p = e.map_err(|e| e.to_string())?.path();
        let id = |f: &str| {
            fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if id("vendor") != EDU_VENDOR || id("device") != EDU_DEVICE {
            continue;
        }
        let bdf = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        out.push(bdf);
    }
    out.sort();
    Ok(out)
}

/// A mapped BAR, accessed with volatile reads and writes only.
pub struct Bar {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

impl Bar {
    /// Maps `len` bytes at `offset` of `file` (a VFIO device fd, or a region fd a vfio-user
    /// server passed).
    pub fn map(file: &impl AsFd, offset: u64, len: usize) -> Result<Bar> {
        let off = libc::off_t::try_from(offset).map_err(|_| "BAR offset overflows".to_string())?;
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_fd().as_raw_fd(),
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

    /// Starts a one-page edu DMA `src` -> `dst` (`to_ram`: device buffer to RAM; `irq`: edu
    /// raises its completion interrupt). edu fires it from a 100 ms timer of QEMU's clock.
    pub fn edu_dma_start(&self, src: u64, dst: u64, to_ram: bool, irq: bool) {
        self.write_u64(EDU_DMA_SRC, src);
        self.write_u64(EDU_DMA_DST, dst);
        self.write_u64(EDU_DMA_COUNT, PAGE);
        atomic::fence(Ordering::SeqCst);
        let cmd = EDU_CMD_START
            | if to_ram { EDU_CMD_TO_RAM } else { 0 }
            | if irq { EDU_CMD_IRQ } else { 0 };
        self.write_u64(EDU_DMA_CMD, cmd);
    }

    /// Waits up to [`EDU_DMA_TIMEOUT`] for the DMA `edu_dma_start(src, dst, ..)` began.
    pub fn edu_dma_wait(&self, src: u64, dst: u64) -> Result<()> {
        let deadline = Instant::now() + EDU_DMA_TIMEOUT;
        while self.read_u64(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(format!("DMA {src:#x} -> {dst:#x} not done"));
            }
            thread::sleep(Duration::from_micros(200));
        }
        atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    /// One page of edu DMA, waited for.
    pub fn edu_dma(&self, src: u64, dst: u64, to_ram: bool, irq: bool) -> Result<()> {
        self.edu_dma_start(src, dst, to_ram, irq);
        self.edu_dma_wait(src, dst)
    }

    /// Acknowledges whatever edu's interrupt status shows.
    pub fn edu_ack_irqs(&self) {
        let irq = self.read_u32(EDU_IRQ_STATUS);
        if irq != 0 {
            self.write_u32(EDU_IRQ_ACK, irq);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
