//! l2-dma: `/init` of the nested guest (L2) in the end-to-end tier (tests/e2e/run.sh).
//!
//! L2 runs on stock QEMU inside L1. Its IOMMU is the daemon (vhost-user-test-device-pci, found
//! through the daemon's VIOT table) and its two edu devices are real (emulated by L0) devices
//! that the daemon serves to L1's QEMU over vfio-user. So every DMA below is done by a device the
//! daemon programmed into L1's IOMMU from the requests the real Linux virtio-iommu driver in L2
//! sent it.
//!
//! Two modes, chosen by the kernel command line:
//! - translated (default): each edu is bound to vfio-pci in L2 and attached to its own IOAS of
//!   L2's iommufd; buffers are mapped at fixed IOVAs and edu DMAs through them (with an MSI on
//!   completion): round trips, a read-only mapping, cross-device isolation, DMA after unmap;
//! - identity (`iommu.passthrough=1`): no driver; edu DMAs straight to the guest-physical address
//!   of a buffer (read from /proc/self/pagemap), which lands only if the daemon gave identity.
//!
//! In both modes L2's own `nvme` driver runs a real NVMe controller through the daemon
//! ([`nvme`]): O_DIRECT data read back byte for byte, completions on several MSI-X vectors,
//! strict and lazy invalidation, the data of earlier runs intact after resets; and its own `igb`
//! driver runs a real NIC ([`nic`]): a TCP stream echoed by a peer on L0's network hub.
//!
//! Every check prints `PASS: L2: <name>` or `FAIL: L2: <name>: <why>`. Then `E2E-L2: END ...`
//! with the number of live mappings, and the program waits for L1's instruction on /dev/ttyS1
//! (`reboot` or `poweroff`), so that L1 can check the daemon's state first.

// edu's registers and BAR access, shared with the VM tier's guest programs.
use guest_kit::mmio;
use guest_kit::sys::open_raw_tty;
mod bench;
mod msix;
mod nic;
mod nvme;
mod sysfs;
// The iommufd/VFIO ioctls: the daemon's own definitions (the repository's `uapi` crate).
use viommu_uapi as uapi;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mmio::*;
use uapi::*;

/// One page, as a length.
const PAGE: usize = mmio::PAGE as usize;

/// The IOVAs of the translated mode (device A = first edu, device B = second).
const A_SRC: u64 = 0x10_0000;
const A_DST: u64 = 0x11_0000;
const A_RO: u64 = 0x12_0000;
/// Mapped, used once, unmapped, then targeted again: the first DMA of the run that must fault.
const A_GONE: u64 = 0x13_0000;
const B_SRC: u64 = 0x20_0000;
const B_DST: u64 = 0x21_0000;

fn main() {
    // On the host, after L0 exited: `l2-dma verify-nvme-image FILE` checks the NVMe backing file.
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, image] = &args[..] {
        if cmd == "verify-nvme-image" {
            match nvme::verify_image(image) {
                Ok(s) => println!("{image}: {s}"),
                Err(e) => {
                    eprintln!("{image}: {e}");
                    std::process::exit(1);
                }
            }
            return;
        }
    }
    if let Err(e) = init_system() {
        // Without a console there is nobody to tell; try anyway.
        eprintln!("E2E-L2: init failed: {e}");
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let identity = cmdline
        .split_whitespace()
        .any(|w| w == "iommu.passthrough=1");
    println!(
        "E2E-L2: {} mode, cmdline: {}",
        if identity { "identity" } else { "translated" },
        cmdline.trim()
    );
    let arg = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_owned))
    };
    if let Some(config) = arg("e2e.bench=") {
        let secs = arg("e2e.secs=").and_then(|s| s.parse().ok()).unwrap_or(3.0);
        bench::run(&config, secs);
        println!("E2E-L2: END bench");
        finish(open_raw_tty("/dev/ttyS1").ok());
    }
    let mut r = Report::default();
    // Opened before END so that L1's instruction cannot arrive before anyone listens.
    let ctl = open_raw_tty("/dev/ttyS1");
    if let Err(e) = &ctl {
        r.check("control channel /dev/ttyS1", Err(e.clone()));
    }
    let live = match edu_bdfs() {
        Ok(bdfs) if bdfs.len() == 2 => {
            if identity {
                identity_checks(&mut r, &bdfs);
                0
            } else {
                translated_checks(&mut r, &bdfs)
            }
        }
        Ok(bdfs) => {
            r.check("two edu devices", Err(format!("found {bdfs:?}")));
            0
        }
        Err(e) => {
            r.check("two edu devices", Err(e));
            0
        }
    };
    nvme::nvme_checks(&mut |name, res| r.check(name, res), identity);
    nic::nic_checks(&mut |name, res| r.check(name, res));
    println!(
        "E2E-L2: END live_mappings={live} passed={} failed={}",
        r.passed, r.failed
    );
    finish(ctl.ok());
}

