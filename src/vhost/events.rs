//! The device state's owner side: the events other threads post (see `mailbox`), how the
//! vring thread applies them, and what it publishes for readers that do not ask.

use super::*;

/// The answer to an [`Event`], sent back by the owner.
type Reply<T> = SyncSender<T>;

/// What another thread asks of the device state's owner (see `mailbox`): everything that changes
/// the state, and the queries that must see it whole.
pub(super) enum Event {
    /// The VMM closed the endpoint's device connection, or the host unplugs the device.
    EndpointGone(EndpointId, Reply<()>),
    /// Guest RAM as the vfio-user DMA maps describe it (boot bypass, before the memory table).
    BootRam(GuestRam, Reply<Result<bool, BackendError>>),
    /// A checked memory table, with the domain model's view of it.
    MemoryTable(
        GuestMemoryMmap,
        Arc<GuestRam>,
        Reply<Result<(), BackendError>>,
    ),
    /// The driver wrote `bypass`.
    Bypass(bool, Reply<Result<(), BackendError>>),
    /// RESET_DEVICE.
    Reset(Reply<()>),
    /// GET_VRING_BASE of the request queue.
    StopRing(Reply<()>),
    /// The connection's rings pass to a new connection (handover): what is in flight is
    /// answered and the device forgets the ring objects, keeping everything else.
    ReleaseRings(Reply<()>),
    /// A memory table the backend already serves (handover): installed without a backend call.
    AdoptTable(GuestMemoryMmap, Arc<GuestRam>, Reply<()>),
    /// Rebuild the domains, attachments and mappings a previous daemon handed over.
    Restore(DeviceState, Reply<Result<(), String>>),
    /// The connection as a restarted daemon is to find it (None: it ended); a checkpoint
    /// follows (see `recovery`).
    Keep(Option<crate::recovery::KeptConnection>, Reply<()>),
    /// After a restart, once the checkpoint's state is rebuilt: the changes recorded since, to
    /// replay, and the answers to give when their requests are popped again.
    Recovered(Box<Recovered>, Reply<Result<usize, String>>),
    /// Domains with every mapping (the control socket's `state`).
    Snapshot(Reply<(Vec<DomainView>, Vec<EndpointView>)>),
    /// Domains with their counts only (gauges).
    Summary(Reply<(Vec<DomainSummary>, Vec<EndpointView>)>),
}

/// A restarted daemon's first look at its state (see [`IommuDevice::recovered`]).
pub struct Recovered {
    /// Each with the host object its record names (see `journal::Record::hw`).
    pub effects: Vec<(Request, u32)>,
    pub answers: std::collections::BTreeMap<u16, crate::recovery::Answer>,
    /// The connection as kept, and where its request ring goes on (next avail, next used).
    pub kept: Option<crate::recovery::KeptConnection>,
    pub request_ring: Option<(u16, u16)>,
}

/// The device state's owner dropped an event without answering it (it failed while applying it).
pub(super) fn owner_gone() -> io::Error {
    io::Error::other("the device state's owner failed")
}

/// Hands the device state back to the posters if the owner thread unwinds.
pub(super) struct OwnerWatch<'a>(pub(super) &'a IommuDevice);

impl Drop for OwnerWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.owner_stopped();
        }
    }
}

