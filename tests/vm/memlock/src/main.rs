//! memlock: RLIMIT_MEMLOCK exhaustion is reported clearly and recovers (issue 7), inside the
//! test VM (tests/vm/run.sh).
//!
//! The program drops CAP_IPC_LOCK from its effective, permitted and inheritable sets (with it
//! iommufd charges nothing: `iopt_alloc_pages` picks `IOPT_PAGES_ACCOUNT_NONE` when
//! `capable(CAP_IPC_LOCK)`) before any thread exists, so every daemon thread runs without it, and
//! keeps RLIMIT_MEMLOCK's hard limit unlimited while moving the soft limit (raising a soft limit
//! up to the hard one needs no capability). It then starts the real daemon in this process
//! (`server::serve` on a unix socket, inline mode) with the iommufd backend over both edu VFIO
//! cdevs and, once per map strategy (COPY, MAP_FILE, MAP):
//!
//! 1. soft limit 16 MiB, `TestVm` (64 MiB guest RAM) connects: the memory table cannot be pinned
//!    (the staging / identity IOAS pins all guest RAM at `set_ram` whatever the strategy), the
//!    VMM's SET_MEM_TABLE is refused, the daemon logs the limit and what is needed, keeps serving,
//!    and nothing stays pinned (`pinned_bytes()`, `VmPin` of /proc/self/status);
//! 2. soft limit 72 MiB (guest RAM + 8 MiB): the same daemon accepts the next connection;
//! 3. a 16 MiB MAP: with MAP / MAP_FILE it needs 16 MiB more than the limit leaves, so the guest
//!    gets S_NOMEM, the daemon logs the limit and what is needed, nothing more stays pinned; with
//!    COPY it is copied from staging and charges nothing;
//! 4. soft limit 256 MiB: the same connection maps it (MAP / MAP_FILE) and an edu DMA round trip
//!    through the mapping lands at the right GPA; the disconnect leaves nothing pinned.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs::{self};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapStrategy};
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::ids::{DomainId, EndpointId};
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{MAP_F_READ, MAP_F_WRITE, Request, Status};
use vhost_user_iommu::server::{Stopper, serve};
use vhost_user_iommu::vhost::{DEFAULT_POLL, DeviceSettings, IommuDevice};

#[path = "../../guest-kit/edu.rs"]
mod edu;
use edu::*;

const MIB: u64 = 1 << 20;
/// The TestVm's guest RAM (its default), at GPA 0.
const RAM: u64 = 64 * MIB;
/// Soft RLIMIT_MEMLOCK below what guest RAM needs.
const LOW: u64 = 16 * MIB;
/// Guest RAM fits, a 16 MiB direct MAP on top does not.
const MID: u64 = RAM + 8 * MIB;
/// Everything fits.
const HIGH: u64 = 256 * MIB;
/// The big mapping: 16 MiB of guest RAM at GPA 16 MiB, at an IOVA above guest RAM (an identity
/// leak cannot land there) and below edu's 28-bit DMA mask.
const BIG: u64 = 16 * MIB;
const GPA_BIG: u64 = 16 * MIB;
const IOVA_BIG: u64 = 0x0900_0000;
const SENTINEL: u8 = 0xee;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

/// `CAP_IPC_LOCK` (include/uapi/linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes CAP_IPC_LOCK from this thread's effective, permitted and inheritable sets (threads
/// created afterwards inherit that). Returns the effective set (low word) after.
fn drop_ipc_lock() -> Result<u32> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two data structs, both ours and large enough.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    let bit = !(1u32 << CAP_IPC_LOCK);
    data[0].effective &= bit;
    data[0].permitted &= bit;
    data[0].inheritable &= bit;
    // SAFETY: capset reads the header and the two data structs we pass.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    let eff = status_field("CapEff:")?;
    let eff = u64::from_str_radix(eff.trim(), 16).map_err(|e| format!("CapEff {eff:?}: {e}"))?;
    if eff & (1 << CAP_IPC_LOCK) != 0 {
        return Err(format!("CapEff {eff:#x} still has CAP_IPC_LOCK"));
    }
    Ok(eff as u32)
}

