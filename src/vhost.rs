//! The vhost-user glue: the virtio-iommu device as the VMM sees it, and the request virtqueue.
//!
//! This module owns the conversation with the VMM (features, config space, memory table, reset)
//! and the guest's descriptor chains. It copies each request out of guest memory exactly once,
//! into a fixed buffer, before anything looks at it; it writes tails and PROBE replies only into
//! device-writable descriptors that lie inside guest RAM. It never interprets a request: that is
//! the domain model's job, reached through the [`Dispatcher`].
//!
//! The device state has one owner, the vring thread: the vhost-user message thread and every
//! other thread post `Event`s to its mailbox (see `mailbox`) and wait for the answer.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::{BackendError, DmaBackend};
use crate::domains::{DomainSummary, DomainView, EndpointView, Rules, status_of};
use crate::guest_ram::GuestRam;
use crate::ids::EndpointId;
use crate::metrics::Metrics;
use crate::pipeline::{Completion, Dispatcher, Mode, QUEUE_CAPACITY, Submitted};
use crate::protocol::{
    CONFIG_SIZE, Config, DecodeError, EVENT_QUEUE, REQUEST_QUEUE, Request, RequestType, Status,
    TAIL_SIZE, encode_tail, features,
};

mod chain;
mod connection;
mod events;
mod handover;
mod mailbox;
mod memory;
mod poll_window;
mod polling;
mod requests;
mod vring_thread;
mod wire;

pub use connection::{Connection, Served};
pub use events::Recovered;
pub use handover::{
    ConnectionState, DeviceState, HandedOver, RegionState, RingState, STATE_VERSION, memory_table,
    resume_rings,
};

use chain::{Chain, LogLimiter, Pending, PendingTable, read_chain};
use events::{Event, OwnerWatch, owner_gone};
use mailbox::Mailbox;
use memory::{check_backing, guest_ram};
use poll_window::{IrqWindow, PollWindow};
use requests::{RingMark, Wake, drain};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Event token of the executors' completion eventfd (0, 1 are the queues, 2 the exit event).
pub const COMPLETION_EVENT: u16 = 3;
/// Event token of the eventfd that resumes request processing after a budget ran out.
pub const REWAKE_EVENT: u16 = 4;
/// Event token of the mailbox: other threads posted events for the device state's owner.
pub const MAILBOX_EVENT: u16 = 5;
/// Event token of the interrupt watch: an assigned device raised an interrupt (`irq_watch`).
pub const IRQ_EVENT: u16 = 6;
/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Default cap of the vring thread's adaptive polling window (see `DeviceSettings::poll`).
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Everything the device needs to know about the VM it serves; fixed for the daemon's life.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    pub endpoints: Vec<EndpointId>,
    pub boot_bypass: bool,
    pub rules: Rules,
    pub mode: Mode,
    /// The most the vring thread keeps watching the ring for the next request after answering
    /// one, before it goes back to waiting for a kick (0: never). The window itself adapts
    /// between 50 µs and this cap (or 128 times the recent per-request service time, if lower)
    /// to the gaps the guest leaves (see `vhost::poll_window`).
    pub poll: std::time::Duration,
    /// Who may connect on the vhost-user socket (`vmm_uid`, `vmm_gid`; unset: anyone who can
    /// reach the socket file). Checked on every accepted connection before a byte is read.
    pub vmm: crate::peer::PeerPolicy,
    /// The request trace (`--trace`, or started on the control socket), if the daemon has one.
    pub trace: Option<Arc<crate::trace::Tracer>>,
    /// Where the state is kept for a daemon restarted after a crash (see `recovery`), if the
    /// service manager keeps fds for it.
    pub keeper: Option<Arc<crate::recovery::Keeper>>,
    /// The assigned devices' interrupts: after one, the vring thread polls for the request the
    /// guest's driver sends in response (`poll_after_irq`; see `irq_watch`).
    pub irq_watch: Option<Arc<crate::irq_watch::IrqWatch>>,
}

