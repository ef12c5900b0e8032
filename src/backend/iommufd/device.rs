//! One VFIO cdev device as the backend holds it.

use super::*;

pub(super) struct Device {
    pub(super) path: PathBuf,
    /// `None` while the host has the device back (unplugged; see "Hot-unplug" in the module
    /// docs).
    pub(super) file: Option<File>,
    pub(super) dev_id: u32,
    /// The PCI address behind the cdev (from sysfs), to find the device again after an unplug.
    pub(super) pci: Option<PciAddress>,
    /// Signalled by the kernel when it wants the device back (request IRQ).
    pub(super) req: Option<EventFd>,
    /// When an ATTACH of the unplugged endpoint was last logged.
    pub(super) last_warn: Option<Instant>,
    /// Where the kernel was last told to point this device's DMA (it offers no way to read it
    /// back): the handle's own state, kept across an unplug (the reopened file is pointed there
    /// again), a hand-over and a crash (see `IommufdBackend::reconcile`). What the guest asked
    /// for is the domain model's; this is what was done for it.
    pub(super) attached: Attachment,
}

impl Device {
    pub(super) fn open(path: &Path, iommufd: &File) -> std::result::Result<Device, IommufdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| IommufdError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let dev_id =
            sys::bind_iommufd(file.as_fd(), iommufd.as_fd()).map_err(|e| IommufdError::Ioctl {
                ioctl: e.name,
                what: path.display().to_string(),
                errno: e.errno,
            })?;
        let pci = path
            .file_name()
            .and_then(|n| {
                std::fs::canonicalize(Path::new("/sys/class/vfio-dev").join(n).join("device")).ok()
            })
            .and_then(|p| p.file_name()?.to_str()?.parse::<PciAddress>().ok());
        let req = request_eventfd(&file, path);
        Ok(Device {
            path: path.to_path_buf(),
            file: Some(file),
            dev_id,
            pci,
            req,
            last_warn: None,
            // Bound to the iommufd and attached nowhere: DMA is blocked.
            attached: Attachment::Blocked,
        })
    }

    /// The open cdev; ENODEV while unplugged.
    pub(super) fn file(&self, endpoint: EndpointId) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| {
            BackendError::new(
                "attach",
                libc::ENODEV,
                format!(
                    "{endpoint} ({}): the device was unplugged from vfio-pci",
                    self.path.display()
                ),
            )
        })
    }
}

/// The fd of a device that is open (during `open`, all are).
pub(super) fn dev_fd(d: &Device) -> std::os::fd::BorrowedFd<'_> {
    d.file.as_ref().expect("the device is open").as_fd()
}
