//! Host integration: the udev device → VM lookup, `check` against a fake sysfs tree laid out
//! like the kernel's (relative symlinks for driver, iommu_group, the bus view), sd_notify over
//! real unix datagram sockets, and the shipped udev rules and systemd units.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vhost_user_iommu::config::VmConfig;
use vhost_user_iommu::deploy::{self, CheckOptions, Memlock, Report, Status};
use vhost_user_iommu::vfio::{self, PciAddress, SysfsRoot, VfioError};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const GIB: u64 = 1 << 30;

use vhost_user_iommu::testing::TempDir;

/// A fake host root: `sys/` shaped like the kernel's sysfs, `dev/` with plain files as nodes.
struct FakeHost {
    dir: TempDir,
}

/// A PCI device in the fake tree: its address and its directory relative to the root.
#[derive(Clone)]
struct Dev {
    bdf: String,
    rel: String,
}

impl FakeHost {
    fn new() -> Self {
        let h = FakeHost {
            dir: TempDir::new(),
        };
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers/vfio-pci",
            "sys/bus/pci/drivers/e1000e",
            "sys/bus/pci/drivers/pcieport",
            "sys/kernel/iommu_groups",
            "sys/class/vfio-dev",
            "dev/vfio/devices",
        ] {
            std::fs::create_dir_all(h.path(d)).unwrap();
        }
        std::fs::write(h.path("sys/bus/pci/drivers_probe"), "").unwrap();
        std::fs::write(h.path("dev/iommu"), "").unwrap();
        h
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    fn root(&self) -> SysfsRoot {
        SysfsRoot(self.dir.0.clone())
    }

    /// A relative symlink at `link` (relative to the root) to `target` (relative to the
    /// root), the way sysfs links are: `../../bus/pci/drivers/vfio-pci`.
    fn link(&self, link: &str, target: &str) {
        // Within sys/, as the kernel does: bus/pci/devices/X -> ../../../devices/...
        let (l, t) = match (link.strip_prefix("sys/"), target.strip_prefix("sys/")) {
            (Some(l), Some(t)) => (l, t),
            _ => (link, target),
        };
        let ups = Path::new(l).parent().unwrap().components().count();
        let rel = format!("{}{t}", "../".repeat(ups));
        let at = self.path(link);
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(rel, at).unwrap();
    }

    /// A device below `parent` (or the host bridge), with its PCI class, bus view link.
    fn device(&self, bdf: &str, parent: Option<&Dev>, class: u32) -> Dev {
        let rel = match parent {
            Some(p) => format!("{}/{bdf}", p.rel),
            None => format!("sys/devices/pci0000:00/{bdf}"),
        };
        std::fs::create_dir_all(self.path(&rel)).unwrap();
        std::fs::write(
            self.path(&format!("{rel}/class")),
            format!("0x{class:06x}\n"),
        )
        .unwrap();
        self.link(&format!("sys/bus/pci/devices/{bdf}"), &rel);
        Dev {
            bdf: bdf.into(),
            rel,
        }
    }

    fn bind(&self, d: &Dev, driver: &str) {
        std::fs::create_dir_all(self.path(&format!("sys/bus/pci/drivers/{driver}"))).unwrap();
        self.link(
            &format!("{}/driver", d.rel),
            &format!("sys/bus/pci/drivers/{driver}"),
        );
        self.link(&format!("sys/bus/pci/drivers/{driver}/{}", d.bdf), &d.rel);
    }

    fn group(&self, d: &Dev, n: u32) {
        let g = format!("sys/kernel/iommu_groups/{n}");
        std::fs::create_dir_all(self.path(&format!("{g}/devices"))).unwrap();
        self.link(&format!("{}/iommu_group", d.rel), &g);
        self.link(&format!("{g}/devices/{}", d.bdf), &d.rel);
    }

    /// The VFIO cdev vfioN of `d` in sysfs, the class link, and (if `node`) its /dev node.
    fn cdev(&self, d: &Dev, n: u32, node: bool) {
        let rel = format!("{}/vfio-dev/vfio{n}", d.rel);
        std::fs::create_dir_all(self.path(&rel)).unwrap();
        std::fs::write(self.path(&format!("{rel}/dev")), format!("511:{n}\n")).unwrap();
        self.link(&format!("sys/class/vfio-dev/vfio{n}"), &rel);
        if node {
            std::fs::write(self.path(&format!("dev/vfio/devices/vfio{n}")), "").unwrap();
        }
    }

