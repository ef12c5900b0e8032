//! Guest RAM in the identity IOAS, which doubles as the staging IOAS for `IOMMU_IOAS_COPY`
//! (see "Map strategy" and "Staging" in the module doc of `backend::iommufd`).
//!
//! The identity IOAS holds all of guest RAM only when something needs it: an endpoint that
//! translates identity (boot bypass, a guest's bypass ATTACH or bypass config field), or
//! [`Staging::AllRam`] (or a `Copy` strategy override). Otherwise a new RAM table costs no
//! pinning at all, and guest MAPs pin what they map.

use super::*;

impl IommufdBackend {
    /// `DmaBackend::set_ram`: the backend's RAM table becomes `ram`; the identity/staging IOAS
    /// drops regions that are gone or changed, and fills up with the new table if all of RAM is
    /// needed there now. Regions that are the same memory keep their mapping.
    pub(super) fn stage_ram(&self, ram: &GuestRam) -> Result<()> {
        let ram = Arc::new(ram.clone());
        let mut topo = lock(&self.shared.topo);
        // No copies from the staging IOAS while it changes.
        self.shared.staged_gen.store(u64::MAX, Ordering::Release);
        let generation = {
            *lock(&self.shared.ram) = ram.clone();
            self.shared.ram_gen.fetch_add(1, Ordering::AcqRel) + 1
        };
        self.shared.drop_stale_identity(&mut topo, &ram)?;
        if self.shared.needs_all_ram(&topo) {
            return self.shared.fill_identity(&mut topo, &ram, generation);
        }
        if self.shared.identity_holds_all(&topo, &ram) {
            // Staged earlier (an endpoint was in identity) and still the same memory.
            self.shared.staged_gen.store(generation, Ordering::Release);
        } else {
            debug!(
                "identity IOAS: {} of {} RAM regions staged; the rest on demand",
                topo.identity.len(),
                ram.regions().len()
            );
        }
        Ok(())
    }
}

impl Shared {
    /// Whether the identity IOAS must hold all guest RAM now. Caller holds the topology lock
    /// (so that no device moves to the identity IOAS meanwhile).
    pub(super) fn needs_all_ram(&self, _held: &Topo) -> bool {
        self.stage_all.load(Ordering::Relaxed)
            || MapStrategy::from_code(self.strategy_override.load(Ordering::Relaxed))
                == Some(MapStrategy::Copy)
            || lock(&self.devices)
                .values()
                .any(|d| d.attached == Attachment::Identity)
    }

    /// Before an endpoint is pointed at the identity IOAS: all of the current RAM table in it.
    /// Caller holds the topology lock.
    pub(super) fn ensure_identity(&self, topo: &mut Topo) -> Result<()> {
        let generation = self.ram_gen.load(Ordering::Acquire);
        if self.staged_gen.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        let ram = lock(&self.ram).clone();
        let t0 = Instant::now();
        self.fill_identity(topo, &ram, generation)?;
        info!(
            "identity IOAS: all guest RAM staged for identity translation ({} regions, {:#x} \
             bytes pinned by this backend) in {:?}",
            ram.regions().len(),
            self.pinned.load(Ordering::Relaxed),
            t0.elapsed()
        );
        Ok(())
    }

    fn wanted_identity(ram: &GuestRam) -> Vec<IdentityEntry> {
        ram.regions()
            .iter()
            .map(|r| IdentityEntry {
                gpa: r.gpa.identity(),
                key: (
                    r.backing.as_ref().map(|b| (b.file_id, b.offset)),
                    r.host_addr,
                ),
            })
            .collect()
    }

    fn identity_holds_all(&self, topo: &Topo, ram: &GuestRam) -> bool {
        Self::wanted_identity(ram)
            .iter()
            .all(|w| topo.identity.iter().any(|k| k.same_memory(w)))
    }

    /// Unmaps what is gone (or changed) from the identity IOAS: a new region may reuse its GPAs,
    /// and no device may reach memory that is no longer this guest's RAM.
    fn drop_stale_identity(&self, topo: &mut Topo, ram: &GuestRam) -> Result<()> {
        let wanted = Self::wanted_identity(ram);
        let id = self.identity_id;
        let mut kept = Vec::new();
        for e in std::mem::take(&mut topo.identity) {
            if wanted.iter().any(|w| w.same_memory(&e)) {
                kept.push(e);
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            match self.unmap(id, e.gpa.start(), len) {
                Ok(()) => debug!("identity IOAS: unmapped {}", e.gpa),
                Err(err) => {
                    kept.push(e.clone());
                    topo.identity = kept;
                    return Err(BackendError::new(
                        err.name,
                        err.errno,
                        format!("identity IOAS {id}: removed RAM at {}", e.gpa),
                    ));
                }
            }
        }
        topo.identity = kept;
        Ok(())
    }

    /// Maps every region of `ram` (generation `generation`) the identity IOAS lacks; once all
    /// are in, copies from staging may start.
    fn fill_identity(&self, topo: &mut Topo, ram: &GuestRam, generation: u64) -> Result<()> {
        let id = self.identity_id;
        for (e, r) in Self::wanted_identity(ram).into_iter().zip(ram.regions()) {
            if topo.identity.iter().any(|k| k.same_memory(&e)) {
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            let host = crate::guest_ram::HostLocation {
                host_addr: r.host_addr,
                file: e.key.0,
            };
            let mut mapped = self.map(ram, id, e.gpa.start(), len, &host, Perms::RW);
            if matches!(&mapped, Err(err) if err.errno == libc::EEXIST) {
                // A daemon that died while staging left this region (or part of it) mapped
                // without recording it: the record is the truth, so it goes and is mapped again.
                let gone = self.ioas_unmap(id, e.gpa.start(), len);
                self.fixed(format_args!(
                    "identity IOAS {id}: RAM at {} was mapped unrecorded (left by a crash?): \
                     mapped again ({gone:?})",
                    e.gpa
                ));
                mapped = self.map(ram, id, e.gpa.start(), len, &host, Perms::RW);
            }
            match mapped {
                Ok(path) => {
                    debug!("identity IOAS: mapped {} ({path:?})", e.gpa);
                    topo.identity.push(e);
                }
                Err(err) => {
                    let mut ctx = format!("identity IOAS {id}: RAM at {}", e.gpa);
                    if err.errno == libc::ENOMEM {
                        ctx = format!(
                            "{ctx}: {}",
                            memlock_hint(self.pinned.load(Ordering::Relaxed), len)
                        );
                    }
                    return Err(BackendError::new(err.name, err.errno, ctx));
                }
            }
        }
        if self.staging_hwpt.is_some()
            && self.copy_works.load(Ordering::Relaxed) == 0
            && let Some(w) = probe_copy(self, ram)
        {
            self.copy_works
                .store(if w { 1 } else { 2 }, Ordering::Relaxed);
        }
        self.staged_gen.store(generation, Ordering::Release);
        Ok(())
    }
}
