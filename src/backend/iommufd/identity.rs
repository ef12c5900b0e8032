//! Guest RAM in the identity IOAS, which doubles as the staging IOAS for `IOMMU_IOAS_COPY`
//! (see "Map strategy" in the module doc of `backend::iommufd`).

use super::*;

impl IommufdBackend {
    /// `DmaBackend::set_ram`: the identity/staging IOAS follows the new RAM table; regions that
    /// are the same memory keep their mapping.
    pub(super) fn stage_ram(&self, ram: &GuestRam) -> Result<()> {
        let ram = Arc::new(ram.clone());
        let mut topo = lock(&self.shared.topo);
        // No copies from the staging IOAS while it changes.
        self.shared.staged_gen.store(u64::MAX, Ordering::Release);
        let generation = {
            *lock(&self.shared.ram) = ram.clone();
            self.shared.ram_gen.fetch_add(1, Ordering::AcqRel) + 1
        };
        let wanted: Vec<IdentityEntry> = ram
            .regions()
            .iter()
            .map(|r| IdentityEntry {
                gpa: r.gpa.identity(),
                key: (
                    r.backing.as_ref().map(|b| (b.file_id, b.offset)),
                    r.host_addr,
                ),
            })
            .collect();
        let id = self.shared.identity_id;
        // Unmap what is gone (or changed) first: a new region may reuse its GPAs.
        let mut kept = Vec::new();
        for e in std::mem::take(&mut topo.identity) {
            if let Some(w) = wanted.iter().find(|w| w.same_memory(&e)) {
                kept.push(w.clone());
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            match self.shared.unmap(id, e.gpa.start(), len) {
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
        for (e, r) in wanted.iter().zip(ram.regions()) {
            if topo.identity.iter().any(|k| k.same_memory(e)) {
                continue;
            }
            let len = e.gpa.len().unwrap_or(u64::MAX);
            let host = crate::guest_ram::HostLocation {
                host_addr: r.host_addr,
                file: e.key.0,
            };
            match self
                .shared
                .map(&ram, id, e.gpa.start(), len, &host, Perms::RW)
            {
                Ok(path) => {
                    debug!("identity IOAS: mapped {} ({path:?})", e.gpa);
                    topo.identity.push(e.clone());
                }
                Err(err) => {
                    let mut ctx = format!("identity IOAS {id}: RAM at {}", e.gpa);
                    if err.errno == libc::ENOMEM {
                        ctx = format!(
                            "{ctx}: {}",
                            memlock_hint(self.shared.pinned.load(Ordering::Relaxed), len)
                        );
                    }
                    return Err(BackendError::new(err.name, err.errno, ctx));
                }
            }
        }
        if self.shared.staging_hwpt.is_some() && self.shared.copy_works.load(Ordering::Relaxed) == 0
        {
            let works = probe_copy(&self.shared, &ram);
            if let Some(w) = works {
                self.shared
                    .copy_works
                    .store(if w { 1 } else { 2 }, Ordering::Relaxed);
            }
        }
        self.shared.staged_gen.store(generation, Ordering::Release);
        Ok(())
    }
}
