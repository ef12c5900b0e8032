//! guest-traffic: the guest side of the guest-driver tier (tests/guest/run.sh).
//!
//! The guest's IOMMU is the daemon, reached through QEMU's vhost-user-test-device-pci and the
//! real Linux virtio-iommu driver. This program makes that driver send ATTACH/MAP/UNMAP traffic
//! through the guest's own iommufd, and stops at every point where the daemon's state is known,
//! so that the host can compare it with what the guest did:
//!
//! 1. `BOOT`: before anything, the endpoints sit in their boot (default) domains.
//! 2. per edu device: bind its VFIO cdev to a fresh iommufd, attach it to an empty IOAS
//!    (`ATTACHED`), map a 4 KiB, a 64 KiB and a 2 MiB buffer at fixed IOVAs (`MAPPED`, with the
//!    guest-physical pages behind each IOVA, read from /proc/self/pagemap), unmap them
//!    (`UNMAPPED`), close everything (`CLOSED`: back in the default domain);
//! 3. both devices on one IOAS, which iommufd backs with one shared domain (`SHARED-*`);
//! 4. `KMSG` lines: the whole kernel log with levels, then `END`.
//!
//! The checkpoints travel over the second serial port (/dev/ttyS1, raw mode): the guest writes
//! one line, the host checks the daemon's state and answers `go` (or `stop` to abort). `KMSG`
//! lines get no answer. edu's DMA is never used: QEMU does not know the daemon's translations.
//!
//! Guest-side checks print `PASS: <name>` or `FAIL: <name>: <why>`; exit status 1 if any failed.
//! It touches only the edu devices the initramfs bound to vfio-pci (VM_TIER_EDU_BDFS).

// The iommufd/VFIO ioctls: the daemon's own definitions (the repository's `uapi` crate).
use viommu_uapi as uapi;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;

use guest_kit::sys::{open_raw_tty, open_rw, vfio_cdev};
use uapi::*;

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

/// The buffers mapped into each device's IOAS: (name, length, IOVA). The IOVAs are far apart, so
/// the mappings of one buffer never touch another's and the host can compare exact ranges.
const BUFFERS: [(&str, usize, u64); 3] = [
    ("4k", PAGE, 0x10_0000),
    ("64k", 16 * PAGE, 0x20_0000),
    ("2m", HUGE, 0x40_0000),
];
/// The buffer both devices share through one IOAS in step 3.
const SHARED: (&str, usize, u64) = ("shared-64k", 16 * PAGE, 0x80_0000);

type Result<T> = std::result::Result<T, String>;

/// The control channel to the host: the second serial port, in raw mode.
struct Ctl {
    tx: File,
    rx: BufReader<File>,
}

impl Ctl {
    fn open(path: &str) -> Result<Ctl> {
        let f = open_raw_tty(path)?;
        let rx = f.try_clone().map_err(|e| format!("dup {path}: {e}"))?;
        Ok(Ctl {
            tx: f,
            rx: BufReader::new(rx),
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.tx
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("control channel write: {e}"))
    }

    /// Sends a checkpoint and waits for the host's verdict: Ok on `go`, Err on `stop`.
    fn checkpoint(&mut self, line: &str) -> Result<()> {
        println!(
            "guest-traffic: checkpoint {}",
            line.split(' ').take(2).collect::<Vec<_>>().join(" ")
        );
        self.send(line)?;
        let mut reply = String::new();
        loop {
            reply.clear();
            let n = self
                .rx
                .read_line(&mut reply)
                .map_err(|e| format!("control channel read: {e}"))?;
            if n == 0 {
                return Err("control channel closed".into());
            }
            match reply.trim() {
                "go" => return Ok(()),
                "" => continue,
                other => return Err(format!("host answered {other:?} to {line:?}")),
            }
        }
    }
}

/// An anonymous (or hugetlbfs) buffer, unmapped on drop.
struct Buffer {
    ptr: *mut libc::c_void,
    len: usize,
    how: &'static str,
}

impl Buffer {
    fn new(len: usize) -> Result<Buffer> {
        if len >= HUGE {
            if let Ok(b) = Self::mmap(
                len,
                libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT),
                "hugetlb",
            ) {
                return Ok(b);
            }
        }
        let b = Self::mmap(len, 0, "anonymous")?;
        if len >= HUGE {
            // SAFETY: advice on a mapping this Buffer owns; it changes no memory contents.
            unsafe { libc::madvise(b.ptr, len, libc::MADV_HUGEPAGE) };
        }
        Ok(b)
    }

