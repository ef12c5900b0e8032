//! bench-iommufd: the iommufd map-path benchmark of the VM test tier (tests/vm/run.sh).
//!
//! Inside the test VM (TCG: only ratios count), with the daemon's iommufd backend over the two
//! edu VFIO cdevs, it measures MAP+UNMAP pairs of 4 KiB and 2 MiB on an IOAS that has edu 1
//! attached (so every map really fills an IOMMU domain and every unmap flushes the IOTLB):
//!
//! - `raw-map`: IOMMU_IOAS_MAP (user VA) + IOMMU_IOAS_UNMAP straight into the IOAS (the floor)
//! - `raw-map-file`: IOMMU_IOAS_MAP_FILE (memfd) + UNMAP
//! - `raw-copy`: IOMMU_IOAS_COPY from a staging IOAS (all RAM mapped once, kept pinned by an
//!   unattached HWPT) + UNMAP
//! - `raw-copy-nohwpt`: the same from a staging IOAS without a HWPT (pages pinned per copy)
//! - `backend-<path>`: the backend's `HwDomain::map`/`unmap` (what the daemon calls), per strategy
//! - `daemon-<path>`: the full daemon over its vhost-user socket, driven by the crate's TestVm in
//!   the strict pattern (one MAP per kick, then one UNMAP per kick), per strategy, with the
//!   default 50 µs polling window; `daemon-noop` maps without permissions (the backend records
//!   it, no ioctl: the round trip alone); `-poll0` rows run a second daemon that never polls
//!
//! Output: a table per size (per-pair time, MAP and UNMAP time, ratio to `raw-map`, p50/p99 of
//! the pair), one `BENCH-IOMMUFD: {json}` line per row, `PASS: bench-iommufd ...` lines, and
//! `FAIL:` only on errors (never on timing). Pairs per row: BENCH_PAIRS_4K (default 256),
//! BENCH_PAIRS_2M (default 32).

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapStrategy, sys};
use vhost_user_iommu::backend::{Attachment, DmaBackend, HostConstraints, MapOp};
use vhost_user_iommu::domains::{Limits, Rules};
use vhost_user_iommu::driver::{GuestRam as MemfdRam, TestVm, VmOptions};
use vhost_user_iommu::guest_ram::{Backing, GuestRam, HostLocation, RamRegion};
use vhost_user_iommu::ids::{DomainId, EndpointId, IovaRange, Perms};
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{Request, Status};
use vhost_user_iommu::server::{Stopper, serve};
use vhost_user_iommu::vhost::{DEFAULT_POLL, DeviceSettings};

type Result<T> = std::result::Result<T, String>;

const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
const KIB4: u64 = 4 << 10;
const MIB2: u64 = 2 << 20;
/// RAM of the raw and backend loops (memfd, pre-faulted): 64 MiB at GPA 0.
const RAM_SIZE: u64 = 64 << 20;
/// Maps take their GPAs from [16 MiB, 48 MiB) (the TestVm keeps its rings elsewhere).
const GPA_BASE: u64 = 16 << 20;
const GPA_SPAN: u64 = 32 << 20;
/// IOVAs: 1 GiB up, a window of 64 mappings (fresh addresses, bounded page-table growth).
const IOVA_BASE: u64 = 1 << 30;
/// GPAs cycle through at most this many buffers (a guest reuses its DMA buffers); the warm-up
/// touches each once, so no row pays first-touch page faults in the measured pairs.
const MAX_SLOTS: u64 = 64;
const RW: u32 = sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE;

fn errno(e: sys::Errno) -> String {
    format!("{}: {}", e.name, std::io::Error::from_raw_os_error(e.errno))
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
    Rules::for_host(c, (1, 1023), Limits::default(), 512)
}

/// Timings of one row.
struct Row {
    name: String,
    size: u64,
    /// Per pair: (MAP ns, UNMAP ns).
    samples: Vec<(u64, u64)>,
    note: String,
}

