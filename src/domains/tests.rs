//! Every normative rule of virtio spec §5.13.6 that the domain model implements, one test each,
//! checked against the soft backend so that "shadow == host" is verified after every step.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::backend::DmaBackend;
use crate::backend::fault::{FaultyBackend, Injector, Op};
use crate::backend::soft::{Fault, SoftBackend};
use crate::domains::RamCaps;
use crate::guest_ram::GuestRam;
use crate::guest_ram::RamRegion;
use crate::protocol::{
    ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, Request, RequestType, ResvMem,
};
use crate::protocol::{ResvKind, decode_probe_properties};

pub(super) const RAM: u64 = 16 << 20;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

struct Fx {
    topo: Topology,
    table: DomainTable,
    soft: Arc<SoftBackend>,
    faults: Arc<Injector>,
}

pub(super) fn rules() -> Rules {
    Rules {
        granule_mask: 0xfff,
        input_range: IovaRange::new(0, 0xffff_ffff_ffff).unwrap(),
        domain_range: (1, 1000),
        resv_mem: vec![ResvMem {
            kind: ResvKind::Msi,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        }],
        limits: Limits {
            max_domains: 4,
            max_mappings_per_domain: 8,
            max_mappings_total: 12,
        },
        ram_caps: RamCaps::default(),
        probe_size: 512,
    }
}

pub(super) fn ram() -> GuestRam {
    GuestRam::new(vec![RamRegion {
        gpa: crate::ids::GpaRange::with_len(0, RAM).unwrap(),
        host_addr: 0x7000_0000_0000,
        backing: None,
    }])
    .unwrap()
}

fn fx() -> Fx {
    let eps = [EndpointId(1), EndpointId(2), EndpointId(3)];
    let soft = Arc::new(SoftBackend::new(&eps, false));
    soft.set_ram(&ram()).unwrap();
    let faults = Arc::new(Injector::default());
    let backend: Arc<dyn DmaBackend> = Arc::new(FaultyBackend::new(soft.clone(), faults.clone()));
    let rules = Arc::new(rules());
    let table = DomainTable::new(
        rules.clone(),
        backend.clone(),
        Arc::new(ram()),
        Arc::new(AtomicUsize::new(0)),
    );
    Fx {
        topo: Topology::new(rules, backend, &eps, false),
        table,
        soft,
        faults,
    }
}

impl Fx {
    /// ATTACH the way the dispatcher runs it over its one shard: the topology plans, the shard
    /// creates a new domain, the topology attaches, an emptied or unused domain is destroyed.
    fn attach_with(&mut self, d: u32, e: u32, flags: u32, reserved: [u8; 4]) -> Outcome {
        let Some(plan) = self
            .topo
            .plan_attach(DomainId(d), EndpointId(e), flags, reserved)?
        else {
            return Ok(());
        };
        let (hw, created) = match plan.target() {
            AttachTarget::Existing(hw) => (hw, false),
            AttachTarget::Create(d, kind) => (self.table.create(d, kind)?, true),
        };
        match self.topo.attach(plan, hw) {
            Ok(emptied) => {
                self.destroy(emptied);
                Ok(())
            }
            Err(r) => {
                if created {
                    self.table.destroy(DomainId(d));
                }
                Err(r)
            }
        }
    }
    fn destroy(&mut self, emptied: Option<DomainId>) {
        if let Some(d) = emptied {
            self.table.destroy(d);
        }
    }
    fn attach(&mut self, d: u32, e: u32, flags: u32) -> Status {
        let s = status_of(&self.attach_with(d, e, flags, [0; 4]));
        self.check();
        s
    }
    fn detach(&mut self, d: u32, e: u32) -> Status {
        let o = self.topo.detach(DomainId(d), EndpointId(e));
        let s = status_of(&o.map(|emptied| self.destroy(emptied)));
        self.check();
        s
    }
    fn unplug(&mut self, e: u32) {
        let emptied = self.topo.unplug(EndpointId(e)).unwrap();
        self.destroy(emptied);
    }
    fn reset(&mut self, bypass: bool) {
        for d in self.topo.reset(bypass) {
            self.table.destroy(d);
        }
    }
    fn map(&mut self, d: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
        let s = status_of(
            &self
                .table
                .execute(&Request::map(d, start, end, phys, flags)),
        );
        self.check();
        s
    }
    fn unmap(&mut self, d: u32, start: u64, end: u64) -> Status {
        let s = status_of(&self.table.execute(&Request::unmap(d, start, end)));
        self.check();
        s
    }
    fn count(&self, d: u32) -> Option<usize> {
        self.table.mapping_count(DomainId(d))
    }
    fn dma(&self, e: u32, iova: u64, write: bool) -> Result<u64, Fault> {
        self.soft.translate(EndpointId(e), iova, write)
    }