fn status_field(name: &str) -> Result<String> {
    let s =
        fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("no {name} line in /proc/self/status"))
}

/// `VmPin` of /proc/self/status in bytes: iommufd adds every page it pins to the pinning mm's
/// `pinned_vm` whatever the accounting mode, so this is the kernel's own count.
fn vm_pin() -> Result<u64> {
    let v = status_field("VmPin:")?;
    v.trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .map(|k| k * 1024)
        .map_err(|e| format!("VmPin {v:?}: {e}"))
}

/// Soft RLIMIT_MEMLOCK = `soft`, hard unlimited (the first call raises the hard limit, which
/// needs CAP_SYS_RESOURCE; later ones leave it and need nothing).
fn set_memlock(soft: u64) -> Result<()> {
    let rl = libc::rlimit {
        rlim_cur: soft,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        return Err(format!(
            "setrlimit(RLIMIT_MEMLOCK, {soft}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mib(b: u64) -> String {
    if b.is_multiple_of(MIB) {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} bytes")
    }
}

/// Every log record of the daemon (level info and up), kept for the checks and echoed to stderr.
struct Recorder {
    lines: Mutex<Vec<String>>,
}

static RECORDER: Recorder = Recorder {
    lines: Mutex::new(Vec::new()),
};

impl log::Log for Recorder {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!("{} {}: {}", r.level(), r.target(), r.args());
        eprintln!("daemon: {line}");
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    fn flush(&self) {}
}

fn log_mark() -> usize {
    RECORDER
        .lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
}

/// The first log line after `mark` containing `needle` (waiting up to `timeout`).
fn wait_log(mark: usize, needle: &str, timeout: Duration) -> Result<String> {
    let end = Instant::now() + timeout;
    loop {
        {
            let lines = RECORDER.lines.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = lines.iter().skip(mark).find(|l| l.contains(needle)) {
                return Ok(l.clone());
            }
            if Instant::now() > end {
                return Err(format!(
                    "no daemon log line containing {needle:?} within {timeout:?}; since then: {:?}",
                    &lines[mark.min(lines.len())..]
                ));
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon's error text must name the limit, its current value and what is needed.
fn expect_hint(line: &str, limit: u64, needed: u64) -> Result<()> {
    for want in [
        "RLIMIT_MEMLOCK".to_string(),
        format!("now {limit} bytes"),
        format!("must be at least {needed} bytes"),
    ] {
        if !line.contains(&want) {
            return Err(format!("{want:?} missing from {line:?}"));
        }
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

struct Daemon {
    backend: Arc<IommufdBackend>,
    socket: PathBuf,
    stopper: Arc<Stopper>,
    /// Devices created by the serve loop: one per connection, made before it is accepted, so a
    /// connection is completely torn down once this has moved past it.
    devices: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(backend: Arc<IommufdBackend>) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("memlock-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("viommu.sock");
        let settings = DeviceSettings {
            endpoints: vec![EndpointId(1), EndpointId(2)],
            boot_bypass: false,
            rules: rules_from(&backend.constraints()),
            mode: Mode::Inline,
            poll: DEFAULT_POLL,
        };
        let listener = Listener::new(&socket, true).map_err(|e| format!("listen: {e}"))?;
        let stopper = Arc::new(Stopper::default());
        let devices = Arc::new(AtomicUsize::new(0));
        let (s, n, b) = (stopper.clone(), devices.clone(), backend.clone());
        let thread = thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                let hook = Box::new(move |_: &IommuDevice| {
                    n.fetch_add(1, Ordering::SeqCst);
                });
                let backend: Arc<dyn DmaBackend> = b;
                if let Err(e) = serve(
                    listener,
                    settings,
                    backend,
                    Arc::new(Metrics::default()),
                    s,
                    None,
                    Some(hook),
                ) {
                    eprintln!("daemon: serve ended: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Daemon {
            backend,
            socket,
            stopper,
            devices,
            thread: Some(thread),
        })
    }

    fn connect(&self) -> Result<TestVm> {
        let opts = VmOptions {
            ram_size: RAM,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            ..VmOptions::default()
        };
        TestVm::connect(&self.socket, opts).map_err(|e| format!("TestVm::connect: {e}"))
    }

    fn alive(&self) -> Result<()> {
        match &self.thread {
            Some(t) if !t.is_finished() => Ok(()),
            _ => Err("the daemon's serve loop has ended".into()),
        }
    }

    fn devices(&self) -> usize {
        self.devices.load(Ordering::SeqCst)
    }

    /// Waits until the connection that was current when `before` was read is torn down.
    fn wait_torn_down(&self, before: usize) -> Result<()> {
        wait_for(
            "the daemon to finish the connection",
            Duration::from_secs(10),
            || self.devices() > before,
        )?;
        self.alive()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

fn ok(s: Status, what: &str) -> Result<()> {
    if s == Status::Ok {
        Ok(())
    } else {
        Err(format!("{what}: status {}", s.name()))
    }
}

fn attach(vm: &mut TestVm, d: u32, ep: u32) -> Result<()> {
    let s = vm
        .request(&Request::Attach {
            domain: DomainId(d),
            endpoint: EndpointId(ep),
            flags: 0,
            reserved: [0; 4],
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("ATTACH endpoint {ep} to domain {d}"))
}

fn map_status(vm: &mut TestVm, d: u32, iova: u64, gpa: u64, len: u64) -> Result<Status> {
    vm.request(&Request::Map {
        domain: DomainId(d),
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: RW,
    })
    .map_err(|e| e.to_string())
}

/// What the backend and the kernel say is pinned must both be `want` bytes.
fn expect_pinned(b: &IommufdBackend, want: u64, when: &str) -> Result<String> {
    let (backend, kernel) = (b.pinned_bytes(), vm_pin()?);
    if backend != want || kernel != want {
        return Err(format!(
            "{when}: pinned_bytes {} and VmPin {}, expected {} for both",
            mib(backend),
            mib(kernel),
            mib(want)
        ));
    }
    Ok(format!("pinned_bytes = VmPin = {}", mib(want)))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add((i >> 8) as u8)
                .wrapping_add(seed.wrapping_mul(77))
                ^ 0x5a
        })
        .collect()
}

/// IOVA -> edu -> IOVA inside the big mapping: the page read at one GPA must land at another.
fn round_trip(vm: &TestVm, edu: &Edu, seed: u8) -> Result<()> {
    let (src, dst) = (PAGE, 2 * PAGE);
    let p = pattern(seed);
    let ram = vm.ram();
    ram.write(GPA_BIG + src, &p).map_err(|e| e.to_string())?;
    ram.write(GPA_BIG + dst, &[SENTINEL; PAGE as usize])
        .map_err(|e| e.to_string())?;
    edu.dma(IOVA_BIG + src, EDU_BUFFER, false)?;
    edu.dma(EDU_BUFFER, IOVA_BIG + dst, true)?;
    let mut got = vec![0u8; PAGE as usize];
    ram.read(GPA_BIG + dst, &mut got)
        .map_err(|e| e.to_string())?;
    let wrong = got.iter().zip(&p).filter(|(a, b)| a != b).count();
    if wrong != 0 {
        return Err(format!(
            "{}: {wrong} of {PAGE} bytes at GPA {:#x} differ after IOVA {:#x} -> edu -> IOVA {:#x}",
            edu.name,
            GPA_BIG + dst,
            IOVA_BIG + src,
            IOVA_BIG + dst
        ));
    }
    Ok(())
}

/// One map strategy through refusal, recovery, S_NOMEM (or a free COPY), recovery and DMA.
fn strategy_round(rep: &mut Report, d: &Daemon, edu: &Edu, s: MapStrategy, seed: u8) -> Result<()> {
    let b = &*d.backend;
    let n = s.name();
    b.set_map_strategy(Some(s));
    set_memlock(LOW)?;

    // 1. The memory table cannot be pinned.
    let mark = log_mark();
    let before = d.devices();
    let refused = rep.check(
        &format!(
            "{n}: under RLIMIT_MEMLOCK {} the {} memory table is refused, the daemon names the limit and the need",
            mib(LOW),
            mib(RAM)
        ),
        (|| {
            let vmm = match d.connect() {
                Ok(vm) => {
                    vm.disconnect();
                    return Err(format!(
                        "the connection was accepted under RLIMIT_MEMLOCK {} (pinned_bytes {}, VmPin {})",
                        mib(LOW),
                        mib(b.pinned_bytes()),
                        mib(vm_pin().unwrap_or(u64::MAX))
                    ));
                }
                Err(e) => e,
            };
            if !vmm.contains("SET_MEM_TABLE") {
                return Err(format!("the VMM failed elsewhere: {vmm}"));
            }
            let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
            expect_hint(&line, LOW, RAM)?;
            d.wait_torn_down(before)?;
            Ok(format!("VMM: {vmm}; daemon: {line}"))
        })(),
    );
    rep.check(
        &format!(
            "{n}: nothing stays pinned after the refused memory table, the daemon keeps serving"
        ),
        (|| {
            if refused {
                d.wait_torn_down(before)?;
            }
            if !b.domain_ids().is_empty() {
                return Err(format!("paging IOASes left: {:?}", b.domain_ids()));
            }
            expect_pinned(b, 0, "after the refusal")
        })(),
    );

    // 2. Recovery: a higher limit, the same daemon, a new connection.
    set_memlock(MID)?;
    let mut vm = match d.connect() {
        Ok(vm) => vm,
        Err(e) => {
            rep.check(
                &format!(
                    "{n}: after raising RLIMIT_MEMLOCK to {} the same daemon accepts the connection",
                    mib(MID)
                ),
                Err(e),
            );
            return Ok(());
        }
    };
    let accepted = rep.check(
        &format!(
            "{n}: after raising RLIMIT_MEMLOCK to {} the same daemon accepts the connection",
            mib(MID)
        ),
        (|| {
            d.alive()?;
            attach(&mut vm, 1, 1)?;
            expect_pinned(b, RAM, "connected")
        })(),
    );

    // 3. A MAP beyond what the limit leaves.
    if accepted {
        let copies = b.copy_count();
        let mark = log_mark();
        let mapped = if s == MapStrategy::Copy {
            rep.check(
                &format!(
                    "{n}: a {} MAP beyond what RLIMIT_MEMLOCK {} leaves is copied from staging and charges nothing",
                    mib(BIG),
                    mib(MID)
                ),
                (|| {
                    ok(
                        map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG)?,
                        "MAP 16 MiB",
                    )?;
                    if b.copy_count() != copies + 1 {
                        return Err(format!(
                            "{} COPYs, expected {}",
                            b.copy_count(),
                            copies + 1
                        ));
                    }
                    expect_pinned(b, RAM, "after the MAP")
                })(),
            )
        } else {
            rep.check(
                &format!(
                    "{n}: a {} MAP beyond RLIMIT_MEMLOCK {} gets S_NOMEM, the daemon names the limit and the need, nothing more is pinned",
                    mib(BIG),
                    mib(MID)
                ),
                (|| {
                    let st = map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG)?;
                    if st != Status::NoMem {
                        return Err(format!("MAP 16 MiB: status {}, expected NOMEM", st.name()));
                    }
                    let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
                    expect_hint(&line, MID, RAM + BIG)?;
                    d.alive()?;
                    let pin = expect_pinned(b, RAM, "after the refused MAP")?;
                    Ok(format!("{pin}; daemon: {line}"))
                })(),
            );
            false
        };

        // 4. Recovery: raise the limit; the same connection maps, DMA goes through.
        set_memlock(HIGH)?;
        rep.check(
            &format!(
                "{n}: after raising RLIMIT_MEMLOCK to {} the same connection maps {} and edu DMA goes through",
                mib(HIGH),
                mib(BIG)
            ),
            (|| {
                let want = if s == MapStrategy::Copy {
                    if !mapped {
                        return Err("the COPY MAP above failed".into());
                    }
                    RAM
                } else {
                    // The refused MAP left nothing mapped: the same range maps now.
                    ok(
                        map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG)?,
                        "MAP 16 MiB again",
                    )?;
                    RAM + BIG
                };
                let pin = expect_pinned(b, want, "after the MAP")?;
                round_trip(&vm, edu, seed)?;
                Ok(format!("{pin}; {} round trip through IOVA {IOVA_BIG:#x}", edu.name))
            })(),
        );
    }

    let before = d.devices();
    vm.disconnect();
    rep.check(
        &format!("{n}: the disconnect leaves nothing pinned"),
        (|| {
            d.wait_torn_down(before)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("paging IOASes left: {:?}", b.domain_ids()));
            }
            expect_pinned(b, 0, "after the disconnect")
        })(),
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut rep = Report {
        passed: 0,
        failed: 0,
    };
    // Before any thread exists: capabilities are per thread and inherited at clone.
    let caps = (|| {
        set_memlock(LOW)?;
        let eff = drop_ipc_lock()?;
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        if rl.rlim_cur != LOW || rl.rlim_max != libc::RLIM_INFINITY {
            return Err(format!("RLIMIT_MEMLOCK is {rl:?}"));
        }
        Ok(format!(
            "CapEff {eff:#x}; soft {}, hard unlimited; VmPin {}",
            mib(LOW),
            mib(vm_pin()?)
        ))
    })();
    if !rep.check(
        "CAP_IPC_LOCK dropped, RLIMIT_MEMLOCK soft limit below guest RAM",
        caps,
    ) {
        return ExitCode::FAILURE;
    }
    log::set_logger(&RECORDER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);

    let t0 = Instant::now();
    let setup = (|| {
        let edus = edu_cdevs()?;
        if edus.len() < 2 {
            return Err(format!(
                "need two edu devices bound to vfio-pci, found {edus:?}"
            ));
        }
        let eps: Vec<(EndpointId, PathBuf)> = edus
            .iter()
            .take(2)
            .enumerate()
            .map(|(i, (_, p))| (EndpointId(i as u32 + 1), p.clone()))
            .collect();
        let backend =
            Arc::new(IommufdBackend::open(&eps, false).map_err(|e| format!("open: {e}"))?);
        let edu = Edu::open(&backend, EndpointId(1), format!("edu {}", edus[0].0))?;
        let note = format!(
            "endpoint 1 = {}, endpoint 2 = {}; staging HWPT {:?}; MAP_FILE {}; automatic strategy {}",
            edus[0].0,
            edus[1].0,
            backend.staging_hwpt(),
            backend.map_file_supported(),
            backend.auto_map_strategy().name()
        );
        if backend.staging_hwpt().is_none() {
            return Err(format!(
                "{note}: no staging HWPT, so set_ram pins nothing and these checks do not apply"
            ));
        }
        let d = Daemon::start(backend)?;
        Ok((d, edu, note))
    })();
    let (d, edu) = match setup {
        Ok((d, edu, note)) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs, without CAP_IPC_LOCK",
                Ok(note),
            );
            (d, edu)
        }
        Err(e) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs, without CAP_IPC_LOCK",
                Err(e),
            );
            return ExitCode::FAILURE;
        }
    };
    let mut strategies = Vec::new();
    for s in [MapStrategy::Copy, MapStrategy::MapFile, MapStrategy::Map] {
        if s == MapStrategy::MapFile && !d.backend.map_file_supported() {
            println!(
                "INFO: no IOMMU_IOAS_MAP_FILE in this kernel: {} skipped",
                s.name()
            );
            continue;
        }
        if s == MapStrategy::Copy && d.backend.copy_works() == Some(false) {
            println!(
                "INFO: sub-range IOMMU_IOAS_COPY does not work here: {} skipped",
                s.name()
            );
            continue;
        }
        strategies.push(s);
    }
    for (i, s) in strategies.into_iter().enumerate() {
        if let Err(e) = strategy_round(&mut rep, &d, &edu, s, i as u8 + 1) {
            rep.check(&format!("{}: round", s.name()), Err(e));
        }
    }
    drop(edu);
    drop(d);
    println!(
        "memlock: {} passed, {} failed in {:.1} s",
        rep.passed,
        rep.failed,
        t0.elapsed().as_secs_f64()
    );
    if rep.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
