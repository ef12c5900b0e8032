//! The vfio-user socket loop: one client at a time, commands handled in order, each answered
//! (unless it asked for no reply) with a reply or an error reply carrying a non-zero errno.
//!
//! A connection ends when the client closes it, sends something the stream cannot recover
//! from (a header whose size is out of bounds, an unsupported major version), or the stop
//! signal fires. Then every IRQ index the client set is disabled, the device is reset, the
//! recorded DMA maps are dropped and the next client is accepted.
//!
//! A client may use the IRQ indexes a VMM needs (INTx, MSI, MSI-X, ERR) and never the
//! request index (`VFIO_PCI_REQ_IRQ_INDEX`): the daemon's hot-unplug watcher has its eventfd
//! there, and a client that replaced or cleared it could hide the host's unplug request from
//! the daemon (the host's unbind then waits until the daemon exits) or fake one.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::device::{AssignedDevice, Errno};
use super::protocol::*;
use crate::peer::PeerPolicy;
use crate::scm;

mod connection;
mod framing;
mod registry;

use connection::Connection;
use framing::{Msg, Received, receive};
pub use registry::{DeviceSlot, DmaMaps, DmaRegion, StopSignal};

/// Decides whether a guest-physical range `(gpa, len)` is entirely guest RAM (the vhost-user
/// memory table's view).
pub type DmaCheck = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// How long a reply may wait for the client to make room in the socket before the
/// connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has for its first message after connecting, and for each message once its
/// first byte came: a silent or stalled client gives the device's one slot back after this.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

type Hook = Box<dyn FnMut() + Send>;
/// Called on the server thread after the client's DMA maps changed (with no lock held).
type MapsHook = Arc<dyn Fn() + Send + Sync>;
/// Told, on the server thread, what a crash-restarted daemon needs of the server whenever it
/// changed: its listener, and its client (socket and negotiated state) if one is connected; the
/// client's DMA maps are in [`DeviceServer::dma_maps`] (see `recovery`).
pub type KeepHook =
    Arc<dyn Fn(&UnixListener, Option<(&UnixStream, &ConnectionState)>) + Send + Sync>;

/// A vfio-user server for one device; [`serve_device`] and [`spawn_device_server`] are the
/// short forms. Hooks run on the server thread when a client connects and after its
/// connection has been cleaned up (e.g. to put the endpoint back into its boot DMA state).
pub struct DeviceServer {
    slot: DeviceSlot,
    dma_check: DmaCheck,
    stop: StopSignal,
    on_connect: Option<Hook>,
    on_disconnect: Option<Hook>,
    on_dma_change: Option<MapsHook>,
    before_bus_master: Option<MapsHook>,
    on_keep: Option<KeepHook>,
    name: String,
    maps: DmaMaps,
    peers: PeerPolicy,
    message_timeout: Duration,
    trace: Option<Arc<crate::trace::Tracer>>,
    irq_watch: Option<Arc<crate::irq_watch::IrqWatch>>,
    /// Where each message in hand is marked and its reply kept for a restarted daemon.
    reply_log: Option<crate::journal::ReplyLog>,
    /// What the journal held for the handed-over client's first message (a crash restart).
    after_crash: Option<crate::journal::InFlight>,
}

/// Refused clients (another VM's VMM, a stray process): their number decides how often.
static REFUSED_LOG: crate::log_limit::EveryNth = crate::log_limit::EveryNth::new();

impl DeviceServer {
    pub fn new(dev: Box<dyn AssignedDevice>, dma_check: DmaCheck, stop: StopSignal) -> Self {
        DeviceServer {
            slot: DeviceSlot::new(dev),
            dma_check,
            stop,
            on_connect: None,
            on_disconnect: None,
            on_dma_change: None,
            before_bus_master: None,
            on_keep: None,
            name: "device".to_string(),
            maps: DmaMaps::default(),
            peers: PeerPolicy::default(),
            message_timeout: MESSAGE_TIMEOUT,
            trace: None,
            irq_watch: None,
            reply_log: None,
            after_crash: None,
        }
    }