    /// Shadow == host: the same mappings, and topology and shards agree on which domains exist.
    fn check(&self) {
        let mut shadow: Vec<(u64, u64, u64, bool, bool)> = self
            .table
            .snapshot()
            .iter()
            .flat_map(|d| {
                d.mappings
                    .iter()
                    .map(|m| (m.start, m.end, m.gpa, m.read, m.write))
            })
            .collect();
        let mut host: Vec<(u64, u64, u64, bool, bool)> = self
            .soft
            .domain_sizes()
            .iter()
            .flat_map(|&(id, _)| self.soft.mappings(id))
            .map(|(r, g, p)| (r.start(), r.end(), g, p.read, p.write))
            .collect();
        shadow.sort_unstable();
        host.sort_unstable();
        assert_eq!(shadow, host, "shadow state differs from the backend");
        assert_eq!(self.table.snapshot().len(), self.topo.domain_count());
        // The gauges' counts, kept as the tree changes, agree with a walk of the tree.
        let mut counted: Vec<(u32, usize, u128)> = self
            .table
            .summary()
            .iter()
            .map(|d| (d.id, d.mappings, d.mapped_bytes))
            .collect();
        counted.sort_unstable();
        let walked: Vec<(u32, usize, u128)> = self
            .table
            .snapshot()
            .iter()
            .map(|d| {
                let bytes = d
                    .mappings
                    .iter()
                    .map(|m| u128::from(m.end - m.start) + 1)
                    .sum();
                (d.id, d.mappings.len(), bytes)
            })
            .collect();
        assert_eq!(counted, walked, "summary differs from the tree");
        let paging = self
            .table
            .snapshot()
            .iter()
            .filter(|d| d.kind == DomainKind::Paging)
            .count();
        assert_eq!(
            paging,
            self.soft.domain_sizes().len(),
            "backend domains leaked"
        );
    }
}

// ---- ATTACH (§5.13.6.2) ----

#[test]
fn attach_with_reserved_bytes_set_fails_with_inval() {
    let mut f = fx();
    let o = f.attach_with(1, 1, 0, [0, 0, 1, 0]);
    assert_eq!(status_of(&o), Status::Inval);
    assert_eq!(f.topo.domain_count(), 0);
}

#[test]
fn attach_with_unknown_flag_fails_with_inval() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 2), Status::Inval);
    assert_eq!(f.attach(1, 1, 0x8000_0000), Status::Inval);
}

#[test]
fn attach_of_unknown_endpoint_fails_with_noent() {
    let mut f = fx();
    assert_eq!(f.attach(1, 99, 0), Status::NoEnt);
}

#[test]
fn attach_to_domain_outside_domain_range_fails_with_range() {
    let mut f = fx();
    assert_eq!(f.attach(0, 1, 0), Status::Range);
    assert_eq!(f.attach(1001, 1, 0), Status::Range);
}

#[test]
fn attach_creates_a_paging_domain_and_translation_follows_its_mappings() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Unmapped));
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    assert_eq!(f.dma(1, 0x1010, true), Ok(0x5010));
}

