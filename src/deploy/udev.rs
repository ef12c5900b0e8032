//! `vhost-user-iommu udev-lookup`: which VMs (units) use a device, for the udev rule.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

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
