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
use std::time::Duration;

use log::{debug, info, warn};

use super::device::{AssignedDevice, Errno};
use super::protocol::*;
use super::scm;

/// Decides whether a guest-physical range `(gpa, len)` is entirely guest RAM (the vhost-user
/// memory table's view).
pub type DmaCheck = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// How long a reply may wait for the client to make room in the socket before the
/// connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops one or more servers: cheap to clone, level-triggered (once stopped, stays stopped).
#[derive(Clone)]
pub struct StopSignal(Arc<StopInner>);

struct StopInner {
    stopped: AtomicBool,
    /// Readable once stopped: one byte is written and never read.
    rx: std::io::PipeReader,
    tx: std::io::PipeWriter,
}

impl StopSignal {
    pub fn new() -> io::Result<StopSignal> {
        let (rx, tx) = std::io::pipe()?;
        Ok(StopSignal(Arc::new(StopInner {
            stopped: AtomicBool::new(false),
            rx,
            tx,
        })))
    }

    /// Makes every server using this signal finish its connection (with the usual cleanup)
    /// and return.
    pub fn stop(&self) {
        if !self.0.stopped.swap(true, Ordering::SeqCst)
            && let Err(e) = (&self.0.tx).write_all(&[1])
        {
            warn!("vfio-user: cannot signal stop: {e}");
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.rx.as_fd()
    }
}

/// One DMA_MAP the client made, as recorded (never mapped for the device).
#[derive(Clone, Debug)]
pub struct DmaRegion {
    pub address: u64,
    pub size: u64,
    pub flags: u32,
    /// Offset in the client's fd (meaningful only with one).
    pub offset: u64,
    /// `(st_dev, st_ino)` of the fd that came with the map; `None` for maps without one (ROM
    /// ranges, peer-to-peer maps of BARs).
    pub file_id: Option<(u64, u64)>,
    /// The fd itself (a duplicate), for describing guest RAM before the memory table (see
    /// `boot_ram`).
    pub file: Option<Arc<std::fs::File>>,
}

/// The DMA maps the current client has recorded, shared with whoever wants to look at them
/// (e.g. to re-check them once the vhost-user memory table is known). Empty between clients.
#[derive(Clone, Default)]
pub struct DmaMaps(Arc<Mutex<BTreeMap<u64, DmaRegion>>>);

impl DmaMaps {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, DmaRegion>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded maps, by address.
    pub fn snapshot(&self) -> Vec<DmaRegion> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

type Hook = Box<dyn FnMut() + Send>;
/// Called on the server thread after the client's DMA maps changed (with no lock held).
type MapsHook = Arc<dyn Fn() + Send + Sync>;

/// The device a [`DeviceServer`] serves, which the host may take away (hot-unplug) and give
/// back (replug). Cheap to clone; [`DeviceServer::slot`] hands out the server's.
#[derive(Clone)]
pub struct DeviceSlot(Arc<Mutex<SlotState>>);

struct SlotState {
    dev: Option<Box<dyn AssignedDevice>>,
    /// Bumped by every `remove` and `put`: a device the server took out for a connection under
    /// an older generation is dropped afterwards, not put back.
    generation: u64,
    /// The connected client's socket, shut down by `remove` to end the connection.
    client: Option<UnixStream>,
}

impl DeviceSlot {
    pub fn new(dev: Box<dyn AssignedDevice>) -> DeviceSlot {
        DeviceSlot(Arc::new(Mutex::new(SlotState {
            dev: Some(dev),
            generation: 0,
            client: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the device away: dropped at once when no client is connected; otherwise the
    /// connection is shut down and the server drops the device after its cleanup. Clients are
    /// refused (ENODEV) until [`put`](Self::put).
    pub fn remove(&self) {
        let mut st = self.lock();
        st.generation += 1;
        drop(st.dev.take());
        if let Some(c) = st.client.take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Serves `dev` again (after a replug).
    pub fn put(&self, dev: Box<dyn AssignedDevice>) {
        let mut st = self.lock();
        st.generation += 1;
        st.dev = Some(dev);
    }

    /// Whether a device is there to serve (it may be in use by the connected client).
    pub fn is_present(&self) -> bool {
        let st = self.lock();
        st.dev.is_some() || st.client.is_some()
    }
}

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
    name: String,
    maps: DmaMaps,
}

impl DeviceServer {
    pub fn new(dev: Box<dyn AssignedDevice>, dma_check: DmaCheck, stop: StopSignal) -> Self {
        DeviceServer {
            slot: DeviceSlot::new(dev),
            dma_check,
            stop,
            on_connect: None,
            on_disconnect: None,
            on_dma_change: None,
            name: "device".to_string(),
            maps: DmaMaps::default(),
        }
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

    /// Serves clients on `listener`, one at a time, until the stop signal fires.
    pub fn serve(mut self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        loop {
            if self.stop.is_stopped() || !scm::wait_readable(listener.as_fd(), self.stop.fd())? {
                info!("vfio-user {}: stopped", self.name);
                return Ok(());
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
            info!("vfio-user {}: client connected", self.name);
            if let Some(f) = self.on_connect.as_mut() {
                f();
            }
            let mut conn = Connection::new(&*dev, &self.dma_check, &self.name, &self.maps);
            conn.on_maps = self.on_dma_change.clone();
            match conn.run(&stream, &self.stop) {
                Ok(()) => info!("vfio-user {}: client disconnected", self.name),
                Err(e) => warn!("vfio-user {}: connection ended: {e}", self.name),
            }
            drop(stream);
            conn.cleanup();
            {
                let mut st = self.slot.lock();
                st.client = None;
                if st.generation == generation && st.dev.is_none() {
                    st.dev = Some(dev);
                } else {
                    info!(
                        "vfio-user {}: the device was unplugged: closed it",
                        self.name
                    );
                    drop(dev);
                }
            }
            if let Some(f) = self.on_disconnect.as_mut() {
                f();
            }
        }
    }

    /// Serves on a thread named after the server.
    pub fn spawn(self, listener: UnixListener) -> io::Result<JoinHandle<io::Result<()>>> {
        let thread = format!("vfio-user-{}", self.name);
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || self.serve(listener))
    }
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
    DeviceServer::new(dev, dma_check, stop).serve(listener)
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
    DeviceServer::new(dev, dma_check, stop)
        .name(name)
        .spawn(listener)
}

/// One received message.
struct Msg {
    hdr: Header,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
}

enum Received {
    Msg(Msg),
    /// A header whose size is below the header's own: answered, nothing else to read.
    Undersized(Header),
    /// A header whose size is beyond any message we accept: answered, then the stream is
    /// abandoned (its remainder cannot be trusted or skipped).
    Oversized(Header),
    Eof,
    Stopped,
}

/// What handling a command produced.
struct Reply<'d> {
    payload: Vec<u8>,
    fd: Option<BorrowedFd<'d>>,
}

impl Reply<'_> {
    fn empty() -> Self {
        Reply {
            payload: Vec::new(),
            fd: None,
        }
    }
    fn data(payload: Vec<u8>) -> Self {
        Reply { payload, fd: None }
    }
}

fn err(errno: i32, context: impl Into<std::borrow::Cow<'static, str>>) -> Errno {
    Errno::new(errno, context)
}

struct Connection<'a> {
    dev: &'a dyn AssignedDevice,
    dma_check: &'a DmaCheck,
    name: &'a str,
    negotiated: bool,
    maps: &'a DmaMaps,
    on_maps: Option<MapsHook>,
    /// IRQ indexes (bit per index) the client set, to disable after it.
    irqs_set: u32,
}

impl<'a> Connection<'a> {
    fn new(
        dev: &'a dyn AssignedDevice,
        dma_check: &'a DmaCheck,
        name: &'a str,
        maps: &'a DmaMaps,
    ) -> Self {
        Connection {
            dev,
            dma_check,
            name,
            negotiated: false,
            maps,
            on_maps: None,
            irqs_set: 0,
        }
    }

    fn maps_changed(&self) {
        if let Some(f) = &self.on_maps {
            f();
        }
    }

    fn run(&mut self, stream: &UnixStream, stop: &StopSignal) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        let sock = stream.as_fd();
        loop {
            match receive(sock, stop)? {
                Received::Eof | Received::Stopped => return Ok(()),
                Received::Undersized(h) => {
                    warn!(
                        "vfio-user {}: message {} claims size {} (< header)",
                        self.name, h.msg_id, h.message_size
                    );
                    scm::send_all(sock, &error_reply(h.msg_id, h.command, libc::EINVAL), None)?;
                }
                Received::Oversized(h) => {
                    scm::send_all(sock, &error_reply(h.msg_id, h.command, libc::E2BIG), None)?;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "message {} claims size {} (> {MAX_MSG_SIZE}); closing",
                            h.msg_id, h.message_size
                        ),
                    ));
                }
                Received::Msg(m) => {
                    let close = self.handle(sock, m)?;
                    if close {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles one message and sends its reply; returns whether to close the connection.
    fn handle(&mut self, sock: BorrowedFd<'_>, m: Msg) -> io::Result<bool> {
        let h = m.hdr;
        match h.msg_type() {
            FLAG_TYPE_COMMAND => {}
            FLAG_TYPE_REPLY => {
                // We send no commands, so there is nothing this could answer.
                warn!(
                    "vfio-user {}: unexpected reply (id {}, command {}) ignored",
                    self.name, h.msg_id, h.command
                );
                return Ok(false);
            }
            t => {
                warn!("vfio-user {}: message type {t} refused", self.name);
                scm::send_all(sock, &error_reply(h.msg_id, h.command, libc::EINVAL), None)?;
                return Ok(false);
            }
        }
        let version_refused = h.command == CMD_VERSION && !self.negotiated;
        let result = self.dispatch(&m);
        // The reply's fd (if any) borrows the device; send before anything else happens.
        match result {
            Ok(r) => {
                if !h.no_reply() {
                    scm::send_all(sock, &reply(&h, &r.payload), r.fd)?;
                }
                Ok(false)
            }
            Err(e) => {
                debug!(
                    "vfio-user {}: command {} (id {}) failed: {e}",
                    self.name, h.command, h.msg_id
                );
                if h.no_reply() {
                    warn!(
                        "vfio-user {}: command {} (no reply requested) failed: {e}",
                        self.name, h.command
                    );
                } else {
                    scm::send_all(sock, &error_reply(h.msg_id, h.command, e.errno), None)?;
                }
                // A client whose version we cannot speak gets its error, then the door.
                Ok(version_refused)
            }
        }
    }

    fn dispatch(&mut self, m: &Msg) -> Result<Reply<'a>, Errno> {
        let h = &m.hdr;
        let p = &m.payload[..];
        if m.fds_truncated {
            return Err(err(
                libc::EINVAL,
                format!("more than {MAX_MSG_FDS} file descriptors"),
            ));
        }
        let takes_fds = match h.command {
            CMD_DMA_MAP => 1,
            CMD_DEVICE_SET_IRQS => MAX_MSG_FDS,
            _ => 0,
        };
        if m.fds.len() > takes_fds {
            return Err(err(
                libc::EINVAL,
                format!(
                    "command {} came with {} file descriptors",
                    h.command,
                    m.fds.len()
                ),
            ));
        }
        if !self.negotiated && h.command != CMD_VERSION {
            return Err(err(libc::EINVAL, "VERSION must come first"));
        }
        match h.command {
            CMD_VERSION => self.version(p),
            CMD_DMA_MAP => self.dma_map(p, m.fds.first()),
            CMD_DMA_UNMAP => self.dma_unmap(p),
            CMD_DEVICE_GET_INFO => {
                decode_device_info_req(p)?;
                Ok(Reply::data(encode_device_info(&self.dev.info())))
            }
            CMD_DEVICE_GET_REGION_INFO => self.region_info(p),
            CMD_DEVICE_GET_REGION_IO_FDS => {
                Err(err(libc::ENOTSUP, "GET_REGION_IO_FDS is not supported"))
            }
            CMD_DEVICE_GET_IRQ_INFO => {
                let index = decode_irq_info_req(p)?;
                self.check_irq_index(index)?;
                let info = self.dev.irq_info(index)?;
                Ok(Reply::data(encode_irq_info(index, &info)))
            }
            CMD_DEVICE_SET_IRQS => self.set_irqs(p, &m.fds),
            CMD_REGION_READ => {
                let a = decode_region_read(p)?;
                self.check_region_index(a.region)?;
                let mut data = vec![0u8; a.count as usize];
                self.dev.read(a.region, a.offset, &mut data)?;
                Ok(Reply::data(encode_region_access(&a, &data)))
            }
            CMD_REGION_WRITE => {
                let (a, data) = decode_region_write(p)?;
                self.check_region_index(a.region)?;
                self.dev.write(a.region, a.offset, data)?;
                Ok(Reply::data(encode_region_access(&a, &[])))
            }
            CMD_REGION_WRITE_MULTI => {
                let writes = decode_write_multi(p)?;
                for w in &writes {
                    self.check_region_index(w.region)?;
                    self.dev.write(w.region, w.offset, w.bytes())?;
                }
                Ok(Reply::data((writes.len() as u64).to_ne_bytes().to_vec()))
            }
            CMD_DEVICE_RESET => {
                self.dev.reset()?;
                Ok(Reply::empty())
            }
            CMD_DMA_READ | CMD_DMA_WRITE => Err(err(
                libc::EINVAL,
                "DMA_READ/DMA_WRITE are server-to-client commands",
            )),
            // What the kernel answers for a feature it does not have.
            CMD_DEVICE_FEATURE => Err(err(libc::ENOTTY, "device features are not supported")),
            CMD_MIG_DATA_READ | CMD_MIG_DATA_WRITE => {
                Err(err(libc::ENOTSUP, "migration is not supported"))
            }
            c => Err(err(libc::ENOSYS, format!("unknown command {c}"))),
        }
    }

    fn version(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        if self.negotiated {
            return Err(err(libc::EINVAL, "VERSION already negotiated"));
        }
        let v = decode_version(p)?;
        if v.major != 0 {
            return Err(err(
                libc::ENOTSUP,
                format!("protocol version {}.{} (we speak 0.0)", v.major, v.minor),
            ));
        }
        self.negotiated = true;
        debug!(
            "vfio-user {}: client version {}.{} capabilities {:?}",
            self.name, v.major, v.minor, v.capabilities
        );
        // QEMU receives the reply into its request's buffer: ours (about 120 bytes of JSON)
        // must stay smaller than what it offers (about 200).
        Ok(Reply::data(encode_version_reply(
            client_offers_write_multiple(&v),
        )))
    }

    fn dma_map(&mut self, p: &[u8], fd: Option<&OwnedFd>) -> Result<Reply<'a>, Errno> {
        let m = decode_dma_map(p)?;
        let end = m.address + m.size;
        if self.maps.len() >= MAX_DMA_MAPS {
            return Err(err(
                libc::ENOSPC,
                format!("more than {MAX_DMA_MAPS} DMA maps"),
            ));
        }
        if let Some((_, prev)) = self.maps.lock().range(..end).next_back()
            && prev.address + prev.size > m.address
        {
            return Err(err(
                libc::EEXIST,
                format!(
                    "DMA map {:#x}+{:#x} overlaps {:#x}+{:#x}",
                    m.address, m.size, prev.address, prev.size
                ),
            ));
        }
        // Only this thread changes the maps, so nothing new can overlap meanwhile; the check
        // runs without the lock held.
        let (file_id, file) = match fd {
            Some(fd) => {
                if !(self.dma_check)(m.address, m.size) {
                    return Err(err(
                        libc::EFAULT,
                        format!(
                            "DMA map {:#x}+{:#x} is not inside guest RAM",
                            m.address, m.size
                        ),
                    ));
                }
                let f = std::fs::File::from(
                    fd.try_clone()
                        .map_err(|e| Errno::from_io(&e, "dup of the DMA map fd"))?,
                );
                let md = f
                    .metadata()
                    .map_err(|e| Errno::from_io(&e, "fstat of the DMA map fd"))?;
                (Some((md.dev(), md.ino())), Some(Arc::new(f)))
            }
            None => (None, None),
        };
        debug!(
            "vfio-user {}: DMA map {:#x}+{:#x} flags {:#x} offset {:#x} fd {}",
            self.name,
            m.address,
            m.size,
            m.flags,
            m.offset,
            fd.is_some()
        );
        self.maps.lock().insert(
            m.address,
            DmaRegion {
                address: m.address,
                size: m.size,
                flags: m.flags,
                offset: m.offset,
                file_id,
                file,
            },
        );
        self.maps_changed();
        Ok(Reply::empty())
    }

    fn dma_unmap(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        let u = decode_dma_unmap(p)?;
        {
            let mut maps = self.maps.lock();
            if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
                maps.clear();
            } else {
                match maps.get(&u.address) {
                    Some(r) if r.size == u.size => {
                        maps.remove(&u.address);
                    }
                    _ => {
                        return Err(err(
                            libc::ENOENT,
                            format!("no DMA map is exactly {:#x}+{:#x}", u.address, u.size),
                        ));
                    }
                }
            }
        }
        self.maps_changed();
        Ok(Reply::data(encode_dma_unmap_reply(&u)))
    }

    fn check_region_index(&self, index: u32) -> Result<(), Errno> {
        if index >= self.dev.info().num_regions {
            return Err(err(libc::EINVAL, format!("no region {index}")));
        }
        Ok(())
    }

    fn check_irq_index(&self, index: u32) -> Result<(), Errno> {
        if index == VFIO_PCI_REQ_IRQ_INDEX {
            return Err(err(
                libc::EPERM,
                format!("IRQ index {index} (REQ) is the daemon's hot-unplug watcher's"),
            ));
        }
        if !CLIENT_IRQ_INDEXES.contains(&index) || index >= self.dev.info().num_irqs {
            return Err(err(libc::EINVAL, format!("no IRQ index {index}")));
        }
        Ok(())
    }

    fn region_info(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        let req = decode_region_info_req(p)?;
        self.check_region_index(req.index)?;
        let mut info = self.dev.region_info(req.index)?;
        // Without MSIX_MAPPABLE the VMM keeps the MSI-X table out of its mmap and emulates it.
        info.caps
            .retain(|c| c.id != VFIO_REGION_INFO_CAP_MSIX_MAPPABLE);
        let fd = self.dev.region_fd();
        let mmap = info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && fd.is_some() && info.size > 0;
        if mmap {
            if info.cap(VFIO_REGION_INFO_CAP_SPARSE_MMAP).is_none() {
                info.caps.push(RegionCap::sparse_mmap(&[SparseArea {
                    offset: 0,
                    size: info.size,
                }]));
            }
        } else {
            info.flags &= !VFIO_REGION_INFO_FLAG_MMAP;
            info.caps
                .retain(|c| c.id != VFIO_REGION_INFO_CAP_SPARSE_MMAP);
        }
        let argsz = req.argsz.min(MAX_REGION_INFO_SIZE as u32);
        let (payload, full) = encode_region_info(req.index, &info, argsz);
        Ok(Reply {
            payload,
            fd: if full && mmap { fd } else { None },
        })
    }

    fn set_irqs(&mut self, p: &[u8], fds: &[OwnedFd]) -> Result<Reply<'a>, Errno> {
        let s = decode_irq_set(p)?;
        self.check_irq_index(s.index)?;
        let raw: Vec<RawFd> = if s.data_type() == VFIO_IRQ_SET_DATA_EVENTFD {
            if fds.is_empty() {
                // Vectors without an eventfd (de-assign): -1 for each.
                vec![-1; s.count as usize]
            } else if fds.len() == s.count as usize {
                fds.iter().map(|f| f.as_raw_fd()).collect()
            } else {
                return Err(err(
                    libc::EINVAL,
                    format!("{} eventfds for {} vectors", fds.len(), s.count),
                ));
            }
        } else {
            if !fds.is_empty() {
                return Err(err(libc::EINVAL, "file descriptors without DATA_EVENTFD"));
            }
            Vec::new()
        };
        self.dev
            .set_irqs(s.index, s.flags, s.start, s.count, &raw, s.data)?;
        self.irqs_set |= 1 << s.index;
        // Our copies of the eventfds close when the message drops; the device holds its own.
        Ok(Reply::empty())
    }