#[test]
fn attach_with_bypass_flag_mismatching_existing_domain_fails_with_inval() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(1, 2, ATTACH_F_BYPASS), Status::Inval);
    assert_eq!(f.attach(2, 2, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.attach(2, 3, 0), Status::Inval);
}

#[test]
fn attach_to_bypass_domain_gives_identity_translation() {
    let mut f = fx();
    assert_eq!(f.attach(5, 1, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.dma(1, 0x12345, true), Ok(0x12345));
    assert_eq!(f.dma(1, RAM, true), Err(Fault::NotRam));
}

#[test]
fn reattach_moves_the_endpoint_and_destroys_the_emptied_domain_with_its_mappings() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    assert_eq!(f.attach(2, 1, 0), Status::Ok);
    assert_eq!(f.count(1), None, "domain 1 must be gone");
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::NoEnt);
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Unmapped));
}

#[test]
fn reattach_keeps_the_old_domain_while_another_endpoint_uses_it() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(1, 2, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x3000, RW), Status::Ok);
    assert_eq!(
        f.dma(2, 0x1000, false),
        Ok(0x3000),
        "endpoints share the domain"
    );
    assert_eq!(f.attach(2, 1, 0), Status::Ok);
    assert_eq!(f.count(1), Some(1));
    assert_eq!(f.dma(2, 0x1000, false), Ok(0x3000));
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Unmapped));
}

#[test]
fn attach_to_the_current_domain_is_ok_and_changes_nothing() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.count(1), Some(1));
}

#[test]
fn attach_beyond_the_domain_cap_fails_with_nomem() {
    let mut f = fx();
    f.topo.rules = Arc::new(Rules {
        limits: Limits {
            max_domains: 2,
            ..rules().limits
        },
        ..rules()
    });
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(2, 2, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.attach(3, 3, 0), Status::NoMem);
    assert_eq!(f.topo.domain_count(), 2);
    // Joining an existing domain needs no new one.
    assert_eq!(f.attach(1, 3, 0), Status::Ok);
}

#[test]
fn attach_rolls_back_the_new_domain_when_the_backend_attach_fails() {
    let mut f = fx();
    f.faults.fail(Op::Attach, 0, 1, libc::EBUSY);
    assert_eq!(f.attach(1, 1, 0), Status::DevErr);
    assert_eq!(f.topo.domain_count(), 0);
    assert!(
        f.soft.domain_sizes().is_empty(),
        "the created backend domain leaked"
    );
    assert_eq!(f.dma(1, 0, false), Err(Fault::Blocked));
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
}

#[test]
fn attach_failing_to_create_the_domain_reports_the_errno_status() {
    let mut f = fx();
    f.faults.fail(Op::CreateDomain, 0, 1, libc::ENOMEM);
    assert_eq!(f.attach(1, 1, 0), Status::NoMem);
    assert_eq!(f.topo.endpoints()[0].domain, None);
}

#[test]
fn failed_move_leaves_the_endpoint_in_its_old_domain() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x2000, RW), Status::Ok);
    f.faults.fail(Op::Attach, 0, 1, libc::EINVAL);
    assert_eq!(f.attach(2, 1, 0), Status::Inval);
    assert_eq!(f.dma(1, 0x1000, false), Ok(0x2000));
    assert_eq!(f.topo.endpoints()[0].domain, Some(1));
}

// ---- DETACH (§5.13.6.3) ----

#[test]
fn detach_of_unknown_endpoint_fails_with_noent() {
    let mut f = fx();
    assert_eq!(f.detach(1, 42), Status::NoEnt);
}

#[test]
fn detach_from_a_domain_the_endpoint_is_not_attached_to_fails_with_inval() {
    let mut f = fx();
    assert_eq!(f.detach(1, 1), Status::Inval);
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(2, 2, 0), Status::Ok);
    assert_eq!(f.detach(2, 1), Status::Inval);
    assert_eq!(
        f.dma(1, 0, false),
        Err(Fault::Unmapped),
        "still attached to domain 1"
    );
}

