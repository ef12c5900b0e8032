//! One VMM connection's vhost-user conversation: the protocol state (ownership, negotiated
//! features, the memory table as the VMM sent it, the two rings' setup) and the vring thread.
//!
//! The `vhost` crate frames and checks the messages; this type answers them. Everything the
//! device state depends on (the memory table, `bypass`, resets, ring stops) goes to the device's
//! owner, the vring thread; this type keeps only what the protocol needs, and holds it where a
//! handover can read it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::{ByteValued, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::vring_thread::VringThread;
use super::wire::{self, Message, code, invalid};
use super::*;

mod mem_table;
mod restart;

use restart::ANSWERED;

use mem_table::{MAX_MEM_SLOTS, watch};
pub(super) use mem_table::{guest_memory, map_region};

/// Where one memory region lies in the VMM's address space (ring addresses arrive as VMM
/// virtual addresses).
#[derive(Clone, Copy, Debug)]
pub(super) struct VmmRegion {
    pub(super) user_addr: u64,
    pub(super) gpa: u64,
    pub(super) size: u64,
}

/// The vhost-user state of one connection (see `handover` for it as data).
pub struct Connection {
    pub(super) device: IommuDevice,
    /// The regions of the memory table in force, in the VMM's address space.
    pub(super) regions: Vec<VmmRegion>,
    /// The mapped regions of that table (each holds its file).
    pub(super) table: Vec<Arc<GuestRegionMmap>>,
    /// Those mappings, guarded against a SIGBUS when the VMM truncates a file (see `sigbus`).
    pub(super) watched: Vec<crate::sigbus::Watched>,
    pub(super) vrings: [VringRwLock; 2],
    /// The rings' error eventfds (kept for a handover; the device never signals them).
    pub(super) errs: [Option<File>; 2],
    pub(super) thread: VringThread,
    pub(super) owned: bool,
    pub(super) acked_features: u64,
    pub(super) acked_protocol_features: u64,
    /// The state last kept for a restarted daemon, with its fds' names (see `recovery`).
    pub(super) kept: Option<crate::recovery::KeptConnection>,
    /// The digest of the message being handled (see `wire::digest`).
    pub(super) answering: u64,
}

/// The most regions SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_TABLE_REGIONS: usize = 8;
/// The largest config-space access a message carries.
const MAX_CONFIG_ACCESS: usize = 256;
/// SET_VRING_KICK/CALL/ERR: bits 0-7 are the ring, this bit says no fd is passed.
const VRING_NOFD: u64 = 0x100;

/// A ring as a handover recorded it, with its eventfds.
pub(super) struct RestoredRing {
    pub(super) state: super::handover::RingState,
    pub(super) kick: Option<File>,
    pub(super) call: Option<File>,
    pub(super) err: Option<File>,
}

impl RestoredRing {
    /// Sets `vring` up as recorded (before any thread serves it); returns the error eventfd.
    fn restore(self, index: usize, vring: &VringRwLock) -> io::Result<Option<File>> {
        let r = &self.state;
        if r.size == 0 || usize::from(r.size) > MAX_QUEUE_SIZE || !r.size.is_power_of_two() {
            return Err(invalid(format!("ring {index}: size {}", r.size)));
        }
        vring.set_queue_size(r.size);
        vring
            .set_queue_info(r.desc, r.avail, r.used)
            .map_err(|e| invalid(format!("ring {index} addresses: {e}")))?;
        vring.set_queue_next_avail(r.next_avail);
        vring.set_queue_next_used(r.next_used);
        vring.set_queue_event_idx(r.event_idx);
        vring.set_enabled(r.enabled);
        vring.set_kick(self.kick);
        vring.set_call(self.call);
        vring.set_queue_ready(r.ready);
        Ok(self.err)
    }
}

/// Why [`Connection::serve`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The VMM closed the connection.
    Closed,
    /// A handover was asked for; the connection is intact.
    HandOver,
}

