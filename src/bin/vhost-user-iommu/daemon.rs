//! The daemon: serving one VM (the default command), its upgrade in place and `--demo`.

use std::cell::RefCell;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use clap::Args;
use log::{error, info, warn};
use vhost::vhost_user::Listener;

use crate::restart::{Restart, keep_for_restart, take_back_kept};
use vhost_user_iommu::assembly::{
    Backend, VfioUserFronts, adopt_backend, hand_over_vfio_user, open_backend, resume_vfio_user,
    start_vfio_user,
};
use vhost_user_iommu::boot_ram::Follower;
use vhost_user_iommu::config::{BackendKind, VmConfig};
use vhost_user_iommu::control::{self, CurrentDevice};
use vhost_user_iommu::domains::Rules;
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::recovery::Keeper;
use vhost_user_iommu::server::{
    OnConnect, Outcome, Resume, Stopper, Upgrade, handle_signals, serve_until,
};
use vhost_user_iommu::upgrade::{self, UpgradeState};
use vhost_user_iommu::vfio_user;
use vhost_user_iommu::vhost::DeviceSettings;

/// Endpoints served when neither a config file nor --endpoint names any.
const DEFAULT_ENDPOINTS: std::ops::RangeInclusive<u32> = 0..=15;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Listen for the VMM on this unix socket path (created; a stale file is replaced).
    #[arg(long, conflicts_with = "fd")]
    socket_path: Option<PathBuf>,
    /// Use this inherited, already listening socket fd (socket activation).
    #[arg(long)]
    fd: Option<i32>,
    /// Per-VM configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Executor threads; 0 executes requests in the vring thread (inline).
    #[arg(long)]
    threads: Option<usize>,
    /// Translation backend.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// After answering, keep watching the request ring this many microseconds for the next
    /// request before sleeping until a kick (0 disables polling; at most 1000000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=vhost_user_iommu::config::MAX_POLL_US))]
    poll_us: Option<u64>,
    /// After an assigned device's interrupt, poll the request ring for the guest's answer
    /// (config `poll_after_irq`; default off).
    #[arg(long)]
    poll_after_irq: bool,
    /// Serve this endpoint id (repeatable); overrides the config file's endpoint ids.
    #[arg(long = "endpoint")]
    endpoints: Vec<u32>,
    /// Unattached endpoints start in bypass (identity) mode.
    #[arg(long)]
    boot_bypass: bool,
    /// Serve a read-only control socket here (`state` as JSON, `metrics` in Prometheus format);
    /// overrides `control_socket` in the config.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Print the backend capabilities as JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// Write a request trace here: one JSON line per guest request and per vhost-user message
    /// (see `trace` in the docs); the file is rotated to FILE.1 at --trace-max-mb.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// The size at which the trace file is rotated (MiB).
    #[arg(long, default_value_t = 64)]
    trace_max_mb: u64,
    /// Also run the test kit's simulated VMM and guest against this daemon, with a line a
    /// second of what it served (a first run without a VM; builds with `--features test-utils`).
    #[arg(long)]
    demo: bool,
    /// Print the handover state versions this binary reads and exit (asked by a running daemon
    /// before it upgrades to this binary; not for people).
    #[arg(long = "upgrade-state-versions", hide = true)]
    upgrade_state_versions: bool,
    /// Resume from the state a previous daemon handed over in this fd (set by the daemon itself
    /// when it upgrades on SIGUSR2; not for people).
    #[arg(long = "resume-state-fd", hide = true)]
    resume_state_fd: Option<i32>,
}

/// Endpoint ids as ranges: `0..=15`, `1, 3, 5..=7`.
fn endpoint_list(eps: &[EndpointId]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < eps.len() {
        let mut j = i;
        while j + 1 < eps.len() && eps[j + 1].0 == eps[j].0 + 1 {
            j += 1;
        }
        out.push(if j > i + 1 {
            format!("{}..={}", eps[i].0, eps[j].0)
        } else if j == i + 1 {
            format!("{}, {}", eps[i].0, eps[j].0)
        } else {
            eps[i].0.to_string()
        });
        i = j + 1;
    }
    out.join(", ")
}

/// `--demo`: the test kit's guest drives the daemon through its socket path.
#[cfg(feature = "test-utils")]
fn start_demo(listening: &str) -> Result<(), String> {
    let path = PathBuf::from(listening);
    if !path.is_absolute() {
        return Err("--demo needs --socket-path (or socket in the config)".into());
    }
    std::thread::Builder::new()
        .name("demo-guest".into())
        .spawn(move || vhost_user_iommu::bench::demo::run(&path))
        .map(drop)
        .map_err(|e| format!("cannot start the demo guest: {e}"))
}

