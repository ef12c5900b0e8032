//! daemon-dma: the daemon's VM test (tests/vm/run.sh), inside the test VM.
//!
//! It starts the real daemon in this process (`server::serve` on a unix socket) with the iommufd
//! backend over the two edu devices' VFIO cdevs (endpoints 1 and 2), connects the crate's
//! `driver::TestVm` (VMM + guest driver, 64 MiB of memfd guest RAM) and sends virtio-iommu
//! requests through the socket. Every translation claim is proven with edu's DMA engine, driven
//! through the BAR0 of the VFIO device the backend holds: a device write that must land is
//! checked byte for byte at the GPA in the TestVm's RAM, one that must not is checked to leave a
//! sentinel untouched.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapPath, sys};
use vhost_user_iommu::backend::{Attachment, DmaBackend, HostConstraints};
use vhost_user_iommu::domains::{Limits, Rules};
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::ids::{DomainId, EndpointId};
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{
    ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE, Request, ResvKind, Status, decode_probe_properties,
};
use vhost_user_iommu::server::{Stopper, serve};
use vhost_user_iommu::vhost::{DEFAULT_POLL, DeviceSettings, IommuDevice};

type Result<T> = std::result::Result<T, String>;

const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
const EDU_ID: usize = 0x00;
const EDU_DMA_SRC: usize = 0x80;
const EDU_DMA_DST: usize = 0x88;
const EDU_DMA_COUNT: usize = 0x90;
const EDU_DMA_CMD: usize = 0x98;
const EDU_CMD_START: u64 = 1;
const EDU_CMD_TO_RAM: u64 = 2;
const EDU_BUFFER: u64 = 0x40000;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

const PAGE: u64 = 4096;
/// DMA buffers in the TestVm's guest RAM (64 MiB at GPA 0).
const GPA_A: u64 = 0x10_0000;
const GPA_B: u64 = 0x20_0000;
const GPA_C: u64 = 0x30_0000;
/// IOVAs of paging mappings: above guest RAM (so an identity leak cannot land at them) and below
/// edu's 28-bit DMA mask.
const IOVA_X: u64 = 0x0800_0000;
const IOVA_Y: u64 = 0x0810_0000;
const IOVA_Z: u64 = 0x0820_0000;
const IOVA_W: u64 = 0x0830_0000;
/// A 16 MiB mapping (timing of the pinning).
const IOVA_BIG: u64 = 0x0900_0000;
const SENTINEL: u8 = 0xee;

fn pattern(seed: u8) -> impl Fn(usize) -> u8 + Copy {
    move |i| {
        (i as u8)
            .wrapping_mul(31)
            .wrapping_add((i >> 8) as u8)
            .wrapping_add(seed.wrapping_mul(77))
            ^ 0x5a
    }
}

fn bytes(f: impl Fn(usize) -> u8) -> Vec<u8> {
    (0..PAGE as usize).map(f).collect()
}

struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, r: Result<String>) -> bool {
        match r {
            Ok(note) if note.is_empty() => println!("PASS: {name}"),
            Ok(note) => println!("PASS: {name} ({note})"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL: {name}: {why}");
                return false;
            }
        }
        self.passed += 1;
        true
    }
}

/// A mapped BAR, accessed with volatile reads and writes only.
struct Bar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory owned by this value; every access is a volatile copy.
unsafe impl Send for Bar {}

