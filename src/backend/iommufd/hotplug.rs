//! Host unbind and rebind of assigned devices: the request IRQ, the watcher thread, unplug and
//! replug (see "Hot-unplug" in the backend's module doc).

use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::*;

/// An eventfd registered as the device's request IRQ; `None` (logged) if that fails.
pub(super) fn request_eventfd(file: &File, path: &Path) -> Option<EventFd> {
    let efd = match EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => {
            warn!("{}: eventfd for the request IRQ: {e}", path.display());
            return None;
        }
    };
    // SAFETY: `efd` owns the fd and outlives this borrow, which ends with the ioctl.
    let fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
    match sys::set_req_eventfd(file.as_fd(), fd) {
        Ok(()) => Some(efd),
        Err(e) => {
            warn!(
                "{}: cannot register the request IRQ ({}): unbinding it from vfio-pci will \
                 block until the daemon stops",
                path.display(),
                std::io::Error::from_raw_os_error(e.errno)
            );
            None
        }
    }
}

/// What the hot-plug watcher ([`IommufdBackend::watch_hotplug`]) reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugEvent {
    /// The host asked for the device back. Called *before* the backend closes its fd: detach
    /// the endpoint in the domain model and drop every duplicate of the fd.
    Unplugging,
    /// The device is bound to vfio-pci again, reopened, bound to the iommufd and blocked (or
    /// identity under bypass): serve it again.
    Replugged,
}

/// The callback of [`IommufdBackend::watch_hotplug`].
pub type HotplugHook = Box<dyn Fn(EndpointId, HotplugEvent) + Send>;

/// How often unplugged devices are looked for in sysfs.
const REPLUG_POLL: Duration = Duration::from_secs(1);

impl IommufdBackend {
    /// Starts the hot-plug watcher thread: when the kernel signals a device's request IRQ (the
    /// host unbinds it from vfio-pci), `hook(ep, Unplugging)` runs, then the backend closes the
    /// device so the unbind completes; every second unplugged devices are looked for
    /// with [`vfio::discover`], reopened, bound, left blocked (identity under bypass), and
    /// `hook(ep, Replugged)` runs. The thread ends when the backend is dropped.
    pub fn watch_hotplug(
        self: &Arc<Self>,
        root: SysfsRoot,
        hook: HotplugHook,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("iommufd-hotplug".into())
            .spawn(move || {
                while let Some(b) = weak.upgrade() {
                    b.hotplug_step(&root, &hook);
                }
            })
    }

    /// One round of the watcher: waits up to `REPLUG_POLL` for a request IRQ, handles it,
    /// then looks for unplugged devices.
    fn hotplug_step(&self, root: &SysfsRoot, hook: &HotplugHook) {
        match self.unplug_requests(REPLUG_POLL) {
            Ok(asked) => {
                for ep in asked {
                    info!("{ep}: the host asks for its device back: unplugging it");
                    hook(ep, HotplugEvent::Unplugging);
                    self.unplug(ep);
                }
            }
            Err(e) => {
                warn!("hot-plug watcher: waiting for request IRQs: {e}");
                std::thread::sleep(REPLUG_POLL);
            }
        }
        let gone: Vec<(EndpointId, Option<PciAddress>)> = lock(&self.shared.devices)
            .iter()
            .filter(|(_, d)| d.file.is_none())
            .map(|(ep, d)| (*ep, d.pci))
            .collect();
        for (ep, pci) in gone {
            let Some(pci) = pci else { continue };
            let Ok(cdev) = vfio::discover(root, pci) else {
                continue;
            };
            match self.replug(ep, &cdev.node) {
                Ok(()) => hook(ep, HotplugEvent::Replugged),
                Err(e) => debug!("{ep}: not replugged yet: {e}"),
            }
        }
    }

    /// Waits up to `timeout` for request IRQs: the endpoints whose device the host asks back
    /// (their eventfds read, so that they are quiet again).
    fn unplug_requests(&self, timeout: Duration) -> std::io::Result<Vec<EndpointId>> {
        let epoll = Epoll::new()?;
        for (ep, d) in lock(&self.shared.devices).iter() {
            if let Some(r) = &d.req {
                let event = EpollEvent::new(EventSet::IN, u64::from(ep.0));
                epoll.ctl(ControlOperation::Add, r.as_raw_fd(), event)?;
            }
        }
        // Only this thread closes the eventfds (in `unplug`): a registered one stays open while
        // it waits.
        let mut events = [EpollEvent::default(); 16];
        let n = match epoll.wait(timeout.as_millis() as i32, &mut events) {
            Ok(n) => n,
            // A signal delivered to this thread: the next round waits again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let devices = lock(&self.shared.devices);
        Ok(events[..n]
            .iter()
            .map(|e| EndpointId(e.data() as u32))
            .filter(|ep| {
                let r = devices.get(ep).and_then(|d| d.req.as_ref());
                r.is_some_and(|r| r.read().is_ok())
            })
            .collect())
    }

    /// Closes an endpoint's device (its request eventfd too): DMA stops, and the host's unbind
    /// completes once every other duplicate of the fd is closed.
    fn unplug(&self, endpoint: EndpointId) {
        let _topo = lock(&self.shared.topo);
        let mut devices = lock(&self.shared.devices);
        let Some(d) = devices.get_mut(&endpoint) else {
            return;
        };
        d.req = None;
        if d.file.take().is_some() {
            d.last_warn = None;
            // A closed device does no DMA, which is what blocked and identity both allow; a
            // paging domain is not kept (the model detached the endpoint before the close).
            if d.attached != Attachment::Identity {
                d.attached = Attachment::Blocked;
            }
            info!("{endpoint}: {} closed (unplugged)", d.path.display());
        }
    }

    /// Reopens an unplugged endpoint's device at `node`, binds it and points it where the
    /// closed one was left (blocked, or identity while the model has it unattached under
    /// `bypass`).
    fn replug(&self, endpoint: EndpointId, node: &Path) -> std::result::Result<(), IommufdError> {
        let _topo = lock(&self.shared.topo);
        let mut new = Device::open(node, &self.shared.iommufd)?;
        let (was, pci) = lock(&self.shared.devices)
            .get(&endpoint)
            .map_or((Attachment::Blocked, None), |d| (d.attached, d.pci));
        let to = match was {
            Attachment::Identity => Attachment::Identity,
            _ => Attachment::Blocked,
        };
        let f = new.file.as_ref().map(|f| f.as_fd()).expect("just opened");
        let r = match to {
            Attachment::Identity => sys::attach_pt(f, self.shared.identity_id),
            _ => sys::detach_pt(f),
        };
        r.map_err(|e| IommufdError::Ioctl {
            ioctl: e.name,
            what: format!("{endpoint} ({})", node.display()),
            errno: e.errno,
        })?;
        new.pci = new.pci.or(pci);
        new.attached = to;
        info!(
            "{endpoint}: {} replugged, dev_id {}, {to:?}",
            node.display(),
            new.dev_id
        );
        lock(&self.shared.devices).insert(endpoint, new);
        Ok(())
    }
}