    /// After a client: no IRQ may fire into its eventfds, the device starts afresh, and its
    /// DMA maps are forgotten. Only the indexes it set are disabled: the others hold nothing of
    /// its, and the request index holds the daemon's own eventfd.
    fn cleanup(&mut self) {
        let info = self.dev.info();
        let set = std::mem::take(&mut self.irqs_set);
        for index in CLIENT_IRQ_INDEXES.filter(|i| set & (1 << i) != 0) {
            if let Err(e) = self.dev.set_irqs(
                index,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                &[],
                &[],
            ) {
                debug!("vfio-user {}: disabling IRQ index {index}: {e}", self.name);
            }
        }
        if info.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
            if let Err(e) = self.dev.reset() {
                warn!("vfio-user {}: reset after disconnect: {e}", self.name);
            }
        } else {
            // No reset method (no FLR or PM reset, not alone on its bus): the IOMMU already
            // blocks its DMA; also stop it from initiating any.
            match self.clear_bus_master() {
                Ok(()) => debug!(
                    "vfio-user {}: no reset method, bus mastering cleared",
                    self.name
                ),
                Err(e) => warn!(
                    "vfio-user {}: clearing bus mastering after disconnect: {e}",
                    self.name
                ),
            }
        }
        let had_maps = !self.maps.is_empty();
        self.maps.lock().clear();
        if had_maps {
            self.maps_changed();
        }
        self.negotiated = false;
    }