impl DeviceSettings {
    /// Settings for `endpoints` under `rules` in `mode`, the rest at their defaults: no boot
    /// bypass, the default polling cap, any VMM, no trace, no keeper, no interrupt watch.
    pub fn new(endpoints: Vec<EndpointId>, rules: Rules, mode: Mode) -> Self {
        DeviceSettings {
            endpoints,
            boot_bypass: false,
            rules,
            mode,
            poll: DEFAULT_POLL,
            vmm: Default::default(),
            trace: None,
            keeper: None,
            irq_watch: None,
        }
    }

    /// The request trace, while it is on.
    pub fn tracer(&self) -> Option<&crate::trace::Tracer> {
        self.trace.as_deref().filter(|t| t.is_on())
    }
}

/// Per-connection device state. One owner changes it (see `mailbox`): the vring thread while it
/// runs; every other thread posts an [`Event`].
struct Session {
    dispatcher: Dispatcher,
    mem: Option<Mem>,
    /// The current memory table as the domain model sees it (None before the first one).
    ram: Option<Arc<GuestRam>>,
    pending: PendingTable,
    probe_buf: Vec<u8>,
    request_vring: Option<VringRwLock>,
    /// The request ring was stopped (GET_VRING_BASE) at this position; see [`RingMark`].
    stopped: Option<RingMark>,
    limiter: LogLimiter,
    /// How long to watch the ring after an answer (adapts to the guest's gaps).
    window: PollWindow,
    /// When the last answer went out with nothing more to do and the window ran out: the next
    /// kick tells how long the guest's gap really was.
    quiet_since: Option<Instant>,
    /// How long to watch the ring after an assigned device's interrupt, per device slot.
    irq_windows: [IrqWindow; crate::irq_watch::SLOTS],
    /// The connection as last kept for a restarted daemon (see `recovery`).
    kept: Option<crate::recovery::KeptConnection>,
    /// After a restart: the requests to answer (or skip) as the previous daemon recorded them
    /// when they are popped again, by avail position.
    answers: std::collections::BTreeMap<u16, crate::recovery::Answer>,
    /// After a restart, until the request ring is served: where it goes on.
    ring_at: Option<(u16, u16)>,
}

struct Inner {
    /// Written when request processing yields after its budget; brings the vring thread back.
    rewake: EventFd,
    /// Guest memory as the rings and requests see it: the memory table in force (empty before
    /// the first); only the owner replaces it.
    mem: Mem,
    settings: DeviceSettings,
    backend: Arc<dyn DmaBackend>,
    metrics: Arc<Metrics>,
    /// The device state. Only its owner locks it (the vring thread, or the poster when none
    /// runs; see `mailbox`): the lock is never contended while a vring thread runs.
    session: Mutex<Session>,
    /// Events for the owner.
    mailbox: Mailbox<Event>,
    /// The features the driver acknowledged (written by the vhost-user thread).
    acked_features: AtomicU64,
    /// `bypass` as last published by the owner (config-space reads).
    bypass: AtomicBool,
    /// The memory table's guest RAM as last published by the owner (vfio-user DMA checks).
    ram: Mutex<Option<Arc<GuestRam>>>,
}

/// The virtio-iommu vhost-user device for one connection.
#[derive(Clone)]
pub struct IommuDevice(Arc<Inner>);

