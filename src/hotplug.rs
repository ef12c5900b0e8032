//! Host hot-unplug and replug of assigned devices while the daemon runs: the glue between the
//! iommufd backend's watcher ([`IommufdBackend::watch_hotplug`]), the domain model
//! ([`IommuDevice::endpoint_disconnected`](crate::vhost::IommuDevice::endpoint_disconnected))
//! and the vfio-user fronts ([`DeviceSlot`]).
//!
//! When the host unbinds a device from vfio-pci, the kernel signals its request IRQ and waits
//! for every fd of it to be closed. The endpoint is then detached in the domain model (the
//! other endpoints keep being served), its vfio-user front drops its duplicate of the fd and
//! refuses clients with ENODEV, and the backend closes the device, so the unbind completes.
//! Until the device is bound to vfio-pci again, ATTACHes of the endpoint fail with `S_DEVERR`
//! (a rate-limited log line says why). Once it is back (found in sysfs within about a second)
//! it is reopened, bound to the iommufd, left blocked (identity under boot bypass) and served
//! again.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use log::{info, warn};

use crate::backend::iommufd::{HotplugEvent, HotplugHook, IommufdBackend};
use crate::control::CurrentDevice;
use crate::ids::EndpointId;
use crate::recovery::Keeper;
use crate::vfio::SysfsRoot;
use crate::vfio_user::{DeviceSlot, VfioCdevDevice};

/// The hook for [`IommufdBackend::watch_hotplug`]: tells the current vhost-user connection's
/// domain model and takes the device away from (gives it back to) its vfio-user front.
pub fn hook(
    backend: Weak<IommufdBackend>,
    current: CurrentDevice,
    slots: BTreeMap<EndpointId, DeviceSlot>,
    keeper: Option<Arc<Keeper>>,
) -> HotplugHook {
    Box::new(move |ep, event| match event {
        HotplugEvent::Unplugging => {
            // The fd store's duplicate goes first: the host's unbind waits for every one.
            if let Some(k) = &keeper {
                k.unplugging(ep.0);
            }
            let dev = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(d) = dev {
                d.endpoint_disconnected(ep);
            }
            if let Some(s) = slots.get(&ep) {
                s.remove();
                info!("{ep}: vfio-user front: device taken away (host unplug)");
            }
        }
        HotplugEvent::Replugged => {
            if let Some(k) = &keeper {
                k.replugged(ep.0);
            }
            let (Some(s), Some(b)) = (slots.get(&ep), backend.upgrade()) else {
                return;
            };
            let Some(file) = b.device_file(ep) else {
                return;
            };
            match VfioCdevDevice::new(file, format!("endpoint {}", ep.0)) {
                Ok(d) => {
                    s.put(Box::new(d));
                    info!("{ep}: vfio-user front: serving the device again");
                }
                Err(e) => warn!("{ep}: vfio-user front: cannot serve the replugged device: {e}"),
            }
        }
    })
}

/// Starts the backend's hot-plug watcher with [`hook`] (real sysfs).
pub fn watch(
    backend: &Arc<IommufdBackend>,
    current: CurrentDevice,
    slots: BTreeMap<EndpointId, DeviceSlot>,
    keeper: Option<Arc<Keeper>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    backend.watch_hotplug(
        SysfsRoot::default(),
        hook(Arc::downgrade(backend), current, slots, keeper),
    )
}
