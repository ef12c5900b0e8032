//! Assembles one VM's daemon from its configuration: the translation backend, the vfio-user
//! fronts of the assigned devices, boot bypass's view of guest RAM before the memory table. The
//! binary (`src/bin/vhost-user-iommu/`) parses the command line and calls these.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use log::{info, warn};

use crate::backend::DmaBackend;
use crate::backend::iommufd::IommufdBackend;
use crate::backend::soft::SoftBackend;
use crate::boot_ram::Follower;
use crate::config::{BackendKind, VmConfig};
use crate::control::CurrentDevice;
use crate::ids::EndpointId;
use crate::upgrade::ResumedServer;
use crate::vfio::{self, PciAddress, SysfsRoot};
use crate::vfio_user;

/// How long the daemon waits at start for its devices to be bound to vfio-pci (they appear in
/// any order; the unit is started by the first).
pub const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The backend in use, and the iommufd backend itself when that is the one (the vfio-user
/// fronts need its device files).
pub struct Backend {
    pub dyn_backend: Arc<dyn DmaBackend>,
    pub iommufd: Option<Arc<IommufdBackend>>,
}

/// What every vfio-user front of the daemon shares.
#[derive(Clone, Copy)]
pub struct FrontShared<'a> {
    /// Stops (or hands over) every server.
    pub stop: &'a vfio_user::StopSignal,
    /// Boot bypass's view of guest RAM, if configured.
    pub boot: Option<&'a Arc<Follower>>,
    /// The daemon's request trace (a line per vfio-user message while it is on).
    pub trace: &'a Arc<crate::trace::Tracer>,
    /// Where each server keeps what a crash-restarted daemon needs, if anywhere.
    pub keeper: Option<&'a Arc<crate::recovery::Keeper>>,
    /// Where the servers report the interrupt eventfds their clients set (`poll_after_irq`).
    pub irq_watch: Option<&'a Arc<crate::irq_watch::IrqWatch>>,
}

