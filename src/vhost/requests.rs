//! The request path: pop a chain, copy it out once, decode, hand it to the dispatcher, write
//! the tail, notify the guest (the polling between batches is in `polling`).

use super::polling::poll_for_work;
use super::*;

/// How long the vring thread serves requests in one go before it lets control messages in.
const BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(2);

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
pub(super) struct RingMark {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    /// The used-ring element the device wrote last (id and length), as guest memory holds it.
    last_used: Option<[u8; 8]>,
}

impl RingMark {
    pub(super) fn of(vring: &VringRwLock, mem: Option<&GuestMemoryMmap>) -> RingMark {
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
pub(super) struct Answerer<'a> {
    mem: &'a GuestMemoryMmap,
    pending: &'a mut PendingTable,
    vring: &'a VringRwLock,
    metrics: &'a Metrics,
    limiter: &'a mut LogLimiter,
    trace: Option<&'a crate::trace::Tracer>,
    /// Where answers are recorded for a restarted daemon (see `recovery`), if anywhere.
    keeper: Option<&'a crate::recovery::Keeper>,
    /// Something was added to the used ring since the guest was last notified.
    pub(super) used: bool,
}

/// Where answers leave their traces besides the ring: the counters, the request trace (while
/// it is on) and the keeper of a restarted daemon's state (see `recovery`), if any.
#[derive(Clone, Copy)]
pub(super) struct Sinks<'a> {
    pub(super) metrics: &'a Metrics,
    pub(super) trace: Option<&'a crate::trace::Tracer>,
    pub(super) keeper: Option<&'a crate::recovery::Keeper>,
}

impl IommuDevice {
    pub(super) fn sinks(&self) -> Sinks<'_> {
        Sinks {
            metrics: &self.0.metrics,
            trace: self.0.settings.tracer(),
            keeper: self.0.settings.keeper.as_deref(),
        }
    }
}

impl<'a> Answerer<'a> {
    pub(super) fn new(
        mem: &'a GuestMemoryMmap,
        vring: &'a VringRwLock,
        pending: &'a mut PendingTable,
        limiter: &'a mut LogLimiter,
        sinks: Sinks<'a>,
    ) -> Self {
        Answerer {
            mem,
            pending,
            vring,
            metrics: sinks.metrics,
            limiter,
            trace: sinks.trace,
            keeper: sinks.keeper,
            used: false,
        }
    }
}

impl Answerer<'_> {
    /// Publishes the answer to the chain at `avail` (head `head`): `len` bytes written, `status`
    /// in the tail, `effect` the state change it made. The record comes first: a daemon killed
    /// after it knows the answer whether or not the guest saw it.
    fn answer(&mut self, avail: u16, head: u16, len: u32, status: Status, effect: Option<Request>) {
        if let Some(k) = self.keeper {
            let used = self.vring.get_ref().get_queue().next_used();
            let r = crate::journal::Record {
                avail,
                used,
                head,
                len,
                status: status as u8,
                effect,
                hw: 0,
            };
            if !k.record(&r) {
                log::error!("crash journal full: the answer to chain {head} is not recorded");
            }
        }
        self.used(head, len);
    }

    /// Gives the chain at `avail` back unused (nothing written, INVAL for the record): a chain
    /// that holds no request. Counted in `counter`; `why` is logged (rate-limited).
    fn refuse(
        &mut self,
        avail: u16,
        head: u16,
        counter: &std::sync::atomic::AtomicU64,
        why: std::fmt::Arguments<'_>,
    ) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.limiter.allow() {
            warn!("request chain {head}: {why}");
        }
        self.answer(avail, head, 0, Status::Inval, None);
    }

    fn used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.vring.add_used(head, len) {
            warn!("cannot add used descriptor {head}: {e}");
        }
        self.used = true;
    }

    pub(super) fn complete(&mut self, (token, outcome): Completion) {
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
        let latency_ns = p.started.elapsed().as_nanos() as u64;
        self.metrics.record(p.kind, status, latency_ns);
        if let Some(t) = self.trace {
            let reason = outcome.as_ref().err().map(|r| r.reason.to_string());
            t.request(p.head, &p.req, status, reason.as_deref(), latency_ns);
        }
        let len = if ok {
            p.tail_offset as u32 + TAIL_SIZE as u32
        } else {
            0
        };
        let changes = matches!(
            p.kind,
            RequestType::Map | RequestType::Unmap | RequestType::Attach | RequestType::Detach
        );
        let effect = (status == Status::Ok && changes).then_some(p.req);
        self.answer(p.avail, p.head, len, status, effect);
    }
}