impl IommuDevice {
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
    pub(super) fn call<T>(&self, event: impl FnOnce(Reply<T>) -> Event) -> Option<T> {
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

    /// Hands the rings to a new connection (see `handover`): returns once nothing is in flight
    /// and the device no longer refers to the old ring objects.
    pub fn release_rings(&self) -> io::Result<()> {
        self.call(Event::ReleaseRings).ok_or_else(owner_gone)
    }

    /// Installs a memory table the backend already serves (a handed-over connection's).
    pub fn adopt_memory_table(&self, table: GuestMemoryMmap) -> io::Result<()> {
        let ram =
            describe_ram(&table).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.call(|r| Event::AdoptTable(table, Arc::new(ram), r))
            .ok_or_else(owner_gone)
    }

    /// Where the state is kept for a restarted daemon, if anywhere (see `recovery`).
    pub fn keeper(&self) -> Option<&Arc<crate::recovery::Keeper>> {
        self.0.settings.keeper.as_ref()
    }

    /// Makes `kept` (None: no connection any more) the connection a restarted daemon finds,
    /// with the device state as it is now; returns once that is written.
    pub fn keep(&self, kept: Option<crate::recovery::KeptConnection>) {
        self.call(|r| Event::Keep(kept, r));
    }

    /// After a restart, with the kept state rebuilt: replays the changes recorded since and
    /// installs the answers to give when their requests are popped again (before the rings are
    /// served); how many changes.
    pub fn recovered(&self, r: Recovered) -> Result<usize, String> {
        self.call(|reply| Event::Recovered(Box::new(r), reply))
            .unwrap_or_else(|| Err(owner_gone().to_string()))
    }

    /// Makes the vring thread look at the request ring once (kicks may have been missed).
    pub fn rewake(&self) {
        if let Err(e) = self.0.rewake.write(1) {
            warn!("cannot wake the vring thread: {e}");
        }
    }

    /// The device state as a handover carries it: `bypass`, every domain with its mappings, and
    /// where each endpoint is attached.
    pub fn device_state(&self) -> DeviceState {
        let (domains, endpoints) = self.snapshot();
        DeviceState {
            bypass: self.0.bypass.load(Ordering::Acquire),
            domains,
            endpoints,
        }
    }

    /// Rebuilds a handed-over device state in this (fresh) device, whose memory table is in
    /// place: `bypass`, then per domain an ATTACH of its first endpoint, its MAPs and the ATTACH
    /// of the others, through the domain model and the backend like the guest's own requests.
    pub fn restore(&self, state: DeviceState) -> Result<(), String> {
        self.call(|r| Event::Restore(state, r))
            .unwrap_or_else(|| Err(owner_gone().to_string()))
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
                self.checkpoint(s);
                self.answer(s, r, ());
            }
            Event::BootRam(ram, r) => {
                let res = if s.ram.is_some() {
                    Ok(false)
                } else {
                    self.0.backend.set_ram(&ram).map(|()| true)
                };
                self.answer(s, r, res);
            }
            Event::MemoryTable(table, ram, r) => {
                let res = self.switch_memory(s, table, ram);
                self.answer(s, r, res);
            }
            Event::Bypass(bypass, r) => {
                self.drain_ring(s);
                let res = s.dispatcher.set_bypass(bypass);
                self.checkpoint(s);
                self.answer(s, r, res);
            }
            Event::Reset(r) => {
                self.reset(s);
                s.answers.clear();
                self.checkpoint(s);
                self.answer(s, r, ());
            }
            Event::StopRing(r) => {
                self.drain_ring(s);
                if let Some(v) = s.request_vring.clone() {
                    let mem = s.mem.as_ref().map(|m| m.memory());
                    s.stopped = Some(RingMark::of(&v, mem.as_deref()));
                }
                self.answer(s, r, ());
            }
            Event::ReleaseRings(r) => {
                self.drain_ring(s);
                s.request_vring = None;
                s.stopped = None;
                self.answer(s, r, ());
            }
            Event::AdoptTable(table, ram, r) => {
                self.install_table(s, table, ram);
                self.answer(s, r, ());
            }
            Event::Restore(state, r) => {
                let res = self.restore_state(s, &state);
                self.answer(s, r, res);
            }
            Event::Keep(kept, r) => {
                s.kept = kept;
                self.checkpoint(s);
                self.answer(s, r, ());
            }
            Event::Recovered(rec, r) => {
                let rec = *rec;
                let res = self.replay_recorded(s, rec.effects);
                s.answers = rec.answers;
                s.kept = rec.kept;
                s.ring_at = rec.request_ring;
                self.checkpoint(s);
                self.answer(s, r, res);
            }
            Event::Snapshot(r) => {
                let v = s.dispatcher.snapshot();
                self.answer(s, r, v);
            }
            Event::Summary(r) => {
                let v = s.dispatcher.summary();
                self.answer(s, r, v);
            }
        }
    }

    fn restore_state(&self, s: &mut Session, state: &DeviceState) -> Result<(), String> {
        if s.dispatcher.has_state() {
            return Err("the device already has domains".into());
        }
        // Host domains that outlived the previous daemon are taken over, not made again; the
        // replay below then only rebuilds the domain model around them.
        let adopted: Vec<(crate::ids::DomainId, crate::backend::HwDomainState)> = state
            .domains
            .iter()
            .filter_map(|d| Some((crate::ids::DomainId(d.id), d.hw.clone()?)))
            .collect();
        let n_adopted = adopted.len();
        self.0
            .backend
            .adopt_domains(adopted)
            .map_err(|e| format!("taking over the host domains: {e}"))?;
        let replayed = self.replay_state(s, state);
        self.0.backend.adoption_done(replayed.is_ok());
        let n = replayed?;
        info!(
            "device state rebuilt: {} domains ({n_adopted} taken over from the host), {n} \
             requests, bypass {}",
            state.domains.len(),
            state.bypass
        );
        Ok(())
    }

    /// `restore_state`'s replay: bypass, then per domain the ATTACH of its first endpoint, its
    /// MAPs and the ATTACH of the others; the number of requests.
    fn replay_state(&self, s: &mut Session, state: &DeviceState) -> Result<usize, String> {
        use crate::domains::DomainKind;
        use crate::protocol::{MAP_F_READ, MAP_F_WRITE};
        s.dispatcher
            .set_bypass(state.bypass)
            .map_err(|e| format!("bypass: {e}"))?;
        let mut requests = Vec::new();
        for d in &state.domains {
            let attached: Vec<u32> = state
                .endpoints
                .iter()
                .filter(|e| e.domain == Some(d.id))
                .map(|e| e.id)
                .collect();
            let attach = |ep: u32| match d.kind {
                DomainKind::Bypass => Request::attach_bypass(d.id, ep),
                DomainKind::Paging => Request::attach(d.id, ep),
            };
            let Some((first, rest)) = attached.split_first() else {
                // No endpoint: the domain was going away with its last detach.
                continue;
            };
            requests.push(attach(*first));
            for m in &d.mappings {
                let flags =
                    if m.read { MAP_F_READ } else { 0 } | if m.write { MAP_F_WRITE } else { 0 };
                requests.push(Request::map(d.id, m.start, m.end, m.gpa, flags));
            }
            requests.extend(rest.iter().map(|&ep| attach(ep)));
        }
        self.replay(s, requests)
            .map_err(|e| format!("rebuilding the device state: {e}"))
    }

    /// Makes the device state as it is now, with the connection last kept, what a restarted
    /// daemon starts from (see `recovery`); nothing is in flight afterwards.
    pub(super) fn checkpoint(&self, s: &mut Session) {
        let Some(k) = self.0.settings.keeper.as_deref() else {
            return;
        };
        self.drain_ring(s);
        let (domains, endpoints) = s.dispatcher.snapshot();
        let request_ring = match &s.request_vring {
            Some(v) => {
                let g = v.get_ref();
                let q = g.get_queue();
                Some((q.next_avail(), q.next_used()))
            }
            // Not served yet after a restart: where it will go on.
            None => s.ring_at,
        };
        let c = crate::recovery::Checkpoint {
            version: crate::recovery::CHECKPOINT_VERSION,
            connection: s.kept.clone(),
            device: DeviceState {
                bypass: s.dispatcher.bypass(),
                domains,
                endpoints,
            },
            request_ring,
            answers: s.answers.values().copied().collect(),
            counters: self.0.metrics.export(),
        };
        log::debug!(
            "checkpoint: ring {:?}, {} answers, connection {}",
            c.request_ring,
            c.answers.len(),
            c.connection.is_some()
        );
        if let Err(e) = k.checkpoint(&c) {
            log::error!("{e}: a crash now would lose the VM's IOMMU state");
        }
    }

    /// Replays a crash's recorded changes: the backend takes them as done in the host, and a
    /// domain an ATTACH made after the checkpoint is the host object its record names.
    fn replay_recorded(
        &self,
        s: &mut Session,
        effects: Vec<(Request, u32)>,
    ) -> Result<usize, String> {
        let backend = &self.0.backend;
        backend
            .replay_recorded()
            .map_err(|e| format!("replaying the recorded changes: {e}"))?;
        // In batches; an ATTACH whose domain the model lacks ends one, so that the IOAS its
        // record names is adopted before the ATTACH claims it.
        let replay_all = || -> Result<usize, String> {
            let mut n = 0;
            let mut batch = Vec::new();
            for (req, hw) in effects {
                if let Request::Attach { domain, .. } = req
                    && hw != 0
                {
                    n += self.replay(s, std::mem::take(&mut batch))?;
                    if !s.dispatcher.summary().0.iter().any(|d| d.id == domain.0) {
                        let state = crate::backend::HwDomainState {
                            id: hw,
                            ..Default::default()
                        };
                        backend
                            .adopt_domains(vec![(domain, state)])
                            .map_err(|e| format!("{req:?}: {e}"))?;
                    }
                }
                batch.push(req);
            }
            Ok(n + self.replay(s, batch)?)
        };
        let res = replay_all();
        backend.adoption_done(res.is_ok());
        if res.is_ok() {
            // Expected after a crash: what a request in flight at the kill left half done.
            for f in backend.reconcile() {
                match f {
                    Ok(fixed) => info!("crash restart: {fixed}"),
                    Err(e) => log::error!("crash restart: {e}"),
                }
            }
        }
        res
    }

    /// Executes requests that succeeded before (a handed-over state's, or the changes a
    /// previous daemon recorded), in order, through the domain model and the backend; how many.
    fn replay(&self, s: &mut Session, effects: Vec<Request>) -> Result<usize, String> {
        let n = effects.len();
        let mut failed = Vec::new();
        for (token, req) in effects.into_iter().enumerate() {
            let what = format!("{req:?}");
            if let crate::pipeline::Submitted::Done(Err(r)) =
                s.dispatcher.submit(req, token as u64, &mut [])
            {
                failed.push(format!("{what}: {}", r.reason));
            }
            failed.extend(
                s.dispatcher
                    .completed()
                    .filter_map(|(t, o)| o.err().map(|r| format!("request {t}: {}", r.reason))),
            );
        }
        s.dispatcher.wait_idle();
        failed.extend(
            s.dispatcher
                .completed()
                .filter_map(|(t, o)| o.err().map(|r| format!("request {t}: {}", r.reason))),
        );
        if failed.is_empty() {
            Ok(n)
        } else {
            Err(format!(
                "{} of {n} requests failed: {}",
                failed.len(),
                failed.join("; ")
            ))
        }
    }

    /// Answers an event once what it changed is published: the poster may act on the answer
    /// at once (the VMM reads the config space right after writing `bypass`).
    fn answer<T>(&self, s: &Session, r: Reply<T>, value: T) {
        self.publish(s);
        let _ = r.send(value);
    }

    /// Makes what other threads read without the owner (config space, DMA checks) current.
    pub(super) fn publish(&self, s: &Session) {
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
    pub(super) fn take_mail(&self) {
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
    pub(super) fn drain_ring(&self, s: &mut Session) {
        if let Some(v) = s.request_vring.clone() {
            let mem = s.mem.as_ref().map(|m| m.memory());
            drain(s, mem.as_deref(), &v, self.sinks());
        }
    }

    /// A new memory table: requests in flight were checked against the old one and run with it,
    /// so they are answered first (the pipeline's contract), their tails written through the
    /// old table they were read from; then the backend, the executors and the rings switch.
    fn switch_memory(
        &self,
        s: &mut Session,
        table: GuestMemoryMmap,
        ram: Arc<GuestRam>,
    ) -> Result<(), BackendError> {
        self.drain_ring(s);
        self.0.backend.set_ram(&ram)?;
        self.install_table(s, table, ram);
        Ok(())
    }

    /// The domain model, the rings and the requests use `table` (whose RAM is `ram`) from now
    /// on; the backend already serves it.
    fn install_table(&self, s: &mut Session, table: GuestMemoryMmap, ram: Arc<GuestRam>) {
        s.dispatcher.set_ram(ram.clone());
        s.ram = Some(ram);
        self.0
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(table);
        s.mem = Some(self.0.mem.clone());
    }
}
