//! The `bench` command: the real daemon over a real socket, driven by the guest-driver
//! simulator with the request patterns the Linux driver produces, against baselines measured in
//! the same run.
//!
//! Baselines: `raw` is the backend-call loop with no virtqueue (the floor); `inline` executes
//! requests in the vring thread (what QEMU and Cloud Hypervisor do); `pipeline` uses executor
//! threads. Ratios are the results; absolute numbers are context. Nothing here asserts a time.

pub mod daemon;
pub mod demo;
pub mod report;
pub mod state;

use std::time::{Duration, Instant};

use crate::backend::soft::SoftBackend;
use crate::backend::{DmaBackend, HwDomain, MapOp};
use crate::driver::{DriverError, TestVm, VmOptions};
use crate::guest_ram::HostLocation;
use crate::ids::{IovaRange, Perms};
use crate::pipeline::Mode;
use crate::protocol::{MAP_F_READ, MAP_F_WRITE, MapRequest, Request, Status};
use daemon::{LocalDaemon, LocalOptions};

/// The request pattern of one workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Pattern {
    /// Strict mode: one MAP per kick, then one UNMAP per kick.
    Strict,
    /// Lazy mode (x86 default): each kick carries the UNMAPs of the previous `k` MAPs and a MAP.
    Lazy { k: usize },
    /// A scatter-gather list: `n` MAPs of contiguous chunks in one kick, one UNMAP of the whole
    /// range in the next (a 64 KiB IOAS_MAP became 16 MAPs and one UNMAP in the Linux guest).
    ScatterGather { n: usize },
    /// `domains` domains with `per_domain` MAPs each in one kick, then one UNMAP per domain.
    Parallel { domains: u32, per_domain: usize },
}

/// One workload: a pattern at a mapping size.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub pattern: Pattern,
    /// Bytes per MAP.
    pub size: u64,
}

/// The workload set of a full run.
pub fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "strict 4K",
            pattern: Pattern::Strict,
            size: 4 << 10,
        },
        Workload {
            name: "strict 64K",
            pattern: Pattern::Strict,
            size: 64 << 10,
        },
        Workload {
            name: "strict 2M",
            pattern: Pattern::Strict,
            size: 2 << 20,
        },
        Workload {
            name: "lazy k=8 4K",
            pattern: Pattern::Lazy { k: 8 },
            size: 4 << 10,
        },
        Workload {
            name: "sg 16x4K",
            pattern: Pattern::ScatterGather { n: 16 },
            size: 4 << 10,
        },
        Workload {
            name: "1 domain x32",
            pattern: Pattern::Parallel {
                domains: 1,
                per_domain: 32,
            },
            size: 4 << 10,
        },
        Workload {
            name: "2 domains x32",
            pattern: Pattern::Parallel {
                domains: 2,
                per_domain: 32,
            },
            size: 4 << 10,
        },
        Workload {
            name: "4 domains x32",
            pattern: Pattern::Parallel {
                domains: 4,
                per_domain: 32,
            },
            size: 4 << 10,
        },
    ]
}

/// Where one measurement ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Path {
    /// The backend called in a loop, no virtqueue.
    Raw,
    /// The full socket path in this executor mode.
    Socket(Mode),
}

/// What one workload measured on one path.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub workload: Workload,
    pub path: Path,
    pub requests: u64,
    pub pairs: u64,
    pub elapsed_ns: u64,
    /// Kick-to-used latency of each kick (the raw path: of each request group).
    #[serde(skip)]
    pub latencies_ns: Vec<u64>,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl Measurement {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 * 1e9 / self.elapsed_ns.max(1) as f64
    }
    pub fn pairs_per_sec(&self) -> f64 {
        self.pairs as f64 * 1e9 / self.elapsed_ns.max(1) as f64
    }
}

