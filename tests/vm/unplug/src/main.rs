//! unplug: host hot-unplug and replug of an assigned device while the daemon runs (issue 10),
//! inside the test VM (tests/vm/run.sh).
//!
//! The program starts the real daemon in this process (`server::serve` on a unix socket, inline
//! mode) with the iommufd backend over both edu VFIO cdevs and its hot-plug watcher
//! (`hotplug::watch`), connects `TestVm` as the VMM and:
//!
//! 1. attaches and maps endpoint 1 (domain 1) and endpoint 2 (domain 2); an edu DMA round trip
//!    through each mapping lands;
//! 2. unbinds endpoint 1's edu from vfio-pci (`echo BDF > /sys/bus/pci/drivers/vfio-pci/unbind`,
//!    in a thread): the kernel signals the device's request IRQ, the daemon detaches the endpoint
//!    and closes the device, and the unbind completes within a few seconds;
//! 3. endpoint 2 still works (DMA round trip);
//! 4. ATTACH of endpoint 1 fails with S_DEVERR, and the daemon logs why;
//! 5. binds the edu to vfio-pci again (`drivers_probe`, driver_override is still vfio-pci): the
//!    daemon reopens it within a few seconds; a fresh ATTACH + MAP of endpoint 1 works and edu
//!    DMA through it lands.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs::{self};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::iommufd::IommufdBackend;
use vhost_user_iommu::backend::{Attachment, DmaBackend};
use vhost_user_iommu::control::CurrentDevice;
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
/// Each endpoint's mapping: 64 KiB of guest RAM, at an IOVA above guest RAM (an identity leak
/// cannot land there) and below edu's 28-bit DMA mask.
const LEN: u64 = 64 * 1024;
const SENTINEL: u8 = 0xee;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;
/// How long the host's unbind may take.
const UNBIND_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The daemon of this test: serve loop in a thread, hot-plug watcher, backend visible.
struct Daemon {
    backend: Arc<IommufdBackend>,
    socket: PathBuf,
    stopper: Arc<Stopper>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(backend: Arc<IommufdBackend>) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("unplug-{}", std::process::id()));
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
        let current: CurrentDevice = Arc::default();
        vhost_user_iommu::hotplug::watch(&backend, current.clone(), Default::default())
            .map_err(|e| format!("hot-plug watcher: {e}"))?;
        let (s, b) = (stopper.clone(), backend.clone());
        let thread = thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                let hook = Box::new(move |d: &IommuDevice| {
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
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

fn attach_status(vm: &mut TestVm, d: u32, ep: u32) -> Result<Status> {
    vm.request(&Request::Attach {
        domain: DomainId(d),
        endpoint: EndpointId(ep),
        flags: 0,
        reserved: [0; 4],
    })
    .map_err(|e| e.to_string())
}

fn ok(s: Status, what: &str) -> Result<()> {
    if s == Status::Ok {
        Ok(())
    } else {
        Err(format!("{what}: status {}", s.name()))
    }
}

/// Endpoint `ep` into domain `d`, `LEN` bytes at `iova` → `gpa`.
fn attach_map(vm: &mut TestVm, d: u32, ep: u32, iova: u64, gpa: u64) -> Result<()> {
    ok(
        attach_status(vm, d, ep)?,
        &format!("ATTACH endpoint {ep} to domain {d}"),
    )?;
    let s = vm
        .request(&Request::Map {
            domain: DomainId(d),
            virt_start: iova,
            virt_end: iova + LEN - 1,
            phys_start: gpa,
            flags: RW,
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("MAP domain {d} {iova:#x} -> GPA {gpa:#x}"))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Guest page at `gpa + PAGE` → edu → guest page at `gpa + 2 * PAGE`, through IOVA `iova`.
fn round_trip(vm: &TestVm, edu: &Edu, iova: u64, gpa: u64, seed: u8) -> Result<()> {
    let (src, dst) = (PAGE, 2 * PAGE);
    let p = pattern(seed);
    let ram = vm.ram();
    ram.write(gpa + src, &p).map_err(|e| e.to_string())?;
    ram.write(gpa + dst, &[SENTINEL; PAGE as usize])
        .map_err(|e| e.to_string())?;
    edu.dma(iova + src, EDU_BUFFER, false)?;
    edu.dma(EDU_BUFFER, iova + dst, true)?;
    let mut got = vec![0u8; PAGE as usize];
    ram.read(gpa + dst, &mut got).map_err(|e| e.to_string())?;
    let wrong = got.iter().zip(&p).filter(|(a, b)| a != b).count();
    if wrong != 0 {
        return Err(format!(
            "{}: {wrong} of {PAGE} bytes at GPA {:#x} differ after IOVA {:#x} -> edu -> IOVA {:#x}",
            edu.name,
            gpa + dst,
            iova + src,
            iova + dst
        ));
    }
    Ok(())
}

/// Writes `value` to a sysfs file in a thread; waits at most `timeout` for the write to return.
fn sysfs_write(path: &'static str, value: String, timeout: Duration) -> Result<Duration> {
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    thread::Builder::new()
        .name("sysfs-write".into())
        .spawn(move || {
            let _ = tx.send(fs::write(path, &value).map_err(|e| format!("{path}: {e}")));
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map(|()| t0.elapsed()),
        Err(_) => Err(format!("writing {path} did not return within {timeout:?}")),
    }
}

const IOVA1: u64 = 0x0900_0000;
const GPA1: u64 = 16 * MIB;
const IOVA2: u64 = 0x0a00_0000;
const GPA2: u64 = 20 * MIB;

fn main() -> ExitCode {
    let mut rep = Report {
        passed: 0,
        failed: 0,
    };
    log::set_logger(&RECORDER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);
    let t0 = Instant::now();
    let r = run(&mut rep);
    if let Err(e) = r {
        rep.check("unplug: setup", Err(e));
    }
    println!(
        "unplug: {} passed, {} failed in {:.1} s",
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

fn run(rep: &mut Report) -> Result<()> {
    let edus = edu_cdevs()?;
    if edus.len() < 2 {
        return Err(format!(
            "need two edu devices bound to vfio-pci, found {edus:?}"
        ));
    }
    let bdf1 = edus[0].0.clone();
    let eps: Vec<(EndpointId, PathBuf)> = edus
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, (_, p))| (EndpointId(i as u32 + 1), p.clone()))
        .collect();
    let backend = Arc::new(IommufdBackend::open(&eps, false).map_err(|e| format!("open: {e}"))?);
    let d = Daemon::start(backend)?;
    let b = d.backend.clone();
    let mut vm = d.connect()?;
    let mut edu1 = Some(Edu::open(&b, EndpointId(1), format!("edu {bdf1}"))?);
    let edu2 = Edu::open(&b, EndpointId(2), format!("edu {}", edus[1].0))?;

    let both = rep.check(
        "endpoints 1 and 2 attached and mapped, edu DMA through each lands",
        (|| {
            attach_map(&mut vm, 1, 1, IOVA1, GPA1)?;
            attach_map(&mut vm, 2, 2, IOVA2, GPA2)?;
            round_trip(&vm, edu1.as_ref().expect("open"), IOVA1, GPA1, 1)?;
            round_trip(&vm, &edu2, IOVA2, GPA2, 2)?;
            Ok(format!("endpoint 1 = {bdf1}, endpoint 2 = {}", edus[1].0))
        })(),
    );
    if !both {
        return Ok(());
    }

    // The test plays the VMM too: it lets go of its own BAR mapping (a VMM would on the same
    // request), so only the daemon's fds hold the device.
    drop(edu1.take());
    let mark = log_mark();
    let unbound = rep.check(
        "unbinding endpoint 1's edu from vfio-pci completes while the daemon runs",
        (|| {
            let took = sysfs_write(
                "/sys/bus/pci/drivers/vfio-pci/unbind",
                bdf1.clone(),
                UNBIND_TIMEOUT,
            )?;
            let line = wait_log(mark, "closed (unplugged)", Duration::from_secs(2))?;
            if !b.is_unplugged(EndpointId(1)) {
                return Err("the backend does not report endpoint 1 unplugged".into());
            }
            if b.attachment(EndpointId(1)) != Some(Attachment::Blocked) {
                return Err(format!("endpoint 1: {:?}", b.attachment(EndpointId(1))));
            }
            Ok(format!("{:.2} s; daemon: {line}", took.as_secs_f64()))
        })(),
    );
    if !unbound {
        return Ok(());
    }
    rep.check(
        "endpoint 2 still works after endpoint 1 is unplugged",
        (|| {
            round_trip(&vm, &edu2, IOVA2, GPA2, 3)?;
            ok(attach_status(&mut vm, 2, 2)?, "ATTACH endpoint 2 again")?;
            Ok(String::new())
        })(),
    );
    let mark = log_mark();
    rep.check(
        "ATTACH of the unplugged endpoint 1 fails with S_DEVERR and the daemon says why",
        (|| {
            for i in 0..3 {
                let s = attach_status(&mut vm, 1, 1)?;
                if s != Status::DevErr {
                    return Err(format!("ATTACH {i}: status {}, expected DEVERR", s.name()));
                }
            }
            let line = wait_log(mark, "ATTACH refused (S_DEVERR)", Duration::from_secs(2))?;
            let n = RECORDER
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .skip(mark)
                .filter(|l| l.contains("ATTACH refused"))
                .count();
            if n != 1 {
                return Err(format!(
                    "{n} log lines for 3 refused ATTACHes (rate limit: 1)"
                ));
            }
            Ok(format!("daemon: {line}"))
        })(),
    );

    let mark = log_mark();
    let back = rep.check(
        "binding the edu to vfio-pci again: the daemon reopens it",
        (|| {
            sysfs_write("/sys/bus/pci/drivers_probe", bdf1.clone(), UNBIND_TIMEOUT)?;
            wait_for(
                "the daemon to replug endpoint 1",
                Duration::from_secs(10),
                || !b.is_unplugged(EndpointId(1)),
            )?;
            let line = wait_log(mark, "replugged", Duration::from_secs(2))?;
            if b.attachment(EndpointId(1)) != Some(Attachment::Blocked) {
                return Err(format!("endpoint 1: {:?}", b.attachment(EndpointId(1))));
            }
            Ok(format!("daemon: {line}"))
        })(),
    );
    if back {
        rep.check(
            "endpoint 1 is served again: fresh ATTACH + MAP, edu DMA lands",
            (|| {
                attach_map(&mut vm, 1, 1, IOVA1, GPA1)?;
                let edu = Edu::open(&b, EndpointId(1), format!("edu {bdf1}"))?;
                round_trip(&vm, &edu, IOVA1, GPA1, 4)?;
                round_trip(&vm, &edu2, IOVA2, GPA2, 5)?;
                Ok(String::new())
            })(),
        );
    }
    vm.disconnect();
    drop(edu2);
    drop(d);
    Ok(())
}
