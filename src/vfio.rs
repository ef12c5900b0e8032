//! Host PCI device discovery: PCI address → sysfs → VFIO device cdev (`/dev/vfio/devices/vfioN`).
//!
//! This module owns reading the kernel's description of an assigned device: does the device
//! exist, which driver is bound, which IOMMU group it is in and whether that group is viable,
//! and which VFIO cdev the kernel created for it. Every failure names the device, the sysfs path
//! it looked at and the command that fixes it. All paths go through a [`SysfsRoot`] (default
//! `/`) so tests run against a fake tree. It only reads: it must never write to sysfs, bind or
//! unbind drivers, or open device nodes; fixes are printed for the operator, not applied.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The driver every assigned device must be bound to (variant drivers such as `mlx5_vfio_pci`
/// are accepted too, see [`is_vfio_driver`]).
pub const VFIO_PCI: &str = "vfio-pci";

/// PCI class code (base class, subclass) of a PCI-to-PCI bridge.
const PCI_CLASS_BRIDGE_PCI: u32 = 0x0604;

/// The filesystem root under which `sys/` and `dev/` are looked up (default `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsRoot(pub PathBuf);

impl Default for SysfsRoot {
    fn default() -> Self {
        SysfsRoot(PathBuf::from("/"))
    }
}

impl SysfsRoot {
    /// `rel` (e.g. "sys/bus/pci") under this root; a leading '/' in `rel` is ignored.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        self.0.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// `/sys/bus/pci/devices/ADDR`.
    pub fn pci_device(&self, addr: &PciAddress) -> PathBuf {
        self.join(format!("sys/bus/pci/devices/{addr}"))
    }

    /// `/sys/bus/pci/drivers/NAME`.
    pub fn pci_driver(&self, name: &str) -> PathBuf {
        self.join(format!("sys/bus/pci/drivers/{name}"))
    }

    /// `/dev/iommu`, the iommufd node.
    pub fn iommufd_node(&self) -> PathBuf {
        self.join("dev/iommu")
    }
}

