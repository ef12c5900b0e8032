//! Shared helpers of the socket tests: the real daemon in this process (the library's
//! [`LocalDaemon`]) plus waiting helpers.
#![allow(dead_code)]

use std::time::Duration;

use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
use vhost_user_iommu::driver::{TestVm, VmOptions};

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
    pub fn in_mode(mode: vhost_user_iommu::pipeline::Mode) -> Daemon {
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
