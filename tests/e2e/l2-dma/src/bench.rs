//! The peer comparison's workloads (tests/e2e/peers.sh), run by L2 when its command line has
//! `e2e.bench=CONFIG`. The same kernel, devices and workloads run under every vIOMMU
//! configuration L1 offers; this module only measures and prints one `BENCH` line per result:
//!
//! `BENCH config=C mode=M workload=W ops=N secs=S iops=I mbps=B p50_us=P p99_us=Q`
//!
//! - NVMe through the kernel's nvme driver, O_DIRECT: 4 KiB random reads at queue depth 1 and
//!   32 (32 threads, one read in flight each), 128 KiB sequential reads;
//! - the NIC through igb: a TCP stream echoed by L1's peer;
//! - L2 userspace `IOMMU_IOAS_MAP` + `IOMMU_IOAS_UNMAP` of one 4 KiB page on an edu bound to
//!   vfio-pci (only where L2 has an IOMMU), and the same on an IOAS no device is attached to
//!   (`ioas-map-unmap-4k-floor`, every configuration): L2's own share of that row (the syscall,
//!   pinning, iommufd's bookkeeping, all under two levels of TCG), which reaches no vIOMMU, so
//!   the row minus its floor is what the vIOMMU costs.
//!
//! Each runs with the devices' IOMMU groups in strict mode (`iommu.strict=1` at boot), then again
//! after switching both groups to lazy invalidation (`DMA-FQ`); without an IOMMU in L2 there is
//! one mode, `none`.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::uapi::{ioctl, IoctlArg, IommuIoasAlloc};
use crate::{map, mmio, nic, nvme, open_vfio_edu, unmap, Page};
use guest_kit::sys::open_rw;

/// Reads stay inside the image's first 32 MiB.
const SPAN: u64 = 32 << 20;
const BLOCK: usize = 4096;
const SEQ: usize = 128 << 10;

struct Sample {
    lat_ns: Vec<u64>,
    bytes: u64,
    secs: f64,
}

