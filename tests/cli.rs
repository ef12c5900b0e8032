//! The binary as an operator runs it: arguments, errors, socket activation, SIGTERM.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::testing::TempDir;

use vhost_user_iommu::protocol::{Request, Status};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");

/// Kills the child when dropped (an assertion failed before it was waited for), so that no
/// daemon outlives its test; forget it once the child has been waited for.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: sending a signal to our own child process; the guard is forgotten once the
        // child has been waited for, so until then its pid is still ours.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// A daemon run from `exe` on `sock` with `extra` arguments, its stderr in `log`; killed if the
/// test fails before [`LoggedDaemon::stop`].
struct LoggedDaemon {
    child: std::process::Child,
    guard: KillOnDrop,
}

impl LoggedDaemon {
    fn spawn(
        exe: &std::path::Path,
        sock: &std::path::Path,
        extra: &[&std::ffi::OsStr],
        log: &std::path::Path,
    ) -> LoggedDaemon {
        Self::spawn_with_env(exe, sock, extra, log, &[])
    }

    fn spawn_with_env(
        exe: &std::path::Path,
        sock: &std::path::Path,
        extra: &[&std::ffi::OsStr],
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> LoggedDaemon {
        let child = Command::new(exe)
            .arg("--socket-path")
            .arg(sock)
            .args(extra)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn");
        let guard = KillOnDrop(child.id());
        LoggedDaemon { child, guard }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, and the daemon must exit 0.
    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        assert!(wait_exit(&mut self.child).success());
        std::mem::forget(self.guard);
    }
}

/// A test's directory and the paths a daemon run uses in it: its vhost-user socket, control
/// socket and log. Keep the directory bound (`_dir` if unused): it goes when dropped.
fn scene() -> (TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = TempDir::new();
    let (sock, ctl, log) = (
        dir.join("vm.sock"),
        dir.join("vm.ctl"),
        dir.join("daemon.log"),
    );
    (dir, sock, ctl, log)
}

/// A copy of the daemon binary in `dir`, for a test that replaces it as a package upgrade does.
fn own_binary(dir: &TempDir) -> PathBuf {
    let exe = dir.join("vhost-user-iommu");
    std::fs::copy(BIN, &exe).unwrap();
    exe
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exercise(vm: &mut TestVm) {
    let attach = Request::attach(1, 3);
    assert_eq!(vm.request(&attach).unwrap(), Status::Ok);
    let map = Request::map(1, 0x1000, 0x1fff, 0x1000, 3);
    assert_eq!(vm.request(&map).unwrap(), Status::Ok);
    let unknown = Request::attach(1, 16);
    assert_eq!(
        vm.request(&unknown).unwrap(),
        Status::NoEnt,
        "default endpoints are 0..=15"
    );
}

/// The mapping [`exercise`] made is still there: a MAP over it is refused as overlapping until
/// it is unmapped.
fn assert_exercise_mapping_kept(vm: &mut TestVm) {
    let map = Request::map(1, 0x1000, 0x1fff, 0x1000, 3);
    assert_eq!(
        vm.request(&map).unwrap(),
        Status::Inval,
        "the mapping is kept"
    );
    let unmap = Request::unmap(1, 0x1000, 0x1fff);
    assert_eq!(vm.request(&unmap).unwrap(), Status::Ok);
    assert_eq!(vm.request(&map).unwrap(), Status::Ok);
}

#[test]
fn serves_on_a_socket_path_and_exits_zero_on_sigterm() {
    let dir = TempDir::new();
    let sock = dir.0.join("v.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        wait_exit(&mut child).success(),
        "SIGTERM with a VMM connected must exit 0"
    );
    drop(vm);
}

/// Makes `fd` the child's fd 3, open across exec (what socket activation hands a service).
fn inherit_as_fd3(cmd: &mut Command, fd: i32) {
    // SAFETY: dup2/fcntl in the child between fork and exec only touch the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                // Already in place: only the close-on-exec flag must go.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn serves_an_inherited_listening_fd() {
    let dir = TempDir::new();
    let sock = dir.0.join("fd.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--threads", "2"])
        .stderr(Stdio::null());
    inherit_as_fd3(&mut cmd, fd);
    let mut child = cmd.spawn().expect("spawn");
    drop(listener);
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    vm.disconnect();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child).success());
}

