//! Cross-VM isolation in the shipped deployment, with real uids: VM A's VMM (a compromised
//! QEMU) against VM B's daemon, both VMMs in the daemons' group as docs/deploying.md sets
//! them up. Needs root to switch uids, so it is ignored by `cargo test`; tests/run-all.sh runs
//! it as root (`cargo test --test isolation -- --ignored`).
//!
//! The runtime directory is made exactly as the shipped tmpfiles entry makes it (mode, owner
//! and group read from packaging/vhost-user-iommu.tmpfiles), the daemon runs as its own user,
//! B's config names B's uid as its VMM. Then, as A: replacing B's socket (unlink, or binding a
//! socket at a name B's daemon has yet to bind) must fail, B's daemon must drop A's connection
//! before answering anything, B's control socket must be out of reach; as B: the daemon
//! answers.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const TMPFILES: &str = include_str!("../packaging/vhost-user-iommu.tmpfiles");
const UNIT: &str = include_str!("../systemd/vhost-user-iommu@.service");

/// The daemons' user and group, VM A's VMM, VM B's VMM (numeric: no passwd entries needed).
const DAEMON: u32 = 61_900;
const VMM_A: u32 = 61_901;
const VMM_B: u32 = 61_902;

/// What one attempt made as another user came to (the child's exit code).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The operation succeeded (for a vhost-user connection: the daemon answered).
    Done,
    /// Refused by permissions (EACCES or EPERM).
    Denied,
    /// Connected, but the daemon closed the connection without answering.
    Dropped,
    /// Anything else (the errno, or 255 for a timeout).
    Other(i32),
}

fn outcome(code: i32) -> Outcome {
    match code {
        0 => Outcome::Done,
        1 => Outcome::Denied,
        2 => Outcome::Dropped,
        c => Outcome::Other(c),
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn denied_or(e: i32) -> i32 {
    if e == libc::EACCES || e == libc::EPERM {
        1
    } else {
        e.clamp(3, 254)
    }
}

fn sockaddr(path: &Path) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < a.sun_path.len(), "socket path too long");
    for (d, s) in a.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    a
}

/// Runs `f` in a forked child with these credentials and returns what it came to. `f` runs
/// after fork() in a process with threads, so it calls only async-signal-safe functions (the
/// system calls below) and allocates nothing; everything it needs is prepared before.
fn as_user(uid: u32, groups: &[u32], f: impl FnOnce() -> i32) -> Outcome {
    // SAFETY: the child only makes system calls (setgroups, setresgid, setresuid, those in `f`,
    // _exit) and touches memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain system calls on values of this process; _exit never returns.
        unsafe {
            let code = if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                250
            } else {
                f()
            };
            libc::_exit(code)
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 250, "could not switch to uid {uid}");
    outcome(code)
}

fn try_unlink(path: &CString) -> i32 {
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::unlink(path.as_ptr()) } == 0 {
        0
    } else {
        denied_or(errno())
    }
}

/// Binds and listens on a unix socket at `addr`: what a VMM would do to take a socket's place.
fn try_listen(addr: &libc::sockaddr_un) -> i32 {
    // SAFETY: socket/bind/listen on a socket this function owns, with a valid address.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if s < 0 {
            return 254;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::bind(s, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
            return denied_or(errno());
        }
        if libc::listen(s, 1) == 0 {
            0
        } else {
            denied_or(errno())
        }
    }
}

/// Connects to a vhost-user socket and asks GET_FEATURES: 0 when the daemon answers, 2 when
/// it closes the connection without answering.
fn try_get_features(addr: &libc::sockaddr_un) -> i32 {
    // GET_FEATURES (1), flags: version 1, no payload.
    let msg: [u32; 3] = [1, 1, 0];
    let mut reply = [0u8; 20];
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: socket calls on a socket this function owns, with buffers that outlive them.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if s < 0 {
            return 254;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(s, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
            return denied_or(errno());
        }
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        // The daemon may already have closed it: EPIPE is the drop, not a failure.
        let w = libc::send(s, msg.as_ptr().cast(), 12, libc::MSG_NOSIGNAL);
        if w < 0 && errno() != libc::EPIPE && errno() != libc::ECONNRESET {
            return denied_or(errno());
        }
        let mut got = 0;
        while got < reply.len() {
            let r = libc::recv(s, reply.as_mut_ptr().add(got).cast(), reply.len() - got, 0);
            if r == 0 || (r < 0 && errno() == libc::ECONNRESET) {
                return 2;
            }
            if r < 0 {
                return if errno() == libc::EAGAIN { 255 } else { 253 };
            }
            got += r as usize;
        }
        // The reply's header: GET_FEATURES, flags version 1 | reply, 8 bytes of payload.
        let code = u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let size = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
        if code == 1 && size == 8 { 0 } else { 252 }
    }
}

