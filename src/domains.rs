//! The domain model: virtio-iommu semantics (spec §5.13.6) over a shadow of the host's state.
//!
//! Two owners split the state so the hot path needs no lock:
//! - [`DomainTable`] (one per executor shard) owns some domains and their mapping trees and
//!   answers MAP and UNMAP;
//! - [`Topology`] (the dispatcher's) owns endpoints and which domain each is attached to, and
//!   answers ATTACH, DETACH and PROBE. It never reaches the shards: it tells its caller which
//!   domain to create first ([`AttachPlan`]) and which domains a change left empty, to destroy.
//!
//! Every request is validated completely against the shadow state before the backend is called,
//! and the shadow changes only after the backend succeeded, so shadow == host at all times. This
//! module decides every status; it performs no I/O itself and never trusts a guest value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::warn;

use crate::backend::{Attachment, BackendError, DmaBackend, HostConstraints, HwDomain, MapOp};
use crate::guest_ram::{GuestRam, HostLocation};
use crate::ids::{DomainId, EndpointId, IovaRange, Perms};
use crate::protocol::{
    ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, ResvMem, Status, encode_probe_properties,
};

/// Resource caps: what one guest may make the daemon hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_domains: usize,
    pub max_mappings_per_domain: usize,
    pub max_mappings_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 20,
            max_mappings_total: 1 << 21,
        }
    }
}

/// The parameters every check uses; fixed for the life of a connection.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Lowest supported page size minus one.
    pub granule_mask: u64,
    pub input_range: IovaRange,
    pub domain_range: (u32, u32),
    /// Regions reported by PROBE (the same for every endpoint) and refused to MAP.
    pub resv_mem: Vec<ResvMem>,
    pub limits: Limits,
    pub probe_size: u32,
}

impl Rules {
    /// The rules a host imposes: granule, input range and reserved regions from the backend's
    /// constraints, the rest from the VM's configuration.
    pub fn for_host(
        c: &HostConstraints,
        domain_range: (u32, u32),
        limits: Limits,
        probe_size: u32,
    ) -> Rules {
        Rules {
            // The lowest set bit of the mask is the granule (§5.13.4).
            granule_mask: (c.page_size_mask & c.page_size_mask.wrapping_neg()).wrapping_sub(1),
            input_range: c.input_range,
            domain_range,
            resv_mem: c.reserved.clone(),
            limits,
            probe_size,
        }
    }

    fn domain_in_range(&self, d: DomainId) -> bool {
        self.domain_range.0 <= d.0 && d.0 <= self.domain_range.1
    }

    fn overlaps_reserved(&self, r: &IovaRange) -> bool {
        self.resv_mem.iter().any(|m| {
            IovaRange::new(m.start, m.end)
                .map(|m| m.overlaps(r))
                .unwrap_or(false)
        })
    }
}

/// Paging domains translate through mappings; bypass domains are the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DomainKind {
    Paging,
    Bypass,
}

/// Why a request failed: the status for the guest and the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: Status,
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("reserved field is not zero")]
    ReservedNotZero,
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("{0} is outside the domain range")]
    DomainOutOfRange(DomainId),
    #[error("{0} does not exist")]
    NoDomain(DomainId),
    #[error("{0} does not exist")]
    NoEndpoint(EndpointId),
    #[error("bypass flag does not match {0}")]
    BypassMismatch(DomainId),
    #[error("{0} is a bypass domain")]
    BypassDomain(DomainId),
    #[error("{endpoint} is not attached to {domain}")]
    NotAttached {
        endpoint: EndpointId,
        domain: DomainId,
    },
    #[error("MMIO mappings are not supported")]
    Mmio,
    #[error("range {start:#x}..={end:#x} is empty or reversed")]
    BadRange { start: u64, end: u64 },
    #[error("address {0:#x} is not aligned to the granule")]
    Misaligned(u64),
    #[error("range {0} is outside the input range")]
    OutsideInputRange(IovaRange),
    #[error("range {0} overlaps an existing mapping")]
    Overlap(IovaRange),
    #[error("range {0} overlaps a reserved region")]
    Reserved(IovaRange),
    #[error("guest-physical range starting at {0:#x} is not guest RAM")]
    NotGuestRam(u64),
    #[error("unmap of {0} would split a mapping")]
    Split(IovaRange),
    #[error("too many domains")]
    TooManyDomains,
    #[error("too many mappings")]
    TooManyMappings,
    #[error("properties do not fit in the probe buffer")]
    ProbeTooSmall,
    #[error("the reply buffer is not writable guest memory")]
    Unwritable,
    #[error("the executor owning {0} is gone")]
    ExecutorGone(DomainId),
    #[error("backend: {0}")]
    Backend(BackendError),
}

