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
//! The daemon keeps its kernel objects for a crash restart in a file descriptor store, as under
//! systemd (a `ServiceManager` in this process holds the duplicates): the store lets go of
//! endpoint 1's device before the daemon closes it (else the unbind would wait for ever), and
//! keeps the reopened device again after the replug.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs;
use std::process::ExitCode;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_iommu::backend::Attachment;
use vhost_user_iommu::backend::iommufd::IommufdBackend;
use vhost_user_iommu::deploy::fdstore::FdStore;
use vhost_user_iommu::driver::TestVm;
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::journal::Journal;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::Status;
use vhost_user_iommu::recovery::Keeper;
use vhost_user_iommu::testing::service_manager::ServiceManager;

use guest_kit::daemon::*;
use guest_kit::edu::*;

const MIB: u64 = 1 << 20;
/// Each endpoint's mapping: 64 KiB of guest RAM, at an IOVA above guest RAM (an identity leak
/// cannot land there) and below edu's 28-bit DMA mask.
const LEN: u64 = 64 * 1024;
/// How long the host's unbind may take.
const UNBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Endpoint `ep` into domain `d`, `LEN` bytes at `iova` → `gpa`.
fn attach_map(vm: &mut TestVm, d: u32, ep: u32, iova: u64, gpa: u64) -> Result<()> {
    attach(vm, d, ep, 0)?;
    map(vm, d, iova, gpa, LEN, RW)
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
    let mut rep = Report::default();
    record_log();
    let t0 = Instant::now();
    let r = run(&mut rep);
    if let Err(e) = r {
        rep.check("unplug: setup", Err(e));
    }
    rep.finish("unplug", t0)
}

/// The devices the fd store holds (`dev<endpoint>.<dev_id>` names).
fn stored_devices(sm: &ServiceManager) -> Result<Vec<String>> {
    sm.sync().map_err(|e| format!("fd store: {e}"))?;
    let mut v: Vec<String> = sm
        .names()
        .into_iter()
        .filter(|n| n.starts_with("dev"))
        .collect();
    v.sort();
    Ok(v)
}

/// A keeper of the kernel objects in a file descriptor store served by this process.
fn keeper(backend: &Arc<IommufdBackend>) -> Result<(ServiceManager, Arc<Keeper>)> {
    let dir = std::env::temp_dir().join(format!("unplug-store-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("notify");
    let _ = fs::remove_file(&path);
    let sm = ServiceManager::start(&path).map_err(|e| format!("notify socket: {e}"))?;
    let store = FdStore::connect(path.as_os_str()).map_err(|e| format!("fd store: {e}"))?;
    let journal = Journal::create().map_err(|e| e.to_string())?;
    let k = Keeper::start(store, journal).map_err(|e| format!("keeper: {e}"))?;
    k.keep_iommufd(backend.clone())?;
    Ok((sm, Arc::new(k)))
}

fn run(rep: &mut Report) -> Result<()> {
    let (backend, edus) = backend_over_two_edus()?;
    let bdf1 = edus[0].0.clone();
    let (sm, k) = keeper(&backend)?;
    let kept = stored_devices(&sm)?;
    rep.check(
        "the fd store keeps both devices for a crash restart",
        if kept.iter().any(|n| n.starts_with("dev1."))
            && kept.iter().any(|n| n.starts_with("dev2."))
        {
            Ok(format!("{kept:?}"))
        } else {
            Err(format!("the store holds {kept:?}"))
        },
    );
    let settings = Daemon::settings(&backend, Mode::Inline);
    let d = Daemon::serving("unplug", backend, settings, true, Some(k))?;
    let b = d.backend.clone();
    let mut vm = d.connect()?;
    let mut edu1 = Some(Edu::open(&b, EndpointId(1), format!("edu {bdf1}"))?);
    let edu2 = Edu::open(&b, EndpointId(2), format!("edu {}", edus[1].0))?;

    let both = rep.check(
        "endpoints 1 and 2 attached and mapped, edu DMA through each lands",
        (|| {
            attach_map(&mut vm, 1, 1, IOVA1, GPA1)?;
            attach_map(&mut vm, 2, 2, IOVA2, GPA2)?;
            round_trip(&vm, edu1.as_ref().expect("open"), IOVA1, GPA1, &pattern(1))?;
            round_trip(&vm, &edu2, IOVA2, GPA2, &pattern(2))?;
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
            let kept = stored_devices(&sm)?;
            if kept.iter().any(|n| n.starts_with("dev1.")) || !kept.iter().any(|n| n.starts_with("dev2.")) {
                return Err(format!("after the unplug the fd store holds {kept:?}"));
            }
            Ok(format!("{:.2} s (the fd store let go of the device first: it holds {kept:?}); daemon: {line}", took.as_secs_f64()))
        })(),
    );
    if !unbound {
        return Ok(());
    }
    rep.check(
        "endpoint 2 still works after endpoint 1 is unplugged",
        (|| {
            round_trip(&vm, &edu2, IOVA2, GPA2, &pattern(3))?;
            ok(attach_status(&mut vm, 2, 2, 0)?, "ATTACH endpoint 2 again")?;
            Ok(String::new())
        })(),
    );
    let mark = log_mark();
    rep.check(
        "ATTACH of the unplugged endpoint 1 fails with S_DEVERR and the daemon says why",
        (|| {
            for i in 0..3 {
                let s = attach_status(&mut vm, 1, 1, 0)?;
                if s != Status::DevErr {
                    return Err(format!("ATTACH {i}: status {}, expected DEVERR", s.name()));
                }
            }
            let line = wait_log(mark, "ATTACH refused (S_DEVERR)", Duration::from_secs(2))?;
            let n = log_count(mark, "ATTACH refused");
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
            // The watcher tells the keeper right after the backend took the device back.
            let t = Instant::now();
            let kept = loop {
                let kept = stored_devices(&sm)?;
                if kept.iter().any(|n| n.starts_with("dev1.")) {
                    break kept;
                }
                if t.elapsed() > Duration::from_secs(5) {
                    return Err(format!(
                        "the fd store does not keep the replugged device: {kept:?}"
                    ));
                }
                thread::sleep(Duration::from_millis(20));
            };
            Ok(format!(
                "daemon: {line}; the fd store keeps it again: {kept:?}"
            ))
        })(),
    );
    if back {
        rep.check(
            "endpoint 1 is served again: fresh ATTACH + MAP, edu DMA lands",
            (|| {
                attach_map(&mut vm, 1, 1, IOVA1, GPA1)?;
                let edu = Edu::open(&b, EndpointId(1), format!("edu {bdf1}"))?;
                round_trip(&vm, &edu, IOVA1, GPA1, &pattern(4))?;
                round_trip(&vm, &edu2, IOVA2, GPA2, &pattern(5))?;
                Ok(String::new())
            })(),
        );
    }
    vm.disconnect();
    drop(edu2);
    drop(d);
    Ok(())
}
