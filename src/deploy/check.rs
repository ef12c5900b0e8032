//! `vhost-user-iommu check`: a per-VM config against this host.

use std::fmt;
use std::io;
use std::path::{Component, Path};

use super::udev::config_files;
use super::*;
use crate::config::{BackendKind, VmConfig};
use crate::vfio::{self, PciAddress, SysfsRoot};

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but probably not as intended.
    Warn,
    /// The VM will not work until this is fixed.
    Fail,
    /// Skipped or informational.
    Note,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Note => "NOTE",
        })
    }
}

/// One line of the report: the status and what was checked, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    pub status: Status,
    pub message: String,
}

/// The `check` report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<CheckLine>,
}

impl Report {
    pub(super) fn push(&mut self, status: Status, message: impl Into<String>) {
        self.lines.push(CheckLine {
            status,
            message: message.into(),
        });
    }

    /// No check failed.
    pub fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    pub fn count(&self, status: Status) -> usize {
        self.lines.iter().filter(|l| l.status == status).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{:<4} {}", l.status, l.message)?;
        }
        write!(
            f,
            "{} failed, {} warnings, {} passed",
            self.count(Status::Fail),
            self.count(Status::Warn),
            self.count(Status::Ok)
        )
    }
}

/// The locked-memory budget of a process: RLIMIT_MEMLOCK and whether CAP_IPC_LOCK lifts it
/// (iommufd does not account pinned pages of a CAP_IPC_LOCK holder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memlock {
    /// The soft limit in bytes; `None` is unlimited.
    pub limit: Option<u64>,
    pub cap_ipc_lock: bool,
}

impl Memlock {
    /// This process's budget.
    pub fn current() -> io::Result<Memlock> {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct `r` points to, which is valid and owned here.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let limit = (r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur);
        let status = std::fs::read_to_string("/proc/self/status")?;
        let cap_ipc_lock = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
        Ok(Memlock {
            limit,
            cap_ipc_lock,
        })
    }
}

/// What `check` looks at besides the config file.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Where `sys/` and `dev/` are (default `/`).
    pub root: SysfsRoot,
    /// The VM's RAM in bytes (what iommufd will pin), if known.
    pub ram_size: Option<u64>,
    /// The locked-memory budget to check against; `None`: this process's.
    pub memlock: Option<Memlock>,
}

/// Parses a size like QEMU's `-m`: bytes, or a number with K, M, G or T (binary units,
/// optionally followed by "iB" or "B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(|b| b.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4G, 8192M)"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn human(bytes: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    if bytes >= G && bytes.is_multiple_of(G) {
        format!("{}G", bytes / G)
    } else if bytes >= M && bytes.is_multiple_of(M) {
        format!("{}M", bytes / M)
    } else {
        format!("{bytes} bytes")
    }
}

/// Checks the per-VM config at `path` and the host it will run on.
pub fn check(path: &Path, opts: &CheckOptions) -> Report {
    let mut r = Report::default();
    let cfg = match VmConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            r.push(Status::Fail, format!("config: {e}"));
            return r;
        }
    };
    r.push(
        Status::Ok,
        format!(
            "config {} parses (backend {}, {} endpoints)",
            path.display(),
            format!("{:?}", cfg.backend).to_lowercase(),
            cfg.endpoints.len()
        ),
    );
    let vm = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if valid_vm_name(&vm) {
        r.push(
            Status::Ok,
            format!("VM name {vm:?}: the unit is {}", unit_for(&vm)),
        );
    } else {
        r.push(
            Status::Warn,
            format!(
                "VM name {vm:?} cannot be a systemd instance name: rename the file to use only letters, digits, '_', '-', '.', ':' (udev will not start a unit for it)"
            ),
        );
    }
    check_socket(&mut r, &cfg, &vm);
    check_socket_owners(&mut r, &cfg, path, &vm);

    let host_devices: Vec<_> = cfg.endpoints.iter().filter(|e| e.pci.is_some()).collect();
    let iommufd = match cfg.backend {
        BackendKind::Soft => {
            r.push(
                Status::Note,
                "backend soft: iommufd, VFIO device and locked-memory checks skipped (no host device DMA is translated)",
            );
            false
        }
        BackendKind::Auto if host_devices.is_empty() => {
            r.push(
                Status::Note,
                "backend auto with no endpoint naming a host `pci` device: the daemon uses the soft backend; iommufd checks skipped",
            );
            false
        }
        BackendKind::Iommufd | BackendKind::Auto => true,
    };
    if iommufd {
        check_iommufd(&mut r, &cfg, opts);
        check_endpoints(&mut r, &cfg, path, &vm, opts);
        check_memlock(&mut r, opts);
    }
    r
}

