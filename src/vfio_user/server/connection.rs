//! One client connection: each command handled in order and answered (or refused with an
//! errno), and what the connection leaves behind undone when it ends.

use super::*;

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

/// A DMA map's fd, duplicated, and which file it is (`st_dev`, `st_ino`).
fn map_file(fd: &OwnedFd) -> Result<(std::fs::File, (u64, u64)), Errno> {
    let f = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| Errno::from_io(&e, "dup of the DMA map fd"))?,
    );
    let md = f
        .metadata()
        .map_err(|e| Errno::from_io(&e, "fstat of the DMA map fd"))?;
    Ok((f, (md.dev(), md.ino())))
}

fn err(errno: i32, context: impl Into<std::borrow::Cow<'static, str>>) -> Errno {
    Errno::new(errno, context)
}

pub(super) struct Connection<'a> {
    dev: &'a dyn AssignedDevice,
    dma_check: &'a DmaCheck,
    name: &'a str,
    negotiated: bool,
    maps: &'a DmaMaps,
    pub(super) on_maps: Option<MapsHook>,
    /// Runs before a config write that turns bus mastering on reaches the device.
    pub(super) before_bus_master: Option<MapsHook>,
    /// IRQ indexes (bit per index) the client set, to disable after it.
    irqs_set: u32,
    /// The daemon's request trace: one line per message while it is on.
    pub(super) trace: Option<&'a crate::trace::Tracer>,
    /// Told what a restarted daemon needs after each message that changed it (see `recovery`).
    pub(super) on_keep: Option<&'a dyn Fn(&ConnectionState)>,
    /// The state last told to `on_keep`, and whether the DMA maps changed since.
    kept: Option<ConnectionState>,
    maps_dirty: bool,
    /// Where the message in hand is marked and its reply kept for a restarted daemon.
    pub(super) reply_log: Option<&'a crate::journal::ReplyLog>,
    /// What the journal held for this connection's first message after a crash restart.
    pub(super) redelivered: Option<crate::journal::InFlight>,
    /// The message in hand is the first after a crash restart: the dead daemon may have
    /// carried it out already.
    after_crash: bool,
    /// The digest of the message in hand (0: it was read out of the socket).
    answering: u64,
}

/// The journal's mark for the message in hand (its digest with these bits): its reply is going
/// out; it is answered.
const REPLYING: u64 = 1;
const ANSWERED: u64 = 2;

