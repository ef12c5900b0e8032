//! A guest paging domain: one IOAS, its MAP/UNMAP and its teardown.

use super::*;

/// `HwDomain::unmap_all` one mapping at a time, where a mapping the kernel no longer has (a
/// failed batch may have removed some) counts as gone.
fn one_by_one(d: &mut IommufdDomain, mappings: &[IovaRange]) -> (usize, Option<BackendError>) {
    for (i, m) in mappings.iter().enumerate() {
        match d.unmap(*m) {
            Ok(()) => {}
            Err(e) if e.errno == libc::ENOENT => d.forget(*m),
            Err(e) => return (i, Some(e)),
        }
    }
    (mappings.len(), None)
}

/// A guest paging domain: one IOAS.
pub(super) struct IommufdDomain {
    id: u32,
    shared: Arc<Shared>,
    ram: Arc<GuestRam>,
    ram_gen: u64,
    /// Mappings without permissions: recorded, not given to the kernel (start → end).
    phantom: BTreeMap<u64, u64>,
    /// Bytes this IOAS pins (released at destroy).
    pinned: u64,
    /// Starts of the mappings made by `IOMMU_IOAS_COPY` (they pin nothing of their own).
    copied: HashSet<u64>,
    /// The guest domain it serves (for [`DmaBackend::host_id_of`]).
    guest: Option<DomainId>,
}

impl IommufdDomain {
    /// `IOMMU_IOAS_ALLOC`: a new, empty domain over the backend's current RAM table.
    pub(super) fn alloc(shared: &Arc<Shared>, guest: Option<DomainId>) -> Result<Self> {
        if shared.replaying.load(Ordering::Acquire) {
            // Everything replayed is in the kernel already: a domain comes from there too.
            return Err(BackendError::new(
                "replay",
                libc::ENOENT,
                format!(
                    "no IOAS was kept for guest domain {}",
                    guest.map_or("?".to_string(), |g| g.0.to_string())
                ),
            ));
        }
        let id = sys::ioas_alloc(shared.fd())
            .map_err(|e| BackendError::new(e.name, e.errno, "a paging domain"))?;
        lock(&shared.domains).insert(id, ());
        if let Some(g) = guest {
            lock(&shared.live).insert(g, id);
        }
        let ram_gen = shared.ram_gen.load(Ordering::Acquire);
        let ram = lock(&shared.ram).clone();
        debug!("IOAS {id} allocated");
        Ok(IommufdDomain {
            id,
            shared: shared.clone(),
            ram,
            ram_gen,
            phantom: BTreeMap::new(),
            pinned: 0,
            copied: HashSet::new(),
            guest,
        })
    }

    /// An IOAS the previous daemon handed over (`IommufdBackend::adopt_ioases` checked that it
    /// exists), with its mappings in the kernel.
    pub(super) fn adopt(shared: &Arc<Shared>, guest: DomainId, state: HwDomainState) -> Self {
        lock(&shared.domains).insert(state.id, ());
        lock(&shared.live).insert(guest, state.id);
        debug!("IOAS {} taken over", state.id);
        IommufdDomain {
            id: state.id,
            shared: shared.clone(),
            ram: lock(&shared.ram).clone(),
            ram_gen: shared.ram_gen.load(Ordering::Acquire),
            phantom: BTreeMap::new(),
            pinned: state.pinned,
            copied: state.copied.into_iter().collect(),
            guest: Some(guest),
        }
    }

    /// The backend's current RAM table; locks only when `set_ram` ran since the last call.
    fn current_ram(&mut self) -> Arc<GuestRam> {
        let g = self.shared.ram_gen.load(Ordering::Acquire);
        if g != self.ram_gen {
            self.ram = lock(&self.shared.ram).clone();
            self.ram_gen = g;
        }
        self.ram.clone()
    }
}

impl HwDomain for IommufdDomain {
    fn id(&self) -> u32 {
        self.id
    }

    /// One `IOMMU_IOAS_UNMAP` over the span of several mappings (a guest UNMAP of a range, e.g.
    /// the nvme driver's 128 KiB I/O: 32 mappings, 32 ioctls one at a time). The span holds no
    /// other mapping (the domain model passes every mapping in it), so the kernel removes
    /// exactly these. If the kernel refuses, one at a time, where ENOENT means already gone.
    fn unmap_all(&mut self, mappings: &[IovaRange]) -> (usize, Option<BackendError>) {
        let kernel = mappings
            .iter()
            .filter(|m| self.phantom.get(&m.start()) != Some(&m.end()))
            .count();
        let (Some(first), Some(last)) = (mappings.first(), mappings.last()) else {
            return (0, None);
        };
        if self.shared.replaying.load(Ordering::Acquire) {
            // A recorded UNMAP replayed after a crash: the kernel did it.
            for m in mappings {
                self.forget(*m);
            }
            return (mappings.len(), None);
        }
        if kernel < 2 {
            return one_by_one(self, mappings);
        }
        let span = IovaRange::new(first.start(), last.end()).expect("sorted mappings");
        let Some(len) = span.len() else {
            return one_by_one(self, mappings);
        };
        match self.shared.ioas_unmap(self.id, span.start(), len) {
            Ok(_) => {
                for m in mappings {
                    self.forget(*m);
                }
                (mappings.len(), None)
            }
            Err(e) => {
                debug!(
                    "IOAS {}: UNMAP of {span} in one go: errno {}; one mapping at a time",
                    self.id, e.errno
                );
                one_by_one(self, mappings)
            }
        }
    }