impl Bar {
    fn map(file: &File, offset: u64, len: usize) -> Result<Bar> {
        let off = libc::off_t::try_from(offset).map_err(|_| "BAR offset overflows".to_string())?;
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap BAR0: {}", std::io::Error::last_os_error()));
        }
        Ok(Bar {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned NULL")?,
            len,
        })
    }

    fn at<T>(&self, off: usize) -> *mut T {
        assert!(off.is_multiple_of(size_of::<T>()) && off + size_of::<T>() <= self.len);
        // SAFETY: in bounds (asserted) of a mapping that lives as long as `self`.
        unsafe { self.ptr.as_ptr().add(off).cast() }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: aligned, in bounds, device memory mapped for reading.
        unsafe { ptr::read_volatile(self.at::<u32>(off)) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: aligned, in bounds, device memory mapped for reading.
        unsafe { ptr::read_volatile(self.at::<u64>(off)) }
    }

    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: aligned, in bounds, device memory mapped for writing.
        unsafe { ptr::write_volatile(self.at::<u64>(off), v) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An edu device driven through the VFIO cdev the backend holds.
struct Edu {
    name: String,
    bar0: Bar,
}

impl Edu {
    fn open(backend: &IommufdBackend, ep: EndpointId, name: String) -> Result<Edu> {
        let file = backend.device_file(ep).ok_or("no device file")?;
        let bar = backend
            .region_info(ep, sys::VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|e| e.to_string())?;
        if bar.flags & sys::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x100 {
            return Err(format!("BAR0 not mmappable or too small: {bar:?}"));
        }
        let bar0 = Bar::map(file, bar.offset, bar.size as usize)?;
        let cfg = backend
            .region_info(ep, sys::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| e.to_string())?;
        let mut cmd = [0u8; 2];
        file.read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)
            .map_err(|e| format!("read PCI_COMMAND: {e}"))?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        file.write_all_at(&cmd.to_le_bytes(), cfg.offset + PCI_COMMAND)
            .map_err(|e| format!("enable bus mastering: {e}"))?;
        let id = bar0.read_u32(EDU_ID);
        if id & 0xffff != 0x00ed {
            return Err(format!("edu identification register reads {id:#010x}"));
        }
        Ok(Edu { name, bar0 })
    }

    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<()> {
        self.bar0.write_u64(EDU_DMA_SRC, src);
        self.bar0.write_u64(EDU_DMA_DST, dst);
        self.bar0.write_u64(EDU_DMA_COUNT, PAGE);
        std::sync::atomic::fence(Ordering::SeqCst);
        let cmd = EDU_CMD_START | if to_ram { EDU_CMD_TO_RAM } else { 0 };
        self.bar0.write_u64(EDU_DMA_CMD, cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bar0.read_u64(EDU_DMA_CMD) & EDU_CMD_START != 0 {
            if Instant::now() > deadline {
                return Err(format!("{}: DMA {src:#x} -> {dst:#x} not done", self.name));
            }
            thread::sleep(Duration::from_micros(200));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    /// Device reads a page at `iova` into its buffer.
    fn load(&self, iova: u64) -> Result<()> {
        self.dma(iova, EDU_BUFFER, false)
    }

    /// Device writes its buffer to the page at `iova`.
    fn store(&self, iova: u64) -> Result<()> {
        self.dma(EDU_BUFFER, iova, true)
    }
}

/// Guest RAM as the checks see it: the TestVm's memfd, through our own descriptor so that it
/// outlives the TestVm (the disconnect check reads it after the VMM is gone).
struct Ram {
    file: File,
}

impl Ram {
    fn of(vm: &TestVm) -> Result<Ram> {
        // SAFETY: dup of a valid fd the TestVm owns; the new fd is owned by the File.
        let fd = unsafe { libc::dup(vm.ram().fd()) };
        if fd < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by dup and nothing else owns it.
        Ok(Ram {
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, gpa)
            .map_err(|e| format!("write guest RAM at {gpa:#x}: {e}"))
    }

    fn fill(&self, gpa: u64, b: u8) -> Result<()> {
        self.write(gpa, &vec![b; PAGE as usize])
    }

    fn expect(&self, gpa: u64, want: &[u8], what: &str) -> Result<()> {
        let mut got = vec![0u8; want.len()];
        self.file
            .read_exact_at(&mut got, gpa)
            .map_err(|e| format!("read guest RAM at {gpa:#x}: {e}"))?;
        let wrong: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        match wrong.first() {
            None => Ok(()),
            Some(&i) => Err(format!(
                "{what}: {} of {} bytes at GPA {gpa:#x} differ (first at +{i:#x}: {:#04x}, expected {:#04x})",
                wrong.len(),
                got.len(),
                got[i],
                want[i]
            )),
        }
    }

    fn expect_sentinel(&self, gpa: u64, what: &str) -> Result<()> {
        self.expect(gpa, &[SENTINEL; PAGE as usize], what)
    }
}

fn ok(s: Status, what: &str) -> Result<()> {
    if s == Status::Ok {
        Ok(())
    } else {
        Err(format!("{what}: status {}", s.name()))
    }
}

fn attach(vm: &mut TestVm, d: u32, ep: u32, flags: u32) -> Result<()> {
    let s = vm
        .request(&Request::Attach {
            domain: DomainId(d),
            endpoint: EndpointId(ep),
            flags,
            reserved: [0; 4],
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("ATTACH endpoint {ep} to domain {d}"))
}

fn detach(vm: &mut TestVm, d: u32, ep: u32) -> Result<()> {
    let s = vm
        .request(&Request::Detach {
            domain: DomainId(d),
            endpoint: EndpointId(ep),
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("DETACH endpoint {ep} from domain {d}"))
}

fn map(vm: &mut TestVm, d: u32, iova: u64, gpa: u64, len: u64, flags: u32) -> Result<()> {
    let s = vm
        .request(&Request::Map {
            domain: DomainId(d),
            virt_start: iova,
            virt_end: iova + len - 1,
            phys_start: gpa,
            flags,
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("MAP {iova:#x} -> {gpa:#x} in domain {d}"))
}

fn unmap(vm: &mut TestVm, d: u32, iova: u64, len: u64) -> Result<()> {
    let s = vm
        .request(&Request::Unmap {
            domain: DomainId(d),
            virt_start: iova,
            virt_end: iova + len - 1,
            reserved: [0; 4],
        })
        .map_err(|e| e.to_string())?;
    ok(s, &format!("UNMAP {iova:#x} in domain {d}"))
}

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

fn expect_attachment(b: &IommufdBackend, ep: u32, want: Attachment) -> Result<()> {
    match b.attachment(EndpointId(ep)) {
        Some(a) if a == want => Ok(()),
        other => Err(format!(
            "backend has endpoint {ep} at {other:?}, expected {want:?}"
        )),
    }
}

fn edu_cdevs() -> Result<Vec<(String, PathBuf)>> {
    let dir = "/sys/bus/pci/devices";
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))? {
        let p = e.map_err(|e| e.to_string())?.path();
        let id = |f: &str| {
            fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if id("vendor") != EDU_VENDOR || id("device") != EDU_DEVICE {
            continue;
        }
        let bdf = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let vdir = p.join("vfio-dev");
        let cdev = fs::read_dir(&vdir)
            .map_err(|e| format!("{}: {e} (not bound to vfio-pci?)", vdir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio"))
            .ok_or_else(|| format!("{} lists no vfioN", vdir.display()))?;
        out.push((bdf, Path::new("/dev/vfio/devices").join(cdev)));
    }
    out.sort();
    Ok(out)
}

fn rules_from(c: &HostConstraints) -> Rules {
    Rules {
        granule_mask: (c.page_size_mask & c.page_size_mask.wrapping_neg()) - 1,
        input_range: c.input_range,
        domain_range: (1, 1023),
        resv_mem: c.reserved.clone(),
        limits: Limits::default(),
        probe_size: 512,
    }
}

fn describe(c: &HostConstraints) -> String {
    let resv: Vec<String> = c
        .reserved
        .iter()
        .map(|r| {
            let k = if r.kind == ResvKind::Msi {
                "MSI"
            } else {
                "RESERVED"
            };
            format!("{k} {:#x}..={:#x}", r.start, r.end)
        })
        .collect();
    format!(
        "page_size_mask {:#x}, input range {}, resv [{}]",
        c.page_size_mask,
        c.input_range,
        resv.join(", ")
    )
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The daemon of this test: serve loop in a thread, backend visible.
struct Daemon {
    backend: Arc<IommufdBackend>,
    socket: PathBuf,
    stopper: Arc<Stopper>,
    connections: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(backend: Arc<IommufdBackend>, mode: Mode) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("daemon-dma-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("viommu.sock");
        let settings = DeviceSettings {
            endpoints: vec![EndpointId(1), EndpointId(2)],
            boot_bypass: false,
            rules: rules_from(&backend.constraints()),
            mode,
            poll: DEFAULT_POLL,
        };
        let listener = Listener::new(&socket, true).map_err(|e| format!("listen: {e}"))?;
        let stopper = Arc::new(Stopper::default());
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, n, b) = (stopper.clone(), connections.clone(), backend.clone());
        let thread = thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                let hook = Box::new(move |_: &IommuDevice| {
                    n.fetch_add(1, Ordering::SeqCst);
                });
                let backend: Arc<dyn DmaBackend> = b;
                if let Err(e) = serve(
                    listener,
                    settings,
                    backend,
                    Arc::new(Metrics::default()),
                    s,
                    None,
                    Some(hook),
                ) {
                    eprintln!("daemon: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Daemon {
            backend,
            socket,
            stopper,
            connections,
            thread: Some(thread),
        })
    }

    fn connect(&self) -> Result<TestVm> {
        let opts = VmOptions {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            ..VmOptions::default()
        };
        TestVm::connect(&self.socket, opts).map_err(|e| format!("TestVm::connect: {e}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

struct Ctx {
    d: Daemon,
    edu1: Edu,
    edu2: Edu,
}

fn timed(f: impl FnOnce() -> Result<String>) -> Result<String> {
    let t = Instant::now();
    let r = f()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(if r.is_empty() {
        format!("{ms:.1} ms")
    } else {
        format!("{r}; {ms:.1} ms")
    })
}

/// The checks on the first connection; they build on each other, so the first failure stops.
fn first_connection(rep: &mut Report, cx: &Ctx) -> Result<()> {
    let b = &*cx.d.backend;
    let (e1, e2) = (&cx.edu1, &cx.edu2);
    let mut vm = cx.d.connect()?;
    let ram = Ram::of(&vm)?;
    let c = b.constraints();

    let go = rep.check(
        "config space reports the host granule and input range",
        (|| {
            let cfg = vm.config().map_err(|e| e.to_string())?;
            if cfg.page_size_mask != c.page_size_mask
                || cfg.input_start != c.input_range.start()
                || cfg.input_end != c.input_range.end()
            {
                return Err(format!("config {cfg:?} vs constraints {}", describe(&c)));
            }
            Ok(format!(
                "page_size_mask {:#x}, input {:#x}..={:#x}",
                cfg.page_size_mask, cfg.input_start, cfg.input_end
            ))
        })(),
    );
    if !go {
        return Ok(());
    }

    rep.check(
        "PROBE reports the MSI window and the kernel's reserved ranges",
        (|| {
            let mut notes = Vec::new();
            for ep in [1, 2] {
                let (s, props) = vm.probe(ep).map_err(|e| e.to_string())?;
                ok(s, &format!("PROBE endpoint {ep}"))?;
                let got = decode_probe_properties(&props)?;
                if got != c.reserved {
                    return Err(format!(
                        "endpoint {ep}: PROBE says {got:?}, constraints {:?}",
                        c.reserved
                    ));
                }
                if !got.iter().any(|r| {
                    r.kind == ResvKind::Msi && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff
                }) {
                    return Err(format!("endpoint {ep}: no MSI window in {got:?}"));
                }
                notes.push(format!("endpoint {ep}: {} regions", got.len()));
            }
            Ok(format!("{}; {}", notes.join(", "), describe(&c)))
        })(),
    );

    rep.check(
        "MAP over a host-reserved region (holes, MSI window) is refused with S_INVAL",
        (|| {
            attach(&mut vm, 5, 1, 0)?;
            let mut tried = Vec::new();
            for r in &c.reserved {
                let iova = r.start & c.page_size_mask;
                if !c.input_range.contains_addr(iova) {
                    continue;
                }
                let s = vm
                    .request(&Request::Map {
                        domain: DomainId(5),
                        virt_start: iova,
                        virt_end: iova + PAGE - 1,
                        phys_start: GPA_A,
                        flags: RW,
                    })
                    .map_err(|e| e.to_string())?;
                if s != Status::Inval {
                    return Err(format!("MAP at {iova:#x} in {r:?}: status {}", s.name()));
                }
                tried.push(format!("{iova:#x}"));
            }
            detach(&mut vm, 5, 1)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            Ok(format!("refused at {}", tried.join(", ")))
        })(),
    );

    let p1 = bytes(pattern(1));
    if !rep.check(
        "MAP READ|WRITE: device->IOVA DMA lands at the GPA, memory->device DMA reads the right bytes",
        timed(|| {
            expect_attachment(b, 1, Attachment::Blocked)?;
            attach(&mut vm, 1, 1, 0)?;
            map(&mut vm, 1, IOVA_X, GPA_A, PAGE, RW)?;
            map(&mut vm, 1, IOVA_Y, GPA_B, PAGE, RW)?;
            ram.write(GPA_A, &p1)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.load(IOVA_X)?;
            e1.store(IOVA_Y)?;
            ram.expect(GPA_B, &p1, "GPA B after IOVA X -> edu -> IOVA Y")?;
            ram.expect(GPA_A, &p1, "GPA A (source)")?;
            Ok(format!("backend IOAS {:?}", b.domain_ids()))
        }),
    ) {
        return Ok(());
    }

    let p2 = bytes(pattern(2));
    let p3 = bytes(pattern(3));
    rep.check(
        "MAP READ only: device reads it, a device write is refused (buffer unchanged)",
        timed(|| {
            map(&mut vm, 1, IOVA_Z, GPA_C, PAGE, MAP_F_READ)?;
            ram.write(GPA_C, &p2)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.load(IOVA_Z)?;
            e1.store(IOVA_Y)?;
            ram.expect(GPA_B, &p2, "read of the READ-only mapping")?;
            ram.write(GPA_A, &p3)?;
            e1.load(IOVA_X)?;
            e1.store(IOVA_Z)?;
            ram.expect(
                GPA_C,
                &p2,
                "GPA C after a device write to the READ-only IOVA",
            )?;
            Ok(String::new())
        }),
    );

    rep.check(
        "UNMAP: DMA to the old IOVA no longer lands, other mappings still do",
        timed(|| {
            unmap(&mut vm, 1, IOVA_Y, PAGE)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.store(IOVA_Y)?;
            ram.expect_sentinel(GPA_B, "GPA B after a DMA to the unmapped IOVA")?;
            ram.fill(GPA_A, SENTINEL)?;
            e1.store(IOVA_X)?;
            ram.expect(GPA_A, &p3, "GPA A through the mapping that stayed")?;
            Ok(String::new())
        }),
    );

    rep.check(
        "DETACH: DMA blocked, domain destroyed",
        timed(|| {
            detach(&mut vm, 1, 1)?;
            expect_attachment(b, 1, Attachment::Blocked)?;
            ram.fill(GPA_A, SENTINEL)?;
            e1.store(IOVA_X)?;
            ram.expect_sentinel(GPA_A, "GPA A after a DMA to its IOVA from the detached edu")?;
            e1.store(GPA_A)?;
            ram.expect_sentinel(
                GPA_A,
                "GPA A after a DMA to IOVA = GPA from the detached edu",
            )?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            Ok(String::new())
        }),
    );

    let p4 = bytes(pattern(4));
    rep.check(
        "ATTACH_F_BYPASS domain: IOVA = GPA",
        timed(|| {
            attach(&mut vm, 10, 1, ATTACH_F_BYPASS)?;
            expect_attachment(b, 1, Attachment::Identity)?;
            ram.write(GPA_A, &p4)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.load(GPA_A)?;
            e1.store(GPA_B)?;
            ram.expect(GPA_B, &p4, "GPA B through the identity")?;
            Ok(format!("identity IOAS {}", b.identity_ioas()))
        }),
    );

    rep.check(
        "config bypass: an unattached endpoint is blocked with bypass=0, IOVA = GPA with bypass=1",
        timed(|| {
            detach(&mut vm, 10, 1)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.store(GPA_B)?;
            ram.expect_sentinel(GPA_B, "bypass=0, unattached")?;
            vm.write_bypass(1).map_err(|e| e.to_string())?;
            expect_attachment(b, 1, Attachment::Identity)?;
            e1.store(GPA_B)?;
            ram.expect(GPA_B, &p4, "bypass=1, unattached")?;
            vm.write_bypass(0).map_err(|e| e.to_string())?;
            expect_attachment(b, 1, Attachment::Blocked)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.store(GPA_B)?;
            ram.expect_sentinel(GPA_B, "bypass back to 0")?;
            Ok(String::new())
        }),
    );

    let p5 = bytes(pattern(5));
    rep.check(
        "re-ATTACH of endpoint 1 to another domain switches its translation",
        timed(|| {
            attach(&mut vm, 20, 1, 0)?;
            map(&mut vm, 20, IOVA_X, GPA_A, PAGE, RW)?;
            attach(&mut vm, 21, 2, 0)?;
            map(&mut vm, 21, IOVA_X, GPA_B, PAGE, RW)?;
            map(&mut vm, 21, IOVA_W, GPA_C, PAGE, RW)?;
            ram.write(GPA_A, &p5)?;
            e1.load(IOVA_X)?;
            ram.fill(GPA_A, SENTINEL)?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.store(IOVA_X)?;
            ram.expect(GPA_A, &p5, "domain 20: IOVA X -> GPA A")?;
            ram.expect_sentinel(GPA_B, "domain 20 must not reach GPA B")?;
            let before = b.domain_ids();
            attach(&mut vm, 21, 1, 0)?;
            ram.fill(GPA_A, SENTINEL)?;
            e1.store(IOVA_X)?;
            ram.expect(GPA_B, &p5, "domain 21: IOVA X -> GPA B")?;
            ram.expect_sentinel(GPA_A, "after the switch GPA A is unreachable")?;
            let after = b.domain_ids();
            if after.len() != 1 {
                return Err(format!(
                    "IOASes {before:?} -> {after:?}: domain 20 not destroyed"
                ));
            }
            Ok(format!("IOASes {before:?} -> {after:?}"))
        }),
    );

    let p6 = bytes(pattern(6));
    rep.check(
        "both edus in one domain share its mappings",
        timed(|| {
            ram.write(GPA_C, &p6)?;
            e2.load(IOVA_W)?;
            ram.fill(GPA_B, SENTINEL)?;
            e2.store(IOVA_X)?;
            ram.expect(GPA_B, &p6, "edu 2 through domain 21")?;
            ram.fill(GPA_B, SENTINEL)?;
            e1.load(IOVA_W)?;
            e1.store(IOVA_X)?;
            ram.expect(GPA_B, &p6, "edu 1 through domain 21")?;
            Ok(String::new())
        }),
    );

    rep.check(
        "mapping without READ or WRITE: accepted, no DMA reaches it, UNMAP forgets it",
        timed(|| {
            map(&mut vm, 21, IOVA_Z, GPA_C, PAGE, 0)?;
            ram.fill(GPA_C, SENTINEL)?;
            e1.store(IOVA_Z)?;
            ram.expect_sentinel(GPA_C, "GPA C after a DMA to the no-permission IOVA")?;
            unmap(&mut vm, 21, IOVA_Z, PAGE)?;
            Ok(String::new())
        }),
    );

    let (file_maps, va_maps) = b.map_counts();
    rep.check(
        "map path of the checks above",
        Ok(format!(
            "{} ({file_maps} maps by IOMMU_IOAS_MAP_FILE, {va_maps} by IOMMU_IOAS_MAP user VA, identity IOAS included; MAP_FILE {})",
            match b.map_path() {
                MapPath::File => "IOMMU_IOAS_MAP_FILE",
                MapPath::UserVa => "IOMMU_IOAS_MAP",
            },
            if b.map_file_supported() { "available" } else { "not available" }
        )),
    );

    // Both edus hold p6 in their buffers and sit in domain 21 with IOVA X -> GPA B.
    let n = cx.d.connections.load(Ordering::SeqCst);
    rep.check(
        "VMM disconnect: both devices blocked, no IOAS left, DMA lands nowhere",
        timed(|| {
            vm.disconnect();
            wait_for(
                "the daemon to finish the connection",
                Duration::from_secs(30),
                || cx.d.connections.load(Ordering::SeqCst) > n,
            )?;
            expect_attachment(b, 1, Attachment::Blocked)?;
            expect_attachment(b, 2, Attachment::Blocked)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            ram.fill(GPA_B, SENTINEL)?;
            for e in [e1, e2] {
                e.store(IOVA_X)?;
                e.store(GPA_B)?;
            }
            ram.expect_sentinel(GPA_B, "GPA B after DMAs from both edus")?;
            Ok(format!(
                "pinned after teardown: {:#x} bytes (identity IOAS)",
                b.pinned_bytes()
            ))
        }),
    );
    Ok(())
}

/// MAP by user VA vs MAP_FILE on a second connection: each path proven with DMA and timed.
fn compare_map_paths(rep: &mut Report, cx: &Ctx) -> Result<()> {
    let b = &*cx.d.backend;
    let e1 = &cx.edu1;
    let mut vm = cx.d.connect()?;
    let ram = Ram::of(&vm)?;
    // Each path twice, interleaved, so neither profits from running second.
    let mut paths = vec![MapPath::UserVa];
    if b.map_file_supported() {
        paths = vec![
            MapPath::File,
            MapPath::UserVa,
            MapPath::File,
            MapPath::UserVa,
        ];
    } else {
        rep.check(
            "IOMMU_IOAS_MAP_FILE comparison",
            Ok("skipped: the kernel has no MAP_FILE".into()),
        );
    }
    for (i, path) in paths.into_iter().enumerate() {
        b.prefer_map_file(path == MapPath::File);
        let name = match path {
            MapPath::File => "IOMMU_IOAS_MAP_FILE",
            MapPath::UserVa => "IOMMU_IOAS_MAP (user VA)",
        };
        let seed = 10 + i as u8;
        rep.check(
            &format!(
                "map path {name} (round {}): DMA lands; MAP/UNMAP timings",
                i / 2 + 1
            ),
            (|| {
                let before = b.map_counts();
                let d = 30 + i as u32;
                attach(&mut vm, d, 1, 0)?;
                map(&mut vm, d, IOVA_X, GPA_A, PAGE, RW)?;
                map(&mut vm, d, IOVA_Y, GPA_B, PAGE, RW)?;
                let p = bytes(pattern(seed));
                ram.write(GPA_A, &p)?;
                ram.fill(GPA_B, SENTINEL)?;
                e1.load(IOVA_X)?;
                e1.store(IOVA_Y)?;
                ram.expect(GPA_B, &p, "GPA B")?;
                let after = b.map_counts();
                let used = match path {
                    MapPath::File => after.0 - before.0,
                    MapPath::UserVa => after.1 - before.1,
                };
                if used != 2 {
                    return Err(format!("map counts {before:?} -> {after:?}: {name} not used"));
                }
                // 64 single-page maps then unmaps, through the socket (each a round trip).
                const N: u64 = 64;
                let t = Instant::now();
                for k in 0..N {
                    map(&mut vm, d, IOVA_W + k * PAGE, GPA_C + k * PAGE, PAGE, RW)?;
                }
                let t_map = t.elapsed();
                let t = Instant::now();
                for k in 0..N {
                    unmap(&mut vm, d, IOVA_W + k * PAGE, PAGE)?;
                }
                let t_unmap = t.elapsed();
                // One 16 MiB map (pinning dominates).
                let big = 16 << 20;
                let t = Instant::now();
                map(&mut vm, d, IOVA_BIG, 0x100_0000, big, RW)?;
                let t_big = t.elapsed();
                let t = Instant::now();
                unmap(&mut vm, d, IOVA_BIG, big)?;
                let t_big_un = t.elapsed();
                detach(&mut vm, d, 1)?;
                Ok(format!(
                    "4 KiB MAP {:.0} us, UNMAP {:.0} us each (request round trip, {N} each); 16 MiB MAP {:.1} ms, UNMAP {:.1} ms",
                    t_map.as_secs_f64() * 1e6 / N as f64,
                    t_unmap.as_secs_f64() * 1e6 / N as f64,
                    t_big.as_secs_f64() * 1e3,
                    t_big_un.as_secs_f64() * 1e3
                ))
            })(),
        );
    }
    b.prefer_map_file(true);
    vm.disconnect();
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,vhost_user_iommu::backend::iommufd=info"),
    )
    .write_style(env_logger::WriteStyle::Never)
    .init();
    let mut rep = Report {
        passed: 0,
        failed: 0,
    };
    // Pinned guest RAM is charged to RLIMIT_MEMLOCK (root has CAP_IPC_LOCK anyway).
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } != 0 {
        eprintln!(
            "setrlimit(RLIMIT_MEMLOCK): {}",
            std::io::Error::last_os_error()
        );
    }

    let t0 = Instant::now();
    let setup = (|| {
        let edus = edu_cdevs()?;
        if edus.len() < 2 {
            return Err(format!(
                "need two edu devices bound to vfio-pci, found {edus:?}"
            ));
        }
        let eps: Vec<(EndpointId, PathBuf)> = edus
            .iter()
            .take(2)
            .enumerate()
            .map(|(i, (_, p))| (EndpointId(i as u32 + 1), p.clone()))
            .collect();
        let backend =
            Arc::new(IommufdBackend::open(&eps, false).map_err(|e| format!("open: {e}"))?);
        let edu1 = Edu::open(&backend, EndpointId(1), format!("edu {}", edus[0].0))?;
        let edu2 = Edu::open(&backend, EndpointId(2), format!("edu {}", edus[1].0))?;
        let note = format!(
            "endpoint 1 = {} ({}), endpoint 2 = {} ({}); {}; MAP_FILE {}",
            edus[0].0,
            edus[0].1.display(),
            edus[1].0,
            edus[1].1.display(),
            describe(&backend.constraints()),
            if backend.map_file_supported() {
                "available"
            } else {
                "not available"
            }
        );
        let d = Daemon::start(backend, Mode::Inline)?;
        Ok((Ctx { d, edu1, edu2 }, note))
    })();
    let cx = match setup {
        Ok((cx, note)) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs",
                Ok(format!(
                    "{note}; {:.1} ms",
                    t0.elapsed().as_secs_f64() * 1e3
                )),
            );
            cx
        }
        Err(e) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs",
                Err(e),
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = first_connection(&mut rep, &cx) {
        rep.check("first connection", Err(e));
    }
    if let Err(e) = compare_map_paths(&mut rep, &cx) {
        rep.check("second connection", Err(e));
    }
    drop(cx);
    println!(
        "daemon-dma: {} passed, {} failed in {:.1} s",
        rep.passed,
        rep.failed,
        t0.elapsed().as_secs_f64()
    );
    if rep.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