    /// A healthy assigned NIC 0000:01:00.0 behind root port 0000:00:01.0, group 5, vfio0.
    /// The PCIe root port [`FakeHost::healthy`] puts its NIC behind.
    fn port() -> Dev {
        Dev {
            bdf: "0000:00:01.0".into(),
            rel: "sys/devices/pci0000:00/0000:00:01.0".into(),
        }
    }

    fn healthy() -> (FakeHost, Dev) {
        let h = FakeHost::new();
        let port = h.device("0000:00:01.0", None, 0x060400);
        h.bind(&port, "pcieport");
        h.group(&port, 1);
        let nic = h.device("0000:01:00.0", Some(&port), 0x020000);
        h.bind(&nic, "vfio-pci");
        h.group(&nic, 5);
        h.cdev(&nic, 0, true);
        (h, nic)
    }

    fn config(&self, name: &str, text: &str) -> PathBuf {
        let dir = self.path("etc/vhost-user-iommu");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }
}

const VM1: &str = r#"
socket = "/run/vhost-user-iommu/vm1.sock"
backend = "auto"
vmm_uid = 64055
[[endpoint]]
id = 32
guest_pci = "00:04.0"
pci = "0000:01:00.0"
vfio_user_socket = "/run/vhost-user-iommu/vm1-32.sock"
"#;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn opts(h: &FakeHost) -> CheckOptions {
    CheckOptions {
        root: h.root(),
        ram_size: Some(4 * GIB),
        memlock: Some(Memlock {
            limit: None,
            cap_ipc_lock: false,
        }),
    }
}

fn lines(r: &Report, status: Status) -> Vec<String> {
    r.lines
        .iter()
        .filter(|l| l.status == status)
        .map(|l| l.message.clone())
        .collect()
}

fn only_failure(r: &Report) -> String {
    let f = lines(r, Status::Fail);
    assert_eq!(f.len(), 1, "expected exactly one failure:\n{r}");
    f[0].clone()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run the binary")
}

// ---------------------------------------------------------------------------------------------
// device → VM lookup

fn lookup_dir() -> TempDir {
    let d = TempDir::new();
    let w = |n: &str, t: &str| std::fs::write(d.0.join(n), t).unwrap();
    w("vm1.toml", VM1);
    w(
        "vm2.toml",
        "[[endpoint]]\nid = 1\npci = \"01:00.0\"\n[[endpoint]]\nid = 2\npci = \"0000:02:00.0\"\n",
    );
    w("vm3.toml", "[[endpoint]]\nid = 1\npci = \"0000:03:00.0\"\n");
    w(
        "broken.toml",
        "[[endpoint]]\nid = 1\npci = \"0000:01:00.0\"\nbogus = 1\n",
    );
    w(
        "bad name.toml",
        "[[endpoint]]\nid = 1\npci = \"0000:01:00.0\"\n",
    );
    w("vm1.toml.bak", VM1);
    w("notes.txt", "pci = \"0000:01:00.0\"");
    d
}

#[test]
fn lookup_finds_every_vm_listing_a_device_and_skips_broken_configs() {
    let d = lookup_dir();
    let l = deploy::vms_using(&d.0, addr("0000:01:00.0")).unwrap();
    assert_eq!(l.vms, ["vm1", "vm2"], "short and long addresses match");
    let w = l.warnings.join("\n");
    assert!(w.contains("broken.toml") && w.contains("bogus"), "{w}");
    assert!(w.contains("bad name"), "{w}");
    assert!(w.contains("listed by 2 VMs"), "{w}");

    let l = deploy::vms_using(&d.0, addr("0000:02:00.0")).unwrap();
    assert_eq!(l.vms, ["vm2"]);
    let l = deploy::vms_using(&d.0, addr("0000:04:00.0")).unwrap();
    assert!(l.vms.is_empty());
    assert!(deploy::vms_using(&d.0.join("missing"), addr("0000:04:00.0")).is_err());
}

