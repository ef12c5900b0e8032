//! Crash restart over the socket: the real daemon binary (soft backend) is SIGKILLed at random
//! points of a long random request sequence and restarted as systemd restarts a unit, with its
//! file descriptor store handed back (`LISTEN_FDS`, `LISTEN_FDNAMES`); the simulated VM keeps
//! its one vhost-user connection throughout. After every restart each request of the batch in
//! flight is answered exactly once with the status the spec model (`testing::Model`, no code
//! shared with the daemon) gives, nothing more lands in the used ring, and the daemon's state
//! (domains, mappings, attachments) equals the model's.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::protocol::{Request, Status};
use vhost_user_iommu::testing::TempDir;
use vhost_user_iommu::testing::service_manager::ServiceManager;
use vhost_user_iommu::testing::{ENDPOINTS, MappingsByDomain, Model, RAM, Rng, random_request};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");

/// The unit: systemd's notify socket and fd store (`testing::service_manager`), and the
/// daemon of the moment, SIGKILLed when the test ends however it ends.
struct Manager {
    systemd: ServiceManager,
    /// The daemon's own arguments (`--threads N`).
    args: Vec<String>,
    daemon: std::sync::atomic::AtomicI32,
}

impl Manager {
    fn start(dir: &Path, args: &[&str]) -> Manager {
        Manager {
            systemd: ServiceManager::start(&dir.join("notify")).expect("notify socket"),
            args: args.iter().map(|a| a.to_string()).collect(),
            daemon: std::sync::atomic::AtomicI32::new(0),
        }
    }

