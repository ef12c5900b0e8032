//! The vhost-user glue: the virtio-iommu device as the VMM sees it, and the request virtqueue.
//!
//! This module owns the conversation with the VMM (features, config space, memory table, reset)
//! and the guest's descriptor chains. It copies each request out of guest memory exactly once,
//! into a fixed buffer, before anything looks at it; it writes tails and PROBE replies only into
//! device-writable descriptors that lie inside guest RAM. It never interprets a request: that is
//! the domain model's job, reached through the [`Dispatcher`].
//!
//! The device state has one owner, the vring thread: the vhost-user message thread and every
//! other thread post [`Event`]s to its mailbox (see `mailbox`) and wait for the answer.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
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
mod mailbox;
mod memory;
mod poll_window;

use chain::{Chain, LogLimiter, Pending, PendingTable, read_chain};
use mailbox::Mailbox;
use memory::{check_backing, file_identity, guest_ram};
use poll_window::PollWindow;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Event token of the executors' completion eventfd (0, 1 are the queues, 2 the exit event).
pub const COMPLETION_EVENT: u16 = 3;
/// Event token of the eventfd that resumes request processing after a budget ran out.
pub const REWAKE_EVENT: u16 = 4;
/// Event token of the mailbox: other threads posted events for the device state's owner.
pub const MAILBOX_EVENT: u16 = 5;
/// How long the vring thread serves requests in one go before it lets control messages in.
const BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(2);
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
}

/// Where the request ring stood when the VMM stopped it, to tell a resume from a reset.
///
/// QEMU stops and restarts the rings the same way (GET_VRING_BASE, then SET_FEATURES and
/// SET_VRING_*) for a VM pause and for a guest's device reset, and sends no reset message for a
/// generic vhost-user device (`vhost_dev_stop` serves both). What differs is the ring: a resume
/// hands back the very ring that stopped (same size and addresses, the avail index that
/// GET_VRING_BASE returned, the used entries the device wrote still in place), while a driver can
/// only hand the device new rings after a device reset (virtio 1.2 §3.1.1, §2.7: queue setup
/// happens before DRIVER_OK), and its ring memory starts zeroed. So a restart onto anything but
/// the ring as it stopped is a reset; the value of an index on its own means nothing (the avail
/// index is 0 again after every 65,536 requests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingMark {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    /// The used-ring element the device wrote last (id and length), as guest memory holds it.
    last_used: Option<[u8; 8]>,
}

impl RingMark {
    fn of(vring: &VringRwLock, mem: Option<&GuestMemoryMmap>) -> RingMark {
        let g = vring.get_ref();
        let q = g.get_queue();
        let last_used = mem.zip(q.next_used().wrapping_sub(1).checked_rem(q.size()));
        let last_used = last_used.and_then(|(mem, slot)| {
            // struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[]; }
            let at = q.used_ring().checked_add(4 + 8 * u64::from(slot))?;
            mem.read_obj::<[u8; 8]>(vm_memory::GuestAddress(at)).ok()
        });
        RingMark {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
            last_used,
        }
    }
}

/// Everything `complete` needs besides the dispatcher, so both can be borrowed at once.
struct Answerer<'a> {
    mem: &'a GuestMemoryMmap,
    pending: &'a mut PendingTable,
    vring: &'a VringRwLock,
    metrics: &'a Metrics,
    limiter: &'a mut LogLimiter,
    used: bool,
}

impl Answerer<'_> {
    fn used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.vring.add_used(head, len) {
            warn!("cannot add used descriptor {head}: {e}");
        }
        self.used = true;
    }

    fn complete(&mut self, (token, outcome): Completion) {
        let Some(p) = self.pending.take(token) else {
            warn!("completion for unknown token {token}");
            return;
        };
        let status = status_of(&outcome);
        log::trace!("chain {}: {} -> {status:?}", p.head, p.kind.name());
        if let Err(crate::domains::Rejection {
            reason: crate::domains::Reason::Backend(_),
            ..
        }) = &outcome
        {
            self.metrics
                .backend_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(r) = &outcome
            && self.limiter.allow()
        {
            warn!(
                "guest {} request failed with {:?}: {}",
                p.kind.name(),
                r.status,
                r.reason
            );
        }
        let ok = p
            .writable
            .write(self.mem, p.tail_offset, &encode_tail(status));
        self.metrics
            .record(p.kind, status, p.started.elapsed().as_nanos() as u64);
        let len = if ok {
            p.tail_offset as u32 + TAIL_SIZE as u32
        } else {
            0
        };
        self.used(p.head, len);
    }
}

