//! The NVMe checks of L2: the guest kernel's own `nvme` driver runs a real (L0-emulated) NVMe
//! controller that the daemon serves to L1's QEMU over vfio-user, so every command, PRP list and
//! data buffer is DMA through the translations the daemon made from L2's virtio-iommu requests,
//! and every completion is an MSI-X vector of the device.
//!
//! The disk is split into three areas, one per L2 run of the tier, each written with data that
//! only its run's seed produces: area 0 by VM 1's first boot (`iommu.strict=1`), area 1 by its
//! second boot after the reboot (lazy: the device's group switched to `DMA-FQ`), area 2 by the
//! identity VM. A run reads the earlier areas back too, and the host checks the disk image after
//! L0 exits ([`verify_image`]), so the data is proven to have crossed the device to its backing
//! file, not just a cache.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::{self, NonNull};
use std::thread;
use std::time::{Duration, Instant};

use crate::msix;
use crate::sysfs;

pub type Result<T> = std::result::Result<T, String>;

/// The PCI class of an NVMe controller (mass storage, non-volatile memory, NVM Express).
const NVME_CLASS: &str = "0x010802";
const AREA_BYTES: u64 = 16 << 20;
/// 4 KiB writes at this many distinct random block offsets in the first half of an area.
const RANDOM_BLOCKS: usize = 64;
const BLOCK: usize = 4096;
/// 128 KiB sequential writes over 2 MiB in the second half of an area.
const SEQ_CHUNK: usize = 128 << 10;
const SEQ_CHUNKS: usize = 16;
/// The areas that exist (see the module doc); the image must hold all of them.
const AREAS: u64 = 3;

fn seed(area: u64) -> u64 {
    0x5eed_0000 + area
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finalizer: every (seed, offset, word) gives a different, unguessable word.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The content of the disk at byte offset `off` (block aligned) written by `area`'s run.
fn fill(buf: &mut [u8], area: u64, off: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = mix(seed(area) << 40 ^ off.wrapping_add(8 * i as u64));
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// The byte offsets of an area's random 4 KiB blocks: distinct, block aligned, scattered over the
/// first half of the area in an order that is not ascending.
fn random_offsets(area: u64) -> Vec<u64> {
    let slots = AREA_BYTES / 2 / BLOCK as u64;
    let mut out: Vec<u64> = Vec::with_capacity(RANDOM_BLOCKS);
    let mut x = seed(area);
    while out.len() < RANDOM_BLOCKS {
        x = mix(x);
        let off = area * AREA_BYTES + (x % slots) * BLOCK as u64;
        if !out.contains(&off) {
            out.push(off);
        }
    }
    out
}

fn seq_offset(area: u64) -> u64 {
    area * AREA_BYTES + AREA_BYTES / 2
}

/// Checks that `area`'s data is on the disk, through `read` (O_DIRECT in L2, a plain file on the
/// host). Returns the number of bytes compared.
fn verify_area(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    area: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let mut want = vec![0u8; SEQ_CHUNK];
    let mut bytes = 0;
    for off in random_offsets(area) {
        let got = &mut buf[..BLOCK];
        read(got, off)?;
        fill(&mut want[..BLOCK], area, off);
        if got != &want[..BLOCK] {
            return Err(format!(
                "area {area}: the 4 KiB block at {off:#x} differs from what was written"
            ));
        }
        bytes += BLOCK as u64;
    }
    for i in 0..SEQ_CHUNKS {
        let off = seq_offset(area) + (i * SEQ_CHUNK) as u64;
        let got = &mut buf[..SEQ_CHUNK];
        read(got, off)?;
        fill(&mut want, area, off);
        if let Some(p) = got.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(format!(
                "area {area}: the 128 KiB chunk at {off:#x} differs at byte {p:#x}"
            ));
        }
        bytes += SEQ_CHUNK as u64;
    }
    Ok(bytes)
}

/// The host side: after L0 exited, every area must be in the NVMe backing file.
pub fn verify_image(path: &str) -> Result<String> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let len = f.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    if len < AREAS * AREA_BYTES {
        return Err(format!(
            "{len} bytes, less than the {} the areas need",
            AREAS * AREA_BYTES
        ));
    }
    let read = |b: &mut [u8], off: u64| {
        f.read_exact_at(b, off)
            .map_err(|e| format!("{path}: read at {off:#x}: {e}"))
    };
    let mut buf = vec![0u8; SEQ_CHUNK];
    let mut total = 0;
    for area in 0..AREAS {
        total += verify_area(&read, area, &mut buf)?;
    }
    Ok(format!(
        "{AREAS} areas, {total} bytes as written by the L2 runs"
    ))
}

