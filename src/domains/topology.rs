//! ATTACH, DETACH and PROBE (§5.13.6.2, §5.13.6.3, §5.13.6.6): endpoints and the domain each is
//! attached to; `bypass` for the unattached ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::*;
use crate::backend::{Attachment, DmaBackend};
use crate::protocol::{ATTACH_F_BYPASS, encode_probe_properties};

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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointView {
    pub id: u32,
    pub domain: Option<u32>,
}

/// Endpoints and their attachments; owned by the dispatcher.
pub struct Topology {
    pub(super) rules: Arc<Rules>,
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
            .ok_or(Rejection::rule(Status::NoEnt, Rule::NoEndpoint(e)))
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
            return Err(Rejection::rule(Status::Inval, Rule::ReservedNotZero));
        }
        if flags & !ATTACH_F_BYPASS != 0 {
            return Err(Rejection::rule(
                Status::Inval,
                Rule::UnknownFlags(flags & !ATTACH_F_BYPASS),
            ));
        }
        if !self.rules.domain_in_range(domain) {
            return Err(Rejection::rule(
                Status::Range,
                Rule::DomainOutOfRange(domain),
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
            return Err(Rejection::rule(Status::Inval, Rule::BypassMismatch(domain)));
        }
        if old == Some(domain) {
            return Ok(None);
        }
        if existing.is_none() && self.domains.len() >= self.rules.limits.max_domains {
            return Err(Rejection::rule(Status::NoMem, Rule::TooManyDomains));
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
            return Err(Rejection::rule(
                Status::Range,
                Rule::DomainOutOfRange(domain),
            ));
        }
        if current != Some(domain) {
            let reason = if self.domains.contains_key(&domain) {
                Rule::NotAttached { endpoint, domain }
            } else {
                Rule::NoDomain(domain)
            };
            return Err(Rejection::rule(Status::Inval, reason));
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
            return Err(Rejection::rule(Status::Inval, Rule::ProbeTooSmall));
        }
        encode_probe_properties(&self.rules.resv_mem, out)
            .map_err(|s| Rejection::rule(s, Rule::ProbeTooSmall))
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
