//! The command pipeline: who executes a request, on which thread, in what order.
//!
//! ```text
//!   vring thread (Dispatcher)                      executor threads (one DomainTable each)
//!   ─────────────────────────                      ────────────────────────────────────────
//!   pop chain → parse → Request
//!     MAP/UNMAP ── Work, by domain id % N ──────▶  shard k: validate + backend map/unmap
//!     ATTACH/DETACH: drain all in flight,          │
//!       then create/destroy via sync calls ────▶  │
//!     PROBE: answered here (endpoint data)        │
//!   completions ◀── bounded channel + eventfd ─── ┘ (one eventfd write per drained run)
//!   write tails, add_used, one notify per batch
//! ```
//!
//! A domain is owned by exactly one shard, so MAP/UNMAP run without locks and in order per
//! domain. ATTACH and DETACH change which domains exist and which endpoint reaches which; they
//! are full barriers: every request popped before them completes first, and nothing popped after
//! them starts until they are done, so cross-shard moves are ordered against both domains'
//! traffic. The Linux driver sends them synchronously anyway. In `Inline` mode the single shard
//! lives in the vring thread and everything runs there (QEMU's and Cloud Hypervisor's model).

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use log::error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::DmaBackend;
use crate::domains::{
    AttachTarget, DomainKind, DomainSummary, DomainTable, DomainView, EndpointView, Internal,
    Outcome, Rejection, Rules, Topology,
};
use crate::guest_ram::GuestRam;
use crate::ids::{DomainId, EndpointId};
use crate::protocol::{MapRequest, Request};

/// Where requests execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    /// In the vring thread.
    Inline,
    /// On `n` executor threads, domains sharded by id.
    Pipeline(usize),
}

/// A finished request: the caller's token and the outcome.
pub type Completion = (u64, Outcome);

enum Work {
    /// A MAP or UNMAP for the shard that owns its domain.
    Request(u64, Request),
    Create(DomainId, DomainKind),
    Destroy(DomainId),
    SetRam(Arc<GuestRam>),
    Clear,
    /// A read-only look at the shard's domains (state dumps, gauges).
    Query(Query),
}

type Query = Box<dyn FnOnce(&DomainTable) -> Box<dyn Any + Send> + Send>;

enum Reply {
    Created(Result<Option<u32>, Rejection>),
    Done,
    Query(Box<dyn Any + Send>),
}

fn execute(table: &mut DomainTable, w: Work) -> Result<Completion, Reply> {
    match w {
        Work::Request(token, req) => Ok((token, table.execute(&req))),
        Work::Create(d, k) => Err(Reply::Created(table.create(d, k))),
        Work::Destroy(d) => {
            table.destroy(d);
            Err(Reply::Done)
        }
        Work::SetRam(ram) => {
            table.set_ram(ram);
            Err(Reply::Done)
        }
        Work::Clear => {
            table.clear();
            Err(Reply::Done)
        }
        Work::Query(q) => Err(Reply::Query(q(table))),
    }
}

struct Worker {
    work: Sender<Work>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

struct Threads {
    workers: Vec<Worker>,
    spin: Duration,
    completions: Receiver<Completion>,
    wake: Arc<EventFd>,
    in_flight: usize,
}

enum Executors {
    Inline(DomainTable),
    Threads(Threads),
}

/// The capacity of every queue: more requests than a virtqueue can hold are never in flight.
pub const QUEUE_CAPACITY: usize = 1024;

impl Threads {
    fn spawn(n: usize, mut make: impl FnMut() -> DomainTable) -> std::io::Result<Self> {
        let spin = spin_window(n);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let (done_tx, completions) = bounded::<Completion>(QUEUE_CAPACITY);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (work, rx) = bounded::<Work>(QUEUE_CAPACITY);
            let (reply_tx, replies) = bounded::<Reply>(1);
            let mut table = make();
            let done_tx = done_tx.clone();
            let wake = wake.clone();
            let thread = std::thread::Builder::new()
                .name(format!("viommu-exec{i}"))
                .spawn(move || run_worker(&mut table, rx, done_tx, reply_tx, &wake, spin))?;
            workers.push(Worker {
                work,
                replies,
                thread: Some(thread),
            });
        }
        Ok(Threads {
            workers,
            spin,
            completions,
            wake,
            in_flight: 0,
        })
    }