impl Row {
    fn mean(&self, f: impl Fn(&(u64, u64)) -> u64) -> f64 {
        self.samples.iter().map(f).sum::<u64>() as f64 / self.samples.len().max(1) as f64
    }
    fn pair_ns(&self) -> f64 {
        self.mean(|s| s.0 + s.1)
    }
    fn map_ns(&self) -> f64 {
        self.mean(|s| s.0)
    }
    fn unmap_ns(&self) -> f64 {
        self.mean(|s| s.1)
    }
    fn pct(&self, p: f64) -> u64 {
        let mut v: Vec<u64> = self.samples.iter().map(|s| s.0 + s.1).collect();
        v.sort_unstable();
        if v.is_empty() {
            return 0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// `n` MAP+UNMAP pairs (after a warm-up), each half timed.
fn pairs(
    name: &str,
    size: u64,
    n: usize,
    mut map: impl FnMut(u64, u64) -> Result<()>,
    mut unmap: impl FnMut(u64) -> Result<()>,
) -> Result<Row> {
    let slots = (GPA_SPAN / size).min(MAX_SLOTS);
    let warmup = slots as usize;
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let iova = IOVA_BASE + (i as u64 % 64) * size;
        let gpa = GPA_BASE + (i as u64 % slots) * size;
        let t0 = Instant::now();
        map(iova, gpa).map_err(|e| format!("{name}: map #{i} iova {iova:#x} gpa {gpa:#x}: {e}"))?;
        let t1 = Instant::now();
        unmap(iova).map_err(|e| format!("{name}: unmap #{i} iova {iova:#x}: {e}"))?;
        let t2 = Instant::now();
        if i >= warmup {
            samples.push(((t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64));
        }
    }
    Ok(Row {
        name: name.to_string(),
        size,
        samples,
        note: String::new(),
    })
}

fn size_name(size: u64) -> &'static str {
    if size == KIB4 { "4K" } else { "2M" }
}

fn short(s: MapStrategy) -> &'static str {
    match s {
        MapStrategy::Map => "map",
        MapStrategy::MapFile => "map-file",
        MapStrategy::Copy => "copy",
    }
}

fn print_table(rows: &[Row]) {
    for size in [KIB4, MIB2] {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.size == size).collect();
        let Some(floor) = rs.iter().find(|r| r.name == "raw-map").map(|r| r.pair_ns()) else {
            continue;
        };
        let floor_map = rs
            .iter()
            .find(|r| r.name == "raw-map")
            .map_or(1.0, |r| r.map_ns());
        println!(
            "bench-iommufd {}: {:<18} {:>6} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}",
            size_name(size),
            "row",
            "pairs",
            "pair us",
            "MAP us",
            "UNMAP us",
            "x raw",
            "MAP x",
            "p50 us",
            "p99 us"
        );
        for r in &rs {
            println!(
                "bench-iommufd {}: {:<18} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>10.1} {:>10.1}{}",
                size_name(size),
                r.name,
                r.samples.len(),
                r.pair_ns() / 1e3,
                r.map_ns() / 1e3,
                r.unmap_ns() / 1e3,
                r.pair_ns() / floor,
                r.map_ns() / floor_map,
                r.pct(0.5) as f64 / 1e3,
                r.pct(0.99) as f64 / 1e3,
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", r.note)
                }
            );
        }
        for r in &rs {
            println!(
                "BENCH-IOMMUFD: {{\"size\":{},\"row\":\"{}\",\"pairs\":{},\"pair_ns\":{:.0},\"map_ns\":{:.0},\"unmap_ns\":{:.0},\"ratio_raw\":{:.3},\"map_ratio_raw\":{:.3},\"p50_ns\":{},\"p99_ns\":{}}}",
                r.size,
                r.name,
                r.samples.len(),
                r.pair_ns(),
                r.map_ns(),
                r.unmap_ns(),
                r.pair_ns() / floor,
                r.map_ns() / floor_map,
                r.pct(0.5),
                r.pct(0.99)
            );
        }
    }
}

/// A staging IOAS of this bench: all of `ram` at IOVA = GPA, optionally kept pinned by an
/// unattached HWPT.
struct Staging<'a> {
    fd: BorrowedFd<'a>,
    ioas: u32,
    hwpt: Option<u32>,
}