/// A `.socket` unit passes the listener as systemd does (`LISTEN_FDS=1`, `LISTEN_PID`), the
/// service says `--fd 3`: the daemon serves it, with or without a notify socket (the crash
/// journal's take-back must leave it alone).
#[test]
fn serves_a_listening_fd_systemd_passed() {
    for with_notify in [false, true] {
        let dir = TempDir::new();
        let sock = dir.0.join("fd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let notify = dir.0.join("notify");
        // A service manager reads its notify socket (READY=1, the fd store's messages).
        let manager = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while manager.recv(&mut buf).is_ok() {}
        });
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "export LISTEN_PID=$$; exec \"$0\" \"$@\"",
            BIN,
            "--fd",
            "3",
        ])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "vhost-user")
        .stderr(Stdio::null());
        if with_notify {
            cmd.env("NOTIFY_SOCKET", &notify);
        } else {
            cmd.env_remove("NOTIFY_SOCKET");
        }
        inherit_as_fd3(&mut cmd, fd);
        let mut child = cmd.spawn().expect("spawn");
        drop(listener);
        let mut vm = TestVm::connect(&sock, VmOptions::default())
            .unwrap_or_else(|e| panic!("notify socket {with_notify}: connect: {e}"));
        exercise(&mut vm);
        vm.disconnect();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(
            wait_exit(&mut child).success(),
            "notify socket {with_notify}"
        );
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(err.contains("--socket-path"), "{err}");
    let (ok, err) = run(&["--socket-path", "/nonexistent-dir/x.sock"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent-dir/x.sock"), "{err}");
    let (ok, err) = run(&["--fd", "200"]);
    assert!(!ok);
    assert!(err.contains("not an open socket"), "{err}");
    let (ok, err) = run(&["--config", "/nonexistent.toml", "--socket-path", "/tmp/x"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent.toml"), "{err}");
    let (ok, err) = run(&["--backend", "bogus"]);
    assert!(!ok);
    assert!(err.contains("bogus"), "{err}");
    let (ok, err) = run(&["--socket-path", "/tmp/x", "--poll-us", "5000000"]);
    assert!(!ok);
    assert!(err.contains("5000000") && err.contains("1000000"), "{err}");
}

#[test]
fn print_capabilities_is_json() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["type"], "iommu");
}

#[test]
fn viot_command_writes_a_table_that_decodes_back() {
    let dir = TempDir::new();
    let out = dir.0.join("viot.bin");
    let st = Command::new(BIN)
        .args([
            "viot",
            "--iommu",
            "00:03.0",
            "--endpoint",
            "32=00:04.0",
            "--endpoint",
            "40=00:05.0",
            "-o",
        ])
        .arg(&out)
        .status()
        .expect("run");
    assert!(st.success());
    let v = vhost_user_iommu::viot::Viot::parse(&std::fs::read(&out).unwrap()).expect("decodes");
    let bdf = |s: &str| s.parse().unwrap();
    assert_eq!(v.endpoint_id(0, bdf("00:04.0")), Some(32));
    assert_eq!(v.endpoint_id(0, bdf("00:05.0")), Some(40));
    assert_eq!(v.endpoint_id(0, bdf("00:03.0")), None);
}

/// The daemon on `sock` with its control socket on `ctl`.
fn spawn_with_control(sock: &std::path::Path, ctl: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .arg("--socket-path")
        .arg(sock)
        .arg("--control-socket")
        .arg(ctl)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

fn ask(sock: &std::path::Path, cmd: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).expect("control socket");
    c.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn control_socket_reports_state_and_prometheus_metrics() {
    let (dir, sock, ctl, _) = scene();
    let mut child = spawn_with_control(&sock, &ctl);
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    let state: serde_json::Value = serde_json::from_str(&ask(&ctl, "state")).expect("JSON state");
    assert_eq!(state["mappings"], 1);
    assert_eq!(
        state["failed_requests"], 1,
        "the NoEnt attach in exercise()"
    );
    assert_eq!(state["domains"][0]["id"], 1);
    assert_eq!(state["domains"][0]["mappings"][0]["start"], 0x1000);
    let ep = state["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == 3)
        .unwrap();
    assert_eq!(ep["domain"], 1);
    let m = ask(&ctl, "metrics");
    for line in [
        "viommu_requests_total{type=\"map\",status=\"ok\"} 1",
        "viommu_requests_total{type=\"attach\",status=\"noent\"} 1",
        "viommu_domain_mappings{domain=\"1\"} 1",
        "viommu_domain_mapped_bytes{domain=\"1\"} 4096",
        "viommu_endpoints_attached 1",
        "viommu_request_latency_seconds_count{type=\"map\"} 1",
        "viommu_request_latency_seconds_count{type=\"attach\"} 2",
        // Three requests, one at a time (the test kit waits for each answer).
        "viommu_queue_depth_sum 3",
        "viommu_queue_depth_bucket{le=\"1\"} 3",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    assert!(
        m.lines().any(|l| l == "viommu_pinned_bytes 0"),
        "soft backend pins nothing:\n{m}"
    );
    assert_eq!(state["pinned_bytes"], 0);
    assert!(ask(&ctl, "bogus").contains("unknown command"));
    // The summary for people, also what `ctl` prints by default.
    let summary = ask(&ctl, "summary");
    for want in [
        "domains:   1 (1 mappings, 4096 bytes mapped; 0 bytes of guest RAM pinned)",
        "3 in domain 1",
        "map 1 ok, 0 failed",
        "attach 1 ok, 1 failed",
    ] {
        assert!(summary.contains(want), "missing {want:?} in\n{summary}");
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-iommu"))
        .args(["ctl", "--control-socket"])
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), ask(&ctl, "summary"));
    // The `ctl` subcommand is the same client, for operators and scripts.
    let out = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(&ctl)
        .arg("metrics")
        .output()
        .expect("run ctl");
    assert!(out.status.success(), "ctl metrics failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "viommu_domain_mappings{domain=\"1\"} 1"),
        "ctl metrics printed:\n{text}"
    );
    let missing = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(dir.0.join("absent.sock"))
        .output()
        .expect("run ctl");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.sock"));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child).success());
}

#[test]
fn a_control_client_that_never_reads_does_not_block_the_control_socket() {
    use std::io::Write;
    let (_dir, sock, ctl, _) = scene();
    let mut child = spawn_with_control(&sock, &ctl);
    // Killed if an assertion below fails, so that no daemon outlives the test.
    let guard = KillOnDrop(child.id());
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    // Enough mappings for a `state` answer far larger than a unix socket's buffer.
    for chunk in 0..80u64 {
        let maps: Vec<Request> = (0..100u64)
            .map(|i| {
                let page = 0x10 + chunk * 100 + i;
                Request::map(1, page << 12, (page << 12) + 0xfff, page << 12, 3)
            })
            .collect();
        assert!(vm.batch(&maps).unwrap().iter().all(|s| *s == Status::Ok));
    }
    // A client asks for the state and never reads it.
    let mut stuck = std::os::unix::net::UnixStream::connect(&ctl).expect("control socket");
    stuck.write_all(b"state\n").unwrap();
    // Another client is still answered, within the daemon's write timeout, not never.
    let (tx, rx) = std::sync::mpsc::channel();
    let ctl2 = ctl.clone();
    std::thread::spawn(move || {
        let _ = tx.send(ask(&ctl2, "metrics"));
    });
    let answer = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the control socket stayed blocked by a client that does not read");
    assert!(
        answer.contains("viommu_domain_mappings{domain=\"1\"} 8001"),
        "{answer}"
    );
    drop(stuck);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child).success());
    std::mem::forget(guard);
}

#[test]
fn a_daemon_killed_with_sigkill_is_restarted_on_its_stale_socket() {
    let dir = TempDir::new();
    let sock = dir.0.join("v.sock");
    let spawn = || {
        Command::new(BIN)
            .arg("--socket-path")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut first = spawn();
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    drop(vm);
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");
    let mut second = spawn();
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("reconnect after restart");
    exercise(&mut vm);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut second).success());
}