fn lock(m: &Mutex<Session>) -> MutexGuard<'_, Session> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IommuDevice {
    pub fn new(
        settings: DeviceSettings,
        backend: Arc<dyn DmaBackend>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        let dispatcher = Dispatcher::new(
            settings.mode,
            settings.rules.clone(),
            backend.clone(),
            &settings.endpoints,
            settings.boot_bypass,
            Arc::new(GuestRam::default()),
        )?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // The ceiling of the polling window in force: the configured one, except in pipeline
        // mode without a core for every spinning thread, where polling would only steal the
        // executors' time.
        let poll = match settings.mode {
            // With one CPU the guest's vCPU and this thread share it: polling would only delay
            // the very request it waits for.
            _ if cores < 2 => std::time::Duration::ZERO,
            Mode::Pipeline(n) if crate::pipeline::spin_window(n).is_zero() => {
                std::time::Duration::ZERO
            }
            _ => settings.poll,
        };
        let session = Session {
            dispatcher,
            mem: None,
            ram: None,
            pending: PendingTable::new(QUEUE_CAPACITY),
            probe_buf: vec![0; settings.rules.probe_size as usize],
            request_vring: None,
            stopped: None,
            limiter: LogLimiter {
                window: Instant::now(),
                count: 0,
                suppressed: 0,
            },
            window: PollWindow::new(poll),
            quiet_since: None,
            irq_windows: [IrqWindow::default(); crate::irq_watch::SLOTS],
            kept: None,
            answers: Default::default(),
            ring_at: None,
        };
        let settings_bypass = settings.boot_bypass;
        Ok(IommuDevice(Arc::new(Inner {
            rewake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            settings,
            backend,
            metrics,
            session: Mutex::new(session),
            mailbox: Mailbox::new()?,
            acked_features: AtomicU64::new(0),
            bypass: AtomicBool::new(settings_bypass),
            ram: Mutex::new(None),
        })))
    }

    /// The eventfds to register with the vring thread's epoll, with their event tokens: the
    /// rewake eventfd, the mailbox and, in pipeline mode, the executors' completion eventfd.
    /// Once they are registered, call [`IommuDevice::owner_started`].
    pub fn event_fds(&self) -> Vec<(i32, u16)> {
        let mut v = vec![
            (self.0.rewake.as_raw_fd(), REWAKE_EVENT),
            (self.0.mailbox.fd(), MAILBOX_EVENT),
        ];
        if let Some(e) = lock(&self.0.session).dispatcher.completion_event() {
            v.push((e.as_raw_fd(), COMPLETION_EVENT));
        }
        if let Some(w) = &self.0.settings.irq_watch {
            v.push((w.fd(), IRQ_EVENT));
        }
        v
    }

    /// The connection ended (its vring thread is gone): every endpoint goes back to its boot
    /// state, every domain is destroyed and `bypass` returns to its initial value (a system
    /// reset, §5.13.4).
    pub fn disconnect(&self) {
        self.owner_stopped();
        let mut s = lock(&self.0.session);
        s.dispatcher.wait_idle();
        s.dispatcher.completed().for_each(drop);
        s.dispatcher.reset(self.0.settings.boot_bypass);
        // The VM's memory is gone with the VMM: nothing may stay pinned for it (the identity
        // domain held all of it), and a boot-bypass endpoint must not reach stale pages.
        let empty = Arc::new(GuestRam::default());
        if let Err(e) = self.0.backend.set_ram(&empty) {
            log::error!("cannot release the guest's memory from the backend: {e}");
        }
        s.dispatcher.set_ram(empty);
        s.request_vring = None;
        s.mem = None;
        s.ram = None;
        self.0
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(GuestMemoryMmap::new());
        self.publish(&s);
    }

    /// The request trace, while it is on.
    pub fn trace(&self) -> Option<&crate::trace::Tracer> {
        self.0.settings.tracer()
    }

    /// Guest memory as the connection's rings see it (the memory table in force).
    pub fn memory(&self) -> Mem {
        self.0.mem.clone()
    }

    fn config(&self, bypass: bool) -> Config {
        let r = &self.0.settings.rules;
        Config {
            page_size_mask: !r.granule_mask,
            input_start: r.input_range.start(),
            input_end: r.input_range.end(),
            domain_start: r.domain_range.0,
            domain_end: r.domain_range.1,
            probe_size: r.probe_size,
            bypass: u8::from(bypass),
        }
    }

    /// Device reset: nothing attached, no domain left; `bypass` keeps its value.
    fn reset(&self, s: &mut Session) {
        self.drain_ring(s);
        let bypass = s.dispatcher.bypass();
        s.dispatcher.reset(bypass);
        info!("device reset: all endpoints detached, all domains destroyed");
    }
}

/// A memory table the backend refused, as the vhost-user layer carries it: the errno's kind with
/// the backend's whole message (`io::Error::from_raw_os_error` alone would keep only the errno).
fn memory_table_error(e: crate::backend::BackendError) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e)
}

