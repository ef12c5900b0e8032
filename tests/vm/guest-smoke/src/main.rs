//! guest-smoke: the first guest-side check of the VM test tier (tests/vm/run.sh).
//!
//! For every edu device the initramfs bound to vfio-pci it drives the raw kernel interfaces the
//! daemon will use: /dev/iommu (IOAS alloc, map, unmap), the device's VFIO cdev (bind to iommufd,
//! attach to the IOAS, detach) and edu's own DMA engine, and proves with data that
//!   - a DMA through an IOAS mapping lands in the mapped buffer (round trip RAM -> edu -> RAM),
//!   - after IOMMU_IOAS_UNMAP a DMA to that IOVA no longer changes the buffer,
//!   - after re-mapping it lands again, and after DETACH it is blocked again.
//!
//! Output: one `PASS: <name>` or `FAIL: <name>: <why>` line per check; exit status 1 if any failed.
//! It owns nothing but the edu devices; it must never touch other PCI devices.

mod mem;
// The iommufd/VFIO ioctls: the daemon's own definitions (the repository's `uapi` crate).
use viommu_uapi as uapi;

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use guest_kit::mmio::{
    edu_bdfs, enable_bus_master, EDU_BUFFER, EDU_CMD_START, EDU_CMD_TO_RAM, EDU_DMA_CMD,
    EDU_DMA_COUNT, EDU_DMA_DST, EDU_DMA_SRC, EDU_ID, EDU_LIVENESS,
};
use guest_kit::report::{differences, Report};
use guest_kit::sys::{open_rw, vfio_cdev};
use mem::Mapping;
use uapi::*;

/// Identification register: 0xRRrr00ed, major.minor version in the top bytes.
const EDU_ID_MAGIC_MASK: u32 = 0xffff;
const EDU_ID_MAGIC: u32 = 0x00ed;

const BUF_LEN: usize = 4096;
const IOVA: u64 = 0x10_0000;

const SENTINEL: u8 = 0xee;

type Result<T> = std::result::Result<T, String>;

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    // Not periodic in 256 bytes, so a shifted or partial copy cannot pass.
    move |i| {
        (i as u8)
            .wrapping_mul(31)
            .wrapping_add((i >> 8) as u8)
            .wrapping_add(seed)
            ^ 0x5a
    }
}

struct Ioas<'a> {
    iommufd: &'a File,
    id: u32,
}

impl<'a> Ioas<'a> {
    fn alloc(iommufd: &'a File) -> Result<Self> {
        let id = ioas_alloc(iommufd.as_fd()).map_err(|e| e.to_string())?;
        Ok(Self { iommufd, id })
    }

    fn map(&self, buf: &Mapping, iova: u64) -> Result<()> {
        let mut arg = IommuIoasMap {
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: self.id,
            user_va: buf.addr(),
            length: buf.len() as u64,
            iova,
            ..IommuIoasMap::sized()
        };
        ioctl(self.iommufd.as_fd(), &mut arg).map_err(|e| e.to_string())?;
        if arg.iova != iova {
            return Err(format!(
                "IOMMU_IOAS_MAP placed the buffer at {:#x}, not {iova:#x}",
                arg.iova
            ));
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, length: u64) -> Result<()> {
        let gone =
            ioas_unmap(self.iommufd.as_fd(), self.id, iova, length).map_err(|e| e.to_string())?;
        if gone != length {
            return Err(format!(
                "IOMMU_IOAS_UNMAP unmapped {gone:#x} bytes, not {length:#x}"
            ));
        }
        Ok(())
    }
}

impl Drop for Ioas<'_> {
    fn drop(&mut self) {
        let mut arg = IommuDestroy {
            id: self.id,
            ..IommuDestroy::sized()
        };
        // Best effort: closing /dev/iommu frees the IOAS anyway.
        let _ = ioctl(self.iommufd.as_fd(), &mut arg);
    }
}

/// An edu device opened through its VFIO cdev and bound to an iommufd.
struct Edu {
    dev: File,
    bar0: Mapping,
}