    fn handover_state(&self) -> Option<HwDomainState> {
        let mut copied: Vec<u64> = self.copied.iter().copied().collect();
        copied.sort_unstable();
        Some(HwDomainState {
            id: self.id,
            pinned: self.pinned,
            copied,
        })
    }

    fn map(&mut self, op: &MapOp) -> Result<()> {
        let iova = op.iova;
        let ctx = |s: &Self| format!("IOAS {} at {iova} (GPA {:#x})", s.id, op.gpa);
        let len = iova
            .len()
            .ok_or_else(|| BackendError::new("map", libc::EOVERFLOW, ctx(self)))?;
        if self.shared.replaying.load(Ordering::Acquire) {
            // The previous daemon's mapping, replayed into the domain model: the kernel has it
            // (or, without permissions, it was never given to the kernel).
            if !op.perms.read && !op.perms.write {
                self.phantom.insert(iova.start(), iova.end());
            } else if self.shared.replay_new.load(Ordering::Acquire) {
                // Made after the handed-over accounting (a crash's records): count it as the
                // previous daemon most likely made it.
                if self.shared.strategy() == MapStrategy::Copy
                    && self.shared.staged_gen.load(Ordering::Acquire)
                        == self.shared.ram_gen.load(Ordering::Acquire)
                {
                    self.copied.insert(iova.start());
                } else {
                    self.pinned += len;
                    self.shared.pinned.fetch_add(len, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        if !op.perms.read && !op.perms.write {
            return self.map_phantom(iova, ctx(self));
        }
        match self.map_in_kernel(op, len) {
            Err(e) if e.errno == libc::EEXIST => {
                // The kernel holds a mapping the state does not know: one a daemon that died
                // executing this request made (it is executed again, unanswered as it was).
                // The state is the truth: that mapping goes, this one is made.
                let gone = self.shared.ioas_unmap(self.id, iova.start(), len);
                self.shared.fixed(format_args!(
                    "IOAS {} at {iova}: a mapping unknown to the state was there (left by a \
                     crash?): replaced ({gone:?})",
                    self.id
                ));
                if gone.is_err() {
                    return Err(e);
                }
                self.map_in_kernel(op, len)
            }
            r => r,
        }
    }

    fn unmap(&mut self, iova: IovaRange) -> Result<()> {
        if self.shared.replaying.load(Ordering::Acquire) {
            // A recorded UNMAP replayed after a crash: the kernel did it.
            self.forget(iova);
            return Ok(());
        }
        if self.phantom.get(&iova.start()) == Some(&iova.end()) {
            self.phantom.remove(&iova.start());
            return Ok(());
        }
        match self.unmap_in_kernel(iova) {
            Err(e) if e.errno == libc::ENOENT => {
                // Already gone: a daemon that died executing this UNMAP did it (it is executed
                // again, unanswered as it was).
                self.shared.fixed(format_args!(
                    "IOAS {} at {iova}: the kernel no longer has this mapping (unmapped by a \
                     crashed daemon?): forgotten",
                    self.id
                ));
                self.forget(iova);
                Ok(())
            }
            r => r,
        }
    }
}

impl IommufdDomain {
    /// A mapping without permissions: recorded, not given to the kernel.
    fn map_phantom(&mut self, iova: IovaRange, ctx: String) -> Result<()> {
        if let Some((_, &e)) = self.phantom.range(..=iova.end()).next_back()
            && e >= iova.start()
        {
            return Err(BackendError::new("map", libc::EEXIST, ctx));
        }
        self.phantom.insert(iova.start(), iova.end());
        Ok(())
    }

    /// A mapping with permissions, into the kernel: copied from staging, else mapped.
    fn map_in_kernel(&mut self, op: &MapOp, len: u64) -> Result<()> {
        let iova = op.iova;
        let ctx = |s: &Self| format!("IOAS {} at {iova} (GPA {:#x})", s.id, op.gpa);
        let shared = self.shared.clone();
        let id = self.id;
        let ram = self.current_ram();
        if shared.strategy() == MapStrategy::Copy
            && shared.staged_gen.load(Ordering::Acquire) == self.ram_gen
        {
            // The staging (identity) IOAS maps every RAM region at IOVA = GPA, pinned once.
            let copied = timed(&shared.latency.copy, || {
                sys::ioas_copy(
                    shared.fd(),
                    id,
                    iova.start(),
                    shared.identity_id,
                    op.gpa,
                    len,
                    map_flags(op.perms),
                )
            });
            match copied {
                Ok(()) => {
                    shared.maps_copy.fetch_add(1, Ordering::Relaxed);
                    self.copied.insert(iova.start());
                    return Ok(());
                }
                // Not (or no longer) staged: map it directly below.
                Err(e) if e.errno == libc::ENOENT || e.errno == libc::EPERM => {
                    debug!(
                        "IOAS {id}: COPY from staging at GPA {:#x}: errno {}",
                        op.gpa, e.errno
                    );
                }
                Err(e) => return Err(BackendError::new(e.name, e.errno, ctx(self))),
            }
        }
        match shared.map(&ram, id, iova.start(), len, &op.host, op.perms) {
            Ok(_) => {
                self.pinned += len;
                Ok(())
            }
            Err(e) if e.errno == libc::ENOMEM => Err(BackendError::new(
                e.name,
                e.errno,
                format!(
                    "{}: {}",
                    ctx(self),
                    memlock_hint(shared.pinned.load(Ordering::Relaxed), len)
                ),
            )),
            Err(e) => Err(BackendError::new(e.name, e.errno, ctx(self))),
        }
    }

    /// One mapping out of the kernel.
    fn unmap_in_kernel(&mut self, iova: IovaRange) -> Result<()> {
        let len = iova.len().ok_or_else(|| {
            BackendError::new(
                "unmap",
                libc::EOVERFLOW,
                format!("IOAS {} at {iova}", self.id),
            )
        })?;
        let copied = self.copied.remove(&iova.start());
        let r = if copied {
            self.shared
                .ioas_unmap(self.id, iova.start(), len)
                .map(|_| ())
        } else {
            self.shared.unmap(self.id, iova.start(), len)
        };
        if let Err(e) = r {
            if copied {
                self.copied.insert(iova.start());
            }
            return Err(BackendError::new(
                e.name,
                e.errno,
                format!("IOAS {} at {iova}", self.id),
            ));
        }
        if !copied {
            self.pinned = self.pinned.saturating_sub(len);
        }
        Ok(())
    }
}

impl IommufdDomain {
    /// The bookkeeping of one mapping the kernel no longer has.
    fn forget(&mut self, iova: IovaRange) {
        if self.phantom.remove(&iova.start()).is_some() || self.copied.remove(&iova.start()) {
            return;
        }
        let len = iova.len().unwrap_or(0);
        self.pinned = self.pinned.saturating_sub(len);
        self.shared.pinned.fetch_sub(len, Ordering::Relaxed);
    }
}

impl Drop for IommufdDomain {
    fn drop(&mut self) {
        if let Some(g) = self.guest {
            let mut live = lock(&self.shared.live);
            if live.get(&g) == Some(&self.id) {
                live.remove(&g);
            }
        }
        if self.shared.replaying.load(Ordering::Acquire)
            || lock(&self.shared.vanished).remove(&self.id)
        {
            // A recorded DETACH replayed after a crash, or one the dead daemon was executing:
            // the kernel destroyed it (and may have given its id to a newer IOAS since).
            lock(&self.shared.domains).remove(&self.id);
            self.shared.pinned.fetch_sub(self.pinned, Ordering::Relaxed);
            return;
        }
        {
            // The kernel refuses to destroy an IOAS a device is attached to: block those first.
            let mut topo = lock(&self.shared.topo);
            let users: Vec<EndpointId> = lock(&self.shared.devices)
                .iter()
                .filter(|(_, d)| d.attached == Attachment::Domain(self.id))
                .map(|(&e, _)| e)
                .collect();
            for e in users {
                warn!(
                    "IOAS {} destroyed while {e} is attached: blocking it",
                    self.id
                );
                if let Err(err) = self.shared.point(&mut topo, e, Attachment::Blocked) {
                    error!("{err}");
                }
            }
        }
        match sys::destroy(self.shared.fd(), self.id) {
            Ok(()) => {
                self.shared.pinned.fetch_sub(self.pinned, Ordering::Relaxed);
                debug!("IOAS {} destroyed", self.id);
            }
            Err(e) => error!(
                "IOMMU_DESTROY of IOAS {}: {}",
                self.id,
                std::io::Error::from_raw_os_error(e.errno)
            ),
        }
        lock(&self.shared.domains).remove(&self.id);
    }
}
