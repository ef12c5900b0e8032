//! Shared helpers of the socket tests: the real daemon in this process (the library's
//! [`LocalDaemon`]) plus waiting helpers.
#![allow(dead_code)]

use std::time::Duration;

use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{Request, Status};

pub const ENDPOINTS: [u32; 4] = [1, 2, 3, 4];
pub const RW: u32 = 3;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub type Options = LocalOptions;

pub struct Daemon(pub LocalDaemon);

impl std::ops::Deref for Daemon {
    type Target = LocalDaemon;
    fn deref(&self) -> &LocalDaemon {
        &self.0
    }
}

impl Daemon {
    pub fn start(opts: Options) -> Daemon {
        Daemon(LocalDaemon::start(opts).expect("start the daemon"))
    }

    /// A daemon with the default options in `mode` (inline or pipelined).
    pub fn in_mode(mode: Mode) -> Daemon {
        Daemon::start(Options {
            mode,
            ..Options::default()
        })
    }

    pub fn connect(&self) -> TestVm {
        self.connect_with(VmOptions::default())
    }

    pub fn connect_with(&self, opts: VmOptions) -> TestVm {
        TestVm::connect(self.socket(), opts).expect("connect to the daemon")
    }

    /// Waits until the daemon's state satisfies `f` (teardown after a disconnect is
    /// asynchronous).
    pub fn wait_until(&self, what: &str, f: impl Fn(&Daemon) -> bool) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !f(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A daemon in each request mode the tests cover, one after the other: inline, and pipelined on
/// two executors (each started when the loop reaches it).
pub fn in_each_mode() -> impl Iterator<Item = (Mode, Daemon)> {
    [Mode::Inline, Mode::Pipeline(2)]
        .into_iter()
        .map(|mode| (mode, Daemon::in_mode(mode)))
}

/// Sends `reqs` with one kick and asserts that every one of them was answered OK.
pub fn all_ok(vm: &mut TestVm, reqs: &[Request], what: &str) {
    let got = vm.batch(reqs).expect("a batch of requests");
    let refused: Vec<(usize, Status)> = got
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, s)| s != Status::Ok)
        .collect();
    assert!(
        got.len() == reqs.len() && refused.is_empty(),
        "{what}: {} answers to {} requests, refused (index, status): {refused:?}",
        got.len(),
        reqs.len()
    );
}