#[test]
fn detach_blocks_the_endpoint_and_destroys_its_last_domain() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    assert_eq!(f.detach(1, 1), Status::Ok);
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Blocked));
    assert_eq!(f.count(1), None);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::NoEnt);
}

#[test]
fn detach_with_bypass_set_leaves_the_endpoint_in_identity() {
    let mut f = fx();
    f.topo.set_bypass(true).unwrap();
    assert_eq!(f.dma(1, 0x4000, true), Ok(0x4000));
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.dma(1, 0x4000, true), Err(Fault::Unmapped));
    assert_eq!(f.detach(1, 1), Status::Ok);
    assert_eq!(f.dma(1, 0x4000, true), Ok(0x4000));
    f.topo.set_bypass(false).unwrap();
    assert_eq!(f.dma(1, 0x4000, true), Err(Fault::Blocked));
}

#[test]
fn detach_keeps_a_domain_other_endpoints_still_use() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(1, 2, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    assert_eq!(f.detach(1, 1), Status::Ok);
    assert_eq!(f.dma(2, 0x1000, false), Ok(0x1000));
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Blocked));
}

// ---- MAP (§5.13.6.4) ----

fn attached() -> Fx {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    f
}

#[test]
fn map_status_table() {
    // (what, domain, virt_start, virt_end, phys_start, flags, status)
    let cases: &[(&str, u32, u64, u64, u64, u32, Status)] = &[
        ("unknown flag", 1, 0x1000, 0x1fff, 0x1000, 8, Status::Inval),
        (
            "unknown high flag",
            1,
            0x1000,
            0x1fff,
            0x1000,
            1 << 31,
            Status::Inval,
        ),
        (
            "no such domain",
            2,
            0x1000,
            0x1fff,
            0x1000,
            RW,
            Status::NoEnt,
        ),
        (
            "domain out of range",
            0,
            0x1000,
            0x1fff,
            0x1000,
            RW,
            Status::Range,
        ),
        (
            "mmio",
            1,
            0x1000,
            0x1fff,
            0x1000,
            RW | MAP_F_MMIO,
            Status::Unsupp,
        ),
        (
            "virt_start misaligned",
            1,
            0x1001,
            0x1fff,
            0x1000,
            RW,
            Status::Range,
        ),
        (
            "virt_end+1 misaligned",
            1,
            0x1000,
            0x1ffe,
            0x1000,
            RW,
            Status::Range,
        ),
        (
            "phys_start misaligned",
            1,
            0x1000,
            0x1fff,
            0x1800,
            RW,
            Status::Range,
        ),
        (
            "end before start",
            1,
            0x2000,
            0x0fff,
            0x1000,
            RW,
            Status::Range,
        ),
        (
            "outside input range",
            1,
            0x1_0000_0000_0000,
            0x1_0000_0000_0fff,
            0,
            RW,
            Status::Range,
        ),
        (
            "straddles input end",
            1,
            0xffff_ffff_f000,
            0x1_0000_0000_0fff,
            0,
            RW,
            Status::Range,
        ),
        (
            "msi window",
            1,
            0xfee0_0000,
            0xfee0_0fff,
            0x1000,
            RW,
            Status::Inval,
        ),
        (
            "covers msi window",
            1,
            0xf000_0000,
            0xffff_ffff,
            0,
            RW,
            Status::Inval,
        ),
        ("gpa beyond ram", 1, 0x1000, 0x1fff, RAM, RW, Status::Fault),
        (
            "gpa straddles ram end",
            1,
            0x1000,
            0x2fff,
            RAM - 0x1000,
            RW,
            Status::Fault,
        ),
        (
            "gpa wraps",
            1,
            0x1000,
            0x2fff,
            0xffff_ffff_ffff_f000,
            RW,
            Status::Fault,
        ),
        ("whole space", 1, 0, u64::MAX, 0, RW, Status::Range),
        ("ok read-write", 1, 0x1000, 0x1fff, 0x1000, RW, Status::Ok),
        (
            "ok read-only",
            1,
            0x1000,
            0x1fff,
            0x1000,
            MAP_F_READ,
            Status::Ok,
        ),
        ("ok no access", 1, 0x1000, 0x1fff, 0x1000, 0, Status::Ok),
        (
            "ok 2 MiB",
            1,
            0x20_0000,
            0x3f_ffff,
            0x20_0000,
            RW,
            Status::Ok,
        ),
    ];
    for &(what, d, s, e, p, flags, want) in cases {
        let mut f = attached();
        assert_eq!(f.map(d, s, e, p, flags), want, "{what}");
        let expect = usize::from(want == Status::Ok);
        assert_eq!(f.count(1), Some(expect), "{what}: mapping count");
    }
}