/// The shipped tmpfiles entry for the runtime directory: (path, mode, user, group).
fn runtime_dir_entry() -> (String, u32, String, String) {
    let line = TMPFILES
        .lines()
        .find(|l| l.starts_with("d "))
        .expect("a `d` line in the tmpfiles entry");
    let f: Vec<&str> = line.split_whitespace().collect();
    let mode = u32::from_str_radix(f[2], 8).expect("an octal mode");
    (f[1].into(), mode, f[3].into(), f[4].into())
}

struct Cleanup(PathBuf, Option<std::process::Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for(path: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared; daemon log:\n{}",
            path.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root to switch uids: tests/run-all.sh runs it as root"]
fn another_vms_vmm_can_neither_replace_nor_use_this_vms_sockets() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test switches uids: run it as root"
    );
    let (shipped_dir, mode, user, group) = runtime_dir_entry();
    assert_eq!(shipped_dir, "/run/vhost-user-iommu");
    assert_eq!(
        (user.as_str(), group.as_str()),
        ("vhost-user-iommu", "vhost-user-iommu")
    );
    assert!(
        UNIT.contains(&format!("RuntimeDirectoryMode={mode:04o}\n")),
        "the unit's RuntimeDirectoryMode= and the tmpfiles entry ({mode:04o}) disagree"
    );

    let base = std::env::temp_dir().join(format!("viommu-isolation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir(&base).unwrap();
    let mut cleanup = Cleanup(base.clone(), None);
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The binary where every uid can run it (the build tree may be under a private home).
    let exe = base.join("vhost-user-iommu");
    std::fs::copy(BIN, &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The runtime directory as systemd-tmpfiles and the unit make it.
    let run = base.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = run.join("vhost-user-iommu");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(DAEMON), Some(DAEMON)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();

    let sock = dir.join("vmB.sock");
    let ctl = dir.join("vmB.ctl");
    let dev_sock = dir.join("vmB-dev0.sock");
    let config = base.join("vmB.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\ncontrol_socket = \"{}\"\nbackend = \"soft\"\nvmm_uid = {VMM_B}\n\
             [[endpoint]]\nid = 32\n",
            sock.display(),
            ctl.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = base.join("daemon.log");
    let child = Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .arg("-v")
        .uid(DAEMON)
        .gid(DAEMON)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    cleanup.1 = Some(child);
    wait_for(&sock, &log);
    wait_for(&ctl, &log);
    let st = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!((st.uid(), st.gid()), (DAEMON, DAEMON));

    let sock_c = CString::new(sock.as_os_str().as_encoded_bytes()).unwrap();
    let ctl_c = CString::new(ctl.as_os_str().as_encoded_bytes()).unwrap();
    let sock_a = sockaddr(&sock);
    let ctl_a = sockaddr(&ctl);
    let dev_a = sockaddr(&dev_sock);
    let in_group = [DAEMON];

    // Attack (a): take B's socket's place, or one B's daemon has yet to bind.
    assert_eq!(
        as_user(VMM_A, &in_group, || try_unlink(&sock_c)),
        Outcome::Denied,
        "VM A's VMM removed VM B's vhost-user socket"
    );
    assert_eq!(
        as_user(VMM_A, &in_group, || try_unlink(&ctl_c)),
        Outcome::Denied,
        "VM A's VMM removed VM B's control socket"
    );
    assert_eq!(
        as_user(VMM_A, &in_group, || try_listen(&dev_a)),
        Outcome::Denied,
        "VM A's VMM listens where VM B's vfio-user socket goes"
    );
    assert!(sock.exists() && !dev_sock.exists());
    // Attack (b): use B's daemon first.
    assert_eq!(
        as_user(VMM_A, &in_group, || try_get_features(&sock_a)),
        Outcome::Dropped,
        "VM B's daemon answered VM A's VMM"
    );
    // B's control socket (all of B's mappings) is the operator's, not any VMM's.
    assert_eq!(
        as_user(VMM_A, &in_group, || try_get_features(&ctl_a)),
        Outcome::Denied,
        "VM A's VMM reached VM B's control socket"
    );
    // The legitimate VMM still connects and is answered.
    assert_eq!(
        as_user(VMM_B, &in_group, || try_get_features(&sock_a)),
        Outcome::Done,
        "VM B's own VMM was not answered; daemon log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("uid {VMM_A}")) && text.contains("is not the VMM"),
        "the refusal of VM A's VMM is not in the daemon log:\n{text}"
    );
}
