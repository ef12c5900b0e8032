//! `vhost-user-iommu udev-lookup`: which VMs (units) use a device, for the udev rule.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::*;
use crate::config::VmConfig;
use crate::vfio::PciAddress;

/// The VMs whose configs list a device, and what went wrong reading the others.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// VM names (config file stems), sorted.
    pub vms: Vec<String>,
    /// One line per config that could not be read or used (the lookup goes on without it).
    pub warnings: Vec<String>,
}

/// Every `*.toml` in `dir`, sorted, with its VM name (the file stem).
pub(super) fn config_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension() != Some(OsStr::new("toml")) || !path.is_file() {
            continue;
        }
        if let Some(stem) = path.file_stem() {
            out.push((stem.to_string_lossy().into_owned(), path));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether an endpoint `pci` string names `addr` (both canonicalised).
fn same_device(pci: &str, addr: PciAddress) -> bool {
    pci.parse::<PciAddress>().is_ok_and(|a| a == addr)
}

/// The VMs in `dir` whose configs list host device `addr` in an endpoint's `pci`.
pub fn vms_using(dir: &Path, addr: PciAddress) -> io::Result<Lookup> {
    let mut lookup = Lookup::default();
    for (vm, path) in config_files(dir)? {
        let cfg = match VmConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                lookup.warnings.push(format!("skipping {e}"));
                continue;
            }
        };
        if !cfg
            .endpoints
            .iter()
            .any(|e| e.pci.as_deref().is_some_and(|p| same_device(p, addr)))
        {
            continue;
        }
        if !valid_vm_name(&vm) {
            lookup.warnings.push(format!(
                "skipping {}: {vm:?} is not usable as a unit instance name (use letters, digits, '_', '-', '.', ':')",
                path.display()
            ));
            continue;
        }
        lookup.vms.push(vm);
    }
    if lookup.vms.len() > 1 {
        lookup.warnings.push(format!(
            "{addr} is listed by {} VMs ({}): all their units are wanted, but only one daemon can hold the device at a time",
            lookup.vms.len(),
            lookup.vms.join(", ")
        ));
    }
    Ok(lookup)
}

/// `vhost-user-iommu udev-lookup` arguments.
#[derive(clap::Args, Debug)]
pub struct UdevLookupArgs {
    /// Directory of per-VM configs (VM.toml).
    #[arg(long, default_value = CONFIG_DIR)]
    pub config_dir: PathBuf,
    /// Print unit names (vhost-user-iommu@VM.service) on one line instead of VM names.
    #[arg(long)]
    pub units: bool,
    /// The device: a PCI address (0000:01:00.0) or a devpath containing one
    /// (/devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio0).
    pub device: String,
}

/// Runs `udev-lookup`: exit 0 and print the VMs (or units) using the device, exit 1 and print
/// nothing when none does (so a udev PROGRAM match fails), exit 2 on a usage or I/O error.
pub fn udev_lookup_command(a: UdevLookupArgs) -> ExitCode {
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
