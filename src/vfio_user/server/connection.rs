//! One client connection: each command handled in order and answered (or refused with an
//! errno), and what the connection leaves behind undone when it ends.

use super::*;

mod commands;

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
    /// Told which eventfds the client set for the device's interrupts.
    pub(super) irq_watch: Option<&'a crate::irq_watch::IrqWatch>,
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
            irq_watch: None,
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

    /// After a client: no IRQ may fire into its eventfds, the device starts afresh, and its
    /// DMA maps are forgotten. Only the indexes it set are disabled: the others hold nothing of
    /// its, and the request index holds the daemon's own eventfd.
    pub(super) fn cleanup(&mut self) {
        let info = self.dev.info();
        let set = std::mem::take(&mut self.irqs_set);
        if let Some(w) = self.irq_watch {
            w.forget(self.name);
        }
        for index in CLIENT_IRQ_INDEXES.filter(|i| set & (1 << i) != 0) {
            let off = IrqSet {
                flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count: 0,
                data: &[],
            };
            if let Err(e) = self.dev.set_irqs(&off, &[]) {
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