/// A host PCI address, `DDDD:BB:DD.F` (the domain may have more than 4 hex digits, e.g. VMD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = VfioError;

    /// Accepts `DDDD:BB:DD.F` and `BB:DD.F` (domain 0), hex, case-insensitive.
    fn from_str(s: &str) -> Result<Self, VfioError> {
        let bad = |reason: &str| VfioError::BadAddress {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let hex = |t: &str, max: usize, what: &str| -> Result<u32, VfioError> {
            if t.is_empty() || t.len() > max || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(&format!("{what} {t:?} is not 1 to {max} hex digits")));
            }
            u32::from_str_radix(t, 16).map_err(|e| bad(&format!("{what} {t:?}: {e}")))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [bus, devfn] => (0, *bus, *devfn),
            [domain, bus, devfn] => (hex(domain, 8, "domain")?, *bus, *devfn),
            _ => return Err(bad("expected DDDD:BB:DD.F or BB:DD.F")),
        };
        let (dev, func) = devfn
            .split_once('.')
            .ok_or_else(|| bad("missing '.' between device and function"))?;
        let bus = hex(bus, 2, "bus")?;
        let device = hex(dev, 2, "device")?;
        let function = hex(func, 1, "function")?;
        if device > 0x1f {
            return Err(bad("device must be 00 to 1f"));
        }
        if function > 7 {
            return Err(bad("function must be 0 to 7"));
        }
        Ok(PciAddress {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl PciAddress {
    /// The PCI device a udev/sysfs devpath belongs to: the last path component that is a PCI
    /// address, e.g. `/devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio0` →
    /// `0000:01:00.0`. Plain addresses are accepted too.
    pub fn from_devpath(s: &str) -> Result<Self, VfioError> {
        if let Ok(a) = s.parse() {
            return Ok(a);
        }
        s.split('/')
            .rev()
            .find_map(|c| c.parse().ok().filter(|_| c.matches(':').count() == 2))
            .ok_or_else(|| VfioError::BadAddress {
                input: s.to_string(),
                reason: "neither a PCI address nor a devpath containing one".into(),
            })
    }
}

/// Why a device cannot be handed to the daemon. Every message names the device, the sysfs path
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("bad PCI address {input:?}: {reason}")]
    BadAddress { input: String, reason: String },
    #[error(
        "no PCI device {addr}: {} does not exist; list devices with `lspci -D` and fix `pci` in the VM's config",
        path.display()
    )]
    NoDevice { addr: PciAddress, path: PathBuf },
    #[error("{addr} has no driver ({} is missing): {fix}", path.display())]
    Unbound {
        addr: PciAddress,
        path: PathBuf,
        fix: String,
    },
    #[error("{addr} is bound to {driver}, not vfio-pci: {fix}")]
    WrongDriver {
        addr: PciAddress,
        driver: String,
        fix: String,
    },
    #[error(
        "{addr} has no IOMMU group ({} is missing): enable the IOMMU in the firmware (VT-d / AMD-Vi) and on the kernel command line (intel_iommu=on or amd_iommu=on, iommu=pt), then reboot",
        path.display()
    )]
    NoIommuGroup { addr: PciAddress, path: PathBuf },
    #[error(
        "IOMMU group {group} of {addr} is not viable: {member} is bound to {driver} ({}): {fix}",
        path.display()
    )]
    GroupNotViable {
        addr: PciAddress,
        group: u32,
        member: String,
        driver: String,
        path: PathBuf,
        fix: String,
    },
    #[error(
        "{addr} is bound to {driver} but has no VFIO device cdev ({} is missing or empty): the kernel needs CONFIG_VFIO_DEVICE_CDEV=y (Linux 6.6 or later) and CONFIG_IOMMUFD",
        path.display()
    )]
    NoCdev {
        addr: PciAddress,
        driver: String,
        path: PathBuf,
    },
    #[error(
        "{addr}: the kernel has {} but {} does not exist: udev did not create the node; check `udevadm info {}` and that /dev is devtmpfs",
        sysfs.display(), node.display(), sysfs.display()
    )]
    NoNode {
        addr: PciAddress,
        sysfs: PathBuf,
        node: PathBuf,
    },
    #[error(
        "{addr}: {} is char device {}:{} but {} says {expected}: a stale node; remove it and run `udevadm trigger -c add {}`",
        node.display(), found.0, found.1, sysfs.display(), sysfs.display()
    )]
    NodeMismatch {
        addr: PciAddress,
        node: PathBuf,
        sysfs: PathBuf,
        found: (u32, u32),
        expected: String,
    },
    #[error("{addr}: cannot read {}: {source}", path.display())]
    Io {
        addr: PciAddress,
        path: PathBuf,
        source: io::Error,
    },
}

/// A device in an IOMMU group and what holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Its sysfs name (a PCI address for PCI devices).
    pub name: String,
    pub driver: Option<String>,
    /// A PCI-to-PCI bridge (class 0x0604): allowed in a viable group whatever its driver.
    pub bridge: bool,
}

/// An IOMMU group: its number and its devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuGroup {
    /// Its number (`/sys/kernel/iommu_groups/N`).
    pub id: u32,
    pub members: Vec<GroupMember>,
}

/// A device's VFIO cdev: `vfioN` in sysfs and its node in /dev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioCdev {
    /// `vfioN`.
    pub name: String,
    /// `/sys/bus/pci/devices/ADDR/vfio-dev/vfioN`.
    pub sysfs: PathBuf,
    /// `/dev/vfio/devices/vfioN`.
    pub node: PathBuf,
}

/// Whether `driver` is vfio-pci or a vfio-pci variant driver (`mlx5_vfio_pci`, …), all of which
/// create a VFIO cdev and can be bound to iommufd.
pub fn is_vfio_driver(driver: &str) -> bool {
    driver == VFIO_PCI || driver.ends_with("_vfio_pci") || driver.ends_with("-vfio-pci")
}

/// Drivers the kernel accepts on the other devices of a group claimed for DMA by VFIO
/// (`driver_managed_dma`): VFIO drivers, pci-stub, and the PCIe port driver.
fn viable_group_driver(driver: &str) -> bool {
    is_vfio_driver(driver) || driver == "pci-stub" || driver == "pcieport"
}

/// The last component of the target of symlink `link`, `None` if `link` does not exist.
fn link_name(addr: PciAddress, link: &Path) -> Result<Option<String>, VfioError> {
    match std::fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VfioError::Io {
            addr,
            path: link.into(),
            source,
        }),
    }
}