/// Serves each configured endpoint's VFIO device to the VMM over vfio-user; a server handed over
/// by a previous daemon (`resumed`) waits for a message on its sender in `gates` before it
/// serves. DMA_MAPs from the
/// VMM are checked against the vhost-user memory table once it is known (QEMU sends them right
/// after connecting, before the guest starts the IOMMU device); they are recorded, never mapped
/// for the device. With `boot` (boot bypass), the guest RAM they describe is what identity
/// translation covers until the memory table arrives (see `boot_ram`).
pub fn start_vfio_user(
    cfg: &VmConfig,
    backend: &Backend,
    current: &CurrentDevice,
    shared: FrontShared<'_>,
    mut resumed: BTreeMap<EndpointId, ResumedServer>,
    gates: &mut Vec<std::sync::mpsc::Sender<()>>,
) -> Result<VfioUserFronts, String> {
    let FrontShared {
        stop,
        boot,
        trace,
        keeper,
        irq_watch,
    } = shared;
    let mut threads = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for e in &cfg.endpoints {
        let Some(path) = &e.vfio_user_socket else {
            continue;
        };
        let Some(iommufd) = &backend.iommufd else {
            return Err(format!(
                "endpoint {}: vfio_user_socket needs the iommufd backend (a host device to serve)",
                e.id
            ));
        };
        let file = iommufd
            .device_file(EndpointId(e.id))
            .ok_or_else(|| format!("endpoint {}: no VFIO device is open for it", e.id))?;
        let name = format!("endpoint {}", e.id);
        let dev = vfio_user::VfioCdevDevice::new(file, name.clone())
            .map_err(|err| format!("{name}: {err}"))?;
        let ram_of = current.clone();
        let dma_check: vfio_user::DmaCheck = Arc::new(move |gpa, len| {
            let dev = ram_of.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(ram) = dev.and_then(|d| d.guest_ram()) else {
                return true;
            };
            crate::ids::GpaRange::with_len(gpa, len).is_some_and(|r| ram.locate(&r).is_some())
        });
        let handed = resumed.remove(&EndpointId(e.id));
        let listener = match &handed {
            Some(_) => None,
            None => Some(vfio_user::bind_socket(path).map_err(|err| {
                format!(
                    "{name}: cannot serve vfio-user on {}: {err}",
                    path.display()
                )
            })?),
        };
        let (connected, ep) = (current.clone(), EndpointId(e.id));
        // A closed device connection leaves the device blocked until the guest re-attaches it
        // (DESIGN §3.4); the domain model is told so that it stays equal to the host.
        let on_disconnect = move || {
            if let Some(d) = connected.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                d.endpoint_disconnected(ep);
            }
        };
        let peers = crate::peer::PeerPolicy {
            uid: cfg.vmm_uid,
            gid: cfg.vmm_gid,
        };
        if peers.is_open() {
            warn!(
                "{name}: no vmm_uid or vmm_gid in the config: any process that can reach {} may use the device",
                path.display()
            );
        }
        let mut server = vfio_user::DeviceServer::new(Box::new(dev), dma_check, stop.clone())
            .peers(peers)
            .trace(trace.clone())
            .name(name.clone())
            .on_disconnect(on_disconnect);
        if let Some(w) = irq_watch {
            server = server.irq_watch(w.clone());
        }
        if let Some(boot) = boot {
            // Each client describes all of guest RAM; the follower applies its maps behind the
            // replies, and the device's bus mastering waits for it (`boot_ram::follower`).
            server = boot.follow(server, &name);
        }
        if let Some(k) = keeper {
            if let Some(log) = k.reply_log(e.id) {
                server = server.reply_log(log);
            }
            if let Some(found) = k.in_flight_of(e.id) {
                server = server.after_crash(found);
            }
            let (k, maps, id) = (k.clone(), server.dma_maps(), e.id);
            server = server.on_keep(Arc::new(move |listener, client| {
                k.keep_vfio_user(
                    id,
                    Some(crate::upgrade::VfioUserServer::of(
                        id, listener, client, &maps,
                    )),
                );
            }));
        }
        slots.insert(ep, server.slot());
        let t = match (handed, listener) {
            (Some(h), _) => {
                server.dma_maps().restore(h.maps);
                info!(
                    "{name}: serving vfio-user on {} (handed over{})",
                    path.display(),
                    if h.connection.is_some() {
                        ", with its client"
                    } else {
                        ""
                    }
                );
                // Served once the rest of the state is rebuilt (`gates`).
                let (go, wait) = std::sync::mpsc::channel();
                gates.push(go);
                server.spawn_resumed_after(h.listener, h.connection, Some(wait))
            }
            (None, Some(l)) => {
                info!("{name}: serving vfio-user on {}", path.display());
                server.spawn(l)
            }
            (None, None) => unreachable!("a listener is bound for every server not handed over"),
        }
        .map_err(|err| format!("{name}: cannot start the vfio-user thread: {err}"))?;
        threads.insert(ep, t);
    }
    if let Some(ep) = resumed.keys().next() {
        return Err(format!(
            "endpoint {}: a vfio-user server was handed over for it, but the config has no \
             vfio_user_socket for it",
            ep.0
        ));
    }
    Ok(VfioUserFronts { threads, slots })
}

/// Asks every vfio-user server to hand over (see [`vfio_user::StopSignal::hand_over`]) and
/// collects them. A server that ended otherwise (it failed) is reported in the error, and the
/// others are resumed: a partial handover is no handover.
pub fn hand_over_vfio_user(
    stop: &vfio_user::StopSignal,
    fronts: &mut VfioUserFronts,
) -> Result<BTreeMap<EndpointId, vfio_user::HandedOverServer>, String> {
    stop.hand_over();
    let mut handed = BTreeMap::new();
    let mut failed = Vec::new();
    for (ep, t) in std::mem::take(&mut fronts.threads) {
        match t.join() {
            Ok(Ok(vfio_user::ServerEnd::HandedOver(h))) => {
                handed.insert(ep, *h);
            }
            Ok(Ok(vfio_user::ServerEnd::Stopped)) => failed.push(format!("{ep}: stopped")),
            Ok(Err(e)) => failed.push(format!("{ep}: {e}")),
            Err(_) => failed.push(format!("{ep}: its thread panicked")),
        }
    }
    if failed.is_empty() {
        return Ok(handed);
    }
    resume_vfio_user(stop, fronts, handed);
    Err(format!(
        "vfio-user servers that cannot be handed over: {}",
        failed.join("; ")
    ))
}

