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
use std::process::ExitCode;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapPath, MapStrategy, sys};
use vhost_user_iommu::backend::{Attachment, DmaBackend, HostConstraints};
use vhost_user_iommu::driver::{GuestRam, TestVm};
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{
    ATTACH_F_BYPASS, MAP_F_READ, Request, ResvKind, Status, decode_probe_properties,
};

use guest_kit::daemon::*;
use guest_kit::edu::*;
use guest_kit::layout::*;

/// A 16 MiB mapping (timing of the pinning).
const IOVA_BIG: u64 = 0x0900_0000;

/// Guest RAM as the checks see it: a dup of one of the TestVm's memfds, so that it outlives the
/// TestVm (the disconnect checks read it after the VMM is gone), plus our own shared mapping of
/// it (a third user VA of the same pages, for the kernel's page checks).
struct Ram {
    file: File,
    base: u64,
    size: u64,
    view: NonNull<u8>,
}

impl Ram {
    fn of(vm: &TestVm) -> Result<Ram> {
        Ram::dup(vm.ram())
    }

    fn dup(g: &GuestRam) -> Result<Ram> {
        // SAFETY: dup of a valid fd the TestVm owns; the new fd is owned by the File.
        let fd = unsafe { libc::dup(g.fd()) };
        if fd < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by dup and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let size = g.size();
        // SAFETY: a fresh shared mapping at a kernel-chosen address aliases no Rust object; it is
        // only read through raw pointers by the kernel (GUP), never as a Rust reference.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap guest RAM: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Ram {
            file,
            base: g.base(),
            size,
            view: NonNull::new(p.cast()).ok_or("mmap returned NULL")?,
        })
    }

    fn off(&self, gpa: u64, len: usize) -> Result<u64> {
        match gpa.checked_sub(self.base) {
            Some(o) if o + len as u64 <= self.size => Ok(o),
            _ => Err(format!(
                "GPA {gpa:#x}+{len:#x} outside RAM {:#x}+{:#x}",
                self.base, self.size
            )),
        }
    }

    /// Our own user VA of `gpa`.
    fn va(&self, gpa: u64) -> u64 {
        self.view.as_ptr() as u64 + (gpa - self.base)
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.off(gpa, data.len())?)
            .map_err(|e| format!("write guest RAM at {gpa:#x}: {e}"))
    }

    fn fill(&self, gpa: u64, b: u8) -> Result<()> {
        self.write(gpa, &vec![b; PAGE as usize])
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut got = vec![0u8; len];
        self.file
            .read_exact_at(&mut got, self.off(gpa, len)?)
            .map_err(|e| format!("read guest RAM at {gpa:#x}: {e}"))?;
        Ok(got)
    }

    fn expect(&self, gpa: u64, want: &[u8], what: &str) -> Result<()> {
        let got = self.read(gpa, want.len())?;
        match differences(&got, |i| want[i]) {
            None => Ok(()),
            Some(d) => Err(format!("{what}: at GPA {gpa:#x}, {d}")),
        }
    }

    fn expect_sentinel(&self, gpa: u64, what: &str) -> Result<()> {
        self.expect(gpa, &[SENTINEL; PAGE as usize], what)
    }

    /// A fingerprint of every page in `[base, base + len)` (whole-RAM "did anything change").
    fn page_sums(&self, len: u64) -> Result<Vec<u64>> {
        let len = len.min(self.size);
        let mut out = Vec::with_capacity((len / PAGE) as usize);
        let chunk = 1 << 20;
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        while off < len {
            let n = (chunk as u64).min(len - off) as usize;
            self.file
                .read_exact_at(&mut buf[..n], off)
                .map_err(|e| format!("read guest RAM at +{off:#x}: {e}"))?;
            for page in buf[..n].chunks(PAGE as usize) {
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for w in page.chunks_exact(8) {
                    h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
                        .wrapping_mul(0x0100_0000_01b3);
                }
                out.push(h);
            }
            off += n as u64;
        }
        Ok(out)
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; the kernel holds no reference past an ioctl.
        unsafe { libc::munmap(self.view.as_ptr().cast(), self.size as usize) };
    }
}