    /// Marks each message in hand in `log` and keeps its reply there before sending it, so that
    /// a daemon restarted after a kill answers it exactly once (see `recovery`).
    pub fn reply_log(mut self, log: crate::journal::ReplyLog) -> Self {
        self.reply_log = Some(log);
        self
    }

    /// A crash restart: `found` is what the journal held for the handed-over client's message
    /// in hand, which this server looks at first.
    pub fn after_crash(mut self, found: crate::journal::InFlight) -> Self {
        self.after_crash = Some(found);
        self
    }

    /// Watches the interrupt eventfds the client sets (see `irq_watch`).
    pub fn irq_watch(mut self, watch: Arc<crate::irq_watch::IrqWatch>) -> Self {
        self.irq_watch = Some(watch);
        self
    }

    /// Writes a line per message into the daemon's request trace while it is on.
    pub fn trace(mut self, trace: Arc<crate::trace::Tracer>) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The time a client has for its first message and for each whole message
    /// ([`MESSAGE_TIMEOUT`] by default).
    pub fn message_timeout(mut self, limit: Duration) -> Self {
        self.message_timeout = limit;
        self
    }

    /// Admits only clients with these credentials (the VMM's; see [`crate::peer`]).
    pub fn peers(mut self, peers: PeerPolicy) -> Self {
        self.peers = peers;
        self
    }

    /// A handle on the DMA maps of whichever client is connected.
    pub fn dma_maps(&self) -> DmaMaps {
        self.maps.clone()
    }

    /// A handle on the served device, to take it away and give it back (hot-plug).
    pub fn slot(&self) -> DeviceSlot {
        self.slot.clone()
    }