#[cfg(not(feature = "test-utils"))]
fn start_demo(_: &str) -> Result<(), String> {
    Err("this build has no demo guest (it is part of the test kit): run `cargo run --release --features test-utils -- --socket-path /tmp/viommu.sock --demo`".into())
}

/// Hands the live state to a new copy of the binary at `exe` (which replaces this process):
/// the vhost-user connection `u`, every vfio-user server and the iommufd backend's kernel
/// objects. If that fails, everything goes on serving here, and what the vhost-user side needs
/// to go on comes back.
#[allow(clippy::too_many_arguments)]
fn upgrade_to(
    exe: &std::path::Path,
    args: &[std::ffi::OsString],
    config: Option<&str>,
    metrics: &Metrics,
    u: Upgrade,
    backend: &Backend,
    vfio_stop: &vfio_user::StopSignal,
    fronts: &mut VfioUserFronts,
    keeper: Option<&Arc<Keeper>>,
) -> (Listener, Option<Resume>) {
    use std::os::fd::AsRawFd;
    let resume_here = |c: Option<vhost_user_iommu::server::LiveConnection>| {
        c.map(|c| Resume::Device {
            dev: c.dev,
            stream: c.stream,
            handed: c.handed,
        })
    };
    let handed = match hand_over_vfio_user(vfio_stop, fronts) {
        Ok(h) => h,
        Err(e) => {
            error!("upgrade refused: {e}; this daemon goes on serving");
            return (u.listener, resume_here(u.connection));
        }
    };
    let connection = u.connection.as_ref().map(|c| upgrade::LiveConnection {
        socket_fd: c.stream.as_raw_fd(),
        state: c.handed.state.clone(),
        fds: c.handed.fds.iter().map(|f| f.as_raw_fd()).collect(),
        device: c.device.clone(),
        kept: c.handed.kept.clone(),
    });
    let mut state = UpgradeState::new(
        u.listener.as_raw_fd(),
        connection,
        metrics.export(),
        backend.iommufd.as_ref().map(|b| b.hand_over()),
        handed
            .iter()
            .map(|(ep, h)| upgrade::VfioUserServer::describe(ep.0, h))
            .collect(),
    );
    state.config = config.map(str::to_owned);
    state.keeper = keeper.map(|k| k.hand_over());
    // The way back, should the new binary fail to rebuild the state.
    let own = upgrade::own_executable()
        .map_err(|e| warn!("upgrade: no way back to this binary: cannot open it: {e}"))
        .ok();
    state.rollback_exe_fd = own.as_ref().map(|f| f.as_raw_fd());
    let e = upgrade::exec(exe, args, &state);
    drop(own);
    error!("upgrade failed: {e}; this daemon goes on serving");
    resume_vfio_user(vfio_stop, fronts, handed);
    (u.listener, resume_here(u.connection))
}

pub(crate) fn run(a: ServeArgs) -> Result<(), String> {
    if a.upgrade_state_versions {
        println!("{}", upgrade::versions_line());
        return Ok(());
    }
    if a.print_capabilities {
        println!("{{\n  \"type\": \"iommu\",\n  \"features\": []\n}}");
        return Ok(());
    }
    // A VMM that truncates guest RAM under the daemon ends its connection, not the daemon.
    vhost_user_iommu::sigbus::install()
        .map_err(|e| format!("cannot install the SIGBUS handler: {e}"))?;
    let (store, kept) = take_back_kept(a.fd, a.resume_state_fd.is_some())?;
    // A previous daemon's state, when this one is its upgrade, and the way back to it.
    let (resumed, rollback) = match a.resume_state_fd {
        Some(fd) => {
            let (state, bytes) =
                upgrade::read_state(fd).map_err(|e| format!("cannot resume: {e}"))?;
            let rollback = upgrade::Rollback::prepare(&state, bytes)
                .map_err(|e| format!("cannot resume: {e}"))?;
            (Some(state), rollback)
        }
        None => (None, None),
    };
    let (resumed, recovery, keeper) = match (resumed, kept) {
        (Some(r), _) => (Some(r), None, None),
        (None, Some(k)) => (Some(k.state), Some(k.recovery), Some(k.keeper)),
        (None, None) => (None, None, None),
    };
    let rollback = Rc::new(RefCell::new(rollback));
    // From here until the handed-over connection is rebuilt, a failure goes back to the
    // previous binary where it left a way back.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let go_back = {
        let (rollback, args) = (rollback.clone(), args.clone());
        move |why: String| -> String {
            match rollback.borrow_mut().take() {
                Some(r) => {
                    error!(
                        "cannot resume the handed-over state ({why}): going back to the previous binary"
                    );
                    let e = r.exec(&args);
                    format!("{why}; going back to the previous binary failed: {e}")
                }
                None => why,
            }
        }
    };
    let restart = Restart {
        store,
        recovery,
        keeper,
    };
    run_resumed(a, resumed, restart, rollback, args).map_err(go_back)
}