fn expect_attachment(b: &IommufdBackend, ep: u32, want: Attachment) -> Result<()> {
    match b.attachment(EndpointId(ep)) {
        Some(a) if a == want => Ok(()),
        other => Err(format!(
            "backend has endpoint {ep} at {other:?}, expected {want:?}"
        )),
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
                    .request(&Request::map(5, iova, iova + PAGE - 1, GPA_A, RW))
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

    let p1 = pattern(1);
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

    let p2 = pattern(2);
    let p3 = pattern(3);
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
        "UNMAP of a range over several mappings, a hole and a mapping without permissions: one request removes them all (one ioctl), nothing lands after it, the pinned bytes come back",
        timed(|| {
            let before = b.pinned_bytes();
            let at = |k: u64| IOVA_W + k * PAGE;
            for k in [0, 2, 4] {
                map(&mut vm, 1, at(k), GPA_B, PAGE, RW)?;
            }
            map(&mut vm, 1, at(3), GPA_B, PAGE, 0)?;
            for k in [0, 2, 4] {
                ram.fill(GPA_B, SENTINEL)?;
                e1.store(at(k))?;
                ram.expect(GPA_B, &p3, &format!("GPA B through IOVA W+{k} pages before the UNMAP"))?;
            }
            let unmaps = b.unmap_ioctls();
            unmap(&mut vm, 1, IOVA_W, 5 * PAGE)?;
            let ioctls = b.unmap_ioctls() - unmaps;
            for k in [0, 2, 3, 4] {
                ram.fill(GPA_B, SENTINEL)?;
                e1.store(at(k))?;
                ram.expect_sentinel(GPA_B, &format!("GPA B after a DMA to IOVA W+{k} pages, unmapped"))?;
            }
            if ioctls != 1 {
                return Err(format!("{ioctls} IOMMU_IOAS_UNMAP ioctls for one UNMAP of 3 kernel mappings"));
            }
            let after = b.pinned_bytes();
            if after != before {
                return Err(format!("pinned bytes {before:#x} before the MAPs, {after:#x} after the UNMAP"));
            }
            Ok(format!("1 IOMMU_IOAS_UNMAP; pinned bytes {after:#x} as before"))
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

    rep.check(
        "backend ioctl metrics: a latency histogram per ioctl kind that counts exactly what the request path issued",
        timed(|| {
            let text = b.render_metrics();
            let count = |op: &str| -> Result<u64> {
                let key = format!("viommu_backend_ioctl_seconds_count{{op=\"{op}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&key))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("no {key}in:\n{text}"))
            };
            let (file, va) = b.map_counts();
            let (c_unmap, c_file, c_map, c_copy, c_attach) =
                (count("unmap")?, count("map_file")?, count("map")?, count("copy")?, count("attach")?);
            if c_unmap != b.unmap_ioctls() {
                return Err(format!("unmap histogram counts {c_unmap}, {} IOMMU_IOAS_UNMAPs issued", b.unmap_ioctls()));
            }
            // Failed attempts (a COPY that falls back) are timed too: at least the successes.
            if c_file < file || c_map < va || c_copy < b.copy_count() {
                return Err(format!(
                    "map histograms (map_file {c_file}, map {c_map}, copy {c_copy}) below the maps done (file {file}, va {va}, copy {})",
                    b.copy_count()
                ));
            }
            // ATTACH and DETACH of endpoint 1 so far.
            if c_attach < 2 {
                return Err(format!("attach histogram counts {c_attach}"));
            }
            let strategy = format!("viommu_backend_map_strategy{{strategy=\"{}\"}} 1", b.map_strategy().name());
            if !text.contains(&strategy) {
                return Err(format!("no {strategy} in:\n{text}"));
            }
            Ok(format!("unmap {c_unmap}, map_file {c_file}, map {c_map}, copy {c_copy}, attach {c_attach}"))
        }),
    );

    let p4 = pattern(4);
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

    let p5 = pattern(5);
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

    let p6 = pattern(6);
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
    rep.info(
        "map path of the checks above",
        &format!(
            "{} ({file_maps} maps by IOMMU_IOAS_MAP_FILE, {va_maps} by IOMMU_IOAS_MAP user VA, identity IOAS included; MAP_FILE {})",
            match b.map_path() {
                MapPath::File => "IOMMU_IOAS_MAP_FILE",
                MapPath::UserVa => "IOMMU_IOAS_MAP",
            },
            if b.map_file_supported() { "available" } else { "not available" }
        ),
    );

    // Both edus hold p6 in their buffers and sit in domain 21 with IOVA X -> GPA B.
    let n = cx.d.devices();
    rep.check(
        "VMM disconnect: both devices blocked, no IOAS left, DMA lands nowhere",
        timed(|| {
            vm.disconnect();
            cx.d.wait_closed(n, Duration::from_secs(30))?;
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

/// Issue 19: guest RAM is staged on demand. A fresh connection with the production settings
/// pins nothing at its memory table; a MAP pins what it maps; the first identity attachment
/// stages all of guest RAM before the device can reach it; from then on MAPs are copies.
fn staging_on_demand(rep: &mut Report, cx: &Ctx) -> Result<()> {
    let b = &*cx.d.backend;
    let (e1, e2) = (&cx.edu1, &cx.edu2);
    b.set_map_strategy(None);
    let pin0 = vm_pin_kib()?;
    let t = Instant::now();
    let mut vm = cx.d.connect()?;
    let connect_ms = t.elapsed().as_secs_f64() * 1e3;
    let ram = Ram::of(&vm)?;
    let probes: Vec<u64> = (ram.base..ram.base + ram.size)
        .step_by(8 << 20)
        .chain([ram.base + ram.size - PAGE])
        .collect();
    let staged = |b: &IommufdBackend| -> Result<usize> {
        let mut n = 0;
        for &g in &probes {
            n += usize::from(identity_maps(b, g, PAGE)?);
        }
        Ok(n)
    };
    let go = rep.check(
        "staging on demand: the memory table pins nothing, the identity IOAS stays empty",
        (|| {
            let (pinned, vmpin, n) = (b.pinned_bytes(), vm_pin_kib()?, staged(b)?);
            if pinned != 0 || vmpin != pin0 || n != 0 {
                return Err(format!(
                    "after connecting: pinned_bytes {pinned:#x}, VmPin {vmpin} KiB (before {pin0}), identity maps {n} of {} probed GPAs",
                    probes.len()
                ));
            }
            Ok(format!(
                "{:#x} bytes of guest RAM; connect {connect_ms:.1} ms; pinned_bytes 0, VmPin {vmpin} KiB as before, none of {} probed GPAs in the identity IOAS; map strategy {}",
                ram.size,
                probes.len(),
                b.map_strategy().name()
            ))
        })(),
    );
    if !go {
        vm.disconnect();
        return Ok(());
    }
    let p = pattern(19);
    rep.check(
        "staging on demand: a MAP pins what it maps and DMA goes through it",
        timed(|| {
            let counts = (b.map_counts(), b.copy_count());
            attach(&mut vm, 40, 1, 0)?;
            map(&mut vm, 40, IOVA_X, GPA_A, 0x1_0000, RW)?;
            if b.pinned_bytes() != 0x1_0000 || b.copy_count() != counts.1 {
                return Err(format!(
                    "after a 64 KiB MAP: pinned_bytes {:#x}, {} copies",
                    b.pinned_bytes(),
                    b.copy_count() - counts.1
                ));
            }
            ram.write(GPA_A, &p)?;
            ram.fill(GPA_A + 0x8000, SENTINEL)?;
            e1.load(IOVA_X)?;
            e1.store(IOVA_X + 0x8000)?;
            ram.expect(GPA_A + 0x8000, &p, "GPA A + 32 KiB through IOVA X")?;
            let after = b.map_counts();
            Ok(format!(
                "pinned_bytes 0x10000; maps by MAP_FILE/user VA {}/{}, no COPY",
                after.0 - counts.0.0,
                after.1 - counts.0.1
            ))
        }),
    );
    rep.check(
        "staging on demand: the first bypass ATTACH stages all guest RAM before the device reaches it, then MAPs copy",
        timed(|| {
            let t = Instant::now();
            attach(&mut vm, 41, 2, ATTACH_F_BYPASS)?;
            let attach_ms = t.elapsed().as_secs_f64() * 1e3;
            expect_attachment(b, 2, Attachment::Identity)?;
            let n = staged(b)?;
            let want = ram.size + 0x1_0000;
            if n != probes.len() || b.pinned_bytes() != want {
                return Err(format!(
                    "after the bypass ATTACH: identity maps {n} of {} probed GPAs, pinned_bytes {:#x} (want {want:#x})",
                    probes.len(),
                    b.pinned_bytes()
                ));
            }
            ram.fill(GPA_B, SENTINEL)?;
            e2.load(GPA_A)?;
            e2.store(GPA_B)?;
            ram.expect(GPA_B, &p, "GPA B through the identity")?;
            let copies = b.copy_count();
            map(&mut vm, 40, IOVA_Y, GPA_B, PAGE, RW)?;
            if b.copy_count() != copies + 1 || b.pinned_bytes() != want {
                return Err(format!(
                    "a MAP after staging: {} copies, pinned_bytes {:#x}",
                    b.copy_count() - copies,
                    b.pinned_bytes()
                ));
            }
            ram.fill(GPA_B, SENTINEL)?;
            e1.store(IOVA_Y)?;
            ram.expect(GPA_B, &p, "GPA B through the copied IOVA Y")?;
            Ok(format!(
                "bypass ATTACH {attach_ms:.1} ms (staging included); pinned_bytes {want:#x} = guest RAM + the 64 KiB MAP; DMA through the identity and through a COPY land; map strategy {}",
                b.map_strategy().name()
            ))
        }),
    );
    let n = cx.d.devices();
    vm.disconnect();
    rep.check(
        "staging on demand: the disconnect unstages guest RAM",
        (|| {
            cx.d.wait_closed(n, Duration::from_secs(30))?;
            let (pinned, vmpin, k) = (b.pinned_bytes(), vm_pin_kib()?, staged(b)?);
            if pinned != 0 || vmpin != pin0 || k != 0 {
                return Err(format!(
                    "pinned_bytes {pinned:#x}, VmPin {vmpin} KiB (before {pin0}), identity maps {k} probed GPAs"
                ));
            }
            Ok(format!("pinned_bytes 0, VmPin {vmpin} KiB, identity IOAS empty"))
        })(),
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
        rep.skip(
            "IOMMU_IOAS_MAP_FILE comparison",
            "the kernel has no MAP_FILE",
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
                let p = pattern(seed);
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
    let n = cx.d.devices();
    vm.disconnect();
    cx.d.wait_closed(n, Duration::from_secs(30))
}

/// `IOMMU_TEST_CMD` of CONFIG_IOMMUFD_TEST: `struct iommu_test_cmd` transcribed from the built
/// 7.3 kernel's drivers/iommu/iommufd/iommufd_test.h (72 bytes: header 16, union 48 at offset 16,
/// `last` at 64; checked against the header with gcc). Only the ops used here.
mod selftest {
    use std::os::fd::BorrowedFd;

    use vhost_user_iommu::backend::iommufd::sys::{self, IoctlArg};

    const OP_MOCK_DOMAIN: u32 = 2;
    const OP_MD_CHECK_MAP: u32 = 3;
    const OP_MD_CHECK_REFS: u32 = 4;
    /// MOCK_APERTURE_START / MOCK_APERTURE_LAST (MOCK_IOMMUPT_DEFAULT).
    pub const APERTURE: (u64, u64) = (1 << 24, (1 << 31) - 1);

    /// `struct iommu_test_cmd`: the union as six u64 words.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct IommuTestCmd {
        pub size: u32,
        pub op: u32,
        pub id: u32,
        pub reserved: u32,
        pub u: [u64; 6],
        pub last: u32,
        pub pad: u32,
    }
    const _: () = assert!(size_of::<IommuTestCmd>() == 72);
    const _: () = assert!(std::mem::offset_of!(IommuTestCmd, u) == 16);
    const _: () = assert!(std::mem::offset_of!(IommuTestCmd, last) == 64);

    // SAFETY: `#[repr(C)]` transcription of `struct iommu_test_cmd` (layout asserted above), made
    // only of integers; `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)` = 0x3ba0.
    unsafe impl IoctlArg for IommuTestCmd {
        const NAME: &'static str = "IOMMU_TEST_CMD";
        fn request() -> libc::c_ulong {
            ((b';' as libc::c_ulong) << 8) | (0x80 + 32)
        }
        fn sized() -> Self {
            IommuTestCmd {
                size: sys::size32::<IommuTestCmd>(),
                ..IommuTestCmd::default()
            }
        }
    }

    fn run(fd: BorrowedFd<'_>, op: u32, id: u32, u: [u64; 6]) -> Result<IommuTestCmd, i32> {
        let mut c = IommuTestCmd {
            op,
            id,
            u,
            ..IommuTestCmd::sized()
        };
        sys::ioctl(fd, &mut c).map_err(|e| e.errno)?;
        Ok(c)
    }

    /// A mock device attached to an IOAS (its auto HWPT is a mock domain filled with every
    /// mapping of the IOAS). Destroyed (device object, hence the HWPT) on drop.
    pub struct Mock<'a> {
        fd: BorrowedFd<'a>,
        pub stdev: u32,
        pub hwpt: u32,
    }

    impl<'a> Mock<'a> {
        pub fn attach(fd: BorrowedFd<'a>, ioas: u32) -> Result<Mock<'a>, i32> {
            let c = run(fd, OP_MOCK_DOMAIN, ioas, [0; 6])?;
            Ok(Mock {
                fd,
                stdev: c.u[0] as u32,
                hwpt: (c.u[0] >> 32) as u32,
            })
        }

        /// MD_CHECK_MAP: every mock page of `[iova, iova + len)` translates to the physical page
        /// behind the user VA `uptr + offset` (EINVAL: unmapped or another page).
        pub fn check_map(&self, iova: u64, len: u64, uptr: u64) -> Result<(), i32> {
            run(
                self.fd,
                OP_MD_CHECK_MAP,
                self.hwpt,
                [iova, len, uptr, 0, 0, 0],
            )
            .map(|_| ())
        }
    }

    impl Drop for Mock<'_> {
        fn drop(&mut self) {
            if let Err(e) = sys::destroy(self.fd, self.stdev) {
                println!(
                    "(mock device {} not destroyed: errno {})",
                    self.stdev, e.errno
                );
            }
        }
    }

    /// MD_CHECK_REFS: every (non-compound) page behind `[uptr, uptr + len)` has exactly `refs`
    /// pins (page refcount / GUP_PIN_COUNTING_BIAS); EIO at the first one that does not.
    pub fn check_refs(fd: BorrowedFd<'_>, uptr: u64, len: u64, refs: u32) -> Result<(), i32> {
        run(
            fd,
            OP_MD_CHECK_REFS,
            0,
            [len, uptr, u64::from(refs), 0, 0, 0],
        )
        .map(|_| ())
    }
}

fn errno_name(e: i32) -> String {
    format!("{} (errno {e})", std::io::Error::from_raw_os_error(e))
}

/// `VmPin` of /proc/self/status in KiB: every page iommufd pins is added to the pinning mm's
/// `pinned_vm` whatever the accounting mode (drivers/iommu/iommufd/pages.c,
/// `iopt_pages_update_pinned`), so this is the kernel's own count of what the daemon pins.
fn vm_pin_kib() -> Result<u64> {
    let s =
        fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmPin line in /proc/self/status".to_string())
}

/// Pins per page of `ram` by the kernel's count (MD_CHECK_REFS): `Ok(n)` if every page has
/// exactly `n` for some n in 0..=3 (one ioctl per try), else a per-page histogram.
fn pin_refs(fd: std::os::fd::BorrowedFd<'_>, ram: &Ram) -> Result<String> {
    for n in 0..=3 {
        match selftest::check_refs(fd, ram.va(ram.base), ram.size, n) {
            Ok(()) => return Ok(format!("every page {n}")),
            Err(libc::EIO) => {}
            Err(e) => return Err(format!("MD_CHECK_REFS: {}", errno_name(e))),
        }
    }
    let mut hist = [0u64; 5];
    for p in 0..ram.size / PAGE {
        let va = ram.va(ram.base + p * PAGE);
        let n = (0..4u32)
            .find(|&n| selftest::check_refs(fd, va, PAGE, n).is_ok())
            .unwrap_or(4);
        hist[n as usize] += 1;
    }
    Ok(format!(
        "pages with 0/1/2/3/>3 pins: {}/{}/{}/{}/{}",
        hist[0], hist[1], hist[2], hist[3], hist[4]
    ))
}

/// Whether the identity (staging) IOAS maps `[gpa, gpa + len)`: an `IOMMU_IOAS_COPY` of it into
/// a scratch IOAS works (ENOENT: not mapped). Leaves the identity IOAS as it was.
fn identity_maps(b: &IommufdBackend, gpa: u64, len: u64) -> Result<bool> {
    let fd = b.iommufd();
    let scratch = sys::ioas_alloc(fd).map_err(|e| format!("scratch IOAS: errno {}", e.errno))?;
    let r = sys::ioas_copy(
        fd,
        scratch,
        gpa,
        b.identity_ioas(),
        gpa,
        len,
        sys::IOMMU_IOAS_MAP_READABLE,
    );
    let _ = sys::destroy(fd, scratch);
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.errno == libc::ENOENT => Ok(false),
        Err(e) => Err(format!(
            "IOAS_COPY probe at {gpa:#x}: {}",
            errno_name(e.errno)
        )),
    }
}

/// Everything the backend and the kernel report about pinning and translation state.
fn figures(b: &IommufdBackend, ram: Option<&Ram>) -> String {
    let pin = vm_pin_kib().map_or_else(|e| e, |k| format!("{k} KiB"));
    let refs = match ram {
        Some(r) => format!(
            ", pins per guest page {}",
            pin_refs(b.iommufd(), r).unwrap_or_else(|e| e)
        ),
        None => String::new(),
    };
    format!(
        "pinned_bytes {:#x}, VmPin {pin}{refs}, paging IOASes {:?}, endpoint 1 {:?}, endpoint 2 {:?}",
        b.pinned_bytes(),
        b.domain_ids(),
        b.attachment(EndpointId(1)),
        b.attachment(EndpointId(2))
    )
}

/// Stores from every edu to every address (each edu's buffer holds a pattern that differs from
/// what lies at those pages); none may change a page of any of `rams` (first `len` bytes each).
/// Returns the number of DMAs.
fn stores_land_nowhere(edus: &[&Edu], addrs: &[u64], rams: &[(&Ram, u64)]) -> Result<usize> {
    let before: Vec<Vec<u64>> = rams
        .iter()
        .map(|(r, l)| r.page_sums(*l))
        .collect::<Result<_>>()?;
    // Each edu fires one DMA per 100 ms of QEMU time: run both devices side by side.
    let mut n = 0;
    for &a in addrs {
        for e in edus {
            e.start(EDU_BUFFER, a, true);
        }
        for e in edus {
            e.wait(EDU_BUFFER, a)?;
            n += 1;
        }
    }
    for ((r, l), b) in rams.iter().zip(&before) {
        let after = r.page_sums(*l)?;
        let changed: Vec<String> = (0..after.len())
            .filter(|&i| after[i] != b[i])
            .map(|i| format!("{:#x}", r.base + i as u64 * PAGE))
            .collect();
        if !changed.is_empty() {
            return Err(format!(
                "{} DMAs to stale addresses changed {} pages of the memory at GPA {:#x} (first: {})",
                n,
                changed.len(),
                r.base,
                changed
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(n)
}

fn ioas_of(b: &IommufdBackend, ep: u32) -> Result<u32> {
    match b.attachment(EndpointId(ep)) {
        Some(Attachment::Domain(id)) => Ok(id),
        other => Err(format!(
            "endpoint {ep} is at {other:?}, not in a paging IOAS"
        )),
    }
}

fn map_req(d: u32, iova: u64, gpa: u64, len: u64) -> Request {
    Request::map(d, iova, iova + len - 1, gpa, RW)
}

/// Pushes MAP chains without kicking.
fn push_unkicked(vm: &mut TestVm, reqs: &[Request]) -> Result<()> {
    for r in reqs {
        let (bytes, n) = r.encode();
        vm.push(&bytes[..n], 4).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Pushes MAP chains without waiting, kicks once; returns how many were pushed.
fn push_maps(vm: &mut TestVm, reqs: &[Request]) -> Result<usize> {
    for r in reqs {
        let (bytes, n) = r.encode();
        vm.push(&bytes[..n], 4).map_err(|e| e.to_string())?;
    }
    vm.kick().map_err(|e| e.to_string())?;
    Ok(reqs.len())
}

// Addresses of the chaos connection. IOVAs: above guest RAM, below edu's 28-bit DMA mask, inside
// the mock domain's aperture (16 MiB..2 GiB).
const IOVA_MOCK: u64 = 0x0a00_0000;
const IOVA_BATCH: u64 = 0x0b00_0000;
const IOVA_REGION: u64 = 0x0c00_0000;
const IOVA_KEEP: u64 = 0x0c80_0000;
const IOVA_STORM: u64 = 0x0d00_0000;
const IOVA_FINAL: u64 = 0x0e00_0000;
const GPA_PATTERN: u64 = 0x50_0000;
const GPA_STORM: u64 = 0x80_0000;
const GPA_BATCH: u64 = 0xc0_0000;
/// The extra memfd region of the memory-table scenario (outside the 64 MiB of RAM).
const GPA_REGION: u64 = 0x1_0000_0000;
const REGION_SIZE: u64 = 2 << 20;
const BATCH: u64 = 64;
/// MAP chains pushed after the kicked batch, without a kick.
const LATE: u64 = 32;
const STORM: u64 = 100;

/// Issue 9 and issue 7: the mock domain's view of the daemon's mappings, pinning after device
/// reset and disconnect, and DMA to stale IOVAs after each chaos scenario.
fn chaos_connection(rep: &mut Report, cx: &Ctx) -> Result<()> {
    let b = &*cx.d.backend;
    let (e1, e2) = (&cx.edu1, &cx.edu2);
    let both = [e1, e2];
    let fd = b.iommufd();
    let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_else(|e| format!("? ({e})"));
    // The automatic (production) map strategy; compare_map_paths left an override behind.
    b.set_map_strategy(None);
    let pin0 = vm_pin_kib()?;
    let mut vm = cx.d.connect()?;
    let ram = Ram::of(&vm)?;
    let usable = vm.usable_ram_end();
    let pattern_page = pattern(42);
    rep.info(
        "chaos connection: pinning before and after the memory table arrived",
        &format!(
            "map strategy {}; VmPin before connecting {pin0} KiB; connected: {}; shmem THP {}",
            b.map_strategy().name(),
            figures(b, Some(&ram)),
            thp.trim()
        ),
    );

    // --- issue 9: MD_CHECK_MAP of a mock domain on the daemon's IOAS ---------------------------
    for (k, strategy) in [MapStrategy::Copy, MapStrategy::MapFile, MapStrategy::Map]
        .into_iter()
        .enumerate()
    {
        b.set_map_strategy(Some(strategy));
        let dom = 70 + k as u32;
        let name = format!(
            "IOMMUFD_TEST mock domain on the daemon's IOAS: MD_CHECK_MAP agrees with every \
             mapping, unmapped IOVAs are not mapped (map strategy {})",
            strategy.name()
        );
        rep.check(
        &name,
        timed(|| {
            let counts = (b.map_counts(), b.copy_count());
            attach(&mut vm, dom, 1, 0)?;
            // (IOVA, GPA, length): 4 KiB, 64 KiB, 2 MiB (aligned), 12 KiB and 8 KiB at odd spots.
            let maps = [
                (IOVA_MOCK, 0x40_0000, PAGE),
                (IOVA_MOCK + 0x10_0000, 0x41_0000, 0x1_0000),
                (IOVA_MOCK + 0x20_0000, 0x60_0000, 0x20_0000),
                (IOVA_MOCK + 0x40_3000, 0x42_5000, 3 * PAGE),
                (IOVA_MOCK + 0x41_0000, 0x43_7000, 2 * PAGE),
            ];
            for &(iova, gpa, len) in &maps {
                map(&mut vm, dom, iova, gpa, len, RW)?;
            }
            let ioas = ioas_of(b, 1)?;
            let mock = selftest::Mock::attach(fd, ioas).map_err(|e| {
                format!(
                    "MOCK_DOMAIN on IOAS {ioas} (edu 1 attached through the real IOMMU): {}",
                    errno_name(e)
                )
            })?;
            let tvm = vm.ram().host_addr();
            let check = |iova: u64, len: u64, uptr: u64, what: &str| {
                mock.check_map(iova, len, uptr)
                    .map_err(|e| format!("MD_CHECK_MAP {what} {iova:#x}+{len:#x}: {}", errno_name(e)))
            };
            for &(iova, gpa, len) in &maps {
                // The TestVm's VA (the VMM's mapping) and our own mmap of the same memfd: the
                // kernel compares physical pages, so any VA of the page must agree.
                check(iova, len, tvm + gpa, "(TestVm VA)")?;
                check(iova, len, ram.va(gpa), "(independent mmap VA)")?;
            }
            let refused = |iova: u64, uptr: u64, what: &str| match mock.check_map(iova, PAGE, uptr) {
                Err(libc::EINVAL) => Ok(()),
                Ok(()) => Err(format!("MD_CHECK_MAP of {what} at {iova:#x} passed")),
                Err(e) => Err(format!("MD_CHECK_MAP of {what} at {iova:#x}: {}", errno_name(e))),
            };
            // Negative controls: the wrong page, unmapped IOVAs (a gap and the page after a map).
            refused(IOVA_MOCK, tvm + 0x40_0000 + PAGE, "a mapping against the wrong page")?;
            refused(IOVA_MOCK + PAGE, tvm + 0x40_1000, "the unmapped page after the 4 KiB map")?;
            refused(IOVA_MOCK + 0x30_0000, tvm, "an unmapped gap")?;
            // The mock domain follows the daemon: a MAP made now appears, an UNMAP disappears.
            map(&mut vm, dom, IOVA_MOCK + 0x50_0000, GPA_PATTERN, PAGE, RW)?;
            check(IOVA_MOCK + 0x50_0000, PAGE, tvm + GPA_PATTERN, "(MAP after the mock attached)")?;
            unmap(&mut vm, dom, IOVA_MOCK, PAGE)?;
            refused(IOVA_MOCK, tvm + 0x40_0000, "the UNMAPped 4 KiB mapping")?;
            // The real device shares the IOAS with the mock: DMA still lands.
            ram.write(GPA_PATTERN, &pattern_page)?;
            e1.load(IOVA_MOCK + 0x50_0000)?;
            ram.fill(0x41_0000, SENTINEL)?;
            e1.store(IOVA_MOCK + 0x10_0000)?;
            ram.expect(0x41_0000, &pattern_page, "edu 1 through the 64 KiB mapping")?;
            let refs = (0..4u32)
                .find(|&n| selftest::check_refs(fd, ram.va(0x41_0000), PAGE, n).is_ok())
                .map_or_else(|| "more than 3".to_string(), |n| n.to_string());
            let after = (b.map_counts(), b.copy_count());
            let note = format!(
                "maps by MAP_FILE/user VA/COPY {}/{}/{}; IOAS {ioas}, mock HWPT {} (device object {}), aperture {:#x}..={:#x}; 5 mappings (4 KiB, 64 KiB, 2 MiB, 12 KiB, 8 KiB) match by TestVm VA and by an independent mmap; wrong page, unmapped page, gap and UNMAPped page refused with EINVAL; a MAP made after the attach is seen; pins of a mapped page (MD_CHECK_REFS): {refs}",
                after.0.0 - counts.0.0,
                after.0.1 - counts.0.1,
                after.1 - counts.1,
                mock.hwpt, mock.stdev, selftest::APERTURE.0, selftest::APERTURE.1
            );
            drop(mock);
            detach(&mut vm, dom, 1)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            Ok(note)
        }),
    );
    }
    b.set_map_strategy(None);

    // --- issue 7 (b) + issue 9: device reset with requests in flight ---------------------------
    // Both edus get the pattern in their buffers here and keep it: from now on they only store
    // (a blocked device read could change the buffer), so a store that lands changes a page.
    let arm = |vm: &mut TestVm, d: u32| -> Result<()> {
        ram.write(GPA_PATTERN, &pattern_page)?;
        map(vm, d, IOVA_FINAL, GPA_PATTERN, PAGE, MAP_F_READ)?;
        e1.load(IOVA_FINAL)?;
        e2.load(IOVA_FINAL)?;
        unmap(vm, d, IOVA_FINAL, PAGE)
    };
    rep.check(
        "chaos (b): device reset with 64 kicked + 32 unkicked MAPs in flight: nothing attached, no IOAS, DMA to every stale IOVA blocked",
        timed(|| {
            attach(&mut vm, 80, 1, 0)?;
            attach(&mut vm, 80, 2, 0)?;
            arm(&mut vm, 80)?;
            map(&mut vm, 80, IOVA_BATCH - PAGE, GPA_BATCH, PAGE, RW)?;
            ram.fill(GPA_BATCH, SENTINEL)?;
            e2.store(IOVA_BATCH - PAGE)?;
            ram.expect(GPA_BATCH, &pattern_page, "edu 2 before the reset")?;
            let reqs: Vec<Request> = (0..BATCH)
                .map(|i| map_req(80, IOVA_BATCH + i * PAGE, GPA_BATCH + i * PAGE, PAGE))
                .collect();
            push_maps(&mut vm, &reqs)?;
            // And more behind them, not kicked (the daemon sees them only if it polls the ring).
            let late: Vec<Request> = (BATCH..BATCH + LATE)
                .map(|i| map_req(80, IOVA_BATCH + i * PAGE, GPA_BATCH + i * PAGE, PAGE))
                .collect();
            push_unkicked(&mut vm, &late)?;
            vm.reset_device().map_err(|e| e.to_string())?;
            let done = match vm.wait_used((BATCH + LATE) as usize, Duration::from_millis(300)) {
                Ok(v) => v.len(),
                Err(vhost_user_iommu::driver::DriverError::Timeout { got, .. }) => got.len(),
                Err(e) => return Err(e.to_string()),
            };
            let fig = figures(b, Some(&ram));
            expect_attachment(b, 1, Attachment::Blocked)?;
            expect_attachment(b, 2, Attachment::Blocked)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left after the reset: {:?}", b.domain_ids()));
            }
            let mut stale: Vec<u64> = (0..=BATCH + LATE).map(|i| IOVA_BATCH + i * PAGE - PAGE).collect();
            stale.extend([GPA_BATCH, GPA_BATCH + BATCH / 2 * PAGE, GPA_PATTERN]);
            let n = stores_land_nowhere(&both, &stale, &[(&ram, usable)])?;
            vm.reset_rings().map_err(|e| format!("rings after the reset: {e}"))?;
            Ok(format!(
                "{done} of {BATCH} kicked + {LATE} unkicked MAPs answered before the reset; after it: {fig}; {n} DMAs to stale IOVAs and IOVA = GPA landed nowhere"
            ))
        }),
    );

    // --- issue 7 (c): memory table change -------------------------------------------------------
    rep.check(
        "chaos (c): MAP into an added memfd region, REM_MEM_REG: mapping torn down, DMA to its IOVA blocked, nothing written into the removed memfd",
        timed(|| {
            // Liveness after the reset (proves the edus are still armed): a fresh domain works.
            attach(&mut vm, 82, 1, 0)?;
            attach(&mut vm, 82, 2, 0)?;
            map(&mut vm, 82, IOVA_KEEP, GPA_BATCH, PAGE, RW)?;
            for e in both {
                ram.fill(GPA_BATCH, SENTINEL)?;
                e.store(IOVA_KEEP)?;
                ram.expect(GPA_BATCH, &pattern_page, &format!("{} after the reset", e.name))?;
            }
            let f0 = figures(b, None);
            vm.add_region(GPA_REGION, REGION_SIZE).map_err(|e| e.to_string())?;
            let region = Ram::dup(vm.region(GPA_REGION).ok_or("region not added")?)?;
            for p in 0..REGION_SIZE / PAGE {
                region.fill(GPA_REGION + p * PAGE, SENTINEL)?;
            }
            map(&mut vm, 82, IOVA_REGION, GPA_REGION, PAGE, RW)?;
            map(&mut vm, 82, IOVA_REGION + 0x10_0000, GPA_REGION + 0x10_0000, 0x1_0000, RW)?;
            e1.store(IOVA_REGION + 0x10_0000)?;
            region.expect(GPA_REGION + 0x10_0000, &pattern_page, "the region through its mapping")?;
            region.fill(GPA_REGION + 0x10_0000, SENTINEL)?;
            let f1 = figures(b, None);
            vm.remove_region(GPA_REGION).map_err(|e| e.to_string())?;
            let f2 = figures(b, None);
            let stale = [IOVA_REGION, IOVA_REGION + 0x10_0000, IOVA_REGION + 0x10_0000 + 15 * PAGE];
            let n = stores_land_nowhere(&both, &stale, &[(&ram, usable), (&region, REGION_SIZE)])?;
            // Every page of the removed memfd is still the sentinel (all equal to the first).
            let sums = region.page_sums(REGION_SIZE)?;
            region.expect_sentinel(GPA_REGION, "removed region, first page")?;
            if sums.iter().any(|&x| x != sums[0]) {
                return Err("a page of the removed memfd is no longer the sentinel".into());
            }
            ram.fill(GPA_BATCH, SENTINEL)?;
            e2.store(IOVA_KEEP)?;
            ram.expect(GPA_BATCH, &pattern_page, "the mapping in RAM that stayed")?;
            Ok(format!(
                "before ADD_MEM_REG: {f0}; region mapped: {f1}; after REM_MEM_REG: {f2}; {n} DMAs to the stale IOVAs landed nowhere (RAM and the removed memfd unchanged); the RAM mapping still works"
            ))
        }),
    );

    // --- issue 7 (d): re-ATTACH storm -------------------------------------------------------------
    // Endpoint 2 stays in domain 90; endpoint 1 cycles 91, 92, 90 (100 moves; 91 and 92 die each
    // time it leaves them), with a MAP after every move, each to a GPA of its own: in 91/92 at
    // IOVA pool B (8 IOVAs, never mapped in 90), in 90 at pool A (UNMAP then MAP: the pool's
    // translation changes under the device). The final domain is 90: pool A must reach only the
    // latest GPA of each IOVA, pool B nothing, and no older GPA may change.
    const POOL: u64 = 8;
    let pool_a = |k: u64| IOVA_STORM + k * PAGE;
    let pool_b = |k: u64| IOVA_STORM + 0x10_0000 + k * PAGE;
    let mut current: Vec<(u64, u64)> = Vec::new();
    let mut stale_storm: Vec<u64> = Vec::new();
    rep.check(
        "chaos (d): 100 re-ATTACHes of endpoint 1 across 3 domains with MAPs in between: DMA only through the final domain",
        timed(|| {
            detach(&mut vm, 82, 1)?;
            attach(&mut vm, 90, 2, 0)?;
            let ring = [91u32, 92, 90];
            let mut latest: Vec<Option<u64>> = vec![None; POOL as usize];
            let (mut na, mut nb) = (0u64, 0u64);
            let t = Instant::now();
            for i in 0..STORM {
                let d = ring[(i % 3) as usize];
                attach(&mut vm, d, 1, 0)?;
                let gpa = GPA_STORM + i * PAGE;
                if d == 90 {
                    let k = na % POOL;
                    if latest[k as usize].is_some() {
                        unmap(&mut vm, d, pool_a(k), PAGE)?;
                    }
                    map(&mut vm, d, pool_a(k), gpa, PAGE, RW)?;
                    latest[k as usize] = Some(gpa);
                    na += 1;
                } else {
                    map(&mut vm, d, pool_b(nb % POOL), gpa, PAGE, RW)?;
                    nb += 1;
                }
            }
            attach(&mut vm, 90, 1, 0)?;
            let storm_ms = t.elapsed().as_secs_f64() * 1e3;
            current = (0..POOL)
                .filter_map(|k| latest[k as usize].map(|g| (pool_a(k), g)))
                .collect();
            stale_storm = (0..POOL.min(nb)).map(pool_b).collect();
            let ioas = ioas_of(b, 1)?;
            expect_attachment(b, 2, Attachment::Domain(ioas))?;
            if b.domain_ids() != vec![ioas] {
                return Err(format!("IOASes {:?}, expected only {ioas}", b.domain_ids()));
            }
            for i in 0..STORM {
                ram.fill(GPA_STORM + i * PAGE, SENTINEL)?;
            }
            let n = stores_land_nowhere(&both, &stale_storm, &[(&ram, usable)])?;
            // The mock domain's view of the final IOAS: exactly the current mappings.
            let mock = selftest::Mock::attach(fd, ioas)
                .map_err(|e| format!("MOCK_DOMAIN on IOAS {ioas}: {}", errno_name(e)))?;
            for &(iova, gpa) in &current {
                mock.check_map(iova, PAGE, ram.va(gpa))
                    .map_err(|e| format!("MD_CHECK_MAP of current {iova:#x}: {}", errno_name(e)))?;
            }
            for &iova in &stale_storm {
                if mock.check_map(iova, PAGE, ram.va(GPA_STORM)) != Err(libc::EINVAL) {
                    return Err(format!("MD_CHECK_MAP: stale {iova:#x} is not reported unmapped"));
                }
            }
            drop(mock);
            // Both edus through every current IOVA, side by side: only the latest GPA changes.
            let before = ram.page_sums(usable)?;
            for &(iova, gpa) in &current {
                for e in both {
                    e.start(EDU_BUFFER, iova, true);
                }
                for e in both {
                    e.wait(EDU_BUFFER, iova)?;
                }
                ram.expect(gpa, &pattern_page, "through a mapping of the final domain")?;
            }
            let after = ram.page_sums(usable)?;
            let want: Vec<u64> = current.iter().map(|c| c.1).collect();
            let wrong: Vec<String> = (0..after.len() as u64)
                .filter(|&i| after[i as usize] != before[i as usize] && !want.contains(&(i * PAGE)))
                .map(|i| format!("{:#x}", i * PAGE))
                .collect();
            if !wrong.is_empty() {
                return Err(format!(
                    "DMA through the final domain changed other pages: {}",
                    wrong.join(", ")
                ));
            }
            Ok(format!(
                "storm {storm_ms:.0} ms ({:.2} ms per move + MAP, {na} MAPs in 90 with UNMAPs, {nb} in 91/92); final IOAS {ioas}; {} current IOVAs land at their latest GPA only (MD_CHECK_MAP agrees), {n} DMAs to {} stale IOVAs landed nowhere (mock: not mapped)",
                storm_ms / STORM as f64,
                current.len(),
                stale_storm.len()
            ))
        }),
    );

    // --- issue 7 (a) + issue 9: disconnect in the middle of a batch of MAPs ---------------------
    let n = cx.d.devices();
    let old_ioas = b.domain_ids();
    rep.check(
        "chaos (a): VMM disconnect in the middle of 64 kicked + 32 unkicked MAPs: every device blocked, nothing pinned (backend and kernel), DMA to every stale IOVA blocked",
        timed(|| {
            let reqs: Vec<Request> = (0..BATCH)
                .map(|i| map_req(90, IOVA_BATCH + i * PAGE, GPA_BATCH + i * PAGE, PAGE))
                .collect();
            let used_idx = vm.request_queue().layout().used + 2;
            let used = |r: &Ram| -> Result<u16> {
                let b = r.read(used_idx, 2)?;
                Ok(u16::from_le_bytes([b[0], b[1]]))
            };
            let u0 = used(&ram)?;
            push_maps(&mut vm, &reqs)?;
            let late: Vec<Request> = (BATCH..BATCH + LATE)
                .map(|i| map_req(90, IOVA_BATCH + i * PAGE, GPA_BATCH + i * PAGE, PAGE))
                .collect();
            push_unkicked(&mut vm, &late)?;
            vm.disconnect();
            cx.d.wait_closed(n, Duration::from_secs(30))?;
            // Object ids first (a scratch IOAS of the probes below could reuse a freed id).
            for &id in &old_ioas {
                match sys::ioas_iova_ranges(fd, id) {
                    Err(e) if e.errno == libc::ENOENT => {}
                    other => return Err(format!("IOAS {id} still exists: {other:?}")),
                }
            }
            let answered = used(&ram)?.wrapping_sub(u0);
            let fig = figures(b, Some(&ram));
            let pinned = b.pinned_bytes();
            let vmpin = vm_pin_kib()?;
            let refs0 = selftest::check_refs(fd, ram.va(0), ram.size, 0);
            let mut staged = Vec::new();
            for gpa in (0..ram.size).step_by(4 << 20).chain([ram.size - PAGE]) {
                if identity_maps(b, gpa, PAGE)? {
                    staged.push(format!("{gpa:#x}"));
                }
            }
            expect_attachment(b, 1, Attachment::Blocked)?;
            expect_attachment(b, 2, Attachment::Blocked)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            if pinned != 0 || vmpin != pin0 {
                return Err(format!("still pinned after the disconnect: {fig}"));
            }
            if let Err(e) = refs0 {
                return Err(format!("MD_CHECK_REFS(0) over guest RAM: {}: {fig}", errno_name(e)));
            }
            if !staged.is_empty() {
                return Err(format!("identity IOAS still maps GPAs {}", staged.join(", ")));
            }
            let mut stale: Vec<u64> = (0..BATCH + LATE).map(|i| IOVA_BATCH + i * PAGE).collect();
            stale.extend(current.iter().map(|c| c.0));
            stale.extend(stale_storm.iter().copied());
            stale.extend([IOVA_KEEP, GPA_STORM, GPA_BATCH, GPA_PATTERN]);
            let n = stores_land_nowhere(&both, &stale, &[(&ram, ram.size)])?;
            Ok(format!(
                "{answered} of {BATCH} kicked + {LATE} unkicked MAPs answered before the teardown; after it: {fig}; old IOASes {old_ioas:?} gone; identity IOAS maps none of 17 probed GPAs; {n} DMAs to stale IOVAs and IOVA = GPA: whole 64 MiB unchanged"
            ))
        }),
    );

    // The next VMM: the edus (still holding the pattern) are alive, so the blocked DMAs above
    // were real; its disconnect releases everything again.
    rep.check(
        "next connection after the chaos: DMA lands again, its disconnect releases everything",
        timed(|| {
            let n = cx.d.devices();
            let mut vm = cx.d.connect()?;
            let ram = Ram::of(&vm)?;
            attach(&mut vm, 1, 1, 0)?;
            attach(&mut vm, 1, 2, 0)?;
            map(&mut vm, 1, IOVA_X, GPA_A, PAGE, RW)?;
            for e in both {
                ram.fill(GPA_A, SENTINEL)?;
                e.store(IOVA_X)?;
                ram.expect(GPA_A, &pattern_page, &format!("{} after the chaos", e.name))?;
            }
            let during = figures(b, None);
            vm.disconnect();
            cx.d.wait_closed(n, Duration::from_secs(30))?;
            let after = figures(b, Some(&ram));
            if b.pinned_bytes() != 0 || vm_pin_kib()? != pin0 {
                return Err(format!("still pinned: {after}"));
            }
            Ok(format!(
                "connected: {during}; after its disconnect: {after}"
            ))
        }),
    );
    Ok(())
}

/// What a daemon killed in the middle of a request leaves in the kernel, and the reconcile a
/// restarted one runs before serving (`DmaBackend::reconcile`; the crash itself is in
/// vfio-user-edu): the leftovers are made here with the backend's own iommufd, as the dead
/// daemon's half-done ioctls would have: a new IOAS with endpoint 2 attached to it (an ATTACH in
/// flight), a mapping in domain 1's IOAS the state does not know (a MAP in flight) and a
/// mapping the state has that the kernel no longer has (an UNMAP in flight).
fn reconcile_check(rep: &mut Report, cx: &Ctx) -> Result<()> {
    let b = &*cx.d.backend;
    let e1 = &cx.edu1;
    let mut vm = cx.d.connect()?;
    let ram = Ram::of(&vm)?;
    rep.check(
        "crash leftovers reconciled with the kernel as the truth: a leaked IOAS (with a device on it) destroyed, a MAP over an unknown mapping replaces it, an UNMAP of a lost mapping succeeds",
        timed(|| {
            attach(&mut vm, 1, 1, 0)?;
            map(&mut vm, 1, IOVA_X, GPA_A, PAGE, RW)?;
            map(&mut vm, 1, IOVA_Y, GPA_B, PAGE, RW)?;
            let ioas = ioas_of(b, 1)?;
            let h = b.hand_over();
            // SAFETY: the backend's own iommufd, open while `b` lives.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(h.iommufd) };
            let leaked = sys::ioas_alloc(fd).map_err(|e| format!("IOAS_ALLOC: {}", errno_name(e.errno)))?;
            let dev2 = b.device_file(EndpointId(2)).ok_or("no device for endpoint 2")?;
            sys::attach_pt(std::os::fd::AsFd::as_fd(&dev2), leaked)
                .map_err(|e| format!("attach endpoint 2 to IOAS {leaked}: {}", errno_name(e.errno)))?;
            // A page of this process, full of 0x99, where the unknown mapping points.
            let stale: Vec<u8> = vec![0x99; 2 * PAGE as usize];
            let at = (stale.as_ptr() as u64).next_multiple_of(PAGE);
            sys::ioas_map(fd, ioas, IOVA_Z, at, PAGE, sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE)
                .map_err(|e| format!("the unknown mapping: {}", errno_name(e.errno)))?;
            sys::ioas_unmap(fd, ioas, IOVA_Y, PAGE)
                .map_err(|e| format!("losing IOVA Y: {}", errno_name(e.errno)))?;
            let fixed = b.reconcile();
            let failed: Vec<&String> = fixed.iter().filter_map(|f| f.as_ref().err()).collect();
            if !failed.is_empty() {
                return Err(format!("reconcile could not fix: {failed:?}"));
            }
            let lines: Vec<&String> = fixed.iter().filter_map(|f| f.as_ref().ok()).collect();
            if sys::ioas_iova_ranges(fd, leaked).is_ok() {
                return Err(format!("the leaked IOAS {leaked} is still there (fixed: {lines:?})"));
            }
            expect_attachment(b, 2, Attachment::Blocked)?;
            // The guest's MAP at IOVA Z replaces the unknown mapping: DMA lands at GPA C, the
            // stale page is untouched.
            map(&mut vm, 1, IOVA_Z, GPA_C, PAGE, RW)?;
            let p = pattern(0x41);
            ram.write(GPA_A, &p)?;
            ram.fill(GPA_C, SENTINEL)?;
            e1.load(IOVA_X)?;
            e1.store(IOVA_Z)?;
            ram.expect(GPA_C, &p, "GPA C after IOVA X -> edu -> IOVA Z")?;
            let off = (at - stale.as_ptr() as u64) as usize;
            // SAFETY: a volatile read of our own buffer, which the device may have written.
            let first = unsafe { std::ptr::read_volatile(stale.as_ptr().add(off)) };
            if first != 0x99 {
                return Err(format!("the stale page was written ({first:#x}): the old mapping still translates"));
            }
            // The guest's UNMAP of IOVA Y, which the kernel lost, succeeds.
            let s = vm
                .request(&Request::unmap(1, IOVA_Y, IOVA_Y + PAGE - 1))
                .map_err(|e| e.to_string())?;
            ok(s, "UNMAP of the lost IOVA Y")?;
            for iova in [IOVA_X, IOVA_Z] {
                let s = vm.request(&Request::unmap(1, iova, iova + PAGE - 1)).map_err(|e| e.to_string())?;
                ok(s, "UNMAP")?;
            }
            detach(&mut vm, 1, 1)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("IOASes left: {:?}", b.domain_ids()));
            }
            Ok(format!("fixed: {}", lines.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("; ")))
        }),
    );
    // The next checks count pins from a daemon with no connection.
    let n = cx.d.devices();
    vm.disconnect();
    cx.d.wait_closed(n, Duration::from_secs(30))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,vhost_user_iommu::backend::iommufd=info"),
    )
    .write_style(env_logger::WriteStyle::Never)
    .init();
    let mut rep = Report::default();
    // Pinned guest RAM is charged to RLIMIT_MEMLOCK (root has CAP_IPC_LOCK anyway).
    guest_kit::sys::unlimited_memlock();

    let t0 = Instant::now();
    let setup = (|| {
        let (backend, edus) = backend_over_two_edus()?;
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
        let d = Daemon::start("daemon-dma", backend, Mode::Inline, false)?;
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
    if let Err(e) = staging_on_demand(&mut rep, &cx) {
        rep.check("staging connection", Err(e));
    }
    if let Err(e) = first_connection(&mut rep, &cx) {
        rep.check("first connection", Err(e));
    }
    if let Err(e) = compare_map_paths(&mut rep, &cx) {
        rep.check("second connection", Err(e));
    }
    if let Err(e) = reconcile_check(&mut rep, &cx) {
        rep.check("reconcile connection", Err(e));
    }
    if let Err(e) = chaos_connection(&mut rep, &cx) {
        rep.check("chaos connection", Err(e));
    }
    drop(cx);
    rep.finish("daemon-dma", t0)
}