/// The answer to an [`Event`], sent back by the owner.
type Reply<T> = SyncSender<T>;

/// What another thread asks of the device state's owner (see `mailbox`): everything that changes
/// the state, and the queries that must see it whole.
enum Event {
    /// The VMM closed the endpoint's device connection, or the host unplugs the device.
    EndpointGone(EndpointId, Reply<()>),
    /// Guest RAM as the vfio-user DMA maps describe it (boot bypass, before the memory table).
    BootRam(GuestRam, Reply<Result<bool, BackendError>>),
    /// A checked memory table, with the domain model's view of it.
    MemoryTable(Mem, Arc<GuestRam>, Reply<Result<(), BackendError>>),
    /// The driver wrote `bypass`.
    Bypass(bool, Reply<Result<(), BackendError>>),
    /// RESET_DEVICE.
    Reset(Reply<()>),
    /// GET_VRING_BASE of the request queue.
    StopRing(Reply<()>),
    /// Domains with every mapping (the control socket's `state`).
    Snapshot(Reply<(Vec<DomainView>, Vec<EndpointView>)>),
    /// Domains with their counts only (gauges).
    Summary(Reply<(Vec<DomainSummary>, Vec<EndpointView>)>),
}

struct Inner {
    /// Written when request processing yields after its budget; brings the vring thread back.
    rewake: EventFd,
    /// Exit-event fds handed to the vring library, which leaks them (see `exit_event`).
    exit_fds: Mutex<Vec<(i32, (u64, u64))>>,
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
    /// The last memory table `update_memory` accepted (empty before the first). Outside the
    /// session lock: a refusal must put it back without waiting for the vring thread.
    accepted: Mutex<Arc<GuestMemoryMmap>>,
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
        };
        let settings_bypass = settings.boot_bypass;
        Ok(IommuDevice(Arc::new(Inner {
            rewake: EventFd::new(EFD_NONBLOCK)?,
            exit_fds: Mutex::new(Vec::new()),
            settings,
            backend,
            metrics,
            session: Mutex::new(session),
            mailbox: Mailbox::new()?,
            acked_features: AtomicU64::new(0),
            bypass: AtomicBool::new(settings_bypass),
            ram: Mutex::new(None),
            accepted: Mutex::new(Arc::new(GuestMemoryMmap::new())),
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
        v
    }

    /// The connection's vring thread runs, with [`IommuDevice::event_fds`] in its epoll set: it
    /// owns the device state from now on, and other threads reach it through the mailbox.
    pub fn owner_started(&self) {
        self.0.mailbox.start();
    }

    /// The vring thread is gone (or never came): events it did not take are applied here, and
    /// later ones by whoever posts them.
    pub fn owner_stopped(&self) {
        let left = self.0.mailbox.stop();
        if !left.is_empty() {
            let mut s = lock(&self.0.session);
            for e in left {
                self.apply(&mut s, e);
            }
        }
    }

    /// Hands `event` to the owner and waits for its answer; None if the owner dropped it
    /// (it failed while applying it).
    fn call<T>(&self, event: impl FnOnce(Reply<T>) -> Event) -> Option<T> {
        let (tx, rx) = sync_channel(1);
        if let Err(e) = self.0.mailbox.post(event(tx)) {
            let mut s = lock(&self.0.session);
            self.apply(&mut s, e);
        }
        rx.recv().ok()
    }

    /// Current domains with every mapping, and endpoints (the state dump; tests). It copies
    /// every mapping: for gauges use [`IommuDevice::summary`].
    pub fn snapshot(&self) -> (Vec<DomainView>, Vec<EndpointView>) {
        self.call(Event::Snapshot).unwrap_or_default()
    }

    /// Current domains with their counts, and endpoints: no mapping is copied.
    pub fn summary(&self) -> (Vec<DomainSummary>, Vec<EndpointView>) {
        self.call(Event::Summary).unwrap_or_default()
    }

    /// The VMM closed an endpoint's device connection (vfio-user), or the host is taking the
    /// device away: the endpoint is detached and left blocked (or identity under bypass) until
    /// the guest attaches it again. Returns once that is done.
    pub fn endpoint_disconnected(&self, endpoint: EndpointId) {
        self.call(|r| Event::EndpointGone(endpoint, r));
    }

    /// Guest RAM as the VMM's vfio-user DMA maps describe it (see `boot_ram`): the identity
    /// domain follows it until the memory table arrives, so that boot-bypass endpoints reach
    /// guest RAM while the firmware runs. Ignored (`Ok(false)`) once the connection has a memory
    /// table.
    pub fn set_boot_ram(&self, ram: &GuestRam) -> Result<bool, BackendError> {
        self.call(|r| Event::BootRam(ram.clone(), r))
            .unwrap_or(Ok(false))
    }

    /// The guest RAM of the current connection's memory table, once the VMM has sent one.
    pub fn guest_ram(&self) -> Option<Arc<GuestRam>> {
        self.0.ram.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies one event to the state (the owner only).
    fn apply(&self, s: &mut Session, event: Event) {
        match event {
            Event::EndpointGone(endpoint, r) => {
                self.drain_ring(s);
                match s.dispatcher.unplug(endpoint) {
                    Ok(()) => info!("{endpoint}: device connection closed, endpoint detached"),
                    Err(e) => log::error!(
                        "{endpoint}: cannot block after its device connection closed: {e}"
                    ),
                }
                let _ = r.send(());
            }
            Event::BootRam(ram, r) => {
                let res = if s.ram.is_some() {
                    Ok(false)
                } else {
                    self.0.backend.set_ram(&ram).map(|()| true)
                };
                let _ = r.send(res);
            }
            Event::MemoryTable(mem, ram, r) => {
                let _ = r.send(self.switch_memory(s, mem, ram));
            }
            Event::Bypass(bypass, r) => {
                let _ = r.send(s.dispatcher.set_bypass(bypass));
            }
            Event::Reset(r) => {
                self.reset(s);
                let _ = r.send(());
            }
            Event::StopRing(r) => {
                if let Some(v) = s.request_vring.clone() {
                    let mem = s.mem.as_ref().map(|m| m.memory());
                    drain(s, mem.as_deref(), &v, &self.0.metrics);
                    s.stopped = Some(RingMark::of(&v, mem.as_deref()));
                }
                let _ = r.send(());
            }
            Event::Snapshot(r) => {
                let _ = r.send(s.dispatcher.snapshot());
            }
            Event::Summary(r) => {
                let _ = r.send(s.dispatcher.summary());
            }
        }
        self.publish(s);
    }

    /// Makes what other threads read without the owner (config space, DMA checks) current.
    fn publish(&self, s: &Session) {
        self.0
            .bypass
            .store(s.dispatcher.bypass(), Ordering::Release);
        let mut ram = self.0.ram.lock().unwrap_or_else(|p| p.into_inner());
        if !ram
            .as_ref()
            .zip(s.ram.as_ref())
            .is_some_and(|(a, b)| Arc::ptr_eq(a, b))
        {
            *ram = s.ram.clone();
        }
    }

    /// The owner: applies what other threads posted.
    fn take_mail(&self) {
        let events = self.0.mailbox.take();
        if events.is_empty() {
            return;
        }
        let mut s = lock(&self.0.session);
        for e in events {
            self.apply(&mut s, e);
        }
    }

    /// Answers every request in flight (before the state they were checked against changes).
    fn drain_ring(&self, s: &mut Session) {
        if let Some(v) = s.request_vring.clone() {
            let mem = s.mem.as_ref().map(|m| m.memory());
            drain(s, mem.as_deref(), &v, &self.0.metrics);
        }
    }

    /// A new memory table: requests in flight were checked against the old one and run with it,
    /// so they are answered first (the pipeline's contract), their tails written through the
    /// old table they were read from; then the backend and the executors switch.
    fn switch_memory(
        &self,
        s: &mut Session,
        mem: Mem,
        ram: Arc<GuestRam>,
    ) -> Result<(), BackendError> {
        if let Some(v) = s.request_vring.clone() {
            let old = self
                .0
                .accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            drain(s, Some(&old), &v, &self.0.metrics);
        }
        self.0.backend.set_ram(&ram)?;
        s.dispatcher.set_ram(ram.clone());
        s.ram = Some(ram);
        *self.0.accepted.lock().unwrap_or_else(|p| p.into_inner()) = mem.memory().into_inner();
        s.mem = Some(mem);
        Ok(())
    }

    /// The connection ended (its vring thread is gone): every endpoint goes back to its boot
    /// state, every domain is destroyed and `bypass` returns to its initial value (a system
    /// reset, §5.13.4).
    pub fn disconnect(&self) {
        self.owner_stopped();
        let mut s = lock(&self.0.session);
        s.dispatcher.wait_idle(&mut |_| {});
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
        *self.0.accepted.lock().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(GuestMemoryMmap::new());
        self.publish(&s);
    }

    /// Closes the exit-event fds the vring library took and never closed. Call only after the
    /// connection's `VhostUserDaemon` (and with it its epoll threads) is gone.
    pub fn release_exit_events(&self) {
        let fds = std::mem::take(&mut *self.0.exit_fds.lock().unwrap_or_else(|p| p.into_inner()));
        for (fd, id) in fds {
            // Only if the number still names the very eventfd we created: if the library had
            // closed it, the number may now belong to someone else.
            if file_identity(fd) == Some(id) {
                // SAFETY: `fd` is the eventfd created in `exit_event`, whose ownership the vring
                // library dropped with `into_raw_fd()`; nothing else refers to it any more.
                unsafe { libc::close(fd) };
            }
        }
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

    /// The vhost-user library installs a table in the memory every vring uses before it asks
    /// `update_memory`; a refused one is swapped back for the last accepted one at once, so that
    /// nothing reads or writes guest memory through it until the connection closes.
    fn restore_accepted_table(&self, mem: &Mem) {
        let accepted =
            GuestMemoryMmap::clone(&self.0.accepted.lock().unwrap_or_else(|p| p.into_inner()));
        mem.lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(accepted);
    }

    /// Device reset: nothing attached, no domain left; `bypass` keeps its value.
    fn reset(&self, s: &mut Session) {
        self.drain_ring(s);
        let bypass = s.dispatcher.bypass();
        s.dispatcher.reset(bypass);
        info!("device reset: all endpoints detached, all domains destroyed");
    }

    fn process_requests(&self, vring: &VringRwLock) -> io::Result<()> {
        let mut guard = lock(&self.0.session);
        let s = &mut *guard;
        if s.request_vring.is_none() {
            s.request_vring = Some(vring.clone());
        }
        if let Some(mark) = s.stopped.take() {
            let mem = s.mem.as_ref().map(|m| m.memory());
            let now = RingMark::of(vring, mem.as_deref());
            if now != mark && s.dispatcher.has_state() {
                debug!("request ring restarted at {now:?}, stopped at {mark:?}");
                self.reset(s);
            }
        }
        let Some(mem) = s.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let metrics = &*self.0.metrics;
        if let Some(quiet) = s.quiet_since.take() {
            s.window.missed(quiet.elapsed());
            metrics
                .wakeups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let probe_size = u64::from(self.0.settings.rules.probe_size);
        let Session {
            dispatcher,
            pending,
            probe_buf,
            limiter,
            window,
            quiet_since,
            ..
        } = s;
        let mut a = Answerer {
            mem: &mem,
            pending,
            vring,
            metrics,
            limiter,
            used: false,
        };
        let started = Instant::now();
        loop {
            // A guest that never stops sending must not keep the device to itself: after a
            // budget, or as soon as another thread posted an event (a vhost-user message, a
            // device connection that closed, a query), let the epoll loop deliver it and come
            // back through the rewake eventfd.
            if started.elapsed() >= BATCH_BUDGET || self.0.mailbox.has_mail() {
                if let Err(e) = self.0.rewake.write(1) {
                    warn!("cannot rearm the request queue: {e}");
                } else {
                    break;
                }
            }
            vring.disable_notification().map_err(io::Error::other)?;
            // Requests served in this batch and when it began: the machine's speed, for the
            // polling window's ceiling.
            let batch = Instant::now();
            let mut served = 0u32;
            loop {
                if a.pending.is_full() {
                    dispatcher.wait_idle(&mut |c| a.complete(c));
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                served += 1;
                let head = chain.head_index();
                let (bytes, len, writable) = match read_chain(&mem, chain) {
                    Chain::Unusable(why) => {
                        metrics
                            .malformed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if a.limiter.allow() {
                            warn!("request chain {head} returned unused: {why}");
                        }
                        a.used(head, 0);
                        continue;
                    }
                    Chain::Request {
                        bytes,
                        len,
                        writable,
                    } => (bytes, len, writable),
                };
                let started = Instant::now();
                let req = match Request::decode(&bytes[..len]) {
                    Ok(r) => r,
                    Err(DecodeError::UnknownType(t)) => {
                        metrics
                            .unknown_type
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if a.limiter.allow() {
                            warn!("request chain {head}: unknown request type {t}");
                        }
                        a.used(head, 0);
                        continue;
                    }
                    Err(e) => {
                        if a.limiter.allow() {
                            warn!("request chain {head}: {e}");
                        }
                        let kind = Request::peek_type(&bytes[..len]).ok();
                        let ok = writable.write(&mem, 0, &encode_tail(Status::Inval));
                        if let Some(kind) = kind {
                            metrics.record(kind, Status::Inval, 0);
                        }
                        a.used(head, if ok { TAIL_SIZE as u32 } else { 0 });
                        continue;
                    }
                };
                let kind = req.kind();
                debug!("chain {head}: {req:?}");
                // The tail follows the properties in a PROBE; a buffer too small for them gets
                // INVAL in its last four bytes and no property (§5.13.6.6.1).
                let (tail_offset, short_probe) = if kind == RequestType::Probe {
                    if writable.total >= probe_size + TAIL_SIZE as u64 {
                        (probe_size, false)
                    } else {
                        (writable.total - TAIL_SIZE as u64, true)
                    }
                } else {
                    (0, false)
                };
                let p = Pending {
                    head,
                    kind,
                    writable,
                    tail_offset,
                    started,
                };
                let Some(token) = a.pending.insert(p) else {
                    // Cannot happen: the table was drained above when full.
                    a.used(head, 0);
                    continue;
                };
                if short_probe {
                    a.complete((
                        token,
                        Err(crate::domains::Rejection {
                            status: Status::Inval,
                            reason: crate::domains::Reason::ProbeTooSmall,
                        }),
                    ));
                    continue;
                }
                match dispatcher.submit(req, token, probe_buf, &mut |c| a.complete(c)) {
                    Submitted::Queued => {}
                    Submitted::Done(outcome) => {
                        if kind == RequestType::Probe
                            && outcome.is_ok()
                            && !writable.write(&mem, 0, probe_buf)
                        {
                            a.complete((token, Err(unwritable())));
                            continue;
                        }
                        a.complete((token, outcome));
                    }
                }
            }
            dispatcher.poll(&mut |c| a.complete(c));
            // The guest busy-waits for its answer: let it see it now, then watch the ring for
            // its next request for a short window (kicks stay suppressed meanwhile), which
            // saves both the guest's kick and our wake-up when requests come back to back.
            if a.used {
                signal(vring);
                a.used = false;
            }
            let answered = Instant::now();
            if served > 0 {
                window.served((answered - batch) / served);
            }
            if poll_for_work(
                window.current(),
                vring,
                &mem,
                dispatcher,
                &mut a,
                &self.0.mailbox,
            ) {
                metrics
                    .poll_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                *quiet_since = Some(answered);
                break;
            }
        }
        if a.used {
            signal(vring);
        }
        Ok(())
    }

    fn process_completions(&self) {
        let mut guard = lock(&self.0.session);
        let s = &mut *guard;
        let (Some(v), Some(mem)) = (s.request_vring.clone(), s.mem.as_ref().map(|m| m.memory()))
        else {
            return;
        };
        let mut a = Answerer {
            mem: &mem,
            pending: &mut s.pending,
            vring: &v,
            metrics: &self.0.metrics,
            limiter: &mut s.limiter,
            used: false,
        };
        s.dispatcher.poll(&mut |c| a.complete(c));
        if a.used {
            signal(&v);
        }
    }
}

/// A memory table the backend refused, as the vhost-user layer carries it: the errno's kind with
/// the backend's whole message (`io::Error::from_raw_os_error` alone would keep only the errno).
fn memory_table_error(e: crate::backend::BackendError) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(e.errno).kind(), e)
}

/// The device state's owner dropped an event without answering it (it failed while applying it).
fn owner_gone() -> io::Error {
    io::Error::other("the device state's owner failed")
}

fn unwritable() -> crate::domains::Rejection {
    crate::domains::Rejection {
        status: Status::DevErr,
        reason: crate::domains::Reason::Unwritable,
    }
}

/// Completes everything in flight (ring stop, reset).
fn drain(s: &mut Session, mem: Option<&GuestMemoryMmap>, vring: &VringRwLock, metrics: &Metrics) {
    let Some(mem) = mem else {
        s.dispatcher.wait_idle(&mut |_| {});
        return;
    };
    let mut a = Answerer {
        mem,
        pending: &mut s.pending,
        vring,
        metrics,
        limiter: &mut s.limiter,
        used: false,
    };
    s.dispatcher.wait_idle(&mut |c| a.complete(c));
    if a.used {
        signal(vring);
    }
}

/// Spins for up to `window` until the guest adds a request or an executor completes one;
/// true if there is new work on the ring.
fn poll_for_work(
    window: std::time::Duration,
    vring: &VringRwLock,
    mem: &MemGuard,
    dispatcher: &mut Dispatcher,
    a: &mut Answerer<'_>,
    mailbox: &Mailbox<Event>,
) -> bool {
    if window.is_zero() && dispatcher.in_flight() == 0 {
        return false;
    }
    let start = Instant::now();
    loop {
        if dispatcher.in_flight() > 0 {
            dispatcher.poll(&mut |c| a.complete(c));
            if a.used {
                signal(vring);
                a.used = false;
            }
        }
        let pending = {
            let g = vring.get_ref();
            let q = g.get_queue();
            q.avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
                .map(|i| i.0 != q.next_avail())
                .unwrap_or(false)
        };
        if pending {
            return true;
        }
        // Other threads' events must not wait out the window.
        if start.elapsed() >= window || mailbox.has_mail() {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Checks a memory table built from the VMM's file descriptors and converts it into the domain
/// model's view of guest RAM (the memory table's rules, for other descriptions of the same RAM).
pub(crate) fn describe_ram(mem: &GuestMemoryMmap) -> Result<GuestRam, String> {
    check_backing(mem)?;
    guest_ram(mem)
}

/// Failed guest notifications (the VMM's call fd decides how often).
static SIGNAL_FAILURES: crate::log_limit::EveryNth = crate::log_limit::EveryNth::new();

fn signal(vring: &VringRwLock) {
    if let Ok(false) = vring.needs_notification() {
        return;
    }
    // The call fd is the VMM's: a blocking one that is full (an eventfd at its maximum, a pipe
    // nobody reads) would stop this thread in write(2) with the session held, and with it the
    // device, the control socket and shutdown. Make it non-blocking first: a full one then fails
    // with EAGAIN (and the guest has a notification pending anyway).
    if let Some(call) = vring.get_ref().get_call() {
        make_nonblocking(call.as_raw_fd());
    }
    if let Err(e) = vring.signal_used_queue()
        && SIGNAL_FAILURES.allow()
    {
        warn!(
            "cannot notify the guest ({} failures so far): {e}",
            SIGNAL_FAILURES.seen()
        );
    }
}

/// Sets O_NONBLOCK on `fd` if it is not set yet (the VMM's eventfds usually have it already).
fn make_nonblocking(fd: i32) {
    // SAFETY: F_GETFL only reads the status flags of an fd we hold; a bad fd returns -1.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL changes only the status flags of the same fd.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
}

impl VhostUserBackend for IommuDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
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

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.call(Event::Reset);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vring library applies EVENT_IDX to the queues itself; notification suppression in
        // `process_requests` works either way.
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

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let table = mem.memory();
        let ram = match check_backing(&table).and_then(|()| guest_ram(&table)) {
            Ok(ram) => Arc::new(ram),
            Err(e) => {
                warn!("memory table refused: {e}");
                self.restore_accepted_table(&mem);
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
            }
        };
        debug!("memory table: {} regions", ram.regions().len());
        match self.call(|r| Event::MemoryTable(mem.clone(), ram, r)) {
            Some(Ok(())) => Ok(()),
            // Keep the backend's text (e.g. which RLIMIT_MEMLOCK pinning this table needs): the
            // refused table ends the connection, and this error is what the daemon then logs.
            Some(Err(e)) => {
                self.restore_accepted_table(&mem);
                Err(memory_table_error(e))
            }
            None => {
                self.restore_accepted_table(&mem);
                Err(owner_gone())
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        // vhost-user-backend 0.24 registers the consumer with `into_raw_fd()` and never closes
        // it: remember it so `release_exit_events` can, once the connection's threads are gone.
        if let Some(id) = file_identity(consumer.as_raw_fd()) {
            self.0
                .exit_fds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((consumer.as_raw_fd(), id));
        }
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index as usize != REQUEST_QUEUE {
            return Ok(());
        }
        self.call(Event::StopRing).ok_or_else(owner_gone)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // This thread owns the device state: if it fails or panics, posters must not wait for
        // it any longer (the vring library ends the thread on an error).
        let watch = OwnerWatch(self);
        let r = self.handle(device_event, vrings);
        if r.is_err() {
            self.owner_stopped();
        }
        drop(watch);
        r
    }
}

/// Hands the device state back to the posters if the owner thread unwinds.
struct OwnerWatch<'a>(&'a IommuDevice);

impl Drop for OwnerWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.owner_stopped();
        }
    }
}

impl IommuDevice {
    fn handle(&self, device_event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        match device_event as usize {
            REQUEST_QUEUE => self.process_requests(&vrings[REQUEST_QUEUE]),
            // Event-queue buffers stay available until there is a fault to report.
            EVENT_QUEUE => Ok(()),
            _ if device_event == COMPLETION_EVENT => {
                self.process_completions();
                Ok(())
            }
            _ if device_event == REWAKE_EVENT => {
                let _ = self.0.rewake.read();
                self.process_requests(&vrings[REQUEST_QUEUE])
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
mod tests {
    use super::*;
    use crate::backend::fault::{FaultyBackend, Injector, Op};
    use crate::backend::soft::SoftBackend;

    /// One endpoint (1), soft-backend rules, inline, no polling.
    fn inline_settings() -> DeviceSettings {
        DeviceSettings {
            endpoints: vec![EndpointId(1)],
            boot_bypass: false,
            rules: crate::bench::daemon::soft_rules(crate::domains::Limits::default()),
            mode: Mode::Inline,
            poll: std::time::Duration::ZERO,
        }
    }

    fn file_table(regions: &[(u64, u64, u64)]) -> GuestMemoryMmap {
        // (gpa, file size, mapped size)
        let regions = regions
            .iter()
            .map(|&(gpa, file_size, size)| {
                let file = crate::testing::unlinked_file(file_size);
                let m = vm_memory::MmapRegion::from_file(
                    vm_memory::FileOffset::new(file, 0),
                    size as usize,
                )
                .unwrap();
                vm_memory::GuestRegionMmap::new(m, vm_memory::GuestAddress(gpa)).unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    }

    #[test]
    fn a_table_past_the_end_of_a_file_is_refused_and_the_last_accepted_one_put_back() {
        let settings = inline_settings();
        let backend = Arc::new(SoftBackend::new(&[EndpointId(1)], false));
        let dev = IommuDevice::new(settings, backend, Arc::new(Metrics::default())).unwrap();
        let mem = GuestMemoryAtomic::new(file_table(&[(0, 0x10_0000, 0x10_0000)]));
        dev.update_memory(mem.clone()).unwrap();
        // What the vhost-user library does with the next table: install it, then ask.
        mem.lock()
            .unwrap()
            .replace(file_table(&[(0, 0x10_0000, 0x20_0000)]));
        let err = dev.update_memory(mem.clone()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("past the end"), "{err}");
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let now = mem.memory();
        assert_eq!(now.num_regions(), 1);
        assert_eq!(
            now.iter().next().unwrap().len(),
            0x10_0000,
            "the accepted table is back"
        );
        assert_eq!(dev.guest_ram().unwrap().regions()[0].gpa.end(), 0xf_ffff);
    }

    #[test]
    fn a_refused_memory_table_keeps_the_backends_message() {
        let injector = Arc::new(Injector::default());
        let backend = Arc::new(FaultyBackend::new(
            SoftBackend::new(&[EndpointId(1)], false),
            injector.clone(),
        ));
        let settings = inline_settings();
        let dev = IommuDevice::new(settings, backend, Arc::new(Metrics::default())).unwrap();
        injector.fail(Op::SetRam, 0, 1, libc::ENOMEM);
        let err = dev
            .update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
        let text = err.to_string();
        assert!(
            text.contains("set_ram failed on injected: set ram"),
            "{text}"
        );
        assert!(text.contains("Cannot allocate memory"), "{text}");
        // Not applied: the next table goes through.
        assert!(dev.guest_ram().is_none());
        dev.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .unwrap();
        assert!(dev.guest_ram().is_some());
    }
}
