//! A hostile VMM on a vfio-user socket: arbitrary message sequences (any command, size, flags
//! and payload, with memfds and eventfds attached) against the real server and its message
//! handlers over a test device. After every input the server still serves a new client, and the
//! connection it ended left nothing behind: no DMA map recorded, no IRQ armed, the device reset.
#![no_main]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::vfio_user::fake::{FakeCounters, FakeDevice};
use vhost_user_iommu::vfio_user::{DeviceServer, DmaMaps, StopSignal, bind_socket};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

struct World {
    path: std::path::PathBuf,
    maps: DmaMaps,
    counters: Arc<FakeCounters>,
    disconnects: Arc<AtomicUsize>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vfio-user-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.sock");
        let (dev, counters) = FakeDevice::new();
        let disconnects = Arc::new(AtomicUsize::new(0));
        let d = disconnects.clone();
        let server = DeviceServer::new(
            Box::new(dev),
            Arc::new(|gpa, len| gpa < 1 << 32 && len <= 1 << 24),
            StopSignal::new().unwrap(),
        )
        .name("fuzz")
        .message_timeout(Duration::from_millis(200))
        .on_disconnect(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        let maps = server.dma_maps();
        server.spawn(bind_socket(&path).unwrap()).unwrap();
        World {
            path,
            maps,
            counters,
            disconnects,
        }
    })
}

/// A fresh fd to attach: a small memfd or an eventfd.
fn some_fd(kind: u8) -> OwnedFd {
    // SAFETY: both calls take no pointers but a static name; a non-negative result is a new fd.
    let fd = unsafe {
        if kind % 2 == 0 {
            let fd = libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC);
            if fd >= 0 {
                libc::ftruncate(fd, 0x10000);
            }
            fd
        } else {
            libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
        }
    };
    assert!(
        fd >= 0,
        "cannot make an fd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just created and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads whatever replies are there without waiting (the server must never block on a full
/// socket because of us).
fn drain(s: &UnixStream) {
    let mut buf = [0u8; 4096];
    s.set_nonblocking(true).unwrap();
    while let Ok(n) = (&*s).read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    s.set_nonblocking(false).unwrap();
}

/// A VERSION message (id 1) offering protocol 0.2 with `json`.
fn version_msg(json: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&1u16.to_ne_bytes());
    m.extend_from_slice(&1u16.to_ne_bytes());
    m.extend_from_slice(&(16 + 4 + json.len() as u32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes());
    m.extend_from_slice(json);
    m
}

/// DMA_MAP: argsz, flags (read/write), offset, address (a page in the first 16 MiB), size.
fn dma_map_payload(p: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&32u32.to_ne_bytes());
    v.extend_from_slice(&u32::from(p[0] & 3).to_ne_bytes());
    v.extend_from_slice(&0u64.to_ne_bytes());
    v.extend_from_slice(&(u64::from(p[1]) << 12).to_ne_bytes());
    v.extend_from_slice(&0x1000u64.to_ne_bytes());
    v
}

/// SET_IRQS: DATA_EVENTFD | ACTION_TRIGGER on an index (the request index 4 included), one to
/// four vectors.
fn set_irqs_payload(p: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&20u32.to_ne_bytes());
    v.extend_from_slice(&((1u32 << 2) | (1 << 5)).to_ne_bytes());
    v.extend_from_slice(&u32::from(p[0] % 5).to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&u32::from(p[1] % 4 + 1).to_ne_bytes());
    v
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the server hung: {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let before = w.disconnects.load(Ordering::SeqCst);
    let sock = UnixStream::connect(&w.path).unwrap();
    // A valid VERSION first half of the time, so that the handlers behind it are reached.
    let mut rest = data;
    if let Some((&first, r)) = rest.split_first() {
        rest = r;
        if first & 1 == 0 {
            let m = version_msg(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
            let _ = sock.send_with_fds(&[&m[..]], &[]);
        }
    }
    // Then messages: [command, flags, size lo, size hi, nfds, payload…].
    let mut id = 2u16;
    while rest.len() >= 5 {
        let (h, r) = rest.split_at(5);
        let command = u16::from(h[0] % 20);
        let flags = u32::from(h[1]);
        let len = (usize::from(h[2]) | usize::from(h[3]) << 8).min(r.len());
        let (payload, r) = r.split_at(len);
        rest = r;
        // Every other message is made well-formed for the two commands that leave state behind
        // (DMA_MAP with a memfd, SET_IRQS with eventfds), so that their cleanup is exercised.
        let shaped;
        let (command, payload, nfds) = match (h[1] & 0x60, payload) {
            (0x20, p) if p.len() >= 2 => {
                shaped = dma_map_payload(p);
                (2u16, &shaped[..], 1)
            }
            (0x40, p) if p.len() >= 2 => {
                shaped = set_irqs_payload(p);
                (8u16, &shaped[..], u8::from(p[1] % 4) + 1)
            }
            (_, p) => (command, p, (h[4] & 0x7) % 5),
        };
        // The size field usually tells the truth, sometimes not.
        let size = if h[4] & 0x80 != 0 {
            u32::from(h[2])
        } else {
            16 + payload.len() as u32
        };
        let mut m = Vec::with_capacity(16 + payload.len());
        m.extend_from_slice(&id.to_ne_bytes());
        m.extend_from_slice(&command.to_ne_bytes());
        m.extend_from_slice(&size.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        let fds: Vec<OwnedFd> = (0..nfds)
            .map(|i| {
                some_fd(if command == 2 {
                    0
                } else if command == 8 {
                    1
                } else {
                    i
                })
            })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if sock.send_with_fds(&[&m[..]], &raw).is_err() {
            break; // the server closed the connection
        }
        drop(fds);
        drain(&sock);
        id = id.wrapping_add(1);
    }
    drop(sock);
    wait_until("disconnect", || {
        w.disconnects.load(Ordering::SeqCst) > before
    });
    // Nothing of the connection is left.
    assert!(w.maps.is_empty(), "DMA maps left after the client left");
    assert_eq!(*w.counters.irqs_armed.lock().unwrap(), 0, "IRQs left armed");
    // And the server still serves: a client gets its VERSION answered.
    let probe = UnixStream::connect(&w.path).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let m = version_msg(b"{}\0");
    probe.send_with_fds(&[&m[..]], &[]).unwrap();
    let mut reply = [0u8; 16];
    (&probe)
        .read_exact(&mut reply)
        .expect("the server answers a new client");
    assert_eq!(
        u32::from_ne_bytes(reply[12..16].try_into().unwrap()),
        0,
        "VERSION refused"
    );
    let before = w.disconnects.load(Ordering::SeqCst);
    drop(probe);
    wait_until("probe disconnect", || {
        w.disconnects.load(Ordering::SeqCst) > before
    });
});
