//! The domain model, through the dispatcher that runs it (inline), driven by arbitrary request
//! sequences, with the invariants checked after
//! every step: statuses agree with the spec model in `testing`; the shadow state equals the
//! backend's; every mapping lies inside guest RAM, outside reserved regions, without overlap;
//! an unattached endpoint reaches nothing.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::soft::{Fault, SoftBackend};
use vhost_user_iommu::domains::{Limits, RamCaps, Rules, status_of};
use vhost_user_iommu::guest_ram::{GuestRam, RamRegion};
use vhost_user_iommu::ids::{DomainId, EndpointId, Gpa, GpaRange, Iova};
use vhost_user_iommu::pipeline::{Dispatcher, Mode, Submitted};
use vhost_user_iommu::protocol::{MapFlags, MapRequest, Request};
use vhost_user_iommu::testing::{ENDPOINTS, Model, PAGE, RAM};

fn le64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(v)
}

/// 16 bytes → one request with fields drawn near the rules' edges.
fn request(c: &[u8]) -> Request {
    let domain = DomainId(u32::from(c[1] % 6));
    let endpoint = EndpointId(u32::from(c[2] % 6));
    let page = |b: u8| u64::from(b % 64) * PAGE;
    let fine = if c[3] & 0x80 != 0 {
        u64::from(c[3] & 0x7f)
    } else {
        0
    };
    match c[0] % 5 {
        0 => Request::Attach {
            domain,
            endpoint,
            flags: u32::from(c[4] % 4),
            reserved: if c[5] == 0xff { [1, 0, 0, 0] } else { [0; 4] },
        },
        1 => Request::Detach { domain, endpoint },
        2 => {
            let s = page(c[4]) + fine;
            let len = u64::from(c[5] % 8 + 1) * PAGE;
            let phys = match c[6] % 8 {
                0 => le64(&c[8..16]),
                1 => RAM - PAGE,
                _ => u64::from(c[7]) * PAGE * 8,
            };
            Request::Map(MapRequest {
                domain,
                virt_start: Iova(s),
                virt_end: Iova((s + len - 1).wrapping_sub(u64::from(c[6] >> 7))),
                phys_start: Gpa(phys),
                flags: MapFlags(u32::from(c[7] % 16)),
            })
        }
        3 => {
            let s = page(c[4]);
            let e = if c[5] == 0xff {
                u64::MAX
            } else {
                s + u64::from(c[5] % 16) * PAGE + PAGE - 1
            };
            Request::Unmap {
                domain,
                virt_start: Iova(s),
                virt_end: Iova(if c[6] == 0xff { s.wrapping_sub(1) } else { e }),
                reserved: [0; 4],
            }
        }
        _ => Request::Probe { endpoint },
    }
}

fuzz_target!(|data: &[u8]| {
    let eps: Vec<EndpointId> = ENDPOINTS.iter().map(|&e| EndpointId(e)).collect();
    let soft = Arc::new(SoftBackend::new(&eps, false));
    let ram = GuestRam::new(vec![RamRegion {
        gpa: GpaRange::with_len(0, RAM).unwrap(),
        host_addr: 0x7000_0000_0000,
        backing: None,
    }])
    .unwrap();
    soft.set_ram(&ram).unwrap();
    let backend: Arc<dyn DmaBackend> = soft.clone();
    let c = backend.constraints();
    let rules = Rules {
        granule_mask: PAGE - 1,
        input_range: c.input_range,
        domain_range: (0, u32::MAX),
        resv_mem: c.reserved.clone(),
        limits: Limits::default(),
        ram_caps: RamCaps::default(),
        probe_size: 512,
    };
    let mut d = Dispatcher::new(Mode::Inline, rules, backend, &eps, false, Arc::new(ram)).unwrap();
    let mut model = Model::default();
    let mut probe = [0u8; 512];
    for (token, chunk) in data.chunks_exact(16).enumerate() {
        let req = request(chunk);
        let outcome = match d.submit(req.clone(), token as u64, &mut probe) {
            Submitted::Done(o) => o,
            Submitted::Queued => unreachable!("inline mode finishes every request"),
        };
        assert_eq!(
            d.completed().count(),
            0,
            "inline mode completes nothing later"
        );
        let got = status_of(&outcome);
        assert_eq!(got, model.apply(&req), "{req:?}");
        let (domains, endpoints) = d.snapshot();
        // Shadow == backend, mapping by mapping.
        let mut shadow: Vec<(u64, u64, u64)> = domains
            .iter()
            .flat_map(|d| d.mappings.iter().map(|m| (m.start, m.end, m.gpa)))
            .collect();
        let mut host: Vec<(u64, u64, u64)> = soft
            .domain_sizes()
            .iter()
            .flat_map(|&(id, _)| soft.mappings(id))
            .map(|(r, g, _)| (r.start(), r.end(), g))
            .collect();
        shadow.sort_unstable();
        host.sort_unstable();
        assert_eq!(shadow, host);
        for d in &domains {
            for m in &d.mappings {
                assert!(m.gpa + (m.end - m.start) < RAM, "mapping outside guest RAM");
                assert!(
                    m.end < 0xfee0_0000 || m.start > 0xfeef_ffff,
                    "mapping over the MSI window"
                );
            }
            for w in d.mappings.windows(2) {
                assert!(w[0].end < w[1].start, "overlapping mappings");
            }
        }
        for e in &endpoints {
            if e.domain.is_none() {
                assert_eq!(
                    soft.translate(EndpointId(e.id), 0x1000, false),
                    Err(Fault::Blocked)
                );
            }
        }
    }
});
