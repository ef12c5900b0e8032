//! Host-integration commands: `check` (a per-VM config against the host) and `udev-lookup`
//! (which VMs use a device, for the udev rule): their arguments and exit codes; what they
//! compute is the library's `deploy`.

use std::path::PathBuf;
use std::process::ExitCode;

use vhost_user_iommu::config::VmConfig;
use vhost_user_iommu::deploy::{
    CONFIG_DIR, CheckOptions, apparmor_rules, check, parse_size, unit_for, vms_using,
};
use vhost_user_iommu::vfio::{PciAddress, SysfsRoot};

/// `vhost-user-iommu check` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct CheckArgs {
    /// The per-VM configuration file to check.
    #[arg(long)]
    config: PathBuf,
    /// The VM's RAM (e.g. 4G), to check that it can be pinned (RLIMIT_MEMLOCK).
    #[arg(long, value_parser = parse_size)]
    ram_size: Option<u64>,
    /// Look for sys/ and dev/ under this directory instead of / (for tests).
    #[arg(long, default_value = "/", hide = true)]
    sysfs_root: PathBuf,
}

/// Runs `check`: prints the report; exit 0 when nothing failed, 1 otherwise.
pub(crate) fn check_command(a: CheckArgs) -> ExitCode {
    let opts = CheckOptions {
        root: SysfsRoot(a.sysfs_root),
        ram_size: a.ram_size,
        memlock: None,
    };
    let report = check(&a.config, &opts);
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `vhost-user-iommu udev-lookup` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct UdevLookupArgs {
    /// Directory of per-VM configs (VM.toml).
    #[arg(long, default_value = CONFIG_DIR)]
    config_dir: PathBuf,
    /// Print unit names (vhost-user-iommu@VM.service) on one line instead of VM names.
    #[arg(long)]
    units: bool,
    /// The device: a PCI address (0000:01:00.0) or a devpath containing one
    /// (/devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio0).
    device: String,
}

/// Runs `udev-lookup`: exit 0 and print the VMs (or units) using the device, exit 1 and print
/// nothing when none does (so a udev PROGRAM match fails), exit 2 on a usage or I/O error.
pub(crate) fn udev_lookup_command(a: UdevLookupArgs) -> ExitCode {
    let addr = match PciAddress::from_devpath(&a.device) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vhost-user-iommu udev-lookup: {e}");
            return ExitCode::from(2);
        }
    };
    let lookup = match vms_using(&a.config_dir, addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "vhost-user-iommu udev-lookup: cannot read {}: {e}",
                a.config_dir.display()
            );
            return ExitCode::from(2);
        }
    };
    for w in &lookup.warnings {
        eprintln!("vhost-user-iommu udev-lookup: {w}");
    }
    if lookup.vms.is_empty() {
        return ExitCode::from(1);
    }
    if a.units {
        let units: Vec<String> = lookup.vms.iter().map(|v| unit_for(v)).collect();
        println!("{}", units.join(" "));
    } else {
        for vm in &lookup.vms {
            println!("{vm}");
        }
    }
    ExitCode::SUCCESS
}

/// `vhost-user-iommu apparmor` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct AppArmorArgs {
    /// The per-VM configuration file (its name is the VM's).
    #[arg(long)]
    config: PathBuf,
}

/// Prints the AppArmor rules for this VM's QEMU alone (see `deploy::apparmor_rules`).
pub(crate) fn apparmor(a: AppArmorArgs) -> Result<(), String> {
    let cfg = VmConfig::load(&a.config).map_err(|e| e.to_string())?;
    let vm = a
        .config
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: no VM name in the file name", a.config.display()))?;
    print!("{}", apparmor_rules(&cfg, vm)?);
    Ok(())
}
