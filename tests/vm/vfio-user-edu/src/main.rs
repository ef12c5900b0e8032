//! vfio-user-edu: the daemon's vfio-user front against real devices (tests/vm/run.sh), inside
//! the test VM.
//!
//! It writes a per-VM config (backend iommufd, endpoints 1 and 2 = the two edus, each with a
//! vfio-user socket, plus the vhost-user socket), starts the real daemon binary (embedded by
//! build.rs, written to /tmp), connects the crate's `driver::TestVm` to the vhost-user socket
//! (the guest's IOMMU driver, 64 MiB of memfd guest RAM) and a vfio-user client written from
//! the protocol document (the crate's `driver::vfio_user_client`, the VMM) to each device socket. Checks: VERSION and
//! DEVICE_GET_INFO, config space through the socket vs sysfs, BAR0 through the mmapped fd of
//! GET_REGION_INFO (no socket message per access), edu DMA through the daemon's translations,
//! MSI through SET_IRQS eventfds, DEVICE_RESET, the cleanup on a vfio-user disconnect, and
//! DMA_MAP checked against the vhost-user memory table.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs;
use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::protocol::{MAP_F_READ, MAP_F_WRITE, Request, Status};
use vhost_user_iommu::testing::service_manager::ServiceManager;
use vmm_sys_util::eventfd::EventFd;

use vhost_user_iommu::driver::vfio_user_client::{
    CallError, Client, DMA_READ, DMA_WRITE, REG_MMAP, Result, SET_ACTION_TRIGGER, SET_DATA_EVENTFD,
    le32,
};

// The VM tier's guest kit: edu's registers, discovery and BAR mapping (libc only) and the
use guest_kit::layout::*;
use guest_kit::mmio::*;
use guest_kit::report::{Report, differences};

/// The static daemon binary (build.rs; empty when built without VFIO_USER_EDU_DAEMON).
static DAEMON: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/daemon.bin"));

const DIR: &str = "/tmp/vfio-user-edu";
/// The daemon's control socket (its state, as an operator queries it).
const CONTROL: &str = "/tmp/vfio-user-edu/control.sock";
const TIMEOUT: Duration = Duration::from_secs(10);

// VFIO (<linux/vfio.h>, the maintained bindings) and PCI (<linux/pci_regs.h>) constants.
use viommu_uapi::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD as IRQ_INFO_EVENTFD,
    VFIO_PCI_BAR0_REGION_INDEX as BAR0, VFIO_PCI_CONFIG_REGION_INDEX as CONFIG,
    VFIO_PCI_MSI_IRQ_INDEX as MSI, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
};
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_CAP_ID_MSI: u8 = 0x05;

// edu (QEMU hw/misc/edu.c), beyond the registers in guest-kit/mmio.rs.
const EDU_ID_VALUE: u32 = 0x0100_00ed;
const EDU_IRQ_RAISE: usize = 0x60;
const EDU_DMA_IRQ_STATUS: u32 = 0x100;

const RAM_SIZE: u64 = 64 << 20;
/// A fourth DMA buffer, beside guest-kit's layout.
const GPA_D: u64 = 0x40_0000;

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8) ^ seed)
        .collect()
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// One page of edu DMA through `bar` (mapped from the fd a GET_REGION_INFO reply carried);
/// `irq` asks for the completion interrupt.
fn dma(bar: &Bar, src: u64, dst: u64, to_ram: bool, irq: bool) -> Result<()> {
    bar.edu_dma(src, dst, to_ram, irq)
        .map_err(|e| format!("edu {e}"))
}

/// edu reads the page at `iova` into its buffer.
fn load(bar: &Bar, iova: u64) -> Result<()> {
    dma(bar, iova, EDU_BUFFER, false, false)
}

/// edu writes its buffer to the page at `iova`.
fn store(bar: &Bar, iova: u64) -> Result<()> {
    dma(bar, EDU_BUFFER, iova, true, false)
}

/// Waits up to `t` for `e` to be signalled; returns the count read (0 = timed out).
fn wait_event(e: &EventFd, t: Duration) -> Result<u64> {
    let mut p = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    if n < 0 {
        return Err(format!("poll: {}", std::io::Error::last_os_error()));
    }
    if n == 0 {
        return Ok(0);
    }
    e.read().map_err(|e| format!("eventfd read: {e}"))
}

/// Waits for edu's interrupt on `e`, then reads and acknowledges its IRQ status: the status and
/// the microseconds since `t`.
fn edu_irq(bar: &Bar, e: &EventFd, t: Instant) -> Result<(u32, f64)> {
    let n = wait_event(e, TIMEOUT)?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    let st = bar.read_u32(EDU_IRQ_STATUS);
    bar.write_u32(EDU_IRQ_ACK, st);
    if n == 0 {
        return Err(format!("no event within {TIMEOUT:?} (irq status {st:#x})"));
    }
    Ok((st, us))
}

fn drain(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

// ---- sysfs: what the kernel says about the devices ----

struct Edu {
    bdf: String,
    sock: PathBuf,
}

impl Edu {
    fn sysfs(&self) -> PathBuf {
        Path::new("/sys/bus/pci/devices").join(&self.bdf)
    }
    fn sysfs_config(&self) -> Result<Vec<u8>> {
        let p = self.sysfs().join("config");
        fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
    }
    /// BAR0's size from /sys/.../resource (first line: start end flags).
    fn sysfs_bar0_size(&self) -> Result<u64> {
        let p = self.sysfs().join("resource");
        let t = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let line = t.lines().next().ok_or("empty resource file")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).unwrap_or(0))
            .collect();
        if v.len() < 2 || v[1] < v[0] {
            return Err(format!("resource line {line:?}"));
        }
        Ok(v[1] - v[0] + 1)
    }
}

/// Offset of the MSI capability in a config space.
fn msi_cap(cfg: &[u8]) -> Option<usize> {
    let mut off = *cfg.get(PCI_CAPABILITY_LIST)? as usize & !3;
    for _ in 0..48 {
        if off < 0x40 || off + 2 > cfg.len() {
            return None;
        }
        if cfg[off] == PCI_CAP_ID_MSI {
            return Some(off);
        }
        off = cfg[off + 1] as usize & !3;
    }
    None
}

fn msi_enabled_in_sysfs(edu: &Edu) -> Result<bool> {
    let cfg = edu.sysfs_config()?;
    let off = msi_cap(&cfg).ok_or("no MSI capability in sysfs config")?;
    Ok(u16::from_le_bytes([cfg[off + 2], cfg[off + 3]]) & 1 != 0)
}

fn bus_master_in_sysfs(edu: &Edu) -> Result<bool> {
    let cfg = edu.sysfs_config()?;
    Ok(u16::from_le_bytes([cfg[4], cfg[5]]) & PCI_COMMAND_MASTER != 0)
}

fn edus() -> Result<Vec<Edu>> {
    Ok(edu_bdfs()?
        .into_iter()
        .enumerate()
        .map(|(i, bdf)| Edu {
            bdf,
            sock: Path::new(DIR).join(format!("ep{}.sock", i + 1)),
        })
        .collect())
}

// ---- the daemon ----

struct Daemon {
    child: Option<Child>,
    vhost_sock: PathBuf,
    /// The daemon's log lines (its stderr, also copied to ours), across restarts.
    log: Arc<Mutex<Vec<String>>>,
    log_thread: Option<thread::JoinHandle<()>>,
    /// Runs the daemon as systemd runs a unit: its fd store survives a crash.
    systemd: ServiceManager,
    command: Vec<std::ffi::OsString>,
}