impl<'a> Staging<'a> {
    fn new(fd: BorrowedFd<'a>, ram: &MemfdRam, hwpt_dev: Option<u32>) -> Result<Staging<'a>> {
        let ioas = sys::ioas_alloc(fd).map_err(errno)?;
        let mut s = Staging {
            fd,
            ioas,
            hwpt: None,
        };
        sys::ioas_map(fd, ioas, ram.base(), ram.host_addr(), ram.size(), RW).map_err(errno)?;
        if let Some(dev) = hwpt_dev {
            // Not every IOMMU driver can allocate an unattached paging domain: then no row.
            match sys::hwpt_alloc(fd, dev, ioas) {
                Ok(h) => s.hwpt = Some(h),
                Err(e) => println!("bench-iommufd: no staging HWPT: {}", errno(e)),
            }
        }
        Ok(s)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.hwpt {
            let _ = sys::destroy(self.fd, h);
        }
        let _ = sys::destroy(self.fd, self.ioas);
    }
}

fn fault_in(file: &File, size: u64) -> Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        file.write_all_at(&chunk, off)
            .map_err(|e| format!("pre-faulting guest RAM: {e}"))?;
        off += chunk.len() as u64;
    }
    Ok(())
}

/// (a)–(c) and the backend-call loops, before the daemon serves anything.
fn raw_rows(b: &Arc<IommufdBackend>, sizes: &[(u64, usize)], rows: &mut Vec<Row>) -> Result<()> {
    let ram = MemfdRam::new(RAM_SIZE).map_err(|e| format!("memfd RAM: {e}"))?;
    // SAFETY: dup of the valid memfd `ram` owns; the new fd is owned by the File.
    let memfd = unsafe { File::from_raw_fd(libc::dup(ram.fd())) };
    fault_in(&memfd, RAM_SIZE)?;
    let fd = b.iommufd();
    let ep1 = EndpointId(1);
    let dev2 = b.dev_id(EndpointId(2)).ok_or("no endpoint 2")?;

    // One IOAS (a backend domain) with edu 1 attached: what every raw loop maps into.
    let dom = b.create_domain().map_err(|e| e.to_string())?;
    let ioas = dom.id();
    b.attach(ep1, Attachment::Domain(ioas))
        .map_err(|e| e.to_string())?;
    let staged = Staging::new(fd, &ram, Some(dev2))?;
    let unpinned = Staging::new(fd, &ram, None)?;
    let host = ram.host_addr();
    let unmap = |iova: u64, size: u64| -> Result<()> {
        let done = sys::ioas_unmap(fd, ioas, iova, size).map_err(errno)?;
        if done != size {
            return Err(format!("unmapped {done:#x} of {size:#x}"));
        }
        Ok(())
    };
    for &(size, n) in sizes {
        rows.push(pairs(
            "raw-map",
            size,
            n,
            |iova, gpa| sys::ioas_map(fd, ioas, iova, host + gpa, size, RW).map_err(errno),
            |iova| unmap(iova, size),
        )?);
        if b.map_file_supported() {
            rows.push(pairs(
                "raw-map-file",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_map_file(fd, ioas, iova, memfd.as_fd(), gpa, size, RW).map_err(errno)
                },
                |iova| unmap(iova, size),
            )?);
        }
        if staged.hwpt.is_some() {
            let mut r = pairs(
                "raw-copy",
                size,
                n,
                |iova, gpa| {
                    sys::ioas_copy(fd, ioas, iova, staged.ioas, gpa, size, RW).map_err(errno)
                },
                |iova| unmap(iova, size),
            )?;
            r.note = "sub-range COPY from a staging IOAS with a HWPT".into();
            rows.push(r);
        }
        let mut r = pairs(
            "raw-copy-nohwpt",
            size,
            n,
            |iova, gpa| sys::ioas_copy(fd, ioas, iova, unpinned.ioas, gpa, size, RW).map_err(errno),
            |iova| unmap(iova, size),
        )?;
        r.note = "staging IOAS without HWPT: pins per copy".into();
        rows.push(r);
    }
    drop(unpinned);
    drop(staged);
    b.attach(ep1, Attachment::Blocked)
        .map_err(|e| e.to_string())?;
    drop(dom);

    // The backend-call loop: HwDomain::map/unmap, as the domain model calls them.
    let st = memfd.metadata().map_err(|e| e.to_string())?;
    let table = GuestRam::new(vec![RamRegion {
        gpa: IovaRange::new(0, RAM_SIZE - 1).expect("valid"),
        host_addr: host,
        backing: Some(Backing {
            file: Arc::new(memfd.try_clone().map_err(|e| e.to_string())?),
            offset: 0,
            file_id: (st.dev(), st.ino()),
        }),
    }])?;
    b.set_ram(&table).map_err(|e| e.to_string())?;
    for &(size, n) in sizes {
        for s in MapStrategy::ALL {
            if s == MapStrategy::MapFile && !b.map_file_supported() {
                continue;
            }
            b.set_map_strategy(Some(s));
            let mut dom = b.create_domain().map_err(|e| e.to_string())?;
            b.attach(ep1, Attachment::Domain(dom.id()))
                .map_err(|e| e.to_string())?;
            let before = (b.map_counts(), b.copy_count());
            let d = std::cell::RefCell::new(&mut dom);
            let mut r = pairs(
                &format!("backend-{}", short(s)),
                size,
                n,
                |iova, gpa| {
                    let op = MapOp {
                        iova: IovaRange::new(iova, iova + size - 1).expect("valid"),
                        gpa,
                        host: HostLocation {
                            host_addr: host + gpa,
                            file: Some(((st.dev(), st.ino()), gpa)),
                        },
                        perms: Perms::RW,
                    };
                    d.borrow_mut().map(&op).map_err(|e| e.to_string())
                },
                |iova| {
                    d.borrow_mut()
                        .unmap(IovaRange::new(iova, iova + size - 1).expect("valid"))
                        .map_err(|e| e.to_string())
                },
            )?;
            let after = (b.map_counts(), b.copy_count());
            r.note = used(before, after);
            rows.push(r);
            b.attach(ep1, Attachment::Blocked)
                .map_err(|e| e.to_string())?;
        }
    }
    b.set_map_strategy(None);
    Ok(())
}