    /// The name used in log lines (e.g. the endpoint or PCI address).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn on_connect(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.on_connect = Some(Box::new(f));
        self
    }

    pub fn on_disconnect(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.on_disconnect = Some(Box::new(f));
        self
    }

    /// Runs `f` after every change of the client's DMA maps (a map, an unmap, the maps dropped
    /// at disconnect), once the change is visible in [`dma_maps`](Self::dma_maps).
    pub fn on_dma_change(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_dma_change = Some(Arc::new(f));
        self
    }

    /// Runs `f` before a config-space write that turns the device's bus mastering on is passed
    /// to the device (until then the device cannot DMA): e.g. to wait for the memory it may
    /// reach to be mapped.
    pub fn before_bus_master(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.before_bus_master = Some(Arc::new(f));
        self
    }

    /// Tells `f` what a crash-restarted daemon needs whenever it changes ([`KeepHook`]).
    pub fn on_keep(mut self, f: KeepHook) -> Self {
        self.on_keep = Some(f);
        self
    }

    /// Serves clients on `listener`, one at a time, until the stop signal fires (or a
    /// handover is asked for: see [`StopSignal::hand_over`]).
    pub fn serve(self, listener: UnixListener) -> io::Result<ServerEnd> {
        self.resume(listener, None)
    }

    /// Goes on serving what a handover returned (in this process after a failed upgrade, or
    /// in the next daemon): the listener, and the connection where it stopped. The DMA maps of
    /// that connection must be in [`dma_maps`](Self::dma_maps) already.
    pub fn resume(
        mut self,
        listener: UnixListener,
        mut resumed: Option<(UnixStream, ConnectionState)>,
    ) -> io::Result<ServerEnd> {
        listener.set_nonblocking(true)?;
        let keep = self.on_keep.clone();
        if let Some(k) = &keep {
            k(&listener, resumed.as_ref().map(|(s, st)| (s, st)));
        }
        loop {
            // A crash restart's journal entry is for the handed-over client alone.
            let redelivered = self.after_crash.take().filter(|_| resumed.is_some());
            let (stream, state) = match resumed.take() {
                Some(r) => r,
                None => match self.accept(&listener)? {
                    Some(stream) => (stream, ConnectionState::default()),
                    None if self.stop.is_stopped() => {
                        info!("vfio-user {}: stopped", self.name);
                        return Ok(ServerEnd::Stopped);
                    }
                    None => {
                        info!("vfio-user {}: handed over (no client)", self.name);
                        return Ok(ServerEnd::HandedOver(Box::new(HandedOverServer {
                            server: self,
                            listener,
                            connection: None,
                        })));
                    }
                },
            };
            let fresh = !state.negotiated;
            let taken = {
                let mut st = self.slot.lock();
                let generation = st.generation;
                let dev = st.dev.take();
                if dev.is_some() {
                    st.client = stream.try_clone().ok();
                }
                dev.map(|d| (d, generation))
            };
            let Some((dev, generation)) = taken else {
                refuse_unplugged(&stream, &self.name);
                continue;
            };
            if fresh {
                info!("vfio-user {}: client connected", self.name);
                if let Some(f) = self.on_connect.as_mut() {
                    f();
                }
            } else {
                info!("vfio-user {}: serving the handed-over client", self.name);
            }
            let keep_conn = keep.as_ref().map(|k| {
                let (k, listener, stream) = (k.clone(), &listener, &stream);
                move |st: &ConnectionState| k(listener, Some((stream, st)))
            });
            let mut conn =
                Connection::new(&*dev, &self.dma_check, &self.name, &self.maps).resumed(&state);
            conn.on_maps = self.on_dma_change.clone();
            conn.before_bus_master = self.before_bus_master.clone();
            conn.trace = self.trace.as_deref();
            conn.irq_watch = self.irq_watch.as_deref();
            conn.on_keep = keep_conn.as_ref().map(|f| f as &dyn Fn(&ConnectionState));
            conn.reply_log = self.reply_log.as_ref();
            conn.redelivered = redelivered;
            let ended = conn.run(&stream, &self.stop, self.message_timeout);
            if ended.is_ok() && self.stop.handing_over() && !self.stop.is_stopped() {
                // Between two messages: the connection passes on as it is.
                let state = conn.state();
                drop(conn);
                self.put_back(dev, generation);
                info!("vfio-user {}: handed over with its client", self.name);
                return Ok(ServerEnd::HandedOver(Box::new(HandedOverServer {
                    server: self,
                    listener,
                    connection: Some((stream, state)),
                })));
            }
            match ended {
                Ok(()) => info!("vfio-user {}: client disconnected", self.name),
                Err(e) => warn!("vfio-user {}: connection ended: {e}", self.name),
            }
            conn.on_keep = None;
            conn.cleanup();
            drop(conn);
            drop(keep_conn);
            // Forgotten before the socket closes: a restarted daemon never finds a dead client.
            if let Some(k) = &keep {
                k(&listener, None);
            }
            drop(stream);
            self.put_back(dev, generation);
            if let Some(f) = self.on_disconnect.as_mut() {
                f();
            }
        }
    }

    /// The connection is over: the device it used goes back into the slot, unless the host took
    /// it away meanwhile (then it is closed).
    fn put_back(&self, dev: Box<dyn AssignedDevice>, generation: u64) {
        let mut st = self.slot.lock();
        st.client = None;
        if st.generation == generation && st.dev.is_none() {
            st.dev = Some(dev);
        } else {
            info!(
                "vfio-user {}: the device was unplugged: closed it",
                self.name
            );
        }
    }

    /// The next admitted client; None once the stop signal fires or a handover is asked for.
    fn accept(&self, listener: &UnixListener) -> io::Result<Option<UnixStream>> {
        loop {
            if self.stop.is_stopped() || self.stop.handing_over() {
                return Ok(None);
            }
            if !scm::wait_readable(listener.as_fd(), self.stop.fd())? {
                continue;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or memory: keep the listener, try again shortly.
                    warn!("vfio-user {}: accept failed: {e}", self.name);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(e) = self.peers.check(&stream) {
                // Closed before anything is read: the device and its maps are never shown.
                if REFUSED_LOG.allow() {
                    warn!(
                        "vfio-user {}: refused a client ({} refused so far): {e}",
                        self.name,
                        REFUSED_LOG.seen()
                    );
                }
                continue;
            }
            return Ok(Some(stream));
        }
    }

    /// Serves on a thread named after the server.
    pub fn spawn(self, listener: UnixListener) -> io::Result<JoinHandle<io::Result<ServerEnd>>> {
        self.spawn_resumed(listener, None)
    }

    /// [`resume`](Self::resume) on a thread named after the server.
    pub fn spawn_resumed(
        self,
        listener: UnixListener,
        connection: Option<(UnixStream, ConnectionState)>,
    ) -> io::Result<JoinHandle<io::Result<ServerEnd>>> {
        self.spawn_resumed_after(listener, connection, None)
    }

    /// [`spawn_resumed`](Self::spawn_resumed), serving only once `go` says so: in a daemon
    /// that took the server over, not before the rest of the state is rebuilt (a message answered
    /// earlier would be unknown to the previous binary it may go back to). A `go` whose sender
    /// goes away unsent ends the server with nothing read.
    pub fn spawn_resumed_after(
        self,
        listener: UnixListener,
        connection: Option<(UnixStream, ConnectionState)>,
        go: Option<std::sync::mpsc::Receiver<()>>,
    ) -> io::Result<JoinHandle<io::Result<ServerEnd>>> {
        let thread = format!("vfio-user-{}", self.name);
        std::thread::Builder::new().name(thread).spawn(move || {
            if let Some(go) = go
                && go.recv().is_err()
            {
                info!(
                    "vfio-user {}: the handed-over state was not rebuilt",
                    self.name
                );
                return Ok(ServerEnd::Stopped);
            }
            self.resume(listener, connection)
        })
    }
}