/// What answering a message produced: a reply with a body, or the outcome of a request that
/// has none (acknowledged when the VMM asked for it, REPLY_ACK).
enum Answer {
    Reply(Vec<u8>),
    Done(io::Result<()>),
}

fn reply_u64(v: u64) -> Answer {
    Answer::Reply(v.to_le_bytes().to_vec())
}

impl Connection {
    /// A new connection for `device` (fresh for each connection): creates its rings and starts
    /// its vring thread.
    pub fn new(device: IommuDevice) -> io::Result<Self> {
        Self::with_parts(device, Vec::new(), Vec::new(), false, 0, 0, Vec::new())
    }

    /// A connection with this protocol state and rings (set up as `rings` records, the rest
    /// fresh), its vring thread started once the rings are in place.
    pub(super) fn with_parts(
        device: IommuDevice,
        regions: Vec<VmmRegion>,
        table: Vec<Arc<GuestRegionMmap>>,
        owned: bool,
        acked_features: u64,
        acked_protocol_features: u64,
        rings: Vec<RestoredRing>,
    ) -> io::Result<Self> {
        let mem = device.memory();
        let ring = || {
            VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16)
                .map_err(|e| io::Error::other(format!("cannot create a vring: {e}")))
        };
        let vrings = [ring()?, ring()?];
        let mut errs = [None, None];
        for (i, r) in rings.into_iter().enumerate().take(vrings.len()) {
            errs[i] = r.restore(i, &vrings[i])?;
        }
        let thread = VringThread::start(device.clone(), vrings.clone())?;
        let conn = Connection {
            device,
            regions,
            watched: watch(&table),
            table,
            vrings,
            errs,
            thread,
            owned,
            acked_features,
            acked_protocol_features,
            kept: None,
            answering: 0,
        };
        for i in 0..conn.vrings.len() {
            conn.update_watch(i)?;
        }
        Ok(conn)
    }

    /// The connection is over: the vring thread ends (the device state has no owner thread
    /// afterwards; the caller tears it down).
    pub fn close(self) {
        let Connection {
            thread,
            device,
            kept,
            ..
        } = self;
        thread.stop();
        if let (Some(k), Some(kept)) = (device.keeper(), kept) {
            // A restarted daemon finds no connection to go on with.
            device.keep(None);
            k.forget(&kept.fds);
        }
    }

    fn vring(&self, index: u32) -> io::Result<VringRwLock> {
        self.vrings
            .get(index as usize)
            .cloned()
            .ok_or_else(|| invalid(format!("no ring {index}")))
    }

    /// Serves the ring's kicks only while it is started (kick fd and ready) and enabled.
    fn update_watch(&self, index: usize) -> io::Result<()> {
        let vring = &self.vrings[index];
        let g = vring.get_ref();
        let Some(kick) = g.get_kick() else {
            return Ok(());
        };
        let on = g.get_queue().ready() && g.is_enabled();
        self.thread.watch_kick(kick.as_raw_fd(), index, on)
    }

    /// A ring starts once it has its kick fd (vhost-user: "started" rings).
    fn start_if_ready(&self, index: usize) -> io::Result<()> {
        let vring = &self.vrings[index];
        let starts = {
            let g = vring.get_ref();
            !g.get_queue().ready() && g.get_kick().is_some()
        };
        if starts {
            vring.set_queue_ready(true);
        }
        self.update_watch(index)
    }
}