impl Rejection {
    fn new(status: Status, reason: Reason) -> Self {
        Rejection { status, reason }
    }

    fn backend(e: BackendError) -> Self {
        Rejection::new(Status::from(&e), Reason::Backend(e))
    }
}

pub type Outcome = Result<(), Rejection>;

/// The status a request outcome puts in its tail.
pub fn status_of(o: &Outcome) -> Status {
    match o {
        Ok(()) => Status::Ok,
        Err(r) => r.status,
    }
}

#[derive(Debug)]
struct Mapping {
    end: u64,
    gpa: u64,
    perms: Perms,
    host: HostLocation,
}

enum ShardDomain {
    Bypass,
    Paging { hw: Box<dyn HwDomain>, maps: Shadow },
}

/// A paging domain's mappings by IOVA start, with the bytes they cover kept as they change (so
/// that a gauge never walks the tree).
#[derive(Default)]
struct Shadow {
    tree: BTreeMap<u64, Mapping>,
    bytes: u128,
}

impl Shadow {
    fn size(start: u64, m: &Mapping) -> u128 {
        u128::from(m.end - start) + 1
    }

    fn insert(&mut self, start: u64, m: Mapping) {
        self.bytes += Self::size(start, &m);
        if let Some(old) = self.tree.insert(start, m) {
            self.bytes -= Self::size(start, &old);
        }
    }

    fn remove(&mut self, start: u64) -> Option<Mapping> {
        let m = self.tree.remove(&start)?;
        self.bytes -= Self::size(start, &m);
        Some(m)
    }

    fn range<R: std::ops::RangeBounds<u64>>(
        &self,
        r: R,
    ) -> std::collections::btree_map::Range<'_, u64, Mapping> {
        self.tree.range(r)
    }

    fn iter(&self) -> std::collections::btree_map::Iter<'_, u64, Mapping> {
        self.tree.iter()
    }

    fn len(&self) -> usize {
        self.tree.len()
    }
}