/// Serves again, in this process, what [`hand_over_vfio_user`] collected (the upgrade did not
/// happen).
pub fn resume_vfio_user(
    stop: &vfio_user::StopSignal,
    fronts: &mut VfioUserFronts,
    handed: BTreeMap<EndpointId, vfio_user::HandedOverServer>,
) {
    stop.rearm();
    for (ep, h) in handed {
        match h.server.spawn_resumed(h.listener, h.connection) {
            Ok(t) => {
                fronts.threads.insert(ep, t);
            }
            Err(e) => log::error!("{ep}: cannot restart the vfio-user thread: {e}"),
        }
    }
}

/// The vfio-user server threads and their device slots (taken away on host unplug).
pub struct VfioUserFronts {
    pub threads:
        BTreeMap<EndpointId, std::thread::JoinHandle<std::io::Result<vfio_user::ServerEnd>>>,
    pub slots: BTreeMap<EndpointId, vfio_user::DeviceSlot>,
}

/// The iommufd backend a previous daemon handed over (a planned upgrade).
///
/// # Safety
/// Every fd `h` names must be open and owned by nobody else in this process.
pub unsafe fn adopt_backend(
    h: crate::backend::iommufd::IommufdHandover,
) -> Result<Backend, String> {
    // SAFETY: passed on from the caller.
    let b = unsafe { IommufdBackend::adopt(h) }
        .map_err(|e| format!("cannot take over the iommufd backend: {e}"))?;
    let b = Arc::new(b);
    Ok(Backend {
        dyn_backend: b.clone(),
        iommufd: Some(b),
    })
}

/// Picks and opens the translation backend: iommufd when asked, or with `auto` when every
/// endpoint names a host device and /dev/iommu exists; else the software table.
pub fn open_backend(
    kind: BackendKind,
    cfg: &VmConfig,
    cli_endpoints: &[u32],
    endpoints: &[EndpointId],
    boot_bypass: bool,
) -> Result<Backend, String> {
    let all_have_devices =
        !cfg.endpoints.is_empty() && cfg.endpoints.iter().all(|e| e.pci.is_some());
    let iommufd = match kind {
        BackendKind::Iommufd => true,
        BackendKind::Soft => false,
        BackendKind::Auto => {
            let node = std::path::Path::new(crate::backend::iommufd::IOMMUFD_NODE).exists();
            if !(all_have_devices && node) {
                info!(
                    "backend auto: using the software table ({})",
                    if node {
                        "no endpoint names a host device"
                    } else {
                        "no /dev/iommu on this host"
                    }
                );
            }
            all_have_devices && node
        }
    };
    if !iommufd {
        warn!("using the software translation backend: no host device DMA is translated");
        return Ok(Backend {
            dyn_backend: Arc::new(SoftBackend::new(endpoints, boot_bypass)),
            iommufd: None,
        });
    }
    if !cli_endpoints.is_empty() {
        return Err("--endpoint cannot be used with the iommufd backend: list the endpoints with their pci address in the config".into());
    }
    if !all_have_devices {
        return Err("the iommufd backend needs a config whose every [[endpoint]] has pci = \"DDDD:BB:DD.F\"".into());
    }
    let root = SysfsRoot::default();
    let mut pairs = Vec::new();
    for e in &cfg.endpoints {
        let pci = e.pci.as_deref().unwrap_or_default();
        let addr: PciAddress = pci
            .parse()
            .map_err(|err| format!("endpoint {}: {err}", e.id))?;
        pairs.push((EndpointId(e.id), addr));
    }
    let addrs: Vec<PciAddress> = pairs.iter().map(|p| p.1).collect();
    info!(
        "waiting up to {DEVICE_WAIT:?} for {} device(s) to be ready for VFIO",
        addrs.len()
    );
    let cdevs = vfio::wait_for_devices(&root, &addrs, DEVICE_WAIT).map_err(|e| e.to_string())?;
    let devices: Vec<(EndpointId, PathBuf)> = pairs
        .iter()
        .zip(cdevs)
        .map(|((id, _), c)| (*id, c.node))
        .collect();
    let b = IommufdBackend::open(&devices, boot_bypass).map_err(|e| e.to_string())?;
    b.set_staging(cfg.staging);
    info!("iommufd backend: {} device(s) bound", devices.len());
    let b = Arc::new(b);
    Ok(Backend {
        dyn_backend: b.clone(),
        iommufd: Some(b),
    })
}