impl Daemon {
    fn start(edus: &[Edu]) -> Result<Daemon> {
        fs::create_dir_all(DIR).map_err(|e| format!("{DIR}: {e}"))?;
        let bin = if !DAEMON.is_empty() {
            let p = Path::new(DIR).join("vhost-user-iommu");
            fs::write(&p, DAEMON).map_err(|e| format!("{}: {e}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(s)?;
            p
        } else {
            std::env::var_os("VFIO_USER_EDU_DAEMON")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/bin/vhost-user-iommu".into())
        };
        let vhost_sock = Path::new(DIR).join("viommu.sock");
        let mut cfg = format!(
            "# written by vfio-user-edu\nsocket = \"{}\"\nbackend = \"iommufd\"\n",
            vhost_sock.display()
        );
        for (i, e) in edus.iter().enumerate() {
            cfg += &format!(
                "\n[[endpoint]]\nid = {}\npci = \"{}\"\nvfio_user_socket = \"{}\"\n",
                i + 1,
                e.bdf,
                e.sock.display()
            );
        }
        let cfg_path = Path::new(DIR).join("vm.toml");
        fs::write(&cfg_path, &cfg).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let notify = Path::new(DIR).join("notify");
        let _ = fs::remove_file(&notify);
        let systemd = ServiceManager::start(&notify).map_err(|e| format!("notify socket: {e}"))?;
        let mut d = Daemon {
            child: None,
            vhost_sock,
            log: Arc::new(Mutex::new(Vec::new())),
            log_thread: None,
            systemd,
            command: vec![
                bin.into(),
                "--config".into(),
                cfg_path.into(),
                "--control-socket".into(),
                CONTROL.into(),
                "-v".into(),
            ],
        };
        d.spawn(Vec::new())?;
        let t = Instant::now();
        let socks: Vec<&Path> = std::iter::once(d.vhost_sock.as_path())
            .chain(edus.iter().map(|e| e.sock.as_path()))
            .collect();
        while !socks.iter().all(|p| p.exists()) {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                d.child = None;
                return Err(format!("the daemon exited before serving: {st}"));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err("the daemon's sockets did not appear within 60 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// Starts the daemon as a unit of `systemd`, with `passed` from its fd store.
    fn spawn(&mut self, passed: Vec<(String, OwnedFd)>) -> Result<()> {
        let cmd: Vec<&std::ffi::OsStr> = self.command.iter().map(|a| a.as_os_str()).collect();
        let mut child = self
            .systemd
            .spawn(&cmd, passed, |c| {
                c.stderr(Stdio::piped());
            })
            .map_err(|e| format!("start {:?}: {e}", self.command[0]))?;
        let log = self.log.clone();
        self.log_thread = child.stderr.take().map(|err| {
            thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(|l| l.ok()) {
                    // One write per line, so it does not interleave with our own output.
                    let out = format!("daemon: {line}\n");
                    let _ =
                        std::io::Write::write_all(&mut std::io::stderr().lock(), out.as_bytes());
                    log.lock().unwrap().push(line);
                }
            })
        });
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then started again as systemd restarts a unit (with its fd store); returns the
    /// new daemon's first log line's index and when the kill was sent.
    fn crash_and_restart(&mut self) -> Result<(usize, Instant)> {
        let mut c = self.child.take().ok_or("no daemon")?;
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        let killed = Instant::now();
        c.wait().map_err(s)?;
        if let Some(t) = self.log_thread.take() {
            let _ = t.join();
        }
        self.systemd.sync().map_err(s)?;
        let mark = self.log.lock().unwrap().len();
        let passed = self.systemd.passed().map_err(s)?;
        self.spawn(passed)?;
        Ok((mark, killed))
    }

    /// Waits up to `t` for a log line containing `what`, from line `from` on.
    fn wait_log_from(&self, from: usize, what: &str, t: Duration) -> Option<String> {
        let end = Instant::now() + t;
        loop {
            if let Some(l) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|l| l.contains(what))
            {
                return Some(l.clone());
            }
            if Instant::now() > end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `t` for a log line containing `what`.
    fn wait_log(&self, what: &str, t: Duration) -> Option<String> {
        self.wait_log_from(0, what, t)
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> Result<String> {
        let Some(mut c) = self.child.take() else {
            return Err("no daemon".into());
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().map_err(s)? {
                // Its stderr is closed: the last log lines are out before our verdict.
                if let Some(t) = self.log_thread.take() {
                    let _ = t.join();
                }
                return if st.success() {
                    Ok(format!(
                        "{st} after {:.0} ms",
                        t.elapsed().as_secs_f64() * 1e3
                    ))
                } else {
                    Err(format!("exited {st}"))
                };
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                return Err("still running 20 s after SIGTERM (killed)".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vm_req(vm: &mut TestVm, r: Request, what: &str) -> Result<()> {
    match vm.request(&r).map_err(s)? {
        Status::Ok => Ok(()),
        st => Err(format!("{what}: status {}", st.name())),
    }
}

fn attach(vm: &mut TestVm, d: u32, ep: u32) -> Result<()> {
    vm_req(
        vm,
        Request::attach(d, ep),
        &format!("ATTACH endpoint {ep} to domain {d}"),
    )
}

fn map(vm: &mut TestVm, d: u32, iova: u64, gpa: u64) -> Result<()> {
    vm_req(
        vm,
        Request::map(d, iova, iova + PAGE - 1, gpa, MAP_F_READ | MAP_F_WRITE),
        &format!("MAP {iova:#x} -> {gpa:#x} in domain {d}"),
    )
}

fn ram_fill(vm: &TestVm, gpa: u64, b: u8) -> Result<()> {
    vm.ram().fill(gpa, PAGE as usize, b).map_err(s)
}

fn ram_expect(vm: &TestVm, gpa: u64, want: &[u8], what: &str) -> Result<()> {
    let mut got = vec![0u8; want.len()];
    vm.ram().read(gpa, &mut got).map_err(s)?;
    match differences(&got, |i| want[i]) {
        None => Ok(()),
        Some(d) => Err(format!("{what}: at GPA {gpa:#x}, {d}")),
    }
}

/// Connects and negotiates VERSION (QEMU's capabilities).
fn connect(edu: &Edu) -> Result<(Client, String)> {
    let mut c = Client::connect(&edu.sock, TIMEOUT)?;
    let (maj, min, caps) = c
        .version(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}"#)
        .map_err(|e| format!("VERSION: {e}"))?;
    if (maj, min) != (0, 0) {
        return Err(format!("server speaks {maj}.{min}"));
    }
    let fds = caps["capabilities"]["max_msg_fds"].as_u64().unwrap_or(0);
    if fds < 1 {
        return Err(format!("server capabilities {caps}"));
    }
    Ok((c, format!("0.0, server capabilities {caps}")))
}

fn command(c: &mut Client) -> Result<u16> {
    let b = c.read(CONFIG, PCI_COMMAND, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn set_command_bits(c: &mut Client, bits: u16) -> Result<u16> {
    let cmd = command(c)? | bits;
    c.write(CONFIG, PCI_COMMAND, &cmd.to_le_bytes())?;
    let now = command(c)?;
    if now & bits != bits {
        return Err(format!(
            "PCI_COMMAND reads {now:#06x} after writing {cmd:#06x}"
        ));
    }
    Ok(now)
}

/// GET_REGION_INFO of BAR0, checked, and its mapping.
fn map_bar0(c: &mut Client, edu: &Edu) -> Result<(Bar, String)> {
    let info = c.region_info(BAR0)?;
    let want = edu.sysfs_bar0_size()?;
    if info.size != want {
        return Err(format!("BAR0 size {:#x}, sysfs says {want:#x}", info.size));
    }
    if info.flags & REG_MMAP == 0 {
        return Err(format!("BAR0 flags {:#x} without MMAP", info.flags));
    }
    let areas = info.sparse.clone().ok_or("no SPARSE_MMAP capability")?;
    let &(aoff, asize) = areas.first().ok_or("no sparse mmap area")?;
    if aoff != 0 || asize < 0x100 {
        return Err(format!("sparse areas {areas:?}"));
    }
    let fd = info.fd.as_ref().ok_or("no fd with the full region info")?;
    let off = info.offset + aoff;
    let bar = Bar::map(fd, off, asize as usize)
        .map_err(|e| format!("region fd at {off:#x}+{asize:#x}: {e}"))?;
    Ok((
        bar,
        format!(
            "size {:#x} = sysfs, offset {:#x}, flags {:#x}, caps {:?}, sparse areas {areas:x?}, fd passed",
            info.size, info.offset, info.flags, info.cap_ids
        ),
    ))
}

struct Ctx {
    edus: Vec<Edu>,
    vm: TestVm,
}

fn basic_checks(rep: &mut Report, edu: &Edu, ep: u32) -> Option<(Client, Bar)> {
    let tag = format!("endpoint {ep} ({})", edu.bdf);
    let mut c = None;
    rep.check(
        &format!("{tag}: vfio-user VERSION negotiated"),
        connect(edu).map(|(cl, note)| {
            c = Some(cl);
            note
        }),
    );
    let mut c = c?;
    rep.check(
        &format!("{tag}: DEVICE_GET_INFO matches the device"),
        (|| {
            let (argsz, flags, nr, ni) = c.info()?;
            let msi_vectors = {
                let cfg = edu.sysfs_config()?;
                let off = msi_cap(&cfg).ok_or("no MSI capability in sysfs config")?;
                let ctrl = u16::from_le_bytes([cfg[off + 2], cfg[off + 3]]);
                1u32 << ((ctrl >> 1) & 7)
            };
            let (mflags, mcount) = c.irq_info(MSI)?;
            if argsz != 16
                || flags & VFIO_DEVICE_FLAGS_PCI == 0
                || nr != VFIO_PCI_NUM_REGIONS
                || ni != VFIO_PCI_NUM_IRQS
            {
                return Err(format!(
                    "argsz {argsz}, flags {flags:#x}, {nr} regions, {ni} IRQ indexes (vfio-pci: PCI flag, {VFIO_PCI_NUM_REGIONS} regions, {VFIO_PCI_NUM_IRQS} IRQ indexes)"
                ));
            }
            if mflags & IRQ_INFO_EVENTFD == 0 || mcount != msi_vectors {
                return Err(format!(
                    "MSI IRQ info flags {mflags:#x} count {mcount}; the MSI capability offers {msi_vectors}"
                ));
            }
            Ok(format!(
                "flags {flags:#x} (PCI{}), num_regions {nr}, num_irqs {ni}; MSI index: {mcount} vector(s) = the config space's MSI capability",
                if flags & VFIO_DEVICE_FLAGS_RESET != 0 { "|RESET" } else { "" }
            ))
        })(),
    );
    rep.check(
        &format!("{tag}: config space through REGION_READ = /sys/bus/pci/devices/{}/config", edu.bdf),
        (|| {
            let info = c.region_info(CONFIG)?;
            if info.fd.is_some() || info.flags & REG_MMAP != 0 {
                return Err(format!("config region offered for mmap: flags {:#x}", info.flags));
            }
            let sys = edu.sysfs_config()?;
            let n = (info.size as usize).min(sys.len());
            if n < 64 {
                return Err(format!("config region size {:#x}, sysfs {} bytes", info.size, sys.len()));
            }
            let got = c.read(CONFIG, 0, n as u32)?;
            // sysfs again: the device may change status bits meanwhile; both reads agree or fail.
            let sys = edu.sysfs_config()?;
            let vendor = u16::from_le_bytes([got[0], got[1]]);
            let device = u16::from_le_bytes([got[2], got[3]]);
            if (vendor, device) != (0x1234, 0x11e8) {
                return Err(format!("vendor:device {vendor:04x}:{device:04x}"));
            }
            let diff: Vec<String> = (0..n)
                .filter(|&i| got[i] != sys[i])
                .map(|i| format!("{i:#04x}: socket {:#04x} sysfs {:#04x}", got[i], sys[i]))
                .collect();
            if !diff.is_empty() {
                return Err(format!("{} of {n} bytes differ: {}", diff.len(), diff.join(", ")));
            }
            Ok(format!(
                "vendor 0x1234 device 0x11e8, all {n} bytes identical (region size {:#x}, flags {:#x}, offset {:#x})",
                info.size, info.flags, info.offset
            ))
        })(),
    );
    let mut bar = None;
    rep.check(
        &format!("{tag}: BAR0 through the mmapped region fd (sparse mmap), no socket message per access"),
        (|| {
            // Memory decoding on, through the socket, as the guest's BIOS/kernel would.
            let cmd = set_command_bits(&mut c, PCI_COMMAND_MEMORY)?;
            let (b, note) = map_bar0(&mut c, edu)?;
            let before = c.sent;
            let id = b.read_u32(EDU_ID);
            if id != EDU_ID_VALUE {
                return Err(format!("ID register reads {id:#010x} via the mapping"));
            }
            const N: u32 = 1000;
            let t = Instant::now();
            for k in 0..N {
                let v = 0x1234_5678u32.wrapping_add(k.wrapping_mul(0x9e37_79b9));
                b.write_u32(EDU_LIVENESS, v);
                let r = b.read_u32(EDU_LIVENESS);
                if r != !v {
                    return Err(format!("liveness {v:#010x} reads back {r:#010x}, expected {:#010x}", !v));
                }
            }
            let mapped_ns = t.elapsed().as_secs_f64() * 1e9 / f64::from(2 * N);
            let msgs = c.sent - before;
            if msgs != 0 {
                return Err(format!("{msgs} socket messages during {} mapped accesses", 2 * N + 1));
            }
            // The same register trapped through the socket, for comparison.
            let t = Instant::now();
            let via_sock = c.read(BAR0, EDU_ID as u64, 4)?;
            let sock_us = t.elapsed().as_secs_f64() * 1e6;
            let via_sock = u32::from_le_bytes(via_sock.try_into().unwrap());
            if via_sock != EDU_ID_VALUE {
                return Err(format!("ID via REGION_READ {via_sock:#010x}"));
            }
            bar = Some(b);
            Ok(format!(
                "PCI_COMMAND {cmd:#06x}; {note}; ID {id:#010x}, liveness NOT x{N}; 0 messages for {} accesses ({mapped_ns:.0} ns each) vs REGION_READ {sock_us:.0} us",
                2 * N + 1
            ))
        })(),
    );
    Some((c, bar?))
}

/// DMA through the daemon's translations: IOVA X -> GPA A read, IOVA Y -> GPA B written.
fn dma_check(
    rep: &mut Report,
    vm: &mut TestVm,
    c: &mut Client,
    bar: &Bar,
    ep: u32,
    d: u32,
) -> bool {
    rep.check(
        &format!("endpoint {ep}: DMA through the daemon's translations (TestVm ATTACH+MAP, bus master via REGION_WRITE, DMA via the BAR mapping)"),
        (|| {
            attach(vm, d, ep)?;
            map(vm, d, IOVA_X, GPA_A)?;
            map(vm, d, IOVA_Y, GPA_B)?;
            let cmd = set_command_bits(c, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)?;
            let p = pattern(ep as u8 * 17);
            vm.ram().write(GPA_A, &p).map_err(s)?;
            ram_fill(vm, GPA_B, SENTINEL)?;
            ram_fill(vm, GPA_C, SENTINEL)?;
            let t = Instant::now();
            load(bar, IOVA_X)?;
            store(bar, IOVA_Y)?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            ram_expect(vm, GPA_B, &p, "IOVA X -> edu -> IOVA Y")?;
            // Nothing but the guest's mappings: no identity, no unmapped IOVA.
            store(bar, GPA_C)?;
            store(bar, IOVA_Z)?;
            ram_expect(vm, GPA_C, &[SENTINEL; PAGE as usize], "IOVA = GPA C (not mapped)")?;
            Ok(format!(
                "domain {d}, PCI_COMMAND {cmd:#06x}; page read at IOVA {IOVA_X:#x} landed at GPA {GPA_B:#x} via IOVA {IOVA_Y:#x} in {us:.0} us; IOVA = GPA and an unmapped IOVA reach nothing"
            ))
        })(),
    )
}

fn msi_checks(rep: &mut Report, edu: &Edu, c: &mut Client, bar: &Bar) -> Option<EventFd> {
    let e = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    let ok = rep.check(
        "endpoint 1: MSI via SET_IRQS eventfd: edu's raise register (0x60) fires it",
        (|| {
            bar.edu_ack_irqs();
            c.set_irqs(SET_DATA_EVENTFD | SET_ACTION_TRIGGER, MSI, 0, 1, &[e.as_raw_fd()], &[])?;
            let enabled = msi_enabled_in_sysfs(edu)?;
            if !enabled {
                return Err("the MSI capability is not enabled after SET_IRQS".into());
            }
            let spurious = drain(&e);
            let t = Instant::now();
            bar.write_u32(EDU_IRQ_RAISE, 0x1);
            let (st, us) = edu_irq(bar, &e, t)?;
            Ok(format!(
                "MSI enabled in the device's config (sysfs), event after {us:.0} us, irq status {st:#x}{}",
                if spurious != 0 { format!(", {spurious} earlier event(s) drained") } else { String::new() }
            ))
        })(),
    );
    if !ok {
        return None;
    }
    rep.check(
        "endpoint 1: MSI: edu's DMA completion IRQ (cmd bit 2) fires the eventfd",
        (|| {
            drain(&e);
            let t = Instant::now();
            dma(bar, EDU_BUFFER, IOVA_Y, true, true)?;
            let (st, us) = edu_irq(bar, &e, t)?;
            if st & EDU_DMA_IRQ_STATUS == 0 {
                return Err(format!("event, but irq status {st:#x} lacks the DMA bit"));
            }
            Ok(format!(
                "event {us:.0} us after the DMA start, irq status {st:#x}"
            ))
        })(),
    );
    Some(e)
}

/// A BAR for a DMA thread of [`restart_check`].
struct SharedBar<'a>(&'a Bar);

// SAFETY: while the DMA threads run, each alone touches the BAR it was given (the main thread
// only reads the daemon's log); the mappings outlive the threads (scoped).
unsafe impl Sync for SharedBar<'_> {}

/// When each edu DMA of the upgrade check's threads completed (ms since `t0`).
struct OpTimes {
    t0: Instant,
    done: Mutex<Vec<f64>>,
}

impl OpTimes {
    fn mark(&self) {
        let ms = self.t0.elapsed().as_secs_f64() * 1e3;
        self.done.lock().unwrap().push(ms);
    }

    fn between(&self, from: f64, to: f64) -> usize {
        self.done
            .lock()
            .unwrap()
            .iter()
            .filter(|&&x| x > from && x < to)
            .count()
    }

    fn after(&self, from: f64) -> usize {
        self.between(from, f64::INFINITY)
    }
}

/// Endpoint 2 copies GPA A to GPA B through domain 2's IOVAs X and Y until `stop`, with a fresh
/// pattern each time, written and checked through `ram` (the guest RAM's memfd); the number of
/// copies that landed, or the first that did not.
fn copy_loop(
    bar: &SharedBar<'_>,
    ram: &std::fs::File,
    stop: &AtomicBool,
    ops: &OpTimes,
) -> Result<u32> {
    use std::os::unix::fs::FileExt;
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let p = pattern(n as u8 ^ 0xa5);
        ram.write_all_at(&p, GPA_A).map_err(s)?;
        ram.write_all_at(&[SENTINEL; PAGE as usize], GPA_B)
            .map_err(s)?;
        load(bar.0, IOVA_X)?;
        ops.mark();
        store(bar.0, IOVA_Y)?;
        ops.mark();
        let mut got = vec![0u8; PAGE as usize];
        ram.read_exact_at(&mut got, GPA_B).map_err(s)?;
        if got != p {
            return Err(format!(
                "endpoint 2: copy {n} did not land ({} bytes differ)",
                got.iter().zip(&p).filter(|(a, b)| a != b).count()
            ));
        }
        n += 1;
    }
    Ok(n)
}

/// Endpoint 1 writes its buffer (holding `want`) to domain 1's IOVA W (GPA D) until `stop`,
/// each write checked; the number that landed, or the first that did not.
fn store_loop(
    bar: &SharedBar<'_>,
    ram: &std::fs::File,
    want: &[u8],
    stop: &AtomicBool,
    ops: &OpTimes,
) -> Result<u32> {
    use std::os::unix::fs::FileExt;
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        ram.write_all_at(&[SENTINEL; PAGE as usize], GPA_D)
            .map_err(s)?;
        store(bar.0, IOVA_W)?;
        ops.mark();
        let mut got = vec![0u8; PAGE as usize];
        ram.read_exact_at(&mut got, GPA_D).map_err(s)?;
        if got != want {
            return Err(format!("endpoint 1: write {n} to IOVA W did not land"));
        }
        n += 1;
    }
    Ok(n)
}

/// How the daemon goes away and comes back in [`restart_check`].
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// A planned upgrade (SIGUSR2): the same process (PID) goes on as the new binary.
    Upgrade,
    /// SIGKILL, then started again as systemd restarts a unit, with its fd store.
    Crash,
}

/// The daemon goes away and comes back (`how`) with the iommufd backend while both edus keep
/// doing DMA: every translation and attachment the guest set up holds throughout and after it,
/// and the vhost-user and vfio-user connections go on where they stopped.
#[allow(clippy::too_many_arguments)]
fn restart_check(
    rep: &mut Report,
    cx: &mut Ctx,
    daemon: &mut Daemon,
    how: Restart,
    c1: &mut Client,
    bar1: &Bar,
    e1: &EventFd,
    bar2: &Bar,
    ram_fd: &OwnedFd,
) {
    let (title, event, rebuilt_line) = match how {
        Restart::Upgrade => (
            "upgrade in place (SIGUSR2, iommufd backend): both edus' DMA lands at every try before, during and after it, the same PID serves on, the guest's domains, mappings and attachments hold, both connections go on",
            "SIGUSR2",
            "device state rebuilt",
        ),
        Restart::Crash => (
            "crash restart (SIGKILL, restarted with the fd store, iommufd backend): both edus' DMA lands at every try before, during and after it, the guest's domains, mappings and attachments hold, both connections go on",
            "SIGKILL",
            "recorded change(s) replayed",
        ),
    };
    rep.check(
        title,
        (|| {
            let pid = daemon.child.as_ref().ok_or("no daemon")?.id();
            let ram = std::fs::File::from(ram_fd.try_clone().map_err(s)?);
            // Endpoint 1's buffer holds a known page, which it then writes to IOVA W again and
            // again; endpoint 2 copies fresh pages from IOVA X to IOVA Y (each edu DMA takes
            // ~100 ms; together they complete one every ~50 ms).
            map(&mut cx.vm, 1, IOVA_W, GPA_D)?;
            let want = pattern(0x3c);
            cx.vm.ram().write(GPA_A, &want).map_err(s)?;
            load(bar1, IOVA_X)?;
            let ops = OpTimes { t0: Instant::now(), done: Mutex::new(Vec::new()) };
            let stop = AtomicBool::new(false);
            let (b1, b2) = (SharedBar(bar1), SharedBar(bar2));
            let (copies, stores, signalled, seen, rebuilt) = thread::scope(|scope| {
                let w2 = scope.spawn(|| copy_loop(&b2, &ram, &stop, &ops));
                thread::sleep(Duration::from_millis(50));
                let w1 = scope.spawn(|| store_loop(&b1, &ram, &want, &stop, &ops));
                let running = || !w1.is_finished() && !w2.is_finished();
                // A few DMAs first.
                while ops.after(0.0) < 4 && running() && ops.t0.elapsed() < TIMEOUT {
                    thread::sleep(Duration::from_millis(1));
                }
                let signalled = ops.t0.elapsed().as_secs_f64() * 1e3;
                let from = match how {
                    Restart::Upgrade => {
                        let from = daemon.log.lock().unwrap().len();
                        // SAFETY: kill(2) on our own child's pid.
                        match unsafe { libc::kill(pid as i32, libc::SIGUSR2) } {
                            0 => Ok(from),
                            _ => Err(format!("kill: {}", std::io::Error::last_os_error())),
                        }
                    }
                    Restart::Crash => daemon.crash_and_restart().map(|(from, _)| from),
                };
                let rebuilt = from.and_then(|from| {
                    while running() && ops.t0.elapsed() < Duration::from_secs(60) {
                        if let Some(l) = daemon.wait_log_from(from, rebuilt_line, Duration::ZERO) {
                            return Ok(l);
                        }
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(format!("no \"{rebuilt_line}\" within 60 s of {event}"))
                });
                let seen = ops.t0.elapsed().as_secs_f64() * 1e3;
                // And a few after.
                while ops.after(seen) < 4 && running() && ops.t0.elapsed().as_secs_f64() * 1e3 < seen + 10_000.0 {
                    thread::sleep(Duration::from_millis(1));
                }
                stop.store(true, Ordering::SeqCst);
                let joined = |w: thread::ScopedJoinHandle<'_, Result<u32>>| {
                    w.join().unwrap_or_else(|_| Err("a DMA thread panicked".into()))
                };
                (joined(w2), joined(w1), signalled, seen, rebuilt)
            });
            let (copies, stores) = (copies?, stores?);
            let rebuilt = rebuilt?;
            let during = ops.between(signalled, seen);
            let after = ops.after(seen);
            let times: Vec<String> = ops.done.lock().unwrap().iter().map(|x| format!("{x:.0}")).collect();
            if during == 0 || after == 0 {
                return Err(format!(
                    "edu DMAs completed: {during} between {event} at {signalled:.0} ms and the new daemon's {rebuilt:?} at {seen:.0} ms, {after} after (at ms: {})",
                    times.join(" ")
                ));
            }
            let now = daemon.child.as_ref().ok_or("no daemon")?.id();
            let took_over = match how {
                Restart::Upgrade => {
                    let took_over = daemon
                        .wait_log("iommufd: took over", TIMEOUT)
                        .ok_or("the new binary did not log taking over the iommufd backend")?;
                    let accounting = daemon
                        .wait_log("pinned-page accounting moved", Duration::ZERO)
                        .or_else(|| daemon.wait_log("IOMMU_IOAS_CHANGE_PROCESS", Duration::ZERO))
                        .unwrap_or_default();
                    if now != pid {
                        return Err("the daemon's PID changed".into());
                    }
                    format!("{took_over}; {accounting}")
                }
                Restart::Crash => {
                    if now == pid {
                        return Err("the same PID after SIGKILL: no restart happened".into());
                    }
                    let taken = daemon
                        .wait_log("crash journal:", TIMEOUT)
                        .ok_or("the restarted daemon did not log taking back its journal")?;
                    format!("pid {pid} killed, pid {now} took back: {taken}")
                }
            };
            // SAFETY: kill(pid, 0) only checks that our child exists.
            if unsafe { libc::kill(now as i32, 0) } != 0 {
                return Err(format!("the daemon is gone after the {event}"));
            }
            // A new mapping in the taken-over IOAS of domain 1 works, and its UNMAP takes effect.
            map(&mut cx.vm, 1, IOVA_Z, GPA_C)?;
            ram_fill(&cx.vm, GPA_C, SENTINEL)?;
            cx.vm.ram().write(GPA_A, &pattern(0x5a)).map_err(s)?;
            load(bar1, IOVA_X)?;
            store(bar1, IOVA_Z)?;
            ram_expect(&cx.vm, GPA_C, &pattern(0x5a), "endpoint 1: DMA to a MAP made after the restart")?;
            vm_req(
                &mut cx.vm,
                Request::unmap(1, IOVA_Z, IOVA_Z + PAGE - 1),
                "UNMAP of IOVA Z after the restart",
            )?;
            ram_fill(&cx.vm, GPA_C, SENTINEL)?;
            store(bar1, IOVA_Z)?;
            ram_expect(&cx.vm, GPA_C, &[SENTINEL; PAGE as usize], "endpoint 1: DMA to IOVA Z after its UNMAP")?;
            // The vfio-user connection goes on without a new VERSION; its IRQ and DMA maps hold.
            c1.info().map_err(|e| format!("endpoint 1: GET_INFO on the kept connection: {e}"))?;
            drain(e1);
            bar1.write_u32(EDU_IRQ_RAISE, 0x1);
            let n = wait_event(e1, TIMEOUT)?;
            bar1.edu_ack_irqs();
            if n == 0 {
                return Err(format!("endpoint 1: the MSI eventfd set before the {event} no longer fires"));
            }
            match c1.dma_map(DMA_READ | DMA_WRITE, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd())) {
                Err(CallError::Errno(_)) => {}
                Ok(()) => return Err(format!("endpoint 1: the DMA map made before the {event} is forgotten (the same map succeeded again)")),
                Err(e) => return Err(e.to_string()),
            }
            // IOVA W is free again for the next check.
            vm_req(&mut cx.vm, Request::unmap(1, IOVA_W, IOVA_W + PAGE - 1), "UNMAP of IOVA W")?;
            Ok(format!(
                "{copies} copies by endpoint 2 and {stores} writes by endpoint 1 landed, all checked; {during} edu DMAs completed in the {:.0} ms between {event} and the new daemon's \"{rebuilt_line}\", {after} after; {took_over}; a MAP and UNMAP in the taken-over IOAS of domain 1 take effect; endpoint 1's vfio-user connection, MSI eventfd and DMA maps go on",
                seen - signalled
            ))
        })(),
    );
}

/// What a storm of kills left: the requests its rounds made, and per kill the daemon log's
/// length at the restart and the time from the kill to the first round answered after it.
struct Storm {
    requests: u64,
    restarts: Vec<usize>,
    pauses: Vec<Duration>,
}

impl Storm {
    /// "p50 X ms, max Y ms" of the pauses.
    fn pauses(&self) -> String {
        let mut p = self.pauses.clone();
        p.sort_unstable();
        let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        format!(
            "p50 {:.0} ms, max {:.0} ms",
            ms(p.get(p.len() / 2)),
            ms(p.last())
        )
    }
}

/// SIGKILLs the daemon `kills` times, each at a random 5–65 ms into `round`s run back to back
/// (`round(kill, i)` returns the requests it made, all answered with success or an error),
/// going on after each kill until two rounds were answered by the restarted daemon, which must
/// log its replay.
fn kill_storm(
    daemon: &mut Daemon,
    kills: u32,
    mut seed: u64,
    mut round: impl FnMut(u32, u32) -> Result<u64>,
) -> Result<Storm> {
    let mut storm = Storm {
        requests: 0,
        restarts: Vec::new(),
        pauses: Vec::new(),
    };
    for k in 0..kills {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(5 + (seed >> 33) % 60);
        let stop = AtomicBool::new(false);
        let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
        let mut answered_after = None;
        let (killed, done) = thread::scope(|scope| {
            let killer = scope.spawn(|| {
                thread::sleep(delay);
                let r = daemon.crash_and_restart().map(|(from, at)| {
                    *killed_at.lock().unwrap() = Some(at);
                    from
                });
                stop.store(true, Ordering::SeqCst);
                r
            });
            let mut i = 0u32;
            let mut done = Ok(0u64);
            // Until the kill and two rounds more (answered by the restarted daemon).
            let mut after = 0;
            while after < 2 {
                if stop.load(Ordering::SeqCst) {
                    after += 1;
                }
                match round(k, i) {
                    Ok(n) => done = done.map(|d| d + n),
                    Err(e) => {
                        done = Err(format!("kill {k} ({delay:?}): round {i}: {e}"));
                        break;
                    }
                }
                if answered_after.is_none()
                    && let Some(at) = *killed_at.lock().unwrap()
                {
                    answered_after = Some(at.elapsed());
                }
                i += 1;
            }
            let killed = killer
                .join()
                .unwrap_or_else(|_| Err("the killer panicked".into()));
            (killed, done)
        });
        let from = killed?;
        storm.requests += done?;
        storm.pauses.extend(answered_after);
        daemon
            .wait_log_from(from, "recorded change(s) replayed", Duration::from_secs(30))
            .ok_or(format!("kill {k}: no restart logged"))?;
        storm.restarts.push(from);
    }
    Ok(storm)
}

/// SIGKILLs at random points while the guest maps and unmaps back to back in domain 1 (each kill
/// may land in the middle of a request's ioctl): every request is answered once, with success,
/// and afterwards the kernel holds exactly what the guest was told (DMA through the last
/// mapping lands, DMA through the unmapped ones does not).
fn crash_storm_check(rep: &mut Report, cx: &mut Ctx, daemon: &mut Daemon, bar1: &Bar) {
    const KILLS: u32 = 5;
    const IOVA_S: u64 = 0x0900_0000;
    rep.check(
        &format!("crash restart: {KILLS} SIGKILLs at random points of back-to-back MAP/UNMAP requests (iommufd): each request answered once with success, the kernel holds exactly what the guest was told"),
        (|| {
            let seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
            let pinned_before = pinned_bytes()?;
            let storm = kill_storm(daemon, KILLS, seed, |_, i| {
                let iova = IOVA_S + (u64::from(i) % 64) * PAGE;
                map(&mut cx.vm, 1, iova, GPA_C)?;
                vm_req(&mut cx.vm, Request::unmap(1, iova, iova + PAGE - 1), "UNMAP")?;
                Ok(2)
            })?;
            let log = daemon.log.lock().unwrap();
            let fixes = log.iter().skip(storm.restarts[0]).filter(|l| l.contains("crash")).count();
            drop(log);
            // The last request of every pair was an UNMAP: nothing of IOVA S.. is reachable.
            for n in [0u64, 63] {
                ram_fill(&cx.vm, GPA_C, SENTINEL)?;
                cx.vm.ram().write(GPA_A, &pattern(0x77)).map_err(s)?;
                load(bar1, IOVA_X)?;
                let _ = store(bar1, IOVA_S + n * PAGE);
                ram_expect(&cx.vm, GPA_C, &[SENTINEL; PAGE as usize], "DMA to an IOVA the guest unmapped before the kills")?;
            }
            map(&mut cx.vm, 1, IOVA_S, GPA_C)?;
            store(bar1, IOVA_S)?;
            ram_expect(&cx.vm, GPA_C, &pattern(0x77), "DMA to a MAP made after the kills")?;
            vm_req(&mut cx.vm, Request::unmap(1, IOVA_S, IOVA_S + PAGE - 1), "the last UNMAP")?;
            // Every MAP was unmapped again: the pinned count is where it started (a request in
            // flight at a kill is made again; it must not count twice, nor leave a count).
            let pinned_after = pinned_bytes()?;
            if pinned_after != pinned_before {
                return Err(format!(
                    "the daemon counts {pinned_after:#x} bytes pinned after the storm, {pinned_before:#x} before it"
                ));
            }
            Ok(format!(
                "{} requests answered with success across {KILLS} kills; {fixes} crash log lines; from a kill to the first answer after it (the pause, under TCG, a new process started each time): {}; afterwards DMA lands only through a MAP made after the kills; pinned count {pinned_after:#x} before and after",
                storm.requests,
                storm.pauses()
            ))
        })(),
    );
}

/// The bytes the daemon counts as pinned (its control socket's `state`).
fn pinned_bytes() -> Result<u64> {
    let answer = vhost_user_iommu::control::query(Path::new(CONTROL), "state")
        .map_err(|e| format!("control socket {CONTROL}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| format!("state {answer:?}: {e}"))?;
    v["pinned_bytes"]
        .as_u64()
        .ok_or_else(|| format!("no pinned_bytes in {answer}"))
}

/// The pinned-bytes count across a crash restart. A restarted daemon took its total from the
/// side state, which a vfio-user client's DMA map change rewrites at any moment, and then
/// replayed the requests recorded since the last checkpoint: a MAP recorded before the side
/// state was rewritten counted twice (seen in the end-to-end tier: 4096 bytes still counted
/// after every domain was gone). So: a first kill (the restarted daemon checkpoints: no record
/// is left to fold the MAP into a checkpoint before the second), a MAP (recorded), a vfio-user
/// DMA unmap/map (the side state rewritten), a second kill; the count must be what it was after
/// the MAP, and back where it started after the UNMAP.
fn pinned_count_crash_check(
    rep: &mut Report,
    cx: &mut Ctx,
    daemon: &mut Daemon,
    c1: &mut Client,
    ram_fd: &OwnedFd,
) {
    const IOVA_P: u64 = 0x0a00_0000;
    rep.check(
        "crash restart: the pinned-bytes count is the kernel's (a SIGKILL, a MAP recorded, the side state rewritten by a vfio-user message, a second SIGKILL)",
        (|| {
            let restart = |daemon: &mut Daemon, k: u32| -> Result<()> {
                let (mark, _) = daemon.crash_and_restart()?;
                daemon
                    .wait_log_from(mark, "recorded change(s) replayed", Duration::from_secs(30))
                    .map(drop)
                    .ok_or(format!("restart {k}: no replay within 30 s"))
            };
            restart(daemon, 1)?;
            let mut stale = c1.sync().map_err(|e| format!("after restart 1: {e}"))?;
            let start = pinned_bytes()?;
            map(&mut cx.vm, 1, IOVA_P, GPA_C)?;
            let mapped = pinned_bytes()?;
            c1.dma_unmap(0, 0, RAM_SIZE).map_err(|e| format!("DMA unmap: {e}"))?;
            c1.dma_map(DMA_READ | DMA_WRITE, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd()))
                .map_err(|e| format!("DMA map: {e}"))?;
            c1.sync().map_err(|e| format!("after the DMA map: {e}"))?;
            restart(daemon, 2)?;
            stale += c1.sync().map_err(|e| format!("after restart 2: {e}"))?;
            let after = pinned_bytes()?;
            vm_req(&mut cx.vm, Request::unmap(1, IOVA_P, IOVA_P + PAGE - 1), "UNMAP")?;
            let end = pinned_bytes()?;
            if after != mapped || end != start {
                return Err(format!(
                    "pinned bytes {start:#x} before the MAP, {mapped:#x} after it, {after:#x} after the restart (want {mapped:#x}), {end:#x} after the UNMAP (want {start:#x})"
                ));
            }
            Ok(format!(
                "{start:#x} before the MAP, {mapped:#x} after it and after the restart, {end:#x} after the UNMAP ({stale} stale vfio-user replies skipped)"
            ))
        })(),
    );
}

/// SIGKILLs at random points while the VMM's side of endpoint 1 sends vfio-user messages back
/// to back (a register write and read through the socket, an unmap and a map of all guest RAM):
/// every message is answered exactly once (the client takes replies strictly in order, so a
/// lost one times out and a repeated one is a reply to the wrong message), each with success,
/// the register reads back what the write before it set, and the DMA map is there at the end.
fn vfio_user_storm_check(rep: &mut Report, daemon: &mut Daemon, c1: &mut Client, ram_fd: &OwnedFd) {
    const KILLS: u32 = 8;
    rep.check(
        &format!("crash restart: {KILLS} SIGKILLs at random points of back-to-back vfio-user messages (region write/read, DMA unmap/map): each answered exactly once (replies taken strictly in order), with success"),
        (|| {
            let seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
            let rw = DMA_READ | DMA_WRITE;
            let storm = kill_storm(daemon, KILLS, seed, |k, i| {
                let v = 0x5a00_0000 | (k << 16) | (i & 0xffff);
                c1.write(BAR0, EDU_LIVENESS as u64, &v.to_le_bytes())
                    .map_err(|e| format!("region write: {e}"))?;
                let got = c1.read(BAR0, EDU_LIVENESS as u64, 4)
                    .map_err(|e| format!("region read: {e}"))?;
                if le32(&got, 0) != !v {
                    return Err(format!("the liveness register read {:#x} after {v:#x} was written (want {:#x})", le32(&got, 0), !v));
                }
                c1.dma_unmap(0, 0, RAM_SIZE).map_err(|e| format!("DMA unmap: {e}"))?;
                c1.dma_map(rw, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd()))
                    .map_err(|e| format!("DMA map: {e}"))?;
                Ok(4)
            })?;
            let mut in_hand = std::collections::BTreeMap::<&str, u32>::new();
            for l in daemon.log.lock().unwrap().iter().skip(storm.restarts[0]) {
                for what in ["answered before the crash", "answered with the kept reply", "handled again", "made before the crash"] {
                    if l.contains("crash restart: vfio-user") && l.contains(what) {
                        *in_hand.entry(what).or_default() += 1;
                    }
                }
            }
            match c1.dma_map(rw, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd())) {
                Err(CallError::Errno(_)) => {}
                Ok(()) => return Err("the DMA map made last before the end is gone (the same map succeeded again)".into()),
                Err(e) => return Err(e.to_string()),
            }
            Ok(format!(
                "{} messages answered once each with success across {KILLS} kills; messages in the daemon's hands at a kill: {in_hand:?}; from a kill to the first round answered after it (under TCG): {}",
                storm.requests,
                storm.pauses()
            ))
        })(),
    );
}

/// Issue 19: a SIGKILL while a bypass ATTACH stages all guest RAM into the identity IOAS (the
/// first identity attachment does that, and the guest waits for it): the restarted daemon
/// carries the unanswered ATTACH out again (a region the dead daemon had already mapped,
/// unrecorded, is replaced), answers it once with success, and endpoint 2's DMA then lands
/// identity-mapped.
fn staging_crash_check(rep: &mut Report, cx: &mut Ctx, daemon: &mut Daemon, bar2: &Bar) {
    rep.check(
        "crash restart: a SIGKILL while a bypass ATTACH stages all guest RAM; the restarted daemon answers the ATTACH once with success and the endpoint translates identity",
        (|| {
            let seed = 0x5eed_0019u64 ^ u64::from(std::process::id());
            let mut attached = false;
            let storm = kill_storm(daemon, 1, seed, |_, i| {
                if i == 0 {
                    let r = Request::attach_bypass(50, 2);
                    vm_req(&mut cx.vm, r, "bypass ATTACH of endpoint 2")?;
                    attached = true;
                } else {
                    let (st, _) = cx.vm.probe(1).map_err(s)?;
                    if st != Status::Ok {
                        return Err(format!("PROBE: {}", st.name()));
                    }
                }
                Ok(1)
            })?;
            if !attached {
                return Err("the bypass ATTACH was never answered".into());
            }
            let from = storm.restarts[0];
            let staged = daemon
                .wait_log_from(0, "all guest RAM staged", TIMEOUT)
                .ok_or("no daemon logged staging all guest RAM")?;
            let replaced = daemon
                .log
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|l| l.contains("mapped unrecorded"))
                .cloned();
            let p = pattern(0x19);
            cx.vm.ram().write(GPA_D, &p).map_err(s)?;
            ram_fill(&cx.vm, GPA_C, SENTINEL)?;
            load(bar2, GPA_D)?;
            store(bar2, GPA_C)?;
            ram_expect(&cx.vm, GPA_C, &p, "endpoint 2's DMA to IOVA = GPA C after the bypass ATTACH")?;
            Ok(format!(
                "{} requests answered once across the kill, pause {}; {}; staging: {staged}; endpoint 2's DMA lands at IOVA = GPA",
                storm.requests,
                storm.pauses(),
                match replaced {
                    Some(l) => format!("the dead daemon had mapped RAM unrecorded, replaced: {l}"),
                    None => "the kill landed before the dead daemon's map took effect (nothing to replace)".into(),
                }
            ))
        })(),
    );
}

fn run(rep: &mut Report) -> Result<()> {
    let edus = edus()?;
    if edus.len() < 2 {
        return Err(format!("need two edu devices, found {}", edus.len()));
    }
    let edus: Vec<Edu> = edus.into_iter().take(2).collect();
    let t0 = Instant::now();
    let mut daemon = Daemon::start(&edus)?;
    rep.check(
        "daemon binary serves vhost-user and one vfio-user socket per edu (backend iommufd)",
        Ok(format!(
            "endpoint 1 = {}, endpoint 2 = {}; sockets after {:.0} ms",
            edus[0].bdf,
            edus[1].bdf,
            t0.elapsed().as_secs_f64() * 1e3
        )),
    );
    let opts = VmOptions {
        ram_size: RAM_SIZE,
        connect_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(30),
        ..VmOptions::default()
    };
    let vm =
        TestVm::connect(&daemon.vhost_sock, opts).map_err(|e| format!("TestVm::connect: {e}"))?;
    let mut cx = Ctx { edus, vm };

    let Some((mut c1, bar1)) = basic_checks(rep, &cx.edus[0], 1) else {
        return Err("endpoint 1: cannot go on".into());
    };
    let mut second = basic_checks(rep, &cx.edus[1], 2);
    if !dma_check(rep, &mut cx.vm, &mut c1, &bar1, 1, 1) {
        return Err("endpoint 1: no DMA, cannot go on".into());
    }
    if let Some((c2, bar2)) = second.as_mut()
        && !dma_check(rep, &mut cx.vm, c2, bar2, 2, 2)
    {
        second = None;
    }

    let e1 = msi_checks(rep, &cx.edus[0], &mut c1, &bar1);

    // DMA_MAP from the VMM: checked against the vhost-user memory table, mapping nothing.
    // SAFETY: dup of the TestVm's memfd; the new fd is owned by the OwnedFd.
    let ram_fd = unsafe { OwnedFd::from_raw_fd(libc::dup(cx.vm.ram().fd())) };
    let rw = DMA_READ | DMA_WRITE;
    rep.check(
        "endpoint 1: DMA_MAP inside guest RAM succeeds, outside fails with an errno; it maps nothing for the device",
        (|| {
            c1.dma_map(rw, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd()))
                .map_err(|e| format!("DMA_MAP of all guest RAM: {e}"))?;
            let outside = match c1.dma_map(rw, 0, RAM_SIZE, 0x10_0000, Some(ram_fd.as_raw_fd())) {
                Err(CallError::Errno(e)) => e,
                Ok(()) => return Err(format!("DMA_MAP at {RAM_SIZE:#x} (past guest RAM) succeeded")),
                Err(e) => return Err(e.to_string()),
            };
            let straddle = match c1.dma_map(rw, 0, 0x1_0000_0000, 0x1000, Some(ram_fd.as_raw_fd())) {
                Err(CallError::Errno(e)) => e,
                Ok(()) => return Err("DMA_MAP at 4 GiB succeeded".into()),
                Err(e) => return Err(e.to_string()),
            };
            // The VMM's map gives the device nothing: IOVA = GPA C stays unreachable.
            ram_fill(&cx.vm, GPA_C, SENTINEL)?;
            store(&bar1, GPA_C)?;
            ram_expect(&cx.vm, GPA_C, &[SENTINEL; PAGE as usize], "DMA to IOVA = GPA C after the VMM's DMA_MAP")?;
            Ok(format!(
                "[0, {RAM_SIZE:#x}) with the memfd: ok; {RAM_SIZE:#x}+0x100000: errno {outside} ({}); 4 GiB: errno {straddle}; a DMA to IOVA = GPA still lands nowhere",
                std::io::Error::from_raw_os_error(outside as i32)
            ))
        })(),
    );

    if let (Some(e1), Some((_, bar2))) = (e1.as_ref(), second.as_ref()) {
        for how in [Restart::Upgrade, Restart::Crash] {
            restart_check(
                rep,
                &mut cx,
                &mut daemon,
                how,
                &mut c1,
                &bar1,
                e1,
                bar2,
                &ram_fd,
            );
        }
        crash_storm_check(rep, &mut cx, &mut daemon, &bar1);
        pinned_count_crash_check(rep, &mut cx, &mut daemon, &mut c1, &ram_fd);
        vfio_user_storm_check(rep, &mut daemon, &mut c1, &ram_fd);
        staging_crash_check(rep, &mut cx, &mut daemon, bar2);
    }

    let mut reset_works = false;
    rep.check(
        "endpoint 1: DEVICE_RESET returns the kernel's answer",
        (|| {
            let (_, flags, _, _) = c1.info()?;
            let can = flags & VFIO_DEVICE_FLAGS_RESET != 0;
            let r = c1.reset();
            reset_works = r.is_ok();
            // Still serving either way.
            c1.info().map_err(|e| format!("after the reset: {e}"))?;
            match (r, can) {
                (Ok(()), true) => Ok("success (the device has a reset method)".into()),
                (Err(CallError::Errno(e)), false) => Ok(format!(
                    "errno {e} ({}): the device flags carry no RESET, edu has no reset method here",
                    std::io::Error::from_raw_os_error(e as i32)
                )),
                (Ok(()), false) => Ok("success although the device flags carry no RESET".into()),
                (Err(CallError::Errno(e)), true) => Ok(format!(
                    "errno {e} ({}) although the device flags carry RESET",
                    std::io::Error::from_raw_os_error(e as i32)
                )),
                (Err(e), _) => Err(e.to_string()),
            }
        })(),
    );

    let mut blocked_after: Option<Result<String>> = None;
    rep.check(
        "endpoint 1: vfio-user disconnect: IRQs disabled (old eventfd silent on a new raise), device reset or bus mastering off, next client negotiates",
        (|| {
            // A fresh eventfd for this client, proven to fire right before the disconnect.
            let old = EventFd::new(libc::EFD_NONBLOCK).map_err(s)?;
            c1.set_irqs(SET_DATA_EVENTFD | SET_ACTION_TRIGGER, MSI, 0, 1, &[old.as_raw_fd()], &[])?;
            drain(&old);
            bar1.write_u32(EDU_IRQ_RAISE, 0x1);
            let n = wait_event(&old, TIMEOUT)?;
            bar1.edu_ack_irqs();
            if n == 0 {
                return Err("precondition: the eventfd does not fire before the disconnect".into());
            }
            drop(e1);
            drop(c1);
            // The server takes the next client only after cleaning up the last one.
            let t = Instant::now();
            let (mut c, _) = connect(&cx.edus[0])?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            daemon
                .wait_log("vfio-user endpoint 1: client disconnected", TIMEOUT)
                .ok_or("the daemon logged no disconnect")?;
            // A device with a reset method is reset; one without (edu) gets its bus mastering
            // cleared instead, so it cannot start DMA for the next client.
            let reset_note = if reset_works {
                "reset (the kernel accepts it)".to_string()
            } else {
                let t = Instant::now();
                while bus_master_in_sysfs(&cx.edus[0])? {
                    if t.elapsed() > TIMEOUT {
                        return Err("no reset method, and bus mastering still on after the disconnect".into());
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                "no reset method: bus mastering cleared".to_string()
            };
            let msi_on = msi_enabled_in_sysfs(&cx.edus[0])?;
            if msi_on {
                return Err("MSI still enabled in the device's config after the disconnect".into());
            }
            // Memory decoding back on (a reset may have cleared it), then raise: the old
            // eventfd must stay silent.
            set_command_bits(&mut c, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)?;
            let (bar, _) = map_bar0(&mut c, &cx.edus[0])?;
            drain(&old);
            bar.write_u32(EDU_IRQ_RAISE, 0x1);
            let n = wait_event(&old, Duration::from_secs(1))?;
            bar.edu_ack_irqs();
            if n != 0 {
                return Err("the old client's eventfd fired after the disconnect".into());
            }
            // The device still raises: the new client's eventfd fires.
            let new = EventFd::new(libc::EFD_NONBLOCK).map_err(s)?;
            c.set_irqs(SET_DATA_EVENTFD | SET_ACTION_TRIGGER, MSI, 0, 1, &[new.as_raw_fd()], &[])?;
            bar.write_u32(EDU_IRQ_RAISE, 0x1);
            let n = wait_event(&new, TIMEOUT)?;
            bar.edu_ack_irqs();
            if n == 0 {
                return Err("the new client's eventfd does not fire".into());
            }
            // The old client's DMA maps are gone: the same map is accepted again.
            c.dma_map(rw, 0, 0, RAM_SIZE, Some(ram_fd.as_raw_fd()))
                .map_err(|e| format!("DMA_MAP again on the new connection: {e}"))?;
            c.dma_unmap(0, 0, RAM_SIZE)?;
            let (_, _, nr, ni) = c.info()?;
            // DESIGN §3.4: the closed connection left the device blocked.
            let p = pattern(99);
            cx.vm.ram().write(GPA_A, &p).map_err(s)?;
            ram_fill(&cx.vm, GPA_B, SENTINEL)?;
            load(&bar, IOVA_X)?;
            store(&bar, IOVA_Y)?;
            blocked_after = Some(match ram_expect(&cx.vm, GPA_B, &p, "") {
                Ok(()) => Err("DMA through the guest's domain 1 still lands after the vfio-user disconnect".into()),
                Err(_) => Ok("DMA through the guest's domain 1 no longer lands: the endpoint was detached and blocked".to_string()),
            });
            Ok(format!(
                "next client negotiated {ms:.0} ms after the close; MSI disabled in the device's config; old eventfd silent for 1 s, new one fires; {reset_note}; old DMA maps dropped; info {nr} regions {ni} IRQs"
            ))
        })(),
    );

    if let Some(r) = blocked_after {
        rep.check(
            "endpoint 1: a vfio-user disconnect leaves the device blocked until the guest re-attaches it",
            r,
        );
    }
    cx.vm.disconnect();
    rep.check("daemon exits 0 on SIGTERM", daemon.stop());
    Ok(())
}

fn main() -> ExitCode {
    let mut rep = Report::default();
    let t0 = Instant::now();
    if let Err(e) = run(&mut rep) {
        rep.check("vfio-user-edu", Err(e));
    }
    rep.finish("vfio-user-edu", t0)
}