/// Carries out L1's instructions on the control line (none: power off): `soak` (verified NVMe
/// I/O until `end-soak`), then `reboot` or `poweroff`.
fn finish(ctl: Option<File>) -> ! {
    let what = match ctl {
        Some(tty) => {
            let mut rx = BufReader::new(tty);
            loop {
                match next_instruction(&mut rx).as_str() {
                    "soak" => {
                        println!("E2E-L2: soak started");
                        let r = nvme::soak(&mut || soak_ends(&mut rx));
                        match r {
                            Ok(s) => println!("E2E-L2: SOAK ok {s}"),
                            Err(e) => println!("E2E-L2: SOAK failed: {e}"),
                        }
                    }
                    other => break other.to_string(),
                }
            }
        }
        None => "poweroff".to_string(),
    };
    match nic::take_down_all() {
        Ok(down) => println!("E2E-L2: interfaces down: {}", down.join(" ")),
        Err(e) => println!("E2E-L2: taking the interfaces down: {e}"),
    }
    println!("E2E-L2: {what}");
    // SAFETY: sync and reboot take no pointers; as init we may restart or power off the machine.
    unsafe {
        libc::sync();
        libc::reboot(if what == "reboot" {
            libc::RB_AUTOBOOT
        } else {
            libc::RB_POWER_OFF
        });
    }
    loop {
        thread::sleep(Duration::from_secs(1));
    }
}

/// Whether L1 said `end-soak` (a line waiting on the control line; nothing waits for one).
fn soak_ends(rx: &mut BufReader<File>) -> bool {
    if rx.buffer().is_empty() {
        let mut p = libc::pollfd {
            fd: rx.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return false;
        }
    }
    // A line is there (or coming whole: L1 writes it in one piece).
    next_instruction(rx) == "end-soak"
}

/// Mounts /dev, /proc and /sys and points stdio at the console (the kernel found no
/// /dev/console in the initramfs, so init starts without stdio).
fn init_system() -> Result<()> {
    for d in ["/dev", "/proc", "/sys"] {
        let _ = fs::create_dir_all(d);
    }
    mount("devtmpfs", "/dev", "devtmpfs")?;
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|e| format!("/dev/console: {e}"))?;
    for fd in 0..3 {
        // SAFETY: dup2 of a valid open fd onto the standard descriptors, which we own as init.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")
}

fn mount(src: &str, target: &str, fstype: &str) -> Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in a literal");
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: three valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, ptr::null()) };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, r: Result<String>) -> bool {
        match r {
            Ok(note) => {
                self.passed += 1;
                if note.is_empty() {
                    println!("PASS: L2: {name}");
                } else {
                    println!("PASS: L2: {name} ({note})");
                }
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("FAIL: L2: {name}: {why}");
                false
            }
        }
    }
}

/// The next non-empty line L1 sends: `soak`, `end-soak` or `reboot`; anything else (or the line
/// closing) means `poweroff`.
fn next_instruction(rx: &mut BufReader<File>) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        match rx.read_line(&mut line) {
            Ok(0) | Err(_) => return "poweroff".into(),
            Ok(_) => match line.trim() {
                "" => continue,
                w @ ("reboot" | "soak" | "end-soak") => return w.into(),
                _ => return "poweroff".into(),
            },
        }
    }
}

// --- memory ------------------------------------------------------------------------------------

/// One locked, zeroed page of L2 RAM that devices write behind the compiler's back: every access
/// is volatile.
struct Page {
    ptr: NonNull<u8>,
}

