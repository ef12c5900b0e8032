//! Thousands of random requests over the socket, each status checked against a small, separate
//! model of the virtio-iommu spec written from §5.13.6 alone (linear scans, no shared code with
//! the daemon's domain model), and the final translation checked against the model's mappings.

mod common;

use std::collections::BTreeMap;

use common::{Daemon, ENDPOINTS, Options};
use vhost_user_iommu::backend::soft::Fault;
use vhost_user_iommu::driver::VmOptions;
use vhost_user_iommu::ids::{DomainId, EndpointId};
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{Request, Status};

const PAGE: u64 = 0x1000;
const RAM: u64 = 16 << 20;

#[derive(Default)]
struct MDomain {
    bypass: bool,
    /// (start, end, phys, flags)
    maps: Vec<(u64, u64, u64, u32)>,
}

#[derive(Default)]
struct Model {
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, MDomain>,
}

impl Model {
    fn users(&self, d: u32) -> usize {
        self.attached.values().filter(|&&x| x == d).count()
    }

    fn leave(&mut self, e: u32) {
        if let Some(old) = self.attached.remove(&e)
            && self.users(old) == 0
        {
            self.domains.remove(&old);
        }
    }

    fn apply(&mut self, r: &Request) -> Status {
        match *r {
            Request::Attach {
                domain: DomainId(d),
                endpoint: EndpointId(e),
                flags,
                reserved,
            } => {
                if reserved != [0; 4] || flags > 1 {
                    return Status::Inval;
                }
                if !ENDPOINTS.contains(&e) {
                    return Status::NoEnt;
                }
                let bypass = flags == 1;
                if let Some(dom) = self.domains.get(&d)
                    && dom.bypass != bypass
                {
                    return Status::Inval;
                }
                if self.attached.get(&e) == Some(&d) {
                    return Status::Ok;
                }
                self.domains.entry(d).or_insert(MDomain {
                    bypass,
                    maps: Vec::new(),
                });
                self.leave(e);
                self.attached.insert(e, d);
                Status::Ok
            }
            Request::Detach {
                domain: DomainId(d),
                endpoint: EndpointId(e),
            } => {
                if !ENDPOINTS.contains(&e) {
                    return Status::NoEnt;
                }
                if self.attached.get(&e) != Some(&d) {
                    return Status::Inval;
                }
                self.leave(e);
                Status::Ok
            }
            Request::Map {
                domain: DomainId(d),
                virt_start: s,
                virt_end: e,
                phys_start: p,
                flags,
            } => {
                if flags & !7 != 0 {
                    return Status::Inval;
                }
                let Some(dom) = self.domains.get_mut(&d) else {
                    return Status::NoEnt;
                };
                if dom.bypass {
                    return Status::Inval;
                }
                if flags & 4 != 0 {
                    return Status::Unsupp;
                }
                if e < s || s % PAGE != 0 || p % PAGE != 0 || e.wrapping_add(1) % PAGE != 0 {
                    return Status::Range;
                }
                if dom.maps.iter().any(|m| m.0 <= e && s <= m.1) {
                    return Status::Inval;
                }
                if (0xfee0_0000..=0xfeef_ffff).contains(&s) || (s < 0xfee0_0000 && e >= 0xfee0_0000)
                {
                    return Status::Inval;
                }
                let len = e - s + 1;
                if p.checked_add(len).is_none_or(|end| end > RAM) {
                    return Status::Fault;
                }
                dom.maps.push((s, e, p, flags));
                Status::Ok
            }
            Request::Unmap {
                domain: DomainId(d),
                virt_start: s,
                virt_end: e,
                ..
            } => {
                let Some(dom) = self.domains.get_mut(&d) else {
                    return Status::NoEnt;
                };
                if dom.bypass {
                    return Status::Inval;
                }
                if e < s {
                    return Status::Range;
                }
                let touched = |m: &(u64, u64, u64, u32)| m.0 <= e && s <= m.1;
                let inside = |m: &(u64, u64, u64, u32)| s <= m.0 && m.1 <= e;
                if dom.maps.iter().any(|m| touched(m) && !inside(m)) {
                    return Status::Range;
                }
                dom.maps.retain(|m| !inside(m));
                Status::Ok
            }
            Request::Probe {
                endpoint: EndpointId(e),
            } => {
                if ENDPOINTS.contains(&e) {
                    Status::Ok
                } else {
                    Status::NoEnt
                }
            }
        }
    }