/// What a connection negotiated that a handover carries (its DMA maps travel apart, in
/// [`DmaMaps`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionState {
    pub negotiated: bool,
    /// IRQ indexes (bit per index) the client set: disabled when it leaves.
    pub irqs_set: u32,
}

/// How a server's service ended.
pub enum ServerEnd {
    /// The stop signal fired: the last connection was cleaned up.
    Stopped,
    /// A handover was asked for: nothing was undone.
    HandedOver(Box<HandedOverServer>),
}

/// A server handed over between two messages: itself (to resume in this process), its
/// listener, and its connection with what it negotiated.
pub struct HandedOverServer {
    pub server: DeviceServer,
    pub listener: UnixListener,
    pub connection: Option<(UnixStream, ConnectionState)>,
}

/// Answers a client's first message with ENODEV and closes the connection: the device is
/// unplugged from vfio-pci on the host.
fn refuse_unplugged(stream: &UnixStream, name: &str) {
    warn!(
        "vfio-user {name}: refusing a client: the device is unplugged from vfio-pci on the host \
         (it is served again once it is bound to vfio-pci)"
    );
    let mut hb = [0u8; HEADER_SIZE];
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if io::Read::read_exact(&mut &*stream, &mut hb).is_ok() {
        let h = Header::decode(&hb);
        let _ = (&*stream).write_all(&error_reply(h.msg_id, h.command, libc::ENODEV));
    }
}

/// Serves `dev` on `listener` until `stop` fires: one client at a time, full cleanup after
/// each.
pub fn serve_device(
    listener: UnixListener,
    dev: Box<dyn AssignedDevice>,
    dma_check: DmaCheck,
    stop: StopSignal,
) -> io::Result<()> {
    DeviceServer::new(dev, dma_check, stop)
        .serve(listener)
        .map(drop)
}

/// Binds a listening socket at `path` with [`crate::listen::bind`]: a stale socket is replaced,
/// a live daemon's socket and anything that is not a socket are refused.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    Ok(crate::listen::bind(path)?)
}

/// Binds `socket_path` and serves `dev` there on a new thread: the one-call form for each
/// configured endpoint. The socket exists when this returns.
pub fn spawn_device_server(
    name: &str,
    socket_path: &Path,
    dev: Box<dyn AssignedDevice>,
    dma_check: DmaCheck,
    stop: StopSignal,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let listener = bind_socket(socket_path)?;
    let server = DeviceServer::new(dev, dma_check, stop).name(name);
    let thread = format!("vfio-user-{name}");
    std::thread::Builder::new()
        .name(thread)
        .spawn(move || server.serve(listener).map(drop))
}
