//! The real daemon in the guest program's own process, for the VM tier's programs that drive it
//! with the crate's `TestVm` (daemon-dma, memlock, unplug): its serve loop on a unix socket over
//! an iommufd backend, a recorder of its log, and the virtio-iommu requests and edu round trips
//! the checks are made of.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::iommufd::IommufdBackend;
use vhost_user_iommu::control::CurrentDevice;
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::ids::{DomainId, EndpointId};
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{MAP_F_READ, MAP_F_WRITE, Request, Status};
use vhost_user_iommu::server::{Stopper, serve};
use vhost_user_iommu::vhost::{DeviceSettings, IommuDevice};

use crate::edu::{Edu, PAGE, Result, rules_from};

pub const RW: u32 = MAP_F_READ | MAP_F_WRITE;
pub use crate::layout::SENTINEL;

/// The daemon of a test: serve loop in a thread, backend visible.
pub struct Daemon {
    pub backend: Arc<IommufdBackend>,
    pub socket: PathBuf,
    stopper: Arc<Stopper>,
    /// Devices created by the serve loop: one per connection, made before it is accepted, so a
    /// connection is completely torn down once this has moved past it.
    devices: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Daemon {
    /// Serves endpoints 1 and 2 of `backend` on `$TMPDIR/<name>-<pid>/viommu.sock`; with
    /// `hotplug` the daemon's hot-plug watcher (`hotplug::watch`) runs too.
    pub fn start(
        name: &str,
        backend: Arc<IommufdBackend>,
        mode: Mode,
        hotplug: bool,
    ) -> Result<Daemon> {
        let settings = Daemon::settings(&backend, mode);
        Daemon::serving(name, backend, settings, hotplug, None)
    }

    /// The device settings [`start`](Self::start) serves with: endpoints 1 and 2 under the
    /// backend's rules, in `mode`, the rest at their defaults.
    pub fn settings(backend: &IommufdBackend, mode: Mode) -> DeviceSettings {
        DeviceSettings::new(
            vec![EndpointId(1), EndpointId(2)],
            rules_from(&backend.constraints()),
            mode,
        )
    }

    /// [`start`](Self::start) with the given device `settings`, the hot-plug watcher telling
    /// `keeper` (the crash-restart fd store) what the host takes away and gives back.
    pub fn serving(
        name: &str,
        backend: Arc<IommufdBackend>,
        settings: DeviceSettings,
        hotplug: bool,
        keeper: Option<Arc<vhost_user_iommu::recovery::Keeper>>,
    ) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("viommu.sock");
        let listener = Listener::new(&socket, true).map_err(|e| format!("listen: {e}"))?;
        let stopper = Arc::new(Stopper::new().map_err(|e| format!("eventfd: {e}"))?);
        let devices = Arc::new(AtomicUsize::new(0));
        let current: CurrentDevice = Arc::default();
        if hotplug {
            vhost_user_iommu::hotplug::watch(&backend, current.clone(), Default::default(), keeper)
                .map_err(|e| format!("hot-plug watcher: {e}"))?;
        }
        let (s, n, b) = (stopper.clone(), devices.clone(), backend.clone());
        let thread = thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                let hook = Box::new(move |d: &IommuDevice| {
                    n.fetch_add(1, Ordering::SeqCst);
                    if hotplug {
                        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
                    }
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

    /// A `TestVm` (its default 64 MiB of guest RAM at GPA 0) connected to the daemon.
    pub fn connect(&self) -> Result<TestVm> {
        let opts = VmOptions {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            ..VmOptions::default()
        };
        TestVm::connect(&self.socket, opts).map_err(|e| format!("TestVm::connect: {e}"))
    }

    pub fn alive(&self) -> Result<()> {
        match &self.thread {
            Some(t) if !t.is_finished() => Ok(()),
            _ => Err("the daemon's serve loop has ended".into()),
        }
    }

    /// Devices created so far: read it before a disconnect, for [`Daemon::wait_closed`].
    pub fn devices(&self) -> usize {
        self.devices.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until the connection that was current when `before` was read from
    /// [`Daemon::devices`] is torn down.
    pub fn wait_closed(&self, before: usize, timeout: Duration) -> Result<()> {
        wait_for("the daemon to finish the connection", timeout, || {
            self.devices() > before
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(dir) = self.socket.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

// ---- the daemon's log ----

/// Every log record of the daemon (level info and up), kept for the checks and echoed to stderr.
pub struct Recorder {
    lines: Mutex<Vec<String>>,
}

pub static RECORDER: Recorder = Recorder {
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

/// Makes [`RECORDER`] the process's logger (once, before the daemon starts).
pub fn record_log() {
    log::set_logger(&RECORDER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);
}

/// Where the log is now: what [`wait_log`] and [`log_count`] search from.
pub fn log_mark() -> usize {
    RECORDER
        .lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
}

/// The first log line after `mark` containing `needle` (waiting up to `timeout`).
pub fn wait_log(mark: usize, needle: &str, timeout: Duration) -> Result<String> {
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

/// How many log lines after `mark` contain `needle`.
pub fn log_count(mark: usize, needle: &str) -> usize {
    RECORDER
        .lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .skip(mark)
        .filter(|l| l.contains(needle))
        .count()
}

// ---- virtio-iommu requests through the TestVm ----

pub fn ok(s: Status, what: &str) -> Result<()> {
    if s == Status::Ok {
        Ok(())
    } else {
        Err(format!("{what}: status {}", s.name()))
    }
}

pub fn attach_status(vm: &mut TestVm, d: u32, ep: u32, flags: u32) -> Result<Status> {
    vm.request(&Request::attach_raw(d, ep, flags, [0; 4]))
        .map_err(|e| e.to_string())
}

pub fn attach(vm: &mut TestVm, d: u32, ep: u32, flags: u32) -> Result<()> {
    ok(
        attach_status(vm, d, ep, flags)?,
        &format!("ATTACH endpoint {ep} to domain {d}"),
    )
}

pub fn detach(vm: &mut TestVm, d: u32, ep: u32) -> Result<()> {
    let s = vm
        .request(&Request::Detach {
            domain: DomainId(d),
            endpoint: EndpointId(ep),
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("DETACH endpoint {ep} from domain {d}"))
}

pub fn map_status(
    vm: &mut TestVm,
    d: u32,
    iova: u64,
    gpa: u64,
    len: u64,
    flags: u32,
) -> Result<Status> {
    vm.request(&Request::map(d, iova, iova + len - 1, gpa, flags))
        .map_err(|e| e.to_string())
}

pub fn map(vm: &mut TestVm, d: u32, iova: u64, gpa: u64, len: u64, flags: u32) -> Result<()> {
    ok(
        map_status(vm, d, iova, gpa, len, flags)?,
        &format!("MAP {iova:#x} -> {gpa:#x} in domain {d}"),
    )
}

pub fn unmap(vm: &mut TestVm, d: u32, iova: u64, len: u64) -> Result<()> {
    let s = vm
        .request(&Request::unmap(d, iova, iova + len - 1))
        .map_err(|e| e.to_string())?;
    ok(s, &format!("UNMAP {iova:#x} in domain {d}"))
}

// ---- edu DMA through the daemon's translations ----

/// A page of bytes that differs for every seed.
pub fn pattern(seed: u8) -> Vec<u8> {
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

/// `p` at guest page `gpa + PAGE` → edu → guest page `gpa + 2 * PAGE` (filled with
/// [`SENTINEL`] first), through a mapping of `gpa` at `iova`: the bytes must arrive.
pub fn round_trip(vm: &TestVm, edu: &Edu, iova: u64, gpa: u64, p: &[u8]) -> Result<()> {
    let (src, dst) = (PAGE, 2 * PAGE);
    let ram = vm.ram();
    ram.write(gpa + src, p).map_err(|e| e.to_string())?;
    ram.write(gpa + dst, &[SENTINEL; PAGE as usize])
        .map_err(|e| e.to_string())?;
    edu.load(iova + src)?;
    edu.store(iova + dst)?;
    let mut got = vec![0u8; PAGE as usize];
    ram.read(gpa + dst, &mut got).map_err(|e| e.to_string())?;
    let wrong = got.iter().zip(p).filter(|(a, b)| a != b).count();
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