/// The commands that move `dev` from its current driver (if any) to vfio-pci.
pub fn rebind_fix(root: &SysfsRoot, dev: &str, driver: Option<&str>) -> String {
    let mut steps = Vec::new();
    if !root.pci_driver(VFIO_PCI).exists() {
        steps.push("modprobe vfio-pci".to_string());
    }
    let dir = root.join(format!("sys/bus/pci/devices/{dev}"));
    steps.push(format!(
        "echo {VFIO_PCI} > {}",
        dir.join("driver_override").display()
    ));
    if let Some(d) = driver {
        steps.push(format!(
            "echo {dev} > {}",
            root.pci_driver(d).join("unbind").display()
        ));
    }
    steps.push(format!(
        "echo {dev} > {}",
        root.join("sys/bus/pci/drivers_probe").display()
    ));
    steps.join("; ")
}

/// The sysfs directory of `addr`, or why it does not exist.
pub fn device_dir(root: &SysfsRoot, addr: PciAddress) -> Result<PathBuf, VfioError> {
    let path = root.pci_device(&addr);
    if path.exists() {
        Ok(path)
    } else {
        Err(VfioError::NoDevice { addr, path })
    }
}

/// The driver bound to `addr` (`None`: no driver).
pub fn driver(root: &SysfsRoot, addr: PciAddress) -> Result<Option<String>, VfioError> {
    let dir = device_dir(root, addr)?;
    link_name(addr, &dir.join("driver"))
}

/// Checks that `addr` is bound to vfio-pci (or a variant driver); returns the driver name.
pub fn require_vfio_driver(root: &SysfsRoot, addr: PciAddress) -> Result<String, VfioError> {
    let dev = addr.to_string();
    match driver(root, addr)? {
        Some(d) if is_vfio_driver(&d) => Ok(d),
        Some(d) => Err(VfioError::WrongDriver {
            addr,
            fix: rebind_fix(root, &dev, Some(&d)),
            driver: d,
        }),
        None => Err(VfioError::Unbound {
            addr,
            path: root.pci_device(&addr).join("driver"),
            fix: rebind_fix(root, &dev, None),
        }),
    }
}

