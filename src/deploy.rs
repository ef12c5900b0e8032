//! Host integration: the `check` report, the udev device → VM lookup, and systemd readiness.
//!
//! This module owns what ties one daemon instance to the host around it: validating a per-VM
//! config against the host (`vhost-user-iommu check`), answering udev's "which VMs use this
//! device?" (`vhost-user-iommu udev-lookup`, which names `vhost-user-iommu@VM.service` units),
//! and telling systemd the socket listens ([`notify_ready`], the sd_notify protocol without
//! libsystemd). It reads configs, sysfs (through [`crate::vfio::SysfsRoot`]) and process limits; it must
//! never change host state (no binding, no chmod, no writes outside the notify datagram), and
//! a broken config file must never stop the lookup for other VMs.

/// The directory the units and the udev rule read per-VM configs from.
pub const CONFIG_DIR: &str = "/etc/vhost-user-iommu";
/// Capability number of CAP_IPC_LOCK (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;
/// The runtime directory the unit creates (`RuntimeDirectory=vhost-user-iommu`).
pub const RUNTIME_DIR: &str = "/run/vhost-user-iommu";

/// The systemd unit serving VM `vm`.
pub fn unit_for(vm: &str) -> String {
    format!("vhost-user-iommu@{vm}.service")
}

/// Whether `name` can be used verbatim as a systemd instance name (so that `%i` in the unit is
/// the config file's stem) and survives udev's PROGRAM output filtering.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

mod check;
pub mod fdstore;
mod notify;
mod udev;

pub use check::{CheckLine, CheckOptions, Memlock, Report, Status, check, parse_size};
pub use notify::{notify, notify_ready, notify_to};
pub use udev::{Lookup, vms_using};

#[cfg(test)]
mod tests;

/// Where `vhost-user-iommu viot` writes a VM's ACPI table in the documented deployment.
pub const VIOT_DIR: &str = "/var/lib/vhost-user-iommu";

/// AppArmor rules for the QEMU of VM `vm` alone: its vhost-user and vfio-user sockets (and the
/// directory, to reach them) and its VIOT table, nothing of another VM (the control socket is
/// the operator's). For the profile that confines this VM's QEMU and no other; see
/// docs/deploying.md. Refuses a path AppArmor would read as a pattern or cannot quote.
pub fn apparmor_rules(cfg: &crate::config::VmConfig, vm: &str) -> Result<String, String> {
    use std::fmt::Write as _;
    // The VMM's sockets: vhost-user and each vfio-user one (not the control socket).
    let vfio = cfg
        .endpoints
        .iter()
        .filter_map(|e| e.vfio_user_socket.as_deref());
    let mut paths: Vec<(std::path::PathBuf, &str)> = cfg
        .socket
        .as_deref()
        .into_iter()
        .chain(vfio)
        .map(|p| (p.components().collect(), "rw"))
        .collect();
    if paths.is_empty() {
        return Err("the config names no vhost-user or vfio-user socket".into());
    }
    let mut dirs: Vec<std::path::PathBuf> = paths
        .iter()
        .filter_map(|(p, _)| p.parent().map(|d| d.to_path_buf()))
        .collect();
    dirs.sort();
    dirs.dedup();
    paths.push((
        std::path::Path::new(VIOT_DIR).join(format!("{vm}-viot.bin")),
        "r",
    ));
    let quote = |p: &std::path::Path, dir: bool| -> Result<String, String> {
        let s = p
            .to_str()
            .ok_or_else(|| format!("{}: not UTF-8", p.display()))?;
        if !s.starts_with('/') || s.chars().any(|c| "\"*?[]{}^\\@\n".contains(c)) {
            return Err(format!(
                "{s}: AppArmor would read it as a pattern (or it is relative): use a plain absolute path"
            ));
        }
        Ok(if dir && s != "/" {
            format!("\"{s}/\"")
        } else {
            format!("\"{s}\"")
        })
    };
    let mut out = format!(
        "# AppArmor rules for the QEMU of VM {vm} (vhost-user-iommu apparmor): its sockets and its\n\
         # VIOT table only. Include them in the profile of this VM's QEMU and in no other.\n"
    );
    for d in &dirs {
        let _ = writeln!(out, "  {} r,", quote(d, true)?);
    }
    for (p, mode) in &paths {
        let _ = writeln!(out, "  {} {mode},", quote(p, false)?);
    }
    Ok(out)
}