impl<'a> Connection<'a> {
    pub(super) fn new(
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
            before_bus_master: None,
            irqs_set: 0,
            trace: None,
            on_keep: None,
            kept: None,
            maps_dirty: false,
            reply_log: None,
            redelivered: None,
            after_crash: false,
            answering: 0,
        }
    }

    /// Goes on where a connection handed over in `state` stopped (its DMA maps are in `maps`
    /// already).
    pub(super) fn resumed(mut self, state: &ConnectionState) -> Self {
        self.negotiated = state.negotiated;
        self.irqs_set = state.irqs_set;
        self
    }

    /// What the next server needs to go on with this connection (beside its DMA maps).
    pub(super) fn state(&self) -> ConnectionState {
        ConnectionState {
            negotiated: self.negotiated,
            irqs_set: self.irqs_set,
        }
    }

    fn maps_changed(&mut self) {
        self.maps_dirty = true;
        if let Some(f) = &self.on_maps {
            f();
        }
    }

    /// Tells `on_keep` the connection as it is now, if it changed since it was last told.
    fn keep(&mut self) {
        let Some(f) = self.on_keep else { return };
        let now = self.state();
        if self.maps_dirty || self.kept.as_ref() != Some(&now) {
            f(&now);
            self.kept = Some(now);
            self.maps_dirty = false;
        }
    }

    /// Serves the client until it leaves or `stop` fires. Its first message must come within
    /// `limit` of the connect (unless it was handed over negotiated), and every message must arrive whole within `limit` of its first
    /// byte; between messages it may stay quiet as long as it likes (an idle VMM).
    pub(super) fn run(
        &mut self,
        stream: &UnixStream,
        stop: &StopSignal,
        limit: Duration,
    ) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        let sock = stream.as_fd();
        // A new client owes its first message; one handed over mid-life (negotiated) is an idle
        // VMM, which may stay quiet as long as it likes.
        let mut first_by = (!self.negotiated).then(|| Instant::now() + limit);
        loop {
            let received = receive(sock, stop, first_by, limit)?;
            first_by = None;
            match received {
                Received::Eof | Received::Stopped => return Ok(()),
                Received::Silent => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no message within {limit:?} of connecting"),
                    ));
                }
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
                    let (len, digest) = (m.in_socket, m.digest);
                    if self.answered_before_crash(sock, &m)? {
                        self.taken_out(sock, len, digest)?;
                        continue;
                    }
                    self.answering = digest;
                    let close = self.handle(sock, m);
                    self.after_crash = false;
                    // Answered: a kill before it is taken out must not have it answered again.
                    let taken = self.taken_out(sock, len, digest);
                    if close? {
                        return Ok(());
                    }
                    taken?;
                }
            }
        }
    }

    /// Whether `m`, the first message after a crash restart, was answered by the dead daemon:
    /// taken out without a second answer, or answered with the reply the journal kept (it is
    /// not carried out twice). Otherwise it is handled as the dead daemon may have left it
    /// half done (`after_crash`).
    fn answered_before_crash(&mut self, sock: BorrowedFd<'_>, m: &Msg) -> io::Result<bool> {
        let Some(found) = self.redelivered.take() else {
            return Ok(false);
        };
        self.after_crash = true;
        if m.in_socket == 0 || found.mark & !3 != m.digest {
            return Ok(false);
        }
        let what = format!(
            "crash restart: vfio-user {}: command {} (id {})",
            self.name, m.hdr.command, m.hdr.msg_id
        );
        if found.mark & ANSWERED != 0 {
            info!("{what} was answered before the crash: taken out");
            return Ok(true);
        }
        if crate::peek::reply_went_out(sock, m.in_socket)? {
            info!("{what} was answered before the crash (the reply went out): taken out");
            return Ok(true);
        }
        let Some(reply) = found.reply else {
            info!("{what} was being answered at the crash: handled again");
            return Ok(false);
        };
        info!("{what} was carried out before the crash: answered with the kept reply");
        self.mark(m.digest | REPLYING);
        scm::send_all(sock, &reply, None)?;
        Ok(true)
    }

    /// Takes the answered message of `len` bytes out of the socket, with the journal's marks
    /// around it (nothing to do for one read out already).
    fn taken_out(&mut self, sock: BorrowedFd<'_>, len: usize, digest: u64) -> io::Result<()> {
        self.answering = 0;
        if len == 0 {
            return Ok(());
        }
        self.mark(digest | ANSWERED);
        crate::peek::consume(sock, len)?;
        self.mark(0);
        Ok(())
    }

    fn mark(&self, mark: u64) {
        if let Some(log) = self.reply_log {
            log.mark(mark);
        }
    }

    /// Sends `bytes` (and `fd`) as the answer to the message in hand, kept in the journal
    /// first (see `answered_before_crash`).
    fn send(
        &self,
        sock: BorrowedFd<'_>,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        if let Some(log) = self.reply_log
            && self.answering != 0
        {
            log.replying(self.answering | REPLYING, fd.is_none().then_some(bytes));
        }
        scm::send_all(sock, bytes, fd)
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
                self.send(sock, &error_reply(h.msg_id, h.command, libc::EINVAL), None)?;
                return Ok(false);
            }
        }
        let version_refused = h.command == CMD_VERSION && !self.negotiated;
        let started = Instant::now();
        let result = self.dispatch(&m);
        if let Some(t) = self.trace.filter(|t| t.is_on()) {
            let fields = trace_fields(h.command, &m.payload);
            let msg = crate::trace::VfioUserMessage {
                command: h.command,
                name: command_name(h.command),
                id: h.msg_id,
                fields: &fields,
            };
            let errno = result.as_ref().err().map(|e| e.errno);
            t.vfio_user(self.name, msg, errno, started.elapsed().as_nanos() as u64);
        }
        // What the command changed is kept before the client hears of it.
        self.keep();
        // The reply's fd (if any) borrows the device; send before anything else happens.
        match result {
            Ok(r) => {
                if !h.no_reply() {
                    self.send(sock, &reply(&h, &r.payload), r.fd)?;
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
                    self.send(sock, &error_reply(h.msg_id, h.command, e.errno), None)?;
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
                self.gate_bus_master(a.region, a.offset, data);
                self.dev.write(a.region, a.offset, data)?;
                Ok(Reply::data(encode_region_access(&a, &[])))
            }
            CMD_REGION_WRITE_MULTI => {
                let writes = decode_write_multi(p)?;
                for w in &writes {
                    self.check_region_index(w.region)?;
                    self.gate_bus_master(w.region, w.offset, w.bytes());
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
        if self.after_crash && self.already_mapped(&m, fd) {
            info!(
                "crash restart: vfio-user {}: DMA map {:#x}+{:#x} was made before the crash",
                self.name, m.address, m.size
            );
            return Ok(Reply::empty());
        }
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
                let (f, id) = map_file(fd)?;
                (Some(id), Some(Arc::new(f)))
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

    /// Whether the maps hold exactly the map `m` asks for, from the same file.
    fn already_mapped(&self, m: &DmaMap, fd: Option<&OwnedFd>) -> bool {
        let file_id = fd.and_then(|fd| map_file(fd).ok()).map(|(_, id)| id);
        self.maps.lock().get(&m.address).is_some_and(|r| {
            (r.size, r.flags, r.offset, r.file_id) == (m.size, m.flags, m.offset, file_id)
        })
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
                    None if self.after_crash => {
                        info!(
                            "crash restart: vfio-user {}: DMA unmap {:#x}+{:#x} was made before the crash",
                            self.name, u.address, u.size
                        );
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

    /// Before a write of `data` at `offset` of region `region` reaches the device: if it turns
    /// bus mastering on, the `before_bus_master` hook runs first.
    fn gate_bus_master(&self, region: u32, offset: u64, data: &[u8]) {
        if let Some(f) = &self.before_bus_master
            && region == VFIO_PCI_CONFIG_REGION_INDEX
            && sets_bus_master(offset, data)
        {
            f();
        }
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
    pub(super) fn cleanup(&mut self) {
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

/// Whether a config-space write of `data` at `offset` sets the command register's bus master
/// bit (it lies in the register's low byte).
pub(super) fn sets_bus_master(offset: u64, data: &[u8]) -> bool {
    PCI_COMMAND
        .checked_sub(offset)
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| data.get(i))
        .is_some_and(|b| u16::from(*b) & PCI_COMMAND_MASTER != 0)
}

/// The members of a vfio-user message's trace line that say what it asked (addresses in hex),
/// from its payload; empty for messages without such fields or that do not decode.
fn trace_fields(command: u16, p: &[u8]) -> String {
    match command {
        CMD_DMA_MAP => decode_dma_map(p).map(|m| {
            format!(
                "\"iova\":\"{:#x}\",\"size\":\"{:#x}\",\"offset\":\"{:#x}\",\"flags\":{}",
                m.address, m.size, m.offset, m.flags
            )
        }),
        CMD_DMA_UNMAP => decode_dma_unmap(p).map(|u| {
            format!(
                "\"iova\":\"{:#x}\",\"size\":\"{:#x}\",\"flags\":{}",
                u.address, u.size, u.flags
            )
        }),
        CMD_REGION_READ => decode_region_read(p).map(|a| region_fields(&a)),
        CMD_REGION_WRITE => decode_region_write(p).map(|(a, _)| region_fields(&a)),
        CMD_DEVICE_SET_IRQS => decode_irq_set(p).map(|s| {
            format!(
                "\"index\":{},\"start\":{},\"count\":{},\"flags\":{}",
                s.index, s.start, s.count, s.flags
            )
        }),
        CMD_DEVICE_GET_REGION_INFO => {
            decode_region_info_req(p).map(|r| format!("\"index\":{}", r.index))
        }
        CMD_DEVICE_GET_IRQ_INFO => decode_irq_info_req(p).map(|i| format!("\"index\":{i}")),
        _ => Ok(String::new()),
    }
    .unwrap_or_default()
}

fn region_fields(a: &RegionAccess) -> String {
    format!(
        "\"region\":{},\"offset\":\"{:#x}\",\"count\":{}",
        a.region, a.offset, a.count
    )
}

#[cfg(test)]
mod tests {
    use super::sets_bus_master;

    #[test]
    fn a_write_sets_bus_master_only_where_it_covers_the_bit() {
        // The command register alone, and as part of a dword from the device ID.
        assert!(sets_bus_master(4, &[0x04]));
        assert!(sets_bus_master(4, &[0x06, 0x00]));
        assert!(sets_bus_master(2, &[0x00, 0x00, 0x07, 0x01]));
        // Other bits of the register, its high byte, writes beside it.
        assert!(!sets_bus_master(4, &[0x03, 0xff]));
        assert!(!sets_bus_master(5, &[0xff]));
        assert!(!sets_bus_master(0, &[0xff; 4]));
        assert!(!sets_bus_master(6, &[0xff; 2]));
        // Offsets no arithmetic may wrap on.
        assert!(!sets_bus_master(u64::MAX, &[0xff; 8]));
        assert!(!sets_bus_master(u64::MAX - 2, &[0xff; 8]));
    }
}
