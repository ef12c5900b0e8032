//! How the per-request cost grows with the state the daemon holds (issue 19): MAP and UNMAP
//! latency with N live mappings in the domain, and one UNMAP covering all of them, through the
//! real daemon (soft backend, inline) over its socket. `bench --state-sweep` prints the curve.

use std::time::Instant;

use super::daemon::{LocalDaemon, LocalOptions};
use super::{BenchError, all_ok, percentile};
use crate::domains::Limits;
use crate::driver::{TestVm, VmOptions};
use crate::heap::rss_kib;
use crate::pipeline::Mode;
use crate::protocol::{MAP_F_READ, MAP_F_WRITE, Request};

/// IOVAs of the live mappings start here (above 4 GiB, clear of the MSI window).
const IOVA_BASE: u64 = 1 << 32;
const PAGE: u64 = 0x1000;
/// MAPs per kick while filling.
const FILL_BATCH: usize = 256;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

/// One point of the curve.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatePoint {
    pub live: usize,
    pub fill_ns: u64,
    pub map_p50_ns: u64,
    pub map_p99_ns: u64,
    pub unmap_p50_ns: u64,
    pub unmap_p99_ns: u64,
    /// One UNMAP request covering every live mapping.
    pub unmap_all_ns: u64,
    /// This process's RSS (daemon and simulated guest) with the mappings live, KiB.
    pub rss_kib: u64,
    /// The same once they were all unmapped and the endpoint detached, KiB.
    pub rss_after_kib: u64,
}

/// Measures each of `sizes` live mappings with `rounds` MAP+UNMAP pairs (one request per kick,
/// like the Linux driver in strict mode) on top of them.
pub fn run_state_sweep(sizes: &[usize], rounds: usize) -> Result<Vec<StatePoint>, BenchError> {
    let most = sizes.iter().copied().max().unwrap_or(0) + rounds + 1;
    let d = LocalDaemon::start(LocalOptions {
        mode: Mode::Inline,
        limits: Limits {
            max_domains: 4,
            max_mappings_per_domain: most,
            max_mappings_total: most,
        },
        ..LocalOptions::default()
    })
    .map_err(BenchError::Daemon)?;
    let ram_size = 64u64 << 20;
    let mut vm = TestVm::connect(
        d.socket(),
        VmOptions {
            queue_size: 1024,
            ram_size,
            ..VmOptions::default()
        },
    )?;
    let pages = vm.usable_ram_end() / PAGE;
    let map = |i: u64| {
        Request::map(
            1,
            IOVA_BASE + i * PAGE,
            IOVA_BASE + i * PAGE + PAGE - 1,
            (i % pages) * PAGE,
            3,
        )
    };
    let mut points = Vec::new();
    for &live in sizes {
        all_ok("attach", &[vm.request(&Request::attach(1, 1))?])?;
        let t = Instant::now();
        let all: Vec<Request> = (0..live as u64).map(map).collect();
        for chunk in all.chunks(FILL_BATCH) {
            all_ok("fill", &vm.batch(chunk)?)?;
        }
        let fill_ns = t.elapsed().as_nanos() as u64;
        let (mut maps, mut unmaps) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        for r in 0..rounds as u64 {
            let i = live as u64 + 1 + r % 1024;
            let t = Instant::now();
            all_ok("map", &[vm.request(&map(i))?])?;
            maps.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let iova = IOVA_BASE + i * PAGE;
            all_ok(
                "unmap",
                &[vm.request(&Request::unmap(1, iova, iova + PAGE - 1))?],
            )?;
            unmaps.push(t.elapsed().as_nanos() as u64);
        }
        let rss = rss_kib();
        let t = Instant::now();
        let end = IOVA_BASE + (live as u64).max(1) * PAGE - 1;
        all_ok(
            "unmap all",
            &[vm.request(&Request::unmap(1, IOVA_BASE, end))?],
        )?;
        let unmap_all_ns = t.elapsed().as_nanos() as u64;
        all_ok("detach", &[vm.request(&Request::detach(1, 1))?])?;
        let rss_after = rss_kib();
        maps.sort_unstable();
        unmaps.sort_unstable();
        points.push(StatePoint {
            live,
            fill_ns,
            map_p50_ns: percentile(&maps, 0.5),
            map_p99_ns: percentile(&maps, 0.99),
            unmap_p50_ns: percentile(&unmaps, 0.5),
            unmap_p99_ns: percentile(&unmaps, 0.99),
            unmap_all_ns,
            rss_kib: rss,
            rss_after_kib: rss_after,
        });
    }
    vm.disconnect();
    Ok(points)
}