/// One mapping, for state dumps and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DomainView {
    pub id: u32,
    pub kind: DomainKind,
    pub mappings: Vec<MappingView>,
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
            return Err(Rejection::new(
                Status::Range,
                Reason::DomainOutOfRange(domain),
            ));
        }
        match self.domains.get_mut(&domain) {
            None => Err(Rejection::new(Status::NoEnt, Reason::NoDomain(domain))),
            Some(ShardDomain::Bypass) => {
                Err(Rejection::new(Status::Inval, Reason::BypassDomain(domain)))
            }
            Some(ShardDomain::Paging { hw, maps }) => Ok((hw, maps)),
        }
    }

    /// MAP (§5.13.6.4).
    pub fn map(
        &mut self,
        domain: DomainId,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Outcome {
        let known = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO;
        if flags & !known != 0 {
            return Err(Rejection::new(
                Status::Inval,
                Reason::UnknownFlags(flags & !known),
            ));
        }
        let rules = self.rules.clone();
        let ram = self.ram.clone();
        let total = self.total_mappings.clone();
        let (hw, maps) = self.paging(domain)?;
        if flags & MAP_F_MMIO != 0 {
            return Err(Rejection::new(Status::Unsupp, Reason::Mmio));
        }
        let bad_range = || {
            Rejection::new(
                Status::Range,
                Reason::BadRange {
                    start: virt_start,
                    end: virt_end,
                },
            )
        };
        let iova = IovaRange::new(virt_start, virt_end).ok_or_else(bad_range)?;
        for a in [virt_start, phys_start, virt_end.wrapping_add(1)] {
            if a & rules.granule_mask != 0 {
                return Err(Rejection::new(Status::Range, Reason::Misaligned(a)));
            }
        }
        if !rules.input_range.contains(&iova) {
            return Err(Rejection::new(
                Status::Range,
                Reason::OutsideInputRange(iova),
            ));
        }
        if let Some((_, m)) = maps.range(..=virt_end).next_back()
            && m.end >= virt_start
        {
            return Err(Rejection::new(Status::Inval, Reason::Overlap(iova)));
        }
        if rules.overlaps_reserved(&iova) {
            return Err(Rejection::new(Status::Inval, Reason::Reserved(iova)));
        }
        // The whole 64-bit space cannot be RAM, so a length that does not fit is simply not RAM.
        let not_ram = || Rejection::new(Status::Fault, Reason::NotGuestRam(phys_start));
        let gpa = iova
            .len()
            .and_then(|len| IovaRange::with_len(phys_start, len))
            .ok_or_else(not_ram)?;
        let host = ram.locate(&gpa).ok_or_else(not_ram)?;
        if maps.len() >= rules.limits.max_mappings_per_domain {
            return Err(Rejection::new(Status::NoMem, Reason::TooManyMappings));
        }
        if total.fetch_add(1, Ordering::Relaxed) >= rules.limits.max_mappings_total {
            total.fetch_sub(1, Ordering::Relaxed);
            return Err(Rejection::new(Status::NoMem, Reason::TooManyMappings));
        }
        let perms = Perms {
            read: flags & MAP_F_READ != 0,
            write: flags & MAP_F_WRITE != 0,
        };
        let op = MapOp {
            iova,
            gpa: phys_start,
            host,
            perms,
        };
        if let Err(e) = hw.map(&op) {
            total.fetch_sub(1, Ordering::Relaxed);
            return Err(Rejection::backend(e));
        }
        maps.insert(
            virt_start,
            Mapping {
                end: virt_end,
                gpa: phys_start,
                perms,
                host,
            },
        );
        Ok(())
    }

    /// UNMAP (§5.13.6.5): all-or-nothing against the shadow tree; holes are fine.
    pub fn unmap(&mut self, domain: DomainId, virt_start: u64, virt_end: u64) -> Outcome {
        let total = self.total_mappings.clone();
        let (hw, maps) = self.paging(domain)?;
        let range = IovaRange::new(virt_start, virt_end).ok_or(Rejection::new(
            Status::Range,
            Reason::BadRange {
                start: virt_start,
                end: virt_end,
            },
        ))?;
        // A mapping that starts before the range and reaches into it would be split.
        if let Some((&s, m)) = maps.range(..virt_start).next_back()
            && m.end >= virt_start
        {
            let _ = s;
            return Err(Rejection::new(Status::Range, Reason::Split(range)));
        }
        // So would the last mapping starting inside the range if it ends past it.
        if let Some((_, m)) = maps.range(virt_start..=virt_end).next_back()
            && m.end > virt_end
        {
            return Err(Rejection::new(Status::Range, Reason::Split(range)));
        }
        // Remove covered mappings one by one: if the host fails on one, the ones before it are
        // gone in both places and the rest stay in both, so shadow and host still agree.
        loop {
            let Some((&s, m)) = maps.range(virt_start..=virt_end).next() else {
                return Ok(());
            };
            let one = IovaRange::new(s, m.end).expect("stored mappings are valid");
            if let Err(e) = hw.unmap(one) {
                return Err(Rejection::backend(e));
            }
            maps.remove(s);
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Creates a domain in this shard; returns the backend id for a paging domain.
    pub fn create(&mut self, domain: DomainId, kind: DomainKind) -> Result<Option<u32>, Rejection> {
        let (entry, id) = match kind {
            DomainKind::Bypass => (ShardDomain::Bypass, None),
            DomainKind::Paging => {
                let hw = self.backend.create_domain().map_err(Rejection::backend)?;
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
        for (&id, d) in self.domains.iter_mut() {
            let ShardDomain::Paging { hw, maps } = d else {
                continue;
            };
            let stale: Vec<u64> = maps
                .iter()
                .filter(|(s, m)| {
                    let gpa = IovaRange::new(m.gpa, m.gpa + (m.end - **s)).expect("valid");
                    !ram.locate(&gpa).is_some_and(|h| same_memory(&h, &m.host))
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
        self.ram = ram;
        removed
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
                },
                ShardDomain::Paging { maps, .. } => DomainView {
                    id: id.0,
                    kind: DomainKind::Paging,
                    mappings: maps
                        .iter()
                        .map(|(&start, m)| MappingView {
                            start,
                            end: m.end,
                            gpa: m.gpa,
                            read: m.perms.read,
                            write: m.perms.write,
                        })
                        .collect(),
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

/// An ATTACH the topology accepted: the domain to create first if it does not exist, then
/// [`Topology::attach`] with the domain's backend id.
#[derive(Debug)]
pub struct AttachPlan {
    domain: DomainId,
    endpoint: EndpointId,
    kind: DomainKind,
    /// The domain exists, with this backend id (None: bypass).
    existing: Option<Option<u32>>,
}

/// Where an [`AttachPlan`] attaches the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachTarget {
    /// A domain that exists, with its backend id (None: bypass).
    Existing(Option<u32>),
    /// A domain to create first, on the shard that will own it.
    Create(DomainId, DomainKind),
}

impl AttachPlan {
    pub fn target(&self) -> AttachTarget {
        match self.existing {
            Some(hw) => AttachTarget::Existing(hw),
            None => AttachTarget::Create(self.domain, self.kind),
        }
    }
}

#[derive(Debug)]
struct TopoDomain {
    kind: DomainKind,
    hw: Option<u32>,
    endpoints: u32,
}

/// One endpoint, for state dumps and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointView {
    pub id: u32,
    pub domain: Option<u32>,
}

/// Endpoints and their attachments; owned by the dispatcher.
pub struct Topology {
    rules: Arc<Rules>,
    backend: Arc<dyn DmaBackend>,
    endpoints: BTreeMap<EndpointId, Option<DomainId>>,
    domains: HashMap<DomainId, TopoDomain>,
    /// The config space's `bypass`: where unattached endpoints' DMA goes.
    bypass: bool,
}

impl Topology {
    pub fn new(
        rules: Arc<Rules>,
        backend: Arc<dyn DmaBackend>,
        endpoints: &[EndpointId],
        bypass: bool,
    ) -> Self {
        Topology {
            rules,
            backend,
            endpoints: endpoints.iter().map(|&e| (e, None)).collect(),
            domains: HashMap::new(),
            bypass,
        }
    }

    pub fn bypass(&self) -> bool {
        self.bypass
    }

    fn unattached(&self) -> Attachment {
        Self::unattached_for(self.bypass)
    }

    /// Where an unattached endpoint's DMA goes under the given `bypass`.
    fn unattached_for(bypass: bool) -> Attachment {
        if bypass {
            Attachment::Identity
        } else {
            Attachment::Blocked
        }
    }

    fn endpoint(&self, e: EndpointId) -> Result<Option<DomainId>, Rejection> {
        self.endpoints
            .get(&e)
            .copied()
            .ok_or(Rejection::new(Status::NoEnt, Reason::NoEndpoint(e)))
    }

    /// ATTACH (§5.13.6.2), validation: the request against the spec's rules and the caps.
    /// `Ok(None)`: the endpoint is attached there already, nothing to do. Re-attaching moves the
    /// endpoint (an implicit DETACH).
    pub fn plan_attach(
        &self,
        domain: DomainId,
        endpoint: EndpointId,
        flags: u32,
        reserved: [u8; 4],
    ) -> Result<Option<AttachPlan>, Rejection> {
        if reserved != [0; 4] {
            return Err(Rejection::new(Status::Inval, Reason::ReservedNotZero));
        }
        if flags & !ATTACH_F_BYPASS != 0 {
            return Err(Rejection::new(
                Status::Inval,
                Reason::UnknownFlags(flags & !ATTACH_F_BYPASS),
            ));
        }
        if !self.rules.domain_in_range(domain) {
            return Err(Rejection::new(
                Status::Range,
                Reason::DomainOutOfRange(domain),
            ));
        }
        let old = self.endpoint(endpoint)?;
        let kind = if flags & ATTACH_F_BYPASS != 0 {
            DomainKind::Bypass
        } else {
            DomainKind::Paging
        };
        let existing = self.domains.get(&domain);
        if let Some(d) = existing
            && d.kind != kind
        {
            return Err(Rejection::new(
                Status::Inval,
                Reason::BypassMismatch(domain),
            ));
        }
        if old == Some(domain) {
            return Ok(None);
        }
        if existing.is_none() && self.domains.len() >= self.rules.limits.max_domains {
            return Err(Rejection::new(Status::NoMem, Reason::TooManyDomains));
        }
        Ok(Some(AttachPlan {
            domain,
            endpoint,
            kind,
            existing: existing.map(|d| d.hw),
        }))
    }

    /// ATTACH, execution: points the endpoint at the planned domain, whose backend id is `hw`
    /// (None: bypass), and records it. Returns the domain the endpoint left if that left it
    /// empty: destroy it. On a backend failure nothing changed (destroy the domain if it was
    /// created for this plan).
    pub fn attach(
        &mut self,
        plan: AttachPlan,
        hw: Option<u32>,
    ) -> Result<Option<DomainId>, Rejection> {
        let AttachPlan {
            domain,
            endpoint,
            kind,
            ..
        } = plan;
        let target = match hw {
            Some(id) => Attachment::Domain(id),
            None => Attachment::Identity,
        };
        self.backend
            .attach(endpoint, target)
            .map_err(Rejection::backend)?;
        self.domains
            .entry(domain)
            .or_insert(TopoDomain {
                kind,
                hw,
                endpoints: 0,
            })
            .endpoints += 1;
        let old = self.endpoints.insert(endpoint, Some(domain)).flatten();
        Ok(old.and_then(|old| self.release(old)))
    }

    /// DETACH (§5.13.6.3): the endpoint goes back to the unattached state (blocked, or the
    /// identity when `bypass` is set). Returns the domain if that left it empty: destroy it.
    pub fn detach(
        &mut self,
        domain: DomainId,
        endpoint: EndpointId,
    ) -> Result<Option<DomainId>, Rejection> {
        let current = self.endpoint(endpoint)?;
        if !self.rules.domain_in_range(domain) {
            return Err(Rejection::new(
                Status::Range,
                Reason::DomainOutOfRange(domain),
            ));
        }
        if current != Some(domain) {
            let reason = if self.domains.contains_key(&domain) {
                Reason::NotAttached { endpoint, domain }
            } else {
                Reason::NoDomain(domain)
            };
            return Err(Rejection::new(Status::Inval, reason));
        }
        self.backend
            .attach(endpoint, self.unattached())
            .map_err(Rejection::backend)?;
        self.endpoints.insert(endpoint, None);
        Ok(self.release(domain))
    }

    /// The VMM let go of an endpoint's device (its vfio-user connection closed): the endpoint
    /// leaves its domain and goes back to the unattached state (blocked, or the identity when
    /// `bypass` is set) until the guest attaches it again. The guest is not told; its next
    /// ATTACH re-establishes translation. Returns the domain if that left it empty: destroy it.
    pub fn unplug(&mut self, endpoint: EndpointId) -> Result<Option<DomainId>, BackendError> {
        let Ok(Some(domain)) = self.endpoint(endpoint) else {
            return Ok(None);
        };
        self.backend.attach(endpoint, self.unattached())?;
        self.endpoints.insert(endpoint, None);
        Ok(self.release(domain))
    }

    /// Drops one endpoint reference; returns the domain when it was the last (to destroy).
    fn release(&mut self, domain: DomainId) -> Option<DomainId> {
        let d = self.domains.get_mut(&domain)?;
        d.endpoints -= 1;
        if d.endpoints == 0 {
            self.domains.remove(&domain);
            return Some(domain);
        }
        None
    }

    /// PROBE (§5.13.6.6): writes the properties into `out` (probe_size bytes).
    pub fn probe(&self, endpoint: EndpointId, out: &mut [u8]) -> Outcome {
        self.endpoint(endpoint)?;
        if out.len() < self.rules.probe_size as usize {
            return Err(Rejection::new(Status::Inval, Reason::ProbeTooSmall));
        }
        encode_probe_properties(&self.rules.resv_mem, out)
            .map_err(|s| Rejection::new(s, Reason::ProbeTooSmall))
    }

    /// The driver wrote `bypass`: unattached endpoints follow it at once.
    pub fn set_bypass(&mut self, bypass: bool) -> Result<(), BackendError> {
        if bypass == self.bypass {
            return Ok(());
        }
        let (from, to) = (self.unattached(), Self::unattached_for(bypass));
        let unattached: Vec<EndpointId> = self
            .endpoints
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(&e, _)| e)
            .collect();
        for (i, &e) in unattached.iter().enumerate() {
            if let Err(err) = self.backend.attach(e, to) {
                // All or nothing: the endpoints already moved go back, so that the host stays
                // what the model says (the old `bypass`).
                for &done in &unattached[..i] {
                    if let Err(e2) = self.backend.attach(done, from) {
                        log::error!("{done}: cannot roll back a refused bypass write: {e2}");
                    }
                }
                return Err(err);
            }
        }
        self.bypass = bypass;
        Ok(())
    }

    /// Device reset: no endpoint stays attached and no domain is left (§5.13.6: "When reset, no
    /// endpoint is attached"). Returns the domains to destroy.
    pub fn reset(&mut self, bypass: bool) -> Vec<DomainId> {
        self.bypass = bypass;
        let to = self.unattached();
        for (&e, d) in self.endpoints.iter_mut() {
            if let Err(err) = self.backend.attach(e, to) {
                log::error!("{e}: cannot return to the unattached state on reset: {err}");
            }
            *d = None;
        }
        self.domains.drain().map(|(id, _)| id).collect()
    }

    /// Endpoints and where they are attached.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        self.endpoints
            .iter()
            .map(|(e, d)| EndpointView {
                id: e.0,
                domain: d.map(|d| d.0),
            })
            .collect()
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }
}

#[cfg(test)]
mod tests;
