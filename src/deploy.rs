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
mod notify;
mod udev;

pub use check::{CheckLine, CheckOptions, Memlock, Report, Status, check, parse_size};
pub use notify::{notify, notify_ready, notify_to};
pub use udev::{Lookup, vms_using};

#[cfg(test)]
mod tests;
