//! vfio-user tier: the server over a real unix socket, against a fake assigned device, driven
//! by a client written from the protocol document (nutanix/libvfio-user `docs/vfio-user.rst`)
//! with its own encoding of every message (`driver::vfio_user_client`, shared with the VM
//! tier's vfio-user-edu) — it shares no code with the server.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_iommu::driver::vfio_user_client::{
    CAP_MSIX_MAPPABLE, CAP_SPARSE, CallError, Client, DMA_MAP, DMA_UNMAP, F_ERROR, F_NO_REPLY,
    GET_INFO, GET_IRQ_INFO, GET_REGION_INFO, GET_REGION_IO_FDS, INTX, IRQ_AUTOMASKED, IRQ_EVENTFD,
    IRQ_MASKABLE, IRQ_NORESIZE, MSIX, P, REG_CAPS, REG_MMAP, REG_READ, REG_WRITE, REGION_WRITE,
    REQ, RESET, Res, SET_ACTION_TRIGGER, SET_DATA_BOOL, SET_DATA_EVENTFD, SET_DATA_NONE, SET_IRQS,
    T_REPLY, VERSION, WRITE_MULTI, hdr_bytes, le16, le32, le64,
};
use vhost_user_iommu::testing::TempDir;
use vhost_user_iommu::vfio_user::{
    AssignedDevice, DeviceInfo, DeviceServer, DmaCheck, Errno, IrqInfo, IrqSet, RegionCap,
    RegionInfo, SparseArea, StopSignal, bind_socket, spawn_device_server,
};
use vmm_sys_util::eventfd::EventFd;

/// The config space region of a PCI device.
const CONFIG: u32 = 7;

// ---- the fake device ----
const BAR0_SIZE: u64 = 0x4000;
const BAR0_OFF: u64 = 0x10000;
const BAR2_SIZE: u64 = 0x1000;
const BAR2_OFF: u64 = 0x20000;
const GUEST_RAM_END: u64 = 0x8000_0000;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct IrqCall {
    index: u32,
    flags: u32,
    start: u32,
    count: u32,
    /// Our own duplicate of each eventfd the server passed (None for -1).
    fds: Vec<Option<OwnedFd>>,
    data: Vec<u8>,
}

#[derive(Default)]
struct FakeState {
    config: Vec<u8>,
    resets: u32,
    /// The device reports no reset method (no VFIO_DEVICE_FLAGS_RESET), like edu.
    no_reset: bool,
    irq_calls: Vec<IrqCall>,
}

struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// Backs both BARs (at BAR0_OFF and BAR2_OFF), the fd handed to the client.
    memfd: File,
}

fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

