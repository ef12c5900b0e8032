//! bench-iommufd: the iommufd map-path benchmark of the VM test tier (tests/vm/run.sh).
//!
//! Inside the test VM (TCG: only ratios count), with the daemon's iommufd backend over the two
//! edu VFIO cdevs, it measures MAP+UNMAP pairs of 4 KiB and 2 MiB on an IOAS that has edu 1
//! attached (so every map really fills an IOMMU domain and every unmap flushes the IOTLB):
//!
//! - `raw-map`: IOMMU_IOAS_MAP (user VA) + IOMMU_IOAS_UNMAP straight into the IOAS (the floor)
//! - `raw-map-file`: IOMMU_IOAS_MAP_FILE (memfd) + UNMAP
//! - `raw-copy`: IOMMU_IOAS_COPY from a staging IOAS (all RAM mapped once, kept pinned by an
//!   unattached HWPT) + UNMAP
//! - `raw-copy-nohwpt`: the same from a staging IOAS without a HWPT (pages pinned per copy)
//! - `backend-<path>`: the backend's `HwDomain::map`/`unmap` (what the daemon calls), per strategy
//! - `daemon-<path>`: the full daemon over its vhost-user socket, driven by the crate's TestVm in
//!   the strict pattern (one MAP per kick, then one UNMAP per kick), per strategy, with the
//!   default 50 µs polling window; `daemon-noop` maps without permissions (the backend records
//!   it, no ioctl: the round trip alone); `-poll0` rows run a second daemon that never polls
//! - batched patterns (several requests per kick, 4 KiB, default Copy strategy): `lazy k=8`
//!   (Linux lazy mode: queued UNMAPs go out with the next MAP's kick) and `sg 16x4K` (16 MAPs in
//!   one kick, their 16 UNMAPs in the next), each through `raw-map`, `raw-copy`, `backend-copy`
//!   and the daemon (`daemon-copy`, `daemon-noop`, and both `-poll0`), doing the same ioctls
//! - `huge-*`: the raw loops again on hugetlb-backed RAM (memfd with MFD_HUGETLB|MFD_HUGE_2MB,
//!   2 MiB pages reserved through /proc/sys/vm/nr_hugepages), against the 4 KiB-page shmem rows
//!   of the same run (2 MiB maps of 2 MiB-aligned hugetlb pages can use 2 MiB IOPTEs); a `SKIP:`
//!   line if no hugepages can be had
//! - connect cost (issue 19): `set_ram` against guest RAM size, with all RAM staged and on demand
//!   (BENCH_CONNECT_MIB, default `16,64,128,256`; larger sizes need a larger VM: VM_QEMU_ARGS)
//! - state size (issue 19): MAP/UNMAP through the daemon with N live mappings in the domain, one
//!   UNMAP over all N, and the DETACH that destroys a domain holding N (BENCH_STATE_SIZES,
//!   default `1,1000,10000`; BENCH_STATE_PAIRS pairs per point, default 128)
//!
//! Output: a table per size (per-pair time, MAP and UNMAP time, ratio to `raw-map`, p50/p99 of
//! the pair), a batch table (per-request time of each pattern and its ratio to the raw and
//! backend loops of the same pattern), hugetlb-vs-shmem ratios, one `BENCH-IOMMUFD: {json}` line
//! per row, `PASS: bench-iommufd ...` lines, and `FAIL:` only on errors (never on timing). Pairs
//! per row: BENCH_PAIRS_4K (default 256), BENCH_PAIRS_2M (default 32), BENCH_PAIRS_BATCH (MAP+UNMAP
//! pairs per batched row, default BENCH_PAIRS_4K).

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_iommu::bench::percentile;

// The VM tier's guest kit: edu discovery, the backend over both edus, the daemon's rules.
use guest_kit::daemon::Daemon;
use guest_kit::edu::backend_over_two_edus;

use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapStrategy, Staging as RamStaging, sys};
use vhost_user_iommu::backend::{Attachment, DmaBackend, MapOp};
use vhost_user_iommu::driver::{GuestRam as MemfdRam, TestVm};
use vhost_user_iommu::guest_ram::{Backing, GuestRam, HostLocation, RamRegion};
use vhost_user_iommu::ids::{EndpointId, GpaRange, IovaRange, Perms};
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{Request, Status};
use vhost_user_iommu::vhost::{DEFAULT_POLL, DeviceSettings};

type Result<T> = std::result::Result<T, String>;

const KIB4: u64 = 4 << 10;
const MIB2: u64 = 2 << 20;
/// RAM of the raw and backend loops (memfd, pre-faulted): 64 MiB at GPA 0.
const RAM_SIZE: u64 = 64 << 20;
/// Maps take their GPAs from [16 MiB, 48 MiB) (the TestVm keeps its rings elsewhere).
const GPA_BASE: u64 = 16 << 20;
const GPA_SPAN: u64 = 32 << 20;
/// IOVAs: 1 GiB up, a window of 64 mappings (fresh addresses, bounded page-table growth).
const IOVA_BASE: u64 = 1 << 30;
/// GPAs cycle through at most this many buffers (a guest reuses its DMA buffers); the warm-up
/// touches each once, so no row pays first-touch page faults in the measured pairs.
const MAX_SLOTS: u64 = 64;
const RW: u32 = sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE;

fn errno(e: sys::Errno) -> String {
    format!("{}: {}", e.name, std::io::Error::from_raw_os_error(e.errno))
}

/// Timings of one row.
struct Row {
    name: String,
    size: u64,
    /// Per pair: (MAP ns, UNMAP ns).
    samples: Vec<(u64, u64)>,
    note: String,
}

impl Row {
    fn mean(&self, f: impl Fn(&(u64, u64)) -> u64) -> f64 {
        self.samples.iter().map(f).sum::<u64>() as f64 / self.samples.len().max(1) as f64
    }
    fn pair_ns(&self) -> f64 {
        self.mean(|s| s.0 + s.1)
    }
    fn map_ns(&self) -> f64 {
        self.mean(|s| s.0)
    }
    fn unmap_ns(&self) -> f64 {
        self.mean(|s| s.1)
    }
    fn pct(&self, p: f64) -> u64 {
        self.pct_by(|s| s.0 + s.1, p)
    }
    fn pct_by(&self, f: impl Fn(&(u64, u64)) -> u64, p: f64) -> u64 {
        let mut v: Vec<u64> = self.samples.iter().map(f).collect();
        v.sort_unstable();
        percentile(&v, p)
    }
}

/// `n` MAP+UNMAP pairs (after a warm-up), each half timed.
fn pairs(
    name: &str,
    size: u64,
    n: usize,
    mut map: impl FnMut(u64, u64) -> Result<()>,
    mut unmap: impl FnMut(u64) -> Result<()>,
) -> Result<Row> {
    let slots = (GPA_SPAN / size).min(MAX_SLOTS);
    let warmup = slots as usize;
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let iova = IOVA_BASE + (i as u64 % 64) * size;
        let gpa = GPA_BASE + (i as u64 % slots) * size;
        let t0 = Instant::now();
        map(iova, gpa).map_err(|e| format!("{name}: map #{i} iova {iova:#x} gpa {gpa:#x}: {e}"))?;
        let t1 = Instant::now();
        unmap(iova).map_err(|e| format!("{name}: unmap #{i} iova {iova:#x}: {e}"))?;
        let t2 = Instant::now();
        if i >= warmup {
            samples.push(((t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64));
        }
    }
    Ok(Row {
        name: name.to_string(),
        size,
        samples,
        note: String::new(),
    })
}