#[test]
fn sigterm_under_load_exits_zero_promptly() {
    let dir = TempDir::new();
    let sock = dir.0.join("v.sock");
    let mut child = Command::new(BIN)
        .args(["--threads", "2", "--socket-path"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let opts = VmOptions {
        request_timeout: Duration::from_secs(1),
        ..VmOptions::default()
    };
    let mut vm = TestVm::connect(&sock, opts).expect("connect");
    exercise(&mut vm);
    let load = std::thread::spawn(move || {
        let mut served = 0u64;
        for i in 0.. {
            let iova = 0x10_0000 + (i % 512) * 0x1000;
            let reqs = [
                Request::map(1, iova, iova + 0xfff, iova, 3),
                Request::unmap(1, iova, iova + 0xfff),
            ];
            match vm.batch(&reqs) {
                Ok(st) => {
                    assert_eq!(st, vec![Status::Ok; 2]);
                    served += 2;
                }
                Err(_) => break, // the daemon went away mid-load
            }
        }
        served
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut child);
    let served = load.join().expect("load thread");
    assert!(served > 0, "the load ran");
    assert!(st.success(), "SIGTERM under load must exit 0, got {st:?}");
}

/// Waits up to 5 s for `child` to exit by itself; kills it (and says so with `None`) if not.
fn exit_or_kill(mut child: std::process::Child) -> (Option<std::process::ExitStatus>, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    (status, err)
}

/// A daemon killed when the test ends, failed or not.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn daemon(args: &[&std::ffi::OsStr]) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_second_daemon_on_a_live_daemons_sockets_is_refused_and_the_first_keeps_serving() {
    let (dir, sock, ctl, _) = scene();
    let mut first = Running(daemon(&[
        "--socket-path".as_ref(),
        sock.as_os_str(),
        "--control-socket".as_ref(),
        ctl.as_os_str(),
    ]));
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    drop(vm);
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (sock_ino, ctl_ino) = (inode(&sock), inode(&ctl));

    // The same vhost-user socket.
    let (status, err) = exit_or_kill(daemon(&["--socket-path".as_ref(), sock.as_os_str()]));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second daemon on the same --socket-path must fail, got {status:?}: {err}"
    );
    assert!(err.contains("in use by a running daemon"), "{err}");
    // The same control socket (its own vhost-user socket is fine, and is not left behind).
    let other = dir.0.join("other.sock");
    let (status, err) = exit_or_kill(daemon(&[
        "--socket-path".as_ref(),
        other.as_os_str(),
        "--control-socket".as_ref(),
        ctl.as_os_str(),
    ]));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second daemon on the same --control-socket must fail, got {status:?}: {err}"
    );
    assert!(err.contains("in use by a running daemon"), "{err}");
    assert!(!other.exists(), "the refused daemon removed its own socket");

    assert_eq!((inode(&sock), inode(&ctl)), (sock_ino, ctl_ino));
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("the first still serves");
    exercise(&mut vm);
    assert!(ask(&ctl, "state").contains("mappings"));
    drop(vm);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(first.0.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut first.0).success());
}

