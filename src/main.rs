//! The `vhost-user-iommu` command line: parses arguments and wires the library together.

use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use log::{error, info, warn};
use vhost::vhost_user::Listener;

use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::iommufd::IommufdBackend;
use vhost_user_iommu::backend::soft::SoftBackend;
use vhost_user_iommu::boot_ram::BootRam;
use vhost_user_iommu::config::{BackendKind, VmConfig};
use vhost_user_iommu::control::{self, CurrentDevice};
use vhost_user_iommu::domains::Rules;
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::log_limit::EveryNth;
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::server::{OnConnect, Stopper, handle_signals, serve};
use vhost_user_iommu::vfio::{self, PciAddress, SysfsRoot};
use vhost_user_iommu::vfio_user;
use vhost_user_iommu::vhost::DeviceSettings;
use vhost_user_iommu::viot::{Viot, parse_pci_address};

/// Endpoints served when neither a config file nor --endpoint names any.
const DEFAULT_ENDPOINTS: std::ops::RangeInclusive<u32> = 0..=15;

#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-iommu",
    version,
    about = "virtio-iommu device over vhost-user, backed by iommufd"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// More logging (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Args, Debug)]
struct ServeArgs {
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
    /// request before sleeping until a kick (0 disables polling).
    #[arg(long)]
    poll_us: Option<u64>,
    /// Serve this endpoint id (repeatable); overrides the config file's endpoint ids.
    #[arg(long = "endpoint")]
    endpoints: Vec<u32>,
    /// Unattached endpoints start in bypass (identity) mode.
    #[arg(long)]
    boot_bypass: bool,
    /// Serve a read-only control socket here (`state` as JSON, `metrics` in Prometheus format).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Print the backend capabilities as JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    print_capabilities: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure the daemon end to end over a real socket against baselines from the same run.
    Bench(BenchArgs),
    /// Write the ACPI VIOT table that tells the guest which endpoints sit behind the IOMMU.
    Viot(ViotArgs),
    /// Check a per-VM config and the host (iommufd, VFIO devices, IOMMU groups, memlock).
    Check(vhost_user_iommu::deploy::CheckArgs),
    /// Print the VMs whose configs list a device (for the udev rule); exit 1 if none.
    UdevLookup(vhost_user_iommu::deploy::UdevLookupArgs),
    /// Ask a running daemon's control socket for its state (JSON) or metrics (Prometheus text).
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The daemon's --control-socket.
    #[arg(long)]
    control_socket: PathBuf,
    /// What to ask for.
    #[arg(value_enum, default_value = "state")]
    what: CtlQuery,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CtlQuery {
    State,
    Metrics,
}

#[derive(Args, Debug)]
#[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
struct BenchArgs {
    /// Translation backend to measure (only soft in this build).
    #[arg(long, value_enum, default_value = "soft")]
    backend: BackendKind,
    /// Executor modes to measure; `both` measures inline and the pipeline.
    #[arg(long, value_enum, default_value = "both")]
    mode: BenchMode,
    /// Executor threads of the pipeline mode.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Polling window of the vring thread in microseconds (default: the daemon's default).
    #[arg(long)]
    poll_us: Option<u64>,
    /// Rounds per workload (each round is one MAP/UNMAP cycle of the pattern).
    #[arg(long, default_value_t = 20000)]
    rounds: usize,
    /// Only workloads whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Print one JSON object per measurement instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw the latency distributions into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchMode {
    Inline,
    Pipeline,
    Both,
}

#[derive(Args, Debug)]
struct ViotArgs {
    /// Output file (for QEMU's -acpitable file=...).
    #[arg(short, long)]
    output: PathBuf,
    /// Guest PCI address of the virtio-iommu device, e.g. 00:03.0.
    #[arg(long)]
    iommu: Option<String>,
    /// An endpoint as ID=GUEST_PCI_ADDRESS, e.g. 32=00:04.0 (repeatable).
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// Take the IOMMU and endpoint addresses from this per-VM config.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn ctl(a: CtlArgs) -> Result<(), String> {
    let command = match a.what {
        CtlQuery::State => "state",
        CtlQuery::Metrics => "metrics",
    };
    let answer = control::query(&a.control_socket, command)
        .map_err(|e| format!("control socket {}: {e}", a.control_socket.display()))?;
    print!("{answer}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let result = match cli.command {
        Some(Command::Check(a)) => return vhost_user_iommu::deploy::check_command(a),
        Some(Command::UdevLookup(a)) => return vhost_user_iommu::deploy::udev_lookup_command(a),
        Some(Command::Viot(a)) => write_viot(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Ctl(a)) => ctl(a),
        None => run(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmark kit (a simulated VMM and guest in this process) is test code, left out of the
/// daemon operators install.
#[cfg(not(feature = "test-utils"))]
fn bench(_: BenchArgs) -> Result<(), String> {
    Err("this build has no benchmark kit: build it with `cargo build --release --features test-utils` (or run `cargo run --release --features test-utils -- bench`)".into())
}

#[cfg(feature = "test-utils")]
fn bench(a: BenchArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    use vhost_user_iommu::bench::{self, report};
    if a.backend != BackendKind::Soft {
        return Err("only --backend soft can be benchmarked in this build".into());
    }
    if a.rounds == 0 || a.threads == 0 {
        return Err("--rounds and --threads must be at least 1".into());
    }
    let mut modes = Vec::new();
    if a.mode != BenchMode::Pipeline {
        modes.push(Mode::Inline);
    }
    if a.mode != BenchMode::Inline {
        modes.push(Mode::Pipeline(a.threads));
    }
    let wls: Vec<_> = bench::workloads()
        .into_iter()
        .filter(|w| {
            a.filter
                .as_ref()
                .is_none_or(|f| w.name.contains(f.as_str()))
        })
        .collect();
    if wls.is_empty() {
        return Err("no workload matches --filter".into());
    }
    let total = wls.len() * (1 + modes.len());
    let progress = std::io::stderr().is_terminal();
    let mut results = Vec::new();
    for w in &wls {
        let step = |what: &str, done: usize| {
            if progress {
                let bar: String = (0..30)
                    .map(|i| if i * total < done * 30 { '#' } else { '.' })
                    .collect();
                eprint!("\r[{bar}] {done}/{total} {:<16} {what:<12}", w.name);
            }
        };
        step("raw", results.len());
        results.push(bench::run_raw(w, a.rounds));
        for &m in &modes {
            step(
                if m == Mode::Inline {
                    "inline"
                } else {
                    "pipeline"
                },
                results.len(),
            );
            let poll = a
                .poll_us
                .map(std::time::Duration::from_micros)
                .unwrap_or(vhost_user_iommu::vhost::DEFAULT_POLL);
            results.push(bench::run_socket(w, m, poll, a.rounds).map_err(|e| e.to_string())?);
        }
    }
    if progress {
        eprintln!();
    }
    if a.json {
        print!("{}", report::json(&results, "soft"));
    } else {
        print!("{}", report::table(&results));
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, report::svg(&results))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

fn write_viot(a: ViotArgs) -> Result<(), String> {
    let cfg = a
        .config
        .as_deref()
        .map(VmConfig::load)
        .transpose()
        .map_err(|e| e.to_string())?;
    let iommu = a
        .iommu
        .or_else(|| cfg.as_ref().and_then(|c| c.iommu_guest_pci.clone()))
        .ok_or(
            "the IOMMU's guest PCI address is needed: --iommu or iommu_guest_pci in the config",
        )?;
    let (seg, bdf) = parse_pci_address(&iommu).map_err(|e| format!("--iommu {iommu}: {e}"))?;
    let mut eps = Vec::new();
    for s in &a.endpoints {
        let (id, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("--endpoint {s}: expected ID=GUEST_PCI_ADDRESS"))?;
        let id: u32 = id
            .parse()
            .map_err(|e| format!("--endpoint {s}: bad id: {e}"))?;
        let (eseg, ebdf) = parse_pci_address(addr).map_err(|e| format!("--endpoint {s}: {e}"))?;
        eps.push((id, eseg, ebdf));
    }
    for e in cfg.iter().flat_map(|c| &c.endpoints) {
        if let Some(addr) = &e.guest_pci {
            let (eseg, ebdf) =
                parse_pci_address(addr).map_err(|err| format!("endpoint {}: {err}", e.id))?;
            eps.push((e.id, eseg, ebdf));
        }
    }
    if eps.is_empty() {
        return Err("no endpoints: give --endpoint ID=ADDR or guest_pci in the config".into());
    }
    let bytes = Viot::single_endpoints(seg, bdf, &eps)
        .to_bytes()
        .map_err(|e| e.to_string())?;
    std::fs::write(&a.output, bytes)
        .map_err(|e| format!("cannot write {}: {e}", a.output.display()))
}

/// How long the daemon waits at start for its devices to be bound to vfio-pci (they appear in
/// any order; the unit is started by the first).
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The backend in use, and the iommufd backend itself when that is the one (the vfio-user
/// fronts need its device files).
struct Backend {
    dyn_backend: Arc<dyn DmaBackend>,
    iommufd: Option<Arc<IommufdBackend>>,
}

/// Serves each configured endpoint's VFIO device to the VMM over vfio-user. DMA_MAPs from the
/// VMM are checked against the vhost-user memory table once it is known (QEMU sends them right
/// after connecting, before the guest starts the IOMMU device); they are recorded, never mapped
/// for the device. With `boot` (boot bypass), the guest RAM they describe is what identity
/// translation covers until the memory table arrives (see `boot_ram`).
fn start_vfio_user(
    cfg: &VmConfig,
    backend: &Backend,
    current: &CurrentDevice,
    stop: &vfio_user::StopSignal,
    boot: Option<&Arc<BootRam>>,
) -> Result<VfioUserFronts, String> {
    let mut threads = Vec::new();
    let mut slots = std::collections::BTreeMap::new();
    let all_maps: Arc<Mutex<Vec<vfio_user::DmaMaps>>> = Arc::default();
    for e in &cfg.endpoints {
        let Some(path) = &e.vfio_user_socket else {
            continue;
        };
        let Some(iommufd) = &backend.iommufd else {
            return Err(format!(
                "endpoint {}: vfio_user_socket needs the iommufd backend (a host device to serve)",
                e.id
            ));
        };
        let file = iommufd
            .device_file(EndpointId(e.id))
            .ok_or_else(|| format!("endpoint {}: no VFIO device is open for it", e.id))?;
        let name = format!("endpoint {}", e.id);
        let dev = vfio_user::VfioCdevDevice::new(file, name.clone())
            .map_err(|err| format!("{name}: {err}"))?;
        let ram_of = current.clone();
        let dma_check: vfio_user::DmaCheck = Arc::new(move |gpa, len| {
            let dev = ram_of.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(ram) = dev.and_then(|d| d.guest_ram()) else {
                return true;
            };
            vhost_user_iommu::ids::IovaRange::with_len(gpa, len)
                .is_some_and(|r| ram.locate(&r).is_some())
        });
        let listener = vfio_user::bind_socket(path).map_err(|err| {
            format!(
                "{name}: cannot serve vfio-user on {}: {err}",
                path.display()
            )
        })?;
        let (connected, ep) = (current.clone(), EndpointId(e.id));
        // A closed device connection leaves the device blocked until the guest re-attaches it
        // (DESIGN §3.4); the domain model is told so that it stays equal to the host.
        let on_disconnect = move || {
            if let Some(d) = connected.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                d.endpoint_disconnected(ep);
            }
        };
        let mut server = vfio_user::DeviceServer::new(Box::new(dev), dma_check, stop.clone())
            .name(name.clone())
            .on_disconnect(on_disconnect);
        if let Some(boot) = boot {
            all_maps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(server.dma_maps());
            let (boot, all_maps, current) = (boot.clone(), all_maps.clone(), current.clone());
            let own = server.dma_maps();
            server = server.on_dma_change(move || {
                // Each client describes all of guest RAM, and QEMU updates them one after the
                // other: the one that changed last is the current view, or, when it just left,
                // any client still connected.
                let mut maps = own.snapshot();
                if maps.is_empty() {
                    maps = all_maps
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|m| m.snapshot())
                        .find(|m| !m.is_empty())
                        .unwrap_or_default();
                }
                let (changed, skipped) = boot.update(&maps);
                for why in skipped {
                    if BOOT_RAM_LOG.allow() {
                        warn!("boot bypass: a DMA map left out of guest RAM: {why}");
                    }
                }
                if changed {
                    follow_boot_ram(&boot, &current);
                }
            });
        }
        slots.insert(ep, server.slot());
        let t = server
            .spawn(listener)
            .map_err(|err| format!("{name}: cannot start the vfio-user thread: {err}"))?;
        info!("{name}: serving vfio-user on {}", path.display());
        threads.push(t);
    }
    Ok((threads, slots))
}

/// Boot-RAM log lines: the VMM decides how often its DMA maps change.
static BOOT_RAM_LOG: EveryNth = EveryNth::new();

/// Hands the guest RAM the vfio-user clients' DMA maps describe to the current vhost-user
/// device, which covers it with identity translation until its memory table arrives.
fn follow_boot_ram(boot: &BootRam, current: &CurrentDevice) {
    let Some(d) = current.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    let ram = match boot.ram() {
        Ok(ram) => ram,
        Err(e) => {
            if BOOT_RAM_LOG.allow() {
                warn!("boot bypass: the DMA maps describe no usable guest RAM: {e}");
            }
            return;
        }
    };
    match d.set_boot_ram(&ram) {
        Ok(false) => {}
        Ok(true) if BOOT_RAM_LOG.allow() => info!(
            "boot bypass: identity translation over the {} RAM regions the VMM's DMA maps describe (no memory table yet)",
            ram.regions().len()
        ),
        Ok(true) => {}
        Err(e) => {
            if BOOT_RAM_LOG.allow() {
                warn!("boot bypass: cannot follow the VMM's DMA maps in the identity domain: {e}");
            }
        }
    }
}

/// The vfio-user server threads and their device slots (taken away on host unplug).
type VfioUserFronts = (
    Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    std::collections::BTreeMap<EndpointId, vfio_user::DeviceSlot>,
);

/// Picks and opens the translation backend: iommufd when asked, or with `auto` when every
/// endpoint names a host device and /dev/iommu exists; else the software table.
fn open_backend(
    kind: BackendKind,
    cfg: &VmConfig,
    cli_endpoints: &[u32],
    endpoints: &[EndpointId],
    boot_bypass: bool,
) -> Result<Backend, String> {
    let all_have_devices =
        !cfg.endpoints.is_empty() && cfg.endpoints.iter().all(|e| e.pci.is_some());
    let iommufd = match kind {
        BackendKind::Iommufd => true,
        BackendKind::Soft => false,
        BackendKind::Auto => {
            let node =
                std::path::Path::new(vhost_user_iommu::backend::iommufd::IOMMUFD_NODE).exists();
            if !(all_have_devices && node) {
                info!(
                    "backend auto: using the software table ({})",
                    if node {
                        "no endpoint names a host device"
                    } else {
                        "no /dev/iommu on this host"
                    }
                );
            }
            all_have_devices && node
        }
    };
    if !iommufd {
        warn!("using the software translation backend: no host device DMA is translated");
        return Ok(Backend {
            dyn_backend: Arc::new(SoftBackend::new(endpoints, boot_bypass)),
            iommufd: None,
        });
    }
    if !cli_endpoints.is_empty() {
        return Err("--endpoint cannot be used with the iommufd backend: list the endpoints with their pci address in the config".into());
    }
    if !all_have_devices {
        return Err("the iommufd backend needs a config whose every [[endpoint]] has pci = \"DDDD:BB:DD.F\"".into());
    }
    let root = SysfsRoot::default();
    let mut pairs = Vec::new();
    for e in &cfg.endpoints {
        let pci = e.pci.as_deref().unwrap_or_default();
        let addr: PciAddress = pci
            .parse()
            .map_err(|err| format!("endpoint {}: {err}", e.id))?;
        pairs.push((EndpointId(e.id), addr));
    }
    let addrs: Vec<PciAddress> = pairs.iter().map(|p| p.1).collect();
    info!(
        "waiting up to {DEVICE_WAIT:?} for {} device(s) to be ready for VFIO",
        addrs.len()
    );
    let cdevs = vfio::wait_for_devices(&root, &addrs, DEVICE_WAIT).map_err(|e| e.to_string())?;
    let devices: Vec<(EndpointId, PathBuf)> = pairs
        .iter()
        .zip(cdevs)
        .map(|((id, _), c)| (*id, c.node))
        .collect();
    let b = IommufdBackend::open(&devices, boot_bypass).map_err(|e| e.to_string())?;
    info!("iommufd backend: {} device(s) bound", devices.len());
    let b = Arc::new(b);
    Ok(Backend {
        dyn_backend: b.clone(),
        iommufd: Some(b),
    })
}

fn run(a: ServeArgs) -> Result<(), String> {
    if a.print_capabilities {
        println!("{{\n  \"type\": \"iommu\",\n  \"features\": []\n}}");
        return Ok(());
    }
    let cfg = match &a.config {
        Some(p) => VmConfig::load(p).map_err(|e| e.to_string())?,
        None => {
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
    let listener = match (a.fd, a.socket_path.as_ref().or(cfg.socket.as_ref())) {
        (Some(fd), _) => {
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
            unsafe { Listener::from_raw_fd(fd) }
        }
        (None, Some(p)) => {
            let l = vhost_user_iommu::listen::bind(p)
                .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
            _socket_file = Some(vhost_user_iommu::listen::SocketFile::new(p));
            Listener::from(l)
        }
        (None, None) => {
            return Err("give --socket-path PATH, --fd N, or socket in the config".into());
        }
    };
    let boot_bypass = a.boot_bypass || cfg.boot_bypass;
    let backend = open_backend(
        a.backend.unwrap_or(cfg.backend),
        &cfg,
        &a.endpoints,
        &endpoints,
        boot_bypass,
    )?;
    let c = backend.dyn_backend.constraints();
    let [d0, d1] = cfg.domain_range.unwrap_or([0, u32::MAX]);
    let rules = Rules::for_host(&c, (d0, d1), cfg.limits(), cfg.probe_size.unwrap_or(512));
    let threads = a.threads.or(cfg.threads).unwrap_or(0);
    let mode = if threads == 0 {
        Mode::Inline
    } else {
        Mode::Pipeline(threads)
    };
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
    };
    let stopper = Arc::new(Stopper::default());
    handle_signals(stopper.clone()).map_err(|e| format!("cannot install signal handling: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let current: CurrentDevice = Arc::default();
    if let Some(p) = &a.control_socket {
        let iommufd = backend.iommufd.clone();
        let pinned: control::PinnedBytes =
            Box::new(move || iommufd.as_ref().map_or(0, |b| b.pinned_bytes()));
        control::spawn(p, current.clone(), metrics.clone(), pinned)
            .map_err(|e| format!("cannot serve the control socket {}: {e}", p.display()))?;
    }
    let vfio_stop =
        vfio_user::StopSignal::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
    // With boot bypass, firmware DMA needs guest RAM before the memory table: the vfio-user
    // clients' DMA maps describe it (see `boot_ram`).
    let boot = boot_bypass.then(|| Arc::new(BootRam::default()));
    let (vfio_threads, slots) =
        start_vfio_user(&cfg, &backend, &current, &vfio_stop, boot.as_ref())?;
    if let Some(b) = &backend.iommufd {
        // Host unbind of a device → detach, close, serve the rest; rebind → serve it again.
        vhost_user_iommu::hotplug::watch(b, current.clone(), slots)
            .map_err(|e| format!("cannot start the hot-plug watcher: {e}"))?;
    }
    // Every socket listens: systemd (Type=notify) may start the VM now.
    if let Err(e) = vhost_user_iommu::deploy::notify_ready() {
        warn!("cannot notify systemd: {e}");
    }
    info!("serving virtio-iommu ({mode:?})");
    let hook: OnConnect = Box::new(move |d| {
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        if let Some(boot) = &boot {
            follow_boot_ram(boot, &current);
        }
    });
    let served = serve(
        listener,
        settings,
        backend.dyn_backend.clone(),
        metrics.clone(),
        stopper,
        None,
        Some(hook),
    );
    // The vfio-user fronts reset their devices and disable their IRQs as they stop.
    vfio_stop.stop();
    for t in vfio_threads {
        match t.join() {
            Ok(Err(e)) => warn!("vfio-user server: {e}"),
            Err(_) => error!("a vfio-user server thread panicked"),
            Ok(Ok(())) => {}
        }
    }
    served.map_err(|e| {
        error!("{e}");
        e.to_string()
    })?;
    info!("stopped; {} requests failed in this run", metrics.failed());
    Ok(())
}