fn check_socket(r: &mut Report, cfg: &VmConfig, vm: &str) {
    if cfg.socket.is_none() {
        r.push(
            Status::Warn,
            format!(
                "no `socket` in the config: the unit runs `--config` only; set socket = \"{RUNTIME_DIR}/{vm}.sock\" (or pass --fd from a socket unit)"
            ),
        );
    }
    if cfg.vmm_uid.is_none() && cfg.vmm_gid.is_none() {
        r.push(
            Status::Warn,
            "no `vmm_uid` or `vmm_gid`: any process that can reach the vhost-user and vfio-user sockets may drive this VM's IOMMU and use its devices (another VM's QEMU in the same group too); set the uid QEMU runs as for this VM".to_string(),
        );
    }
    for (what, s) in cfg.socket_paths() {
        if s.components().any(|c| c == Component::ParentDir) {
            r.push(
                Status::Fail,
                format!(
                    "{what} {} has a `..` component: refused, it may lead out of {RUNTIME_DIR}; write the path without `..`",
                    s.display()
                ),
            );
        } else if !s.starts_with(RUNTIME_DIR) {
            r.push(
                Status::Warn,
                format!(
                    "{what} {} is outside {RUNTIME_DIR}: under the unit (ProtectSystem=strict) the daemon can only create it there; move it or add ReadWritePaths= in a drop-in",
                    s.display()
                ),
            );
        } else if cfg.socket.is_some() && what == "vhost-user socket" {
            r.push(Status::Ok, format!("vhost-user socket {}", s.display()));
        }
        if let Some(why) = s.parent().and_then(crate::listen::unsafe_directory) {
            r.push(Status::Fail, format!("{what} {}: {why}", s.display()));
        }
    }
}

/// Two daemons cannot listen on one path: the second is refused at start. Fails for each
/// socket of this VM that another config in the same directory also names; warns when another
/// config admits the same VMM credentials (the peer check cannot separate those VMs).
fn check_socket_owners(r: &mut Report, cfg: &VmConfig, path: &Path, vm: &str) {
    let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return;
    };
    let Ok(files) = config_files(dir) else {
        return;
    };
    let others: Vec<(String, VmConfig)> = files
        .into_iter()
        .filter(|(other, _)| other != vm)
        .filter_map(|(other, p)| Some((other, VmConfig::load(&p).ok()?)))
        .collect();
    let same_vmm: Vec<&str> = others
        .iter()
        .filter(|(_, c)| {
            (cfg.vmm_uid.is_some() || cfg.vmm_gid.is_some())
                && (c.vmm_uid, c.vmm_gid) == (cfg.vmm_uid, cfg.vmm_gid)
        })
        .map(|(v, _)| v.as_str())
        .collect();
    if !same_vmm.is_empty() {
        r.push(
            Status::Warn,
            format!(
                "VM(s) {} in {} admit the same VMM credentials (vmm_uid/vmm_gid): their daemons cannot tell the VMMs apart, so one VM's QEMU may connect to the other's daemon first; run each VM's QEMU as its own uid (libvirt: <seclabel type='static' model='dac'>) and name it in vmm_uid",
                same_vmm.join(", "),
                dir.display()
            ),
        );
    }
    for (what, s) in cfg.socket_paths() {
        let users: Vec<&str> = others
            .iter()
            .filter(|(_, c)| c.socket_paths().iter().any(|(_, p)| *p == s))
            .map(|(v, _)| v.as_str())
            .collect();
        if !users.is_empty() {
            r.push(
                Status::Fail,
                format!(
                    "{what} {} is also used by VM(s) {} in {}: only one daemon can listen on it; give each VM its own path",
                    s.display(),
                    users.join(", "),
                    dir.display()
                ),
            );
        }
    }
}

fn check_iommufd(r: &mut Report, cfg: &VmConfig, opts: &CheckOptions) {
    let node = opts.root.iommufd_node();
    if node.exists() {
        r.push(Status::Ok, format!("iommufd: {} exists", node.display()));
        return;
    }
    let what = format!(
        "iommufd: {} does not exist: `modprobe iommufd` (kernel needs CONFIG_IOMMUFD=y/m, Linux 6.2 or later)",
        node.display()
    );
    if cfg.backend == BackendKind::Auto {
        r.push(
            Status::Warn,
            format!(
                "{what}; backend auto falls back to soft: assigned devices get no DMA translation"
            ),
        );
    } else {
        r.push(Status::Fail, what);
    }
}