fn unwritable() -> crate::domains::Rejection {
    crate::domains::Rejection::internal(crate::domains::Internal::Unwritable)
}

/// Completes everything in flight (ring stop, reset).
pub(super) fn drain(
    s: &mut Session,
    mem: Option<&GuestMemoryMmap>,
    vring: &VringRwLock,
    sinks: Sinks<'_>,
) {
    let Some(mem) = mem else {
        // Nowhere to write their tails: the requests are dropped with the ring.
        s.dispatcher.wait_idle();
        s.dispatcher.completed().for_each(drop);
        return;
    };
    let mut a = Answerer::new(mem, vring, &mut s.pending, &mut s.limiter, sinks);
    s.dispatcher.wait_idle();
    s.dispatcher.completed().for_each(|c| a.complete(c));
    if a.used {
        signal(vring);
    }
}

/// Publishes again an answer a previous daemon recorded and did not publish: the tail with its
/// status where it wrote it (the last four bytes of what it reported written), then the used
/// element. A PROBE's properties are not rewritten: its record was made after they were, and the
/// guest cannot have changed a buffer it has not got back.
fn answer_again(
    a: &mut Answerer<'_>,
    mem: &GuestMemoryMmap,
    avail: u16,
    head: u16,
    ans: &crate::recovery::Answer,
    chain: &Chain,
) {
    let status = Status::from_u8(ans.status).unwrap_or(Status::DevErr);
    let len = match chain {
        Chain::Request { writable, .. } if ans.len >= TAIL_SIZE as u32 => {
            let at = u64::from(ans.len) - TAIL_SIZE as u64;
            if writable.write(mem, at, &encode_tail(status)) {
                ans.len
            } else {
                0
            }
        }
        _ => 0,
    };
    a.answer(avail, head, len, status, None);
}

/// Failed guest notifications (the VMM's call fd decides how often).
static SIGNAL_FAILURES: crate::log_limit::EveryNth = crate::log_limit::EveryNth::new();

pub(super) fn signal(vring: &VringRwLock) {
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

/// What woke the vring thread to look at the request ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wake {
    /// The guest kicked, or the thread comes back after yielding.
    Kick,
    /// Assigned devices raised interrupts (a bit per device, see `irq_watch`): the guest's
    /// driver may answer with a request; poll for it a while.
    Interrupt(crate::irq_watch::Fired),
}