/// The domain model's own memory per live mapping: what the daemon holds for each 4 KiB mapping
/// when the kernel holds the translation (iommufd backend), measured on a backend that holds
/// nothing, in this thread's heap (glibc `mallinfo2`, bytes in use), for IOVAs given in
/// ascending order, descending order (Linux's IOVA allocator hands them out top-down) and a
/// shuffled order. `(order, bytes per mapping)`.
pub fn model_bytes_per_mapping(n: usize) -> Result<Vec<(&'static str, f64)>, BenchError> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use crate::backend::{
        Attachment, DmaBackend, HostConstraints, HwDomain, MapOp, Result as BackendResult,
    };
    use crate::domains::{DomainKind, DomainTable, Rules};
    use crate::guest_ram::{GuestRam, RamRegion};
    use crate::ids::{DomainId, EndpointId, GpaRange, IovaRange};

    struct Nothing;
    impl HwDomain for Nothing {
        fn id(&self) -> u32 {
            1
        }
        fn map(&mut self, _: &MapOp) -> BackendResult<()> {
            Ok(())
        }
        fn unmap(&mut self, _: IovaRange) -> BackendResult<()> {
            Ok(())
        }
    }
    struct HoldsNothing;
    impl DmaBackend for HoldsNothing {
        fn name(&self) -> &'static str {
            "nothing"
        }
        fn constraints(&self) -> HostConstraints {
            HostConstraints {
                page_size_mask: !0xfff,
                input_range: IovaRange::new(0, u64::MAX).expect("valid"),
                reserved: Vec::new(),
            }
        }
        fn create_domain(&self) -> BackendResult<Box<dyn HwDomain>> {
            Ok(Box::new(Nothing))
        }
        fn attach(&self, _: EndpointId, _: Attachment) -> BackendResult<()> {
            Ok(())
        }
        fn set_ram(&self, _: &GuestRam) -> BackendResult<()> {
            Ok(())
        }
    }
    fn in_use() -> usize {
        // SAFETY: mallinfo2 takes nothing and returns a plain struct.
        unsafe { libc::mallinfo2() }.uordblks
    }

    let backend: Arc<dyn DmaBackend> = Arc::new(HoldsNothing);
    let ram_size = 1u64 << 30;
    let ram = Arc::new(
        GuestRam::new(vec![RamRegion {
            gpa: GpaRange::new(0, ram_size - 1).expect("valid"),
            host_addr: 1 << 40,
            backing: None,
        }])
        .map_err(BenchError::Setup)?,
    );
    let limits = Limits {
        max_domains: 4,
        max_mappings_per_domain: n + 1,
        max_mappings_total: n + 1,
    };
    let rules = Arc::new(Rules::for_host(
        &backend.constraints(),
        (0, u32::MAX),
        limits,
        512,
    ));
    let pages = ram_size / PAGE;
    let mut out = Vec::new();
    let mut shuffled: Vec<u64> = (0..n as u64).collect();
    // A fixed xorshift shuffle: the same order every run.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..shuffled.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shuffled.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for (order, idx) in [
        ("ascending", (0..n as u64).collect::<Vec<_>>()),
        ("descending", (0..n as u64).rev().collect()),
        ("shuffled", shuffled),
    ] {
        let mut table = DomainTable::new(
            rules.clone(),
            backend.clone(),
            ram.clone(),
            Arc::new(AtomicUsize::new(0)),
        );
        let d = DomainId(1);
        table
            .create(d, DomainKind::Paging)
            .map_err(|e| BenchError::Setup(format!("create: {e:?}")))?;
        let before = in_use();
        for &i in &idx {
            let iova = IOVA_BASE + i * PAGE;
            table
                .execute(&Request::map(
                    d.0,
                    iova,
                    iova + PAGE - 1,
                    (i % pages) * PAGE,
                    RW,
                ))
                .map_err(|e| BenchError::Setup(format!("map {i}: {e:?}")))?;
        }
        let bytes = in_use().saturating_sub(before);
        out.push((order, bytes as f64 / n.max(1) as f64));
        drop(table);
    }
    Ok(out)
}

