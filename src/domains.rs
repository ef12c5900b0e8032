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

use crate::backend::BackendError;
use crate::ids::{DomainId, EndpointId, IovaRange};
use crate::protocol::Status;

mod rules;
mod shadow;
mod table;
mod topology;
mod validate;

pub use rules::{Limits, RamCaps, Rules};
pub use table::{DomainSummary, DomainTable, DomainView, MappingView};
pub use topology::{AttachPlan, AttachTarget, EndpointView, Topology};

/// Paging domains translate through mappings; bypass domains are the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Why a request failed: the guest broke a rule, the host refused, or the daemon failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The request breaks a rule of the spec (§5.13.6) or a resource cap: the guest's doing.
    #[error("{0}")]
    Rule(Rule),
    /// The host refused what a valid request asked (the backend's errno).
    #[error("backend: {0}")]
    Backend(BackendError),
    /// The daemon itself failed: not the guest's doing, nor the host's.
    #[error("internal: {0}")]
    Internal(Internal),
}

/// A rule of the spec (§5.13.6) or a cap a request breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
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
}

/// A failure of the daemon itself (the guest sees DEVERR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Internal {
    #[error("the reply buffer is not writable guest memory")]
    Unwritable,
    #[error("the executor owning {0} is gone")]
    ExecutorGone(DomainId),
    #[error("{} is not a request a domain shard executes", .0.name())]
    NotForShard(crate::protocol::RequestType),
}

impl Rejection {
    fn new(status: Status, reason: Reason) -> Self {
        Rejection { status, reason }
    }

    /// The guest broke `rule`: answered with `status`.
    fn rule(status: Status, rule: Rule) -> Self {
        Rejection::new(status, Reason::Rule(rule))
    }

    /// The daemon failed: the guest sees DEVERR.
    pub fn internal(why: Internal) -> Self {
        Rejection::new(Status::DevErr, Reason::Internal(why))
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

#[cfg(test)]
mod tests;