    fn names(&self) -> Vec<String> {
        self.systemd.names()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let pid = self.daemon.load(std::sync::atomic::Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: signalling this test's own child (a reaped one's pid is not reused while
            // the test runs: nothing here forks meanwhile).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The daemon as a unit of `manager` runs it: started with `passed` (none at the first start).
fn start_daemon(dir: &Path, manager: &Manager, passed: Vec<(String, OwnedFd)>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    let (sock, ctl) = (dir.join("vm.sock"), dir.join("vm.ctl"));
    let mut cmd: Vec<&OsStr> = vec![
        BIN.as_ref(),
        "--socket-path".as_ref(),
        sock.as_os_str(),
        "--control-socket".as_ref(),
        ctl.as_os_str(),
    ];
    let eps: Vec<String> = ENDPOINTS.iter().map(|e| e.to_string()).collect();
    for e in &eps {
        cmd.extend([OsStr::new("--endpoint"), OsStr::new(e)]);
    }
    cmd.extend(manager.args.iter().map(OsStr::new));
    let child = manager
        .systemd
        .spawn(&cmd, passed, |c| {
            c.env(
                "RUST_LOG",
                std::env::var("RESTART_LOG").unwrap_or("info".into()),
            )
            .stderr(log);
        })
        .expect("spawn the daemon");
    manager
        .daemon
        .store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    child
}

/// SIGKILL, reaped, then started again with what the store holds.
fn crash_and_restart(dir: &Path, manager: &Manager, mut child: Child) -> Child {
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    manager.systemd.sync().unwrap();
    start_daemon(dir, manager, manager.systemd.passed().unwrap())
}

/// Waits up to `limit` for the daemon's log in `dir` to contain `what`.
fn wait_for_log(dir: &Path, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        if log.contains(what) {
            return;
        }
        assert!(Instant::now() < deadline, "no \"{what}\" logged: {log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon's `state` dump as the model's view.
fn daemon_state(ctl: &Path) -> (MappingsByDomain, BTreeMap<u32, u32>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        match UnixStream::connect(ctl) {
            Ok(mut c) => {
                c.write_all(b"state\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                if !out.is_empty() {
                    break out;
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "control socket: {e}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("state JSON");
    let domains = v["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let mut maps: Vec<_> = d["mappings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["start"].as_u64().unwrap(),
                        m["end"].as_u64().unwrap(),
                        m["gpa"].as_u64().unwrap(),
                        m["read"].as_bool().unwrap(),
                        m["write"].as_bool().unwrap(),
                    )
                })
                .collect();
            maps.sort_unstable();
            (d["id"].as_u64().unwrap() as u32, maps)
        })
        .collect();
    let attached = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["id"].as_u64()? as u32, e["domain"].as_u64()? as u32)))
        .collect();
    (domains, attached)
}

/// The simulated VM, on the unit's socket (generous timeouts: a restart is a pause).
fn connect(dir: &Path) -> TestVm {
    TestVm::connect(
        &dir.join("vm.sock"),
        VmOptions {
            ram_size: RAM,
            request_timeout: Duration::from_secs(30),
            ..VmOptions::default()
        },
    )
    .expect("connect")
}

/// The used index the daemon published, as guest memory holds it.
fn guest_used_idx(vm: &TestVm) -> u16 {
    let used = vm.request_queue().layout().used;
    let mut b = [0u8; 2];
    vm.ram().read(used + 2, &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// Requests execute in the vring thread: answers go out in order.
#[test]
fn sigkill_at_random_points_loses_no_request_and_no_state() {
    sigkill_at_random_points(&[], 0x5eed_c4a5);
}

/// Two executor threads: requests of different domains complete out of order, so answers
/// published after a gap are skipped one by one when popped again.
#[test]
fn sigkill_at_random_points_with_two_executors_too() {
    sigkill_at_random_points(&["--threads", "2"], 0x0dd_0dd5);
}

fn sigkill_at_random_points(args: &[&str], seed: u64) {
    let restarts: usize = std::env::var("RESTART_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = TempDir::new();
    let manager = Manager::start(&dir.0, args);
    let mut child = start_daemon(&dir.0, &manager, Vec::new());
    let mut vm = connect(&dir.0);
    let mut model = Model::default();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut requests = 0usize;
    let mut pauses = Vec::new();
    for i in 0..restarts {
        let n = 1 + rng.below(24) as usize;
        let reqs: Vec<Request> = (0..n).map(|_| random_request(&mut rng)).collect();
        let want: Vec<Status> = reqs.iter().map(|r| model.apply(r)).collect();
        // The kill lands before, during or after the batch (0 to 3 ms after it is kicked).
        let delay = Duration::from_micros(rng.below(3000));
        let (restarted, got, killed_at, answered_at) = {
            let dir = dir.0.clone();
            let m = &manager;
            std::thread::scope(|scope| {
                let k = scope.spawn(move || {
                    std::thread::sleep(delay);
                    let at = Instant::now();
                    (crash_and_restart(&dir, m, child), at)
                });
                let got = vm.batch(&reqs);
                let answered_at = Instant::now();
                let (restarted, killed_at) = k.join().expect("restart");
                (restarted, got, killed_at, answered_at)
            })
        };
        child = restarted;
        // The kill landed while the batch waited: the guest's pause is from the kill to the
        // restarted daemon's answer.
        if answered_at > killed_at {
            pauses.push(answered_at - killed_at);
        }
        let got = got.unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
            let _ = std::fs::write(std::env::temp_dir().join("restart-failure.log"), &log);
            panic!(
                "restart {i}: batch of {n} failed: {e} (daemon log: $TMPDIR/restart-failure.log)"
            )
        });
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "restart {i}: request #{j} {:?}", reqs[j]);
        }
        // Nothing answered twice: the used ring holds exactly the requests made.
        assert_eq!(
            guest_used_idx(&vm),
            vm.request_queue().avail_idx(),
            "restart {i}: used index"
        );
        requests += n;
        if i % 100 == 99 || i + 1 == restarts {
            // The kill may have come after the batch: once a request is answered, the
            // restarted daemon has its state back.
            let probe = Request::Probe {
                endpoint: EndpointId(1),
            };
            assert_eq!(vm.request(&probe).unwrap(), model.apply(&probe));
            let (domains, attached) = daemon_state(&dir.0.join("vm.ctl"));
            let (want_domains, want_attached) = model.view();
            assert_eq!(domains, want_domains, "restart {i}: domains and mappings");
            assert_eq!(attached, want_attached, "restart {i}: attachments");
        }
    }
    // A last look a while later: no answer came twice.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest_used_idx(&vm), vm.request_queue().avail_idx());
    pauses.sort_unstable();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    eprintln!(
        "{restarts} SIGKILL restarts over {requests} requests in {:.1} s; {} landed mid-batch: \
         pause from the kill to the answer p50 {:.2} ms, max {:.2} ms; store holds {:?}",
        started.elapsed().as_secs_f64(),
        pauses.len(),
        ms(pauses.get(pauses.len() / 2)),
        ms(pauses.last()),
        manager.names()
    );
    let log = std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
    let recovered = log.matches("crash journal:").count();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    manager.daemon.store(0, std::sync::atomic::Ordering::SeqCst);
    // A kill that lands while the previous restart is still starting finds nothing new to
    // take back; every other restart goes through the journal.
    eprintln!("{recovered} of {restarts} restarts took back a crash journal");
    assert!(
        recovered > restarts / 2,
        "{recovered} of {restarts} restarts took back a crash journal"
    );
}