#[test]
fn udev_lookup_prints_units_and_exits_1_for_unknown_devices() {
    let d = lookup_dir();
    let dir = d.0.to_str().unwrap();
    let o = run(&[
        "udev-lookup",
        "--config-dir",
        dir,
        "--units",
        "0000:03:00.0",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhost-user-iommu@vm3.service\n"
    );

    let devpath = "/devices/pci0000:00/0000:00:01.0/0000:01:00.0/vfio-dev/vfio0";
    let o = run(&["udev-lookup", "--config-dir", dir, "--units", devpath]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhost-user-iommu@vm1.service vhost-user-iommu@vm2.service\n"
    );
    let o = run(&["udev-lookup", "--config-dir", dir, "01:00.0"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "vm1\nvm2\n");

    let o = run(&["udev-lookup", "--config-dir", dir, "0000:09:00.0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "no VM, no output");

    let o = run(&["udev-lookup", "--config-dir", dir, "not-a-device"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
}

// ---------------------------------------------------------------------------------------------
// discovery and check against a fake sysfs

#[test]
fn a_healthy_host_passes_and_discovery_finds_the_cdev() {
    let (h, nic) = FakeHost::healthy();
    // The fake tree links like the kernel's sysfs.
    let rl = |p: &str| std::fs::read_link(h.path(p)).unwrap();
    assert_eq!(
        rl("sys/bus/pci/devices/0000:01:00.0"),
        Path::new("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0")
    );
    assert_eq!(
        rl(&format!("{}/driver", nic.rel)),
        Path::new("../../../../bus/pci/drivers/vfio-pci")
    );
    assert_eq!(
        rl(&format!("{}/iommu_group", nic.rel)),
        Path::new("../../../../kernel/iommu_groups/5")
    );
    let c = vfio::discover(&h.root(), addr("0000:01:00.0")).unwrap();
    assert_eq!(c.name, "vfio0");
    assert_eq!(c.node, h.path("dev/vfio/devices/vfio0"));
    let g = vfio::iommu_group(&h.root(), addr("01:00.0")).unwrap();
    assert_eq!(g.id, 5);

    let cfg = h.config("vm1", VM1);
    let r = deploy::check(&cfg, &opts(&h));
    assert!(r.passed(), "{r}");
    assert!(lines(&r, Status::Warn).is_empty(), "{r}");
    let ok = lines(&r, Status::Ok).join("\n");
    for want in [
        "bound to vfio-pci",
        "IOMMU group 5 is viable",
        "VFIO cdev",
        "iommufd",
        "RLIMIT_MEMLOCK is unlimited",
    ] {
        assert!(ok.contains(want), "{want} missing from\n{r}");
    }
}

#[test]
fn startup_waits_for_devices_bound_in_any_order() {
    let (h, nic) = FakeHost::healthy();
    let port = FakeHost::port();
    let gpu = h.device("0000:02:00.0", Some(&port), 0x030000);
    h.group(&gpu, 6);
    h.bind(&gpu, "nouveau");
    let both = [addr("0000:02:00.0"), addr("0000:01:00.0")];
    let e = vfio::wait_for_devices(&h.root(), &both, Duration::from_millis(200)).unwrap_err();
    assert!(
        e.to_string().contains("0000:02:00.0 is bound to nouveau"),
        "{e}"
    );

    let root = h.root();
    let waiter = std::thread::spawn(move || {
        vfio::wait_for_devices(&root, &both, Duration::from_secs(10)).map(|c| c.len())
    });
    std::thread::sleep(Duration::from_millis(300));
    h.bind(&gpu, "vfio-pci");
    h.cdev(&gpu, 1, true);
    assert_eq!(waiter.join().unwrap().unwrap(), 2);
    let _ = nic;
}

#[test]
fn a_device_on_another_driver_gets_the_rebind_commands() {
    let (h, nic) = FakeHost::healthy();
    h.bind(&nic, "e1000e");
    let e = vfio::discover(&h.root(), addr("0000:01:00.0")).unwrap_err();
    assert!(matches!(e, VfioError::WrongDriver { .. }), "{e}");
    let sys = h.path("sys");
    let s = sys.display();
    let want = format!(
        "0000:01:00.0 is bound to e1000e, not vfio-pci: echo vfio-pci > {s}/bus/pci/devices/0000:01:00.0/driver_override; echo 0000:01:00.0 > {s}/bus/pci/drivers/e1000e/unbind; echo 0000:01:00.0 > {s}/bus/pci/drivers_probe"
    );
    assert_eq!(e.to_string(), want);
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    assert!(only_failure(&r).contains(&want), "{r}");
}

#[test]
fn an_unbound_device_and_a_missing_vfio_pci_module_are_explained() {
    let (h, nic) = FakeHost::healthy();
    std::fs::remove_file(h.path(&format!("{}/driver", nic.rel))).unwrap();
    std::fs::remove_dir_all(h.path("sys/bus/pci/drivers/vfio-pci")).unwrap();
    let e = vfio::discover(&h.root(), addr("0000:01:00.0"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("0000:01:00.0 has no driver"), "{e}");
    assert!(e.contains("modprobe vfio-pci; echo vfio-pci >"), "{e}");
    assert!(!e.contains("unbind"), "{e}");
}

#[test]
fn a_group_shared_with_a_host_driver_is_not_viable() {
    let (h, nic) = FakeHost::healthy();
    let port = FakeHost::port();
    let sibling = h.device("0000:01:00.1", Some(&port), 0x020000);
    h.bind(&sibling, "e1000e");
    h.group(&sibling, 5);
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    let f = only_failure(&r);
    assert!(
        f.contains("IOMMU group 5 of 0000:01:00.0 is not viable"),
        "{f}"
    );
    assert!(f.contains("0000:01:00.1 is bound to e1000e"), "{f}");
    assert!(f.contains("drivers/e1000e/unbind"), "{f}");
    assert!(f.contains("iommu_groups/5/devices"), "{f}");

    // Unbound, pci-stub and bridges (whatever their driver) leave the group viable.
    h.bind(&sibling, "pci-stub");
    let unbound = h.device("0000:01:00.2", Some(&port), 0x020000);
    h.group(&unbound, 5);
    let bridge = h.device("0000:01:00.3", Some(&port), 0x060400);
    h.bind(&bridge, "shpchp");
    h.group(&bridge, 5);
    let g = vfio::require_viable_group(&h.root(), addr("0000:01:00.0")).unwrap();
    assert_eq!(g.members.len(), 4);
    assert!(
        g.members
            .iter()
            .any(|m| m.bridge && m.name == "0000:01:00.3")
    );
    let _ = nic;
}

#[test]
fn missing_group_cdev_node_and_device_each_fail_with_their_path() {
    let (h, nic) = FakeHost::healthy();
    std::fs::remove_file(h.path("dev/vfio/devices/vfio0")).unwrap();
    let f = only_failure(&deploy::check(&h.config("vm1", VM1), &opts(&h)));
    assert!(f.contains("dev/vfio/devices/vfio0 does not exist"), "{f}");

    std::fs::remove_dir_all(h.path(&format!("{}/vfio-dev", nic.rel))).unwrap();
    let f = only_failure(&deploy::check(&h.config("vm1", VM1), &opts(&h)));
    assert!(f.contains("no VFIO device cdev"), "{f}");
    assert!(f.contains("0000:01:00.0/vfio-dev"), "{f}");
    assert!(f.contains("CONFIG_VFIO_DEVICE_CDEV"), "{f}");

    std::fs::remove_file(h.path(&format!("{}/iommu_group", nic.rel))).unwrap();
    let e = vfio::require_viable_group(&h.root(), addr("0000:01:00.0")).unwrap_err();
    assert!(matches!(e, VfioError::NoIommuGroup { .. }));
    assert!(e.to_string().contains("intel_iommu=on"), "{e}");

    let other = VM1.replace("0000:01:00.0", "0000:07:00.0");
    let f = only_failure(&deploy::check(&h.config("vm1", &other), &opts(&h)));
    assert!(f.contains("no PCI device 0000:07:00.0"), "{f}");
    assert!(
        f.contains("bus/pci/devices/0000:07:00.0 does not exist"),
        "{f}"
    );
}

#[test]
fn iommufd_presence_fails_iommufd_and_warns_auto() {
    let (h, _) = FakeHost::healthy();
    std::fs::remove_file(h.path("dev/iommu")).unwrap();
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    assert!(r.passed(), "auto falls back to soft:\n{r}");
    assert!(
        lines(&r, Status::Warn)
            .join("\n")
            .contains("modprobe iommufd"),
        "{r}"
    );

    let iommufd = VM1.replace("\"auto\"", "\"iommufd\"");
    let r = deploy::check(&h.config("vm1", &iommufd), &opts(&h));
    assert!(only_failure(&r).contains("dev/iommu does not exist"), "{r}");
}

#[test]
fn the_soft_backend_skips_host_checks_with_a_note() {
    let h = FakeHost::new();
    std::fs::remove_file(h.path("dev/iommu")).unwrap();
    let soft = VM1.replace("\"auto\"", "\"soft\"");
    let r = deploy::check(&h.config("vm1", &soft), &opts(&h));
    assert!(r.passed(), "{r}");
    assert!(
        lines(&r, Status::Note)
            .join("\n")
            .contains("checks skipped"),
        "{r}"
    );
    assert!(
        !r.to_string().contains("0000:01:00.0"),
        "no device checks:\n{r}"
    );
}

#[test]
fn memlock_must_cover_the_ram_unless_cap_ipc_lock() {
    let (h, _) = FakeHost::healthy();
    let cfg = h.config("vm1", VM1);
    let mut o = opts(&h);
    o.memlock = Some(Memlock {
        limit: Some(64 << 20),
        cap_ipc_lock: false,
    });
    let f = only_failure(&deploy::check(&cfg, &o));
    assert!(
        f.contains("RLIMIT_MEMLOCK is 64M but the VM's RAM is 4G"),
        "{f}"
    );
    assert!(f.contains("LimitMEMLOCK=infinity"), "{f}");
    o.memlock = Some(Memlock {
        limit: Some(8 * GIB),
        cap_ipc_lock: false,
    });
    assert!(deploy::check(&cfg, &o).passed());
    o.memlock = Some(Memlock {
        limit: Some(0),
        cap_ipc_lock: true,
    });
    assert!(deploy::check(&cfg, &o).passed());
    o.ram_size = None;
    let r = deploy::check(&cfg, &o);
    assert!(
        lines(&r, Status::Note).join("\n").contains("--ram-size"),
        "{r}"
    );
    // This process's own budget can be read.
    Memlock::current().unwrap();
}

#[test]
fn config_problems_are_reported() {
    let (h, _) = FakeHost::healthy();
    let r = deploy::check(&h.config("vm1", "bogus = 1\n"), &opts(&h));
    assert!(only_failure(&r).contains("bogus"), "{r}");
    let r = deploy::check(&h.path("etc/none.toml"), &opts(&h));
    assert!(only_failure(&r).contains("cannot read"), "{r}");

    // No socket, no vfio-user socket, and a second VM listing the same device: warnings.
    let loose = "[[endpoint]]\nid = 32\npci = \"0000:01:00.0\"\n";
    h.config("vm2", VM1);
    let r = deploy::check(&h.config("vm1", loose), &opts(&h));
    assert!(r.passed(), "{r}");
    let w = lines(&r, Status::Warn).join("\n");
    assert!(w.contains("no `socket`"), "{w}");
    assert!(w.contains("no `vfio_user_socket`"), "{w}");
    assert!(w.contains("also listed by VM(s) vm2"), "{w}");
}

#[test]
fn socket_paths_with_dot_dot_fail_the_runtime_directory_check() {
    let (h, _) = FakeHost::healthy();
    for (key, value) in [
        ("socket", "/run/vhost-user-iommu/../../etc/vm1.sock"),
        ("vfio_user_socket", "/run/vhost-user-iommu/../vm1-32.sock"),
    ] {
        let text = VM1
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} =")) {
                    format!("{key} = \"{value}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let r = deploy::check(&h.config("vm1", &text), &opts(&h));
        let f = only_failure(&r);
        assert!(f.contains(value) && f.contains(".."), "{r}");
    }
}

#[test]
fn a_socket_path_another_vm_uses_fails_the_check() {
    let (h, _) = FakeHost::healthy();
    // vm2 is a different VM (its own device-less endpoint) that took vm1's vfio-user socket.
    h.config(
        "vm2",
        "socket = \"/run/vhost-user-iommu/vm2.sock\"\nbackend = \"soft\"\n\
         [[endpoint]]\nid = 1\nvfio_user_socket = \"/run/vhost-user-iommu/vm1-32.sock\"\n",
    );
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    let f = only_failure(&r);
    assert!(
        f.contains("/run/vhost-user-iommu/vm1-32.sock") && f.contains("vm2"),
        "{r}"
    );
    // Distinct paths pass.
    h.config(
        "vm2",
        "socket = \"/run/vhost-user-iommu/vm2.sock\"\nbackend = \"soft\"\n",
    );
    assert!(deploy::check(&h.config("vm1", VM1), &opts(&h)).passed());
}

#[test]
fn vms_whose_daemons_admit_the_same_vmm_are_warned() {
    let (h, _) = FakeHost::healthy();
    let vm2 = |uid: u32| {
        format!(
            "socket = \"/run/vhost-user-iommu/vm2.sock\"\nbackend = \"soft\"\nvmm_uid = {uid}\n"
        )
    };
    h.config("vm2", &vm2(64055));
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    let w = lines(&r, Status::Warn).join("\n");
    assert!(
        w.contains("VM(s) vm2") && w.contains("same VMM credentials"),
        "{r}"
    );
    h.config("vm2", &vm2(64056));
    let r = deploy::check(&h.config("vm1", VM1), &opts(&h));
    assert!(lines(&r, Status::Warn).is_empty(), "{r}");
}

#[test]
fn a_socket_directory_others_can_write_fails_the_check() {
    use std::os::unix::fs::PermissionsExt;
    let (h, _) = FakeHost::healthy();
    let run = h.path("run-vm1");
    std::fs::create_dir_all(&run).unwrap();
    let text = VM1.replace(
        "/run/vhost-user-iommu/vm1.sock",
        run.join("vm1.sock").to_str().unwrap(),
    );
    for (mode, fails) in [(0o770, true), (0o750, false), (0o1777, false)] {
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = deploy::check(&h.config("vm1", &text), &opts(&h));
        let f = lines(&r, Status::Fail).join("\n");
        assert_eq!(
            f.contains("writable by its group or others"),
            fails,
            "{mode:o}: {r}"
        );
    }
}

#[test]
fn apparmor_rules_name_only_this_vms_sockets_and_table() {
    let p = std::path::Path::new("vm1.toml");
    let cfg = VmConfig::parse(
        "socket = \"/run/vhost-user-iommu/vm1.sock\"\n\
         control_socket = \"/run/vhost-user-iommu/vm1.ctl\"\n\
         [[endpoint]]\nid = 32\nvfio_user_socket = \"/run/vhost-user-iommu/vm1-32.sock\"\n",
        p,
    )
    .unwrap();
    let rules = deploy::apparmor_rules(&cfg, "vm1").unwrap();
    let lines: Vec<&str> = rules.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "  \"/run/vhost-user-iommu/\" r,",
            "  \"/run/vhost-user-iommu/vm1.sock\" rw,",
            "  \"/run/vhost-user-iommu/vm1-32.sock\" rw,",
            "  \"/var/lib/vhost-user-iommu/vm1-viot.bin\" r,",
        ]
    );
    assert!(
        !rules.contains("vm1.ctl"),
        "the control socket is the operator's"
    );
    let glob = VmConfig::parse("socket = \"/run/vhost-user-iommu/vm*.sock\"\n", p).unwrap();
    assert!(
        deploy::apparmor_rules(&glob, "vm1")
            .unwrap_err()
            .contains("pattern")
    );
    let none = VmConfig::parse("backend = \"soft\"\n", p).unwrap();
    assert!(deploy::apparmor_rules(&none, "vm1").is_err());
}

#[test]
fn the_check_command_prints_a_report_and_fails_on_problems() {
    let (h, nic) = FakeHost::healthy();
    let cfg = h.config("vm1", VM1);
    let root = h.dir.0.to_str().unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let o = run(&["check", "--config", cfg_s, "--sysfs-root", root]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("OK   endpoint 32 (0000:01:00.0): bound to vfio-pci")),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with("0 failed, 0 warnings, 7 passed"),
        "{out}"
    );

    h.bind(&nic, "e1000e");
    let o = run(&[
        "check",
        "--config",
        cfg_s,
        "--sysfs-root",
        root,
        "--ram-size",
        "4G",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL endpoint 32") && l.contains("e1000e/unbind")),
        "{out}"
    );

    let o = run(&["check", "--config", cfg_s, "--ram-size", "lots"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a size"));
}

// ---------------------------------------------------------------------------------------------
// sd_notify

#[test]
fn notify_reaches_a_path_socket() {
    let d = TempDir::new();
    let p = d.0.join("notify");
    let rx = UnixDatagram::bind(&p).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    deploy::notify_to(p.as_os_str(), "READY=1").unwrap();
    let mut buf = [0u8; 64];
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
}

#[test]
fn notify_reaches_an_abstract_socket() {
    let name = format!("vhost-user-iommu-test-{}", std::process::id());
    let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    deploy::notify_to(format!("@{name}").as_ref(), "STATUS=x").unwrap();
    let mut buf = [0u8; 64];
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STATUS=x");
}

/// Runs only in the child process spawned by `notify_ready_uses_notify_socket` (the
/// environment of this multi-threaded test process is never modified).
#[test]
#[ignore = "helper: run by notify_ready_uses_notify_socket with its own environment"]
fn notify_ready_child() {
    let Some(expect) = std::env::var_os("VUI_NOTIFY_EXPECT") else {
        return;
    };
    assert_eq!(deploy::notify_ready().unwrap(), expect == "sent");
}

fn notify_child(socket: Option<&str>, expect: &str) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["notify_ready_child", "--exact", "--ignored", "--quiet"])
        .env("VUI_NOTIFY_EXPECT", expect);
    match socket {
        Some(s) => c.env("NOTIFY_SOCKET", s),
        None => c.env_remove("NOTIFY_SOCKET"),
    };
    let o = c.output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 passed"),
        "{o:?}"
    );
}

#[test]
fn notify_ready_uses_notify_socket() {
    let name = format!("vhost-user-iommu-ready-{}", std::process::id());
    let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    notify_child(Some(&format!("@{name}")), "sent");
    let mut buf = [0u8; 64];
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    notify_child(None, "not sent");
}

// ---------------------------------------------------------------------------------------------
// the shipped files

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Splits a udev rule line into (key, operator, value) triples.
fn udev_pairs(line: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let key_len = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .ok_or_else(|| format!("no operator after {rest:?}"))?;
        let (key, mut tail) = rest.split_at(key_len);
        let mut full_key = key.to_string();
        if let Some(t) = tail.strip_prefix('{') {
            let end = t.find('}').ok_or("unclosed {")?;
            full_key = format!("{key}{{{}}}", &t[..end]);
            tail = &t[end + 1..];
        }
        if key.is_empty() {
            return Err(format!("no key at {rest:?}"));
        }
        let op = ["==", "!=", "+=", "-=", ":=", "="]
            .into_iter()
            .find(|o| tail.starts_with(o))
            .ok_or_else(|| format!("bad operator after {full_key}"))?;
        tail = &tail[op.len()..];
        let t = tail.strip_prefix('"').ok_or("value must be quoted")?;
        let end = t.find('"').ok_or("unclosed value")?;
        out.push((full_key.clone(), op.to_string(), t[..end].to_string()));
        rest = t[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return Err("trailing comma".into());
            }
        } else if !rest.is_empty() {
            return Err(format!("expected ',' before {rest:?}"));
        }
    }
    Ok(out)
}

#[test]
fn the_udev_rules_parse_and_their_program_is_this_binary() {
    let text = std::fs::read_to_string(repo("udev/90-vhost-user-iommu.rules")).unwrap();
    const MATCH: &[&str] = &[
        "ACTION",
        "SUBSYSTEM",
        "SUBSYSTEMS",
        "KERNEL",
        "KERNELS",
        "DRIVERS",
        "PROGRAM",
    ];
    const ASSIGN: &[&str] = &["OWNER", "GROUP", "MODE", "TAG", "GOTO", "LABEL", "RUN"];
    let (mut labels, mut gotos, mut programs) = (Vec::new(), Vec::new(), Vec::new());
    let mut wants = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        assert!(!t.ends_with('\\'), "line {}: no continuations", n + 1);
        let pairs = udev_pairs(t).unwrap_or_else(|e| panic!("line {}: {e}: {line}", n + 1));
        for (k, op, v) in pairs {
            let base = k.split('{').next().unwrap();
            if base == "PROGRAM" {
                // PROGRAM runs on "=" as well as "==": both are matches.
                assert!(
                    ["=", "==", "!="].contains(&op.as_str()),
                    "line {}: {k}{op}",
                    n + 1
                );
            } else if MATCH.contains(&base) {
                assert!(
                    op == "==" || op == "!=",
                    "line {}: {k}{op} must match",
                    n + 1
                );
            } else if base == "ENV" {
                assert!(op != "-=" && op != ":=", "line {}: {k}{op}", n + 1);
                wants |= k == "ENV{SYSTEMD_WANTS}" && op == "+=" && v == "%c";
            } else {
                assert!(ASSIGN.contains(&base), "line {}: unknown key {k}", n + 1);
                assert!(
                    !matches!(op.as_str(), "==" | "!="),
                    "line {}: {k}{op}",
                    n + 1
                );
            }
            match base {
                "GOTO" => gotos.push(v),
                "LABEL" => labels.push(v),
                "PROGRAM" => programs.push(v),
                _ => {}
            }
        }
    }
    assert!(
        wants,
        "the rule must add the looked-up units to SYSTEMD_WANTS"
    );
    for g in &gotos {
        assert!(labels.contains(g), "GOTO {g} has no LABEL");
    }
    // The PROGRAM, run with this build and a test config directory, does what the rule needs.
    assert_eq!(programs.len(), 1);
    let argv: Vec<&str> = programs[0].split_whitespace().collect();
    assert_eq!(argv[0], "/usr/bin/vhost-user-iommu");
    let d = lookup_dir();
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| match *a {
            "/etc/vhost-user-iommu" => d.0.display().to_string(),
            "%p" => "/devices/pci0000:00/0000:00:02.0/0000:03:00.0/vfio-dev/vfio3".into(),
            a => a.into(),
        })
        .collect();
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhost-user-iommu@vm3.service\n"
    );
}

