//! `unit --notify PATH --pidfile PATH -- COMMAND [ARGS...]`: runs COMMAND as systemd runs a
//! `Type=notify` unit with `FileDescriptorStoreMax=` and `Restart=on-failure`, as far as the
//! daemon relies on it: COMMAND gets `NOTIFY_SOCKET` (served by `testing::service_manager`,
//! which keeps what it stores), and when it dies of a signal or exits non-zero it is started
//! again 100 ms later with the store at fds 3.. (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`). SIGTERM, SIGINT, SIGHUP and SIGUSR2 go to the running COMMAND; once it exits
//! 0, so does `unit`. The pid of the COMMAND of the moment is in the pidfile. Like systemd's
//! default start limit, more than 5 starts within 10 s end it with a failure.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use vhost_user_iommu::testing::service_manager::ServiceManager;

const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2];

fn usage() -> ExitCode {
    eprintln!("usage: unit --notify PATH --pidfile PATH -- COMMAND [ARGS...]");
    ExitCode::from(2)
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn start(systemd: &ServiceManager, cmd: &[OsString], pidfile: &PathBuf) -> std::io::Result<Child> {
    let passed = systemd.passed()?;
    let n = passed.len();
    let args: Vec<&std::ffi::OsStr> = cmd.iter().map(|a| a.as_os_str()).collect();
    let child = systemd.spawn(&args, passed, |c| {
        use std::os::unix::process::CommandExt;
        // SAFETY: sigprocmask is async-signal-safe; the child unblocks what this process
        // blocked to wait for them.
        unsafe {
            c.pre_exec(|| {
                let set = signal_set();
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    })?;
    std::fs::write(pidfile, format!("{}\n", child.id()))?;
    eprintln!("unit: started pid {} with {n} stored fd(s)", child.id());
    Ok(child)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (mut notify, mut pidfile) = (None, None);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--notify") => notify = args.next().map(PathBuf::from),
            Some("--pidfile") => pidfile = args.next().map(PathBuf::from),
            Some("--") => break,
            _ => return usage(),
        }
    }
    let cmd: Vec<OsString> = args.collect();
    let (Some(notify), Some(pidfile), false) = (notify, pidfile, cmd.is_empty()) else {
        return usage();
    };
    let set = signal_set();
    // SAFETY: blocks the forwarded signals in this (single-threaded so far) process; they are
    // taken with sigtimedwait below.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = std::fs::remove_file(&notify);
    let systemd = match ServiceManager::start(&notify) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("unit: notify socket {}: {e}", notify.display());
            return ExitCode::FAILURE;
        }
    };
    let mut starts = vec![Instant::now()];
    let mut child = match start(&systemd, &cmd, &pidfile) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("unit: cannot start {:?}: {e}", cmd[0]);
            return ExitCode::FAILURE;
        }
    };
    loop {
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        // SAFETY: waits for one of the blocked signals in `set`, writing no siginfo.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        match child.try_wait() {
            Ok(None) => continue,
            Ok(Some(st)) if st.success() => return ExitCode::SUCCESS,
            Ok(Some(st)) => {
                starts.retain(|t| t.elapsed() < Duration::from_secs(10));
                if starts.len() >= 5 {
                    eprintln!(
                        "unit: pid {} ended: {st}; start limit hit, giving up",
                        child.id()
                    );
                    return ExitCode::FAILURE;
                }
                eprintln!("unit: pid {} ended: {st}; restarting in 100 ms", child.id());
                std::thread::sleep(Duration::from_millis(100));
                starts.push(Instant::now());
                if let Err(e) = systemd.sync() {
                    eprintln!("unit: {e}");
                }
                child = match start(&systemd, &cmd, &pidfile) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("unit: cannot restart {:?}: {e}", cmd[0]);
                        return ExitCode::FAILURE;
                    }
                };
            }
            Err(e) => {
                eprintln!("unit: waiting for the child: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}