#[test]
fn a_crash_after_an_upgrade_in_place_loses_nothing_either() {
    let dir = TempDir::new();
    let manager = Manager::start(&dir.0, &[]);
    let child = start_daemon(&dir.0, &manager, Vec::new());
    let mut vm = connect(&dir.0);
    let mut model = Model::default();
    let mut rng = Rng(0x0bad_5eed);
    let log = dir.0.join("daemon.log");
    let mut run = |vm: &mut TestVm, model: &mut Model, what: &str| {
        for _ in 0..20 {
            let reqs: Vec<Request> = (0..8).map(|_| random_request(&mut rng)).collect();
            let want: Vec<Status> = reqs.iter().map(|r| model.apply(r)).collect();
            let got = vm.batch(&reqs).unwrap_or_else(|e| {
                let log = std::fs::read_to_string(log.as_path()).unwrap_or_default();
                let _ = std::fs::write(std::env::temp_dir().join("restart-failure.log"), &log);
                panic!("{what}: {e:?} (daemon log: $TMPDIR/restart-failure.log)")
            });
            assert_eq!(got, want, "{what}");
        }
    };
    run(&mut vm, &mut model, "before the upgrade");
    // The upgrade hands the journal and the store's names to the new binary (same pid).
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) };
    wait_for_log(&dir.0, "device state rebuilt", Duration::from_secs(20));
    run(&mut vm, &mut model, "after the upgrade");
    let child = crash_and_restart(&dir.0, &manager, child);
    run(&mut vm, &mut model, "after the crash");
    let probe = Request::Probe {
        endpoint: EndpointId(1),
    };
    assert_eq!(vm.request(&probe).unwrap(), model.apply(&probe));
    let (domains, attached) = daemon_state(&dir.0.join("vm.ctl"));
    let (want_domains, want_attached) = model.view();
    assert_eq!(domains, want_domains);
    assert_eq!(attached, want_attached);
    let names = manager.names();
    assert_eq!(
        names.iter().filter(|n| *n == "journal").count(),
        1,
        "one journal in the store: {names:?}"
    );
    drop(child);
}

/// `systemctl stop` or `restart` is a clean stop: the daemon empties the store, so that nothing
/// of this VM (its connection, its memory, its journal) outlives the process in the manager.
#[test]
fn a_clean_stop_leaves_nothing_in_the_store() {
    let dir = TempDir::new();
    let manager = Manager::start(&dir.0, &[]);
    let mut child = start_daemon(&dir.0, &manager, Vec::new());
    let mut vm = connect(&dir.0);
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    manager.systemd.sync().unwrap();
    let kept = manager.names();
    assert!(
        kept.iter().any(|n| n == "journal") && kept.iter().any(|n| n == "vmm"),
        "kept while running: {kept:?}"
    );
    vm.disconnect();
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "exit status {st}");
    manager.systemd.sync().unwrap();
    assert_eq!(manager.names(), Vec::<String>::new());
}

