//! MAP and UNMAP (§5.13.6.4, §5.13.6.5): the domains one executor shard owns, with their shadow
//! mapping trees.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::{debug, warn};

use super::shadow::{Mapping, Shadow};
use super::validate::{self, Unmapping};
use super::*;
use crate::backend::{DmaBackend, HwDomain};
use crate::guest_ram::{GuestRam, HostLocation};
use crate::ids::{GpaRange, Iova};
use crate::protocol::{MapRequest, Request};

enum ShardDomain {
    Bypass,
    Paging { hw: Box<dyn HwDomain>, maps: Shadow },
}

/// One mapping, for state dumps and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MappingView {
    pub start: u64,
    pub end: u64,
    pub gpa: u64,
    pub read: bool,
    pub write: bool,
}

/// One domain's counts (what the gauges need; no mapping is copied).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DomainSummary {
    pub id: u32,
    pub kind: DomainKind,
    pub mappings: usize,
    pub mapped_bytes: u128,
}

/// One domain as a shard holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainView {
    pub id: u32,
    pub kind: DomainKind,
    pub mappings: Vec<MappingView>,
    /// The host object, where the backend's outlive the process (a handover adopts them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hw: Option<crate::backend::HwDomainState>,
}

/// A paging domain's backend handle and shadow tree, borrowed together.
type PagingParts<'a> = (&'a mut Box<dyn HwDomain>, &'a mut Shadow);

/// The domains one executor owns, with their shadow mapping trees.
pub struct DomainTable {
    rules: Arc<Rules>,
    backend: Arc<dyn DmaBackend>,
    ram: Arc<GuestRam>,
    domains: HashMap<DomainId, ShardDomain>,
    /// Mappings held across all shards (the global cap).
    total_mappings: Arc<AtomicUsize>,
}

impl DomainTable {
    pub fn new(
        rules: Arc<Rules>,
        backend: Arc<dyn DmaBackend>,
        ram: Arc<GuestRam>,
        total_mappings: Arc<AtomicUsize>,
    ) -> Self {
        DomainTable {
            rules,
            backend,
            ram,
            domains: HashMap::new(),
            total_mappings,
        }
    }