#[test]
fn map_on_a_bypass_domain_fails_with_inval() {
    let mut f = fx();
    assert_eq!(f.attach(3, 1, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.map(3, 0x1000, 0x1fff, 0x1000, RW), Status::Inval);
}

#[test]
fn map_overlapping_an_existing_mapping_fails_with_inval() {
    let mut f = attached();
    assert_eq!(f.map(1, 0x2000, 0x3fff, 0x2000, RW), Status::Ok);
    for (s, e) in [
        (0x1000, 0x2fff),
        (0x3000, 0x4fff),
        (0x2000, 0x3fff),
        (0x1000, 0x4fff),
        (0x2000, 0x2fff),
    ] {
        assert_eq!(f.map(1, s, e, 0, RW), Status::Inval, "{s:#x}..={e:#x}");
    }
    assert_eq!(
        f.map(1, 0x1000, 0x1fff, 0, RW),
        Status::Ok,
        "adjacent below"
    );
    assert_eq!(
        f.map(1, 0x4000, 0x4fff, 0, RW),
        Status::Ok,
        "adjacent above"
    );
    assert_eq!(f.count(1), Some(3));
}

#[test]
fn read_only_mapping_refuses_device_writes() {
    let mut f = attached();
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x8000, MAP_F_READ), Status::Ok);
    assert_eq!(f.dma(1, 0x1000, false), Ok(0x8000));
    assert_eq!(f.dma(1, 0x1000, true), Err(Fault::Permission));
}

#[test]
fn map_beyond_the_per_domain_cap_fails_with_nomem() {
    let mut f = attached();
    for i in 0..8 {
        assert_eq!(f.map(1, i << 12, (i << 12) + 0xfff, 0, RW), Status::Ok);
    }
    assert_eq!(f.map(1, 8 << 12, (8 << 12) + 0xfff, 0, RW), Status::NoMem);
    assert_eq!(f.unmap(1, 0, 0xfff), Status::Ok);
    assert_eq!(f.map(1, 8 << 12, (8 << 12) + 0xfff, 0, RW), Status::Ok);
}

#[test]
fn map_beyond_the_total_cap_fails_with_nomem_in_any_domain() {
    let mut f = attached();
    assert_eq!(f.attach(2, 2, 0), Status::Ok);
    for i in 0..8 {
        assert_eq!(f.map(1, i << 12, (i << 12) + 0xfff, 0, RW), Status::Ok);
    }
    for i in 0..4 {
        assert_eq!(f.map(2, i << 12, (i << 12) + 0xfff, 0, RW), Status::Ok);
    }
    assert_eq!(f.map(2, 4 << 12, (4 << 12) + 0xfff, 0, RW), Status::NoMem);
    // Destroying a domain gives its share back.
    assert_eq!(f.detach(1, 1), Status::Ok);
    assert_eq!(f.map(2, 4 << 12, (4 << 12) + 0xfff, 0, RW), Status::Ok);
}