impl Edu {
    fn open(cdev: &str, iommufd: &File) -> Result<Self> {
        let dev = open_rw(cdev)?;
        let mut bind = VfioDeviceBindIommufd {
            iommufd: std::os::fd::AsRawFd::as_raw_fd(iommufd),
            ..VfioDeviceBindIommufd::sized()
        };
        ioctl(dev.as_fd(), &mut bind).map_err(|e| e.to_string())?;

        let bar = region(&dev, VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x100 {
            return Err(format!("BAR0 not mmappable or too small: {bar:?}"));
        }
        let len = usize::try_from(bar.size)
            .map_err(|_| format!("BAR0 size {:#x} overflows", bar.size))?;
        let bar0 =
            Mapping::file(dev.as_fd(), len, bar.offset).map_err(|e| format!("mmap BAR0: {e}"))?;

        let cfg = region(&dev, VFIO_PCI_CONFIG_REGION_INDEX)?;
        if cfg.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE) == 0 {
            return Err(format!("config space region not read/write: {cfg:?}"));
        }
        enable_bus_master(&dev, cfg.offset)?;
        Ok(Self { dev, bar0 })
    }

    fn attach(&self, pt_id: u32) -> Result<()> {
        let mut arg = VfioDeviceAttachIommufdPt {
            pt_id,
            ..VfioDeviceAttachIommufdPt::sized()
        };
        ioctl(self.dev.as_fd(), &mut arg).map_err(|e| e.to_string())
    }

    fn detach(&self) -> Result<()> {
        let mut arg = VfioDeviceDetachIommufdPt::sized();
        ioctl(self.dev.as_fd(), &mut arg).map_err(|e| e.to_string())
    }

    fn identify(&self) -> Result<()> {
        let id = self.bar0.read_u32(EDU_ID);
        if id & EDU_ID_MAGIC_MASK != EDU_ID_MAGIC {
            return Err(format!(
                "identification register reads {id:#010x}, not 0x....00ed"
            ));
        }
        self.bar0.write_u32(EDU_LIVENESS, 0x1234_5678);
        let back = self.bar0.read_u32(EDU_LIVENESS);
        if back != !0x1234_5678u32 {
            return Err(format!(
                "liveness register returned {back:#010x} for 0x12345678"
            ));
        }
        Ok(())
    }