impl IommuDevice {
    pub(super) fn process_requests(&self, vring: &VringRwLock, wake: Wake) -> io::Result<()> {
        // A ring that is not started (not set up yet, or stopped) is not served: its addresses
        // mean nothing, and nothing may be read or written through them.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let mut guard = lock(&self.0.session);
        let s = &mut *guard;
        if s.request_vring.is_none() {
            s.request_vring = Some(vring.clone());
            s.ring_at = None;
            // Served from here on: a restarted daemon starts from this position.
            self.checkpoint(s);
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
        if let Wake::Interrupt(fired) = wake
            && !self.poll_after_interrupt(s, vring, &mem, fired)?
        {
            return Ok(());
        }
        if let Some(quiet) = s.quiet_since.take() {
            s.window.missed(quiet.elapsed());
            metrics
                .wakeups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let probe_size = u64::from(self.0.settings.rules.probe_size);
        let keeper = self.0.settings.keeper.as_deref();
        if keeper.is_some_and(|k| k.low()) {
            // Room for every request in flight and a batch more, or a checkpoint first.
            self.checkpoint(s);
        }
        let Session {
            dispatcher,
            pending,
            probe_buf,
            limiter,
            window,
            quiet_since,
            answers,
            ..
        } = s;
        let sinks = self.sinks();
        let trace = sinks.trace;
        let mut a = Answerer::new(&mem, vring, pending, limiter, sinks);
        let started = Instant::now();
        loop {
            // A guest that never stops sending must not keep the device to itself: after a
            // budget, or as soon as another thread posted an event (a vhost-user message, a
            // device connection that closed, a query), let the epoll loop deliver it and come
            // back through the rewake eventfd.
            if started.elapsed() >= BATCH_BUDGET
                || self.0.mailbox.has_mail()
                || keeper.is_some_and(|k| k.low())
            {
                if let Err(e) = self.0.rewake.write(1) {
                    warn!("cannot rearm the request queue: {e}");
                } else {
                    break;
                }
            }
            vring.disable_notification().map_err(io::Error::other)?;
            // Interrupts that came before this batch are answered by it, or need no answer:
            // only those after it may start a poll (stale ones would teach the devices' windows
            // that their interrupts bring nothing).
            if let Some(w) = &self.0.settings.irq_watch {
                w.drain();
            }
            // Requests served in this batch and when it began: the machine's speed, for the
            // polling window's ceiling.
            let batch = Instant::now();
            let mut served = 0u32;
            loop {
                if a.pending.is_full() {
                    dispatcher.wait_idle();
                    dispatcher.completed().for_each(|c| a.complete(c));
                }
                let (avail, chain) = {
                    let mut g = vring.get_mut();
                    let q = g.get_queue_mut();
                    (q.next_avail(), q.pop_descriptor_chain(mem.clone()))
                };
                let Some(chain) = chain else { break };
                served += 1;
                let head = chain.head_index();
                let chain = read_chain(&mem, chain);
                // Popped again after a restart: answered (or skipped) as the dead daemon
                // recorded, not executed again (see `recovery`).
                if let Some(ans) = answers.remove(&avail) {
                    if !ans.published {
                        answer_again(&mut a, &mem, avail, head, &ans, &chain);
                    }
                    continue;
                }
                let (bytes, len, writable) = match chain {
                    Chain::Unusable(why) => {
                        let why = format_args!("returned unused: {why}");
                        a.refuse(avail, head, &metrics.malformed, why);
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
                        let why = format_args!("unknown request type {t}");
                        a.refuse(avail, head, &metrics.unknown_type, why);
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
                        let len = if ok { TAIL_SIZE as u32 } else { 0 };
                        a.answer(avail, head, len, Status::Inval, None);
                        continue;
                    }
                };
                let kind = req.kind();
                debug!("chain {head}: {req:?}");
                // A PROBE's properties fill the device-writable part up to probe_size, and the
                // tail follows them: in the last four bytes of a buffer with less room (the
                // domain model answers such a PROBE with INVAL and no property, §5.13.6.6.1).
                let room = if kind == RequestType::Probe {
                    (writable.total - TAIL_SIZE as u64).min(probe_size)
                } else {
                    0
                };
                let tail_offset = room;
                let p = Pending {
                    avail,
                    head,
                    kind,
                    req,
                    writable,
                    tail_offset,
                    started,
                };
                let Some(token) = a.pending.insert(p) else {
                    // Cannot happen: the table was drained above when full.
                    a.answer(avail, head, 0, Status::DevErr, None);
                    continue;
                };
                let probe_out = &mut probe_buf[..room as usize];
                let submitted = dispatcher.submit(req, token, probe_out);
                // Earlier requests a barrier (ATTACH, DETACH) waited for are answered first.
                dispatcher.completed().for_each(|c| a.complete(c));
                match submitted {
                    Submitted::Queued => {}
                    Submitted::Done(outcome) => {
                        if kind == RequestType::Probe
                            && outcome.is_ok()
                            && !writable.write(&mem, 0, probe_out)
                        {
                            a.complete((token, Err(unwritable())));
                            continue;
                        }
                        a.complete((token, outcome));
                    }
                }
            }
            dispatcher.poll();
            dispatcher.completed().for_each(|c| a.complete(c));
            // The guest busy-waits for its answer: let it see it now, then watch the ring for
            // its next request for a short window (kicks stay suppressed meanwhile), which
            // saves both the guest's kick and our wake-up when requests come back to back.
            if a.used {
                signal(vring);
                a.used = false;
            }
            let answered = Instant::now();
            metrics.record_batch(served);
            if served > 0 {
                window.served((answered - batch) / served);
            }
            // After the answers: a large teardown's memory goes back to the system.
            dispatcher.give_back_memory();
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
        if let Some(t) = trace {
            t.flush();
        }
        Ok(())
    }

    pub(super) fn process_completions(&self) {
        let mut guard = lock(&self.0.session);
        let s = &mut *guard;
        let (Some(v), Some(mem)) = (s.request_vring.clone(), s.mem.as_ref().map(|m| m.memory()))
        else {
            return;
        };
        let mut a = Answerer::new(&mem, &v, &mut s.pending, &mut s.limiter, self.sinks());
        s.dispatcher.poll();
        s.dispatcher.completed().for_each(|c| a.complete(c));
        if a.used {
            signal(&v);
        }
        if let Some(t) = self.0.settings.tracer() {
            t.flush();
        }
    }
}