#[test]
fn map_failing_in_the_backend_reports_the_errno_status_and_keeps_no_shadow_entry() {
    for (errno, want) in [
        (libc::ENOMEM, Status::NoMem),
        (libc::EFAULT, Status::Fault),
        (libc::EBUSY, Status::DevErr),
        (libc::EINVAL, Status::Inval),
        (libc::ENOENT, Status::NoEnt),
    ] {
        let mut f = attached();
        f.faults.fail(Op::Map, 0, 1, errno);
        assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), want, "errno {errno}");
        assert_eq!(f.count(1), Some(0));
        assert_eq!(
            f.map(1, 0x1000, 0x1fff, 0x1000, RW),
            Status::Ok,
            "errno {errno}: retry"
        );
    }
}

// ---- UNMAP (§5.13.6.5) ----

#[test]
fn unmap_of_no_domain_fails_with_noent_and_of_bypass_domain_with_inval() {
    let mut f = fx();
    assert_eq!(f.unmap(1, 0, 0xfff), Status::NoEnt);
    assert_eq!(f.attach(2, 1, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.unmap(2, 0, 0xfff), Status::Inval);
}

#[test]
fn unmap_that_splits_a_mapping_fails_with_range_and_removes_nothing() {
    let mut f = attached();
    assert_eq!(f.map(1, 0, 0x9fff, 0, RW), Status::Ok);
    assert_eq!(f.map(1, 0x10000, 0x10fff, 0, RW), Status::Ok);
    assert_eq!(
        f.unmap(1, 0, 0x4fff),
        Status::Range,
        "spec example: map 0-9, unmap 0-4"
    );
    assert_eq!(f.unmap(1, 0x1000, 0x10fff), Status::Range, "starts inside");
    assert_eq!(
        f.unmap(1, 0x10000, 0x107ff),
        Status::Range,
        "ends inside the second"
    );
    assert_eq!(
        f.unmap(1, 0, 0x107ff),
        Status::Range,
        "first whole, second split"
    );
    assert_eq!(f.count(1), Some(2));
    assert_eq!(f.dma(1, 0x9000, false), Ok(0x9000));
}

#[test]
fn unmap_over_holes_removes_every_covered_mapping() {
    let mut f = attached();
    assert_eq!(f.map(1, 0, 0x4fff, 0, RW), Status::Ok);
    assert_eq!(
        f.unmap(1, 0, 0x9fff),
        Status::Ok,
        "spec example: map 0-4, unmap 0-9"
    );
    assert_eq!(f.count(1), Some(0));
    for i in [1u64, 3, 5, 7] {
        assert_eq!(f.map(1, i << 12, (i << 12) + 0xfff, 0, RW), Status::Ok);
    }
    assert_eq!(f.unmap(1, 0x2000, 0x6fff), Status::Ok);
    assert_eq!(f.count(1), Some(2));
    assert_eq!(f.dma(1, 0x1000, false), Ok(0));
    assert_eq!(f.dma(1, 0x3000, false), Err(Fault::Unmapped));
    assert_eq!(f.unmap(1, 0, u64::MAX), Status::Ok, "everything");
    assert_eq!(f.count(1), Some(0));
}

#[test]
fn unmap_over_nothing_is_ok() {
    let mut f = attached();
    assert_eq!(f.unmap(1, 0x1000, 0x1fff), Status::Ok);
    assert_eq!(f.unmap(1, 0x2000, 0x1fff), Status::Range, "reversed range");
}

#[test]
fn unmap_failing_midway_keeps_shadow_and_backend_equal() {
    let mut f = attached();
    for i in 0..4u64 {
        assert_eq!(f.map(1, i << 12, (i << 12) + 0xfff, 0, RW), Status::Ok);
    }
    f.faults.fail(Op::Unmap, 2, 1, libc::EBUSY);
    assert_eq!(f.unmap(1, 0, 0x3fff), Status::DevErr);
    assert_eq!(f.count(1), Some(2), "two removed before the failure");
    assert_eq!(f.unmap(1, 0, 0x3fff), Status::Ok);
    assert_eq!(f.count(1), Some(0));
}

// ---- PROBE (§5.13.6.6) ----

#[test]
fn probe_reports_the_msi_window_and_zero_fills() {
    let f = fx();
    let mut out = [0xaau8; 512];
    assert_eq!(
        status_of(&f.topo.probe(EndpointId(1), &mut out)),
        Status::Ok
    );
    let props = decode_probe_properties(&out).unwrap();
    assert_eq!(props, rules().resv_mem);
    assert!(out[24..].iter().all(|&b| b == 0));
}

#[test]
fn probe_of_unknown_endpoint_fails_with_noent() {
    let f = fx();
    let mut out = [0u8; 512];
    assert_eq!(
        status_of(&f.topo.probe(EndpointId(77), &mut out)),
        Status::NoEnt
    );
}

// ---- reset and memory changes ----

#[test]
fn reset_detaches_everything_and_destroys_every_domain() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(2, 2, ATTACH_F_BYPASS), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    f.reset(false);
    f.check();
    assert_eq!(f.topo.domain_count(), 0);
    assert!(f.table.snapshot().is_empty());
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Blocked));
    assert_eq!(f.dma(2, 0x1000, false), Err(Fault::Blocked));
    f.reset(true);
    assert_eq!(
        f.dma(2, 0x1000, false),
        Ok(0x1000),
        "boot bypass after reset"
    );
}