#[test]
fn socket_path_never_replaces_a_file_that_is_not_a_socket() {
    let dir = TempDir::new();
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let (status, err) = exit_or_kill(daemon(&["--socket-path".as_ref(), file.as_os_str()]));
    assert!(
        status.is_some_and(|s| !s.success()),
        "got {status:?}: {err}"
    );
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn the_daemons_sockets_are_created_0660_and_the_control_socket_0600_whatever_the_umask() {
    let (_dir, sock, ctl, _) = scene();
    for umask in [0o022, 0o000, 0o077] {
        let mut cmd = Command::new(BIN);
        cmd.arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .stderr(Stdio::null());
        // SAFETY: umask in the child between fork and exec only changes the child's mask.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let mut child = Running(cmd.spawn().expect("spawn"));
        drop(TestVm::connect(&sock, VmOptions::default()).expect("connect"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&ctl).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(mode_of(&sock), 0o660, "umask {umask:03o}");
        assert_eq!(mode_of(&ctl), 0o600, "umask {umask:03o}");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        assert!(wait_exit(&mut child.0).success());
    }
}

/// Waits until the daemon's log file holds `n` lines containing `what`.
fn wait_log(log: &std::path::Path, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {n}× '{what}' in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fds a process holds, by what they are (sockets, eventfds, memfds, files).
fn open_fds(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| {
            let t = t.to_string_lossy().to_string();
            // socket:[inode] and the like: the kind, not the instance.
            t.split(":[").next().unwrap_or(&t).to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn sigusr2_upgrades_to_the_binary_on_disk_while_the_vmm_stays_connected() {
    let (dir, sock, ctl, log) = scene();
    // The daemon runs from a copy that is replaced on disk, as a package upgrade does.
    let exe = own_binary(&dir);
    let mut d = LoggedDaemon::spawn(
        &exe,
        &sock,
        &[
            "--control-socket".as_ref(),
            ctl.as_os_str(),
            "--threads".as_ref(),
            "2".as_ref(),
            "-v".as_ref(),
        ],
        &log,
    );
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    assert_eq!(vm.request(&Request::attach(1, 3)).unwrap(), Status::Ok);
    assert_eq!(vm.request(&Request::attach(2, 4)).unwrap(), Status::Ok);
    vm.write_bypass(1).unwrap();
    let map = |i: u64| Request::map(1, i << 12, (i << 12) + 0xfff, 0x10_0000, 3);
    for i in 0..64 {
        assert_eq!(vm.request(&map(i)).unwrap(), Status::Ok);
    }
    let next = std::env::temp_dir().join(format!("viommu-next-{}", std::process::id()));
    let mut fds = Vec::new();
    for round in 1..=2u64 {
        std::fs::copy(BIN, &next).unwrap();
        std::fs::rename(&next, &exe).unwrap();
        d.signal(libc::SIGUSR2);
        // Requests keep coming while the daemon replaces itself: each is answered once. The
        // slowest of them is the service pause the upgrade caused (reported, not asserted).
        let mut took = Vec::new();
        for i in 0..100 {
            let i = round * 1000 + i;
            let t = Instant::now();
            assert_eq!(vm.request(&map(i)).unwrap(), Status::Ok, "round {round}");
            took.push(t.elapsed());
        }
        took.sort();
        eprintln!(
            "upgrade {round}: slowest request {:?}, median {:?}",
            took[99], took[50]
        );
        wait_log(&log, "device state rebuilt", round as usize);
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "the same process serves"
        );
        fds.push(open_fds(d.child.id()));
    }
    assert_eq!(
        fds[0], fds[1],
        "an upgrade leaks no fd into the next binary"
    );
    // The state survived both upgrades: 264 mappings in domain 1, domain 2 attached, bypass.
    let out = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(&ctl)
        .arg("state")
        .output()
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).expect("state JSON");
    let domains = state["domains"].as_array().unwrap();
    let d1 = domains.iter().find(|d| d["id"] == 1).unwrap();
    assert_eq!(d1["mappings"].as_array().unwrap().len(), 264);
    assert!(domains.iter().any(|d| d["id"] == 2));
    assert_eq!(vm.config().unwrap().bypass, 1);
    // The counters continued: every MAP of the three processes is counted once.
    let out = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(&ctl)
        .arg("metrics")
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("viommu_requests_total{type=\"map\",status=\"ok\"} 264\n"),
        "{metrics}"
    );
    // The resumed connection still negotiates and serves.
    vm.pause_and_resume().unwrap();
    assert_eq!(
        vm.request(&Request::unmap(1, 0, u64::MAX)).unwrap(),
        Status::Ok
    );
    assert_eq!(vm.request(&Request::detach(2, 4)).unwrap(), Status::Ok);
    d.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("upgrading: executing").count(), 2, "{text}");
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_read_the_state_is_refused_and_the_daemon_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, sock, _, log) = scene();
    let exe = own_binary(&dir);
    let d = LoggedDaemon::spawn(&exe, &sock, &["-v".as_ref()], &log);
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    // A "newer" binary whose state version this daemon does not write.
    let next = dir.0.join("next");
    std::fs::write(&next, "#!/bin/sh\necho 'upgrade 99 connection 1'\n").unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&next, &exe).unwrap();
    d.signal(libc::SIGUSR2);
    wait_log(&log, "upgrade failed", 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("it reads: upgrade 99 connection 1"), "{text}");
    assert!(!text.contains("upgrading: executing"), "{text}");
    // The same daemon, the same connection and its state.
    assert_exercise_mapping_kept(&mut vm);
    d.stop();
}