    fn owner(&self, d: DomainId) -> usize {
        d.0 as usize % self.workers.len()
    }

    /// A synchronous call to one worker (only at barriers: nothing else is in flight there).
    fn call(&self, i: usize, w: Work) -> Reply {
        let worker = &self.workers[i];
        if worker.work.send(w).is_err() {
            error!("executor {i} is gone");
            return Reply::Done;
        }
        worker.replies.recv().unwrap_or(Reply::Done)
    }

    fn call_all(&self, mut w: impl FnMut() -> Work) -> Vec<Reply> {
        (0..self.workers.len()).map(|i| self.call(i, w())).collect()
    }
}

/// How long a thread spins on an empty channel before parking, when there are cores to spare:
/// a hand-off that arrives within it costs no futex wake-up (a park/unpark pair is tens of
/// microseconds on a busy host). Without spare cores spinning only steals the time of the
/// thread it waits for, so it is off (see [`spin_window`]).
const SPIN: Duration = Duration::from_micros(20);

/// The spin window for `executors` executor threads: `SPIN` if every spinning thread (the
/// executors, the vring thread and the guest vCPU it serves) can have a core, else zero.
pub fn spin_window(executors: usize) -> Duration {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= executors + 2 {
        SPIN
    } else {
        Duration::ZERO
    }
}

/// Receives from `rx`, spinning up to `spin` before blocking.
fn spin_then_recv<T>(rx: &Receiver<T>, spin: Duration) -> Result<T, crossbeam_channel::RecvError> {
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(crossbeam_channel::RecvError);
            }
            Err(crossbeam_channel::TryRecvError::Empty) if start.elapsed() < spin => {
                std::hint::spin_loop();
            }
            Err(crossbeam_channel::TryRecvError::Empty) => return rx.recv(),
        }
    }
}

