//! The `vhost-user-iommu` command line: parses arguments and runs the subcommands. The daemon
//! (`daemon`) is assembled from the library's `assembly` module; the benchmark (`bench_cmd`)
//! and the operator's tools (`tools`: ctl, viot, assets) are the other subcommands; `check` and
//! `udev-lookup` (`deploy_cmd`) print what the library's `deploy` finds; `exporter` (in `tools`)
//! serves what the library's `exporter` gathers.

mod bench_cmd;
mod daemon;
mod deploy_cmd;
mod restart;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use bench_cmd::{BenchArgs, bench};
use daemon::{ServeArgs, run};
use tools::{AssetsArgs, CtlArgs, ViotArgs, ctl, write_assets, write_viot};

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

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure the daemon end to end over a real socket against baselines from the same run.
    Bench(BenchArgs),
    /// Write the ACPI VIOT table that tells the guest which endpoints sit behind the IOMMU.
    Viot(ViotArgs),
    /// Check a per-VM config and the host (iommufd, VFIO devices, IOMMU groups, memlock).
    Check(deploy_cmd::CheckArgs),
    /// Print the AppArmor rules for one VM's QEMU: that VM's sockets and VIOT table only.
    Apparmor(deploy_cmd::AppArmorArgs),
    /// Print the VMs whose configs list a device (for the udev rule); exit 1 if none.
    UdevLookup(deploy_cmd::UdevLookupArgs),
    /// Ask a running daemon's control socket for its state (JSON) or metrics (Prometheus text).
    Ctl(CtlArgs),
    /// Serve every VM's metrics (the control sockets in the runtime directory) over HTTP for
    /// Prometheus, on loopback by default.
    Exporter(tools::ExporterArgs),
    /// Write the man page and shell completions generated from this command line into a
    /// directory (for packaging).
    #[command(hide = true)]
    Assets(AssetsArgs),
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
        Some(Command::Check(a)) => return deploy_cmd::check_command(a),
        Some(Command::UdevLookup(a)) => return deploy_cmd::udev_lookup_command(a),
        Some(Command::Viot(a)) => write_viot(a),
        Some(Command::Apparmor(a)) => deploy_cmd::apparmor(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Ctl(a)) => ctl(a),
        Some(Command::Exporter(a)) => tools::exporter(a),
        Some(Command::Assets(a)) => write_assets(a),
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