impl Sample {
    fn line(&mut self, config: &str, mode: &str, workload: &str) {
        self.lat_ns.sort_unstable();
        let n = self.lat_ns.len();
        let pct = |p: f64| {
            if n == 0 {
                0.0
            } else {
                self.lat_ns[((n as f64 * p) as usize).min(n - 1)] as f64 / 1e3
            }
        };
        println!(
            "BENCH config={config} mode={mode} workload={workload} ops={n} secs={:.2} iops={:.0} \
             mbps={:.2} p50_us={:.0} p99_us={:.0}",
            self.secs,
            n as f64 / self.secs,
            self.bytes as f64 / self.secs / 1e6,
            pct(0.50),
            pct(0.99),
        );
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `depth` threads, each with one read of `len` bytes in flight, for `secs`; `random` picks
/// block-aligned offsets at random, otherwise each thread reads on sequentially.
fn reads(node: &str, depth: usize, len: usize, random: bool, secs: f64) -> Result<Sample, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let workers: Vec<_> = (0..depth)
        .map(|i| {
            let stop = stop.clone();
            let node = node.to_owned();
            thread::spawn(move || -> Result<Vec<u64>, String> {
                let disk = nvme::open_direct(&node)?;
                let mut buf = nvme::DmaBuf::new(len)?;
                let mut lat = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1);
                let mut off = (i as u64 * SPAN / depth as u64) / len as u64 * len as u64;
                while !stop.load(Ordering::Relaxed) {
                    if random {
                        off = xorshift(&mut x) % (SPAN / len as u64) * len as u64;
                    }
                    let t = Instant::now();
                    disk.read_exact_at(buf.as_mut(), off)
                        .map_err(|e| format!("{node}: read {len} at {off:#x}: {e}"))?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    off = (off + len as u64) % SPAN;
                }
                Ok(lat)
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat_ns = Vec::new();
    for w in workers {
        lat_ns.extend(w.join().map_err(|_| "reader panicked".to_string())??);
    }
    let secs = t.elapsed().as_secs_f64();
    let bytes = (lat_ns.len() * len) as u64;
    Ok(Sample {
        lat_ns,
        bytes,
        secs,
    })
}

/// `IOMMU_IOAS_MAP` + `IOMMU_IOAS_UNMAP` of one page, back to back, for `secs`.
fn ioas_pairs(edu_bdf: &str, secs: f64) -> Result<Sample, String> {
    let iommufd = open_rw("/dev/iommu")?;
    let edu = open_vfio_edu(&iommufd, edu_bdf)?;
    map_unmap_for(&iommufd, edu.ioas, secs)
}

/// The same pairs on an IOAS of its own that no device is attached to: no vIOMMU request.
fn ioas_floor(secs: f64) -> Result<Sample, String> {
    let iommufd = open_rw("/dev/iommu")?;
    let mut alloc = IommuIoasAlloc::sized();
    ioctl(iommufd.as_fd(), &mut alloc).map_err(|e| format!("IOAS_ALLOC: {e}"))?;
    map_unmap_for(&iommufd, alloc.out_ioas_id, secs)
}

fn map_unmap_for(iommufd: &File, ioas: u32, secs: f64) -> Result<Sample, String> {
    let page = Page::new()?;
    let iova = 0x10_0000;
    let mut lat_ns = Vec::new();
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let t1 = Instant::now();
        map(iommufd, ioas, &page, iova, true)?;
        unmap(iommufd, ioas, iova)?;
        lat_ns.push(t1.elapsed().as_nanos() as u64);
    }
    Ok(Sample {
        lat_ns,
        bytes: 0,
        secs: t.elapsed().as_secs_f64(),
    })
}

fn report(config: &str, mode: &str, workload: &str, r: Result<Sample, String>) {
    match r {
        Ok(mut s) => s.line(config, mode, workload),
        Err(e) => println!("BENCH-ERROR config={config} mode={mode} workload={workload}: {e}"),
    }
}

/// Runs every workload; `secs` is each one's duration.
pub fn run(config: &str, secs: f64) {
    let nvme_bdf = nvme::nvme_bdfs().ok().and_then(|b| b.into_iter().next());
    let nic_bdf = nic::nic_bdfs().ok().and_then(|b| b.into_iter().next());
    let has_iommu = nvme_bdf.as_ref().is_some_and(|b| {
        std::path::Path::new(&format!("/sys/bus/pci/devices/{b}/iommu_group")).exists()
    });
    let modes: &[&str] = if has_iommu {
        &["strict", "lazy"]
    } else {
        &["none"]
    };
    let mut ifname = nic_bdf.as_deref().map(nic::bring_up);
    for &mode in modes {
        if mode == "lazy" {
            for (bdf, driver) in [(&nvme_bdf, "nvme"), (&nic_bdf, "igb")] {
                if let Some(b) = bdf {
                    match nvme::switch_to_lazy(b, driver) {
                        Ok(s) => println!("E2E-L2: bench: {b} ({driver}): {s}"),
                        Err(e) => {
                            println!("BENCH-ERROR config={config} mode=lazy: switch {b}: {e}")
                        }
                    }
                }
            }
            ifname = nic_bdf.as_deref().map(nic::bring_up);
        }
        match nvme::wait_namespace(Duration::from_secs(120)) {
            Ok(node) => {
                report(
                    config,
                    mode,
                    "nvme-randread-4k-qd1",
                    reads(&node, 1, BLOCK, true, secs),
                );
                report(
                    config,
                    mode,
                    "nvme-randread-4k-qd32",
                    reads(&node, 32, BLOCK, true, secs),
                );
                report(
                    config,
                    mode,
                    "nvme-seqread-128k",
                    reads(&node, 1, SEQ, false, secs),
                );
            }
            Err(e) => println!("BENCH-ERROR config={config} mode={mode} workload=nvme: {e}"),
        }
        match &ifname {
            Some(Ok(_)) => {
                let t = Instant::now();
                let r = nic::echo_stream(4 << 20, Duration::from_secs(60)).map(|_| Sample {
                    lat_ns: vec![t.elapsed().as_nanos() as u64],
                    bytes: 2 * (4 << 20),
                    secs: t.elapsed().as_secs_f64(),
                });
                report(config, mode, "nic-tcp-echo-4m", r);
                if let (Some(Ok(name)), "strict" | "none") = (&ifname, mode) {
                    // The rig's limit (nic.rs): with scatter-gather on, L0's igb model drops TX
                    // buffers that span non-contiguous pages. Probed under every configuration.
                    let r = nic::set_offload(name, nic::ETHTOOL_SSG, true)
                        .and_then(|()| nic::echo_stream(1 << 20, Duration::from_secs(20)));
                    println!(
                        "BENCH-PROBE config={config} mode={mode} nic-sg-on-1m: {}",
                        match &r {
                            Ok((s, _)) => format!("ok: {s}"),
                            Err(e) => format!("failed: {e}"),
                        }
                    );
                    let _ = nic::set_offload(name, nic::ETHTOOL_SSG, false);
                }
            }
            Some(Err(e)) => println!("BENCH-ERROR config={config} mode={mode} workload=nic: {e}"),
            None => println!("BENCH-ERROR config={config} mode={mode} workload=nic: no NIC"),
        }
    }
    report(config, "user", "ioas-map-unmap-4k-floor", ioas_floor(secs));
    if has_iommu {
        match mmio::edu_bdfs() {
            Ok(b) if !b.is_empty() => {
                report(config, "user", "ioas-map-unmap-4k", ioas_pairs(&b[0], secs))
            }
            other => println!("BENCH-ERROR config={config} workload=ioas: no edu: {other:?}"),
        }
    }
}