    /// Where the model says a DMA lands.
    fn translate(&self, e: u32, iova: u64, write: bool) -> Result<u64, Fault> {
        let Some(d) = self.attached.get(&e) else {
            return Err(Fault::Blocked);
        };
        let dom = &self.domains[d];
        if dom.bypass {
            return if iova < RAM {
                Ok(iova)
            } else {
                Err(Fault::NotRam)
            };
        }
        let m = dom
            .maps
            .iter()
            .find(|m| m.0 <= iova && iova <= m.1)
            .ok_or(Fault::Unmapped)?;
        let allowed = if write { m.3 & 2 != 0 } else { m.3 & 1 != 0 };
        if !allowed {
            return Err(Fault::Permission);
        }
        Ok(m.2 + (iova - m.0))
    }
}

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_request(r: &mut Rng) -> Request {
    let domain = DomainId(1 + r.below(5) as u32);
    let endpoint = EndpointId(1 + r.below(5) as u32); // 5 is unknown
    let page = |r: &mut Rng| r.below(48) * PAGE;
    match r.below(100) {
        0..=11 => Request::Attach {
            domain,
            endpoint,
            flags: [0, 0, 0, 0, 1, 2][r.below(6) as usize],
            reserved: if r.below(20) == 0 {
                [0, 1, 0, 0]
            } else {
                [0; 4]
            },
        },
        12..=17 => Request::Detach { domain, endpoint },
        18..=20 => Request::Probe { endpoint },
        21..=64 => {
            let s = page(r) + if r.below(30) == 0 { 0x800 } else { 0 };
            let len = (1 + r.below(4)) * PAGE;
            let phys = match r.below(20) {
                0 => RAM - PAGE,
                1 => !0xfff,
                _ => r.below(RAM / PAGE) * PAGE,
            };
            Request::Map {
                domain,
                virt_start: s,
                virt_end: s + len - 1 - if r.below(30) == 0 { 1 } else { 0 },
                phys_start: phys,
                flags: [3, 3, 3, 1, 2, 0, 4, 8][r.below(8) as usize],
            }
        }
        _ => {
            let s = page(r);
            let len = (1 + r.below(8)) * PAGE;
            let (s, e) = if r.below(25) == 0 {
                (s + len, s)
            } else {
                (s, s + len - 1)
            };
            Request::Unmap {
                domain,
                virt_start: s,
                virt_end: e,
                reserved: [0; 4],
            }
        }
    }
}

fn run(mode: Mode, seed: u64, count: usize) {
    let d = Daemon::start(Options {
        mode,
        ..Options::default()
    });
    let mut vm = d.connect_with(VmOptions {
        ram_size: RAM,
        ..VmOptions::default()
    });
    assert!(vm.usable_ram_end() <= RAM);
    let mut model = Model::default();
    let mut rng = Rng(seed);
    let mut done = 0;
    while done < count {
        let n = 1 + rng.below(12) as usize;
        let reqs: Vec<Request> = (0..n).map(|_| random_request(&mut rng)).collect();
        let want: Vec<Status> = reqs.iter().map(|r| model.apply(r)).collect();
        let got = vm.batch(&reqs).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i],
                want[i],
                "{mode:?} seed {seed}: request #{} {:?}",
                done + i,
                reqs[i]
            );
        }
        done += n;
    }
    // Translation agrees with the model everywhere the test could have mapped.
    for &e in &ENDPOINTS {
        for page in 0..56 {
            let iova = page * PAGE + 0x10;
            for write in [false, true] {
                assert_eq!(
                    d.soft.translate(EndpointId(e), iova, write),
                    model.translate(e, iova, write),
                    "{mode:?} seed {seed}: endpoint {e} iova {iova:#x} write {write}"
                );
            }
        }
    }
    let (domains, _) = d.state();
    assert_eq!(
        domains.iter().map(|d| d.id).collect::<Vec<_>>(),
        model.domains.keys().copied().collect::<Vec<_>>()
    );
}

#[test]
fn random_requests_inline_agree_with_the_spec_model() {
    for seed in [1, 2, 3] {
        run(Mode::Inline, seed, 3000);
    }
}

#[test]
fn random_requests_on_two_executors_agree_with_the_spec_model() {
    for seed in [11, 12, 13] {
        run(Mode::Pipeline(2), seed, 3000);
    }
}
