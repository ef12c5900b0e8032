//! The software backend: a real translation table with iommufd's semantics, in process memory.
//!
//! It is what the daemon uses on hosts without /dev/iommu, what the socket tests and the bench
//! drive, and the oracle other backends are compared with: [`SoftBackend::translate`] answers
//! "where would this endpoint's DMA to this IOVA land", exactly as an IOMMU would. It must
//! behave like the kernel on every error path the domain model could reach (overlap → EEXIST,
//! unmap of something not mapped → ENOENT), so that tests of rollback mean something.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::{Attachment, BackendError, DmaBackend, HostConstraints, HwDomain, MapOp, Result};
use crate::guest_ram::GuestRam;
use crate::ids::{EndpointId, IovaRange, Perms};
use crate::protocol::{ResvKind, ResvMem};

use super::X86_MSI_WINDOW;

#[derive(Clone, Copy, Debug)]
struct Entry {
    end: u64,
    gpa: u64,
    perms: Perms,
}

type Table = BTreeMap<u64, Entry>;

#[derive(Default)]
struct State {
    attachments: HashMap<EndpointId, Attachment>,
    domains: HashMap<u32, Weak<Mutex<Table>>>,
    ram: GuestRam,
}

/// Why a DMA would not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("endpoint is not known to the backend")]
    UnknownEndpoint,
    #[error("endpoint is blocked")]
    Blocked,
    #[error("no mapping for the address")]
    Unmapped,
    #[error("mapping forbids this access")]
    Permission,
    #[error("identity address is not guest RAM")]
    NotRam,
}

/// A software IOMMU for one VM.
pub struct SoftBackend {
    state: Arc<Mutex<State>>,
    next_id: AtomicU32,
    constraints: HostConstraints,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a table half-updated (every update is a single
    // BTreeMap call), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SoftBackend {
    /// A backend serving `endpoints`, each starting blocked or identity-mapped.
    pub fn new(endpoints: &[EndpointId], boot_bypass: bool) -> Self {
        let initial = if boot_bypass {
            Attachment::Identity
        } else {
            Attachment::Blocked
        };
        let state = State {
            attachments: endpoints.iter().map(|&e| (e, initial)).collect(),
            ..State::default()
        };
        SoftBackend {
            state: Arc::new(Mutex::new(state)),
            next_id: AtomicU32::new(1),
            constraints: HostConstraints {
                page_size_mask: !0xfff,
                input_range: IovaRange::new(0, u64::MAX).expect("static range"),
                reserved: vec![ResvMem {
                    kind: ResvKind::Msi,
                    start: X86_MSI_WINDOW.0,
                    end: X86_MSI_WINDOW.1,
                }],
            },
        }
    }

    /// Overrides what the backend claims the host imposes (tests of granule and reserved rules).
    pub fn with_constraints(mut self, c: HostConstraints) -> Self {
        self.constraints = c;
        self
    }

    /// Where a DMA by `endpoint` to `iova` would land in guest-physical memory.
    pub fn translate(
        &self,
        endpoint: EndpointId,
        iova: u64,
        write: bool,
    ) -> std::result::Result<u64, Fault> {
        let st = lock(&self.state);
        match st
            .attachments
            .get(&endpoint)
            .ok_or(Fault::UnknownEndpoint)?
        {
            Attachment::Blocked => Err(Fault::Blocked),
            Attachment::Identity => {
                let one = crate::ids::GpaRange::new(iova, iova).expect("single byte");
                st.ram.region_of(&one).map(|_| iova).ok_or(Fault::NotRam)
            }
            Attachment::Domain(id) => {
                let table = st
                    .domains
                    .get(id)
                    .and_then(Weak::upgrade)
                    .ok_or(Fault::Unmapped)?;
                let table = lock(&table);
                let (&start, e) = table.range(..=iova).next_back().ok_or(Fault::Unmapped)?;
                if iova > e.end {
                    return Err(Fault::Unmapped);
                }
                if (write && !e.perms.write) || (!write && !e.perms.read) {
                    return Err(Fault::Permission);
                }
                Ok(e.gpa + (iova - start))
            }
        }
    }

    /// The endpoint's current attachment, as the hardware would see it.
    pub fn attachment(&self, endpoint: EndpointId) -> Option<Attachment> {
        lock(&self.state).attachments.get(&endpoint).copied()
    }

    /// Live paging domains and how many mappings each holds.
    pub fn domain_sizes(&self) -> Vec<(u32, usize)> {
        let st = lock(&self.state);
        let mut v: Vec<_> = st
            .domains
            .iter()
            .filter_map(|(&id, w)| w.upgrade().map(|t| (id, lock(&t).len())))
            .collect();
        v.sort_unstable();
        v
    }

    /// Mappings of one backend domain: (iova, gpa, perms).
    pub fn mappings(&self, id: u32) -> Vec<(IovaRange, u64, Perms)> {
        let st = lock(&self.state);
        let Some(t) = st.domains.get(&id).and_then(Weak::upgrade) else {
            return Vec::new();
        };
        let t = lock(&t);
        t.iter()
            .map(|(&s, e)| {
                (
                    IovaRange::new(s, e.end).expect("stored valid"),
                    e.gpa,
                    e.perms,
                )
            })
            .collect()
    }
}

struct SoftDomain {
    id: u32,
    table: Arc<Mutex<Table>>,
    state: Arc<Mutex<State>>,
}

impl HwDomain for SoftDomain {
    fn id(&self) -> u32 {
        self.id
    }