/// SIGKILLs while the VMM changes the memory table back to back (ADD_MEM_REG, REM_MEM_REG, each
/// acknowledged with REPLY_ACK): a message the daemon was handling when killed is still in the
/// socket for the restarted daemon (it is taken out only once answered), so every one is
/// answered and the VMM never waits for an acknowledgement that does not come.
#[test]
fn sigkill_in_the_middle_of_memory_table_changes_loses_no_message() {
    let kills: usize = std::env::var("RESTART_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(100, |n: usize| n / 5);
    let dir = TempDir::new();
    let manager = Manager::start(&dir.0, &[]);
    let mut child = start_daemon(&dir.0, &manager, Vec::new());
    let pairs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (dir, pairs, stop) = (dir.0.clone(), pairs.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut vm = connect(&dir);
            let gpa = 1 << 32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                vm.add_region(gpa, 2 << 20)
                    .map_err(|e| format!("ADD_MEM_REG: {e}"))?;
                vm.remove_region(gpa)
                    .map_err(|e| format!("REM_MEM_REG: {e}"))?;
                pairs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let probe = Request::Probe {
                endpoint: EndpointId(1),
            };
            match vm.request(&probe) {
                Ok(Status::Ok) => Ok(()),
                other => Err(format!("PROBE after the kills: {other:?}")),
            }
        })
    };
    // The kills start once the VMM is connected and its first change acknowledged: a kill in
    // the middle of its handshake resets a connection this VMM (unlike QEMU's reconnect=) does
    // not make again, which is not what this test is about.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pairs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            !worker.is_finished(),
            "the VMM's thread ended before its first change"
        );
        assert!(
            Instant::now() < deadline,
            "no memory-table change within 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut rng = Rng(0x3e3_7ab1e);
    for k in 0..kills {
        let before = pairs.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        child = crash_and_restart(&dir.0, &manager, child);
        // The VMM goes on: another pair is acknowledged by the restarted daemon.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pairs.load(std::sync::atomic::Ordering::SeqCst) < before + 2 {
            if worker.is_finished() {
                let log = std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "kill {k}: the VMM's thread ended: {:?}\ndaemon log (last lines):\n{}",
                    worker.join(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "kill {k}: no memory-table change acknowledged within 30 s: {}",
                std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    worker.join().expect("the VMM's thread").unwrap();
    assert!(pairs.load(std::sync::atomic::Ordering::SeqCst) >= 2 * kills);
    drop(child);
}

/// A VMM that asks for vhost-user inflight tracking (GET_INFLIGHT_FD), which this daemon does
/// not offer (its crash journal does that job): the protocol feature is never offered, so QEMU
/// never asks; a frontend that asks anyway is refused clearly (its connection is closed, the
/// reason logged) and the daemon serves the next VMM.
#[test]
fn a_vmm_asking_for_inflight_tracking_is_refused_and_the_next_one_served() {
    const INFLIGHT_SHMFD: u64 = 1 << 12;
    const GET_INFLIGHT_FD: u32 = 31;
    let dir = TempDir::new();
    let manager = Manager::start(&dir.0, &[]);
    let child = start_daemon(&dir.0, &manager, Vec::new());
    let vm = connect(&dir.0);
    assert_eq!(
        vm.protocol_features().bits() & INFLIGHT_SHMFD,
        0,
        "INFLIGHT_SHMFD is not offered"
    );
    vm.disconnect();
    let mut raw = UnixStream::connect(dir.0.join("vm.sock")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Header (request, flags: version 1, size) and a VhostUserInflight body (mmap size, offset,
    // queue count, queue size).
    let mut msg = Vec::new();
    msg.extend_from_slice(&GET_INFLIGHT_FD.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&24u32.to_le_bytes());
    msg.extend_from_slice(&[0u8; 16]);
    msg.extend_from_slice(&2u16.to_le_bytes());
    msg.extend_from_slice(&256u16.to_le_bytes());
    msg.extend_from_slice(&[0u8; 4]);
    raw.write_all(&msg).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(raw.read(&mut buf).unwrap(), 0, "closed without an answer");
    wait_for_log(
        &dir.0,
        "request 31 is not supported",
        Duration::from_secs(10),
    );
    let mut vm = connect(&dir.0);
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    drop(child);
}
