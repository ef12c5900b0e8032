//! Executing the next binary in this process's place with the state (`exec`), and the way
//! back to the previous one (`Rollback`).

use super::*;

/// Executes `exe` with `args` (the daemon's own, without a previous [`RESUME_ARG`]) in place
/// of this process, handing it `state` and keeping every fd `state` names open.
/// Returns only if that failed; the fds are then as they were and this process goes on.
pub fn exec(exe: &Path, args: &[OsString], state: &UpgradeState) -> UpgradeError {
    let keep = state.fds();
    match try_exec(exe, args, state, &keep) {
        Ok(never) => match never {},
        Err(e) => {
            for &fd in &keep {
                let _ = set_cloexec(fd, true);
            }
            e
        }
    }
}

fn try_exec(
    exe: &Path,
    args: &[OsString],
    state: &UpgradeState,
    keep: &[RawFd],
) -> Result<std::convert::Infallible, UpgradeError> {
    preflight(exe, state.version)?;
    let memfd = state_memfd(state)?;
    for &fd in keep.iter().chain([&memfd.as_raw_fd()]) {
        set_cloexec(fd, false).map_err(|source| UpgradeError::Keep { fd, source })?;
    }
    let exec_error = |source| UpgradeError::Exec {
        exe: exe.display().to_string(),
        source,
    };
    let argv = resume_argv(exe, args, memfd.as_raw_fd()).map_err(exec_error)?;
    let env = environment();
    let (ptrs, envp) = (null_terminated(&argv), null_terminated(&env));
    log::info!(
        "upgrading: executing {} with the live connection's state in fd {}",
        exe.display(),
        memfd.as_raw_fd()
    );
    // SAFETY: the path (`argv[0]`) and every argv and envp entry are NUL-terminated strings
    // that outlive the call, and `ptrs` and `envp` end with a null pointer.
    unsafe { libc::execve(argv[0].as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    let e = std::io::Error::last_os_error();
    let _ = set_cloexec(memfd.as_raw_fd(), true);
    Err(exec_error(e))
}

/// `exe` with `args` (less a previous [`RESUME_ARG`]) and `RESUME_ARG memfd`.
fn resume_argv(exe: &Path, args: &[OsString], memfd: RawFd) -> std::io::Result<Vec<CString>> {
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let mut argv: Vec<CString> = vec![c(exe.as_os_str().as_bytes())?];
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a.as_bytes() == RESUME_ARG.as_bytes() {
            skip = true;
            continue;
        }
        argv.push(c(a.as_bytes())?);
    }
    argv.push(c(RESUME_ARG.as_bytes())?);
    argv.push(c(memfd.to_string().as_bytes())?);
    Ok(argv)
}

/// The pointer array `execve` takes for `strings`: valid while `strings` lives.
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect()
}

/// This process's environment for the next binary, less [`ROLLED_BACK`] (a daemon that went
/// back is an ordinary one for its next upgrade).
fn environment() -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| k.as_bytes() != ROLLED_BACK.as_bytes())
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect()
}

/// Where this daemon's binary is on disk: the path it was started from, which an upgrade
/// executes (a package replaces the file there). Linux names a replaced file
/// `PATH (deleted)` in `/proc/self/exe`: that is still the path the next binary is at.
pub fn binary_path() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(path) => std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        None => exe,
    })
}

/// This process's executable, opened (close-on-exec), to hand to the next binary as its way
/// back ([`UpgradeState::rollback_exe_fd`]).
pub fn own_executable() -> std::io::Result<OwnedFd> {
    Ok(OwnedFd::from(std::fs::File::open("/proc/self/exe")?))
}

/// The way back to the previous binary, for a new binary that accepted a handed-over state and
/// then cannot rebuild it: copies of every fd the state names (taken before anything could
/// close them) and the state itself. [`Rollback::exec`] puts the fds back at their numbers and
/// executes the previous binary (opened by it before the upgrade, so a package that replaced
/// the file on disk does not matter) with the same state, which it reads as its own.
pub struct Rollback {
    state: Vec<u8>,
    reserves: Vec<(RawFd, OwnedFd)>,
    /// The executable's fd at the number the state names (executed from there once the fds are
    /// back); closed with the rollback once the new binary serves (it would keep the previous
    /// binary's file alive).
    exe: OwnedFd,
}

impl Rollback {
    /// `None` when the previous binary left no way back, or when this process is itself the
    /// previous binary gone back to (it does not go back again). Takes the executable's fd.
    pub fn prepare(state: &UpgradeState, bytes: Vec<u8>) -> Result<Option<Rollback>, UpgradeError> {
        let Some(exe) = state.rollback_exe_fd else {
            return Ok(None);
        };
        // SAFETY: the state names this fd for this process alone, and nothing else takes it.
        let exe = unsafe { OwnedFd::from_raw_fd(exe) };
        if std::env::var_os(ROLLED_BACK).is_some() {
            return Ok(None);
        }
        let reserve = |fd: RawFd| {
            // SAFETY: F_DUPFD_CLOEXEC only duplicates `fd` (named by the state, open) onto a
            // new number; the result is checked.
            let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if r < 0 {
                return Err(UpgradeError::Keep {
                    fd,
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: `r` was just created and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(r) })
        };
        // Every fd the state names goes back to its number, the executable's included (the
        // previous binary reads the same state).
        let mut reserves = Vec::new();
        for fd in state.fds() {
            reserves.push((fd, reserve(fd)?));
        }
        Ok(Some(Rollback {
            state: bytes,
            reserves,
            exe,
        }))
    }

    /// Goes back to the previous binary with the state it handed over; returns only if that
    /// failed.
    pub fn exec(self, args: &[OsString]) -> UpgradeError {
        let exec_error = |source| UpgradeError::Exec {
            exe: "the previous binary".into(),
            source,
        };
        for (fd, r) in &self.reserves {
            // SAFETY: dup2 puts the reserved copy back at the number the state names (closing
            // whatever this process has there now); the new fd has no close-on-exec flag.
            if unsafe { libc::dup2(r.as_raw_fd(), *fd) } < 0 {
                return UpgradeError::Keep {
                    fd: *fd,
                    source: std::io::Error::last_os_error(),
                };
            }
        }
        let memfd = match write_memfd(&self.state) {
            Ok(m) => m,
            Err(e) => return e,
        };
        if let Err(source) = set_cloexec(memfd.as_raw_fd(), false) {
            return UpgradeError::Keep {
                fd: memfd.as_raw_fd(),
                source,
            };
        }
        let exe = binary_path().unwrap_or_else(|_| "vhost-user-iommu".into());
        let argv = match resume_argv(&exe, args, memfd.as_raw_fd()) {
            Ok(a) => a,
            Err(e) => return exec_error(e),
        };
        let mut env = environment();
        env.push(CString::new(format!("{ROLLED_BACK}=1")).expect("no NUL"));
        let (argp, envp) = (null_terminated(&argv), null_terminated(&env));
        // SAFETY: `exe` is the previous binary, open at the number the state names (put back
        // above); argv and envp are NUL-terminated strings that outlive the call, each array
        // ends with a null pointer.
        unsafe { libc::fexecve(self.exe.as_raw_fd(), argp.as_ptr(), envp.as_ptr()) };
        exec_error(std::io::Error::last_os_error())
    }
}

pub(super) fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and change the descriptor flags of `fd`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