/// One 4 KiB MAP or UNMAP of a batched pattern.
#[derive(Clone, Copy)]
enum Op {
    Map { iova: u64, gpa: u64 },
    Unmap { iova: u64 },
}

/// A request pattern with several requests per kick (REFERENCE §2), repeated in cycles. The
/// `m`-th MAP of a run uses IOVA slot `m % 64` (so a scatter-gather list gets contiguous IOVAs)
/// and GPA slot `5m % 64` (scattered buffers).
#[derive(Clone, Copy)]
enum Pattern {
    /// Linux lazy mode (flush queue): an UNMAP is queued without a kick and goes out with the
    /// next kick. A cycle is `k` kicks of one MAP each; the first also carries, before its MAP,
    /// the `k` UNMAPs of the previous cycle's MAPs (`k` + 1 requests in that kick).
    Lazy(u64),
    /// Scatter-gather: `n` MAPs of 4 KiB in one kick (one guest `dma_map_sg`), then their `n`
    /// UNMAPs in the next.
    Sg(u64),
}

fn iova_of(m: u64) -> u64 {
    IOVA_BASE + (m % MAX_SLOTS) * KIB4
}

fn gpa_of(m: u64) -> u64 {
    GPA_BASE + ((m * 5) % MAX_SLOTS) * KIB4
}

impl Pattern {
    fn label(self) -> String {
        match self {
            Pattern::Lazy(k) => format!("lazy k={k}"),
            Pattern::Sg(n) => format!("sg {n}x4K"),
        }
    }
    fn maps_per_cycle(self) -> u64 {
        match self {
            Pattern::Lazy(k) | Pattern::Sg(k) => k,
        }
    }
    fn kicks_per_cycle(self) -> u64 {
        match self {
            Pattern::Lazy(k) => k,
            Pattern::Sg(_) => 2,
        }
    }
    /// The kicks of cycle `c`, each a list of requests in submission order.
    fn cycle(self, c: u64) -> Vec<Vec<Op>> {
        let map = |m: u64| Op::Map {
            iova: iova_of(m),
            gpa: gpa_of(m),
        };
        match self {
            Pattern::Lazy(k) => (0..k)
                .map(|j| {
                    let mut kick = Vec::with_capacity(k as usize + 1);
                    if j == 0 && c > 0 {
                        kick.extend((0..k).map(|i| Op::Unmap {
                            iova: iova_of((c - 1) * k + i),
                        }));
                    }
                    kick.push(map(c * k + j));
                    kick
                })
                .collect(),
            Pattern::Sg(n) => vec![
                (c * n..(c + 1) * n).map(map).collect(),
                (c * n..(c + 1) * n)
                    .map(|m| Op::Unmap { iova: iova_of(m) })
                    .collect(),
            ],
        }
    }
    /// The kicks that unmap what is still mapped after cycle `c` (untimed).
    fn drain(self, c: u64) -> Vec<Vec<Op>> {
        match self {
            Pattern::Lazy(k) => vec![
                (0..k)
                    .map(|i| Op::Unmap {
                        iova: iova_of(c * k + i),
                    })
                    .collect(),
            ],
            Pattern::Sg(_) => Vec::new(),
        }
    }
}

/// Timings of one batched row: whole cycles (every kick of the pattern's cycle).
struct BatchRow {
    name: String,
    pattern: String,
    /// Requests (MAP + UNMAP) and kicks per cycle.
    requests: u64,
    kicks: u64,
    /// ns per cycle.
    samples: Vec<u64>,
    note: String,
}

impl BatchRow {
    fn per_request_ns(&self) -> f64 {
        self.samples.iter().sum::<u64>() as f64
            / (self.samples.len().max(1) as u64 * self.requests) as f64
    }
    /// The p50 cycle over the requests of a cycle.
    fn p50_per_request_ns(&self) -> f64 {
        self.pct(0.5) as f64 / self.requests as f64
    }
    fn pct(&self, p: f64) -> u64 {
        let mut v = self.samples.clone();
        v.sort_unstable();
        percentile(&v, p)
    }
    /// The strict pattern, from a row of the per-size table: a cycle is one pair (two kicks).
    fn strict(r: &Row) -> BatchRow {
        BatchRow {
            name: r.name.clone(),
            pattern: "strict".into(),
            requests: 2,
            kicks: 2,
            samples: r.samples.iter().map(|s| s.0 + s.1).collect(),
            note: r.note.clone(),
        }
    }
}

/// Cycles of `p`: enough warm-up cycles to touch all 64 GPA slots, then `pairs` MAP+UNMAP pairs
/// (rounded up to whole cycles) timed per cycle, then the drain. `kick` executes one kick.
fn cycles(
    name: &str,
    p: Pattern,
    pairs: usize,
    mut kick: impl FnMut(&[Op]) -> Result<()>,
) -> Result<BatchRow> {
    let per = p.maps_per_cycle();
    let warmup = MAX_SLOTS.div_ceil(per) + 1;
    let n = (pairs as u64).div_ceil(per).max(1);
    let mut samples = Vec::with_capacity(n as usize);
    for c in 0..warmup + n {
        let kicks = p.cycle(c);
        let t0 = Instant::now();
        for (j, k) in kicks.iter().enumerate() {
            kick(k).map_err(|e| format!("{name} {}: cycle {c} kick {j}: {e}", p.label()))?;
        }
        let dt = t0.elapsed().as_nanos() as u64;
        if c >= warmup {
            samples.push(dt);
        }
    }
    for k in p.drain(warmup + n - 1) {
        kick(&k).map_err(|e| format!("{name} {}: drain: {e}", p.label()))?;
    }
    Ok(BatchRow {
        name: name.to_string(),
        pattern: p.label(),
        requests: 2 * per,
        kicks: p.kicks_per_cycle(),
        samples,
        note: String::new(),
    })
}

/// The batched patterns measured.
const PATTERNS: [Pattern; 2] = [Pattern::Lazy(8), Pattern::Sg(16)];

/// A row's note as the table prints it after the figures: nothing, or "  (note)".
fn note_suffix(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!("  ({note})")
    }
}

fn size_name(size: u64) -> &'static str {
    if size == KIB4 { "4K" } else { "2M" }
}

fn short(s: MapStrategy) -> &'static str {
    match s {
        MapStrategy::Map => "map",
        MapStrategy::MapFile => "map-file",
        MapStrategy::Copy => "copy",
    }
}

fn print_table(rows: &[Row]) {
    for size in [KIB4, MIB2] {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.size == size).collect();
        let Some(floor) = rs.iter().find(|r| r.name == "raw-map").map(|r| r.pair_ns()) else {
            continue;
        };
        let floor_map = rs
            .iter()
            .find(|r| r.name == "raw-map")
            .map_or(1.0, |r| r.map_ns());
        println!(
            "bench-iommufd {}: {:<18} {:>6} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}",
            size_name(size),
            "row",
            "pairs",
            "pair us",
            "MAP us",
            "UNMAP us",
            "x raw",
            "MAP x",
            "p50 us",
            "p99 us"
        );
        for r in &rs {
            println!(
                "bench-iommufd {}: {:<18} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>10.1} {:>10.1}{}",
                size_name(size),
                r.name,
                r.samples.len(),
                r.pair_ns() / 1e3,
                r.map_ns() / 1e3,
                r.unmap_ns() / 1e3,
                r.pair_ns() / floor,
                r.map_ns() / floor_map,
                r.pct(0.5) as f64 / 1e3,
                r.pct(0.99) as f64 / 1e3,
                note_suffix(&r.note),
            );
        }
        for r in &rs {
            println!(
                "BENCH-IOMMUFD: {{\"size\":{},\"row\":\"{}\",\"pairs\":{},\"pair_ns\":{:.0},\"map_ns\":{:.0},\"unmap_ns\":{:.0},\"ratio_raw\":{:.3},\"map_ratio_raw\":{:.3},\"p50_ns\":{},\"p99_ns\":{}}}",
                r.size,
                r.name,
                r.samples.len(),
                r.pair_ns(),
                r.map_ns(),
                r.unmap_ns(),
                r.pair_ns() / floor,
                r.map_ns() / floor_map,
                r.pct(0.5),
                r.pct(0.99)
            );
        }
    }
}