impl Page {
    fn new() -> Result<Page> {
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap a page: {}", io::Error::last_os_error()));
        }
        Ok(Page {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned NULL")?,
        })
    }

    fn va(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn fill(&self, seed: u8) {
        for (i, v) in pattern(seed).into_iter().enumerate() {
            // SAFETY: i < PAGE, inside the mapping this Page owns.
            unsafe { ptr::write_volatile(self.ptr.as_ptr().add(i), v) };
        }
        fence(Ordering::SeqCst);
    }

    fn bytes(&self) -> Vec<u8> {
        fence(Ordering::SeqCst);
        // SAFETY: i < PAGE, inside the mapping this Page owns.
        (0..PAGE)
            .map(|i| unsafe { ptr::read_volatile(self.ptr.as_ptr().add(i)) })
            .collect()
    }

    /// Ok if the page holds what `fill(seed)` wrote.
    fn expect(&self, seed: u8, what: &str) -> Result<()> {
        let want = pattern(seed);
        let got = self.bytes();
        if got == want {
            return Ok(());
        }
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        Err(format!(
            "{what}: {diff} of {PAGE} bytes differ from pattern {seed:#04x} (first bytes {:02x?})",
            &got[..8]
        ))
    }

    /// The guest-physical address of the page (root reads PFNs from /proc/self/pagemap).
    fn phys(&self) -> Result<u64> {
        let f = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, self.va() / PAGE as u64 * 8)
            .map_err(|e| format!("pagemap read: {e}"))?;
        let e = u64::from_le_bytes(e);
        if e & (1 << 63) == 0 || e & ((1 << 55) - 1) == 0 {
            return Err(format!("page not present or PFN hidden (pagemap {e:#x})"));
        }
        Ok((e & ((1 << 55) - 1)) * PAGE as u64)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping mmap returned; nothing borrows it past self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE) };
    }
}

/// The page contents `fill(seed)` writes: distinct per seed and per byte position.
fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)) ^ (i >> 8) as u8)
        .collect()
}

// --- edu ---------------------------------------------------------------------------------------

/// One edu: its BAR0 and, in translated mode, its MSI eventfd.
struct Edu {
    name: String,
    bar0: Bar,
    msi: Option<OwnedFd>,
}

impl Edu {
    /// Enables memory decoding and bus mastering (QEMU drops the DMA of a device that is not a
    /// bus master) through a config-space file at `cfg_offset`, then checks edu's id register.
    fn new(name: String, bar0: Bar, cfg: &File, cfg_offset: u64) -> Result<Edu> {
        let mut cmd = [0u8; 2];
        cfg.read_exact_at(&mut cmd, cfg_offset + PCI_COMMAND)
            .map_err(|e| format!("read PCI_COMMAND: {e}"))?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        cfg.write_all_at(&cmd.to_le_bytes(), cfg_offset + PCI_COMMAND)
            .map_err(|e| format!("write PCI_COMMAND: {e}"))?;
        let id = bar0.read_u32(EDU_ID);
        if id & 0xffff != 0x00ed {
            return Err(format!("{name}: edu id register reads {id:#010x}"));
        }
        Ok(Edu {
            name,
            bar0,
            msi: None,
        })
    }

    /// One 4 KiB DMA (edu starts it from a 100 ms timer); with an MSI eventfd, also waits for
    /// the completion interrupt and reports whether it came.
    /// Copies a page from `src` to `dst` through the device's buffer (a DMA in, a DMA out):
    /// how many completion interrupts came.
    fn copy(&self, src: u64, dst: u64) -> Result<usize> {
        let read = self.dma(src, EDU_BUFFER, false)?;
        let written = self.dma(EDU_BUFFER, dst, true)?;
        Ok(usize::from(read) + usize::from(written))
    }

    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<bool> {
        self.bar0.write_u64(EDU_DMA_SRC, src);
        self.bar0.write_u64(EDU_DMA_DST, dst);
        self.bar0.write_u64(EDU_DMA_COUNT, PAGE as u64);
        fence(Ordering::SeqCst);
        let irq = if self.msi.is_some() { EDU_CMD_IRQ } else { 0 };
        let dir = if to_ram { EDU_CMD_TO_RAM } else { 0 };
        self.bar0.write_u64(EDU_DMA_CMD, EDU_CMD_START | dir | irq);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.bar0.read_u64(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: DMA {src:#x} -> {dst:#x} never completed",
                    self.name
                ));
            }
            thread::sleep(Duration::from_micros(500));
        }
        fence(Ordering::SeqCst);
        let Some(fd) = &self.msi else {
            return Ok(false);
        };
        let got = wait_eventfd(fd, Duration::from_secs(5));
        let status = self.bar0.read_u32(EDU_IRQ_STATUS);
        if status != 0 {
            self.bar0.write_u32(EDU_IRQ_ACK, status);
        }
        Ok(got)
    }
}

