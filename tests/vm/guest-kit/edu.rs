//! Shared by the VM tier's guest programs (included with `#[path]`, so no extra crate or lock
//! file): PASS/FAIL reporting, edu discovery and BAR/DMA access through a VFIO device fd, and
//! the rules the in-process daemon uses. edu's registers and the BAR mapping are in mmio.rs.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_iommu::backend::HostConstraints;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, sys};
use vhost_user_iommu::domains::{Limits, Rules};
use vhost_user_iommu::ids::EndpointId;

// Shared with tests/e2e/l2-dma (libc only); not every program uses every item.
#[allow(dead_code)]
#[path = "mmio.rs"]
mod mmio;
pub use mmio::*;

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