/// `run` once it knows whether it resumes a previous daemon's state.
fn run_resumed(
    a: ServeArgs,
    resumed: Option<UpgradeState>,
    restart: Restart,
    rollback: Rc<RefCell<Option<upgrade::Rollback>>>,
    args: Vec<std::ffi::OsString>,
) -> Result<(), String> {
    // The configuration: the file's; when resuming, the one the running daemon read at its start
    // (a changed file takes effect at the next start, as with SIGHUP).
    let config_text = match (resumed.as_ref().and_then(|r| r.config.clone()), &a.config) {
        (Some(text), _) => Some(text),
        (None, Some(p)) => Some(
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        ),
        (None, None) => None,
    };
    let cfg = match (&config_text, &a.config) {
        (Some(text), p) => VmConfig::parse(
            text,
            p.as_deref()
                .unwrap_or(std::path::Path::new("<handed over>")),
        )
        .map_err(|e| e.to_string())?,
        (None, _) => {
            VmConfig::parse("", std::path::Path::new("<defaults>")).map_err(|e| e.to_string())?
        }
    };
    let mut endpoints: Vec<EndpointId> = if !a.endpoints.is_empty() {
        a.endpoints.iter().map(|&e| EndpointId(e)).collect()
    } else if !cfg.endpoints.is_empty() {
        cfg.endpoints.iter().map(|e| EndpointId(e.id)).collect()
    } else {
        info!("no endpoints configured: serving endpoints 0..=15");
        DEFAULT_ENDPOINTS.map(EndpointId).collect()
    };
    endpoints.sort_unstable();
    endpoints.dedup();
    // Removes the vhost-user socket file at exit, as long as it is still ours.
    let mut _socket_file = None;
    // The listener, and where a VMM connects (for the start-up line).
    let socket_path = a.socket_path.as_ref().or(cfg.socket.as_ref());
    let (listener, listening) = match (resumed.as_ref(), a.fd, socket_path) {
        (Some(r), _, path) => {
            let fd = r.listener_fd;
            if let Some(p) = path {
                _socket_file = Some(vhost_user_iommu::listen::SocketFile::new(p));
            }
            // SAFETY: the previous daemon handed this listening socket over to this process
            // alone (the upgrade state names it).
            let l = unsafe { Listener::from_raw_fd(fd) };
            (l, format!("the socket handed over as fd {fd}"))
        }
        (None, Some(fd), _) => {
            // SAFETY: fstat on an arbitrary integer is harmless; it tells whether `fd` is open.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `st` is a valid out pointer.
            if fd < 0
                || unsafe { libc::fstat(fd, &mut st) } != 0
                || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
            {
                return Err(format!("--fd {fd} is not an open socket"));
            }
            // SAFETY: the fd was checked to be an open socket and is handed to us by the caller
            // for our exclusive use (socket activation).
            let l = unsafe { Listener::from_raw_fd(fd) };
            (l, format!("the socket passed as fd {fd}"))
        }
        (None, None, Some(p)) => {
            let l = vhost_user_iommu::listen::bind(p)
                .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
            _socket_file = Some(vhost_user_iommu::listen::SocketFile::new(p));
            (Listener::from(l), p.display().to_string())
        }
        (None, None, None) => {
            return Err("give --socket-path PATH, --fd N, or socket in the config".into());
        }
    };
    let boot_bypass = a.boot_bypass || cfg.boot_bypass;
    let mut resumed = resumed;
    let backend = match resumed.as_mut().and_then(|r| r.iommufd.take()) {
        // SAFETY: the previous daemon handed these fds over to this process alone (the upgrade
        // state names them), and nothing else here takes them.
        Some(h) => unsafe { adopt_backend(h) }?,
        None => open_backend(
            a.backend.unwrap_or(cfg.backend),
            &cfg,
            &a.endpoints,
            &endpoints,
            boot_bypass,
        )?,
    };
    let keeper = keep_for_restart(
        restart.keeper,
        &mut resumed,
        restart.store,
        &backend,
        &listener,
    )?;
    let mut recovery = restart.recovery;
    let handed_servers: std::collections::BTreeMap<EndpointId, _> = resumed
        .as_mut()
        .map(|r| std::mem::take(&mut r.vfio_user))
        .unwrap_or_default()
        .into_iter()
        // SAFETY: as above: the upgrade state names these fds for this process alone.
        .map(|v| (EndpointId(v.endpoint), unsafe { v.into_resumed() }))
        .collect();
    let c = backend.dyn_backend.constraints();
    let [d0, d1] = cfg.domain_range.unwrap_or([0, u32::MAX]);
    let rules = Rules::for_host(&c, (d0, d1), cfg.limits(), cfg.probe_size.unwrap_or(512))
        .with_ram_caps(cfg.ram_caps());
    let threads = a.threads.or(cfg.threads).unwrap_or(0);
    let mode = if threads == 0 {
        Mode::Inline
    } else {
        Mode::Pipeline(threads)
    };
    // Off unless --trace: the control socket may start it later.
    let trace = Arc::new(match &a.trace {
        Some(p) => vhost_user_iommu::trace::Tracer::open(p, a.trace_max_mb << 20)
            .map_err(|e| format!("cannot write the trace {}: {e}", p.display()))?,
        None => vhost_user_iommu::trace::Tracer::off(),
    });
    let irq_watch = (a.poll_after_irq || cfg.poll_after_irq.unwrap_or(false))
        .then(vhost_user_iommu::irq_watch::IrqWatch::new)
        .transpose()
        .map_err(|e| format!("cannot create the interrupt watch: {e}"))?
        .map(Arc::new);
    let settings = DeviceSettings {
        endpoints,
        boot_bypass,
        rules,
        mode,
        poll: a
            .poll_us
            .or(cfg.poll_us)
            .map(std::time::Duration::from_micros)
            .unwrap_or(vhost_user_iommu::vhost::DEFAULT_POLL),
        vmm: vhost_user_iommu::peer::PeerPolicy {
            uid: cfg.vmm_uid,
            gid: cfg.vmm_gid,
        },
        trace: Some(trace.clone()),
        keeper: keeper.clone(),
        irq_watch: irq_watch.clone(),
    };
    let stopper = Arc::new(Stopper::new().map_err(|e| format!("cannot create an eventfd: {e}"))?);
    // Where the next binary is (the path, which a package upgrade points at the new file).
    let exe = upgrade::binary_path().map_err(|e| format!("cannot find this binary: {e}"))?;
    handle_signals(stopper.clone()).map_err(|e| format!("cannot install signal handling: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    if let Some(r) = &resumed
        && let Err(e) = metrics.import(&r.counters)
    {
        warn!("the previous daemon's counters are lost: {e}");
    }
    let current: CurrentDevice = Arc::default();
    if let Some(p) = a.control_socket.as_ref().or(cfg.control_socket.as_ref()) {
        control::spawn(
            p,
            current.clone(),
            metrics.clone(),
            backend.iommufd.clone(),
            trace.clone(),
        )
        .map_err(|e| format!("cannot serve the control socket {}: {e}", p.display()))?;
    }
    let vfio_stop =
        vfio_user::StopSignal::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
    // With boot bypass, firmware DMA needs guest RAM before the memory table: the vfio-user
    // clients' DMA maps describe it (see `boot_ram`).
    let boot = boot_bypass
        .then(|| Follower::start(current.clone()).map(Arc::new))
        .transpose()
        .map_err(|e| format!("cannot start the boot-RAM thread: {e}"))?;
    // The vfio-user servers handed over serve once the vhost-user side is rebuilt.
    let mut gates = Vec::new();
    let mut fronts = start_vfio_user(
        &cfg,
        &backend,
        &current,
        vhost_user_iommu::assembly::FrontShared {
            stop: &vfio_stop,
            boot: boot.as_ref(),
            trace: &trace,
            keeper: keeper.as_ref(),
            irq_watch: irq_watch.as_ref(),
        },
        handed_servers,
        &mut gates,
    )?;
    let gates = Rc::new(RefCell::new(gates));
    // `true`: serve; `false`: end without serving (the state was not rebuilt).
    let open_gates = {
        let gates = gates.clone();
        move |serve: bool| {
            for g in gates.borrow_mut().drain(..) {
                if serve {
                    let _ = g.send(());
                }
            }
        }
    };
    if let Some(b) = &backend.iommufd {
        // Host unbind of a device → detach, close, serve the rest; rebind → serve it again.
        vhost_user_iommu::hotplug::watch(b, current.clone(), fronts.slots.clone(), keeper.clone())
            .map_err(|e| format!("cannot start the hot-plug watcher: {e}"))?;
    }
    // Every socket listens: systemd (Type=notify) may start the VM now.
    if let Err(e) = vhost_user_iommu::deploy::notify_ready() {
        warn!("cannot notify systemd: {e}");
    }
    info!(
        "serving virtio-iommu on {listening} ({} backend, endpoints {}, {mode:?}); a VMM connects \
         with -chardev socket,id=viommu,path=... -device vhost-user-test-device-pci,chardev=viommu,\
         virtio-id=23,num_vqs=2,vq_size=256,config_size=40 (README: Using it with QEMU)",
        backend.dyn_backend.name(),
        endpoint_list(&settings.endpoints)
    );
    if a.demo {
        start_demo(&listening)?;
    }
    let hook: OnConnect = Box::new(move |d| {
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        if let Some(boot) = &boot {
            boot.device_connected();
        }
    });
    let mut listener = listener;
    let mut resume = resumed.and_then(|r| r.connection).map(|c| {
        // SAFETY: the previous daemon handed these fds over to this process alone (the upgrade
        // state names them); each is taken once.
        let (stream, fds) = unsafe {
            (
                std::os::unix::net::UnixStream::from_raw_fd(c.socket_fd),
                c.fds
                    .iter()
                    .map(|&fd| std::os::fd::OwnedFd::from_raw_fd(fd))
                    .collect(),
            )
        };
        Resume::State {
            stream,
            handed: vhost_user_iommu::vhost::HandedOver {
                state: c.state,
                fds,
                kept: c.kept,
            },
            device: c.device,
            recovery: recovery.take(),
            on_rebuilt: {
                let (rollback, args, open_gates) =
                    (rollback.clone(), args.clone(), open_gates.clone());
                Box::new(move |outcome: Result<(), &str>| {
                    // Rebuilt: this binary serves from here on, no way back any more.
                    let way_back = rollback.borrow_mut().take();
                    let Err(why) = outcome else {
                        open_gates(true);
                        return;
                    };
                    if let Some(r) = way_back {
                        error!(
                            "cannot rebuild the handed-over state ({why}): going back to the \
                             previous binary"
                        );
                        let e = r.exec(&args);
                        error!("going back to the previous binary failed: {e}");
                    }
                    // Not rebuilt and not gone back: the vfio-user servers end unserved.
                    open_gates(false);
                })
            },
        }
    });
    if resume.is_none() {
        // Nothing left to rebuild: this binary serves from here on.
        rollback.borrow_mut().take();
        open_gates(true);
    }
    let served = loop {
        let outcome = serve_until(
            listener,
            &settings,
            &backend.dyn_backend,
            &metrics,
            &stopper,
            None,
            Some(&hook),
            resume.take(),
        );
        match outcome {
            Ok(Outcome::Upgrade(u)) => {
                let u = *u;
                let (l, r) = upgrade_to(
                    &exe,
                    &args,
                    config_text.as_deref(),
                    &metrics,
                    u,
                    &backend,
                    &vfio_stop,
                    &mut fronts,
                    keeper.as_ref(),
                );
                listener = l;
                resume = r;
            }
            other => break other.map(drop),
        }
    };
    // The vfio-user fronts reset their devices and disable their IRQs as they stop.
    vfio_stop.stop();
    for (ep, t) in fronts.threads {
        match t.join() {
            Ok(Err(e)) => warn!("vfio-user server of {ep}: {e}"),
            Err(_) => error!("the vfio-user server thread of {ep} panicked"),
            Ok(Ok(_)) => {}
        }
    }
    served.map_err(|e| {
        error!("{e}");
        e.to_string()
    })?;
    // A clean stop: nothing is to be taken back, and the store's duplicates must not keep the
    // devices, their IOASes or the VMM's connections alive after this process.
    if let Some(k) = &keeper {
        k.forget_everything();
    }
    info!("stopped; {} requests failed in this run", metrics.failed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists_collapse_runs_into_ranges() {
        let eps = |v: &[u32]| v.iter().map(|&e| EndpointId(e)).collect::<Vec<_>>();
        assert_eq!(endpoint_list(&eps(&(0..=15).collect::<Vec<_>>())), "0..=15");
        assert_eq!(
            endpoint_list(&eps(&[1, 3, 5, 6, 7, 9, 10])),
            "1, 3, 5..=7, 9, 10"
        );
        assert_eq!(endpoint_list(&[]), "");
    }
}
