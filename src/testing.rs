//! A test oracle: a small model of the virtio-iommu device rules (spec §5.13.6), written from
//! the spec alone with linear scans and no code shared with [`crate::domains`], plus a seeded
//! generator of hostile request sequences. Socket tests and fuzz targets compare the daemon with
//! it; the daemon never uses it.
//!
//! It assumes the set-up those tests use: endpoints [`ENDPOINTS`], guest RAM `[0, RAM)`, a 4 KiB
//! granule, the full 64-bit input range and domain range, and the x86 MSI window reserved.

pub mod service_manager;
mod temp;

pub use temp::{TempDir, temp_path};

use std::collections::BTreeMap;

use crate::backend::soft::{Fault, SoftBackend};
use crate::ids::{DomainId, EndpointId, Gpa, Iova};
use crate::protocol::{MapFlags, MapRequest, Request, Status};

/// Endpoints the model (and the tests' daemon) serve.
pub const ENDPOINTS: [u32; 4] = [1, 2, 3, 4];
/// The granule.
pub const PAGE: u64 = 0x1000;
/// Guest RAM size the model assumes.
pub const RAM: u64 = 16 << 20;

#[derive(Default)]
struct MDomain {
    bypass: bool,
    /// (start, end, phys, flags)
    maps: Vec<(u64, u64, u64, u32)>,
}

/// Mappings `(start, end, gpa, read, write)` by domain id.
pub type MappingsByDomain = BTreeMap<u32, Vec<(u64, u64, u64, bool, bool)>>;

/// The device state the spec implies.
#[derive(Default)]
pub struct Model {
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

    /// Applies one request; returns the status the spec requires.
    pub fn apply(&mut self, r: &Request) -> Status {
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
            Request::Map(MapRequest {
                domain: DomainId(d),
                virt_start: Iova(s),
                virt_end: Iova(e),
                phys_start: Gpa(p),
                flags: MapFlags(flags),
            }) => {
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
                virt_start: Iova(s),
                virt_end: Iova(e),
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

    /// Every domain with its mappings `(start, end, gpa, read, write)` by start, and where
    /// each attached endpoint is: the state a daemon's `state` dump must show.
    pub fn view(&self) -> (MappingsByDomain, BTreeMap<u32, u32>) {
        let domains = self
            .domains
            .iter()
            .map(|(&id, d)| {
                let mut maps: Vec<_> = d
                    .maps
                    .iter()
                    .map(|&(s, e, p, f)| (s, e, p, f & 1 != 0, f & 2 != 0))
                    .collect();
                maps.sort_unstable();
                (id, maps)
            })
            .collect();
        (domains, self.attached.clone())
    }

    /// Ids of the domains that exist, ascending.
    pub fn domain_ids(&self) -> Vec<u32> {
        self.domains.keys().copied().collect()
    }

    /// Where the model says a DMA lands.
    pub fn translate(&self, e: u32, iova: u64, write: bool) -> Result<u64, Fault> {
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

    /// Where `soft` translates a DMA otherwise than the model, for every endpoint, read and
    /// write, on each page [`random_request`] can map: one line per difference.
    pub fn translation_differences(&self, soft: &SoftBackend) -> Vec<String> {
        let mut out = Vec::new();
        for &e in &ENDPOINTS {
            for page in 0..56 {
                let iova = page * PAGE + 0x10;
                for write in [false, true] {
                    let (got, want) = (
                        soft.translate(EndpointId(e), iova, write),
                        self.translate(e, iova, write),
                    );
                    if got != want {
                        out.push(format!(
                            "endpoint {e} iova {iova:#x} write {write}: {got:?}, the model \
                             says {want:?}"
                        ));
                    }
                }
            }
        }
        out
    }
}

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A request biased towards the edges of every rule.
pub fn random_request(r: &mut Rng) -> Request {
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
            Request::Map(MapRequest {
                domain,
                virt_start: Iova(s),
                virt_end: Iova(s + len - 1 - if r.below(30) == 0 { 1 } else { 0 }),
                phys_start: Gpa(phys),
                flags: MapFlags([3, 3, 3, 1, 2, 0, 4, 8][r.below(8) as usize]),
            })
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
                virt_start: Iova(s),
                virt_end: Iova(e),
                reserved: [0; 4],
            }
        }
    }
}

/// The JSON lines of a file (a trace): each line one value; a line that is not JSON fails the
/// test.
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// A regular file of `len` bytes with no name left (created in the temporary directory and
/// unlinked): backing memory for tests of memory tables and DMA maps.
pub fn unlinked_file(len: u64) -> std::fs::File {
    let path = temp_path("file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create a temporary file");
    std::fs::remove_file(&path).expect("unlink the temporary file");
    f.set_len(len).expect("size the temporary file");
    f
}