/// Which ioctls served a row: deltas of (MAP_FILE, MAP) counts and COPY counts.
fn used(before: ((u64, u64), u64), after: ((u64, u64), u64)) -> String {
    format!(
        "{} MAP_FILE, {} MAP, {} COPY",
        after.0.0 - before.0.0,
        after.0.1 - before.0.1,
        after.1 - before.1
    )
}

/// What one daemon row maps with: a strategy, or `None` for MAPs without permissions (recorded
/// by the backend, no ioctl: the socket and kick round trip alone).
type DaemonRow = Option<MapStrategy>;

/// (d): the daemon over its socket, strict pattern, per strategy, with this polling window.
fn daemon_rows(
    b: &Arc<IommufdBackend>,
    sizes: &[(u64, usize)],
    poll: Duration,
    which: &[DaemonRow],
    suffix: &str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "bench-iommufd-{}-{}",
        std::process::id(),
        poll.as_micros()
    ));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let socket = dir.join("viommu.sock");
    let settings = DeviceSettings {
        endpoints: vec![EndpointId(1), EndpointId(2)],
        boot_bypass: false,
        rules: rules_from(&b.constraints()),
        mode: Mode::Inline,
        poll,
    };
    let listener = Listener::new(&socket, true).map_err(|e| format!("listen: {e}"))?;
    let stopper = Arc::new(Stopper::default());
    let (s2, b2) = (stopper.clone(), b.clone());
    let daemon = thread::Builder::new()
        .name("daemon".into())
        .spawn(move || {
            let backend: Arc<dyn DmaBackend> = b2;
            if let Err(e) = serve(
                listener,
                settings,
                backend,
                Arc::new(Metrics::default()),
                s2,
                None,
                None,
            ) {
                eprintln!("daemon: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    let res = (|| {
        let mut vm = TestVm::connect(
            &socket,
            VmOptions {
                connect_timeout: Duration::from_secs(30),
                request_timeout: Duration::from_secs(30),
                ..VmOptions::default()
            },
        )
        .map_err(|e| format!("TestVm::connect: {e}"))?;
        if vm.usable_ram_end() < GPA_BASE + GPA_SPAN {
            return Err(format!(
                "TestVm usable RAM ends at {:#x}",
                vm.usable_ram_end()
            ));
        }
        // SAFETY: dup of the valid memfd the TestVm owns; the new fd is owned by the File.
        let ram = unsafe { File::from_raw_fd(libc::dup(vm.ram().fd())) };
        if ram.as_raw_fd() < 0 {
            return Err("dup of the TestVm RAM fd".into());
        }
        // Pre-fault [GPA_BASE, +SPAN) so no path pays for shmem allocation.
        let chunk = vec![0u8; 1 << 20];
        for off in (GPA_BASE..GPA_BASE + GPA_SPAN).step_by(chunk.len()) {
            ram.write_all_at(&chunk, off)
                .map_err(|e| format!("pre-fault TestVm RAM: {e}"))?;
        }
        let st = vm
            .request(&Request::Attach {
                domain: DomainId(1),
                endpoint: EndpointId(1),
                flags: 0,
                reserved: [0; 4],
            })
            .map_err(|e| e.to_string())?;
        if st != Status::Ok {
            return Err(format!("ATTACH: {st:?}"));
        }
        for &(size, n) in sizes {
            for &s in which {
                if s == Some(MapStrategy::MapFile) && !b.map_file_supported() {
                    continue;
                }
                b.set_map_strategy(s);
                let flags = if s.is_some() { 3 } else { 0 };
                let label = s.map_or("noop", short);
                let before = (b.map_counts(), b.copy_count());
                let vm = std::cell::RefCell::new(&mut vm);
                let ok = |st: Status, what: &str| {
                    if st == Status::Ok {
                        Ok(())
                    } else {
                        Err(format!("{what}: {st:?}"))
                    }
                };
                let mut r = pairs(
                    &format!("daemon-{label}{suffix}"),
                    size,
                    n,
                    |iova, gpa| {
                        let st = vm
                            .borrow_mut()
                            .request(&Request::Map {
                                domain: DomainId(1),
                                virt_start: iova,
                                virt_end: iova + size - 1,
                                phys_start: gpa,
                                flags,
                            })
                            .map_err(|e| e.to_string())?;
                        ok(st, "MAP")
                    },
                    |iova| {
                        let st = vm
                            .borrow_mut()
                            .request(&Request::Unmap {
                                domain: DomainId(1),
                                virt_start: iova,
                                virt_end: iova + size - 1,
                                reserved: [0; 4],
                            })
                            .map_err(|e| e.to_string())?;
                        ok(st, "UNMAP")
                    },
                )?;
                let after = (b.map_counts(), b.copy_count());
                r.note = used(before, after);
                rows.push(r);
            }
        }
        b.set_map_strategy(None);
        vm.disconnect();
        Ok(())
    })();
    stopper.stop();
    let _ = daemon.join();
    let _ = fs::remove_dir_all(&dir);
    res
}

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .write_style(env_logger::WriteStyle::Never)
        .init();
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
    let sizes = [
        (KIB4, env_n("BENCH_PAIRS_4K", 256)),
        (MIB2, env_n("BENCH_PAIRS_2M", 32)),
    ];
    let run = (|| {
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
        let b = Arc::new(IommufdBackend::open(&eps, false).map_err(|e| format!("open: {e}"))?);
        println!(
            "bench-iommufd: edus {} and {}; MAP_FILE {}; staging HWPT {:?}; TCG guest: only ratios count",
            edus[0].0,
            edus[1].0,
            if b.map_file_supported() {
                "available"
            } else {
                "not available"
            },
            b.staging_hwpt()
        );
        let mut rows = Vec::new();
        raw_rows(&b, &sizes, &mut rows)?;
        let auto = b.auto_map_strategy();
        let copy = b.copy_works();
        let all = [
            Some(MapStrategy::Map),
            Some(MapStrategy::MapFile),
            Some(MapStrategy::Copy),
            None,
        ];
        daemon_rows(&b, &sizes, DEFAULT_POLL, &all, "", &mut rows)?;
        daemon_rows(
            &b,
            &sizes,
            Duration::ZERO,
            &[Some(MapStrategy::Copy), None],
            "-poll0",
            &mut rows,
        )?;
        Ok((rows, auto, copy))
    })();
    match run {
        Ok((rows, auto, copy)) => {
            print_table(&rows);
            println!(
                "PASS: bench-iommufd sub-range IOMMU_IOAS_COPY from the staging IOAS ({})",
                match copy {
                    Some(true) => "works".to_string(),
                    Some(false) => "refused by this kernel".to_string(),
                    None => "not probed: no staging HWPT".to_string(),
                }
            );
            println!(
                "PASS: bench-iommufd ran ({} rows, automatic map strategy {}, {:.1} s)",
                rows.len(),
                auto.name(),
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL: bench-iommufd: {e}");
            ExitCode::FAILURE
        }
    }
}
