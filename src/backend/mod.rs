//! The host side of translation: what the domain model asks the kernel (or the software table)
//! to do, once a request has been fully validated.
//!
//! A backend never sees a raw guest request and never decides a status: it performs operations
//! that are already known to be legal and reports success or an errno. Each paging domain is a
//! [`HwDomain`] owned by exactly one executor, so map/unmap need no lock in the daemon; topology
//! operations (attach, unattached state, RAM changes) go through the shared [`DmaBackend`].

#[cfg(any(test, feature = "test-utils"))]
pub mod fault;
pub mod iommufd;
pub mod soft;

use crate::guest_ram::{GuestRam, HostLocation};
use crate::ids::{DomainId, EndpointId, IovaRange, Perms};
use crate::protocol::{ResvMem, Status};

/// A backend failure: which operation, the errno, and what it was applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} failed on {context}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct BackendError {
    pub op: &'static str,
    pub errno: i32,
    pub context: String,
}

impl BackendError {
    pub fn new(op: &'static str, errno: i32, context: impl Into<String>) -> Self {
        BackendError {
            op,
            errno,
            context: context.into(),
        }
    }
}

impl From<&BackendError> for Status {
    /// The one mapping from host errors to what the guest is told (§5.13.6 status codes).
    fn from(e: &BackendError) -> Status {
        match e.errno {
            libc::ENOMEM | libc::ENOSPC => Status::NoMem,
            libc::EFAULT => Status::Fault,
            libc::EINVAL | libc::EEXIST | libc::EADDRINUSE => Status::Inval,
            libc::ENOENT => Status::NoEnt,
            libc::EOVERFLOW | libc::ERANGE => Status::Range,
            libc::EOPNOTSUPP | libc::ENOTTY => Status::Unsupp,
            libc::EIO => Status::IoErr,
            _ => Status::DevErr,
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The x86 MSI doorbell window (inclusive): no mapping may cover it, and every backend reports
/// it to the guest as a RESV_MEM MSI region.
pub const X86_MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// Where an endpoint's DMA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Attachment {
    /// No DMA reaches memory.
    Blocked,
    /// IOVA = GPA over all guest RAM.
    Identity,
    /// Translated by the paging domain with this backend id.
    Domain(u32),
}

/// What the host imposes on the guest's view: advertised in the config space and PROBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConstraints {
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// IOVAs the host can translate.
    pub input_range: IovaRange,
    /// IOVA regions no mapping may cover (host holes, the MSI window).
    pub reserved: Vec<ResvMem>,
}

/// One mapping as the backend sees it.
#[derive(Clone, Copy, Debug)]
pub struct MapOp {
    pub iova: IovaRange,
    pub gpa: u64,
    pub host: HostLocation,
    pub perms: Perms,
}

/// A paging domain's host object as a planned upgrade hands it to the next daemon (see
/// `upgrade`): the kernel keeps it, and the next daemon takes it over with
/// [`DmaBackend::adopt_domains`] instead of creating it again.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HwDomainState {
    /// The backend's id (the IOAS id).
    pub id: u32,
    /// Bytes this domain pins of its own.
    pub pinned: u64,
    /// Starts of the mappings that share another IOAS's pages (pin nothing of their own).
    pub copied: Vec<u64>,
}

/// A paging domain in the host (an IOAS, or a software table).
pub trait HwDomain: Send {
    /// The backend's id of this domain, used by [`Attachment::Domain`].
    fn id(&self) -> u32;
    fn map(&mut self, op: &MapOp) -> Result<()>;
    /// Unmaps exactly one earlier mapping.
    fn unmap(&mut self, iova: IovaRange) -> Result<()>;
    /// Unmaps earlier mappings, `mappings` sorted and disjoint, and every mapping of the domain
    /// between the first and the last of them among them (a guest UNMAP's range). Returns how
    /// many of them, from the first, are gone, and the failure that stopped it: the domain
    /// model forgets exactly those. One at a time unless the backend can do better.
    fn unmap_all(&mut self, mappings: &[IovaRange]) -> (usize, Option<BackendError>) {
        for (i, m) in mappings.iter().enumerate() {
            if let Err(e) = self.unmap(*m) {
                return (i, Some(e));
            }
        }
        (mappings.len(), None)
    }
    /// What the next daemon needs to take this domain over, for a backend whose domains outlive
    /// the process (kernel objects); `None` (the default) where the next daemon rebuilds it.
    fn handover_state(&self) -> Option<HwDomainState> {
        None
    }
}