impl Connection {
    /// Answers the VMM's messages on `sock` until it closes the connection (`Closed`), `handover`
    /// becomes readable between two messages (`HandOver`: nothing is consumed from it), or a
    /// message fails (Err: the connection is over).
    pub fn serve(&mut self, sock: &UnixStream, handover: BorrowedFd<'_>) -> io::Result<Served> {
        loop {
            let ready = crate::scm::wait_any([handover, crate::sigbus::lost_fd(), sock.as_fd()])?;
            if ready == 0 {
                return Ok(Served::HandOver);
            }
            if ready == 1 {
                match crate::sigbus::take_lost() {
                    Some(addr) => {
                        return Err(io::Error::other(format!(
                            "guest RAM mapped at {addr:#x} is gone (SIGBUS): the VMM truncated a memory region's file under the daemon; ending the connection"
                        )));
                    }
                    None => continue,
                }
            }
            // Taken out of the socket once answered: a daemon killed meanwhile leaves it to
            // the next one (see `recovery`).
            let Some((msg, len)) = wire::peek(sock)? else {
                return Ok(Served::Closed);
            };
            let digest = wire::digest(&msg);
            if self.answered_before_crash(sock, &msg, digest, len)? {
                wire::consume(sock, len)?;
                self.mark(0);
                continue;
            }
            self.answering = digest;
            if let Err(e) = self.handle_message(sock, msg) {
                // The connection ends: the VMM sees it closed (not reset under unread bytes).
                let _ = wire::consume(sock, len);
                return Err(e);
            }
            // Answered: a kill before it is taken out must not have it answered again.
            self.mark(digest | ANSWERED);
            wire::consume(sock, len)?;
            self.mark(0);
        }
    }

    /// Answers one message from the VMM (and acknowledges it when asked to). An error ends the
    /// connection: the VMM broke the protocol, or the device refused what it asked.
    fn handle_message(&mut self, sock: &UnixStream, msg: Message) -> io::Result<()> {
        let header = msg.header;
        let request = header.request;
        let wants_reply = msg.wants_reply();
        let started = std::time::Instant::now();
        let answer = self.answer(msg);
        // What the VMM set up is kept before it hears about it.
        self.keep(request);
        if let Some(t) = self.device.trace() {
            let ok = matches!(answer, Ok(Answer::Reply(_)) | Ok(Answer::Done(Ok(()))));
            let latency_ns = started.elapsed().as_nanos() as u64;
            t.message("vhost-user", request, wire::name(request), ok, latency_ns);
        }
        match answer {
            Ok(Answer::Reply(body)) => {
                self.replying();
                wire::reply(sock, &header, &body)
            }
            Ok(Answer::Done(result)) => {
                if self.reply_ack() && wants_reply {
                    let status = u64::from(result.is_err());
                    self.replying();
                    wire::reply(sock, &header, &status.to_le_bytes())?;
                }
                result.map_err(|e| io::Error::new(e.kind(), format!("request {request}: {e}")))
            }
            Err(e) => Err(io::Error::new(e.kind(), format!("request {request}: {e}"))),
        }
    }