fn run_worker(
    table: &mut DomainTable,
    rx: Receiver<Work>,
    done: Sender<Completion>,
    replies: Sender<Reply>,
    wake: &EventFd,
    spin: Duration,
) {
    while let Ok(first) = spin_then_recv(&rx, spin) {
        let mut next = Some(first);
        let mut completed = false;
        // Drain what is queued, then wake the dispatcher once for the whole run.
        while let Some(w) = next {
            match execute(table, w) {
                Ok(c) => {
                    // The channel holds QUEUE_CAPACITY: it cannot be full (see QUEUE_CAPACITY).
                    if done.send(c).is_err() {
                        return;
                    }
                    completed = true;
                }
                Err(r) => {
                    if replies.send(r).is_err() {
                        return;
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        if completed && let Err(e) = wake.write(1) {
            error!("cannot wake the vring thread: {e}");
        }
    }
    table.clear();
}

impl Drop for Threads {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Closing the work channel ends the worker, which destroys its domains.
            let (dead, _) = bounded(0);
            w.work = dead;
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Executors {
    /// Creates a domain on the shard that owns it; its backend id (None: bypass).
    fn create(&mut self, domain: DomainId, kind: DomainKind) -> Result<Option<u32>, Rejection> {
        match self {
            Executors::Inline(t) => t.create(domain, kind),
            Executors::Threads(th) => match th.call(th.owner(domain), Work::Create(domain, kind)) {
                Reply::Created(r) => r,
                _ => Err(Rejection::internal(Internal::ExecutorGone(domain))),
            },
        }
    }

    /// Destroys a domain on the shard that owns it.
    fn destroy(&mut self, domain: DomainId) {
        match self {
            Executors::Inline(t) => t.destroy(domain),
            Executors::Threads(th) => {
                th.call(th.owner(domain), Work::Destroy(domain));
            }
        }
    }
}

/// Routes requests to executors and owns the topology. Lives in the vring thread.
pub struct Dispatcher {
    topology: Topology,
    exec: Executors,
    /// Completions the executors delivered, until the caller takes them ([`Dispatcher::completed`]).
    ready: Vec<Completion>,
    /// Live mappings in every domain (the executors' shared count), and when to give the memory
    /// of freed ones back.
    live: Arc<AtomicUsize>,
    heap: crate::heap::HeapTrim,
}

/// What `submit` did with a request.
pub enum Submitted {
    /// Finished now.
    Done(Outcome),
    /// Queued on an executor: its completion comes through `poll`.
    Queued,
}

impl Dispatcher {
    pub fn new(
        mode: Mode,
        rules: Rules,
        backend: Arc<dyn DmaBackend>,
        endpoints: &[EndpointId],
        bypass: bool,
        ram: Arc<GuestRam>,
    ) -> std::io::Result<Self> {
        let rules = Arc::new(rules);
        let total = Arc::new(AtomicUsize::new(0));
        let make = || DomainTable::new(rules.clone(), backend.clone(), ram.clone(), total.clone());
        let exec = match mode {
            Mode::Inline => Executors::Inline(make()),
            Mode::Pipeline(n) => Executors::Threads(Threads::spawn(n.max(1), make)?),
        };
        Ok(Dispatcher {
            topology: Topology::new(rules, backend, endpoints, bypass),
            exec,
            ready: Vec::new(),
            live: total,
            heap: Default::default(),
        })
    }

    /// The eventfd that becomes readable when executors completed requests (pipeline mode).
    pub fn completion_event(&self) -> Option<&EventFd> {
        match &self.exec {
            Executors::Inline(_) => None,
            Executors::Threads(t) => Some(&t.wake),
        }
    }

    /// Starts one request. `probe_out` is the PROBE reply's properties area. Earlier requests
    /// that complete while a barrier waits for them are kept for [`Dispatcher::completed`].
    pub fn submit(&mut self, req: Request, token: u64, probe_out: &mut [u8]) -> Submitted {
        match req {
            Request::Map(MapRequest { domain, .. }) | Request::Unmap { domain, .. } => {
                self.route(domain, Work::Request(token, req))
            }
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => {
                self.wait_idle();
                Submitted::Done(self.attach(domain, endpoint, flags, reserved))
            }
            Request::Detach { domain, endpoint } => {
                self.wait_idle();
                Submitted::Done(
                    self.topology
                        .detach(domain, endpoint)
                        .map(|emptied| self.destroy_emptied(emptied)),
                )
            }
            Request::Probe { endpoint } => {
                Submitted::Done(self.topology.probe(endpoint, probe_out))
            }
        }
    }

    /// ATTACH: the topology decides, the owning shard creates the domain if needed, the
    /// topology points the endpoint at it; a domain left empty is destroyed.
    fn attach(
        &mut self,
        domain: DomainId,
        endpoint: EndpointId,
        flags: u32,
        reserved: [u8; 4],
    ) -> Outcome {
        let Some(plan) = self
            .topology
            .plan_attach(domain, endpoint, flags, reserved)?
        else {
            return Ok(());
        };
        let (hw, created) = match plan.target() {
            AttachTarget::Existing(hw) => (hw, false),
            AttachTarget::Create(d, kind) => (self.exec.create(d, kind)?, true),
        };
        match self.topology.attach(plan, hw) {
            Ok(emptied) => {
                self.destroy_emptied(emptied);
                Ok(())
            }
            Err(r) => {
                if created {
                    self.exec.destroy(domain);
                }
                Err(r)
            }
        }
    }

    fn destroy_emptied(&mut self, emptied: Option<DomainId>) {
        if let Some(d) = emptied {
            self.exec.destroy(d);
        }
    }

    fn route(&mut self, domain: DomainId, w: Work) -> Submitted {
        match &mut self.exec {
            Executors::Inline(t) => match execute(t, w) {
                Ok((_, o)) => Submitted::Done(o),
                // `route` only carries MAP and UNMAP, which always complete.
                Err(_) => Submitted::Done(Err(Rejection::internal(Internal::ExecutorGone(domain)))),
            },
            Executors::Threads(th) => {
                let i = th.owner(domain);
                if th.workers[i].work.send(w).is_err() {
                    error!("executor {i} is gone");
                    return Submitted::Done(Err(Rejection::internal(Internal::ExecutorGone(
                        domain,
                    ))));
                }
                th.in_flight += 1;
                Submitted::Queued
            }
        }
    }

    /// Collects the completions the executors have ready, without blocking.
    pub fn poll(&mut self) {
        if let Executors::Threads(th) = &mut self.exec {
            let _ = th.wake.read();
            while let Ok(c) = th.completions.try_recv() {
                th.in_flight -= 1;
                self.ready.push(c);
            }
        }
    }

    /// The completions collected so far (by `poll`, `wait_idle` and barriers), oldest first.
    pub fn completed(&mut self) -> std::vec::Drain<'_, Completion> {
        self.ready.drain(..)
    }

    /// Blocks until every queued request has completed, collecting each.
    pub fn wait_idle(&mut self) {
        if let Executors::Threads(th) = &mut self.exec {
            while th.in_flight > 0 {
                match spin_then_recv(&th.completions, th.spin) {
                    Ok(c) => {
                        th.in_flight -= 1;
                        self.ready.push(c);
                    }
                    Err(_) => {
                        error!(
                            "executors are gone with {} requests in flight",
                            th.in_flight
                        );
                        th.in_flight = 0;
                    }
                }
            }
            let _ = th.wake.read();
        }
    }

    pub fn in_flight(&self) -> usize {
        match &self.exec {
            Executors::Inline(_) => 0,
            Executors::Threads(th) => th.in_flight,
        }
    }

    /// The memory table changed. Call with nothing in flight.
    pub fn set_ram(&mut self, ram: Arc<GuestRam>) {
        match &mut self.exec {
            Executors::Inline(t) => {
                t.set_ram(ram);
            }
            Executors::Threads(th) => {
                th.call_all(|| Work::SetRam(ram.clone()));
            }
        }
    }

    /// Device reset: every endpoint unattached, every domain destroyed. Call with nothing in
    /// flight.
    pub fn reset(&mut self, bypass: bool) {
        for d in self.topology.reset(bypass) {
            self.exec.destroy(d);
        }
        match &mut self.exec {
            Executors::Inline(t) => t.clear(),
            Executors::Threads(th) => {
                th.call_all(|| Work::Clear);
            }
        }
        self.give_back_memory();
    }

    /// Gives the memory of freed mappings back to the system once many were freed (see
    /// [`crate::heap`]); returns whether it did. One atomic load when it does not: call after
    /// each batch.
    pub fn give_back_memory(&mut self) -> bool {
        self.heap.after(self.live.load(Ordering::Relaxed))
    }

    /// The VMM let go of an endpoint's device: detach it (see [`Topology::unplug`]). Call with
    /// nothing in flight.
    pub fn unplug(&mut self, endpoint: EndpointId) -> Result<(), crate::backend::BackendError> {
        let emptied = self.topology.unplug(endpoint)?;
        self.destroy_emptied(emptied);
        Ok(())
    }

    pub fn set_bypass(&mut self, bypass: bool) -> Result<(), crate::backend::BackendError> {
        self.topology.set_bypass(bypass)
    }

    pub fn bypass(&self) -> bool {
        self.topology.bypass()
    }

    /// Whether any domain exists (a reset would change something).
    pub fn has_state(&self) -> bool {
        self.topology.domain_count() > 0
    }

    /// Domains with their counts (no mapping copied), and endpoints with their attachments.
    pub fn summary(&mut self) -> (Vec<DomainSummary>, Vec<EndpointView>) {
        let mut domains = self.on_every_shard(DomainTable::summary);
        domains.sort_by_key(|d| d.id);
        (domains, self.topology.endpoints())
    }

    /// Domains with their mappings, and endpoints with their attachments.
    pub fn snapshot(&mut self) -> (Vec<DomainView>, Vec<EndpointView>) {
        let mut domains = self.on_every_shard(DomainTable::snapshot);
        domains.sort_by_key(|d| d.id);
        (domains, self.topology.endpoints())
    }

    /// Runs the read-only `f` on every shard's table and gathers what it returns.
    fn on_every_shard<T: Send + 'static>(&mut self, f: fn(&DomainTable) -> Vec<T>) -> Vec<T> {
        match &mut self.exec {
            Executors::Inline(t) => f(t),
            Executors::Threads(th) => th
                .call_all(|| Work::Query(Box::new(move |t| Box::new(f(t)))))
                .into_iter()
                .flat_map(|r| match r {
                    Reply::Query(v) => v.downcast::<Vec<T>>().map(|v| *v).unwrap_or_default(),
                    _ => Vec::new(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
