//! Shared helpers of the socket tests: the real daemon, in this process, on a real unix socket,
//! with the soft backend kept visible so tests can ask where a DMA would land.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_iommu::backend::DmaBackend;
use vhost_user_iommu::backend::fault::{FaultyBackend, Injector};
use vhost_user_iommu::backend::soft::SoftBackend;
use vhost_user_iommu::domains::{DomainView, EndpointView, Limits, Rules};
use vhost_user_iommu::driver::{TestVm, VmOptions};
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::metrics::Metrics;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::server::{Stopper, serve};
use vhost_user_iommu::vhost::{DeviceSettings, IommuDevice};

pub const ENDPOINTS: [u32; 4] = [1, 2, 3, 4];
pub const RW: u32 = 3;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Options {
    pub mode: Mode,
    pub boot_bypass: bool,
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Inline,
            boot_bypass: false,
            limits: Limits::default(),
        }
    }
}

pub struct Daemon {
    pub soft: Arc<SoftBackend>,
    pub faults: Arc<Injector>,
    pub metrics: Arc<Metrics>,
    pub socket: PathBuf,
    device: Arc<Mutex<Option<IommuDevice>>>,
    stopper: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("viommu-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rules(limits: Limits) -> Rules {
    let c = SoftBackend::new(&[], false).constraints();
    Rules {
        granule_mask: 0xfff,
        input_range: c.input_range,
        domain_range: (0, u32::MAX),
        resv_mem: c.reserved,
        limits,
        probe_size: 512,
    }
}

impl Daemon {
    pub fn start(opts: Options) -> Daemon {
        let dir = TempDir::new();
        let socket = dir.0.join("viommu.sock");
        let eps: Vec<EndpointId> = ENDPOINTS.iter().map(|&e| EndpointId(e)).collect();
        let soft = Arc::new(SoftBackend::new(&eps, opts.boot_bypass));
        let faults = Arc::new(Injector::default());
        let backend: Arc<dyn DmaBackend> =
            Arc::new(FaultyBackend::new(soft.clone(), faults.clone()));
        let settings = DeviceSettings {
            endpoints: eps,
            boot_bypass: opts.boot_bypass,
            rules: rules(opts.limits),
            mode: opts.mode,
        };
        let metrics = Arc::new(Metrics::default());
        let stopper = Arc::new(Stopper::default());
        let device = Arc::new(Mutex::new(None));
        let listener = Listener::new(&socket, true).expect("listen");
        let (m, s, d) = (metrics.clone(), stopper.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            let hook = Box::new(move |dev: &IommuDevice| *d.lock().unwrap() = Some(dev.clone()));
            serve(listener, settings, backend, m, s, None, Some(hook)).expect("serve");
        });
        Daemon {
            soft,
            faults,
            metrics,
            socket,
            device,
            stopper,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn connect(&self) -> TestVm {
        self.connect_with(VmOptions::default())
    }

    pub fn connect_with(&self, opts: VmOptions) -> TestVm {
        TestVm::connect(&self.socket, opts).expect("connect to the daemon")
    }

    /// Domains and endpoints as the daemon's shadow state holds them.
    pub fn state(&self) -> (Vec<DomainView>, Vec<EndpointView>) {
        let dev = self
            .device
            .lock()
            .unwrap()
            .clone()
            .expect("a connection was accepted");
        dev.snapshot()
    }

    /// Mappings the backend holds, over all domains.
    pub fn backend_mappings(&self) -> usize {
        self.soft.domain_sizes().iter().map(|d| d.1).sum()
    }

    /// Waits until the daemon's state satisfies `f` (the daemon tears down asynchronously after a
    /// disconnect).
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

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            t.join().expect("serve thread");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}