#[test]
fn mappings_outside_a_shrunk_memory_table_are_torn_down() {
    let mut f = attached();
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    assert_eq!(f.map(1, 0x2000, 0x2fff, RAM - 0x1000, RW), Status::Ok);
    let small = GuestRam::new(vec![RamRegion {
        gpa: crate::ids::GpaRange::with_len(0, RAM / 2).unwrap(),
        host_addr: 0x7000_0000_0000,
        backing: None,
    }])
    .unwrap();
    assert_eq!(f.table.set_ram(Arc::new(small)), 1);
    f.check();
    assert_eq!(f.dma(1, 0x1000, false), Ok(0x1000));
    assert_eq!(f.dma(1, 0x2000, false), Err(Fault::Unmapped));
    assert_eq!(f.map(1, 0x2000, 0x2fff, RAM - 0x1000, RW), Status::Fault);
}

#[test]
fn mappings_whose_memory_moved_are_torn_down() {
    let mut f = attached();
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    let moved = GuestRam::new(vec![RamRegion {
        gpa: crate::ids::GpaRange::with_len(0, RAM).unwrap(),
        host_addr: 0x6000_0000_0000,
        backing: None,
    }])
    .unwrap();
    assert_eq!(f.table.set_ram(Arc::new(moved)), 1);
    assert_eq!(f.count(1), Some(0));
}

#[test]
fn unplug_detaches_the_endpoint_and_blocks_it_until_the_guest_attaches_again() {
    let mut f = fx();
    assert_eq!(f.attach(1, 1, 0), Status::Ok);
    assert_eq!(f.attach(1, 2, 0), Status::Ok);
    assert_eq!(f.map(1, 0x1000, 0x1fff, 0x1000, RW), Status::Ok);
    f.unplug(1);
    f.check();
    assert_eq!(f.dma(1, 0x1000, false), Err(Fault::Blocked));
    assert_eq!(
        f.dma(2, 0x1000, false),
        Ok(0x1000),
        "the other endpoint keeps the domain"
    );
    f.unplug(2);
    f.check();
    assert_eq!(f.count(1), None, "the emptied domain is destroyed");
    f.unplug(2);
    assert_eq!(f.attach(3, 1, 0), Status::Ok);
}