    /// REPLY_ACK was negotiated: every request that asks for it is acknowledged.
    fn reply_ack(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn require(&self, feature: VhostUserProtocolFeatures) -> io::Result<()> {
        if self.acked_protocol_features & feature.bits() == 0 {
            return Err(invalid(format!("{feature:?} was not negotiated")));
        }
        Ok(())
    }

    /// Decodes and applies one message. Err: it is malformed (nothing was applied).
    fn answer(&mut self, mut msg: Message) -> io::Result<Answer> {
        use code::*;
        let request = msg.header.request;
        let carries_fds = matches!(
            request,
            SET_MEM_TABLE | SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR | ADD_MEM_REG
        );
        if !carries_fds && !msg.fds.is_empty() {
            return Err(invalid(format!(
                "{} unexpected file descriptors",
                msg.fds.len()
            )));
        }
        let no_body = |m: &Message| {
            if m.payload.is_empty() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "unexpected payload of {} bytes",
                    m.payload.len()
                )))
            }
        };
        Ok(match request {
            GET_FEATURES => {
                no_body(&msg)?;
                reply_u64(IommuDevice::features())
            }
            SET_FEATURES => Answer::Done(self.set_features(msg.body::<u64>()?)),
            SET_OWNER => {
                no_body(&msg)?;
                Answer::Done(if self.owned {
                    Err(invalid("the connection already has its owner".into()))
                } else {
                    self.owned = true;
                    Ok(())
                })
            }
            RESET_OWNER => {
                no_body(&msg)?;
                self.owned = false;
                self.acked_features = 0;
                self.acked_protocol_features = 0;
                Answer::Done(Ok(()))
            }
            GET_PROTOCOL_FEATURES => {
                no_body(&msg)?;
                reply_u64(IommuDevice::protocol_features().bits())
            }
            SET_PROTOCOL_FEATURES => {
                let f = msg.body::<u64>()?;
                self.acked_protocol_features = f & IommuDevice::protocol_features().bits();
                Answer::Done(Ok(()))
            }
            GET_QUEUE_NUM => {
                self.require(VhostUserProtocolFeatures::MQ)?;
                no_body(&msg)?;
                reply_u64(self.vrings.len() as u64)
            }
            GET_MAX_MEM_SLOTS => {
                self.require(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
                no_body(&msg)?;
                reply_u64(MAX_MEM_SLOTS)
            }
            SET_MEM_TABLE => {
                let head = std::mem::size_of::<VhostUserMemory>();
                let each = std::mem::size_of::<VhostUserMemoryRegion>();
                let table = VhostUserMemory::from_slice(msg.payload.get(..head).unwrap_or(&[]))
                    .copied()
                    .ok_or_else(|| invalid("short memory table".into()))?;
                let n = table.num_regions as usize;
                if n > MAX_TABLE_REGIONS
                    || msg.payload.len() != head + n * each
                    || msg.fds.len() != n
                {
                    return Err(invalid(format!(
                        "memory table of {n} regions in {} bytes with {} fds",
                        msg.payload.len(),
                        msg.fds.len()
                    )));
                }
                let regions = msg.payload[head..]
                    .chunks_exact(each)
                    .map(|b| VhostUserMemoryRegion::from_slice(b).copied())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid("memory region".into()))?;
                Answer::Done(self.set_mem_table(&regions, std::mem::take(&mut msg.fds)))
            }
            ADD_MEM_REG => {
                self.require(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
                let r = msg.body::<VhostUserSingleMemoryRegion>()?;
                let fd = match (msg.fds.pop(), msg.fds.is_empty()) {
                    (Some(fd), true) => fd,
                    _ => return Err(invalid("a region needs exactly one fd".into())),
                };
                Answer::Done(self.add_mem_region(&r, fd))
            }
            REM_MEM_REG => {
                self.require(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
                let r = msg.body::<VhostUserSingleMemoryRegion>()?;
                Answer::Done(self.remove_mem_region(&r))
            }
            SET_VRING_NUM => {
                let s = msg.body::<VhostUserVringState>()?;
                Answer::Done(self.set_vring_num(s.index, s.num))
            }
            SET_VRING_ADDR => {
                let a = msg.body::<VhostUserVringAddr>()?;
                Answer::Done(self.set_vring_addr(&a))
            }
            SET_VRING_BASE => {
                let s = msg.body::<VhostUserVringState>()?;
                Answer::Done(
                    self.vring(s.index)
                        .map(|v| v.set_queue_next_avail(s.num as u16)),
                )
            }
            GET_VRING_BASE => {
                let s = msg.body::<VhostUserVringState>()?;
                let state = self.get_vring_base(s.index)?;
                Answer::Reply(state.as_slice().to_vec())
            }
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                let v = msg.body::<u64>()?;
                let fd = match (v & VRING_NOFD != 0, msg.fds.pop(), msg.fds.is_empty()) {
                    (true, None, _) => None,
                    (false, Some(fd), true) => Some(File::from(fd)),
                    _ => return Err(invalid("ring fd flag and passed fds disagree".into())),
                };
                let index = (v & 0xff) as usize;
                if index >= self.vrings.len() || v & !(0xff | VRING_NOFD) != 0 {
                    return Err(invalid(format!("ring fd request {v:#x}")));
                }
                Answer::Done(match request {
                    SET_VRING_KICK => self.set_vring_kick(index, fd),
                    SET_VRING_CALL => {
                        self.vrings[index].set_call(fd);
                        self.start_if_ready(index)
                    }
                    _ => {
                        self.errs[index] = fd;
                        Ok(())
                    }
                })
            }
            SET_VRING_ENABLE => {
                let s = msg.body::<VhostUserVringState>()?;
                Answer::Done(self.set_vring_enable(s.index, s.num != 0))
            }
            GET_CONFIG | SET_CONFIG => {
                self.require(VhostUserProtocolFeatures::CONFIG)?;
                let head = std::mem::size_of::<VhostUserConfig>();
                let c = VhostUserConfig::from_slice(msg.payload.get(..head).unwrap_or(&[]))
                    .copied()
                    .ok_or_else(|| invalid("short config message".into()))?;
                let size = c.size as usize;
                if size > MAX_CONFIG_ACCESS || msg.payload.len() != head + size {
                    return Err(invalid(format!(
                        "config access of {size} bytes in {} bytes",
                        msg.payload.len()
                    )));
                }
                if request == GET_CONFIG {
                    let data = self.device.get_config(c.offset, c.size);
                    let mut body = c.as_slice().to_vec();
                    body.extend_from_slice(&data);
                    Answer::Reply(body)
                } else {
                    Answer::Done(self.device.set_config(c.offset, &msg.payload[head..]))
                }
            }
            RESET_DEVICE => {
                self.require(VhostUserProtocolFeatures::RESET_DEVICE)?;
                no_body(&msg)?;
                Answer::Done(self.reset_device())
            }
            other => return Err(invalid(format!("request {other} is not supported"))),
        })
    }

    fn reset_device(&mut self) -> io::Result<()> {
        for (i, v) in self.vrings.iter().enumerate() {
            v.set_enabled(false);
            self.update_watch(i)?;
        }
        self.acked_features = 0;
        self.device.reset_device();
        Ok(())
    }

    fn set_features(&mut self, features: u64) -> io::Result<()> {
        if features & !IommuDevice::features() != 0 {
            return Err(invalid(format!("features {features:#x} were not offered")));
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES the rings are enabled at once; with it they
        // keep their state until SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (i, v) in self.vrings.iter().enumerate() {
                v.set_enabled(true);
                self.update_watch(i)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.device.acked_features(features);
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> io::Result<()> {
        let vring = self.vring(index)?;
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(invalid(format!("ring size {num}")));
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(&mut self, a: &VhostUserVringAddr) -> io::Result<()> {
        let vring = self.vring(a.index)?;
        let (desc, avail, used) = (
            self.to_gpa(a.descriptor)?,
            self.to_gpa(a.available)?,
            self.to_gpa(a.used)?,
        );
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| invalid(format!("ring addresses: {e}")))?;
        // The used index continues from what the ring holds (SET_VRING_BASE carries only the
        // avail index for split rings): 0 after a driver reset, where it stopped on a resume.
        let next_used = vring
            .queue_used_idx()
            .map_err(|e| invalid(format!("used ring: {e}")))?;
        vring.set_queue_next_used(next_used);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> io::Result<VhostUserVringState> {
        let vring = self.vring(index)?;
        // The ring stops here (vhost-user: GET_VRING_BASE stops a started ring).
        vring.set_queue_ready(false);
        self.update_watch(index as usize)?;
        if index as usize == REQUEST_QUEUE {
            self.device.stop_ring()?;
        }
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: usize, fd: Option<File>) -> io::Result<()> {
        let vring = self.vrings[index].clone();
        // The old kick stops being watched before it is closed.
        if let Some(old) = vring.get_ref().get_kick() {
            self.thread.watch_kick(old.as_raw_fd(), index, false)?;
        }
        vring.set_kick(fd);
        self.start_if_ready(index)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> io::Result<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(invalid("SET_VRING_ENABLE without PROTOCOL_FEATURES".into()));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize)
    }
}