impl Fake {
    fn new() -> (Fake, Arc<Mutex<FakeState>>) {
        let memfd = memfd("fake-bars", BAR2_OFF + BAR2_SIZE);
        let pattern: Vec<u8> = (0..BAR0_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        memfd.write_all_at(&pattern, BAR0_OFF).unwrap();
        let mut config = vec![0u8; 256];
        config[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        config[2..4].copy_from_slice(&0x11e8u16.to_le_bytes());
        let state = Arc::new(Mutex::new(FakeState {
            config,
            ..Default::default()
        }));
        (
            Fake {
                state: state.clone(),
                memfd,
            },
            state,
        )
    }

    /// Where `len` bytes at `offset` of BAR `index` are in the memfd.
    fn bar_at(&self, index: u32, offset: u64, len: usize) -> Result<u64, Errno> {
        let (base, size) = match index {
            0 => (BAR0_OFF, BAR0_SIZE),
            2 => (BAR2_OFF, BAR2_SIZE),
            _ => return Err(einval()),
        };
        if offset + len as u64 > size {
            return Err(einval());
        }
        Ok(base + offset)
    }
}

/// The bytes of config space `config` that `len` bytes at `offset` cover.
fn config_range(config: &[u8], offset: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
    let end = offset as usize + len;
    if end > config.len() {
        return Err(einval());
    }
    Ok(offset as usize..end)
}

fn einval() -> Errno {
    Errno::new(libc::EINVAL, "fake")
}

impl AssignedDevice for Fake {
    fn info(&self) -> DeviceInfo {
        let reset = if self.state.lock().unwrap().no_reset {
            0
        } else {
            1
        };
        DeviceInfo {
            flags: reset | 2, // RESET | PCI
            num_regions: 9,
            num_irqs: 5,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, Errno> {
        Ok(match index {
            0 => RegionInfo {
                flags: REG_READ | REG_WRITE | REG_MMAP,
                size: BAR0_SIZE,
                offset: BAR0_OFF,
                caps: vec![
                    // The kernel's own areas: a hole at 0x1000..0x2000.
                    RegionCap::sparse_mmap(&[
                        SparseArea::new(0, 0x1000),
                        SparseArea::new(0x2000, 0x2000),
                    ]),
                    RegionCap {
                        id: CAP_MSIX_MAPPABLE,
                        version: 1,
                        body: Vec::new(),
                    },
                ],
            },
            2 => RegionInfo {
                flags: REG_READ | REG_WRITE | REG_MMAP,
                size: BAR2_SIZE,
                offset: BAR2_OFF,
                caps: Vec::new(),
            },
            CONFIG => RegionInfo {
                flags: REG_READ | REG_WRITE,
                size: 256,
                offset: 7 << 40,
                caps: Vec::new(),
            },
            1 | 3..=8 => RegionInfo {
                offset: u64::from(index) << 40,
                ..Default::default()
            },
            _ => return Err(einval()),
        })
    }

    fn region_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.memfd.as_fd())
    }

    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if index == CONFIG {
            let s = self.state.lock().unwrap();
            buf.copy_from_slice(&s.config[config_range(&s.config, offset, buf.len())?]);
            return Ok(());
        }
        let at = self.bar_at(index, offset, buf.len())?;
        self.memfd
            .read_exact_at(buf, at)
            .map_err(|e| Errno::from_io(&e, "fake read"))
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if index == CONFIG {
            let mut s = self.state.lock().unwrap();
            let range = config_range(&s.config, offset, data.len())?;
            s.config[range].copy_from_slice(data);
            return Ok(());
        }
        let at = self.bar_at(index, offset, data.len())?;
        self.memfd
            .write_all_at(data, at)
            .map_err(|e| Errno::from_io(&e, "fake write"))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, Errno> {
        Ok(match index {
            0 => IrqInfo {
                flags: IRQ_EVENTFD | IRQ_MASKABLE | IRQ_AUTOMASKED,
                count: 1,
            },
            1 => IrqInfo {
                flags: IRQ_EVENTFD | IRQ_NORESIZE,
                count: 1,
            },
            MSIX => IrqInfo {
                flags: IRQ_EVENTFD | IRQ_NORESIZE,
                count: 4,
            },
            3 | 4 => IrqInfo {
                flags: IRQ_EVENTFD,
                count: 1,
            },
            _ => return Err(einval()),
        })
    }

    fn set_irqs(&self, set: &IrqSet<'_>, fds: &[RawFd]) -> Result<(), Errno> {
        let fds = fds
            .iter()
            .map(|&fd| {
                (fd >= 0).then(|| {
                    // SAFETY: the server guarantees the fd is open for the call.
                    unsafe { BorrowedFd::borrow_raw(fd) }
                        .try_clone_to_owned()
                        .unwrap()
                })
            })
            .collect();
        self.state.lock().unwrap().irq_calls.push(IrqCall {
            index: set.index,
            flags: set.flags,
            start: set.start,
            count: set.count,
            fds,
            data: set.data.to_vec(),
        });
        Ok(())
    }

    fn reset(&self) -> Result<(), Errno> {
        self.state.lock().unwrap().resets += 1;
        Ok(())
    }
}

// ---- server fixture ----
struct Server {
    path: PathBuf,
    _dir: TempDir,
    stop: StopSignal,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    state: Arc<Mutex<FakeState>>,
}

/// DMA maps must lie below `GUEST_RAM_END`.
fn guest_ram_check() -> DmaCheck {
    Arc::new(|gpa, len| gpa.checked_add(len).is_some_and(|e| e <= GUEST_RAM_END))
}

/// A fresh directory for one test's sockets (`kind` names it), removed when dropped.
fn test_dir(kind: &str) -> TempDir {
    TempDir::named(&format!("vfio-user-{kind}"))
}

impl Server {
    fn start() -> Server {
        Server::start_with(|s| s.name("test"))
    }

    /// A server set up by `setup` (hooks) before it serves.
    fn start_with(setup: impl FnOnce(DeviceServer) -> DeviceServer) -> Server {
        let dir = test_dir("test");
        let path = dir.join("dev.sock");
        let (fake, state) = Fake::new();
        let stop = StopSignal::new().unwrap();
        let server = setup(DeviceServer::new(
            Box::new(fake),
            guest_ram_check(),
            stop.clone(),
        ));
        let listener = bind_socket(&path).unwrap();
        let thread = std::thread::spawn(move || server.serve(listener).map(drop));
        Server {
            path,
            _dir: dir,
            stop,
            thread: Some(thread),
            state,
        }
    }

    fn connect(&self) -> Client {
        connect_to(&self.path)
    }

    /// A connected client past VERSION.
    fn client(&self) -> Client {
        let mut c = self.connect();
        version(&mut c, r#"{"capabilities":{"max_msg_fds":16}}"#).unwrap();
        c
    }

    fn wait_for(&self, what: &str, f: impl Fn(&FakeState) -> bool) {
        let t = Instant::now();
        while !f(&self.state.lock().unwrap()) {
            assert!(t.elapsed() < TIMEOUT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- the client (the crate's, written from the protocol document) ----

/// A call's outcome, for the checks that expect the server to refuse it.
trait Refused {
    /// Whether the server answered with an error reply (an errno). A broken connection or a
    /// malformed reply is no refusal: it fails the test.
    fn refused(self) -> bool;
}

impl<T> Refused for Res<T> {
    fn refused(self) -> bool {
        match self {
            Ok(_) => false,
            Err(CallError::Errno(_)) => true,
            Err(CallError::Broken(why)) => panic!("expected an error reply: {why}"),
        }
    }
}

/// VERSION with `json` as the client's capabilities: the server's capabilities, after checking
/// that it speaks protocol 0.0.
fn version(c: &mut Client, json: &str) -> Res<serde_json::Value> {
    let (major, minor, caps) = c.version(json)?;
    assert_eq!((major, minor), (0, 0), "protocol version 0.0");
    Ok(caps)
}

/// A client connected to the socket at `path` (not yet past VERSION).
fn connect_to(path: &std::path::Path) -> Client {
    Client::connect(path, TIMEOUT).unwrap()
}

/// MSI-X vector 0 signals `e` (what a VMM does first).
fn trigger_msix(c: &mut Client, e: &EventFd) {
    let fl = SET_DATA_EVENTFD | SET_ACTION_TRIGGER;
    c.set_irqs(fl, MSIX, 0, 1, &[e.as_raw_fd()], &[]).unwrap();
}

/// A parsed capability chain: (id, version, offset of the cap in the reply).
fn caps(reply: &[u8]) -> Vec<(u16, u16, usize)> {
    let mut out = Vec::new();
    if le32(reply, 4) & REG_CAPS == 0 {
        return out;
    }
    let mut off = le32(reply, 12) as usize;
    while off != 0 {
        assert!(off >= 32 && off + 8 <= reply.len(), "cap at {off}");
        out.push((le16(reply, off), le16(reply, off + 2), off));
        let next = le32(reply, off + 4) as usize;
        assert!(next == 0 || next > off, "cap chain goes backwards");
        off = next;
    }
    out
}

fn sparse_areas(reply: &[u8], off: usize) -> Vec<(u64, u64)> {
    let n = le32(reply, off + 8) as usize;
    (0..n)
        .map(|i| {
            (
                le64(reply, off + 16 + 16 * i),
                le64(reply, off + 24 + 16 * i),
            )
        })
        .collect()
}

/// Gets a region's info the way a VMM does: bare argsz first, then the size it was told.
fn region_info_two_pass(c: &mut Client, index: u32) -> (Vec<u8>, Vec<OwnedFd>) {
    let (first, fds) = c.region_info_raw(index, 32).unwrap();
    assert_eq!(first.len(), 32, "the bare answer is just the struct");
    let needed = le32(&first, 0);
    if needed == 32 {
        return (first, fds);
    }
    assert!(fds.is_empty(), "no fd with the bare answer");
    assert_eq!(le32(&first, 4) & REG_CAPS, 0, "no CAPS flag without caps");
    let (full, fds) = c.region_info_raw(index, needed).unwrap();
    assert_eq!(full.len(), needed as usize);
    (full, fds)
}

/// What `len` bytes at `offset` of `fd` hold, read through a shared mapping, which must also
/// take a write.
fn mmap_bytes(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Vec<u8> {
    use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};
    let file = File::from(fd.try_clone_to_owned().unwrap());
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len).unwrap();
    let bytes = map.as_volatile_slice();
    let mut out = vec![0u8; len];
    bytes.copy_to(&mut out[..]);
    bytes.write_obj(0xa5u8, 0).unwrap();
    out
}

// ---- the tests ----

#[test]
fn version_negotiation_advertises_capabilities() {
    let s = Server::start();
    let mut c = s.connect();
    let caps = version(&mut c, r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":1048576},"write_multiple":true}}"#)
        .unwrap();
    let c0 = &caps["capabilities"];
    assert!(c0["max_msg_fds"].as_u64().unwrap() >= 16);
    assert_eq!(c0["max_data_xfer_size"], 1 << 20);
    assert_eq!(c0["pgsizes"], 4096);
    assert!(c0["max_dma_maps"].as_u64().unwrap() > 0);
    assert!(c0.get("migration").is_none(), "no migration");
    assert!(c0.get("twin_socket").is_none());
    assert_eq!(c0["write_multiple"], true);
    // A second VERSION is refused.
    assert!(version(&mut c, "{}").refused());

    // A client that does not offer write_multiple is not offered it.
    drop(c);
    let mut c = s.connect();
    let caps = version(&mut c, r#"{"capabilities":{}}"#).unwrap();
    assert!(caps["capabilities"].get("write_multiple").is_none());
    // And one with no capabilities at all is fine too.
    drop(c);
    let mut c = s.connect();
    let p = P::default().u32(0);
    assert!(c.call(VERSION, &p.0, &[]).is_ok());
}

#[test]
fn unsupported_major_version_is_refused_and_closed() {
    let s = Server::start();
    let mut c = s.connect();
    let p = P::default()
        .bytes(&1u16.to_ne_bytes())
        .bytes(&0u16.to_ne_bytes());
    assert!(c.call(VERSION, &p.0, &[]).refused());
    assert!(c.closed());
}

#[test]
fn commands_before_version_are_refused() {
    let s = Server::start();
    let mut c = s.connect();
    assert!(c.info().refused());
    version(&mut c, "{}").unwrap();
    assert!(c.info().is_ok());
}

#[test]
fn device_info() {
    let s = Server::start();
    let mut c = s.client();
    let (argsz, flags, regions, irqs) = c.info().unwrap();
    assert_eq!((argsz, flags, regions, irqs), (16, 3, 9, 5));
}

#[test]
fn region_info_two_pass_with_sparse_mmap_and_fd() {
    let s = Server::start();
    let mut c = s.client();

    let (bar0, fds) = region_info_two_pass(&mut c, 0);
    let flags = le32(&bar0, 4);
    assert_eq!(flags & (REG_READ | REG_WRITE | REG_MMAP | REG_CAPS), 15);
    assert_eq!(le32(&bar0, 8), 0, "index");
    assert_eq!(le64(&bar0, 16), BAR0_SIZE);
    let offset = le64(&bar0, 24);
    assert_eq!(offset, BAR0_OFF);
    let chain = caps(&bar0);
    assert!(
        chain.iter().all(|c| c.0 != CAP_MSIX_MAPPABLE),
        "MSIX_MAPPABLE must be withheld: {chain:?}"
    );
    let sparse = chain
        .iter()
        .find(|c| c.0 == CAP_SPARSE)
        .expect("sparse cap");
    assert_eq!(sparse.1, 1, "sparse cap version");
    let areas = sparse_areas(&bar0, sparse.2);
    assert_eq!(
        areas,
        vec![(0, 0x1000), (0x2000, 0x2000)],
        "the kernel's areas"
    );
    assert_eq!(fds.len(), 1, "the region fd comes with the full answer");

    // Map each area the way QEMU does, (fd, region.offset + area.offset), and see the fake's
    // bytes; a write through the mapping is seen by the device.
    for (aoff, asize) in areas {
        let got = mmap_bytes(fds[0].as_fd(), offset + aoff, asize as usize);
        let want: Vec<u8> = (aoff..aoff + asize).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(got, want, "area at {aoff:#x}");
        assert_eq!(c.read(0, aoff, 1).unwrap(), vec![0xa5]);
    }

    // A mappable region without kernel areas gets one area covering it.
    let (bar2, fds) = region_info_two_pass(&mut c, 2);
    let chain = caps(&bar2);
    assert_eq!(chain.len(), 1);
    assert_eq!(sparse_areas(&bar2, chain[0].2), vec![(0, BAR2_SIZE)]);
    assert_eq!(fds.len(), 1);

    // Config space: not mappable, no caps, no fd, answered in one pass.
    let (cfg, fds) = c.region_info_raw(CONFIG, 32).unwrap();
    assert_eq!(le32(&cfg, 0), 32);
    assert_eq!(le32(&cfg, 4), REG_READ | REG_WRITE);
    assert_eq!(le64(&cfg, 16), 256);
    assert_eq!(le64(&cfg, 24), 7 << 40);
    assert!(fds.is_empty());

    // A generous argsz is fine; an index past num_regions and a too-small argsz are not.
    let (big, fds) = c.region_info_raw(0, 4096).unwrap();
    assert_eq!(big, bar0);
    assert_eq!(fds.len(), 1);
    assert!(c.region_info_raw(9, 32).refused());
    assert!(c.region_info_raw(0, 16).refused());
    // GET_REGION_IO_FDS is not offered.
    let p = P::default().u32(32).u32(0).u32(0).u32(0);
    assert!(c.call(GET_REGION_IO_FDS, &p.0, &[]).refused());
}

#[test]
fn region_read_and_write() {
    let s = Server::start();
    let mut c = s.client();
    assert_eq!(c.read(CONFIG, 0, 4).unwrap(), vec![0x34, 0x12, 0xe8, 0x11]);
    c.write(CONFIG, 4, &[0x06, 0x01]).unwrap();
    assert_eq!(s.state.lock().unwrap().config[4..6], [0x06, 0x01]);
    assert_eq!(c.read(CONFIG, 4, 2).unwrap(), vec![0x06, 0x01]);
    // BAR through the socket.
    c.write(0, 0x10, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    assert_eq!(c.read(0, 0x10, 8).unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    // Out of the region, a region that does not exist, more than max_data_xfer_size.
    assert!(c.read(CONFIG, 250, 8).refused());
    assert!(c.read(20, 0, 4).refused());
    assert!(c.read(0, 0, (1 << 20) + 1).refused());
    assert!(c.write(CONFIG, 255, &[0, 0]).refused());
    // Still serving.
    assert_eq!(c.read(CONFIG, 0, 2).unwrap(), vec![0x34, 0x12]);
}

#[test]
fn region_write_multi() {
    let s = Server::start();
    let mut c = s.connect();
    version(&mut c, r#"{"capabilities":{"write_multiple":true}}"#).unwrap();
    let mut p = P::default().u64(2);
    p = p
        .u64(8)
        .u32(CONFIG)
        .u32(2)
        .bytes(&[0xaa, 0xbb, 0, 0, 0, 0, 0, 0]);
    p = p.u64(0x20).u32(0).u32(4).bytes(&[9, 8, 7, 6, 0, 0, 0, 0]);
    let (b, _) = c.call(WRITE_MULTI, &p.0, &[]).unwrap();
    assert_eq!(le64(&b, 0), 2);
    assert_eq!(c.read(CONFIG, 8, 2).unwrap(), vec![0xaa, 0xbb]);
    assert_eq!(c.read(0, 0x20, 4).unwrap(), vec![9, 8, 7, 6]);
    // QEMU sends it with no-reply: nothing comes back, the next reply is the next command's.
    let p = P::default()
        .u64(1)
        .u64(10)
        .u32(CONFIG)
        .u32(1)
        .bytes(&[0x5a, 0, 0, 0, 0, 0, 0, 0]);
    c.send(WRITE_MULTI, &p.0, &[], F_NO_REPLY).unwrap();
    assert_eq!(c.read(CONFIG, 10, 1).unwrap(), vec![0x5a]);
    // wr_cnt disagreeing with the size.
    let p = P::default().u64(3).u64(0).u32(CONFIG).u32(1).u64(0);
    assert!(c.call(WRITE_MULTI, &p.0, &[]).refused());
}

#[test]
fn irq_info_and_set_irqs_with_eventfds() {
    let s = Server::start();
    let mut c = s.client();
    let p = P::default().u32(16).u32(0).u32(MSIX).u32(0);
    let (b, _) = c.call(GET_IRQ_INFO, &p.0, &[]).unwrap();
    assert_eq!(
        (le32(&b, 0), le32(&b, 4), le32(&b, 8), le32(&b, 12)),
        (16, IRQ_EVENTFD | IRQ_NORESIZE, MSIX, 4)
    );
    let p = P::default().u32(16).u32(0).u32(5).u32(0);
    assert!(
        c.call(GET_IRQ_INFO, &p.0, &[]).refused(),
        "index past num_irqs"
    );

    // MSI-X vectors 0 and 1 with eventfds, vector 2 without (count with no fds), as QEMU
    // sends them.
    let e0 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let fl = SET_DATA_EVENTFD | SET_ACTION_TRIGGER;
    c.set_irqs(fl, MSIX, 0, 2, &[e0.as_raw_fd(), e1.as_raw_fd()], &[])
        .unwrap();
    c.set_irqs(fl, MSIX, 2, 1, &[], &[]).unwrap();
    {
        let st = s.state.lock().unwrap();
        let a = &st.irq_calls[0];
        assert_eq!((a.index, a.flags, a.start, a.count), (MSIX, fl, 0, 2));
        assert!(a.fds.iter().all(Option::is_some));
        // The device got our very eventfds: signalling its copies wakes ours.
        for (fd, ours) in a.fds.iter().zip([&e0, &e1]) {
            let mut f = File::from(fd.as_ref().unwrap().try_clone().unwrap());
            f.write_all(&1u64.to_ne_bytes()).unwrap();
            assert_eq!(ours.read().unwrap(), 1);
        }
        let b = &st.irq_calls[1];
        assert_eq!((b.index, b.start, b.count), (MSIX, 2, 1));
        assert!(b.fds.iter().all(Option::is_none), "no fd means -1");
    }
    // DATA_BOOL carries its bools; DATA_NONE nothing.
    c.set_irqs(SET_DATA_BOOL | SET_ACTION_TRIGGER, MSIX, 0, 2, &[], &[1, 0])
        .unwrap();
    c.set_irqs(SET_DATA_NONE | SET_ACTION_TRIGGER, 0, 0, 1, &[], &[])
        .unwrap();
    {
        let st = s.state.lock().unwrap();
        assert_eq!(st.irq_calls[2].data, vec![1, 0]);
        assert_eq!(st.irq_calls[3].flags, SET_DATA_NONE | SET_ACTION_TRIGGER);
    }
    // Refused: fd count differing from count, fds without DATA_EVENTFD, two data types,
    // bools missing, an index past num_irqs, an absurd count.
    assert!(c.set_irqs(fl, MSIX, 0, 2, &[e0.as_raw_fd()], &[]).refused());
    assert!(
        c.set_irqs(
            SET_DATA_NONE | SET_ACTION_TRIGGER,
            MSIX,
            0,
            1,
            &[e0.as_raw_fd()],
            &[]
        )
        .refused()
    );
    assert!(
        c.set_irqs(
            SET_DATA_NONE | SET_DATA_BOOL | SET_ACTION_TRIGGER,
            MSIX,
            0,
            1,
            &[],
            &[1]
        )
        .refused()
    );
    assert!(
        c.set_irqs(SET_DATA_BOOL | SET_ACTION_TRIGGER, MSIX, 0, 4, &[], &[1])
            .refused()
    );
    assert!(c.set_irqs(fl, 7, 0, 1, &[], &[]).refused());
    assert!(c.set_irqs(fl, MSIX, 0, u32::MAX, &[], &[]).refused());
    assert_eq!(
        s.state.lock().unwrap().irq_calls.len(),
        4,
        "refused calls never reach the device"
    );
    // Up to 16 fds in one message.
    let many: Vec<EventFd> = (0..16).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<RawFd> = many.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(fl, MSIX, 0, 16, &raw, &[]).unwrap();
    assert_eq!(s.state.lock().unwrap().irq_calls[4].fds.len(), 16);
}

#[test]
fn reset_is_forwarded() {
    let s = Server::start();
    let mut c = s.client();
    assert!(c.call(RESET, &[], &[]).unwrap().0.is_empty());
    assert_eq!(s.state.lock().unwrap().resets, 1);
}

#[test]
fn dma_map_is_checked_against_guest_ram_and_recorded() {
    let s = Server::start();
    let mut c = s.client();
    let ram = memfd("guest-ram", 0x10_0000);
    let fd = Some(ram.as_raw_fd());
    // Inside guest RAM, with the memfd.
    c.dma_map(3, 0, 0x10_0000, 0x10_0000, fd).unwrap();
    // Outside guest RAM: refused with an errno.
    let e = c.dma_map(3, 0, GUEST_RAM_END, 0x1000, fd).unwrap_err();
    assert_eq!(e, CallError::Errno(libc::EFAULT as u32));
    let e = c
        .dma_map(3, 0, GUEST_RAM_END - 0x1000, 0x2000, fd)
        .unwrap_err();
    assert_eq!(e, CallError::Errno(libc::EFAULT as u32));
    // Without an fd (ROM, a peer BAR), anywhere: accepted and recorded.
    c.dma_map(1, 0, 0xfebc_0000_0000, 0x4000, None).unwrap();
    // Overlaps are refused.
    assert_eq!(
        c.dma_map(3, 0, 0x18_0000, 0x1000, fd).unwrap_err(),
        CallError::Errno(libc::EEXIST as u32)
    );
    assert_eq!(
        c.dma_map(1, 0, 0xfebc_0000_2000, 0x1000, None).unwrap_err(),
        CallError::Errno(libc::EEXIST as u32)
    );
    // Malformed: size 0, unaligned, unknown flags, two fds.
    assert!(c.dma_map(3, 0, 0x40_0000, 0, fd).refused());
    assert!(c.dma_map(3, 0, 0x40_0800, 0x1000, fd).refused());
    assert!(c.dma_map(0x100, 0, 0x40_0000, 0x1000, fd).refused());
    let p = P::default()
        .u32(32)
        .u32(3)
        .u64(0)
        .u64(0x40_0000)
        .u64(0x1000);
    assert!(
        c.call(DMA_MAP, &p.0, &[ram.as_raw_fd(), ram.as_raw_fd()])
            .refused()
    );
    // A map with no-reply: no answer, but recorded (so mapping it again overlaps).
    let p = P::default()
        .u32(32)
        .u32(3)
        .u64(0)
        .u64(0x60_0000)
        .u64(0x1000);
    c.send(DMA_MAP, &p.0, &[ram.as_raw_fd()], F_NO_REPLY)
        .unwrap();
    assert_eq!(
        c.dma_map(3, 0, 0x60_0000, 0x1000, fd).unwrap_err(),
        CallError::Errno(libc::EEXIST as u32)
    );

    // UNMAP must name a map exactly; the reply echoes the entry.
    assert!(c.dma_unmap(0, 0x10_0000, 0x1000).refused());
    let b = c.dma_unmap(0, 0x10_0000, 0x10_0000).unwrap();
    assert_eq!((le64(&b, 8), le64(&b, 16)), (0x10_0000, 0x10_0000));
    assert!(
        c.dma_unmap(0, 0x10_0000, 0x10_0000).refused(),
        "already gone"
    );
    c.dma_map(3, 0, 0x10_0000, 0x1000, fd).unwrap();
    // Unmap-all (QEMU's VFIO_DMA_UNMAP_FLAG_ALL) drops everything.
    c.dma_unmap(2, 0, 0).unwrap();
    c.dma_map(1, 0, 0xfebc_0000_0000, 0x4000, None).unwrap();
    // Dirty bitmaps are not offered.
    assert!(c.dma_unmap(1, 0xfebc_0000_0000, 0x4000).refused());
}

#[test]
fn malformed_messages_get_errors_and_serving_continues() {
    let s = Server::start();
    let mut c = s.client();

    // A header whose size is smaller than a header.
    c.send_raw(&hdr_bytes(100, GET_INFO, 8, 0), &[]).unwrap();
    let (h, body, _) = c.recv().unwrap();
    assert_eq!(h.id, 100);
    assert!(h.flags & F_ERROR != 0 && h.error != 0 && body.is_empty());

    // Sizes that lie about the payload: too short for the command's struct.
    let p = P::default().u32(32).u32(0);
    assert!(c.call(GET_REGION_INFO, &p.0, &[]).refused());
    assert!(c.call(GET_INFO, &[0u8; 4], &[]).refused());
    assert!(c.call(DMA_MAP, &[0u8; 16], &[]).refused());
    assert!(c.call(SET_IRQS, &[0u8; 12], &[]).refused());
    // A REGION_WRITE whose count says 100 but carries 4 bytes.
    let p = P::default()
        .u64(0)
        .u32(CONFIG)
        .u32(100)
        .bytes(&[1, 2, 3, 4]);
    assert!(c.call(REGION_WRITE, &p.0, &[]).refused());
    // argsz smaller than the struct.
    let p = P::default().u32(8).u32(0).u32(0).u32(0);
    assert!(c.call(GET_INFO, &p.0, &[]).refused());

    // Unknown and wrong-direction commands.
    assert!(c.call(99, &[], &[]).refused());
    assert!(c.call(0xffff, &[1, 2, 3], &[]).refused());
    assert!(
        c.call(11, &[0u8; 16], &[]).refused(),
        "DMA_READ is server-to-client"
    );
    // An fd with a command that takes none is refused (and closed).
    let e = EventFd::new(0).unwrap();
    let p = P::default().u32(16).u32(0).u32(0).u32(0);
    assert!(c.call(GET_INFO, &p.0, &[e.as_raw_fd()]).refused());
    // A message of an unknown type.
    let mut m = hdr_bytes(200, GET_INFO, 32, 7);
    m.extend_from_slice(&p.0);
    c.send_raw(&m, &[]).unwrap();
    let (h, _, _) = c.recv().unwrap();
    assert!(h.id == 200 && h.flags & F_ERROR != 0 && h.error != 0);
    // A reply from the client answers nothing: ignored, no reply to it.
    let mut m = hdr_bytes(201, GET_INFO, 32, T_REPLY);
    m.extend_from_slice(&p.0);
    c.send_raw(&m, &[]).unwrap();

    // Still serving, in order.
    assert_eq!(c.info().unwrap().2, 9);

    // A header that claims more than any message may be: an error, then the stream is
    // abandoned; the server goes on to accept the next client.
    c.send_raw(&hdr_bytes(300, REGION_WRITE, u32::MAX, 0), &[])
        .unwrap();
    let (h, _, _) = c.recv().unwrap();
    assert!(h.id == 300 && h.flags & F_ERROR != 0 && h.error != 0);
    assert!(c.closed());
    let mut c = s.client();
    assert_eq!(c.info().unwrap().2, 9);

    // A client that dies mid-header or mid-message does not hurt the server.
    c.send_raw(&[1, 2, 3], &[]).unwrap();
    drop(c);
    let mut c = s.connect();
    let mut m = hdr_bytes(1, VERSION, 64, 0);
    m.extend_from_slice(&[0, 0, 0, 0]);
    c.send_raw(&m, &[]).unwrap();
    drop(c);
    let mut c = s.client();
    assert_eq!(c.info().unwrap().2, 9);
}

#[test]
fn disconnect_disables_irqs_resets_and_drops_dma_maps() {
    let s = Server::start();
    let mut c = s.client();
    let ram = memfd("guest-ram", 0x1000);
    c.dma_map(3, 0, 0x1000, 0x1000, Some(ram.as_raw_fd()))
        .unwrap();
    let e = EventFd::new(0).unwrap();
    trigger_msix(&mut c, &e);
    let before = s.state.lock().unwrap().irq_calls.len();
    drop(c);
    s.wait_for("reset after disconnect", |st| st.resets == 1);
    {
        let st = s.state.lock().unwrap();
        let disabled: Vec<u32> = st.irq_calls[before..]
            .iter()
            .filter(|k| {
                k.flags == SET_DATA_NONE | SET_ACTION_TRIGGER && k.start == 0 && k.count == 0
            })
            .map(|k| k.index)
            .collect();
        assert_eq!(
            disabled,
            vec![MSIX],
            "the IRQ index the client set is disabled"
        );
    }
    // The next client is served, and the old client's maps are gone.
    let mut c = s.client();
    c.dma_map(3, 0, 0x1000, 0x1000, Some(ram.as_raw_fd()))
        .unwrap();
    assert_eq!(c.info().unwrap().2, 9);
}

#[test]
fn disconnect_disables_only_the_irq_indexes_the_client_set_and_never_the_req_index() {
    let s = Server::start();
    let mut c = s.client();
    let e = EventFd::new(0).unwrap();
    let fl = SET_DATA_EVENTFD | SET_ACTION_TRIGGER;
    c.set_irqs(fl, INTX, 0, 1, &[e.as_raw_fd()], &[]).unwrap();
    c.set_irqs(fl, MSIX, 0, 1, &[e.as_raw_fd()], &[]).unwrap();
    let before = s.state.lock().unwrap().irq_calls.len();
    drop(c);
    s.wait_for("reset after disconnect", |st| st.resets == 1);
    let st = s.state.lock().unwrap();
    let touched: Vec<(u32, u32, u32, u32)> = st.irq_calls[before..]
        .iter()
        .map(|k| (k.index, k.flags, k.start, k.count))
        .collect();
    let off = SET_DATA_NONE | SET_ACTION_TRIGGER;
    assert_eq!(touched, vec![(INTX, off, 0, 0), (MSIX, off, 0, 0)]);
    assert!(
        st.irq_calls.iter().all(|k| k.index != REQ),
        "the REQ index (the daemon's unplug watcher) was touched: {:?}",
        st.irq_calls.iter().map(|k| k.index).collect::<Vec<_>>()
    );
}

#[test]
fn the_req_irq_index_is_the_daemons_and_a_client_can_neither_query_nor_set_it() {
    let s = Server::start();
    let mut c = s.client();
    let p = P::default().u32(16).u32(0).u32(REQ).u32(0);
    assert_eq!(
        c.call(GET_IRQ_INFO, &p.0, &[]).unwrap_err(),
        CallError::Errno(libc::EPERM as u32)
    );
    let e = EventFd::new(0).unwrap();
    for (flags, fds, data) in [
        (
            SET_DATA_EVENTFD | SET_ACTION_TRIGGER,
            vec![e.as_raw_fd()],
            vec![],
        ),
        (SET_DATA_EVENTFD | SET_ACTION_TRIGGER, vec![], vec![]),
        (SET_DATA_BOOL | SET_ACTION_TRIGGER, vec![], vec![1]),
        (SET_DATA_NONE | SET_ACTION_TRIGGER, vec![], vec![]),
    ] {
        let count = if flags & SET_DATA_NONE != 0 { 0 } else { 1 };
        assert_eq!(
            c.set_irqs(flags, REQ, 0, count, &fds, &data).unwrap_err(),
            CallError::Errno(libc::EPERM as u32),
            "flags {flags:#x}"
        );
    }
    // The connection goes on: the other indexes still work.
    trigger_msix(&mut c, &e);
    drop(c);
    s.wait_for("reset after disconnect", |st| st.resets == 1);
    assert!(
        s.state
            .lock()
            .unwrap()
            .irq_calls
            .iter()
            .all(|k| k.index != REQ),
        "a client reached the REQ index"
    );
}

#[test]
fn disconnect_from_a_device_without_reset_method_clears_bus_mastering_instead() {
    let s = Server::start();
    let mut c = s.client();
    // The client enables memory decoding and bus mastering.
    c.write(CONFIG, 4, &0x0006u16.to_le_bytes()).unwrap();
    s.state.lock().unwrap().no_reset = true;
    drop(c);
    s.wait_for("bus mastering cleared", |st| st.config[4] & 0x04 == 0);
    let st = s.state.lock().unwrap();
    assert_eq!(st.resets, 0, "no VFIO_DEVICE_RESET without the RESET flag");
    assert_eq!(st.config[4], 0x02, "memory decoding is left alone");
}

#[test]
fn stop_ends_the_server_with_cleanup() {
    let mut s = Server::start();
    let mut c = s.client();
    assert!(c.info().is_ok());
    s.stop.stop();
    let r = s.thread.take().unwrap().join().unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(s.state.lock().unwrap().resets, 1);
    assert!(c.closed());
}

#[test]
fn a_stale_socket_file_is_replaced_and_other_files_are_not() {
    let dir = test_dir("stale");
    let path = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let l = vhost_user_iommu::vfio_user::bind_socket(&path).unwrap();
    drop(l);
    let file = dir.join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(vhost_user_iommu::vfio_user::bind_socket(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn a_served_socket_is_never_taken_over_by_a_second_server() {
    let s = Server::start();
    let (fake, _) = Fake::new();
    let dma_check: DmaCheck = Arc::new(|_, _| true);
    let stop = StopSignal::new().unwrap();
    let second = spawn_device_server("second", &s.path, Box::new(fake), dma_check, stop.clone());
    let e = second.expect_err("a second server on a live socket must be refused");
    assert!(e.to_string().contains("in use by a running daemon"), "{e}");
    assert!(vhost_user_iommu::vfio_user::bind_socket(&s.path).is_err());
    // The first server still owns the path.
    let mut c = s.client();
    assert_eq!(c.info().unwrap().2, 9);
}

#[test]
fn the_socket_is_created_mode_0660() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let mode = std::fs::metadata(&s.path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660);
}

#[test]
fn device_server_hooks_and_recorded_dma_maps() {
    use vhost_user_iommu::vfio_user::{DeviceServer, bind_socket};
    let dir = TempDir::named("vfio-user-hooks");
    let path = dir.join("dev.sock");
    let (fake, state) = Fake::new();
    let stop = StopSignal::new().unwrap();
    let events = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let (e1, e2) = (events.clone(), events.clone());
    let server = DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone())
        .name("hooks")
        .on_connect(move || e1.lock().unwrap().push("connect"))
        .on_disconnect(move || e2.lock().unwrap().push("disconnect"));
    let maps = server.dma_maps();
    let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();

    let mut c = connect_to(&path);
    version(&mut c, "{}").unwrap();
    let ram = memfd("guest-ram", 0x2000);
    c.dma_map(3, 0x1000, 0x10_0000, 0x1000, Some(ram.as_raw_fd()))
        .unwrap();
    c.dma_map(1, 0, 0xc000_0000, 0x1000, None).unwrap();
    let snap = maps.snapshot();
    assert_eq!(snap.len(), 2);
    assert_eq!(
        (snap[0].address, snap[0].size, snap[0].offset, snap[0].flags),
        (0x10_0000, 0x1000, 0x1000, 3)
    );
    use std::os::unix::fs::MetadataExt;
    let md = ram.metadata().unwrap();
    assert_eq!(snap[0].file_id, Some((md.dev(), md.ino())));
    assert_eq!(snap[1].file_id, None);
    drop(c);
    let t = Instant::now();
    while events.lock().unwrap().len() < 2 {
        assert!(t.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*events.lock().unwrap(), vec!["connect", "disconnect"]);
    assert!(maps.is_empty());
    assert_eq!(
        state.lock().unwrap().resets,
        1,
        "cleanup ran before the hook"
    );
    stop.stop();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_removed_device_is_dropped_clients_are_refused_until_it_is_put_back() {
    use vhost_user_iommu::vfio_user::{DeviceServer, bind_socket};
    let dir = TempDir::named("vfio-user-slot");
    let path = dir.join("dev.sock");
    let (fake, state) = Fake::new();
    let stop = StopSignal::new().unwrap();
    let server =
        DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone()).name("slot");
    let slot = server.slot();
    let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();
    let connect = || connect_to(&path);
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < TIMEOUT, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    // Host unplug while a client is connected: the connection ends, the device is dropped.
    let mut c = connect();
    version(&mut c, "{}").unwrap();
    slot.remove();
    assert!(c.closed(), "the connection is shut down");
    wait("the device is dropped", &|| Arc::strong_count(&state) == 1);
    assert!(!slot.is_present());
    assert_eq!(
        state.lock().unwrap().resets,
        1,
        "cleanup ran before the drop"
    );

    // While it is gone, clients are refused with ENODEV.
    let mut c = connect();
    assert_eq!(
        version(&mut c, "{}").unwrap_err(),
        CallError::Errno(libc::ENODEV as u32)
    );

    // Replug: served again.
    let (fake, state) = Fake::new();
    slot.put(Box::new(fake));
    let mut c = connect();
    version(&mut c, "{}").unwrap();
    drop(c);
    // Removed while idle (or just after the cleanup): dropped.
    wait("the client is gone", &|| state.lock().unwrap().resets == 1);
    slot.remove();
    wait("the idle device is dropped", &|| {
        Arc::strong_count(&state) == 1
    });
    stop.stop();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_client_that_is_not_the_configured_vmm_is_refused_before_anything_is_read() {
    use vhost_user_iommu::peer::PeerPolicy;
    use vhost_user_iommu::vfio_user::{DeviceServer, bind_socket};
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let dir = TempDir::named("vfio-user-peer");
    for (policy, admitted) in [
        (
            PeerPolicy {
                uid: Some(uid.wrapping_add(1)),
                gid: None,
            },
            false,
        ),
        (
            PeerPolicy {
                uid: None,
                gid: Some(gid.wrapping_add(1)),
            },
            false,
        ),
        (
            PeerPolicy {
                uid: Some(uid),
                gid: Some(gid),
            },
            true,
        ),
    ] {
        let path = dir.join("dev.sock");
        let (fake, state) = Fake::new();
        let stop = StopSignal::new().unwrap();
        let connected = Arc::new(Mutex::new(0));
        let c2 = connected.clone();
        let server = DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone())
            .name("peer")
            .peers(policy)
            .on_connect(move || *c2.lock().unwrap() += 1);
        let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();
        let sock = UnixStream::connect(&path).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        if admitted {
            let mut c = Client::over(sock, 1);
            version(&mut c, "{}").unwrap();
        } else {
            // The server closes the connection without reading or answering anything (the
            // VERSION sent may even fail), and never serves it.
            use std::io::{Read, Write};
            let _ = (&sock).write_all(&hdr_bytes(1, 1, 16, 0));
            let mut b = [0u8; 1];
            match (&sock).read(&mut b) {
                Ok(0) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
                other => panic!("{policy:?}: expected the connection closed, got {other:?}"),
            }
            assert_eq!(
                *connected.lock().unwrap(),
                0,
                "{policy:?}: no connection hook"
            );
            assert_eq!(
                state.lock().unwrap().resets,
                0,
                "{policy:?}: device untouched"
            );
        }
        stop.stop();
        thread.join().unwrap().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn a_silent_or_stalled_client_gives_the_slot_back_after_the_message_timeout() {
    use vhost_user_iommu::vfio_user::{DeviceServer, bind_socket};
    let dir = TempDir::named("vfio-user-silent");
    let path = dir.join("dev.sock");
    let (fake, _state) = Fake::new();
    let stop = StopSignal::new().unwrap();
    let limit = Duration::from_millis(300);
    let server = DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone())
        .name("silent")
        .message_timeout(limit);
    let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();
    // A client that never sends anything, then one that stalls in the middle of a header.
    for stall in [&[][..], &hdr_bytes(1, 1, 16, 0)[..7]] {
        let hog = UnixStream::connect(&path).unwrap();
        use std::io::{Read, Write};
        (&hog).write_all(stall).unwrap();
        let t = Instant::now();
        hog.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut b = [0u8; 1];
        match (&hog).read(&mut b) {
            Ok(0) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
            other => panic!("stall {stall:?}: expected the connection closed, got {other:?}"),
        }
        let took = t.elapsed();
        assert!(
            took >= limit - Duration::from_millis(50) && took < TIMEOUT,
            "stall {stall:?}: closed after {took:?}"
        );
        // The slot is free again: the next client is served at once.
        let mut c = connect_to(&path);
        version(&mut c, "{}").unwrap();
        drop(c);
        drop(hog);
    }
    stop.stop();
    thread.join().unwrap().unwrap();
}

/// Disabling calls (DATA_NONE | ACTION_TRIGGER, no vectors) made since `from`, by IRQ index.
fn disabled_since(state: &Mutex<FakeState>, from: usize) -> Vec<u32> {
    state.lock().unwrap().irq_calls[from..]
        .iter()
        .filter(|k| k.flags == SET_DATA_NONE | SET_ACTION_TRIGGER && k.count == 0)
        .map(|k| k.index)
        .collect()
}

#[test]
fn a_server_handed_over_between_messages_goes_on_with_its_client_and_nothing_undone() {
    use vhost_user_iommu::vfio_user::{DeviceServer, ServerEnd, bind_socket};
    let dir = TempDir::named("vfio-user-handover");
    let path = dir.join("dev.sock");
    let (fake, state) = Fake::new();
    let stop = StopSignal::new().unwrap();
    // A short message timeout: a handed-over client that stays quiet longer is still served
    // (the timeout is for a new client's first message, not for an idle VMM).
    let quiet = Duration::from_millis(300);
    let server = DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone())
        .message_timeout(quiet);
    let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();
    let mut c = connect_to(&path);
    version(&mut c, "{}").unwrap();
    let ram = memfd("guest-ram", 0x2000);
    c.dma_map(3, 0, 0x10_0000, 0x2000, Some(ram.as_raw_fd()))
        .unwrap();
    let e = EventFd::new(0).unwrap();
    trigger_msix(&mut c, &e);
    let calls_before = state.lock().unwrap().irq_calls.len();

    // The handover is asked for while half a message is in the socket: the server hands over
    // without reading any of it (nothing is taken out of the socket before it is answered),
    // and the server that goes on answers it whole.
    let whole = {
        let mut m = hdr_bytes(c.take_id(), GET_INFO, 16 + 16, 0);
        m.extend_from_slice(&P::default().u32(16).u32(0).u32(0).u32(0).0);
        m
    };
    c.send_raw(&whole[..10], &[]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stop.hand_over();
    let ServerEnd::HandedOver(handed) = thread.join().unwrap().unwrap() else {
        panic!("the server stopped instead of handing over");
    };
    c.send_raw(&whole[10..], &[]).unwrap();
    let (stream, conn) = handed.connection.expect("its client");
    assert!(conn.negotiated);
    assert_eq!(conn.irqs_set, 1 << MSIX);
    assert_eq!(handed.server.dma_maps().len(), 1, "the DMA maps stay");
    assert_eq!(state.lock().unwrap().resets, 0, "nothing undone");
    assert!(
        disabled_since(&state, calls_before).is_empty(),
        "no IRQ disabled"
    );

    // The upgrade failed: the same server resumes in this process; the client goes on without
    // a new VERSION, and its DMA maps are still there (the same map again overlaps).
    stop.rearm();
    let thread = handed
        .server
        .spawn_resumed(handed.listener, Some((stream, conn)))
        .unwrap();
    let (h, body, _) = c.recv().unwrap();
    assert_eq!((h.cmd, h.flags & F_ERROR, body.len()), (GET_INFO, 0, 16));
    std::thread::sleep(quiet * 2);
    assert_eq!(c.info().unwrap().2, 9);
    assert!(
        c.dma_map(3, 0, 0x10_0000, 0x1000, Some(ram.as_raw_fd()))
            .refused(),
        "a map over the handed-over one is refused"
    );

    // The next daemon: a new server over the same device takes the listener, the connection
    // and the DMA maps as the upgrade state describes them.
    stop.hand_over();
    let ServerEnd::HandedOver(handed) = thread.join().unwrap().unwrap() else {
        panic!("the server stopped instead of handing over");
    };
    let maps = handed.server.dma_maps().snapshot();
    let (fake2, state2) = Fake::new();
    stop.rearm();
    let next = DeviceServer::new(Box::new(fake2), Arc::new(|_, _| true), stop.clone())
        .message_timeout(quiet);
    next.dma_maps().restore(maps);
    let thread = next
        .spawn_resumed(handed.listener, handed.connection)
        .unwrap();
    drop(handed.server);
    std::thread::sleep(quiet * 2);
    assert_eq!(c.info().unwrap().2, 9);
    assert!(
        c.dma_map(3, 0, 0x10_1000, 0x1000, Some(ram.as_raw_fd()))
            .refused(),
        "the next server knows the handed-over DMA maps"
    );
    // When the client leaves, the next server undoes what it set before the handover.
    drop(c);
    let t = Instant::now();
    while state2.lock().unwrap().resets == 0 {
        assert!(t.elapsed() < TIMEOUT, "no cleanup after the disconnect");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(disabled_since(&state2, 0), vec![MSIX]);
    // And a new client is served from the handed-over listener.
    let mut c = connect_to(&path);
    version(&mut c, "{}").unwrap();
    c.dma_map(3, 0, 0x10_0000, 0x2000, Some(ram.as_raw_fd()))
        .unwrap();
    drop(c);
    stop.stop();
    assert!(matches!(
        thread.join().unwrap().unwrap(),
        ServerEnd::Stopped
    ));
}

#[test]
fn the_trace_has_a_line_per_vfio_user_message_with_its_fields_and_errno() {
    use vhost_user_iommu::vfio_user::{DeviceServer, bind_socket};
    let dir = TempDir::named("vfio-user-trace");
    let (path, trace_path) = (dir.join("dev.sock"), dir.join("trace.jsonl"));
    let trace = Arc::new(vhost_user_iommu::trace::Tracer::off());
    let (fake, _state) = Fake::new();
    let stop = StopSignal::new().unwrap();
    let dma_check: DmaCheck =
        Arc::new(|gpa, len| gpa.checked_add(len).is_some_and(|e| e <= GUEST_RAM_END));
    let server = DeviceServer::new(Box::new(fake), dma_check, stop.clone())
        .name("nic0")
        .trace(trace.clone());
    let thread = server.spawn(bind_socket(&path).unwrap()).unwrap();
    let mut c = connect_to(&path);
    // Off: nothing is written.
    version(&mut c, "{}").unwrap();
    trace.start(&trace_path, 1 << 20).unwrap();
    let ram = memfd("guest-ram", 0x10_0000);
    c.dma_map(3, 0, 0x10_0000, 0x10_0000, Some(ram.as_raw_fd()))
        .unwrap();
    let e = c
        .dma_map(3, 0, GUEST_RAM_END, 0x1000, Some(ram.as_raw_fd()))
        .unwrap_err();
    assert_eq!(e, CallError::Errno(libc::EFAULT as u32));
    c.read(CONFIG, 0, 4).unwrap();
    c.dma_unmap(0, 0x10_0000, 0x10_0000).unwrap();
    trace.stop();
    let lines = vhost_user_iommu::testing::json_lines(&trace_path);
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["DMA_MAP", "DMA_MAP", "REGION_READ", "DMA_UNMAP"],
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["kind"] == "vfio-user" && l["device"] == "nic0")
    );
    assert!(lines.iter().all(|l| l["latency_ns"].as_u64().is_some()));
    assert_eq!(lines[0]["iova"], "0x100000");
    assert_eq!(lines[0]["size"], "0x100000");
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[1]["errno"], libc::EFAULT);
    assert_eq!(lines[2]["region"], CONFIG);
    assert_eq!(lines[2]["count"], 4);
    assert_eq!(lines[3]["iova"], "0x100000");
    stop.stop();
    thread.join().unwrap().unwrap();
}

// ---- crash restart: the message a killed daemon had in hand ----

/// What a daemon killed while it handled a message leaves, and a restarted server over it: the
/// message still first in the client's socket (sent by `send`), the journal's entry for it
/// (`found`, given the message's bytes), and the client's connection handed over negotiated,
/// with `maps` recorded.
struct AfterCrash {
    client: Client,
    /// The daemon's side of the connection, as the fd store keeps it.
    _daemon_side: UnixStream,
    stop: StopSignal,
    thread: Option<JoinHandle<std::io::Result<vhost_user_iommu::vfio_user::ServerEnd>>>,
    bars: File,
    maps: vhost_user_iommu::vfio_user::DmaMaps,
    _dir: TempDir,
}

impl AfterCrash {
    fn start(
        send: impl FnOnce(&mut Client) -> Vec<u8>,
        found: impl FnOnce(&[u8], &UnixStream) -> vhost_user_iommu::journal::InFlight,
        maps: Vec<vhost_user_iommu::vfio_user::DmaRegion>,
    ) -> AfterCrash {
        use vhost_user_iommu::vfio_user::{ConnectionState, DeviceServer, bind_socket};
        let dir = test_dir("crash");
        let (c, daemon_side) = UnixStream::pair().unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut client = Client::over(c, 7);
        let bytes = send(&mut client);
        let found = found(&bytes, &daemon_side);
        let (fake, _) = Fake::new();
        let bars = fake.memfd.try_clone().unwrap();
        let stop = StopSignal::new().unwrap();
        let server = DeviceServer::new(Box::new(fake), Arc::new(|_, _| true), stop.clone())
            .after_crash(found);
        server.dma_maps().restore(maps);
        let maps = server.dma_maps();
        let state = ConnectionState {
            negotiated: true,
            irqs_set: 0,
        };
        let thread = server
            .spawn_resumed(
                bind_socket(&dir.join("dev.sock")).unwrap(),
                Some((daemon_side.try_clone().unwrap(), state)),
            )
            .unwrap();
        AfterCrash {
            client,
            _daemon_side: daemon_side,
            stop,
            thread: Some(thread),
            bars,
            maps,
            _dir: dir,
        }
    }

    fn bar0(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        self.bars.read_exact_at(&mut b, BAR0_OFF).unwrap();
        b
    }
}

impl Drop for AfterCrash {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// REGION_WRITE of `data` at BAR 0's start, as message `id` (sent, not answered); its bytes.
fn send_bar0_write(c: &mut Client, data: &[u8]) -> Vec<u8> {
    let p = P::default()
        .u64(0)
        .u32(0)
        .u32(data.len() as u32)
        .bytes(data);
    let id = c.next_id();
    c.send(REGION_WRITE, &p.0, &[], 0).unwrap();
    let mut m = hdr_bytes(id, REGION_WRITE, 16 + p.0.len() as u32, 0);
    m.extend_from_slice(&p.0);
    m
}

/// The reply a server sends to a REGION_WRITE of `count` bytes at BAR 0's start.
fn bar0_write_reply(id: u16, count: u32) -> Vec<u8> {
    let mut r = hdr_bytes(id, REGION_WRITE, 32, T_REPLY);
    r.extend_from_slice(&P::default().u64(0).u32(0).u32(count).0);
    r
}

fn mark(bytes: &[u8], state: u64) -> u64 {
    vhost_user_iommu::peek::digest(&[bytes]) | state
}

#[test]
fn a_message_carried_out_before_a_crash_is_answered_with_the_kept_reply_not_again() {
    let kept = bar0_write_reply(7, 4);
    let mut s = AfterCrash::start(
        |c| send_bar0_write(c, &[1, 2, 3, 4]),
        |m, _| vhost_user_iommu::journal::InFlight {
            mark: mark(m, 1),
            reply: Some(kept.clone()),
        },
        Vec::new(),
    );
    let before = s.bar0();
    let (h, body, _) = s.client.recv().unwrap();
    assert_eq!((h.id, h.cmd, h.flags), (7, REGION_WRITE, T_REPLY));
    assert_eq!(body, kept[16..], "the kept reply, byte for byte");
    assert_eq!(
        s.bar0(),
        before,
        "the write was not carried out a second time"
    );
    // Then the connection goes on, with the next message answered once.
    assert_eq!(s.client.read(0, 0, 4).unwrap(), before);
    assert_eq!(s.client.info().unwrap().2, 9);
}

#[test]
fn a_message_answered_before_a_crash_is_taken_out_without_a_second_reply() {
    // Marked answered; or marked replying with its reply unread in the client's socket.
    for went_out in [false, true] {
        let mut s = AfterCrash::start(
            |c| send_bar0_write(c, &[9, 9, 9, 9]),
            |m, daemon_side| {
                if went_out {
                    let mut d = daemon_side;
                    d.write_all(&bar0_write_reply(7, 4)).unwrap();
                }
                vhost_user_iommu::journal::InFlight {
                    mark: mark(m, if went_out { 1 } else { 2 }),
                    reply: Some(bar0_write_reply(7, 4)),
                }
            },
            Vec::new(),
        );
        let before = s.bar0();
        if went_out {
            let (h, _, _) = s.client.recv().unwrap();
            assert_eq!((h.id, h.cmd), (7, REGION_WRITE), "the reply sent before");
        }
        // The next reply the client gets is the next message's: none for message 7 again.
        assert_eq!(s.client.info().unwrap().2, 9, "went out: {went_out}");
        assert_eq!(
            s.bar0(),
            before,
            "not carried out again (went out: {went_out})"
        );
    }
}

#[test]
fn a_message_in_hand_at_a_crash_without_a_kept_reply_is_carried_out_again() {
    // No mark (killed before its reply was kept), or a reply that could not be kept.
    for m_state in [None, Some(1u64)] {
        let mut s = AfterCrash::start(
            |c| send_bar0_write(c, &[5, 6, 7, 8]),
            |m, _| vhost_user_iommu::journal::InFlight {
                mark: m_state.map_or(0, |st| mark(m, st)),
                reply: None,
            },
            Vec::new(),
        );
        let (h, body, _) = s.client.recv().unwrap();
        assert_eq!(
            (h.id, h.cmd, h.flags & F_ERROR, body.len()),
            (7, REGION_WRITE, 0, 16)
        );
        assert_eq!(s.bar0(), vec![5, 6, 7, 8], "carried out ({m_state:?})");
        assert_eq!(s.client.info().unwrap().2, 9);
    }
}

#[test]
fn dma_map_and_unmap_a_crash_had_carried_out_succeed_once_more_and_only_then() {
    use std::os::unix::fs::MetadataExt;
    let ram = memfd("guest-ram", 0x2000);
    let md = ram.metadata().unwrap();
    let region = vhost_user_iommu::vfio_user::DmaRegion {
        address: 0x10_0000,
        size: 0x2000,
        flags: 3,
        offset: 0,
        file_id: Some((md.dev(), md.ino())),
        file: None,
    };
    // The map was made (and kept) before the kill; the message is still in the socket.
    let fd = ram.as_raw_fd();
    let mut s = AfterCrash::start(
        |c| {
            let p = P::default()
                .u32(32)
                .u32(3)
                .u64(0)
                .u64(0x10_0000)
                .u64(0x2000);
            c.send(DMA_MAP, &p.0, &[fd], 0).unwrap();
            Vec::new()
        },
        |_, _| vhost_user_iommu::journal::InFlight::default(),
        vec![region.clone()],
    );
    let (h, _, _) = s.client.recv().unwrap();
    assert_eq!((h.id, h.cmd, h.flags & F_ERROR), (7, DMA_MAP, 0));
    assert_eq!(s.maps.len(), 1);
    // Only the first message after the crash: the same map again overlaps.
    assert_eq!(
        s.client.dma_map(3, 0, 0x10_0000, 0x2000, Some(fd)).err(),
        Some(CallError::Errno(libc::EEXIST as u32))
    );
    drop(s);

    // The unmap was made before the kill: the map is gone already.
    let mut s = AfterCrash::start(
        |c| {
            let p = P::default().u32(24).u32(0).u64(0x10_0000).u64(0x2000);
            c.send(DMA_UNMAP, &p.0, &[], 0).unwrap();
            Vec::new()
        },
        |_, _| vhost_user_iommu::journal::InFlight::default(),
        Vec::new(),
    );
    let (h, _, _) = s.client.recv().unwrap();
    assert_eq!((h.id, h.cmd, h.flags & F_ERROR), (7, DMA_UNMAP, 0));
    assert_eq!(
        s.client.dma_unmap(0, 0x10_0000, 0x2000).err(),
        Some(CallError::Errno(libc::ENOENT as u32)),
        "only the first message after the crash"
    );
}

#[test]
fn a_server_marks_each_message_in_hand_and_clears_the_mark_once_it_is_taken_out() {
    use vhost_user_iommu::journal::Journal;
    let mut j = Journal::create().unwrap();
    j.checkpoint(b"{}").unwrap();
    let reopen = |j: &Journal| {
        Journal::open(j.fd().try_clone_to_owned().unwrap())
            .unwrap()
            .1
            .in_flight
    };
    let (fake, _) = Fake::new();
    let stop = StopSignal::new().unwrap();
    let dir = test_dir("marks");
    let path = dir.join("dev.sock");
    let server = vhost_user_iommu::vfio_user::DeviceServer::new(
        Box::new(fake),
        Arc::new(|_, _| true),
        stop.clone(),
    )
    .reply_log(j.reply_log(3).unwrap());
    let thread = server
        .spawn(vhost_user_iommu::vfio_user::bind_socket(&path).unwrap())
        .unwrap();
    let mut c = connect_to(&path);
    version(&mut c, "{}").unwrap();
    c.write(0, 0, &[1, 2, 3, 4]).unwrap();
    // The reply is sent before the message is taken out: wait for the mark to clear.
    let t = Instant::now();
    while reopen(&j)[&3].mark != 0 {
        assert!(
            t.elapsed() < TIMEOUT,
            "the mark stays after the message was answered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.stop();
    thread.join().unwrap().unwrap();
}

/// Boot bypass before the memory table: the identity domain follows the client's DMA maps, and
/// covering new RAM pins it, which takes seconds for a large guest, longer than QEMU waits for a
/// vfio-user reply (`x-msg-timeout`, 5 s; seen in CI as "vfio_wait_reqs - timed out" with a
/// 256 MiB guest under emulation). The DMA_MAP is answered before its RAM is pinned; the device
/// cannot DMA before its bus mastering is on, and the write that turns it on waits for the pin.
#[test]
fn boot_bypass_answers_a_dma_map_before_pinning_and_holds_bus_mastering_until_pinned() {
    use vhost_user_iommu::backend::fault::Op;
    use vhost_user_iommu::backend::soft::Fault;
    use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
    use vhost_user_iommu::boot_ram::Follower;
    use vhost_user_iommu::ids::EndpointId;

    let daemon = LocalDaemon::start(LocalOptions {
        boot_bypass: true,
        endpoints: vec![1],
        ..LocalOptions::default()
    })
    .unwrap();
    let t = Instant::now();
    while daemon.device().is_none() {
        assert!(t.elapsed() < TIMEOUT, "the daemon made no device");
        std::thread::sleep(Duration::from_millis(5));
    }
    let follower = Arc::new(Follower::start(daemon.current()).unwrap());
    let s = Server::start_with(|server| follower.follow(server, "test"));
    let mut c = s.client();
    let ram = memfd("guest-ram", 0x40_0000);
    let at = |gpa| daemon.soft.translate(EndpointId(1), gpa, true);
    let wait_pinning = |what: &str| {
        let t = Instant::now();
        while daemon.faults.waiting() == 0 {
            assert!(
                t.elapsed() < TIMEOUT,
                "{what}: the backend's set_ram was never called"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    // Pinning takes as long as the test likes: the DMA_MAP is answered all the same.
    daemon.faults.hold(Op::SetRam);
    c.dma_map(3, 0, 0x10_0000, 0x20_0000, Some(ram.as_raw_fd()))
        .unwrap();
    wait_pinning("the first DMA_MAP");
    assert_eq!(
        at(0x10_0000),
        Err(Fault::NotRam),
        "not in identity before set_ram ends"
    );

    // A config write that leaves bus mastering off (memory space on) is not held.
    c.write(CONFIG, 4, &[0x02, 0x00]).unwrap();
    assert_eq!(s.state.lock().unwrap().config[4], 0x02);

    // Turning bus mastering on waits: no reply, and the device has not seen the write.
    let id = c
        .send(
            REGION_WRITE,
            &P::default()
                .u64(4)
                .u32(CONFIG)
                .u32(2)
                .bytes(&[0x06, 0x00])
                .0,
            &[],
            0,
        )
        .unwrap();
    let mut pfd = libc::pollfd {
        fd: c.socket().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket this test owns.
    let ready = unsafe { libc::poll(&mut pfd, 1, 300) };
    assert_eq!(
        ready, 0,
        "the bus-master write was answered while guest RAM was still being pinned"
    );
    assert_eq!(s.state.lock().unwrap().config[4], 0x02);

    // Pinning done: the write goes through, and identity covers the RAM the map describes.
    daemon.faults.release(Op::SetRam);
    c.reply(id, REGION_WRITE).unwrap();
    assert_eq!(s.state.lock().unwrap().config[4], 0x06);
    assert_eq!(at(0x10_0000), Ok(0x10_0000));
    assert_eq!(at(0x2f_ffff), Ok(0x2f_ffff));
    assert_eq!(at(0x30_0000), Err(Fault::NotRam));

    // A DMA_UNMAP is answered at once too, and followed: that RAM leaves identity.
    daemon.faults.hold(Op::SetRam);
    let unmap = P::default().u32(24).u32(0).u64(0x10_0000).u64(0x20_0000);
    c.call(DMA_UNMAP, &unmap.0, &[]).unwrap();
    wait_pinning("the DMA_UNMAP");
    daemon.faults.release(Op::SetRam);
    let t = Instant::now();
    while at(0x10_0000) != Err(Fault::NotRam) {
        assert!(t.elapsed() < TIMEOUT, "the unmapped RAM stayed in identity");
        std::thread::sleep(Duration::from_millis(5));
    }
}
