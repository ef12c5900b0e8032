//! Micro-benchmarks of the per-request hot pieces: decode, the domain model's map/unmap on a
//! large tree, and the soft backend's raw map/unmap loop they are compared with.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use criterion::{Criterion, criterion_group, criterion_main};
use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::soft::SoftBackend;
use vhost_user_iommu::backend::{HostConstraints, MapOp};
use vhost_user_iommu::domains::{DomainKind, DomainTable, Limits, Rules};
use vhost_user_iommu::guest_ram::{GuestRam, HostLocation, RamRegion};
use vhost_user_iommu::ids::{DomainId, GpaRange, IovaRange, Perms};
use vhost_user_iommu::protocol::Request;

fn rules(c: &HostConstraints) -> Rules {
    Rules::for_host(c, (0, u32::MAX), Limits::default(), 512)
}

fn ram() -> GuestRam {
    GuestRam::new(vec![RamRegion {
        gpa: GpaRange::with_len(0, 1 << 32).unwrap(),
        host_addr: 0x7000_0000_0000,
        backing: None,
    }])
    .unwrap()
}

fn decode(c: &mut Criterion) {
    let (bytes, n) = Request::map(2, 0x1000, 0x1fff, 0x5000, 3).encode();
    c.bench_function("decode MAP", |b| {
        b.iter(|| Request::decode(black_box(&bytes[..n])))
    });
}

fn map_unmap(c: &mut Criterion) {
    let soft: Arc<dyn DmaBackend> = Arc::new(SoftBackend::new(&[], false));
    let mut table = DomainTable::new(
        Arc::new(rules(&soft.constraints())),
        soft.clone(),
        Arc::new(ram()),
        Arc::new(AtomicUsize::new(0)),
    );
    table.create(DomainId(1), DomainKind::Paging).unwrap();
    // A large tree: 100k live 4 KiB mappings, every other page.
    for i in 0..100_000u64 {
        table
            .execute(&Request::map(1, i << 13, (i << 13) + 0xfff, 0, 3))
            .unwrap();
    }
    let iova = 1u64 << 40;
    c.bench_function("domain model MAP+UNMAP 4K (100k-entry tree)", |b| {
        b.iter(|| {
            table
                .execute(&Request::map(1, iova, iova + 0xfff, 0x1000, 3))
                .unwrap();
            table
                .execute(&Request::unmap(1, iova, iova + 0xfff))
                .unwrap();
        })
    });
    let mut raw = soft.create_domain().unwrap();
    let op = MapOp {
        iova: IovaRange::new(iova, iova + 0xfff).unwrap(),
        gpa: 0x1000,
        host: HostLocation {
            host_addr: 0,
            file: None,
        },
        perms: Perms::RW,
    };
    c.bench_function("raw soft backend MAP+UNMAP 4K", |b| {
        b.iter(|| {
            raw.map(black_box(&op)).unwrap();
            raw.unmap(op.iova).unwrap();
        })
    });
}

/// The pipeline hand-off: one MAP and one UNMAP through the dispatcher to an executor thread and
/// back, against the same pair executed inline.
fn handoff(c: &mut Criterion) {
    use vhost_user_iommu::pipeline::{Dispatcher, Mode, Submitted};
    let map = Request::map(1, 1 << 30, (1 << 30) + 0xfff, 0x1000, 3);
    let unmap = Request::unmap(1, 1 << 30, (1 << 30) + 0xfff);
    for (name, mode) in [("inline", Mode::Inline), ("pipeline(1)", Mode::Pipeline(1))] {
        let eps = [vhost_user_iommu::ids::EndpointId(1)];
        let soft: Arc<dyn DmaBackend> = Arc::new(SoftBackend::new(&eps, false));
        let mut d = Dispatcher::new(
            mode,
            rules(&soft.constraints()),
            soft,
            &eps,
            false,
            Arc::new(ram()),
        )
        .expect("dispatcher");
        let mut probe = [0u8; 512];
        let attach = Request::Attach {
            domain: DomainId(1),
            endpoint: eps[0],
            flags: 0,
            reserved: [0; 4],
        };
        let _ = d.submit(attach, 0, &mut probe);
        c.bench_function(&format!("MAP+UNMAP hand-off, {name}"), |b| {
            b.iter(|| {
                for r in [map, unmap] {
                    if let Submitted::Queued = d.submit(r, 1, &mut probe) {
                        d.wait_idle();
                        d.completed().for_each(|c| {
                            let _ = black_box(c);
                        });
                    }
                }
            })
        });
    }
}

criterion_group!(benches, decode, map_unmap, handoff);
criterion_main!(benches);