#[test]
fn a_bypass_write_the_backend_refuses_midway_is_rolled_back_on_every_endpoint() {
    let mut f = fx();
    // Endpoints 1, 2, 3 are unattached and blocked; the second re-attach to identity fails.
    f.faults.fail(Op::Attach, 1, 1, libc::EBUSY);
    assert!(f.topo.set_bypass(true).is_err());
    assert!(!f.topo.bypass(), "bypass kept its old value");
    for e in 1..=3 {
        assert_eq!(
            f.dma(e, 0x1000, false),
            Err(Fault::Blocked),
            "endpoint {e} went back to blocked"
        );
    }
    // The next write goes through on all of them.
    assert!(f.topo.set_bypass(true).is_ok());
    for e in 1..=3 {
        assert_eq!(
            f.dma(e, 0x1000, false),
            Ok(0x1000),
            "endpoint {e} in identity"
        );
    }
}

#[test]
fn a_shard_executes_map_and_unmap_and_refuses_other_requests() {
    let mut f = attached();
    let map = Request::map(1, 0x1000, 0x1fff, 0x1000, RW);
    assert_eq!(status_of(&f.table.execute(&map)), Status::Ok);
    f.check();
    assert_eq!(
        status_of(&f.table.execute(&Request::unmap(1, 0x1000, 0x1fff))),
        Status::Ok
    );
    f.check();
    let r = f.table.execute(&Request::attach(1, 2)).unwrap_err();
    assert_eq!(r.status, Status::DevErr);
    assert_eq!(
        r.reason,
        Reason::Internal(Internal::NotForShard(RequestType::Attach)),
        "not the guest's doing"
    );
    // A rule the guest broke is told apart from the daemon's own failure.
    let r = f
        .table
        .execute(&Request::map(1, 0x1001, 0x1fff, 0, RW))
        .unwrap_err();
    assert_eq!(r.reason, Reason::Rule(Rule::Misaligned(0x1001)));
}

#[test]
fn mapping_caps_left_unset_follow_guest_ram_and_set_ones_stay() {
    assert_eq!(RamCaps::mappings_for(0), RamCaps::FLOOR);
    assert_eq!(RamCaps::mappings_for(64 << 20), RamCaps::FLOOR);
    assert_eq!(RamCaps::mappings_for(1 << 30), 2 * 262_144);
    assert_eq!(RamCaps::mappings_for(1 << 40), RamCaps::CEILING);
    assert_eq!(RamCaps::mappings_for(u64::MAX), RamCaps::CEILING);

    let caps = RamCaps {
        per_domain: true,
        total: false,
    };
    let fixed = rules().limits;
    let table = |r: Rules| {
        DomainTable::new(
            Arc::new(r),
            Arc::new(SoftBackend::new(&[], false)),
            Arc::new(ram()),
            Arc::new(AtomicUsize::new(0)),
        )
    };
    let mut t = table(rules().with_ram_caps(caps));
    // Before a memory table: the floor; the configured total stays.
    assert_eq!(t.limits().max_mappings_per_domain, RamCaps::FLOOR);
    assert_eq!(t.limits().max_mappings_total, fixed.max_mappings_total);
    let big = GuestRam::new(vec![RamRegion {
        gpa: crate::ids::GpaRange::with_len(0, 1 << 30).unwrap(),
        host_addr: 0x7000_0000_0000,
        backing: None,
    }])
    .unwrap();
    t.set_ram(Arc::new(big));
    assert_eq!(t.limits().max_mappings_per_domain, 524_288);
    assert_eq!(t.limits().max_mappings_total, fixed.max_mappings_total);
    t.set_ram(Arc::new(ram()));
    assert_eq!(t.limits().max_mappings_per_domain, RamCaps::FLOOR);
    // Rules without RAM caps keep their numbers at every table.
    let mut plain = table(rules());
    plain.set_ram(Arc::new(ram()));
    assert_eq!(plain.limits(), fixed);
}