/// The `p` quantile (0.0..=1.0) of sorted samples, nearest rank; 0 for no samples. The one
/// percentile of the benchmarks (the bench command and the VM tier's bench-iommufd).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn finish(
    workload: Workload,
    path: Path,
    requests: u64,
    pairs: u64,
    elapsed: Duration,
    mut lat: Vec<u64>,
) -> Measurement {
    lat.sort_unstable();
    Measurement {
        workload,
        path,
        requests,
        pairs,
        elapsed_ns: elapsed.as_nanos() as u64,
        p50_ns: percentile(&lat, 0.50),
        p99_ns: percentile(&lat, 0.99),
        latencies_ns: lat,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start the daemon: {0}")]
    Daemon(std::io::Error),
    #[error("bench setup: {0}")]
    Setup(String),
    #[error("guest driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{workload}: request failed with {status:?}")]
    Failed {
        workload: &'static str,
        status: Status,
    },
}

/// Every status `S_OK`, or the first that is not, as a failure of `workload`.
fn all_ok(workload: &'static str, statuses: &[Status]) -> Result<(), BenchError> {
    match statuses.iter().find(|&&s| s != Status::Ok) {
        Some(&status) => Err(BenchError::Failed { workload, status }),
        None => Ok(()),
    }
}

/// The request groups (one per kick) of `rounds` rounds of a workload.
pub fn kicks(w: &Workload, rounds: usize) -> Vec<Vec<Request>> {
    let map = |d: u32, iova: u64, size: u64| {
        Request::map(
            d,
            iova,
            iova + size - 1,
            iova % (16 << 20),
            MAP_F_READ | MAP_F_WRITE,
        )
    };
    let unmap = |d: u32, iova: u64, size: u64| Request::unmap(d, iova, iova + size - 1);
    // Each round uses a fresh IOVA window so the tree sees changing addresses.
    let base = |r: usize, span: u64| (r as u64 % 1024) * span + (1 << 32);
    let mut out = Vec::new();
    match w.pattern {
        Pattern::Strict => {
            for r in 0..rounds {
                let iova = base(r, w.size);
                out.push(vec![map(1, iova, w.size)]);
                out.push(vec![unmap(1, iova, w.size)]);
            }
        }
        Pattern::Lazy { k } => {
            let mut pending: Vec<u64> = Vec::new();
            for r in 0..rounds {
                let iova = base(r, w.size);
                let mut kick = Vec::new();
                if pending.len() == k {
                    kick.extend(pending.drain(..).map(|a| unmap(1, a, w.size)));
                }
                kick.push(map(1, iova, w.size));
                pending.push(iova);
                out.push(kick);
            }
            if !pending.is_empty() {
                out.push(pending.drain(..).map(|a| unmap(1, a, w.size)).collect());
            }
        }
        Pattern::ScatterGather { n } => {
            let span = w.size * n as u64;
            for r in 0..rounds {
                let iova = base(r, span);
                out.push(
                    (0..n as u64)
                        .map(|i| map(1, iova + i * w.size, w.size))
                        .collect(),
                );
                out.push(vec![unmap(1, iova, span)]);
            }
        }
        Pattern::Parallel {
            domains,
            per_domain,
        } => {
            let span = w.size * per_domain as u64;
            for r in 0..rounds {
                let iova = base(r, span);
                let mut kick = Vec::new();
                for i in 0..per_domain as u64 {
                    for d in 1..=domains {
                        kick.push(map(d, iova + i * w.size, w.size));
                    }
                }
                out.push(kick);
                out.push((1..=domains).map(|d| unmap(d, iova, span)).collect());
            }
        }
    }
    out
}

fn domains_of(w: &Workload) -> u32 {
    match w.pattern {
        Pattern::Parallel { domains, .. } => domains,
        _ => 1,
    }
}

/// The floor: the same MAP/UNMAP sequence straight into the soft backend.
pub fn run_raw(w: &Workload, rounds: usize) -> Measurement {
    let soft = SoftBackend::new(&[], false);
    let mut doms: Vec<Box<dyn HwDomain>> = (0..domains_of(w))
        .filter_map(|_| soft.create_domain().ok())
        .collect();
    let timed = time_kicks(&kicks(w, rounds), |kick| {
        for r in kick {
            match *r {
                Request::Map(MapRequest {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    ..
                }) => {
                    let op = MapOp {
                        iova: IovaRange::of(virt_start, virt_end).expect("valid"),
                        gpa: phys_start.0,
                        host: HostLocation {
                            host_addr: 0,
                            file: None,
                        },
                        perms: Perms::RW,
                    };
                    let _ = doms[domain.0 as usize - 1].map(&op);
                }
                Request::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                    ..
                } => {
                    // The backend unmaps exactly earlier mappings: walk the covered ones as the
                    // domain model would.
                    let d = &mut doms[domain.0 as usize - 1];
                    let step = w.size;
                    let mut a = virt_start.0;
                    while a < virt_end.0 {
                        let _ = d.unmap(IovaRange::new(a, a + step - 1).expect("valid"));
                        a += step;
                    }
                }
                _ => {}
            }
        }
        Ok::<(), BenchError>(())
    });
    let (requests, pairs, elapsed, lat) = timed.expect("the raw path cannot fail");
    finish(*w, Path::Raw, requests, pairs, elapsed, lat)
}

/// Runs `each` on every kick of `plan`, timing each: the requests and MAP/UNMAP pairs of the
/// plan, the time it all took and each kick's latency (ns).
fn time_kicks(
    plan: &[Vec<Request>],
    mut each: impl FnMut(&[Request]) -> Result<(), BenchError>,
) -> Result<(u64, u64, Duration, Vec<u64>), BenchError> {
    let mut lat = Vec::with_capacity(plan.len());
    let start = Instant::now();
    for kick in plan {
        let t = Instant::now();
        each(kick)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed();
    let requests = plan.iter().map(|k| k.len() as u64).sum();
    let pairs = plan
        .iter()
        .flatten()
        .filter(|r| matches!(r, Request::Map(_)))
        .count() as u64;
    Ok((requests, pairs, elapsed, lat))
}

/// The full path: daemon over its socket in `mode`, one kick per request group.
pub fn run_socket(
    w: &Workload,
    mode: Mode,
    poll: Duration,
    rounds: usize,
) -> Result<Measurement, BenchError> {
    run_socket_traced(w, mode, poll, rounds, None)
}

/// [`run_socket`] with the daemon writing its request trace to `trace`.
pub fn run_socket_traced(
    w: &Workload,
    mode: Mode,
    poll: Duration,
    rounds: usize,
    trace: Option<std::sync::Arc<crate::trace::Tracer>>,
) -> Result<Measurement, BenchError> {
    let d = LocalDaemon::start(LocalOptions {
        mode,
        poll,
        trace,
        ..LocalOptions::default()
    })
    .map_err(BenchError::Daemon)?;
    let mut vm = TestVm::connect(
        d.socket(),
        VmOptions {
            queue_size: 1024,
            ram_size: 64 << 20,
            ..VmOptions::default()
        },
    )?;
    let setup: Vec<Request> = (1..=domains_of(w))
        .map(|dom| Request::attach(dom, dom))
        .collect();
    all_ok(w.name, &vm.batch(&setup)?)?;
    let (requests, pairs, elapsed, lat) =
        time_kicks(&kicks(w, rounds), |kick| all_ok(w.name, &vm.batch(kick)?))?;
    vm.disconnect();
    Ok(finish(
        *w,
        Path::Socket(mode),
        requests,
        pairs,
        elapsed,
        lat,
    ))
}