#[test]
fn a_new_binary_that_cannot_rebuild_the_state_goes_back_to_the_previous_one() {
    let (dir, sock, _, log) = scene();
    let cfg = dir.join("vm.toml");
    std::fs::write(&cfg, "domain_range = [1, 8]\n").unwrap();
    let exe = own_binary(&dir);
    // Test builds only: every resumed process fails right after rebuilding the state, except
    // one that is itself the way back.
    let mut d = LoggedDaemon::spawn_with_env(
        &exe,
        &sock,
        &["--config".as_ref(), cfg.as_os_str(), "-v".as_ref()],
        &log,
        &[("VHOST_USER_IOMMU_TEST_FAIL_REBUILD", "1")],
    );
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    // The file on disk is replaced (a package upgrade), and the configuration file changed: the
    // resumed daemons serve with the configuration the running one read at its start.
    let next = dir.0.join("next");
    std::fs::copy(BIN, &next).unwrap();
    std::fs::rename(&next, &exe).unwrap();
    std::fs::write(&cfg, "domain_range = [5, 8]\n").unwrap();
    d.signal(libc::SIGUSR2);
    wait_log(&log, "going back to the previous binary", 1);
    wait_log(&log, "device state rebuilt", 2);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("VHOST_USER_IOMMU_TEST_FAIL_REBUILD is set"),
        "{text}"
    );
    // The same daemon process, the same VMM connection, the same state: the mapping made before
    // is there, in domain 1, which the changed file's domain range would refuse.
    assert_exercise_mapping_kept(&mut vm);
    assert_eq!(
        vm.request(&Request::attach(2, 4)).unwrap(),
        Status::Ok,
        "domain 2 is in the range the daemon started with"
    );
    // The daemon that went back is an ordinary one again: its next upgrade has a way back too
    // (the new binary still fails here, and goes back again).
    d.signal(libc::SIGUSR2);
    wait_log(&log, "going back to the previous binary", 2);
    wait_log(&log, "device state rebuilt", 4);
    assert_eq!(
        vm.request(&Request::unmap(1, 0x1000, 0x1fff)).unwrap(),
        Status::Ok
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the same process");
    d.stop();
}