/// The host translation machinery for one VM.
pub trait DmaBackend: Send + Sync {
    fn name(&self) -> &'static str;
    fn constraints(&self) -> HostConstraints;
    /// Creates an empty paging domain. Dropping it destroys it.
    fn create_domain(&self) -> Result<Box<dyn HwDomain>>;
    /// The paging domain for the guest's domain `guest`: the one handed over for it by the
    /// previous daemon ([`DmaBackend::adopt_domains`]), else a new one.
    fn create_domain_for(&self, guest: DomainId) -> Result<Box<dyn HwDomain>> {
        let _ = guest;
        self.create_domain()
    }
    /// The host object of the live domain serving guest domain `guest` (an IOAS id), where
    /// host domains outlive the process (the crash journal records it: see `recovery`).
    fn host_id_of(&self, guest: DomainId) -> Option<u32> {
        let _ = guest;
        None
    }
    /// Domains a previous daemon left in the host, by the guest domain each serves: until
    /// [`DmaBackend::adoption_done`], `create_domain_for` returns them with the mappings they
    /// already hold (a MAP of one of those is taken as done) and attaching an endpoint where it
    /// already is costs nothing. A backend without host objects that outlive it refuses.
    fn adopt_domains(&self, domains: Vec<(DomainId, HwDomainState)>) -> Result<()> {
        if domains.is_empty() {
            return Ok(());
        }
        Err(BackendError::new(
            "adopt",
            libc::EOPNOTSUPP,
            format!("{} backend: no host domains to take over", self.name()),
        ))
    }
    /// A crash's recorded changes are replayed next: they are done in the host already (until
    /// [`DmaBackend::adoption_done`]), as the handed-over state's are.
    fn replay_recorded(&self) -> Result<()> {
        Ok(())
    }
    /// The device state is rebuilt (`rebuilt`: completely): every later MAP and ATTACH goes to
    /// the host again, and domains handed over but not claimed are destroyed, unless the
    /// rebuild failed (the previous binary may take them back, see `upgrade::Rollback`).
    fn adoption_done(&self, rebuilt: bool) {
        let _ = rebuilt;
    }
    /// After a crash, once the state is rebuilt: makes the host what the state says where a
    /// request the dead daemon was executing left it otherwise; what it fixed. Nothing to do
    /// for a backend whose state died with the daemon.
    fn reconcile(&self) -> Vec<std::result::Result<String, String>> {
        Vec::new()
    }
    /// Points an endpoint's DMA somewhere; replaces its previous attachment atomically.
    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()>;
    /// The guest's RAM changed: identity translation must follow it.
    fn set_ram(&self, ram: &GuestRam) -> Result<()>;
}

/// A shared backend is a backend: tests and the vfio-user fronts keep a handle on the one the
/// daemon owns.
impl<B: DmaBackend + ?Sized> DmaBackend for std::sync::Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn constraints(&self) -> HostConstraints {
        (**self).constraints()
    }
    fn create_domain(&self) -> Result<Box<dyn HwDomain>> {
        (**self).create_domain()
    }
    fn create_domain_for(&self, guest: DomainId) -> Result<Box<dyn HwDomain>> {
        (**self).create_domain_for(guest)
    }
    fn host_id_of(&self, guest: DomainId) -> Option<u32> {
        (**self).host_id_of(guest)
    }
    fn adopt_domains(&self, domains: Vec<(DomainId, HwDomainState)>) -> Result<()> {
        (**self).adopt_domains(domains)
    }
    fn replay_recorded(&self) -> Result<()> {
        (**self).replay_recorded()
    }
    fn adoption_done(&self, rebuilt: bool) {
        (**self).adoption_done(rebuilt)
    }
    fn reconcile(&self) -> Vec<std::result::Result<String, String>> {
        (**self).reconcile()
    }
    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        (**self).attach(endpoint, to)
    }
    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        (**self).set_ram(ram)
    }
}
