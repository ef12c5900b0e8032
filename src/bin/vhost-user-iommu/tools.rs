//! The operator's tools: `ctl` (the control socket's client), `viot` (the ACPI table) and
//! `assets` (man page and completions for packaging).

use std::path::PathBuf;

use clap::Args;

use vhost_user_iommu::config::VmConfig;
use vhost_user_iommu::control::{self};
use vhost_user_iommu::viot::{Viot, parse_pci_address};

#[derive(Args, Debug)]
pub(crate) struct AssetsArgs {
    /// Directory to write `vhost-user-iommu.1` and the bash, zsh and fish completions into.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct CtlArgs {
    /// The daemon's --control-socket.
    #[arg(long)]
    control_socket: PathBuf,
    /// What to ask for: a summary for people, the whole state as JSON, Prometheus metrics,
    /// where the request trace goes (`trace`), or start or stop it on the running daemon.
    #[arg(value_enum, default_value = "summary")]
    what: CtlQuery,
    /// trace-start: the file to write the trace to (absolute; appended to).
    #[arg(required_if_eq("what", "trace-start"))]
    file: Option<PathBuf>,
    /// trace-start: the size at which the trace file is rotated (MiB).
    #[arg(long, default_value_t = 64)]
    max_mb: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CtlQuery {
    Summary,
    State,
    Metrics,
    Trace,
    TraceStart,
    TraceStop,
}

#[derive(Args, Debug)]
pub(crate) struct ViotArgs {
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

/// The man page (clap_mangen) and completions (clap_complete), from the same clap definition
/// the binary parses with.
pub(crate) fn write_assets(a: AssetsArgs) -> Result<(), String> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let err = |what: &str, e: std::io::Error| format!("{what}: {e}");
    std::fs::create_dir_all(&a.out).map_err(|e| err(&a.out.display().to_string(), e))?;
    let cmd = crate::Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut man)
        .map_err(|e| err("man page", e))?;
    let page = a.out.join("vhost-user-iommu.1");
    std::fs::write(&page, man).map_err(|e| err(&page.display().to_string(), e))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, "vhost-user-iommu", &a.out)
            .map_err(|e| err(&format!("{shell} completion"), e))?;
    }
    Ok(())
}

pub(crate) fn ctl(a: CtlArgs) -> Result<(), String> {
    let command = match (a.what, &a.file) {
        (CtlQuery::TraceStart, Some(f)) => {
            // The daemon runs elsewhere: a relative path would be relative to its directory.
            let f = std::path::absolute(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let f = f.to_str().ok_or("the trace file's path is not UTF-8")?;
            format!("trace start {} {f}", a.max_mb)
        }
        (CtlQuery::TraceStart, None) => return Err("trace-start needs a FILE".into()),
        (_, Some(f)) => return Err(format!("{}: only trace-start takes a file", f.display())),
        (CtlQuery::Summary, None) => "summary".into(),
        (CtlQuery::State, None) => "state".into(),
        (CtlQuery::Metrics, None) => "metrics".into(),
        (CtlQuery::Trace, None) => "trace".into(),
        (CtlQuery::TraceStop, None) => "trace stop".into(),
    };
    let answer = control::query(&a.control_socket, &command)
        .map_err(|e| format!("control socket {}: {e}", a.control_socket.display()))?;
    match answer.strip_prefix("error: ") {
        Some(e) => Err(e.trim_end().to_string()),
        None => {
            print!("{answer}");
            Ok(())
        }
    }
}

pub(crate) fn write_viot(a: ViotArgs) -> Result<(), String> {
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

/// `vhost-user-iommu exporter` arguments.
#[derive(Args, Debug)]
pub(crate) struct ExporterArgs {
    /// Address to serve `/metrics` on (a non-loopback address exposes every VM's counters to
    /// whoever reaches it).
    #[arg(long, default_value = vhost_user_iommu::exporter::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// The directory of the daemons' control sockets (`VM.ctl`).
    #[arg(long, default_value = vhost_user_iommu::deploy::RUNTIME_DIR)]
    dir: PathBuf,
}

pub(crate) fn exporter(a: ExporterArgs) -> Result<(), String> {
    vhost_user_iommu::exporter::run(a.listen, &a.dir)
}