    fn clear_bus_master(&self) -> Result<(), Errno> {
        let mut cmd = [0u8; 2];
        self.dev
            .read(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
        self.dev.write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            PCI_COMMAND,
            &cmd.to_le_bytes(),
        )
    }
}

/// The PCI command register and its bus-master enable bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Reads exactly `buf.len()` bytes (collecting fds); false if the stream ended first with
/// nothing read (`at_start`) — an end mid-message is an error.
fn read_full(
    sock: BorrowedFd<'_>,
    stop: &StopSignal,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
    at_start: bool,
) -> io::Result<Option<bool>> {
    let mut got = 0;
    while got < buf.len() {
        if !scm::wait_readable(sock, stop.fd())? {
            return Ok(None);
        }
        let (n, t) = scm::recv_some(sock, &mut buf[got..], fds)?;
        *truncated |= t;
        if fds.len() > MAX_MSG_FDS {
            *truncated = true;
            fds.truncate(MAX_MSG_FDS);
        }
        if n == 0 {
            if at_start && got == 0 {
                return Ok(Some(false));
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the socket mid-message",
            ));
        }
        got += n;
    }
    Ok(Some(true))
}

fn receive(sock: BorrowedFd<'_>, stop: &StopSignal) -> io::Result<Received> {
    let mut fds = Vec::new();
    let mut truncated = false;
    let mut hb = [0u8; HEADER_SIZE];
    match read_full(sock, stop, &mut hb, &mut fds, &mut truncated, true)? {
        None => return Ok(Received::Stopped),
        Some(false) => return Ok(Received::Eof),
        Some(true) => {}
    }
    let hdr = Header::decode(&hb);
    let size = hdr.message_size as usize;
    if size < HEADER_SIZE {
        return Ok(Received::Undersized(hdr));
    }
    if size > MAX_MSG_SIZE {
        return Ok(Received::Oversized(hdr));
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    if read_full(sock, stop, &mut payload, &mut fds, &mut truncated, false)?.is_none() {
        return Ok(Received::Stopped);
    }
    Ok(Received::Msg(Msg {
        hdr,
        payload,
        fds,
        fds_truncated: truncated,
    }))
}