    fn mmap(len: usize, flags: libc::c_int, how: &'static str) -> Result<Buffer> {
        // SAFETY: a fresh private anonymous mapping; the kernel picks the address, nothing
        // existing is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len} bytes ({how}): {}",
                io::Error::last_os_error()
            ));
        }
        let b = Buffer { ptr, len, how };
        // Fault every page in with distinct contents, so the pages are real and distinct.
        // SAFETY: the range is this buffer's own writable mapping of exactly `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        for (i, chunk) in bytes.chunks_mut(PAGE).enumerate() {
            chunk.fill((i as u8) ^ 0xa5);
        }
        Ok(b)
    }

    fn va(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping created in `mmap`, unmapped exactly once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Runs of guest-physical pages behind `[va, va+len)`: `iova:gpa:len` tokens (hex), one per
/// physically contiguous run, from /proc/self/pagemap (root sees the PFNs).
fn phys_runs(va: u64, len: usize, iova: u64) -> Result<Vec<String>> {
    let pm = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let pages = len / PAGE;
    let mut raw = vec![0u8; pages * 8];
    pm.read_exact_at(&mut raw, va / PAGE as u64 * 8)
        .map_err(|e| format!("read pagemap: {e}"))?;
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for (i, e) in raw.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
        if e >> 63 == 0 {
            return Err(format!("page {i} of the buffer at {va:#x} is not present"));
        }
        let pfn = e & ((1 << 55) - 1);
        if pfn == 0 {
            return Err("pagemap shows PFN 0 (not running as root?)".into());
        }
        let (io, gpa) = (iova + (i * PAGE) as u64, pfn * PAGE as u64);
        match runs.last_mut() {
            Some((ri, rg, rl)) if *ri + *rl == io && *rg + *rl == gpa => *rl += PAGE as u64,
            _ => runs.push((io, gpa, PAGE as u64)),
        }
    }
    Ok(runs
        .iter()
        .map(|(i, g, l)| format!("{i:#x}:{g:#x}:{l:#x}"))
        .collect())
}

struct Report {
    failed: usize,
}

impl Report {
    fn check<T>(&mut self, name: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                println!("PASS: {name}");
                Some(v)
            }
            Err(why) => {
                println!("FAIL: {name}: {why}");
                self.failed += 1;
                None
            }
        }
    }
}

fn ioas_alloc(iommufd: &File) -> Result<u32> {
    let mut a = IommuIoasAlloc::sized();
    ioctl(iommufd.as_fd(), &mut a).map_err(|e| e.to_string())?;
    Ok(a.out_ioas_id)
}

/// Opens the device's cdev, binds it to `iommufd` and attaches it to `ioas`.
fn bind_attach(bdf: &str, iommufd: &File, ioas: u32) -> Result<File> {
    let dev = open_rw(&vfio_cdev(bdf)?)?;
    let mut b = VfioDeviceBindIommufd {
        iommufd: iommufd.as_raw_fd(),
        ..VfioDeviceBindIommufd::sized()
    };
    ioctl(dev.as_fd(), &mut b).map_err(|e| e.to_string())?;
    let mut a = VfioDeviceAttachIommufdPt {
        pt_id: ioas,
        ..VfioDeviceAttachIommufdPt::sized()
    };
    ioctl(dev.as_fd(), &mut a).map_err(|e| e.to_string())?;
    Ok(dev)
}