/// The batch table: per-request time of each pattern, against the raw and backend loops of the
/// same pattern (the strict pattern from the 4 KiB rows of the per-size table).
fn print_batch(batch: &[BatchRow], rows: &[Row]) {
    const STRICT: [&str; 7] = [
        "raw-map",
        "raw-copy",
        "backend-copy",
        "daemon-copy",
        "daemon-noop",
        "daemon-copy-poll0",
        "daemon-noop-poll0",
    ];
    let strict: Vec<BatchRow> = STRICT
        .iter()
        .filter_map(|n| rows.iter().find(|r| r.size == KIB4 && r.name == *n))
        .map(BatchRow::strict)
        .collect();
    let all: Vec<&BatchRow> = strict.iter().chain(batch).collect();
    let mut patterns: Vec<&str> = Vec::new();
    for r in &all {
        if !patterns.contains(&r.pattern.as_str()) {
            patterns.push(&r.pattern);
        }
    }
    println!(
        "bench-iommufd batch: {:<10} {:<18} {:>6} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11}",
        "pattern",
        "row",
        "cycles",
        "req/cyc",
        "kicks/cyc",
        "us/req",
        "x raw-map",
        "x raw-cp",
        "x backend",
        "p50 us/req",
        "p50 x bknd",
        "p50 cyc us",
        "p99 cyc us"
    );
    let mut json = Vec::new();
    for pat in &patterns {
        let rs: Vec<&BatchRow> = all.iter().copied().filter(|r| r.pattern == *pat).collect();
        let per = |n: &str| rs.iter().find(|r| r.name == n).map(|r| r.per_request_ns());
        let per50 = |n: &str| {
            rs.iter()
                .find(|r| r.name == n)
                .map(|r| r.p50_per_request_ns())
        };
        let backend50 = per50("backend-copy");
        let ratio = |base: Option<f64>, v: f64| base.map_or(f64::NAN, |b| v / b);
        let (raw, raw_copy, backend) = (per("raw-map"), per("raw-copy"), per("backend-copy"));
        for r in &rs {
            let (v, v50) = (r.per_request_ns(), r.p50_per_request_ns());
            println!(
                "bench-iommufd batch: {:<10} {:<18} {:>6} {:>7} {:>9} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>11.1} {:>11.2} {:>11.1} {:>11.1}{}",
                r.pattern,
                r.name,
                r.samples.len(),
                r.requests,
                r.kicks,
                v / 1e3,
                ratio(raw, v),
                ratio(raw_copy, v),
                ratio(backend, v),
                v50 / 1e3,
                ratio(backend50, v50),
                r.pct(0.5) as f64 / 1e3,
                r.pct(0.99) as f64 / 1e3,
                note_suffix(&r.note),
            );
            let num = |x: f64| {
                if x.is_finite() {
                    format!("{x:.3}")
                } else {
                    "null".into()
                }
            };
            json.push(format!(
                "BENCH-IOMMUFD: {{\"size\":{},\"pattern\":\"{}\",\"row\":\"{}\",\"cycles\":{},\"requests_per_cycle\":{},\"kicks_per_cycle\":{},\"per_request_ns\":{:.0},\"ratio_raw\":{},\"ratio_raw_copy\":{},\"ratio_backend\":{},\"p50_per_request_ns\":{:.0},\"p50_ratio_backend\":{},\"p50_cycle_ns\":{},\"p99_cycle_ns\":{}}}",
                KIB4,
                r.pattern,
                r.name,
                r.samples.len(),
                r.requests,
                r.kicks,
                v,
                num(ratio(raw, v)),
                num(ratio(raw_copy, v)),
                num(ratio(backend, v)),
                v50,
                num(ratio(backend50, v50)),
                r.pct(0.5),
                r.pct(0.99)
            ));
        }
    }
    for j in json {
        println!("{j}");
    }
}

/// hugetlb-backed rows against the shmem rows of the same run: time ratios (< 1: hugetlb is
/// faster), of the means and of the p50s.
fn print_huge(rows: &[Row]) {
    for size in [KIB4, MIB2] {
        for (h, s) in [
            ("huge-raw-map", "raw-map"),
            ("huge-raw-map-file", "raw-map-file"),
            ("huge-raw-copy", "raw-copy"),
        ] {
            let find = |n: &str| rows.iter().find(|r| r.size == size && r.name == n);
            let (Some(h), Some(s)) = (find(h), find(s)) else {
                continue;
            };
            let p50 = |r: &Row, f: fn(&(u64, u64)) -> u64| r.pct_by(f, 0.5) as f64;
            let pair = h.pair_ns() / s.pair_ns();
            let map = h.map_ns() / s.map_ns();
            let unmap = h.unmap_ns() / s.unmap_ns();
            let pair50 = h.pct(0.5) as f64 / s.pct(0.5) as f64;
            let map50 = p50(h, |x| x.0) / p50(s, |x| x.0);
            let unmap50 = p50(h, |x| x.1) / p50(s, |x| x.1);
            println!(
                "bench-iommufd hugetlb {}: {} / {}: pair {:.2}x (p50 {:.2}x), MAP {:.2}x (p50 {:.2}x), UNMAP {:.2}x (p50 {:.2}x)",
                size_name(size),
                h.name,
                s.name,
                pair,
                pair50,
                map,
                map50,
                unmap,
                unmap50
            );
            println!(
                "BENCH-IOMMUFD: {{\"size\":{},\"compare\":\"{}/{}\",\"pair_ratio\":{:.3},\"pair_p50_ratio\":{:.3},\"map_ratio\":{:.3},\"map_p50_ratio\":{:.3},\"unmap_ratio\":{:.3},\"unmap_p50_ratio\":{:.3}}}",
                size, h.name, s.name, pair, pair50, map, map50, unmap, unmap50
            );
        }
    }
}

/// A staging IOAS of this bench: all of `ram` at IOVA = GPA, optionally kept pinned by an
/// unattached HWPT.
struct Staging<'a> {
    fd: BorrowedFd<'a>,
    ioas: u32,
    hwpt: Option<u32>,
}

impl<'a> Staging<'a> {
    /// Guest RAM `[0, size)` at user VA `host`.
    fn new(fd: BorrowedFd<'a>, host: u64, size: u64, hwpt_dev: Option<u32>) -> Result<Staging<'a>> {
        let ioas = sys::ioas_alloc(fd).map_err(errno)?;
        let mut s = Staging {
            fd,
            ioas,
            hwpt: None,
        };
        sys::ioas_map(fd, ioas, 0, host, size, RW).map_err(errno)?;
        if let Some(dev) = hwpt_dev {
            // Not every IOMMU driver can allocate an unattached paging domain: then no row.
            match sys::hwpt_alloc(fd, dev, ioas) {
                Ok(h) => s.hwpt = Some(h),
                Err(e) => println!("bench-iommufd: no staging HWPT: {}", errno(e)),
            }
        }
        Ok(s)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.hwpt {
            let _ = sys::destroy(self.fd, h);
        }
        let _ = sys::destroy(self.fd, self.ioas);
    }
}

fn fault_in(file: &File, size: u64) -> Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        file.write_all_at(&chunk, off)
            .map_err(|e| format!("pre-faulting guest RAM: {e}"))?;
        off += chunk.len() as u64;
    }
    Ok(())
}

