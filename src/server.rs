//! The serve loop: one vhost-user connection at a time, a fresh device per connection, full
//! teardown when it ends, and a clean exit on SIGTERM/SIGINT.
//!
//! A connection's end (VMM exit, crash, reconnect) returns every endpoint to its boot state
//! before the next connection is accepted; nothing of one connection survives into the next.

use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::DmaBackend;
use crate::metrics::Metrics;
use crate::vhost::{Connection, ConnectionState, DeviceSettings, HandedOver, IommuDevice, Served};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the device: {0}")]
    Device(std::io::Error),
    #[error("cannot accept a VMM on the vhost-user socket: {0}")]
    Accept(ProtocolError),
    #[error("cannot start serving the connection: {0}")]
    Connection(std::io::Error),
}

/// Lets another thread (the signal handler) stop the serve loop, or ask the connection being
/// served to be handed over.
pub struct Stopper {
    stop: AtomicBool,
    listener_fd: Mutex<Option<i32>>,
    /// The connection being served (a clone of its socket, to shut it down).
    connection: Mutex<Option<UnixStream>>,
    /// Readable while a handover of the connection is asked for.
    handover: EventFd,
    /// Handovers done, and the longest time the VMM's messages waited for one.
    handovers: AtomicU64,
    longest_handover_ns: AtomicU64,
}

impl Stopper {
    pub fn new() -> std::io::Result<Self> {
        Ok(Stopper {
            stop: AtomicBool::new(false),
            listener_fd: Mutex::new(None),
            connection: Mutex::new(None),
            handover: EventFd::new(EFD_NONBLOCK)?,
            handovers: AtomicU64::new(0),
            longest_handover_ns: AtomicU64::new(0),
        })
    }

    /// Asks the serve loop to hand the live connection over between two of the VMM's messages:
    /// its state goes through the versioned handover format (`vhost::ConnectionState`) and the
    /// fds it names, and a new `Connection` resumes it, today in the same process. The VMM and
    /// the guest notice nothing; the device state stays.
    pub fn hand_over_connection(&self) -> std::io::Result<()> {
        self.handover.write(1)
    }

    /// Handovers done so far, and the longest pause one caused (ns).
    pub fn handovers(&self) -> (u64, u64) {
        (
            self.handovers.load(Ordering::Relaxed),
            self.longest_handover_ns.load(Ordering::Relaxed),
        )
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = c.shutdown(Shutdown::Both);
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
    listener: Listener,
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
        // The next connection's device exists before it connects (hooks see a fresh device as
        // soon as the previous connection is torn down).
        let dev = IommuDevice::new(settings.clone(), backend.clone(), metrics.clone())
            .map_err(ServeError::Device)?;
        if let Some(f) = &on_connect {
            f(&dev);
        }
        let stream = match accept(&listener) {
            Ok(s) => s,
            Err(_) if stopper.stopped() => {
                info!("stopping while waiting for a VMM");
                break;
            }
            Err(e) => return Err(ServeError::Accept(e)),
        };
        served += 1;
        info!("VMM connected");
        let result = serve_connection(stream, &dev, &stopper);
        match result {
            Ok(()) => info!("VMM disconnected"),
            Err(e) if stopper.stopped() => info!("connection closed for shutdown: {e}"),
            Err(ConnectionEnd::Protocol(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                info!("VMM disconnected: {e}")
            }
            Err(ConnectionEnd::Setup(e)) => {
                dev.disconnect();
                return Err(ServeError::Connection(e));
            }
            Err(e) => warn!("connection ended with an error: {e}"),
        }
        dev.disconnect();
    }
    *stopper
        .listener_fd
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}

/// Waits for the next VMM.
fn accept(listener: &Listener) -> Result<UnixStream, ProtocolError> {
    loop {
        if let Some(stream) = listener.accept()? {
            return Ok(stream);
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("{0}")]
    Protocol(std::io::Error),
    #[error("{0}")]
    Setup(std::io::Error),
}

/// Answers the VMM's messages on `stream` until it disconnects, a message fails, or `stopper`
/// shuts the socket down. The connection's vring thread has ended when this returns.
fn serve_connection(
    stream: UnixStream,
    dev: &IommuDevice,
    stopper: &Stopper,
) -> Result<(), ConnectionEnd> {
    let clone = stream.try_clone().map_err(ConnectionEnd::Setup)?;
    let mut conn = Connection::new(dev.clone()).map_err(ConnectionEnd::Setup)?;
    *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
    let result = loop {
        if stopper.stopped() {
            break Ok(());
        }
        // SAFETY: the eventfd is owned by `stopper`, which outlives this borrow.
        let handover = unsafe { BorrowedFd::borrow_raw(stopper.handover.as_raw_fd()) };
        match conn.serve(&stream, handover) {
            Ok(Served::Closed) => break Ok(()),
            Err(e) => break Err(ConnectionEnd::Protocol(e)),
            Ok(Served::HandOver) => {
                let _ = stopper.handover.read();
                let started = std::time::Instant::now();
                conn = hand_over(conn, dev).map_err(ConnectionEnd::Setup)?;
                let pause = started.elapsed();
                stopper.handovers.fetch_add(1, Ordering::Relaxed);
                stopper
                    .longest_handover_ns
                    .fetch_max(pause.as_nanos() as u64, Ordering::Relaxed);
                info!("connection handed over in {pause:?}");
            }
        }
    };
    *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
    conn.close();
    result
}

/// Hands `conn` over: its state goes through the handover format (bytes and fds) and a new
/// connection resumes it for the same device.
fn hand_over(conn: Connection, dev: &IommuDevice) -> std::io::Result<Connection> {
    let handed = conn.hand_over()?;
    let bytes = handed.state.to_bytes();
    let state = ConnectionState::from_bytes(&bytes)?;
    Connection::resume(
        dev.clone(),
        HandedOver {
            state,
            fds: handed.fds,
        },
    )
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