fn wait_eventfd(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut p, 1, ms) } != 1 {
        return false;
    }
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from a valid eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    n == 8 && v > 0
}

// --- translated mode ---------------------------------------------------------------------------

/// An edu bound to vfio-pci in L2, its cdev bound to L2's iommufd and attached to its own IOAS.
struct VfioEdu {
    edu: Edu,
    ioas: u32,
    _cdev: File,
}

fn bind_vfio_pci(bdf: &str) -> Result<String> {
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    if fs::metadata(format!("{dev}/driver")).is_ok() {
        fs::write(format!("{dev}/driver/unbind"), bdf).map_err(|e| format!("unbind: {e}"))?;
    }
    fs::write(format!("{dev}/driver_override"), "vfio-pci")
        .map_err(|e| format!("driver_override: {e}"))?;
    fs::write("/sys/bus/pci/drivers_probe", bdf).map_err(|e| format!("drivers_probe: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(cdev) = guest_kit::sys::vfio_cdev(bdf) {
            return Ok(cdev);
        }
        if Instant::now() > deadline {
            return Err(format!("{bdf}: no vfio-dev after binding vfio-pci"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn open_vfio_edu(iommufd: &File, bdf: &str) -> Result<VfioEdu> {
    let path = bind_vfio_pci(bdf)?;
    let cdev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {path}: {e}"))?;
    let mut bind = VfioDeviceBindIommufd {
        iommufd: iommufd.as_raw_fd(),
        ..VfioDeviceBindIommufd::sized()
    };
    ioctl(cdev.as_fd(), &mut bind).map_err(|e| format!("{bdf}: {e}"))?;
    let mut alloc = IommuIoasAlloc::sized();
    ioctl(iommufd.as_fd(), &mut alloc).map_err(|e| e.to_string())?;
    let mut attach = VfioDeviceAttachIommufdPt {
        pt_id: alloc.out_ioas_id,
        ..VfioDeviceAttachIommufdPt::sized()
    };
    ioctl(cdev.as_fd(), &mut attach).map_err(|e| format!("{bdf}: {e}"))?;
    let region = |index| -> Result<VfioRegionInfo> {
        let mut info = VfioRegionInfo {
            index,
            ..VfioRegionInfo::sized()
        };
        ioctl(cdev.as_fd(), &mut info).map_err(|e| format!("{bdf}: {e}"))?;
        Ok(info)
    };
    let bar = region(VFIO_PCI_BAR0_REGION_INDEX)?;
    if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x100 {
        return Err(format!("{bdf}: BAR0 not mmappable or too small: {bar:?}"));
    }
    let bar0 = Bar::map(&cdev, bar.offset, bar.size as usize)?;
    let cfg = region(VFIO_PCI_CONFIG_REGION_INDEX)?;
    let mut edu = Edu::new(bdf.to_string(), bar0, &cdev, cfg.offset)?;
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd that we own.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(format!("eventfd: {}", io::Error::last_os_error()));
    }
    // SAFETY: efd was just returned by eventfd and is owned by nobody else.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    set_irq_eventfd(cdev.as_fd(), VFIO_PCI_MSI_IRQ_INDEX, efd.as_fd())
        .map_err(|e| format!("{bdf}: MSI: {e}"))?;
    edu.msi = Some(efd);
    Ok(VfioEdu {
        edu,
        ioas: alloc.out_ioas_id,
        _cdev: cdev,
    })
}

fn map(iommufd: &File, ioas: u32, page: &Page, iova: u64, writeable: bool) -> Result<()> {
    let mut m = IommuIoasMap {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA
            | IOMMU_IOAS_MAP_READABLE
            | if writeable {
                IOMMU_IOAS_MAP_WRITEABLE
            } else {
                0
            },
        ioas_id: ioas,
        user_va: page.va(),
        length: PAGE as u64,
        iova,
        ..IommuIoasMap::sized()
    };
    ioctl(iommufd.as_fd(), &mut m).map_err(|e| format!("map {iova:#x}: {e}"))
}

fn unmap(iommufd: &File, ioas: u32, iova: u64) -> Result<()> {
    let mut u = IommuIoasUnmap {
        ioas_id: ioas,
        iova,
        length: PAGE as u64,
        ..IommuIoasUnmap::sized()
    };
    ioctl(iommufd.as_fd(), &mut u).map_err(|e| format!("unmap {iova:#x}: {e}"))
}

/// The translated-mode checks; returns how many mappings are live at the end.
fn translated_checks(r: &mut Report, bdfs: &[String]) -> usize {
    let setup = || -> Result<(File, VfioEdu, VfioEdu)> {
        let fd = guest_kit::sys::open_rw("/dev/iommu")?;
        let a = open_vfio_edu(&fd, &bdfs[0])?;
        let b = open_vfio_edu(&fd, &bdfs[1])?;
        Ok((fd, a, b))
    };
    let (fd, a, b) = match setup() {
        Ok(v) => v,
        Err(e) => {
            r.check(
                "both edu devices bound to vfio-pci, each attached to its own IOAS",
                Err(e),
            );
            return 0;
        }
    };
    r.check(
        "both edu devices bound to vfio-pci, each attached to its own IOAS",
        Ok(format!(
            "{} -> IOAS {}, {} -> IOAS {}",
            a.edu.name, a.ioas, b.edu.name, b.ioas
        )),
    );
    let pages = || -> Result<[Page; 6]> {
        Ok([
            Page::new()?,
            Page::new()?,
            Page::new()?,
            Page::new()?,
            Page::new()?,
            Page::new()?,
        ])
    };
    let [a_src, a_dst, a_ro, a_gone, b_src, b_dst] = match pages() {
        Ok(p) => p,
        Err(e) => {
            r.check("buffers", Err(e));
            return 0;
        }
    };
    let maps = [
        (a.ioas, &a_src, A_SRC, true),
        (a.ioas, &a_dst, A_DST, true),
        (a.ioas, &a_ro, A_RO, false),
        (a.ioas, &a_gone, A_GONE, true),
        (b.ioas, &b_src, B_SRC, true),
        (b.ioas, &b_dst, B_DST, true),
    ];
    let mapped = maps
        .iter()
        .try_for_each(|&(ioas, page, iova, w)| map(&fd, ioas, page, iova, w));
    if !r.check(
        "IOAS_MAP of 6 pages (one read-only) at fixed IOVAs in two IOASes",
        mapped.map(|()| String::new()),
    ) {
        return 0;
    }
    let mut live = maps.len();

    // Both directions through the IOVAs, with the MSI of each completion.
    for (dev, src, dst, src_iova, dst_iova, seed) in [
        (&a, &a_src, &a_dst, A_SRC, A_DST, 0x11u8),
        (&b, &b_src, &b_dst, B_SRC, B_DST, 0x22u8),
    ] {
        let name = &dev.edu.name;
        let mut irqs = 0;
        let res = (|| {
            src.fill(seed);
            dst.fill(0);
            irqs += dev.edu.copy(src_iova, dst_iova)?;
            dst.expect(seed, "destination page")?;
            Ok(format!("{src_iova:#x} -> device -> {dst_iova:#x}"))
        })();
        r.check(
            &format!("{name}: RAM->device and device->RAM DMA land through the IOVAs"),
            res,
        );
        let msi = if irqs == 2 {
            Ok("2 of 2 completions".to_string())
        } else {
            Err(format!("{irqs} of 2 completions raised an MSI"))
        };
        r.check(
            &format!("{name}: MSI on DMA completion reaches L2's eventfd"),
            msi,
        );
    }

    // After IOAS_UNMAP the old IOVA no longer reaches the page. This is the run's first DMA that
    // must fault (L1 checks its fault record; the emulated VT-d may lose later back-to-back ones).
    let after_unmap = (|| {
        a_src.fill(0x99);
        a_gone.fill(0);
        a.edu.copy(A_SRC, A_GONE)?;
        a_gone.expect(0x99, "before unmap")?;
        unmap(&fd, a.ioas, A_GONE)?;
        live -= 1;
        a_gone.fill(0xaa);
        a.edu.dma(EDU_BUFFER, A_GONE, true)?;
        a_gone.expect(0xaa, "page after a DMA to its unmapped IOVA")?;
        Ok(format!(
            "DMA to {A_GONE:#x} landed before IOAS_UNMAP, not after"
        ))
    })();
    r.check(
        &format!("{}: after IOAS_UNMAP the DMA no longer lands", a.edu.name),
        after_unmap,
    );
    // A read-only mapping: the device may read it, its write is refused.
    let ro = (|| {
        a_ro.fill(0x33);
        a_dst.fill(0);
        a.edu.copy(A_RO, A_DST)?;
        a_dst.expect(0x33, "read through the read-only mapping")?;
        a_src.fill(0x44);
        a.edu.copy(A_SRC, A_RO)?;
        a_ro.expect(0x33, "read-only page after a device write")?;
        Ok(format!("device write to {A_RO:#x} dropped"))
    })();
    r.check(
        &format!(
            "{}: a READ-only mapping is readable and refuses the device write",
            a.edu.name
        ),
        ro,
    );

    // Isolation: each device's IOAS holds only its own pages.
    let iso = (|| {
        a_src.fill(0x55);
        b_dst.fill(0x66);
        a.edu.copy(A_SRC, B_DST)?;
        b_dst.expect(0x66, "B's page after A wrote to B's IOVA")?;
        b_src.fill(0x77);
        a_dst.fill(0x88);
        b.edu.copy(B_SRC, A_DST)?;
        a_dst.expect(0x88, "A's page after B wrote to A's IOVA")?;
        // B reads A's IOVA (unmapped for B), then writes its device buffer to its own page.
        b_dst.fill(0);
        b.edu.copy(A_SRC, B_DST)?;
        if b_dst.expect(0x55, "").is_ok() {
            return Err("B read A's page through A's IOVA".into());
        }
        Ok(format!(
            "A -> {B_DST:#x}, B -> {A_DST:#x} and B <- {A_SRC:#x} all blocked"
        ))
    })();
    r.check(
        "devices in separate IOASes cannot reach each other's pages",
        iso,
    );

    println!(
        "E2E-L2: DMAs that had to be refused: {} -> {A_GONE:#x} (unmapped), -> {A_RO:#x} (read-only), -> {B_DST:#x}; {} -> {A_DST:#x}, <- {A_SRC:#x}",
        a.edu.name, b.edu.name
    );
    // Keep the devices, IOASes and pages alive until L1 has looked at the daemon.
    std::mem::forget((fd, a, b, a_src, a_dst, a_ro, a_gone, b_src, b_dst));
    live
}

// --- identity mode -----------------------------------------------------------------------------

fn identity_checks(r: &mut Report, bdfs: &[String]) {
    for (i, bdf) in bdfs.iter().enumerate() {
        let seed = 0xc0 + i as u8;
        let res = (|| {
            let dev = format!("/sys/bus/pci/devices/{bdf}");
            if fs::metadata(format!("{dev}/driver")).is_ok() {
                return Err(format!("{bdf} has a driver in identity mode"));
            }
            let cfg = OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("{dev}/config"))
                .map_err(|e| format!("{dev}/config: {e}"))?;
            let res0 = OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("{dev}/resource0"))
                .map_err(|e| format!("{dev}/resource0: {e}"))?;
            let len = res0.metadata().map_err(|e| e.to_string())?.len() as usize;
            let edu = Edu::new(bdf.clone(), Bar::map(&res0, 0, len)?, &cfg, 0)?;
            let (src, dst) = (Page::new()?, Page::new()?);
            let (src_pa, dst_pa) = (src.phys()?, dst.phys()?);
            src.fill(seed);
            dst.fill(0);
            edu.copy(src_pa, dst_pa)?;
            dst.expect(seed, "destination page at its guest-physical address")?;
            Ok(format!("GPA {src_pa:#x} -> device -> GPA {dst_pa:#x}"))
        })();
        r.check(
            &format!(
                "{bdf}: iommu.passthrough=1 gives identity: DMA to guest-physical addresses lands"
            ),
            res,
        );
    }
}
