//! What a vfio-user server shares with other threads: the stop signal, the DMA maps the
//! client set up, and the slot that holds the device (taken away on host unplug).

use super::*;

/// Stops one or more servers: cheap to clone, level-triggered (once stopped, stays stopped).
#[derive(Clone)]
pub struct StopSignal(Arc<StopInner>);

struct StopInner {
    stopped: AtomicBool,
    /// A handover (planned upgrade) was asked for: servers return what they serve instead of
    /// cleaning up; cleared by [`StopSignal::rearm`].
    handover: AtomicBool,
    /// Readable once stopped: one byte is written and never read.
    rx: std::io::PipeReader,
    tx: std::io::PipeWriter,
}

impl StopSignal {
    pub fn new() -> io::Result<StopSignal> {
        let (rx, tx) = std::io::pipe()?;
        Ok(StopSignal(Arc::new(StopInner {
            stopped: AtomicBool::new(false),
            handover: AtomicBool::new(false),
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

    /// Makes every server using this signal return its listener and its connection as they
    /// are, between two messages, with nothing undone (see [`ServerEnd::HandedOver`]).
    pub fn hand_over(&self) {
        if !self.0.handover.swap(true, Ordering::SeqCst)
            && !self.is_stopped()
            && let Err(e) = (&self.0.tx).write_all(&[1])
        {
            warn!("vfio-user: cannot signal the handover: {e}");
        }
    }

    pub fn handing_over(&self) -> bool {
        self.0.handover.load(Ordering::SeqCst)
    }

    /// After a handover that did not happen (the upgrade failed), before the servers resume:
    /// the signal is quiet again unless a stop came meanwhile.
    pub fn rearm(&self) {
        if self.0.handover.swap(false, Ordering::SeqCst) && !self.is_stopped() {
            let mut b = [0u8; 1];
            if let Err(e) = std::io::Read::read_exact(&mut &self.0.rx, &mut b) {
                warn!("vfio-user: cannot rearm the stop signal: {e}");
            }
        }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
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
    pub(super) fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, DmaRegion>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded maps, by address.
    pub fn snapshot(&self) -> Vec<DmaRegion> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Puts back the maps a handed-over connection had recorded (the next daemon's server,
    /// before it resumes the connection).
    pub fn restore(&self, maps: Vec<DmaRegion>) {
        let mut m = self.lock();
        m.clear();
        m.extend(maps.into_iter().map(|r| (r.address, r)));
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The device a [`DeviceServer`] serves, which the host may take away (hot-unplug) and give
/// back (replug). Cheap to clone; [`DeviceServer::slot`] hands out the server's.
#[derive(Clone)]
pub struct DeviceSlot(Arc<Mutex<SlotState>>);

pub(super) struct SlotState {
    pub(super) dev: Option<Box<dyn AssignedDevice>>,
    /// Bumped by every `remove` and `put`: a device the server took out for a connection under
    /// an older generation is dropped afterwards, not put back.
    pub(super) generation: u64,
    /// The connected client's socket, shut down by `remove` to end the connection.
    pub(super) client: Option<UnixStream>,
}

impl DeviceSlot {
    pub fn new(dev: Box<dyn AssignedDevice>) -> DeviceSlot {
        DeviceSlot(Arc::new(Mutex::new(SlotState {
            dev: Some(dev),
            generation: 0,
            client: None,
        })))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
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