/// The curve as a Markdown table.
pub fn state_table(points: &[StatePoint]) -> String {
    let mut out = String::from(
        "| live mappings | fill, s | MAP p50 µs | MAP p99 µs | UNMAP p50 µs | UNMAP p99 µs | one UNMAP of all, ms | RSS MiB | RSS after teardown MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        out.push_str(&format!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |\n",
            p.live,
            p.fill_ns as f64 / 1e9,
            p.map_p50_ns as f64 / 1e3,
            p.map_p99_ns as f64 / 1e3,
            p.unmap_p50_ns as f64 / 1e3,
            p.unmap_p99_ns as f64 / 1e3,
            p.unmap_all_ns as f64 / 1e6,
            p.rss_kib as f64 / 1024.0,
            p.rss_after_kib as f64 / 1024.0,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_this_process_spinning() {
        // Spins until the count shows 0.1 s, for at most 10 s of wall time: on a loaded machine
        // this thread gets only part of a core, so a fixed spin proves nothing about the count.
        let c0 = cpu_secs();
        let t = std::time::Instant::now();
        while cpu_secs() - c0 < 0.1 && t.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..10_000 {
                std::hint::spin_loop();
            }
        }
        let used = cpu_secs() - c0;
        assert!(used >= 0.1, "10 s of spinning counted as {used} s");
    }

    #[test]
    fn a_small_sweep_measures_every_size_and_leaves_the_domain_empty() {
        let points = run_state_sweep(&[1, 300], 20).unwrap();
        assert_eq!(points.iter().map(|p| p.live).collect::<Vec<_>>(), [1, 300]);
        for p in &points {
            assert!(p.map_p50_ns > 0 && p.map_p50_ns <= p.map_p99_ns, "{p:?}");
            assert!(
                p.unmap_p50_ns > 0 && p.unmap_p50_ns <= p.unmap_p99_ns,
                "{p:?}"
            );
            assert!(p.unmap_all_ns > 0, "{p:?}");
        }
        assert!(state_table(&points).lines().count() == 4);
    }
}

/// What `n` idle daemons cost: each served a burst of requests, then its guest went quiet.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdlePoint {
    pub daemons: usize,
    pub idle_secs: f64,
    /// CPU seconds this process (every daemon and simulated guest) used while all were idle.
    pub cpu_secs: f64,
    /// RSS growth per daemon over the process before they started, KiB.
    pub rss_kib_per_daemon: u64,
}

fn cpu_secs() -> f64 {
    // After the command name: state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt,
    // cminflt, majflt, cmajflt, utime, stime (proc(5)), the times in clock ticks.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// A guest's burst before it goes quiet: an ATTACH, then 200 MAP+UNMAP pairs back to back (so
/// the polling window is at its widest when the burst ends).
fn burst(vm: &mut TestVm) -> Result<(), BenchError> {
    all_ok("attach", &[vm.request(&Request::attach(1, 1))?])?;
    for i in 0..200u64 {
        let iova = i * PAGE;
        all_ok(
            "map",
            &[vm.request(&Request::map(1, iova, iova + PAGE - 1, iova, RW))?],
        )?;
        all_ok(
            "unmap",
            &[vm.request(&Request::unmap(1, iova, iova + PAGE - 1))?],
        )?;
    }
    Ok(())
}

/// Starts `n` daemons (in this process, default polling window), has each one's guest send a
/// burst of MAP/UNMAP pairs back to back (so the polling window is at its widest), then leaves
/// them all idle for `idle` and measures the CPU they used meanwhile.
pub fn run_idle(n: usize, idle: std::time::Duration) -> Result<IdlePoint, BenchError> {
    let rss0 = rss_kib();
    let mut fleet = Vec::with_capacity(n);
    for _ in 0..n {
        let d = LocalDaemon::start(LocalOptions::default()).map_err(BenchError::Daemon)?;
        let mut vm = TestVm::connect(d.socket(), VmOptions::default())?;
        burst(&mut vm)?;
        fleet.push((d, vm));
    }
    let rss = rss_kib();
    let c0 = cpu_secs();
    std::thread::sleep(idle);
    let cpu = cpu_secs() - c0;
    drop(fleet);
    Ok(IdlePoint {
        daemons: n,
        idle_secs: idle.as_secs_f64(),
        cpu_secs: cpu,
        rss_kib_per_daemon: rss.saturating_sub(rss0) / n.max(1) as u64,
    })
}

/// One daemon as its own process (this binary, spawned with `--socket-path`), idle after a
/// burst: what an operator sees in `ps` for a VM whose guest went quiet.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdleProcess {
    pub idle_secs: f64,
    /// CPU seconds the daemon process used while idle.
    pub cpu_secs: f64,
    /// Its resident set with no VMM connected, and idle with one connected, KiB.
    pub rss_kib_alone: u64,
    pub rss_kib_idle: u64,
}

