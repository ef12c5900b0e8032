//! The real daemon, in this process, on a real unix socket, with its soft backend kept
//! visible: what the `bench` command and the socket tests run against.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;

use crate::backend::DmaBackend;
use crate::backend::fault::{FaultyBackend, Injector};
use crate::backend::soft::SoftBackend;
use crate::domains::{DomainView, EndpointView, Limits, Rules};
use crate::ids::EndpointId;
use crate::metrics::Metrics;
use crate::pipeline::Mode;
use crate::server::{Stopper, serve};
use crate::vhost::{DeviceSettings, IommuDevice};

/// How to start a local daemon.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub mode: Mode,
    pub boot_bypass: bool,
    pub limits: Limits,
    pub endpoints: Vec<u32>,
    /// The vring thread's polling window after each answer.
    pub poll: std::time::Duration,
    /// Who may connect (default: anyone who can reach the socket).
    pub vmm: crate::peer::PeerPolicy,
    /// The request trace, if on.
    pub trace: Option<Arc<crate::trace::Tracer>>,
    /// Device interrupts to poll after (see `irq_watch`).
    pub irq_watch: Option<Arc<crate::irq_watch::IrqWatch>>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            mode: Mode::Inline,
            boot_bypass: false,
            limits: Limits::default(),
            endpoints: vec![1, 2, 3, 4],
            poll: crate::vhost::DEFAULT_POLL,
            vmm: crate::peer::PeerPolicy::default(),
            trace: None,
            irq_watch: None,
        }
    }
}

/// A daemon serving on a socket in a private temporary directory.
pub struct LocalDaemon {
    pub soft: Arc<SoftBackend>,
    pub faults: Arc<Injector>,
    pub metrics: Arc<Metrics>,
    socket: PathBuf,
    dir: PathBuf,
    device: Arc<Mutex<Option<IommuDevice>>>,
    stopper: Arc<Stopper>,
    thread: Option<JoinHandle<()>>,
}

/// The rules the soft backend implies, with the given caps.
pub fn soft_rules(limits: Limits) -> Rules {
    let c = SoftBackend::new(&[], false).constraints();
    Rules::for_host(&c, (0, u32::MAX), limits, 512)
}

impl LocalDaemon {
    pub fn start(opts: LocalOptions) -> std::io::Result<LocalDaemon> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("viommu-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("viommu.sock");
        let eps: Vec<EndpointId> = opts.endpoints.iter().map(|&e| EndpointId(e)).collect();
        let soft = Arc::new(SoftBackend::new(&eps, opts.boot_bypass));
        let faults = Arc::new(Injector::default());
        let backend: Arc<dyn DmaBackend> =
            Arc::new(FaultyBackend::new(soft.clone(), faults.clone()));
        let settings = DeviceSettings {
            boot_bypass: opts.boot_bypass,
            poll: opts.poll,
            vmm: opts.vmm,
            trace: opts.trace.clone(),
            irq_watch: opts.irq_watch.clone(),
            ..DeviceSettings::new(eps, soft_rules(opts.limits), opts.mode)
        };
        let metrics = Arc::new(Metrics::default());
        let stopper = Arc::new(Stopper::new()?);
        let device = Arc::new(Mutex::new(None));
        let listener = Listener::new(&socket, true).map_err(std::io::Error::other)?;
        let (m, s, d) = (metrics.clone(), stopper.clone(), device.clone());
        let thread = std::thread::Builder::new()
            .name("daemon".into())
            .spawn(move || {
                let hook = Box::new(move |dev: &IommuDevice| {
                    *d.lock().unwrap_or_else(|p| p.into_inner()) = Some(dev.clone())
                });
                if let Err(e) = serve(listener, settings, backend, m, s, None, Some(hook)) {
                    log::error!("local daemon: {e}");
                }
            })?;
        Ok(LocalDaemon {
            soft,
            faults,
            metrics,
            socket,
            dir,
            device,
            stopper,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Domains and endpoints as the daemon's shadow state holds them (empty before the first
    /// connection).
    pub fn state(&self) -> (Vec<DomainView>, Vec<EndpointView>) {
        let dev = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        dev.map(|d| d.snapshot()).unwrap_or_default()
    }

    /// Where the daemon keeps its current device (as the binary's hooks see it).
    pub fn current(&self) -> Arc<Mutex<Option<IommuDevice>>> {
        self.device.clone()
    }

    /// The current connection's device (None before the first).
    pub fn device(&self) -> Option<IommuDevice> {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the daemon to hand its live connection over (see `Stopper::hand_over_connection`).
    pub fn hand_over_connection(&self) -> std::io::Result<()> {
        self.stopper.hand_over_connection()
    }

    /// Handovers done, and the longest pause one caused (ns).
    pub fn handovers(&self) -> (u64, u64) {
        self.stopper.handovers()
    }

    /// Mappings the backend holds, over all domains.
    pub fn backend_mappings(&self) -> usize {
        self.soft.domain_sizes().iter().map(|d| d.1).sum()
    }

    /// Waits up to `timeout` for the backend to hold no mapping (a connection's teardown runs
    /// after its socket closed); whether it got there.
    pub fn wait_unmapped(&self, timeout: std::time::Duration) -> bool {
        let t = std::time::Instant::now();
        while self.backend_mappings() != 0 {
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    fn shutdown(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for LocalDaemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}