/// hugetlb RAM of the `huge-*` rows (the same size and GPA layout as the shmem RAM) and the
/// hugepages reserved for it (40 = 80 MiB: the RAM and some slack).
const HUGE_PAGES: u64 = 40;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A field of /proc/meminfo (the number before any unit).
fn meminfo(field: &str) -> std::result::Result<u64, String> {
    let text = fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("/proc/meminfo has no {field}"))
}

/// The hugepage pool this bench set up; `nr_hugepages` goes back to its old value on drop.
struct Hugepages {
    prev: u64,
}

impl Hugepages {
    /// Raises `nr_hugepages` to `HUGE_PAGES` (if lower) and checks that enough 2 MiB pages are
    /// free for `bytes`; the error is the reason to skip the hugetlb rows.
    fn reserve(bytes: u64) -> std::result::Result<Hugepages, String> {
        let read = || -> std::result::Result<u64, String> {
            fs::read_to_string(NR_HUGEPAGES)
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))
        };
        let prev = read()?;
        let h = Hugepages { prev };
        let kb = meminfo("Hugepagesize")?;
        if kb != MIB2 >> 10 {
            return Err(format!("default hugepage size is {kb} kB, not 2048 kB"));
        }
        if prev < HUGE_PAGES {
            fs::write(NR_HUGEPAGES, format!("{HUGE_PAGES}\n"))
                .map_err(|e| format!("writing {HUGE_PAGES} to {NR_HUGEPAGES}: {e}"))?;
        }
        let (now, free) = (read()?, meminfo("HugePages_Free")?);
        if free * MIB2 < bytes {
            return Err(format!(
                "{NR_HUGEPAGES} is {now} after writing {HUGE_PAGES} (was {prev}), {free} free: \
                 need {} 2 MiB pages",
                bytes / MIB2
            ));
        }
        Ok(h)
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        let _ = fs::write(NR_HUGEPAGES, format!("{}\n", self.prev));
    }
}

/// Guest RAM on 2 MiB hugetlb pages: a memfd with MFD_HUGETLB|MFD_HUGE_2MB, mapped shared and
/// populated (every page faulted in), at a 2 MiB-aligned user VA.
struct HugeRam {
    file: File,
    addr: u64,
    size: u64,
}

impl HugeRam {
    fn new(size: u64) -> std::result::Result<HugeRam, String> {
        let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        // SAFETY: a NUL-terminated name; the returned fd (if any) is owned by the File.
        let fd = unsafe { libc::memfd_create(c"bench-iommufd-hugetlb".as_ptr(), flags) };
        if fd < 0 {
            return Err(format!(
                "memfd_create(MFD_HUGETLB|MFD_HUGE_2MB): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|e| format!("ftruncate of the hugetlb memfd to {size:#x}: {e}"))?;
        // SAFETY: a new shared mapping of the whole memfd; nothing else is at that address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of the hugetlb memfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ram = HugeRam {
            file,
            addr: p as u64,
            size,
        };
        if !ram.addr.is_multiple_of(MIB2) {
            return Err(format!(
                "hugetlb mapping at {:#x}: not 2 MiB aligned",
                ram.addr
            ));
        }
        // Touch every 4 KiB (MAP_POPULATE should have faulted all of it already).
        for off in (0..size).step_by(KIB4 as usize) {
            // SAFETY: inside the mapping just made, which is readable and writable.
            unsafe { std::ptr::write_volatile((ram.addr + off) as *mut u8, 0) };
        }
        Ok(ram)
    }
}

impl Drop for HugeRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// Which IOPTE sizes the intel-iommu driver gives paging domains, decoded from the emulated
/// VT-d's capability registers in sysfs (7.3: first stage if scalable mode and FLTS, 2 MiB
/// always, 1 GiB with FL1GP; else second stage with the SLLPS bits), or why that is unknown.
fn iopte_sizes() -> String {
    let Some(dir) = fs::read_dir("/sys/class/iommu").ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path().join("intel-iommu"))
            .find(|p| p.is_dir())
    }) else {
        return "IOPTE sizes unknown (no intel-iommu in /sys/class/iommu)".into();
    };
    let reg = |f: &str| {
        fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let (Some(cap), Some(ecap)) = (reg("cap"), reg("ecap")) else {
        return format!("IOPTE sizes unknown (cannot read {}/cap)", dir.display());
    };
    let bit = |v: u64, b: u32| (v >> b) & 1 == 1;
    let sp_off = fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("sp_off"));
    let (stage, m2, g1) = if bit(ecap, 43) && bit(ecap, 47) {
        ("first", true, bit(cap, 56))
    } else {
        ("second", bit(cap, 34), bit(cap, 35))
    };
    format!(
        "VT-d cap {cap:#x} ecap {ecap:#x}: {stage}-stage paging domains, IOPTE sizes 4K{}{}",
        if m2 && !sp_off { " 2M" } else { "" },
        if g1 && !sp_off { " 1G" } else { "" }
    )
}

/// The hugetlb rows' setup: the pool, the RAM, and a staging IOAS over it (with a HWPT).
struct Huge<'a> {
    // Field order = drop order: the staging IOAS, the RAM, then the pool.
    staged: Staging<'a>,
    ram: HugeRam,
    map_file: bool,
    _pool: Hugepages,
}

/// Sets up the hugetlb rows: `Ok(Err(reason))` if they must be skipped (no hugepages), `Err` on
/// an error.
fn huge_setup<'a>(
    b: &IommufdBackend,
    fd: BorrowedFd<'a>,
    ioas: u32,
    dev2: u32,
) -> Result<std::result::Result<Huge<'a>, String>> {
    let (pool, free0, ram, free1) = match (|| {
        let pool = Hugepages::reserve(RAM_SIZE)?;
        let free0 = meminfo("HugePages_Free")?;
        let ram = HugeRam::new(RAM_SIZE)?;
        let free1 = meminfo("HugePages_Free")?;
        Ok::<_, String>((pool, free0, ram, free1))
    })() {
        Ok(v) => v,
        Err(why) => return Ok(Err(why)),
    };
    if free0 - free1 < RAM_SIZE / MIB2 {
        return Err(format!(
            "the hugetlb memfd took {} 2 MiB pages for {} MiB (HugePages_Free {free0} -> {free1})",
            free0 - free1,
            RAM_SIZE >> 20
        ));
    }
    println!(
        "bench-iommufd hugetlb: {} MiB memfd (MFD_HUGETLB|MFD_HUGE_2MB) at {:#x}, {} 2 MiB pages \
         (HugePages_Free {free0} -> {free1}, nr_hugepages was {}); {}",
        RAM_SIZE >> 20,
        ram.addr,
        free0 - free1,
        pool.prev,
        iopte_sizes()
    );
    // MAP_FILE of a hugetlb memfd: probed once; a refusal drops that row only.
    let map_file = b.map_file_supported()
        && match sys::ioas_map_file(fd, ioas, IOVA_BASE, ram.file.as_fd(), 0, MIB2, RW) {
            Ok(()) => {
                sys::ioas_unmap(fd, ioas, IOVA_BASE, MIB2).map_err(errno)?;
                true
            }
            Err(e) => {
                println!(
                    "bench-iommufd hugetlb: IOMMU_IOAS_MAP_FILE of the hugetlb memfd refused: {}",
                    errno(e)
                );
                false
            }
        };
    let staged = Staging::new(fd, ram.addr, RAM_SIZE, Some(dev2))?;
    Ok(Ok(Huge {
        staged,
        ram,
        map_file,
        _pool: pool,
    }))
}