/// Spawns `exe` as a daemon on a socket in a fresh directory, reads its RSS, connects a
/// simulated VMM (64 MiB guest), sends 200 MAP+UNMAP pairs, then leaves it idle for `idle` and
/// reads its CPU time (from /proc/PID/stat) and RSS (VmRSS).
pub fn run_idle_process(
    exe: &std::path::Path,
    idle: std::time::Duration,
) -> Result<IdleProcess, BenchError> {
    let dir = std::env::temp_dir().join(format!("viommu-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::Daemon)?;
    let sock = dir.join("v.sock");
    let mut child = std::process::Command::new(exe)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(BenchError::Daemon)?;
    let pid = child.id();
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        t(11) + t(12)
    };
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let result = (|| {
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > std::time::Duration::from_secs(10) {
                return Err(BenchError::Setup(
                    "the daemon's socket did not appear".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let rss_alone = rss();
        let mut vm = TestVm::connect(&sock, VmOptions::default())?;
        burst(&mut vm)?;
        let t0 = ticks();
        std::thread::sleep(idle);
        let used = ticks() - t0;
        let rss_idle = rss();
        vm.disconnect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(IdleProcess {
            idle_secs: idle.as_secs_f64(),
            cpu_secs: used as f64 / hz,
            rss_kib_alone: rss_alone,
            rss_kib_idle: rss_idle,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// N daemons all busy at once (issue 19): each has its own guest sending MAP+UNMAP pairs back
/// to back, one request per kick, for the same time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BusyPoint {
    pub daemons: usize,
    pub secs: f64,
    /// Requests answered by all daemons together, per second.
    pub requests_per_sec: f64,
    /// Kick-to-answer latency over every request of every daemon.
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// The worst daemon's p99 (one daemon starved by the others shows here).
    pub worst_p99_ns: u64,
    /// The fewest requests one daemon got answered (fairness).
    pub fewest_requests: usize,
}

/// Runs `n` daemons (in this process, inline, default polling window) with one guest thread
/// each for `secs`, every request checked for `S_OK`.
pub fn run_busy(n: usize, secs: std::time::Duration) -> Result<BusyPoint, BenchError> {
    let mut fleet = Vec::with_capacity(n);
    for _ in 0..n {
        let d = LocalDaemon::start(LocalOptions::default()).map_err(BenchError::Daemon)?;
        let mut vm = TestVm::connect(d.socket(), VmOptions::default())?;
        all_ok("attach", &[vm.request(&Request::attach(1, 1))?])?;
        fleet.push((d, vm));
    }
    let start = std::sync::Barrier::new(n);
    let per_daemon: Vec<Result<Vec<u64>, BenchError>> = std::thread::scope(|s| {
        let threads: Vec<_> = fleet
            .iter_mut()
            .map(|(_, vm)| {
                let start = &start;
                s.spawn(move || -> Result<Vec<u64>, BenchError> {
                    let mut lat = Vec::new();
                    start.wait();
                    let t0 = Instant::now();
                    let mut i = 0u64;
                    while t0.elapsed() < secs {
                        let iova = IOVA_BASE + (i % 1024) * PAGE;
                        for r in [
                            Request::map(1, iova, iova + PAGE - 1, 0, RW),
                            Request::unmap(1, iova, iova + PAGE - 1),
                        ] {
                            let t = Instant::now();
                            all_ok("busy", &[vm.request(&r)?])?;
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a guest thread panicked"))
            .collect()
    });
    let mut all = Vec::new();
    let mut worst_p99 = 0;
    let mut fewest = usize::MAX;
    for r in per_daemon {
        let mut lat = r?;
        lat.sort_unstable();
        worst_p99 = worst_p99.max(percentile(&lat, 0.99));
        fewest = fewest.min(lat.len());
        all.extend(lat);
    }
    all.sort_unstable();
    drop(fleet);
    Ok(BusyPoint {
        daemons: n,
        secs: secs.as_secs_f64(),
        requests_per_sec: all.len() as f64 / secs.as_secs_f64(),
        p50_ns: percentile(&all, 0.5),
        p99_ns: percentile(&all, 0.99),
        worst_p99_ns: worst_p99,
        fewest_requests: fewest,
    })
}

#[cfg(test)]
mod busy_tests {
    use super::*;

    #[test]
    fn every_busy_daemon_answers_its_guest() {
        let p = run_busy(3, std::time::Duration::from_millis(300)).unwrap();
        assert_eq!(p.daemons, 3);
        assert!(p.fewest_requests > 0, "{p:?}");
        assert!(p.p50_ns > 0 && p.p50_ns <= p.p99_ns && p.p99_ns <= p.worst_p99_ns.max(p.p99_ns));
        assert!(p.requests_per_sec > 0.0);
    }
}