/// Checks a memory table built from the VMM's file descriptors and converts it into the domain
/// model's view of guest RAM (the memory table's rules, for other descriptions of the same RAM).
pub(crate) fn describe_ram(mem: &GuestMemoryMmap) -> Result<GuestRam, String> {
    check_backing(mem)?;
    guest_ram(mem)
}

/// What the VMM's vhost-user messages ask of the device (see `Connection`).
impl IommuDevice {
    /// The virtio and vhost-user features the device offers.
    pub fn features() -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | features::INPUT_RANGE
            | features::DOMAIN_RANGE
            | features::MAP_UNMAP
            | features::PROBE
            | features::BYPASS_CONFIG
    }

    /// The vhost-user protocol features the device offers.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Release);
    }

    fn reset_device(&self) {
        self.call(Event::Reset);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bypass = self.0.bypass.load(Ordering::Acquire);
        let bytes = self.config(bypass).to_bytes();
        // vhost-user config messages carry at most 256 bytes; never allocate what the VMM asks
        // beyond that.
        let size = size.min(256) as usize;
        (offset as usize..offset as usize + size)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let at = Config::BYPASS_OFFSET;
        let offset = offset as usize;
        if offset > at || offset + buf.len() <= at || offset + buf.len() > CONFIG_SIZE {
            // Every other field is read-only for the driver (§5.13.4.1): ignore the write.
            return Ok(());
        }
        if self.0.acked_features.load(Ordering::Acquire) & features::BYPASS_CONFIG == 0 {
            warn!("driver wrote bypass without negotiating BYPASS_CONFIG; ignored");
            return Ok(());
        }
        // Bits 1-7 carry nothing (§5.13.4.1).
        let bypass = buf[at - offset] & 1 != 0;
        match self.call(|r| Event::Bypass(bypass, r)) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                warn!("cannot apply bypass={bypass}: {e}");
                Err(io::Error::from_raw_os_error(e.errno))
            }
            None => Err(owner_gone()),
        }
    }

    /// A new memory table from the VMM: checked against its files, then handed to the owner,
    /// which answers what is in flight through the old one and then switches. A refused table
    /// changes nothing.
    pub fn set_memory_table(&self, table: GuestMemoryMmap) -> io::Result<()> {
        let ram = match describe_ram(&table) {
            Ok(ram) => Arc::new(ram),
            Err(e) => {
                warn!("memory table refused: {e}");
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
            }
        };
        debug!("memory table: {} regions", ram.regions().len());
        match self.call(|r| Event::MemoryTable(table, ram, r)) {
            Some(Ok(())) => Ok(()),
            // Keep the backend's text (e.g. which RLIMIT_MEMLOCK pinning this table needs): the
            // refused table ends the connection, and this error is what the daemon then logs.
            Some(Err(e)) => Err(memory_table_error(e)),
            None => Err(owner_gone()),
        }
    }

    /// GET_VRING_BASE of the request queue: what is in flight is answered, and the ring's
    /// position kept to tell a resume from a reset.
    fn stop_ring(&self) -> io::Result<()> {
        self.call(Event::StopRing).ok_or_else(owner_gone)
    }

    /// One event of the vring thread's epoll set.
    fn handle(&self, device_event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        match device_event as usize {
            REQUEST_QUEUE => self.process_requests(&vrings[REQUEST_QUEUE], Wake::Kick),
            // Event-queue buffers stay available until there is a fault to report.
            EVENT_QUEUE => Ok(()),
            _ if device_event == COMPLETION_EVENT => {
                self.process_completions();
                Ok(())
            }
            _ if device_event == REWAKE_EVENT => {
                let _ = self.0.rewake.read();
                self.process_requests(&vrings[REQUEST_QUEUE], Wake::Kick)
            }
            _ if device_event == IRQ_EVENT => {
                let fired = self.0.settings.irq_watch.as_ref().map_or(0, |w| w.drain());
                self.process_requests(&vrings[REQUEST_QUEUE], Wake::Interrupt(fired))
            }
            _ if device_event == MAILBOX_EVENT => {
                self.take_mail();
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