#[test]
fn trace_writes_one_json_line_per_request_and_per_vhost_user_message() {
    let (dir, sock, _, log) = scene();
    let trace = dir.join("trace.jsonl");
    let d = LoggedDaemon::spawn(
        BIN.as_ref(),
        &sock,
        &["--trace".as_ref(), trace.as_os_str()],
        &log,
    );
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    exercise(&mut vm);
    vm.disconnect();
    d.stop();
    let lines = vhost_user_iommu::testing::json_lines(&trace);
    let requests: Vec<_> = lines.iter().filter(|l| l["kind"] == "request").collect();
    assert_eq!(requests.len(), 3, "{lines:?}");
    assert_eq!(requests[0]["type"], "attach");
    assert_eq!(requests[1]["type"], "map");
    assert_eq!(requests[1]["start"], "0x1000");
    assert_eq!(requests[1]["status"], "ok");
    assert_eq!(requests[2]["status"], "noent");
    assert!(
        requests[2]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "vhost-user" && l["name"] == "SET_MEM_TABLE" && l["ok"] == true),
        "{lines:?}"
    );
}

#[test]
fn ctl_starts_and_stops_the_trace_of_a_running_daemon() {
    let (dir, sock, ctl_sock, log) = scene();
    let trace = dir.join("live.jsonl");
    let d = LoggedDaemon::spawn(
        BIN.as_ref(),
        &sock,
        &["--control-socket".as_ref(), ctl_sock.as_os_str()],
        &log,
    );
    let ctl = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(BIN)
            .arg("ctl")
            .arg("--control-socket")
            .arg(&ctl_sock)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    while !ctl_sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl(&["trace".as_ref()]), (true, "trace off\n".into()));
    // Before the trace: not written anywhere.
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    let (ok, out) = ctl(&[
        "trace-start".as_ref(),
        trace.as_os_str(),
        "--max-mb".as_ref(),
        "8".as_ref(),
    ]);
    assert!(
        ok && out.contains("tracing to") && out.contains("8 MiB"),
        "{out}"
    );
    assert_eq!(
        vm.request(&Request::map(1, 0x1000, 0x1fff, 0x1000, 3))
            .unwrap(),
        Status::Ok
    );
    assert!(ctl(&["trace-stop".as_ref()]).0);
    // After it: not written either.
    assert_eq!(
        vm.request(&Request::unmap(1, 0x1000, 0x1fff)).unwrap(),
        Status::Ok
    );
    let lines = vhost_user_iommu::testing::json_lines(&trace);
    let types: Vec<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "request")
        .map(|l| l["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["map"], "{lines:?}");
    // Refusals are errors with a reason, and the daemon goes on.
    let (ok, out) = ctl(&["trace-start".as_ref(), dir.0.as_os_str()]);
    assert!(!ok && out.contains("cannot write the trace"), "{out}");
    let (ok, out) = ctl(&["trace-start".as_ref()]);
    assert!(!ok, "{out}");
    assert_eq!(ctl(&["trace".as_ref()]), (true, "trace off\n".into()));
    assert_eq!(vm.request(&Request::attach(2, 2)).unwrap(), Status::Ok);
    vm.disconnect();
    d.stop();
}

#[test]
fn the_exporter_serves_every_vms_metrics_over_http_with_a_vm_label() {
    use std::io::{Read, Write};
    let dir = TempDir::new();
    let (sock, ctl) = (dir.0.join("vm1.sock"), dir.0.join("vm1.ctl"));
    let log = dir.0.join("daemon.log");
    let d = LoggedDaemon::spawn(
        BIN.as_ref(),
        &sock,
        &["--control-socket".as_ref(), ctl.as_os_str()],
        &log,
    );
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    // A control socket nobody serves: the exporter says so (viommu_up 0) and goes on.
    drop(std::os::unix::net::UnixListener::bind(dir.0.join("gone.ctl")).unwrap());
    let xlog = dir.0.join("exporter.log");
    let mut exporter = Running(
        Command::new(BIN)
            .args(["-v", "exporter", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&dir.0)
            .stderr(std::fs::File::create(&xlog).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_log(&xlog, "/metrics", 1);
    let text = std::fs::read_to_string(&xlog).unwrap();
    let addr = text
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("the address in the log")
        .to_string();
    let get = |path: &str| {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = get("/metrics");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.contains("viommu_up{vm=\"vm1\"} 1\n"), "{body}");
    assert!(body.contains("viommu_up{vm=\"gone\"} 0\n"), "{body}");
    assert!(
        body.contains("viommu_requests_total{vm=\"vm1\",type=\"attach\",status=\"ok\"} 1\n"),
        "{body}"
    );
    assert_eq!(
        body.matches("# TYPE viommu_domains gauge").count(),
        1,
        "{body}"
    );
    assert!(get("/nothing").starts_with("HTTP/1.1 404"));
    vm.disconnect();
    d.stop();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(exporter.0.id() as i32, libc::SIGTERM) };
    let _ = exporter.0.wait();
}

#[test]
fn a_vmm_that_truncates_guest_ram_under_the_daemon_loses_its_connection_not_the_daemon() {
    use vhost_user_iommu::driver::Desc;
    let (_dir, sock, _, log) = scene();
    let mut d = LoggedDaemon::spawn(BIN.as_ref(), &sock, &["-v".as_ref()], &log);
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect");
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    // A second region the test kit itself never touches after this; a request lies in it.
    let extra = 1u64 << 32;
    vm.add_region(extra, 1 << 20).unwrap();
    let (bytes, len) = Request::attach(2, 2).encode();
    let req = &bytes[..len];
    let region = vm.region(extra).unwrap();
    region.write(extra, req).unwrap();
    // The VMM shrinks the region's file to nothing: the daemon's mapping of it is gone.
    // SAFETY: ftruncate on the test kit's own memfd.
    assert_eq!(unsafe { libc::ftruncate(region.fd(), 0) }, 0);
    vm.push_chain(
        &[
            Desc::readable(extra, req.len() as u32),
            Desc::writable(extra + 0x1000, 4),
        ],
        false,
    )
    .unwrap();
    vm.kick().unwrap();
    wait_log(&log, "is gone (SIGBUS)", 1);
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(vm);
    // It serves the next VMM.
    let mut vm = TestVm::connect(&sock, VmOptions::default()).expect("connect after");
    assert_eq!(vm.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    vm.disconnect();
    d.stop();
}

#[test]
fn the_readmes_first_command_shows_the_daemon_serving_within_seconds() {
    let dir = TempDir::new();
    let sock = dir.0.join("demo.sock");
    let log = dir.0.join("demo.log");
    let d = LoggedDaemon::spawn(BIN.as_ref(), &sock, &["--demo".as_ref()], &log);
    wait_log(&log, "requests/s answered, ok ", 1);
    d.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("requests/s answered"))
        .unwrap();
    let ok: u64 = line
        .split("ok ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(ok > 0, "{line}");
}

/// Issue 19: with no `[limits]` the mapping caps follow the guest's RAM (twice its 4 KiB pages,
/// at least 65,536): a 64 MiB guest (32,768 pages) may hold 65,536 mappings in a domain and the
/// next MAP gets S_NOMEM; once the memory table grows to 1 GiB more fit.
#[test]
fn mapping_caps_follow_guest_ram_when_the_config_sets_none() {
    const FLOOR: u64 = 1 << 16;
    let dir = TempDir::new();
    let sock = dir.0.join("v.sock");
    let _daemon = Running(daemon(&["--socket-path".as_ref(), sock.as_os_str()]));
    let opts = VmOptions {
        ram_size: 64 << 20,
        queue_size: 1024,
        ..VmOptions::default()
    };
    let mut vm = TestVm::connect(&sock, opts).expect("connect");
    assert_eq!(vm.request(&Request::attach(1, 3)).unwrap(), Status::Ok);
    let map = |i: u64| {
        let iova = (1u64 << 32) + i * 0x1000;
        Request::map(1, iova, iova + 0xfff, (i % 16_384) * 0x1000, 3)
    };
    let all: Vec<Request> = (0..FLOOR).map(map).collect();
    for chunk in all.chunks(256) {
        let st = vm.batch(chunk).unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
    }
    assert_eq!(vm.request(&map(FLOOR)).unwrap(), Status::NoMem);
    vm.add_region(1 << 32, 1 << 30)
        .expect("ADD_MEM_REG of 1 GiB");
    assert_eq!(vm.request(&map(FLOOR)).unwrap(), Status::Ok);
    drop(vm);
}