fn ioas_map(iommufd: &File, ioas: u32, buf: &Buffer, iova: u64) -> Result<()> {
    let mut m = IommuIoasMap {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: ioas,
        user_va: buf.va(),
        length: buf.len as u64,
        iova,
        ..IommuIoasMap::sized()
    };
    ioctl(iommufd.as_fd(), &mut m).map_err(|e| e.to_string())
}

fn ioas_unmap(iommufd: &File, ioas: u32, iova: u64, len: usize) -> Result<()> {
    let mut u = IommuIoasUnmap {
        ioas_id: ioas,
        iova,
        length: len as u64,
        ..IommuIoasUnmap::sized()
    };
    ioctl(iommufd.as_fd(), &mut u).map_err(|e| e.to_string())?;
    if u.length != len as u64 {
        return Err(format!(
            "IOMMU_IOAS_UNMAP at {iova:#x} unmapped {:#x} of {len:#x} bytes",
            u.length
        ));
    }
    Ok(())
}

/// Maps every buffer of `set` into `ioas`; the buffers and the `MAPPED` tokens.
fn map_set(
    r: &mut Report,
    tag: &str,
    iommufd: &File,
    ioas: u32,
    set: &[(&str, usize, u64)],
) -> Option<(Vec<Buffer>, Vec<String>)> {
    let mut bufs = Vec::new();
    let mut tokens = Vec::new();
    for &(name, len, iova) in set {
        let buf = r.check(
            &format!("{tag}: allocate the {name} buffer"),
            Buffer::new(len),
        )?;
        r.check(
            &format!("{tag}: IOAS_MAP {name} ({}) at IOVA {iova:#x}", buf.how),
            ioas_map(iommufd, ioas, &buf, iova),
        )?;
        let runs = r.check(
            &format!("{tag}: guest-physical pages of the {name} buffer"),
            phys_runs(buf.va(), len, iova),
        )?;
        println!(
            "guest-traffic: {tag} {name}: {} physically contiguous run(s)",
            runs.len()
        );
        tokens.extend(runs);
        bufs.push(buf);
    }
    Some((bufs, tokens))
}

fn unmap_set(
    r: &mut Report,
    tag: &str,
    iommufd: &File,
    ioas: u32,
    set: &[(&str, usize, u64)],
) -> bool {
    let mut ok = true;
    for &(name, len, iova) in set {
        ok &= r
            .check(
                &format!("{tag}: IOAS_UNMAP {name} at IOVA {iova:#x}"),
                ioas_unmap(iommufd, ioas, iova, len),
            )
            .is_some();
    }
    ok
}

/// Step 2 for one device. Err only when the host said stop.
fn one_device(r: &mut Report, ctl: &mut Ctl, bdf: &str) -> Result<()> {
    let tag = bdf;
    let Some(iommufd) = r.check(&format!("{tag}: open /dev/iommu"), open_rw("/dev/iommu")) else {
        return Ok(());
    };
    let Some(ioas) = r.check(&format!("{tag}: IOAS_ALLOC"), ioas_alloc(&iommufd)) else {
        return Ok(());
    };
    let Some(dev) = r.check(
        &format!("{tag}: VFIO cdev BIND_IOMMUFD + ATTACH_IOMMUFD_PT to IOAS {ioas}"),
        bind_attach(bdf, &iommufd, ioas),
    ) else {
        return Ok(());
    };
    ctl.checkpoint(&format!("ATTACHED {bdf}"))?;
    if let Some((bufs, tokens)) = map_set(r, tag, &iommufd, ioas, &BUFFERS) {
        ctl.checkpoint(&format!("MAPPED {bdf} {}", tokens.join(" ")))?;
        if unmap_set(r, tag, &iommufd, ioas, &BUFFERS) {
            ctl.checkpoint(&format!("UNMAPPED {bdf}"))?;
        }
        drop(bufs);
    }
    drop(dev);
    drop(iommufd);
    ctl.checkpoint(&format!("CLOSED {bdf}"))
}