/// A buffer of locked anonymous memory, aligned for O_DIRECT.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl DmaBuf {
    pub fn new(len: usize) -> Result<DmaBuf> {
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(DmaBuf {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned NULL")?,
            len,
        })
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by self; the device
        // writes it only inside a read(2) that holds this exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); no reference outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The NVMe controllers of this machine (PCI addresses).
pub fn nvme_bdfs() -> Result<Vec<String>> {
    sysfs::bdfs_of_class(NVME_CLASS)
}

/// Rebinds `bdf` (driven by `driver`) with its IOMMU group's default domain switched to lazy
/// invalidation: the kernel allows the switch only while no driver is bound.
pub fn switch_to_lazy(bdf: &str, driver: &str) -> Result<String> {
    let group = format!("/sys/bus/pci/devices/{bdf}/iommu_group/type");
    let before = sysfs::read_trim(&group)?;
    sysfs::write(&format!("/sys/bus/pci/drivers/{driver}/unbind"), bdf)?;
    sysfs::write(&group, "DMA-FQ")?;
    sysfs::write(&format!("/sys/bus/pci/drivers/{driver}/bind"), bdf)?;
    let after = sysfs::read_trim(&group)?;
    if after != "DMA-FQ" {
        return Err(format!("group type {after:?} after writing DMA-FQ"));
    }
    Ok(format!("group type {before} -> {after}"))
}

pub fn open_direct(node: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(node)
        .map_err(|e| e.to_string())
}

/// Waits for the namespace's block device node (the driver probes asynchronously).
pub fn wait_namespace(timeout: Duration) -> Result<String> {
    let t = Instant::now();
    loop {
        if let Ok(entries) = fs::read_dir("/sys/block") {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nvme"))
                .collect();
            names.sort();
            if let Some(n) = names.first() {
                let dev = format!("/dev/{n}");
                if fs::metadata(&dev).is_ok() {
                    return Ok(dev);
                }
            }
        }
        if t.elapsed() > timeout {
            return Err(format!("no NVMe namespace after {} s", timeout.as_secs()));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Which run this is, found from the disk: the first translated boot finds area 0 empty.
enum Run {
    Strict,
    Lazy,
    Identity,
}

/// Everything L2 checks of its NVMe controller; `identity` is the `iommu.passthrough=1` VM.
pub fn nvme_checks(check: &mut dyn FnMut(&str, Result<String>) -> bool, identity: bool) {
    let bdf = match nvme_bdfs() {
        Ok(b) if b.len() == 1 => b[0].clone(),
        Ok(b) => {
            check("one NVMe controller", Err(format!("found {b:?}")));
            return;
        }
        Err(e) => {
            check("one NVMe controller", Err(e));
            return;
        }
    };
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    let driver = fs::read_link(format!("{dev}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if !check(
        &format!("{bdf}: the kernel's nvme driver is bound"),
        match driver.as_deref() {
            Some("nvme") => Ok(String::new()),
            other => Err(format!("driver {other:?}")),
        },
    ) {
        return;
    }
    let Ok(node) = wait_namespace(Duration::from_secs(120)).map_err(|e| {
        check("NVMe namespace appears", Err(e));
    }) else {
        return;
    };
    let mut buf = match DmaBuf::new(SEQ_CHUNK) {
        Ok(b) => b,
        Err(e) => {
            check("O_DIRECT buffer", Err(e));
            return;
        }
    };
    let disk = match open_direct(&node) {
        Ok(f) => f,
        Err(e) => {
            check(&format!("open {node} O_DIRECT"), Err(e));
            return;
        }
    };
    let read = |b: &mut [u8], off: u64| {
        disk.read_exact_at(b, off)
            .map_err(|e| format!("{node}: read {} at {off:#x}: {e}", b.len()))
    };
    let run = if identity {
        Run::Identity
    } else {
        let mut probe = vec![0u8; BLOCK];
        let first = random_offsets(0)[0];
        let b = &mut buf.as_mut()[..BLOCK];
        let _ = read(b, first);
        fill(&mut probe, 0, first);
        if *b == probe[..] {
            Run::Lazy
        } else {
            Run::Strict
        }
    };
    let (area, mode) = match run {
        Run::Strict => (0, "strict"),
        Run::Lazy => (1, "lazy"),
        Run::Identity => (2, "identity"),
    };
    println!("E2E-L2: nvme {bdf} ({node}): {mode} run, writes area {area}");
    // The earlier runs' data, read back through the device after resets and a new VM.
    for earlier in 0..area {
        let r = verify_area(&read, earlier, buf.as_mut());
        check(
            &format!("NVMe: area {earlier} written by an earlier run reads back unchanged"),
            r.map(|b| format!("{b} bytes")),
        );
    }
    drop(disk);
    if let Run::Lazy = run {
        if !check(
            "NVMe: unbound, the device's group switched to lazy invalidation (DMA-FQ), driver rebound",
            switch_to_lazy(&bdf, "nvme").and_then(|s| {
                let node = wait_namespace(Duration::from_secs(120))?;
                Ok(format!("{s}, {node} back"))
            }),
        ) {
            return;
        }
    }
    let disk = match open_direct(&node) {
        Ok(f) => f,
        Err(e) => {
            check(&format!("reopen {node} O_DIRECT"), Err(e));
            return;
        }
    };
    let group_type = sysfs::read_trim(&format!("{dev}/iommu_group/type")).unwrap_or_default();
    let read = |b: &mut [u8], off: u64| {
        disk.read_exact_at(b, off)
            .map_err(|e| format!("{node}: read {} at {off:#x}: {e}", b.len()))
    };
    let irq_before = sysfs::interrupts("nvme");
    let t = Instant::now();
    let written = (|| {
        let b = buf.as_mut();
        for off in random_offsets(area) {
            fill(&mut b[..BLOCK], area, off);
            disk.write_all_at(&b[..BLOCK], off)
                .map_err(|e| format!("{node}: write 4 KiB at {off:#x}: {e}"))?;
        }
        for i in 0..SEQ_CHUNKS {
            let off = seq_offset(area) + (i * SEQ_CHUNK) as u64;
            fill(b, area, off);
            disk.write_all_at(b, off)
                .map_err(|e| format!("{node}: write 128 KiB at {off:#x}: {e}"))?;
        }
        Ok(())
    })();
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let verified = written.and_then(|()| verify_area(&read, area, buf.as_mut()));
    let read_s = t.elapsed().as_secs_f64();
    check(
        &format!(
            "NVMe ({mode}, iommu group type {group_type}): {RANDOM_BLOCKS} random 4 KiB and \
             {SEQ_CHUNKS} sequential 128 KiB O_DIRECT writes read back byte for byte"
        ),
        verified.map(|b| format!("{b} bytes; writes {write_s:.2} s, reads {read_s:.2} s")),
    );
    let irq_after = sysfs::interrupts("nvme");
    // The admin queue (q0) does not count: its vector fires without any I/O.
    let fired: Vec<String> = sysfs::msix_fired(&irq_before, &irq_after)
        .into_iter()
        .filter(|v| !v.split('=').next().is_some_and(|name| name.ends_with("q0")))
        .collect();
    check(
        "NVMe: the I/O completions arrived on at least two MSI-X vectors (two I/O queues)",
        if fired.len() >= 2 {
            Ok(fired.join(" "))
        } else {
            Err(format!(
                "I/O queue vectors that fired: {fired:?}; /proc/interrupts: {irq_after:?}"
            ))
        },
    );
    let msix = match msix::Msix::find(&bdf) {
        Ok(m) => m,
        Err(e) => {
            check("NVMe: MSI-X capability", Err(e));
            return;
        }
    };
    check(
        "NVMe: MSI-X table and PBA as the guest reads them through the BAR",
        msix.check_table(&bdf, irq_after.len()),
    );
    // A read of a block this run wrote, whose completion interrupt must wait for the unmask.
    let off = random_offsets(area)[1];
    check(
        "NVMe: with MSI-X masked a completion's interrupt is held, unmasking delivers it",
        msix.check_masked_completion(&bdf, || {
            let mut b = DmaBuf::new(BLOCK)?;
            read(b.as_mut(), off)?;
            let mut want = vec![0u8; BLOCK];
            fill(&mut want, area, off);
            if b.as_mut()[..] == want[..] {
                Ok(())
            } else {
                Err(format!("block {off:#x} read back wrong while masked"))
            }
        }),
    );
}

/// Where the soak writes: past the checks' areas (the image holds it too).
const SOAK_AT: u64 = AREAS * AREA_BYTES;
const SOAK_BYTES: u64 = 8 << 20;

/// Verified NVMe I/O until `stop` says so (L1 upgrades and kills the daemon meanwhile): O_DIRECT
/// writes of 4 KiB (every eighth of 128 KiB) at scattered offsets, of a pattern that changes
/// every round, each read back and compared byte for byte. Every I/O maps and unmaps its buffer
/// through the IOMMU (through the daemon). Returns a summary, or the first error.
pub fn soak(stop: &mut dyn FnMut() -> bool) -> Result<String> {
    let node = wait_namespace(Duration::from_secs(10))?;
    let disk = open_direct(&node)?;
    let mut wbuf = DmaBuf::new(SEQ_CHUNK)?;
    let mut rbuf = DmaBuf::new(SEQ_CHUNK)?;
    let mut lat: Vec<Duration> = Vec::new();
    let (mut ios, mut bytes, mut round) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while !stop() {
        let len = if round % 8 == 7 { SEQ_CHUNK } else { BLOCK };
        let slots = SOAK_BYTES / len as u64;
        let off = SOAK_AT + (mix(round ^ 0x50a4) % slots) * len as u64;
        let w = &mut wbuf.as_mut()[..len];
        fill(w, 0x100 + round, off);
        let t = Instant::now();
        disk.write_all_at(w, off)
            .map_err(|e| format!("{node}: round {round}: write {len} at {off:#x}: {e}"))?;
        lat.push(t.elapsed());
        let r = &mut rbuf.as_mut()[..len];
        r.fill(0);
        let t = Instant::now();
        disk.read_exact_at(r, off)
            .map_err(|e| format!("{node}: round {round}: read {len} at {off:#x}: {e}"))?;
        lat.push(t.elapsed());
        if let Some(p) = r.iter().zip(wbuf.as_mut().iter()).position(|(a, b)| a != b) {
            return Err(format!(
                "round {round}: the {len} bytes read back at {off:#x} differ at byte {p:#x}"
            ));
        }
        ios += 2;
        bytes += len as u64;
        round += 1;
    }
    if ios == 0 {
        return Err("no I/O before the soak ended".into());
    }
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(format!(
        "ios={ios} verified_bytes={bytes} secs={:.1} io_p50_ms={:.2} io_max_ms={:.1}",
        t0.elapsed().as_secs_f64(),
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() - 1])
    ))
}