/// (a)–(c) and the backend-call loops, before the daemon serves anything.
fn raw_rows(
    b: &Arc<IommufdBackend>,
    sizes: &[(u64, usize)],
    batch_pairs: usize,
    rows: &mut Vec<Row>,
    batch: &mut Vec<BatchRow>,
) -> Result<()> {
    let ram = MemfdRam::new(RAM_SIZE).map_err(|e| format!("memfd RAM: {e}"))?;
    // SAFETY: dup of the valid memfd `ram` owns; the new fd is owned by the File.
    let memfd = unsafe { File::from_raw_fd(libc::dup(ram.fd())) };
    fault_in(&memfd, RAM_SIZE)?;
    let fd = b.iommufd();
    let ep1 = EndpointId(1);
    let dev2 = b.dev_id(EndpointId(2)).ok_or("no endpoint 2")?;

    // One IOAS (a backend domain) with edu 1 attached: what every raw loop maps into.
    let dom = b.create_domain().map_err(|e| e.to_string())?;
    let ioas = dom.id();
    b.attach(ep1, Attachment::Domain(ioas))
        .map_err(|e| e.to_string())?;
    let staged = Staging::new(fd, ram.host_addr(), RAM_SIZE, Some(dev2))?;
    let unpinned = Staging::new(fd, ram.host_addr(), RAM_SIZE, None)?;
    let host = ram.host_addr();
    let unmap = |iova: u64, size: u64| -> Result<()> {
        let done = sys::ioas_unmap(fd, ioas, iova, size).map_err(errno)?;
        if done != size {
            return Err(format!("unmapped {done:#x} of {size:#x}"));
        }
        Ok(())
    };
    let huge = match huge_setup(b, fd, ioas, dev2)? {
        Ok(h) => Some(h),
        Err(why) => {
            println!("SKIP: bench-iommufd hugetlb rows: {why}");
            None
        }
    };
    for &(size, n) in sizes {
        rows.push(pairs(
            "raw-map",
            size,
            n,
            |iova, gpa| sys::ioas_map(fd, ioas, iova, host + gpa, size, RW).map_err(errno),
            |iova| unmap(iova, size),
        )?);
        if b.map_file_supported() {
            rows.push(pairs(
                "raw-map-file",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_map_file(fd, ioas, iova, memfd.as_fd(), gpa, size, RW).map_err(errno)
                },
                |iova| unmap(iova, size),
            )?);
        }
        if staged.hwpt.is_some() {
            let mut r = pairs(
                "raw-copy",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_copy(fd, ioas, iova, staged.ioas, gpa, size, RW).map_err(errno)
                },
                |iova| unmap(iova, size),
            )?;
            r.note = "sub-range COPY from a staging IOAS with a HWPT".into();
            rows.push(r);
        }
        let mut r = pairs(
            "raw-copy-nohwpt",
            size,
            n,
            |iova, gpa| sys::ioas_copy(fd, ioas, iova, unpinned.ioas, gpa, size, RW).map_err(errno),
            |iova| unmap(iova, size),
        )?;
        r.note = "staging IOAS without HWPT: pins per copy".into();
        rows.push(r);
        // The same loops on hugetlb RAM, right after the shmem ones.
        let Some(h) = &huge else { continue };
        let hhost = h.ram.addr;
        let mut r = pairs(
            "huge-raw-map",
            size,
            n,
            |iova, gpa| sys::ioas_map(fd, ioas, iova, hhost + gpa, size, RW).map_err(errno),
            |iova| unmap(iova, size),
        )?;
        r.note = "hugetlb 2 MiB pages".into();
        rows.push(r);
        if h.map_file {
            let mut r = pairs(
                "huge-raw-map-file",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_map_file(fd, ioas, iova, h.ram.file.as_fd(), gpa, size, RW)
                        .map_err(errno)
                },
                |iova| unmap(iova, size),
            )?;
            r.note = "hugetlb 2 MiB pages".into();
            rows.push(r);
        }
        if h.staged.hwpt.is_some() {
            let mut r = pairs(
                "huge-raw-copy",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_copy(fd, ioas, iova, h.staged.ioas, gpa, size, RW).map_err(errno)
                },
                |iova| unmap(iova, size),
            )?;
            r.note = "hugetlb staging IOAS with a HWPT".into();
            rows.push(r);
        }
    }
    drop(huge);
    // Batched patterns (4 KiB), the same ioctls in the same order as the daemon will issue.
    for p in PATTERNS {
        let mut r = cycles("raw-map", p, batch_pairs, |kick| {
            for op in kick {
                match *op {
                    Op::Map { iova, gpa } => {
                        sys::ioas_map(fd, ioas, iova, host + gpa, KIB4, RW).map_err(errno)?
                    }
                    Op::Unmap { iova } => unmap(iova, KIB4)?,
                }
            }
            Ok(())
        })?;
        r.note = "IOAS_MAP + IOAS_UNMAP".into();
        batch.push(r);
        if staged.hwpt.is_some() {
            let mut r = cycles("raw-copy", p, batch_pairs, |kick| {
                for op in kick {
                    match *op {
                        Op::Map { iova, gpa } => {
                            sys::ioas_copy(fd, ioas, iova, staged.ioas, gpa, KIB4, RW)
                                .map_err(errno)?
                        }
                        Op::Unmap { iova } => unmap(iova, KIB4)?,
                    }
                }
                Ok(())
            })?;
            r.note = "IOAS_COPY + IOAS_UNMAP".into();
            batch.push(r);
        }
    }
    drop(unpinned);
    drop(staged);
    b.attach(ep1, Attachment::Blocked)
        .map_err(|e| e.to_string())?;
    drop(dom);

    // The backend-call loop: HwDomain::map/unmap, as the domain model calls them.
    let st = memfd.metadata().map_err(|e| e.to_string())?;
    let table = GuestRam::new(vec![RamRegion {
        gpa: GpaRange::new(0, RAM_SIZE - 1).expect("valid"),
        host_addr: host,
        backing: Some(Backing {
            file: Arc::new(memfd.try_clone().map_err(|e| e.to_string())?),
            offset: 0,
            file_id: (st.dev(), st.ino()),
        }),
    }])?;
    b.set_ram(&table).map_err(|e| e.to_string())?;
    // What the domain model hands the backend for `size` bytes at `iova` -> `gpa`.
    let map_op = |iova: u64, gpa: u64, size: u64| MapOp {
        iova: IovaRange::new(iova, iova + size - 1).expect("valid"),
        gpa,
        host: HostLocation {
            host_addr: host + gpa,
            file: Some(((st.dev(), st.ino()), gpa)),
        },
        perms: Perms::RW,
    };
    for &(size, n) in sizes {
        for s in MapStrategy::ALL {
            if s == MapStrategy::MapFile && !b.map_file_supported() {
                continue;
            }
            b.set_map_strategy(Some(s));
            let mut dom = b.create_domain().map_err(|e| e.to_string())?;
            b.attach(ep1, Attachment::Domain(dom.id()))
                .map_err(|e| e.to_string())?;
            let before = (b.map_counts(), b.copy_count());
            let d = std::cell::RefCell::new(&mut dom);
            let mut r = pairs(
                &format!("backend-{}", short(s)),
                size,
                n,
                |iova, gpa| {
                    d.borrow_mut()
                        .map(&map_op(iova, gpa, size))
                        .map_err(|e| e.to_string())
                },
                |iova| {
                    d.borrow_mut()
                        .unmap(IovaRange::new(iova, iova + size - 1).expect("valid"))
                        .map_err(|e| e.to_string())
                },
            )?;
            let after = (b.map_counts(), b.copy_count());
            r.note = used(before, after);
            rows.push(r);
            b.attach(ep1, Attachment::Blocked)
                .map_err(|e| e.to_string())?;
        }
    }
    // The batched patterns through the backend with the daemon's default strategy (Copy).
    b.set_map_strategy(Some(MapStrategy::Copy));
    for p in PATTERNS {
        let mut dom = b.create_domain().map_err(|e| e.to_string())?;
        b.attach(ep1, Attachment::Domain(dom.id()))
            .map_err(|e| e.to_string())?;
        let before = (b.map_counts(), b.copy_count());
        let mut r = cycles("backend-copy", p, batch_pairs, |kick| {
            for op in kick {
                match *op {
                    Op::Map { iova, gpa } => dom.map(&map_op(iova, gpa, KIB4)),
                    Op::Unmap { iova } => {
                        dom.unmap(IovaRange::new(iova, iova + KIB4 - 1).expect("valid"))
                    }
                }
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        r.note = used(before, (b.map_counts(), b.copy_count()));
        batch.push(r);
        b.attach(ep1, Attachment::Blocked)
            .map_err(|e| e.to_string())?;
    }
    b.set_map_strategy(None);
    Ok(())
}

/// Which ioctls served a row: deltas of (MAP_FILE, MAP) counts and COPY counts.
fn used(before: ((u64, u64), u64), after: ((u64, u64), u64)) -> String {
    format!(
        "{} MAP_FILE, {} MAP, {} COPY",
        after.0.0 - before.0.0,
        after.0.1 - before.0.1,
        after.1 - before.1
    )
}

/// What one daemon row maps with: a strategy, or `None` for MAPs without permissions (recorded
/// by the backend, no ioctl: the socket and kick round trip alone).
type DaemonRow = Option<MapStrategy>;

/// One daemon of the daemon rows: its polling window, what it maps in the strict pattern and
/// in the batched ones, and the suffix of its row names.
#[derive(Clone, Copy)]
struct DaemonSpec<'a> {
    poll: Duration,
    strict: &'a [DaemonRow],
    batched: &'a [DaemonRow],
    suffix: &'a str,
}

/// (d): the daemon over its socket, strict pattern, per strategy, with this polling window.
fn daemon_rows(
    b: &Arc<IommufdBackend>,
    sizes: &[(u64, usize)],
    batch_pairs: usize,
    spec: &DaemonSpec,
    rows: &mut Vec<Row>,
    batch: &mut Vec<BatchRow>,
) -> Result<()> {
    let DaemonSpec {
        poll,
        strict: which,
        batched: batch_which,
        suffix,
    } = *spec;
    let settings = DeviceSettings {
        poll,
        ..Daemon::settings(b, Mode::Inline)
    };
    let name = format!("bench-iommufd-{}", poll.as_micros());
    let daemon = Daemon::serving(&name, b.clone(), settings, false, None)?;
    let res = (|| {
        let mut vm = daemon.connect()?;
        if vm.usable_ram_end() < GPA_BASE + GPA_SPAN {
            return Err(format!(
                "TestVm usable RAM ends at {:#x}",
                vm.usable_ram_end()
            ));
        }
        // SAFETY: dup of the valid memfd the TestVm owns; the new fd is owned by the File.
        let ram = unsafe { File::from_raw_fd(libc::dup(vm.ram().fd())) };
        if ram.as_raw_fd() < 0 {
            return Err("dup of the TestVm RAM fd".into());
        }
        // Pre-fault [GPA_BASE, +SPAN) so no path pays for shmem allocation.
        let chunk = vec![0u8; 1 << 20];
        for off in (GPA_BASE..GPA_BASE + GPA_SPAN).step_by(chunk.len()) {
            ram.write_all_at(&chunk, off)
                .map_err(|e| format!("pre-fault TestVm RAM: {e}"))?;
        }
        let st = vm
            .request(&Request::attach(1, 1))
            .map_err(|e| e.to_string())?;
        if st != Status::Ok {
            return Err(format!("ATTACH: {st:?}"));
        }
        for &(size, n) in sizes {
            for &s in which {
                if s == Some(MapStrategy::MapFile) && !b.map_file_supported() {
                    continue;
                }
                b.set_map_strategy(s);
                let flags = if s.is_some() { 3 } else { 0 };
                let label = s.map_or("noop", short);
                let before = (b.map_counts(), b.copy_count());
                let vm = std::cell::RefCell::new(&mut vm);
                let ok = |st: Status, what: &str| {
                    if st == Status::Ok {
                        Ok(())
                    } else {
                        Err(format!("{what}: {st:?}"))
                    }
                };
                let mut r = pairs(
                    &format!("daemon-{label}{suffix}"),
                    size,
                    n,
                    |iova, gpa| {
                        let st = vm
                            .borrow_mut()
                            .request(&Request::map(1, iova, iova + size - 1, gpa, flags))
                            .map_err(|e| e.to_string())?;
                        ok(st, "MAP")
                    },
                    |iova| {
                        let st = vm
                            .borrow_mut()
                            .request(&Request::unmap(1, iova, iova + size - 1))
                            .map_err(|e| e.to_string())?;
                        ok(st, "UNMAP")
                    },
                )?;
                let after = (b.map_counts(), b.copy_count());
                r.note = used(before, after);
                rows.push(r);
            }
        }
        // The batched patterns: each kick of the pattern is one `TestVm::batch` (all its
        // requests in the avail ring, one kick, wait for all of them).
        for p in PATTERNS {
            for &s in batch_which {
                b.set_map_strategy(s);
                let flags = if s.is_some() { 3 } else { 0 };
                let label = s.map_or("noop", short);
                let before = (b.map_counts(), b.copy_count());
                let mut r = cycles(&format!("daemon-{label}{suffix}"), p, batch_pairs, |kick| {
                    let reqs: Vec<Request> = kick
                        .iter()
                        .map(|op| match *op {
                            Op::Map { iova, gpa } => {
                                Request::map(1, iova, iova + KIB4 - 1, gpa, flags)
                            }
                            Op::Unmap { iova } => Request::unmap(1, iova, iova + KIB4 - 1),
                        })
                        .collect();
                    let sts = vm.batch(&reqs).map_err(|e| e.to_string())?;
                    match sts.iter().position(|&st| st != Status::Ok) {
                        None if sts.len() == reqs.len() => Ok(()),
                        None => Err(format!(
                            "{} statuses for {} requests",
                            sts.len(),
                            reqs.len()
                        )),
                        Some(i) => Err(format!(
                            "request {i} of {} in the kick: {:?}",
                            reqs.len(),
                            sts[i]
                        )),
                    }
                })?;
                r.note = used(before, (b.map_counts(), b.copy_count()));
                batch.push(r);
            }
        }
        b.set_map_strategy(None);
        vm.disconnect();
        Ok(())
    })();
    drop(daemon);
    res
}

/// One point of the connect-cost curve (issue 19).
struct ConnectRow {
    path: &'static str,
    ram_mib: u64,
    set_ms: f64,
    pinned_mib: u64,
    release_ms: f64,
}

/// Times `set_ram(table)` (the backend's part of SET_MEM_TABLE), which must pin `want` bytes,
/// and then the table's release (a disconnect's), which must give them all back.
fn time_set_ram(
    b: &IommufdBackend,
    table: &GuestRam,
    path: &'static str,
    mib: u64,
    want: u64,
) -> Result<ConnectRow> {
    let pinned0 = b.pinned_bytes();
    let t = Instant::now();
    b.set_ram(table)
        .map_err(|e| format!("{path}: set_ram of {mib} MiB: {e}"))?;
    let set_ms = t.elapsed().as_secs_f64() * 1e3;
    let pinned = b.pinned_bytes().saturating_sub(pinned0);
    if pinned != want {
        return Err(format!(
            "{path}, {mib} MiB: set_ram pinned {pinned:#x} bytes, expected {want:#x}"
        ));
    }
    let t = Instant::now();
    b.set_ram(&GuestRam::default())
        .map_err(|e| format!("set_ram of nothing: {e}"))?;
    let release_ms = t.elapsed().as_secs_f64() * 1e3;
    if b.pinned_bytes() != pinned0 {
        return Err(format!(
            "{path}, {mib} MiB: {:#x} bytes pinned after the table was taken away, {pinned0:#x} before",
            b.pinned_bytes()
        ));
    }
    Ok(ConnectRow {
        path,
        ram_mib: mib,
        set_ms,
        pinned_mib: pinned >> 20,
        release_ms,
    })
}

/// Connect cost against guest RAM (issue 19): the backend's part of SET_MEM_TABLE
/// (`DmaBackend::set_ram`, which runs before the daemon replies to QEMU) for each RAM size, with
/// the bytes it pins: with `RamStaging::AllRam` (all guest RAM staged in the identity IOAS, by
/// MAP_FILE or by user VA) and with the default `RamStaging::OnDemand`; then the table is taken
/// away again (what a disconnect costs). Fresh memfds, not faulted in (as QEMU's RAM of a
/// guest that has not run).
fn connect_rows(b: &IommufdBackend) -> Result<Vec<ConnectRow>> {
    let mut rows = Vec::new();
    let sizes: Vec<u64> = std::env::var("BENCH_CONNECT_MIB")
        .unwrap_or_else(|_| "16,64,128,256".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for mib in sizes {
        let size = mib << 20;
        for (path, staging, s) in [
            (
                "all-ram, MAP_FILE",
                RamStaging::AllRam,
                Some(MapStrategy::MapFile),
            ),
            (
                "all-ram, MAP (user VA)",
                RamStaging::AllRam,
                Some(MapStrategy::Map),
            ),
            ("on-demand", RamStaging::OnDemand, None),
            (
                "all-ram, MAP_FILE, populated",
                RamStaging::AllRam,
                Some(MapStrategy::MapFile),
            ),
        ] {
            if s == Some(MapStrategy::MapFile) && !b.map_file_supported() {
                continue;
            }
            let ram = MemfdRam::new(size).map_err(|e| format!("memfd of {mib} MiB: {e}"))?;
            // SAFETY: dup of the valid memfd `ram` owns; the new fd is owned by the File.
            let file = unsafe { File::from_raw_fd(libc::dup(ram.fd())) };
            if file.as_raw_fd() < 0 {
                return Err("dup of the memfd".into());
            }
            if path.ends_with("populated") {
                // Every page allocated before the table arrives (as hugetlb RAM is below), so
                // that the row times the pinning alone.
                let chunk = vec![0u8; 1 << 20];
                for off in (0..size).step_by(chunk.len()) {
                    file.write_all_at(&chunk, off)
                        .map_err(|e| format!("populate the memfd: {e}"))?;
                }
            }
            let st = file.metadata().map_err(|e| e.to_string())?;
            let table = GuestRam::new(vec![RamRegion {
                gpa: GpaRange::new(0, size - 1).expect("valid"),
                host_addr: ram.host_addr(),
                backing: Some(Backing {
                    file: Arc::new(file),
                    offset: 0,
                    file_id: (st.dev(), st.ino()),
                }),
            }])?;
            b.set_map_strategy(s);
            b.set_staging(staging);
            let want = if staging == RamStaging::AllRam {
                size
            } else {
                0
            };
            rows.push(time_set_ram(b, &table, path, mib, want)?);
        }
    }
    // hugetlb-backed RAM (populated at creation, unlike the shmem rows' fresh memfds), all RAM
    // staged: as far as the hugepage pool allows.
    match Hugepages::reserve(64 << 20) {
        Err(why) => println!("SKIP: bench-iommufd connect cost on hugetlb RAM: {why}"),
        Ok(_pool) => {
            for mib in [16u64, 64] {
                let size = mib << 20;
                for (path, s) in [
                    ("all-ram, MAP_FILE, hugetlb", MapStrategy::MapFile),
                    ("all-ram, MAP (user VA), hugetlb", MapStrategy::Map),
                ] {
                    if s == MapStrategy::MapFile && !b.map_file_supported() {
                        continue;
                    }
                    let ram = HugeRam::new(size)?;
                    let file = ram.file.try_clone().map_err(|e| e.to_string())?;
                    let st = file.metadata().map_err(|e| e.to_string())?;
                    let table = GuestRam::new(vec![RamRegion {
                        gpa: GpaRange::new(0, size - 1).expect("valid"),
                        host_addr: ram.addr,
                        backing: Some(Backing {
                            file: Arc::new(file),
                            offset: 0,
                            file_id: (st.dev(), st.ino()),
                        }),
                    }])?;
                    b.set_map_strategy(Some(s));
                    b.set_staging(RamStaging::AllRam);
                    rows.push(time_set_ram(b, &table, path, mib, size)?);
                }
            }
        }
    }
    b.set_map_strategy(None);
    b.set_staging(RamStaging::OnDemand);
    Ok(rows)
}

/// One point of the state-size curve on real iommufd (issue 19).
struct StateRow {
    live: usize,
    fill_ms: f64,
    map: Vec<u64>,
    unmap: Vec<u64>,
    unmap_all_ms: f64,
    detach_ms: f64,
}

/// Per-request cost against the live mappings of one domain, through the daemon on real
/// iommufd (production settings: inline, default poll, staging on demand, so MAPs are
/// MAP_FILE): N 4 KiB mappings filled in kicks of 64, then `pairs` MAP+UNMAP pairs of one more
/// page on top (one request per kick, as in strict mode), then one UNMAP over all N; then N
/// again and the DETACH that destroys the domain with them (its IOAS). Every request is checked
/// for S_OK, and after each point nothing stays pinned.
fn state_rows(b: &Arc<IommufdBackend>, sizes: &[usize], pairs: usize) -> Result<Vec<StateRow>> {
    const BASE: u64 = 1 << 32;
    const KICK: usize = 64;
    b.set_map_strategy(None);
    let d = Daemon::start("bench-state", b.clone(), Mode::Inline, false)?;
    let mut vm = d.connect()?;
    let pages = (vm.usable_ram_end() / KIB4).max(1);
    let map = |i: u64| {
        let iova = BASE + i * KIB4;
        Request::map(1, iova, iova + KIB4 - 1, (i % pages) * KIB4, 3)
    };
    let all_ok = |what: &str, st: Vec<Status>| -> Result<()> {
        match st.iter().find(|s| **s != Status::Ok) {
            None => Ok(()),
            Some(s) => Err(format!("{what}: {}", s.name())),
        }
    };
    let mut rows = Vec::new();
    for &n in sizes {
        let fill = |vm: &mut TestVm| -> Result<f64> {
            let t = Instant::now();
            let reqs: Vec<Request> = (0..n as u64).map(map).collect();
            for chunk in reqs.chunks(KICK) {
                all_ok("fill", vm.batch(chunk).map_err(|e| e.to_string())?)?;
            }
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let one = |vm: &mut TestVm, r: &Request, what: &str| -> Result<u64> {
            let t = Instant::now();
            all_ok(what, vec![vm.request(r).map_err(|e| e.to_string())?])?;
            Ok(t.elapsed().as_nanos() as u64)
        };
        all_ok(
            "attach",
            vec![
                vm.request(&Request::attach(1, 1))
                    .map_err(|e| e.to_string())?,
            ],
        )?;
        let fill_ms = fill(&mut vm)?;
        let (mut maps, mut unmaps) = (Vec::new(), Vec::new());
        for r in 0..pairs as u64 {
            let i = n as u64 + 1 + r % 64;
            maps.push(one(&mut vm, &map(i), "map")?);
            let iova = BASE + i * KIB4;
            unmaps.push(one(
                &mut vm,
                &Request::unmap(1, iova, iova + KIB4 - 1),
                "unmap",
            )?);
        }
        let end = BASE + (n as u64).max(1) * KIB4 - 1;
        let unmap_all_ms = one(&mut vm, &Request::unmap(1, BASE, end), "unmap all")? as f64 / 1e6;
        if b.pinned_bytes() != 0 {
            return Err(format!(
                "{n}: {:#x} bytes pinned after the UNMAP of all",
                b.pinned_bytes()
            ));
        }
        fill(&mut vm)?;
        let detach_ms = one(&mut vm, &Request::detach(1, 1), "detach")? as f64 / 1e6;
        if b.pinned_bytes() != 0 || !b.domain_ids().is_empty() {
            return Err(format!(
                "{n}: after the DETACH {:#x} bytes pinned, IOASes {:?}",
                b.pinned_bytes(),
                b.domain_ids()
            ));
        }
        maps.sort_unstable();
        unmaps.sort_unstable();
        rows.push(StateRow {
            live: n,
            fill_ms,
            map: maps,
            unmap: unmaps,
            unmap_all_ms,
            detach_ms,
        });
    }
    let before = d.devices();
    vm.disconnect();
    d.wait_closed(before, Duration::from_secs(30))?;
    Ok(rows)
}

fn print_state(rows: &[StateRow]) {
    println!(
        "\nbench-iommufd state: per-request cost against live mappings (daemon, real iommufd, MAP_FILE, one request per kick)"
    );
    println!(
        "| live mappings | fill ms | MAP p50 µs | MAP p99 µs | UNMAP p50 µs | UNMAP p99 µs | one UNMAP of all, ms | DETACH (destroy) ms | MAP p50 / at 1 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let base = rows
        .first()
        .map(|r| percentile(&r.map, 0.5))
        .unwrap_or(1)
        .max(1);
    for r in rows {
        let us = |v: &[u64], p| percentile(v, p) as f64 / 1e3;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            r.live,
            r.fill_ms,
            us(&r.map, 0.5),
            us(&r.map, 0.99),
            us(&r.unmap, 0.5),
            us(&r.unmap, 0.99),
            r.unmap_all_ms,
            r.detach_ms,
            percentile(&r.map, 0.5) as f64 / base as f64
        );
    }
}

fn print_connect(rows: &[ConnectRow], staging_hwpt: bool) {
    println!(
        "\nConnect cost against guest RAM: the backend's part of SET_MEM_TABLE (set_ram), staging HWPT {}",
        if staging_hwpt { "present" } else { "absent" }
    );
    println!("| staging, map path | guest RAM MiB | set_ram ms | pinned MiB | release ms |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {} | {:.1} |",
            r.path, r.ram_mib, r.set_ms, r.pinned_mib, r.release_ms
        );
    }
    for path in [
        "all-ram, MAP_FILE",
        "all-ram, MAP (user VA)",
        "on-demand",
        "all-ram, MAP_FILE, populated",
        "all-ram, MAP_FILE, hugetlb",
        "all-ram, MAP (user VA), hugetlb",
    ] {
        let pts: Vec<&ConnectRow> = rows.iter().filter(|r| r.path == path).collect();
        if let (Some(a), Some(z)) = (pts.first(), pts.last())
            && z.ram_mib > a.ram_mib
        {
            let per_gib =
                ((z.set_ms - a.set_ms) / (z.ram_mib - a.ram_mib) as f64 * 1024.0).max(0.0);
            println!(
                "{path}: {per_gib:.0} ms per GiB of guest RAM ({}..{} MiB); at that slope 1 TiB takes {:.0} s before QEMU gets its reply",
                a.ram_mib,
                z.ram_mib,
                per_gib * 1024.0 / 1e3
            );
        }
    }
}

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .write_style(env_logger::WriteStyle::Never)
        .init();
    guest_kit::sys::unlimited_memlock();
    let t0 = Instant::now();
    let sizes = [
        (KIB4, env_n("BENCH_PAIRS_4K", 256)),
        (MIB2, env_n("BENCH_PAIRS_2M", 32)),
    ];
    let batch_pairs = env_n("BENCH_PAIRS_BATCH", sizes[0].1);
    let run = (|| -> Result<_> {
        let (b, edus) = backend_over_two_edus()?;
        println!(
            "bench-iommufd: edus {} and {}; MAP_FILE {}; staging HWPT {:?}; TCG guest: only ratios count",
            edus[0].0,
            edus[1].0,
            if b.map_file_supported() {
                "available"
            } else {
                "not available"
            },
            b.staging_hwpt()
        );
        let mut rows = Vec::new();
        let mut batch = Vec::new();
        raw_rows(&b, &sizes, batch_pairs, &mut rows, &mut batch)?;
        let auto = b.auto_map_strategy();
        let copy = b.copy_works();
        let all = [
            Some(MapStrategy::Map),
            Some(MapStrategy::MapFile),
            Some(MapStrategy::Copy),
            None,
        ];
        let copy_noop = [Some(MapStrategy::Copy), None];
        for spec in [
            DaemonSpec {
                poll: DEFAULT_POLL,
                strict: &all,
                batched: &copy_noop,
                suffix: "",
            },
            DaemonSpec {
                poll: Duration::ZERO,
                strict: &copy_noop,
                batched: &copy_noop,
                suffix: "-poll0",
            },
        ] {
            daemon_rows(&b, &sizes, batch_pairs, &spec, &mut rows, &mut batch)?;
        }
        let connect = connect_rows(&b)?;
        let state_sizes: Vec<usize> = std::env::var("BENCH_STATE_SIZES")
            .unwrap_or_else(|_| "1,1000,10000".into())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        let state = state_rows(&b, &state_sizes, env_n("BENCH_STATE_PAIRS", 128))?;
        Ok((
            rows,
            batch,
            auto,
            copy,
            connect,
            b.staging_hwpt().is_some(),
            state,
        ))
    })();
    match run {
        Ok((rows, batch, auto, copy, connect, hwpt, state)) => {
            print_table(&rows);
            print_batch(&batch, &rows);
            print_huge(&rows);
            print_connect(&connect, hwpt);
            print_state(&state);
            println!(
                "PASS: bench-iommufd sub-range IOMMU_IOAS_COPY from the staging IOAS ({})",
                match copy {
                    Some(true) => "works".to_string(),
                    Some(false) => "refused by this kernel".to_string(),
                    None => "not probed: no staging HWPT".to_string(),
                }
            );
            println!(
                "PASS: bench-iommufd ran ({} rows, {} batched rows, automatic map strategy {}, {:.1} s)",
                rows.len(),
                batch.len(),
                auto.name(),
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL: bench-iommufd: {e}");
            ExitCode::FAILURE
        }
    }
}