/// Parses a unit file into (section, key, value) triples, rejecting anything else.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = None;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(s) = t.strip_prefix('[') {
            let s = s
                .strip_suffix(']')
                .unwrap_or_else(|| panic!("line {}: {t}", n + 1));
            section = Some(s.to_string());
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {t}", n + 1));
        let s = section
            .clone()
            .unwrap_or_else(|| panic!("line {}: key outside a section", n + 1));
        assert!(
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric()),
            "line {}: bad key {k:?}",
            n + 1
        );
        assert!(!v.ends_with('\\'), "line {}: no continuations", n + 1);
        out.push((s, k.to_string(), v.to_string()));
    }
    out
}

#[test]
fn the_service_template_has_the_contract_settings() {
    let text = std::fs::read_to_string(repo("systemd/vhost-user-iommu@.service")).unwrap();
    let e = unit_entries(&text);
    let sections: Vec<&str> = e.iter().map(|(s, _, _)| s.as_str()).collect();
    for s in &sections {
        assert!(["Unit", "Service", "Install"].contains(s), "section {s}");
    }
    let get = |s: &str, k: &str| -> Vec<&str> {
        e.iter()
            .filter(|(es, ek, _)| es == s && ek == k)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |s: &str, k: &str| {
        let v = get(s, k);
        assert_eq!(v.len(), 1, "[{s}] {k}: {v:?}");
        v[0]
    };
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(
        one("Service", "ExecStart"),
        "/usr/bin/vhost-user-iommu --config /etc/vhost-user-iommu/%i.toml \
         --control-socket /run/vhost-user-iommu/%i.ctl",
        "the control socket is on for every VM, in the runtime directory"
    );
    assert_eq!(one("Service", "RuntimeDirectory"), "vhost-user-iommu");
    assert_eq!(one("Service", "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(one("Service", "LimitMEMLOCK"), "infinity");
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert_eq!(one("Service", "RestrictAddressFamilies"), "AF_UNIX");
    assert_eq!(one("Service", "User"), "vhost-user-iommu");
    let devices = get("Service", "DeviceAllow");
    assert!(
        devices.contains(&"/dev/iommu rw") && devices.contains(&"char-vfio-dev rw"),
        "{devices:?}"
    );
    for k in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
    ] {
        assert!(["yes", "strict"].contains(&one("Service", k)), "{k}");
    }
    assert!(
        get("Service", "PrivateDevices").is_empty(),
        "PrivateDevices hides /dev/vfio"
    );
    let filters = get("Service", "SystemCallFilter").join(" ");
    assert!(filters.contains("@system-service"), "{filters}");
    assert!(
        !filters.contains("ioctl") && !filters.contains("@basic-io"),
        "{filters}"
    );

    // The options ExecStart passes exist in this build (--print-capabilities exits first).
    let exec = one("Service", "ExecStart");
    let mut args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    args.push("--print-capabilities");
    let o = run(&args);
    assert!(o.status.success(), "{o:?}");

    let sysusers = std::fs::read_to_string(repo("systemd/vhost-user-iommu.sysusers")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", "vhost-user-iommu"])),
        "{sysusers}"
    );
}

#[test]
fn a_config_serving_devices_without_naming_its_vmm_gets_a_warning() {
    let (h, _nic) = FakeHost::healthy();
    let anyone = VM1.replace("vmm_uid = 64055\n", "");
    let r = deploy::check(&h.config("vm1", &anyone), &opts(&h));
    assert!(r.passed(), "a warning, not a failure: {r}");
    let w = lines(&r, Status::Warn).join("\n");
    assert!(w.contains("no `vmm_uid` or `vmm_gid`"), "{r}");
    let gid = VM1.replace("vmm_uid = 64055", "vmm_gid = 64055");
    let r = deploy::check(&h.config("vm1", &gid), &opts(&h));
    assert!(lines(&r, Status::Warn).is_empty(), "a gid is enough: {r}");
}