/// Step 3: both devices on one IOAS (iommufd gives them one domain).
fn shared(r: &mut Report, ctl: &mut Ctl, bdfs: &[String]) -> Result<()> {
    let tag = "shared";
    let Some(iommufd) = r.check("shared: open /dev/iommu", open_rw("/dev/iommu")) else {
        return Ok(());
    };
    let Some(ioas) = r.check("shared: IOAS_ALLOC", ioas_alloc(&iommufd)) else {
        return Ok(());
    };
    let mut devs = Vec::new();
    for bdf in bdfs {
        let Some(d) = r.check(
            &format!("shared: {bdf} BIND_IOMMUFD + ATTACH_IOMMUFD_PT to IOAS {ioas}"),
            bind_attach(bdf, &iommufd, ioas),
        ) else {
            return Ok(());
        };
        devs.push(d);
    }
    if let Some((bufs, tokens)) = map_set(r, tag, &iommufd, ioas, &[SHARED]) {
        ctl.checkpoint(&format!(
            "SHARED-MAPPED {} {}",
            bdfs.join(","),
            tokens.join(" ")
        ))?;
        if unmap_set(r, tag, &iommufd, ioas, &[SHARED]) {
            ctl.checkpoint(&format!("SHARED-UNMAPPED {}", bdfs.join(",")))?;
        }
        drop(bufs);
    }
    drop(devs);
    drop(iommufd);
    ctl.checkpoint(&format!("SHARED-CLOSED {}", bdfs.join(",")))
}

/// Sends the whole kernel log, one `KMSG <level> <text>` line per record.
fn send_kmsg(ctl: &mut Ctl) -> Result<()> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("open /dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // "prio,seq,usec,flags;text\n" (+ " KEY=value" continuation lines).
                let rec = String::from_utf8_lossy(&buf[..n]);
                let first = rec.lines().next().unwrap_or("");
                let Some((hdr, text)) = first.split_once(';') else {
                    continue;
                };
                let prio: u32 = hdr
                    .split(',')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(7);
                ctl.send(&format!("KMSG {} {}", prio & 7, text.replace('\r', " ")))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // A record overwritten while reading: skip on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(format!("read /dev/kmsg: {e}")),
        }
    }
    Ok(())
}

fn run(r: &mut Report, ctl: &mut Ctl) -> Result<()> {
    let bdfs: Vec<String> = std::env::var("VM_TIER_EDU_BDFS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    r.check(
        "two edu devices bound to vfio-pci",
        if bdfs.len() == 2 {
            Ok(())
        } else {
            Err(format!("VM_TIER_EDU_BDFS = {bdfs:?}"))
        },
    );
    for bdf in &bdfs {
        let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
        r.check(
            &format!("{bdf} has an IOMMU group"),
            fs::read_link(&link)
                .map(|p| println!("guest-traffic: {bdf} iommu group {}", p.display()))
                .map_err(|e| format!("{link}: {e}")),
        );
    }
    ctl.checkpoint(&format!("BOOT {}", bdfs.join(",")))?;
    for bdf in &bdfs {
        one_device(r, ctl, bdf)?;
    }
    if bdfs.len() >= 2 {
        shared(r, ctl, &bdfs)?;
    }
    r.check("kernel log sent to the host", send_kmsg(ctl));
    ctl.checkpoint("END")
}

fn main() -> ExitCode {
    let mut r = Report { failed: 0 };
    // Hugetlb pages for the 2 MiB buffer; without them the buffer falls back to THP/4 KiB pages.
    let _ = fs::write("/proc/sys/vm/nr_hugepages", "4");
    let port = std::env::var("GUEST_CTL_TTY").unwrap_or_else(|_| "/dev/ttyS1".into());
    if let Some(mut ctl) = r.check(
        &format!("open the control channel {port}"),
        Ctl::open(&port),
    ) {
        if let Err(e) = run(&mut r, &mut ctl) {
            r.check::<()>("host checkpoints", Err(e));
        }
    }
    println!("guest-traffic: {} guest-side check(s) failed", r.failed);
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