    /// Runs one DMA of `count` bytes and waits for edu to report it done.
    fn dma(&self, src: u64, dst: u64, count: u64, to_ram: bool) -> Result<()> {
        self.bar0.write_u64(EDU_DMA_SRC, src);
        self.bar0.write_u64(EDU_DMA_DST, dst);
        self.bar0.write_u64(EDU_DMA_COUNT, count);
        let cmd = EDU_CMD_START | if to_ram { EDU_CMD_TO_RAM } else { 0 };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.bar0.write_u64(EDU_DMA_CMD, cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bar0.read_u64(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "DMA {src:#x} -> {dst:#x} ({count} bytes) not done after 10 s"
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn to_device(&self, iova: u64) -> Result<()> {
        self.dma(iova, EDU_BUFFER, BUF_LEN as u64, false)
    }

    fn to_ram(&self, iova: u64) -> Result<()> {
        self.dma(EDU_BUFFER, iova, BUF_LEN as u64, true)
    }
}

fn region(dev: &File, index: u32) -> Result<VfioRegionInfo> {
    let mut info = VfioRegionInfo {
        index,
        ..VfioRegionInfo::sized()
    };
    ioctl(dev.as_fd(), &mut info).map_err(|e| format!("region {index}: {e}"))?;
    Ok(info)
}

fn expect_contents(buf: &Mapping, want: impl Fn(usize) -> u8, what: &str) -> Result<()> {
    match differences(&buf.snapshot(), want) {
        None => Ok(()),
        Some(d) => Err(format!("{what}: {d}")),
    }
}

/// A check's verdict with no note.
fn done(r: Result<()>) -> Result<String> {
    r.map(|()| String::new())
}

/// All checks for one edu device; stops at the first failure (later checks depend on it).
fn check_edu(report: &mut Report, index: usize, bdf: &str) {
    let name = |what: &str| format!("edu {bdf}: {what}");
    let seed = u8::try_from(index % 200).unwrap_or(0);
    let setup = (|| {
        let iommufd = open_rw("/dev/iommu")?;
        let cdev = vfio_cdev(bdf)?;
        Ok::<_, String>((iommufd, cdev))
    })();
    let (iommufd, cdev) = match setup {
        Ok(v) => v,
        Err(e) => {
            report.check(&name("open /dev/iommu and the VFIO cdev"), Err(e));
            return;
        }
    };
    let ioas = match Ioas::alloc(&iommufd) {
        Ok(ioas) => ioas,
        Err(e) => {
            report.check(&name("IOMMU_IOAS_ALLOC"), Err(e));
            return;
        }
    };
    let edu = match Edu::open(&cdev, &iommufd).and_then(|edu| edu.attach(ioas.id).map(|()| edu)) {
        Ok(edu) => {
            report.check(
                &name(&format!(
                    "{cdev} bound to iommufd, attached to IOAS {}",
                    ioas.id
                )),
                Ok(String::new()),
            );
            edu
        }
        Err(e) => {
            report.check(
                &name(&format!("bind {cdev} to iommufd and attach to the IOAS")),
                Err(e),
            );
            return;
        }
    };
    if !report.check(
        &name("BAR0 identification and liveness registers"),
        done(edu.identify()),
    ) {
        return;
    }
    let buf = match Mapping::anonymous(BUF_LEN) {
        Ok(buf) => buf,
        Err(e) => {
            report.check(&name("mmap a 4 KiB DMA buffer"), Err(e.to_string()));
            return;
        }
    };

    let data = pattern(seed);
    let round_trip = (|| {
        buf.fill(&data);
        ioas.map(&buf, IOVA)?;
        edu.to_device(IOVA)?;
        buf.fill(|_| 0);
        edu.to_ram(IOVA)?;
        expect_contents(&buf, &data, "buffer after RAM -> edu -> RAM")
    })();
    if !report.check(
        &name(&format!(
            "DMA round trip through IOAS_MAP at IOVA {IOVA:#x}"
        )),
        done(round_trip),
    ) {
        return;
    }

    // A DMA to IOVA that must not land: the buffer keeps the sentinel.
    let blocked = |what: &str| {
        buf.fill(|_| SENTINEL);
        edu.to_ram(IOVA)?;
        expect_contents(&buf, |_| SENTINEL, what)
    };
    let after_unmap = (|| {
        ioas.unmap(IOVA, BUF_LEN as u64)?;
        blocked("buffer after a DMA to the unmapped IOVA")
    })();
    if !report.check(
        &name(&format!("DMA to IOVA {IOVA:#x} blocked after IOAS_UNMAP")),
        done(after_unmap),
    ) {
        return;
    }

    let remapped = (|| {
        ioas.map(&buf, IOVA)?;
        edu.to_ram(IOVA)?;
        expect_contents(&buf, &data, "buffer after a DMA to the re-mapped IOVA")
    })();
    if !report.check(&name("DMA lands again after re-map"), done(remapped)) {
        return;
    }

    let after_detach = (|| {
        edu.detach()?;
        blocked("buffer after a DMA from the detached device")
    })();
    report.check(
        &name("DMA blocked after DETACH_IOMMUFD_PT"),
        done(after_detach),
    );
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let mut report = Report::default();
    match edu_bdfs() {
        Ok(bdfs) if !bdfs.is_empty() => {
            for (i, bdf) in bdfs.iter().enumerate() {
                check_edu(&mut report, i, bdf);
            }
        }
        Ok(_) => {
            report.check(
                "find edu devices",
                Err("no edu (1234:11e8) in /sys/bus/pci/devices".into()),
            );
        }
        Err(e) => {
            report.check("find edu devices", Err(e));
        }
    }
    report.finish("guest-smoke", t0)
}
