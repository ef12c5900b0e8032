//! The serve loop: one vhost-user connection at a time, a fresh device per connection, full
//! teardown when it ends, and a clean exit on SIGTERM/SIGINT.
//!
//! A connection's end (VMM exit, crash, reconnect) returns every endpoint to its boot state
//! before the next connection is accepted; nothing of one connection survives into the next.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::DmaBackend;
use crate::metrics::Metrics;
use crate::vhost::{DeviceSettings, IommuDevice};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the device: {0}")]
    Device(std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot register the completion event: {0}")]
    Register(std::io::Error),
}

/// Lets another thread (the signal handler) stop the serve loop.
#[derive(Default)]
pub struct Stopper {
    stop: AtomicBool,
    listener_fd: Mutex<Option<i32>>,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Stopper {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            c.shutdown();
        }
        if let Some(fd) = *self.listener_fd.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: shutting a listening socket down only makes a blocked accept() return; the
            // fd stays owned (and is closed) by the Listener.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Hook called with each connection's device (tests read its state).
pub type OnConnect = Box<dyn Fn(&IommuDevice) + Send>;

/// Serves connections on `listener` until `stopper` says stop or `max_connections` were served.
pub fn serve(
    mut listener: Listener,
    settings: DeviceSettings,
    backend: Arc<dyn DmaBackend>,
    metrics: Arc<Metrics>,
    stopper: Arc<Stopper>,
    max_connections: Option<usize>,
    on_connect: Option<OnConnect>,
) -> Result<(), ServeError> {
    *stopper
        .listener_fd
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(listener.as_raw_fd());
    let mut served = 0usize;
    while !stopper.stopped() && max_connections.is_none_or(|m| served < m) {
        let dev = IommuDevice::new(settings.clone(), backend.clone(), metrics.clone())
            .map_err(ServeError::Device)?;
        if let Some(f) = &on_connect {
            f(&dev);
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-iommu".into(), dev.clone(), mem)
            .map_err(ServeError::Daemon)?;
        for (fd, token) in dev.event_fds() {
            daemon.get_epoll_handlers()[0]
                .register_listener(fd, EventSet::IN, u64::from(token))
                .map_err(ServeError::Register)?;
        }
        // The vring thread runs (the library starts it with the daemon) and has the device's
        // events in its epoll set: it owns the device state until it is gone.
        dev.owner_started();
        match daemon.start(&mut listener) {
            Ok(()) => {}
            Err(e) => {
                drop(daemon);
                dev.owner_stopped();
                if stopper.stopped() {
                    info!("stopping while waiting for a VMM");
                    break;
                }
                return Err(ServeError::Daemon(e));
            }
        }
        served += 1;
        info!("VMM connected");
        *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        if stopper.stopped() {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => info!("VMM disconnected"),
            Err(e) if stopper.stopped() => info!("connection closed for shutdown: {e}"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("VMM disconnected"),
            Err(e) => warn!("connection ended with an error: {e}"),
        }
        *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        drop(daemon);
        dev.release_exit_events();
        dev.disconnect();
    }
    *stopper
        .listener_fd
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}

/// Blocks SIGTERM, SIGINT and SIGHUP in every thread; stops `stopper` on SIGTERM or SIGINT and
/// logs and ignores SIGHUP. Call before
/// any other thread is spawned so that they all inherit the mask.
pub fn handle_signals(stopper: Arc<Stopper>) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and the thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    if sig == libc::SIGHUP {
                        // A running VM's IOMMU must not change under it: configuration is read
                        // once, at start. Restart the unit (with the VM stopped) to apply it.
                        warn!("SIGHUP ignored: the configuration is only read at start");
                        continue;
                    }
                    info!("signal {sig}: tearing down");
                    stopper.stop();
                    return;
                }
                error!("sigwait failed");
            }
        })?;
    Ok(())
}
