//! The serve loop: one vhost-user connection at a time, a fresh device per connection, full
//! teardown when it ends, and a clean exit on SIGTERM/SIGINT.
//!
//! A connection's end (VMM exit, crash, reconnect) returns every endpoint to its boot state
//! before the next connection is accepted; nothing of one connection survives into the next.

use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::DmaBackend;
use crate::metrics::Metrics;
use crate::vhost::{
    Connection, ConnectionState, DeviceSettings, DeviceState, HandedOver, IommuDevice, Served,
    memory_table,
};

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
    /// The handover asked for is an upgrade (to a new binary, by the caller of `serve_until`).
    upgrade: AtomicBool,
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
            handover: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            upgrade: AtomicBool::new(false),
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

    /// Asks for a planned upgrade: at the next point between two of the VMM's messages (or
    /// while no VMM is connected) `serve_until` returns the live connection and the device
    /// state for the caller to hand to a new binary (see `upgrade`).
    pub fn request_upgrade(&self) -> std::io::Result<()> {
        self.upgrade.store(true, Ordering::SeqCst);
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

/// How to go on with a connection handed over (see `serve_until`).
/// Told whether a handed-over state was rebuilt (`Err`: why not), before anything is torn down.
pub type OnRebuilt = Box<dyn FnOnce(Result<(), &str>)>;

pub enum Resume {
    /// In the same process, after an upgrade failed: the device kept its state.
    Device {
        dev: IommuDevice,
        stream: UnixStream,
        handed: HandedOver,
    },
    /// In a new process: the device state is rebuilt first; then `on_rebuilt` runs with the
    /// outcome, before anything is torn down after a failure (it may go back to the previous
    /// binary, see `upgrade::Rollback`, and then does not return).
    State {
        stream: UnixStream,
        handed: HandedOver,
        device: DeviceState,
        on_rebuilt: OnRebuilt,
        /// After a crash: what the journal recorded since its checkpoint (see `recovery`).
        recovery: Option<crate::recovery::Recovery>,
    },
}

/// Why `serve_until` returned.
pub enum Outcome {
    /// Stopped (or `max_connections` served).
    Stopped,
    /// An upgrade was asked for: what to hand to the new binary.
    Upgrade(Box<Upgrade>),
}

/// The daemon's live parts at an upgrade, nothing torn down.
pub struct Upgrade {
    pub listener: Listener,
    pub connection: Option<LiveConnection>,
}

/// A connection at an upgrade.
pub struct LiveConnection {
    pub dev: IommuDevice,
    pub stream: UnixStream,
    pub handed: HandedOver,
    pub device: DeviceState,
}

/// Serves connections on `listener` until `stopper` says stop or `max_connections` were served.
/// An upgrade asked for meanwhile is done as a handover in this process.
pub fn serve(
    listener: Listener,
    settings: DeviceSettings,
    backend: Arc<dyn DmaBackend>,
    metrics: Arc<Metrics>,
    stopper: Arc<Stopper>,
    max_connections: Option<usize>,
    on_connect: Option<OnConnect>,
) -> Result<(), ServeError> {
    let mut listener = listener;
    let mut resume = None;
    loop {
        let outcome = serve_until(
            listener,
            &settings,
            &backend,
            &metrics,
            &stopper,
            max_connections,
            on_connect.as_ref(),
            resume.take(),
        )?;
        match outcome {
            Outcome::Stopped => return Ok(()),
            Outcome::Upgrade(u) => {
                info!("no new binary to hand over to here: the connection goes on in this process");
                listener = u.listener;
                resume = u.connection.map(|c| Resume::Device {
                    dev: c.dev,
                    stream: c.stream,
                    handed: c.handed,
                });
            }
        }
    }
}

/// Serves connections on `listener` (first going on with `resume`, if given) until `stopper`
/// says stop, `max_connections` were served, or an upgrade is asked for.
#[allow(clippy::too_many_arguments)]
pub fn serve_until(
    listener: Listener,
    settings: &DeviceSettings,
    backend: &Arc<dyn DmaBackend>,
    metrics: &Arc<Metrics>,
    stopper: &Stopper,
    max_connections: Option<usize>,
    on_connect: Option<&OnConnect>,
    mut resume: Option<Resume>,
) -> Result<Outcome, ServeError> {
    *stopper
        .listener_fd
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(listener.as_raw_fd());
    let mut served = 0usize;
    let new_device = || {
        let dev = IommuDevice::new(settings.clone(), backend.clone(), metrics.clone())
            .map_err(ServeError::Device)?;
        if let Some(f) = on_connect {
            f(&dev);
        }
        Ok::<_, ServeError>(dev)
    };
    let outcome = loop {
        if stopper.stopped() || max_connections.is_some_and(|m| served >= m) {
            break Outcome::Stopped;
        }
        let (dev, stream, handed) = match resume.take() {
            Some(Resume::Device {
                dev,
                stream,
                handed,
            }) => {
                if let Some(f) = on_connect {
                    f(&dev);
                }
                (dev, stream, Some(handed))
            }
            Some(Resume::State {
                stream,
                mut handed,
                device,
                on_rebuilt,
                recovery,
            }) => {
                let dev = new_device()?;
                if let Err(e) = rebuild(&dev, &mut handed, device, recovery) {
                    // Nothing is dropped before this: the kernel objects taken over and the
                    // handed-over fds are as the previous binary left them.
                    on_rebuilt(Err(&e.to_string()));
                    return Err(ServeError::Connection(e));
                }
                on_rebuilt(Ok(()));
                (dev, stream, Some(handed))
            }
            None => {
                // The next connection's device exists before it connects (hooks see a fresh
                // device as soon as the previous connection is torn down).
                let dev = new_device()?;
                match accept(&listener, stopper, &settings.vmm) {
                    Ok(Some(s)) => (dev, s, None),
                    Ok(None) => {
                        break Outcome::Upgrade(Box::new(Upgrade {
                            listener,
                            connection: None,
                        }));
                    }
                    Err(_) if stopper.stopped() => {
                        info!("stopping while waiting for a VMM");
                        break Outcome::Stopped;
                    }
                    Err(e) => return Err(ServeError::Accept(e)),
                }
            }
        };
        served += 1;
        if handed.is_none() {
            info!("VMM connected");
        }
        let result = serve_connection(stream, &dev, stopper, handed);
        match result {
            Ok(Ended::Closed) => info!("VMM disconnected"),
            Ok(Ended::Upgrade(stream, handed)) => {
                let device = dev.device_state();
                break Outcome::Upgrade(Box::new(Upgrade {
                    listener,
                    connection: Some(LiveConnection {
                        dev,
                        stream,
                        handed,
                        device,
                    }),
                }));
            }
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
    };
    *stopper
        .listener_fd
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    Ok(outcome)
}

/// Puts a handed-over device state into a fresh device: the memory table (through the backend),
/// then the domains, attachments and mappings; after a crash also the changes recorded since,
/// with the rings set to go on where the guest can tell the dead daemon stopped.
fn rebuild(
    dev: &IommuDevice,
    handed: &mut HandedOver,
    device: DeviceState,
    recovery: Option<crate::recovery::Recovery>,
) -> std::io::Result<()> {
    let table = memory_table(&handed.state, &handed.fds)?;
    if let Some(r) = recovery {
        let answers = crate::vhost::resume_rings(&mut handed.state, &table, &r);
        if !handed.state.regions.is_empty() {
            dev.set_memory_table(table)?;
        }
        dev.restore(device).map_err(std::io::Error::other)?;
        let request_ring = handed
            .state
            .rings
            .get(crate::protocol::REQUEST_QUEUE)
            .map(|q| (q.next_avail, q.next_used));
        let kept = handed
            .kept
            .clone()
            .map(|fds| crate::recovery::KeptConnection {
                state: handed.state.clone(),
                fds,
            });
        let n = dev
            .recovered(crate::vhost::Recovered {
                effects: r.effects,
                answers,
                kept,
                request_ring,
            })
            .map_err(std::io::Error::other)?;
        info!("crash restart: {n} recorded change(s) replayed");
        return Ok(());
    }
    if !handed.state.regions.is_empty() {
        dev.set_memory_table(table)?;
    }
    dev.restore(device).map_err(std::io::Error::other)?;
    // Kept for a crash by the previous binary: this one's checkpoints name the same fds.
    if let Some(fds) = handed.kept.clone() {
        dev.keep(Some(crate::recovery::KeptConnection {
            state: handed.state.clone(),
            fds,
        }));
    }
    #[cfg(feature = "test-utils")]
    if std::env::var_os(crate::upgrade::TEST_FAIL_REBUILD).is_some()
        && std::env::var_os(crate::upgrade::ROLLED_BACK).is_none()
    {
        return Err(std::io::Error::other(format!(
            "{} is set: failing after the rebuild, as a test asked",
            crate::upgrade::TEST_FAIL_REBUILD
        )));
    }
    Ok(())
}

/// Refused vhost-user clients (logged once per ten seconds at most, with the running count).
static REFUSED_LOG: crate::log_limit::EveryNth = crate::log_limit::EveryNth::new();

/// Waits for the next VMM that `vmm` admits; None when an upgrade is asked for first.
fn accept(
    listener: &Listener,
    stopper: &Stopper,
    vmm: &crate::peer::PeerPolicy,
) -> Result<Option<UnixStream>, ProtocolError> {
    loop {
        // SAFETY: both fds are owned by `listener` and `stopper`, which outlive the borrows.
        let (l, h) = unsafe {
            (
                BorrowedFd::borrow_raw(listener.as_raw_fd()),
                BorrowedFd::borrow_raw(stopper.handover.as_raw_fd()),
            )
        };
        if !crate::scm::wait_readable(l, h).map_err(ProtocolError::SocketError)? {
            let _ = stopper.handover.read();
            if stopper.upgrade.swap(false, Ordering::SeqCst) {
                return Ok(None);
            }
            continue;
        }
        if let Some(stream) = listener.accept()? {
            match vmm.check(&stream) {
                Ok(_) => return Ok(Some(stream)),
                // Closed before anything is read: nothing of this VM is shown or taken.
                Err(e) => {
                    if REFUSED_LOG.allow() {
                        warn!(
                            "vhost-user: refused a client ({} refused so far): {e}",
                            REFUSED_LOG.seen()
                        );
                    }
                }
            }
        }
    }
}

/// How a connection's service ended without an error.
enum Ended {
    /// The VMM closed it.
    Closed,
    /// An upgrade was asked for: the connection, handed over.
    Upgrade(UnixStream, HandedOver),
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
    handed: Option<HandedOver>,
) -> Result<Ended, ConnectionEnd> {
    let clone = stream.try_clone().map_err(ConnectionEnd::Setup)?;
    // The VMM's socket outlives a crash in the fd store (kept already if this is a restart).
    let keeper = dev.keeper().cloned();
    if let Some(k) = &keeper
        && handed.as_ref().is_none_or(|h| h.kept.is_none())
        && let Err(e) = k.store(crate::recovery::VMM, stream.as_fd())
    {
        warn!("cannot keep the VMM's socket for a restart: {e}");
    }
    let mut conn = match handed {
        Some(h) => Connection::resume(dev.clone(), h),
        None => Connection::new(dev.clone()),
    }
    .map_err(ConnectionEnd::Setup)?;
    *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
    let result = loop {
        if stopper.stopped() {
            break Ok(Ended::Closed);
        }
        // SAFETY: the eventfd is owned by `stopper`, which outlives this borrow.
        let handover = unsafe { BorrowedFd::borrow_raw(stopper.handover.as_raw_fd()) };
        match conn.serve(&stream, handover) {
            Ok(Served::Closed) => break Ok(Ended::Closed),
            Err(e) => break Err(ConnectionEnd::Protocol(e)),
            Ok(Served::HandOver) => {
                let _ = stopper.handover.read();
                if stopper.upgrade.swap(false, Ordering::SeqCst) {
                    *stopper.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let handed = conn.hand_over().map_err(ConnectionEnd::Setup)?;
                    return Ok(Ended::Upgrade(stream, handed));
                }
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
    if let Some(k) = &keeper {
        k.forget(&[crate::recovery::VMM.to_string()]);
    }
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
            kept: handed.kept,
        },
    )
}

/// Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR2 in every thread; stops `stopper` on SIGTERM or
/// SIGINT, asks it for an upgrade on SIGUSR2 (see `upgrade`) and logs and ignores SIGHUP. Call before
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
        libc::sigaddset(&mut set, libc::SIGUSR2);
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
                    if sig == libc::SIGUSR2 {
                        match stopper.request_upgrade() {
                            Ok(()) => info!("SIGUSR2: upgrading to the binary on disk"),
                            Err(why) => warn!("SIGUSR2: no upgrade: {why}"),
                        }
                        continue;
                    }
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
