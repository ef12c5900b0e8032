//! edu discovery and BAR/DMA access through a VFIO device fd, the iommufd backend over two edus,
//! and the rules the in-process daemon uses. edu's registers and the BAR mapping are in
//! `mmio`, the reporting in `report` (both re-exported here); the in-process daemon itself is in
//! `daemon`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost_user_iommu::backend::HostConstraints;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, sys};
use vhost_user_iommu::domains::{Limits, Rules};
use vhost_user_iommu::ids::EndpointId;

pub use crate::mmio::*;
pub use crate::report::*;

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
        enable_bus_master(file, cfg.offset)?;
        let id = bar0.read_u32(EDU_ID);
        if id & 0xffff != 0x00ed {
            return Err(format!("edu identification register reads {id:#010x}"));
        }
        Ok(Edu { name, bar0 })
    }

    /// A one-page DMA (edu fires it from a 100 ms timer of QEMU's virtual clock).
    pub fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<()> {
        self.start(src, dst, to_ram);
        self.wait(src, dst)
    }

    /// Starts a one-page DMA without waiting for it.
    pub fn start(&self, src: u64, dst: u64, to_ram: bool) {
        self.bar0.edu_dma_start(src, dst, to_ram, false);
    }

    /// Waits for the DMA `start` began.
    pub fn wait(&self, src: u64, dst: u64) -> Result<()> {
        self.bar0
            .edu_dma_wait(src, dst)
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// Device reads a page at `iova` into its buffer.
    pub fn load(&self, iova: u64) -> Result<()> {
        self.dma(iova, EDU_BUFFER, false)
    }

    /// Device writes its buffer to the page at `iova`.
    pub fn store(&self, iova: u64) -> Result<()> {
        self.dma(EDU_BUFFER, iova, true)
    }
}

/// An edu's BDF and VFIO cdev.
pub type EduCdev = (String, PathBuf);

/// Every edu (sorted by BDF) with its VFIO cdev.
pub fn edu_cdevs() -> Result<Vec<EduCdev>> {
    let mut out = Vec::new();
    for bdf in edu_bdfs()? {
        let vdir = Path::new("/sys/bus/pci/devices")
            .join(&bdf)
            .join("vfio-dev");
        let cdev = fs::read_dir(&vdir)
            .map_err(|e| format!("{}: {e} (not bound to vfio-pci?)", vdir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio"))
            .ok_or_else(|| format!("{} lists no vfioN", vdir.display()))?;
        out.push((bdf, Path::new("/dev/vfio/devices").join(cdev)));
    }
    Ok(out)
}

/// The iommufd backend over the first two edus' cdevs as endpoints 1 and 2, and every edu
/// found (BDF, cdev); fails unless there are two.
pub fn backend_over_two_edus() -> Result<(Arc<IommufdBackend>, Vec<EduCdev>)> {
    let edus = edu_cdevs()?;
    if edus.len() < 2 {
        return Err(format!(
            "need two edu devices bound to vfio-pci, found {edus:?}"
        ));
    }
    let eps: Vec<(EndpointId, PathBuf)> = edus
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, (_, p))| (EndpointId(i as u32 + 1), p.clone()))
        .collect();
    let backend = Arc::new(IommufdBackend::open(&eps, false).map_err(|e| format!("open: {e}"))?);
    Ok((backend, edus))
}

pub fn rules_from(c: &HostConstraints) -> Rules {
    Rules::for_host(c, (1, 1023), Limits::default(), 512)
}