fn check_endpoints(r: &mut Report, cfg: &VmConfig, path: &Path, vm: &str, opts: &CheckOptions) {
    let root = &opts.root;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    for e in &cfg.endpoints {
        let Some(pci) = &e.pci else {
            r.push(
                Status::Warn,
                format!(
                    "endpoint {}: no host `pci` device: nothing is translated for it by iommufd",
                    e.id
                ),
            );
            continue;
        };
        let tag = format!("endpoint {} ({pci})", e.id);
        let addr: PciAddress = match pci.parse() {
            Ok(a) => a,
            Err(err) => {
                r.push(Status::Fail, format!("{tag}: {err}"));
                continue;
            }
        };
        if let Err(err) = vfio::device_dir(root, addr) {
            r.push(Status::Fail, format!("{tag}: {err}"));
            continue;
        }
        let driver = match vfio::require_vfio_driver(root, addr) {
            Ok(d) => {
                r.push(Status::Ok, format!("{tag}: bound to {d}"));
                Some(d)
            }
            Err(err) => {
                r.push(Status::Fail, format!("{tag}: {err}"));
                None
            }
        };
        match vfio::require_viable_group(root, addr) {
            Ok(g) => r.push(
                Status::Ok,
                format!(
                    "{tag}: IOMMU group {} is viable ({} devices: {})",
                    g.id,
                    g.members.len(),
                    g.members
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Err(err) => r.push(Status::Fail, format!("{tag}: {err}")),
        }
        if let Some(d) = driver {
            match vfio::vfio_cdev(root, addr, &d) {
                Ok(c) => r.push(
                    Status::Ok,
                    format!("{tag}: VFIO cdev {} ({})", c.node.display(), c.name),
                ),
                Err(err) => r.push(Status::Fail, format!("{tag}: {err}")),
            }
        }
        if e.vfio_user_socket.is_none() {
            r.push(
                Status::Warn,
                format!(
                    "{tag}: no `vfio_user_socket`: the VMM has no way to reach the device; set it (e.g. \"{RUNTIME_DIR}/{vm}-{}.sock\")",
                    e.id
                ),
            );
        }
        if let Some(dir) = dir
            && let Ok(l) = vms_using(dir, addr)
        {
            let others: Vec<&String> = l.vms.iter().filter(|v| *v != vm).collect();
            if !others.is_empty() {
                r.push(
                    Status::Warn,
                    format!(
                        "{tag}: also listed by VM(s) {} in {}: udev starts every such unit, but only one can hold the device; do not run them at the same time",
                        others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        dir.display()
                    ),
                );
            }
        }
    }
}

fn check_memlock(r: &mut Report, opts: &CheckOptions) {
    let Some(ram) = opts.ram_size else {
        r.push(
            Status::Note,
            "locked memory: give --ram-size (the VM's RAM) to check RLIMIT_MEMLOCK; the unit sets LimitMEMLOCK=infinity",
        );
        return;
    };
    let m = match opts.memlock.map(Ok).unwrap_or_else(Memlock::current) {
        Ok(m) => m,
        Err(e) => {
            r.push(
                Status::Fail,
                format!("locked memory: cannot read RLIMIT_MEMLOCK: {e}"),
            );
            return;
        }
    };
    match m.limit {
        _ if m.cap_ipc_lock => r.push(
            Status::Ok,
            format!("locked memory: CAP_IPC_LOCK is held, {} of RAM can be pinned", human(ram)),
        ),
        None => r.push(Status::Ok, "locked memory: RLIMIT_MEMLOCK is unlimited"),
        Some(l) if l >= ram => r.push(
            Status::Ok,
            format!(
                "locked memory: RLIMIT_MEMLOCK {} covers the VM's {}",
                human(l),
                human(ram)
            ),
        ),
        Some(l) => r.push(
            Status::Fail,
            format!(
                "locked memory: RLIMIT_MEMLOCK is {} but the VM's RAM is {}: iommufd pins all of it; the unit sets LimitMEMLOCK=infinity, by hand run `ulimit -l unlimited` (or `prlimit --memlock=unlimited --pid PID`); this checks the limit of the `check` process itself",
                human(l),
                human(ram)
            ),
        ),
    }
}