/// Reads a sysfs hex attribute such as `class` ("0x060400").
fn read_hex(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// The IOMMU group of `addr` and every device in it.
pub fn iommu_group(root: &SysfsRoot, addr: PciAddress) -> Result<IommuGroup, VfioError> {
    let dir = device_dir(root, addr)?;
    let link = dir.join("iommu_group");
    let Some(id) = link_name(addr, &link)?.and_then(|n| n.parse().ok()) else {
        return Err(VfioError::NoIommuGroup { addr, path: link });
    };
    let devices = link.join("devices");
    let io = |path: &Path, source| VfioError::Io {
        addr,
        path: path.into(),
        source,
    };
    let mut members = Vec::new();
    for entry in std::fs::read_dir(&devices).map_err(|e| io(&devices, e))? {
        let entry = entry.map_err(|e| io(&devices, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let driver = link_name(addr, &path.join("driver"))?;
        let bridge = read_hex(&path.join("class")).is_some_and(|c| c >> 8 == PCI_CLASS_BRIDGE_PCI);
        members.push(GroupMember {
            name,
            driver,
            bridge,
        });
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(IommuGroup { id, members })
}

/// Checks that every device in the IOMMU group of `addr` leaves the group usable by VFIO:
/// bound to a VFIO driver, pci-stub or pcieport, unbound, or a PCI bridge.
pub fn require_viable_group(root: &SysfsRoot, addr: PciAddress) -> Result<IommuGroup, VfioError> {
    let group = iommu_group(root, addr)?;
    let own = addr.to_string();
    // The device's own driver is [`require_vfio_driver`]'s business.
    for m in group.members.iter().filter(|m| m.name != own) {
        let Some(d) = &m.driver else { continue };
        if m.bridge || viable_group_driver(d) {
            continue;
        }
        return Err(VfioError::GroupNotViable {
            addr,
            group: group.id,
            member: m.name.clone(),
            driver: d.clone(),
            path: root.join(format!("sys/kernel/iommu_groups/{}/devices", group.id)),
            fix: format!(
                "bind it to vfio-pci as well ({}), or move {addr} to a slot with its own group",
                rebind_fix(root, &m.name, Some(d))
            ),
        });
    }
    Ok(group)
}

/// The VFIO cdev of `addr` (`vfio-dev/vfioN` in sysfs and `/dev/vfio/devices/vfioN`), checking
/// that the node exists and, when it is a real char device, that its number matches sysfs.
pub fn vfio_cdev(root: &SysfsRoot, addr: PciAddress, driver: &str) -> Result<VfioCdev, VfioError> {
    let dir = device_dir(root, addr)?.join("vfio-dev");
    let missing = || VfioError::NoCdev {
        addr,
        driver: driver.to_string(),
        path: dir.clone(),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(source) => {
            return Err(VfioError::Io {
                addr,
                path: dir.clone(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio"))
        .collect();
    names.sort();
    let Some(name) = names.into_iter().next() else {
        return Err(missing());
    };
    let sysfs = dir.join(&name);
    let node = root.join(format!("dev/vfio/devices/{name}"));
    let meta = match std::fs::metadata(&node) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(VfioError::NoNode { addr, sysfs, node });
        }
        Err(source) => {
            return Err(VfioError::Io {
                addr,
                path: node,
                source,
            });
        }
    };
    // A fake tree may use regular files; a real node must carry the number sysfs names.
    if meta.file_type().is_char_device()
        && let Ok(expected) = std::fs::read_to_string(sysfs.join("dev"))
    {
        let expected = expected.trim().to_string();
        let rdev = meta.rdev();
        let found = (libc::major(rdev), libc::minor(rdev));
        if expected != format!("{}:{}", found.0, found.1) {
            return Err(VfioError::NodeMismatch {
                addr,
                node,
                sysfs: sysfs.join("dev"),
                found,
                expected,
            });
        }
    }
    Ok(VfioCdev { name, sysfs, node })
}

/// The whole discovery: `addr` exists, is bound to vfio-pci, its IOMMU group is viable and its
/// VFIO cdev node exists. Returns the cdev.
pub fn discover(root: &SysfsRoot, addr: PciAddress) -> Result<VfioCdev, VfioError> {
    let driver = require_vfio_driver(root, addr)?;
    require_viable_group(root, addr)?;
    vfio_cdev(root, addr, &driver)
}

/// [`discover`] for every device in `addrs`, waiting up to `timeout` for those that are not
/// ready yet: a VM's devices get bound to vfio-pci in any order, and its unit is started by the
/// first one. Polls every 100 ms; on timeout returns the error of the first device still
/// missing, which names it and the fix.
pub fn wait_for_devices(
    root: &SysfsRoot,
    addrs: &[PciAddress],
    timeout: std::time::Duration,
) -> Result<Vec<VfioCdev>, VfioError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match addrs.iter().map(|&a| discover(root, a)).collect() {
            Ok(found) => return Ok(found),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_canonically() {
        let a: PciAddress = "01:00.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:01:00.0");
        let b: PciAddress = "0000:AF:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:af:1f.7");
        let c: PciAddress = "10000:00:02.0".parse().unwrap();
        assert_eq!(c.to_string(), "10000:00:02.0");
        for bad in [
            "",
            "1:2",
            "0000:01:00",
            "0000:01:20.0",
            "0000:01:00.8",
            "x:01:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn devpaths_name_their_pci_device() {
        let a = PciAddress::from_devpath(
            "/devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio0",
        )
        .unwrap();
        assert_eq!(a.to_string(), "0000:01:00.0");
        assert!(PciAddress::from_devpath("/devices/virtual/misc/iommu").is_err());
    }

    #[test]
    fn fixes_name_the_sysfs_files() {
        let root = SysfsRoot::default();
        let fix = rebind_fix(&root, "0000:01:00.0", Some("e1000e"));
        assert!(fix.contains("echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override"));
        assert!(fix.contains("echo 0000:01:00.0 > /sys/bus/pci/drivers/e1000e/unbind"));
        assert!(fix.ends_with("echo 0000:01:00.0 > /sys/bus/pci/drivers_probe"));
    }

    #[test]
    fn variant_drivers_count_as_vfio() {
        assert!(is_vfio_driver("vfio-pci"));
        assert!(is_vfio_driver("mlx5_vfio_pci"));
        assert!(!is_vfio_driver("e1000e"));
        assert!(!is_vfio_driver("vfio"));
    }
}
