//! A hostile VMM at the byte level of the vhost-user socket: arbitrary headers (request codes,
//! flags, sizes that lie), arbitrary payloads and file descriptors attached where they do not
//! belong, against the real daemon. After every input the connection is closed; the daemon
//! must have torn it down (no mapping left) and serve the next VMM.
#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::protocol::{Request, Status};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn daemon() -> &'static LocalDaemon {
    static D: OnceLock<LocalDaemon> = OnceLock::new();
    D.get_or_init(|| LocalDaemon::start(LocalOptions::default()).expect("daemon"))
}

/// A 1 MiB memfd (what a VMM passes as guest memory or a ring eventfd would be).
fn memfd() -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the fd just created.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 20) }, 0);
    fd
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS, MSG_NOSIGNAL); errors (the daemon closed)
/// are returned.
fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = s
        .send_with_fds(&[bytes], &raw)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let mut s = s;
    s.write_all(&bytes[n..])
}

fuzz_target!(|data: &[u8]| {
    let d = daemon();
    let s = UnixStream::connect(d.socket()).expect("the daemon accepts");
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Each message: [request][flags][size][nfds & 3][size bytes of payload], the header's size
    // field taken as given (it may lie about what follows).
    let mut rest = data;
    while rest.len() >= 4 {
        let (request, flags, size, nfds) = (rest[0] % 48, rest[1] & 0x1f, rest[2], rest[3] % 4);
        rest = &rest[4..];
        let take = (size as usize).min(rest.len());
        let mut bytes = Vec::with_capacity(12 + take);
        bytes.extend_from_slice(&u32::from(request).to_ne_bytes());
        bytes.extend_from_slice(&u32::from(flags).to_ne_bytes());
        bytes.extend_from_slice(&u32::from(size).to_ne_bytes());
        bytes.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        let fds: Vec<OwnedFd> = (0..nfds).map(|_| memfd()).collect();
        if send_with_fds(&s, &bytes, &fds).is_err() {
            break; // the daemon ended the connection: its right
        }
    }
    drop(s);
    // The connection is torn down: nothing stays mapped for it.
    assert!(
        d.wait_unmapped(Duration::from_secs(10)),
        "mappings left after the VMM left"
    );
    // And the daemon serves the next VMM.
    let opts = VmOptions {
        ram_size: 8 << 20,
        queue_size: 64,
        request_timeout: Duration::from_secs(5),
        ..VmOptions::default()
    };
    let mut next = TestVm::connect(d.socket(), opts).expect("the daemon serves a new VMM");
    assert_eq!(next.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    next.disconnect();
});