    fn paging(&mut self, domain: DomainId) -> Result<PagingParts<'_>, Rejection> {
        if !self.rules.domain_in_range(domain) {
            return Err(Rejection::rule(
                Status::Range,
                Rule::DomainOutOfRange(domain),
            ));
        }
        match self.domains.get_mut(&domain) {
            None => Err(Rejection::rule(Status::NoEnt, Rule::NoDomain(domain))),
            Some(ShardDomain::Bypass) => {
                Err(Rejection::rule(Status::Inval, Rule::BypassDomain(domain)))
            }
            Some(ShardDomain::Paging { hw, maps }) => Ok((hw, maps)),
        }
    }

    /// Executes the shard's requests, MAP and UNMAP; any other request is not the table's (the
    /// dispatcher never sends one) and gets DEVERR.
    pub fn execute(&mut self, req: &Request) -> Outcome {
        match *req {
            Request::Map(ref m) => self.map(m),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
                ..
            } => self.unmap(domain, virt_start, virt_end),
            other => Err(Rejection::internal(Internal::NotForShard(other.kind()))),
        }
    }

    /// MAP (§5.13.6.4): validated, then done by the backend, then committed to the shadow.
    pub fn map(&mut self, m: &MapRequest) -> Outcome {
        validate::map_flags(m.flags)?;
        let rules = self.rules.clone();
        let ram = self.ram.clone();
        let total = self.total_mappings.clone();
        let (hw, maps) = self.paging(m.domain)?;
        let op = validate::map(&rules, &ram, maps, total.load(Ordering::Relaxed), m)?;
        // The total cap is shared with the other shards: reserve a place before the backend
        // call, give it back if that fails.
        if total.fetch_add(1, Ordering::Relaxed) >= rules.limits.max_mappings_total {
            total.fetch_sub(1, Ordering::Relaxed);
            return Err(Rejection::rule(Status::NoMem, Rule::TooManyMappings));
        }
        if let Err(e) = hw.map(&op) {
            total.fetch_sub(1, Ordering::Relaxed);
            return Err(Rejection::backend(e));
        }
        maps.insert(
            op.iova.start(),
            Mapping::new(op.iova.end(), op.gpa, op.perms),
        );
        Ok(())
    }

    /// UNMAP (§5.13.6.5): all-or-nothing against the shadow tree; holes are fine.
    pub fn unmap(&mut self, domain: DomainId, virt_start: Iova, virt_end: Iova) -> Outcome {
        let total = self.total_mappings.clone();
        let (hw, maps) = self.paging(domain)?;
        // The backend removes the covered mappings (in one go where it can) and says how many,
        // from the first, are gone: if it fails on one, the ones before it are gone in both
        // places and the rest stay in both, so shadow and host still agree.
        let covered = match validate::unmap(maps, virt_start, virt_end)? {
            Unmapping::Nothing => return Ok(()),
            Unmapping::One(one) => {
                hw.unmap(one).map_err(Rejection::backend)?;
                maps.remove(one.start());
                total.fetch_sub(1, Ordering::Relaxed);
                return Ok(());
            }
            Unmapping::Many(covered) => covered,
        };
        let (gone, failed) = hw.unmap_all(&covered);
        for r in &covered[..gone] {
            maps.remove(r.start());
            total.fetch_sub(1, Ordering::Relaxed);
        }
        match failed {
            Some(e) => Err(Rejection::backend(e)),
            None => Ok(()),
        }
    }

    /// Creates a domain in this shard; returns the backend id for a paging domain.
    pub fn create(&mut self, domain: DomainId, kind: DomainKind) -> Result<Option<u32>, Rejection> {
        let (entry, id) = match kind {
            DomainKind::Bypass => (ShardDomain::Bypass, None),
            DomainKind::Paging => {
                let hw = self
                    .backend
                    .create_domain_for(domain)
                    .map_err(Rejection::backend)?;
                let id = hw.id();
                (
                    ShardDomain::Paging {
                        hw,
                        maps: Shadow::default(),
                    },
                    Some(id),
                )
            }
        };
        self.domains.insert(domain, entry);
        Ok(id)
    }

    /// Destroys a domain and everything mapped in it (its last endpoint left, or a reset).
    pub fn destroy(&mut self, domain: DomainId) {
        if let Some(ShardDomain::Paging { maps, .. }) = self.domains.remove(&domain) {
            // Dropping the backend domain (IOAS destroy) releases every mapping at once.
            self.total_mappings.fetch_sub(maps.len(), Ordering::Relaxed);
        }
    }

    /// Destroys every domain.
    pub fn clear(&mut self) {
        let ids: Vec<DomainId> = self.domains.keys().copied().collect();
        for d in ids {
            self.destroy(d);
        }
    }

    /// The guest's RAM changed: mappings that no longer point at the same memory are unmapped.
    /// Returns how many were removed.
    pub fn set_ram(&mut self, ram: Arc<GuestRam>) -> usize {
        let mut removed = 0;
        let old = self.ram.clone();
        for (&id, d) in self.domains.iter_mut() {
            let ShardDomain::Paging { hw, maps } = d else {
                continue;
            };
            // Every mapping was made over the old table (a MAP is checked against it, and each
            // change removes what moved), so the old table says where it lies.
            let stale: Vec<u64> = maps
                .iter()
                .filter(|(s, m)| {
                    let gpa = GpaRange::new(m.gpa(), m.gpa() + (m.end - **s)).expect("valid");
                    match (old.locate(&gpa), ram.locate(&gpa)) {
                        (Some(was), Some(now)) => !same_memory(&now, &was),
                        _ => true,
                    }
                })
                .map(|(&s, _)| s)
                .collect();
            for s in stale {
                let Some(end) = maps.range(s..=s).next().map(|(_, m)| m.end) else {
                    continue;
                };
                match hw.unmap(IovaRange::new(s, end).expect("valid")) {
                    Ok(()) => {
                        maps.remove(s);
                        removed += 1;
                    }
                    Err(e) => warn!("{id}: cannot unmap mapping outside the new memory table: {e}"),
                }
            }
        }
        self.total_mappings.fetch_sub(removed, Ordering::Relaxed);
        let rules = self.rules.for_ram(ram.size());
        if rules.limits != self.rules.limits {
            debug!(
                "mapping caps for {} bytes of guest RAM: {} per domain, {} in all",
                ram.size(),
                rules.limits.max_mappings_per_domain,
                rules.limits.max_mappings_total
            );
        }
        self.rules = rules;
        self.ram = ram;
        removed
    }

    /// The caps in force (those that follow guest RAM set for the current table).
    pub fn limits(&self) -> Limits {
        self.rules.limits
    }

    /// Number of mappings in one domain (None if this shard does not hold it).
    pub fn mapping_count(&self, domain: DomainId) -> Option<usize> {
        match self.domains.get(&domain)? {
            ShardDomain::Bypass => Some(0),
            ShardDomain::Paging { maps, .. } => Some(maps.len()),
        }
    }

    /// Counts of this shard's domains, without copying a mapping (for gauges).
    pub fn summary(&self) -> Vec<DomainSummary> {
        self.domains
            .iter()
            .map(|(id, d)| match d {
                ShardDomain::Bypass => DomainSummary {
                    id: id.0,
                    kind: DomainKind::Bypass,
                    mappings: 0,
                    mapped_bytes: 0,
                },
                ShardDomain::Paging { maps, .. } => DomainSummary {
                    id: id.0,
                    kind: DomainKind::Paging,
                    mappings: maps.len(),
                    mapped_bytes: maps.bytes,
                },
            })
            .collect()
    }

    /// A copy of this shard's state, sorted by domain id.
    pub fn snapshot(&self) -> Vec<DomainView> {
        let mut v: Vec<DomainView> = self
            .domains
            .iter()
            .map(|(id, d)| match d {
                ShardDomain::Bypass => DomainView {
                    id: id.0,
                    kind: DomainKind::Bypass,
                    mappings: Vec::new(),
                    hw: None,
                },
                ShardDomain::Paging { hw, maps } => DomainView {
                    id: id.0,
                    kind: DomainKind::Paging,
                    mappings: maps
                        .iter()
                        .map(|(&start, m)| MappingView {
                            start,
                            end: m.end,
                            gpa: m.gpa(),
                            read: m.perms().read,
                            write: m.perms().write,
                        })
                        .collect(),
                    hw: hw.handover_state(),
                },
            })
            .collect();
        v.sort_by_key(|d| d.id);
        v
    }
}

/// A mapping survives a memory-table change only if its pages are the same pages: same file
/// and offset when file-backed, else the same host address.
fn same_memory(new: &HostLocation, old: &HostLocation) -> bool {
    match (new.file, old.file) {
        (Some(a), Some(b)) => a == b,
        (None, None) => new.host_addr == old.host_addr,
        _ => false,
    }
}
