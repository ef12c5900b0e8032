//! Shared by the VM tier's guest programs (included with `#[path]`, so no extra crate or lock
//! file): PASS/FAIL reporting, edu discovery and BAR/DMA access through a VFIO device fd, and
//! the rules the in-process daemon uses.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_iommu::backend::HostConstraints;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, sys};
use vhost_user_iommu::domains::{Limits, Rules};
use vhost_user_iommu::ids::EndpointId;

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

pub struct Report {
    pub passed: usize,
    pub failed: usize,
}

impl Report {
    pub fn check(&mut self, name: &str, r: Result<String>) -> bool {
        match r {
            Ok(note) if note.is_empty() => println!("PASS: {name}"),
            Ok(note) => println!("PASS: {name} ({note})"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL: {name}: {why}");
                return false;
            }
        }
        self.passed += 1;
        true
    }
}

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

/// An edu device driven through the VFIO cdev the backend holds.
pub struct Edu {
    pub name: String,
    pub bar0: Bar,
}

impl Edu {
    pub fn open(backend: &IommufdBackend, ep: EndpointId, name: String) -> Result<Edu> {
        let file = &backend.device_file(ep).ok_or("no device file")?;
        let bar = backend
            .region_info(ep, sys::VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|e| e.to_string())?;
        if bar.flags & sys::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x100 {
            return Err(format!("BAR0 not mmappable or too small: {bar:?}"));
        }
        let bar0 = Bar::map(file, bar.offset, bar.size as usize)?;
        let cfg = backend
            .region_info(ep, sys::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| e.to_string())?;
        let mut cmd = [0u8; 2];
        file.read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)
            .map_err(|e| format!("read PCI_COMMAND: {e}"))?;
        // QEMU drops the DMA of a device whose bus-master bit is clear; vfio-pci leaves it to us.
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        file.write_all_at(&cmd.to_le_bytes(), cfg.offset + PCI_COMMAND)
            .map_err(|e| format!("enable bus mastering: {e}"))?;
        let id = bar0.read_u32(EDU_ID);
        if id & 0xffff != 0x00ed {
            return Err(format!("edu identification register reads {id:#010x}"));
        }
        Ok(Edu { name, bar0 })
    }

    /// A one-page DMA (edu fires it from a 100 ms timer of QEMU's virtual clock).
    pub fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<()> {
        self.bar0.write_u64(EDU_DMA_SRC, src);
        self.bar0.write_u64(EDU_DMA_DST, dst);
        self.bar0.write_u64(EDU_DMA_COUNT, PAGE);
        std::sync::atomic::fence(Ordering::SeqCst);
        let cmd = EDU_CMD_START | if to_ram { EDU_CMD_TO_RAM } else { 0 };
        self.bar0.write_u64(EDU_DMA_CMD, cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bar0.read_u64(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(format!("{}: DMA {src:#x} -> {dst:#x} not done", self.name));
            }
            thread::sleep(Duration::from_micros(200));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }
}

pub fn edu_cdevs() -> Result<Vec<(String, PathBuf)>> {
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
        let vdir = p.join("vfio-dev");
        let cdev = fs::read_dir(&vdir)
            .map_err(|e| format!("{}: {e} (not bound to vfio-pci?)", vdir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio"))
            .ok_or_else(|| format!("{} lists no vfioN", vdir.display()))?;
        out.push((bdf, Path::new("/dev/vfio/devices").join(cdev)));
    }
    out.sort();
    Ok(out)
}

pub fn rules_from(c: &HostConstraints) -> Rules {
    Rules::for_host(c, (1, 1023), Limits::default(), 512)
}