    fn map(&mut self, op: &MapOp) -> Result<()> {
        let mut t = lock(&self.table);
        let iova = op.iova;
        if let Some((_, e)) = t.range(..=iova.end()).next_back()
            && e.end >= iova.start()
        {
            return Err(BackendError::new(
                "map",
                libc::EEXIST,
                format!("soft domain {} at {iova}", self.id),
            ));
        }
        t.insert(
            iova.start(),
            Entry {
                end: iova.end(),
                gpa: op.gpa,
                perms: op.perms,
            },
        );
        Ok(())
    }

    fn unmap(&mut self, iova: IovaRange) -> Result<()> {
        let mut t = lock(&self.table);
        match t.get(&iova.start()) {
            Some(e) if e.end == iova.end() => {
                t.remove(&iova.start());
                Ok(())
            }
            _ => Err(BackendError::new(
                "unmap",
                libc::ENOENT,
                format!("soft domain {} at {iova}", self.id),
            )),
        }
    }
}

impl Drop for SoftDomain {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        st.domains.remove(&self.id);
        // Like the kernel, a domain cannot vanish under an attached device: anything still
        // pointing at it is blocked.
        for a in st.attachments.values_mut() {
            if *a == Attachment::Domain(self.id) {
                *a = Attachment::Blocked;
            }
        }
    }
}

impl DmaBackend for SoftBackend {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn constraints(&self) -> HostConstraints {
        self.constraints.clone()
    }

    fn create_domain(&self) -> Result<Box<dyn HwDomain>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let table = Arc::new(Mutex::new(Table::new()));
        lock(&self.state).domains.insert(id, Arc::downgrade(&table));
        Ok(Box::new(SoftDomain {
            id,
            table,
            state: self.state.clone(),
        }))
    }

    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        let mut st = lock(&self.state);
        if let Attachment::Domain(id) = to
            && !st.domains.contains_key(&id)
        {
            return Err(BackendError::new(
                "attach",
                libc::ENOENT,
                format!("{endpoint} to soft domain {id}"),
            ));
        }
        match st.attachments.get_mut(&endpoint) {
            Some(a) => {
                *a = to;
                Ok(())
            }
            None => Err(BackendError::new(
                "attach",
                libc::ENODEV,
                format!("{endpoint}"),
            )),
        }
    }

    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        lock(&self.state).ram = ram.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_ram::HostLocation;

    fn op(start: u64, end: u64, gpa: u64, perms: Perms) -> MapOp {
        MapOp {
            iova: IovaRange::new(start, end).unwrap(),
            gpa,
            host: HostLocation {
                host_addr: 0,
                file: None,
            },
            perms,
        }
    }

    #[test]
    fn translation_follows_mappings_and_permissions() {
        let b = SoftBackend::new(&[EndpointId(1)], false);
        let mut d = b.create_domain().unwrap();
        d.map(&op(0x1000, 0x1fff, 0x8000, Perms::RO)).unwrap();
        assert_eq!(
            b.translate(EndpointId(1), 0x1000, false),
            Err(Fault::Blocked)
        );
        b.attach(EndpointId(1), Attachment::Domain(d.id())).unwrap();
        assert_eq!(b.translate(EndpointId(1), 0x1234, false), Ok(0x8234));
        assert_eq!(
            b.translate(EndpointId(1), 0x1234, true),
            Err(Fault::Permission)
        );
        assert_eq!(
            b.translate(EndpointId(1), 0x2000, false),
            Err(Fault::Unmapped)
        );
    }

    #[test]
    fn overlapping_map_fails_with_eexist_and_partial_unmap_with_enoent() {
        let b = SoftBackend::new(&[], false);
        let mut d = b.create_domain().unwrap();
        d.map(&op(0x1000, 0x2fff, 0, Perms::RW)).unwrap();
        assert_eq!(
            d.map(&op(0x2000, 0x3fff, 0, Perms::RW)).unwrap_err().errno,
            libc::EEXIST
        );
        assert_eq!(
            d.unmap(IovaRange::new(0x1000, 0x1fff).unwrap())
                .unwrap_err()
                .errno,
            libc::ENOENT
        );
        d.unmap(IovaRange::new(0x1000, 0x2fff).unwrap()).unwrap();
    }

    #[test]
    fn dropping_a_domain_blocks_its_endpoints() {
        let b = SoftBackend::new(&[EndpointId(1)], true);
        let d = b.create_domain().unwrap();
        b.attach(EndpointId(1), Attachment::Domain(d.id())).unwrap();
        drop(d);
        assert_eq!(b.attachment(EndpointId(1)), Some(Attachment::Blocked));
        assert!(b.domain_sizes().is_empty());
    }
}
