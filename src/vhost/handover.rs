//! A live connection's vhost-user state as data, and a connection rebuilt from it: what a new
//! `Connection` needs to go on serving the same VMM, on the same socket, without the VMM
//! noticing (the vhost-user half of a daemon upgrade, issue 16).
//!
//! The state is plain data (JSON) plus a list of file descriptors it refers to by index: the
//! memory regions' files and the rings' kick, call and error eventfds. The VMM's socket travels
//! beside it. The format is versioned: a reader refuses a version it does not know.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::GuestRegionMmap;

use super::connection::{Connection, RestoredRing, VmmRegion, guest_memory, map_region};
use super::*;

/// The version of [`ConnectionState`] this binary writes and reads.
pub const STATE_VERSION: u32 = 1;

/// One memory region of the table in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    /// Index of the region's file in the fd list.
    pub fd: usize,
}

/// One ring as the device last left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub ready: bool,
    pub enabled: bool,
    pub event_idx: bool,
    /// Indices in the fd list.
    pub kick: Option<usize>,
    pub call: Option<usize>,
    pub err: Option<usize>,
}

/// Everything negotiated on one vhost-user connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    pub version: u32,
    pub owned: bool,
    pub acked_features: u64,
    pub acked_protocol_features: u64,
    pub regions: Vec<RegionState>,
    pub rings: Vec<RingState>,
}

impl ConnectionState {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|e| unreachable!("plain data serializes: {e}"))
    }

    /// Parses a state, refusing a version this binary does not read.
    pub fn from_bytes(bytes: &[u8]) -> io::Result<Self> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(bytes)
            .map_err(|e| wire::invalid(format!("connection state: {e}")))?;
        if v.version != STATE_VERSION {
            return Err(wire::invalid(format!(
                "connection state version {} (this binary reads version {STATE_VERSION})",
                v.version
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| wire::invalid(format!("connection state: {e}")))
    }
}

/// Duplicates an fd someone else holds open for the duration of the call.
fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// The device state a handover carries (see `IommuDevice::device_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub bypass: bool,
    pub domains: Vec<crate::domains::DomainView>,
    pub endpoints: Vec<crate::domains::EndpointView>,
}

/// The memory table a handed-over connection's state describes, mapped from copies of its fds
/// (the fds stay for [`Connection::resume`]).
pub fn memory_table(state: &ConnectionState, fds: &[OwnedFd]) -> io::Result<GuestMemoryMmap> {
    let (_, table) = map_regions(state, |i| {
        fds.get(i)
            .ok_or_else(|| wire::invalid(format!("connection state: fd {i} missing")))?
            .try_clone()
    })?;
    guest_memory(&table)
}

/// After a crash: sets `state`'s rings to go on where the guest can tell the dead daemon
/// stopped, and returns the answers for the requests the request ring will pop again (see
/// `recovery`). The request ring restarts at the checkpoint's avail position with the used
/// index the guest sees; the event ring, whose buffers are used as soon as they are taken,
/// at the guest's used index for both.
pub fn resume_rings(
    state: &mut ConnectionState,
    mem: &GuestMemoryMmap,
    r: &crate::recovery::Recovery,
) -> std::collections::BTreeMap<u16, crate::recovery::Answer> {
    use vm_memory::Bytes;
    let used_idx = |ring: &RingState| {
        let at = ring.used.checked_add(2)?;
        let b: [u8; 2] = mem.read_obj(vm_memory::GuestAddress(at)).ok()?;
        Some(u16::from_le_bytes(b))
    };
    let mut answers = std::collections::BTreeMap::new();
    if let Some(ring) = state.rings.get_mut(crate::protocol::REQUEST_QUEUE)
        && ring.ready
        && let Some(used) = used_idx(ring)
    {
        // Where the checkpoint had the ring; the connection's own position if the ring had
        // not been served yet then.
        let pos = r.request_ring.unwrap_or((ring.next_avail, ring.next_used));
        answers = crate::recovery::answers(&r.records, &r.carried, pos, used);
        // Requests answered and published from there on need not be popped again at all.
        let mut next = pos.0;
        while answers.get(&next).is_some_and(|a| a.published) {
            answers.remove(&next);
            next = next.wrapping_add(1);
        }
        ring.next_avail = next;
        ring.next_used = used;
    }
    if let Some(ring) = state.rings.get_mut(crate::protocol::EVENT_QUEUE)
        && ring.ready
        && let Some(used) = used_idx(ring)
    {
        (ring.next_avail, ring.next_used) = (used, used);
    }
    answers
}

/// Maps the state's memory regions, each from the fd `fd_of` gives for its index.
fn map_regions(
    state: &ConnectionState,
    mut fd_of: impl FnMut(usize) -> io::Result<OwnedFd>,
) -> io::Result<(Vec<VmmRegion>, Vec<Arc<GuestRegionMmap>>)> {
    let mut regions = Vec::new();
    let mut table = Vec::new();
    for r in &state.regions {
        let region = VhostUserMemoryRegion::new(r.gpa, r.size, r.user_addr, r.mmap_offset);
        let (vmm, mapped) = map_region(&region, fd_of(r.fd)?)?;
        regions.push(vmm);
        table.push(mapped);
    }
    Ok((regions, table))
}

/// A handed-over connection's state and the fds it refers to.
pub struct HandedOver {
    pub state: ConnectionState,
    pub fds: Vec<OwnedFd>,
    /// The names the state's fds are kept under for a restarted daemon (see `recovery`), when
    /// they are.
    pub kept: Option<Vec<String>>,
}

impl Connection {
    /// Ends this connection's service without the VMM noticing: what is in flight is answered,
    /// the vring thread stops, and the state comes back with a copy of every fd it needs. The
    /// device keeps its state (domains, mappings, memory); the rings stay where they were.
    pub fn hand_over(mut self) -> io::Result<HandedOver> {
        // First no thread serves the rings any more, then what is in flight is answered (by this
        // thread, the state's owner now): nothing touches the old rings after that.
        self.thread.join();
        self.device.release_rings()?;
        let mut fds = Vec::new();
        let state = self.describe(|fd| {
            fds.push(dup(fd)?);
            Ok(fds.len() - 1)
        })?;
        // The mappings (and their SIGBUS guards) go with the rest of this connection now.
        let kept = self.kept.take().map(|k| k.fds);
        Ok(HandedOver { state, fds, kept })
    }

    /// The connection's state as data; `keep` is given each fd it refers to, in order, and says
    /// the index the state names it by.
    pub(super) fn describe(
        &self,
        mut keep: impl FnMut(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> io::Result<ConnectionState> {
        let mut regions = Vec::new();
        for (r, mapped) in self.regions.iter().zip(&self.table) {
            let file = mapped
                .file_offset()
                .ok_or_else(|| io::Error::other("a memory region without its file"))?;
            regions.push(RegionState {
                gpa: r.gpa,
                size: r.size,
                user_addr: r.user_addr,
                mmap_offset: file.start(),
                fd: keep(file.file().as_fd())?,
            });
        }
        let mut rings = Vec::new();
        for (vring, err) in self.vrings.iter().zip(&self.errs) {
            let g = vring.get_ref();
            let q = g.get_queue();
            let kick = g.get_kick().as_ref().map(|k| k.as_raw_fd());
            let call = g.get_call().as_ref().map(|c| c.as_raw_fd());
            // SAFETY: the kick and call fds are owned by the ring, which the guard `g` keeps
            // alive and unchanged for the duration of these borrows.
            let (kick, call) = unsafe {
                (
                    kick.map(|fd| BorrowedFd::borrow_raw(fd)),
                    call.map(|fd| BorrowedFd::borrow_raw(fd)),
                )
            };
            rings.push(RingState {
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                ready: q.ready(),
                enabled: g.is_enabled(),
                event_idx: q.event_idx_enabled(),
                kick: kick.map(&mut keep).transpose()?,
                call: call.map(&mut keep).transpose()?,
                err: err.as_ref().map(|f| keep(f.as_fd())).transpose()?,
            });
        }
        Ok(ConnectionState {
            version: STATE_VERSION,
            owned: self.owned,
            acked_features: self.acked_features,
            acked_protocol_features: self.acked_protocol_features,
            regions,
            rings,
        })
    }

    /// Goes on serving a connection handed over by [`Connection::hand_over`], for `device`,
    /// which already holds the device state (domains, mappings, the memory table's guest RAM in
    /// its backend). The rings continue where they stopped; anything the guest queued meanwhile
    /// is served at once.
    pub fn resume(device: IommuDevice, handed: HandedOver) -> io::Result<Connection> {
        let HandedOver { state, fds, kept } = handed;
        if state.version != STATE_VERSION {
            return Err(wire::invalid(format!(
                "connection state version {}",
                state.version
            )));
        }
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: usize| -> io::Result<OwnedFd> {
            fds.get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| wire::invalid(format!("connection state: fd {i} missing or reused")))
        };
        let (regions, table) = map_regions(&state, &mut take)?;
        device.adopt_memory_table(guest_memory(&table)?)?;
        let mut rings = Vec::new();
        for r in &state.rings {
            rings.push(RestoredRing {
                state: r.clone(),
                kick: r.kick.map(&mut take).transpose()?.map(File::from),
                call: r.call.map(&mut take).transpose()?.map(File::from),
                err: r.err.map(&mut take).transpose()?.map(File::from),
            });
        }
        let mut conn = Connection::with_parts(
            device.clone(),
            regions,
            table,
            state.owned,
            state.acked_features,
            state.acked_protocol_features,
            rings,
        )?;
        conn.kept = kept.map(|fds| crate::recovery::KeptConnection {
            state: state.clone(),
            fds,
        });
        // Kicks the guest sent while no thread watched are gone: look at the ring once.
        device.rewake();
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ConnectionState {
        ConnectionState {
            version: STATE_VERSION,
            owned: true,
            acked_features: 0x1_4000_0000,
            acked_protocol_features: 0x2c3,
            regions: vec![RegionState {
                gpa: 0,
                size: 1 << 30,
                user_addr: 0x7f00_0000_0000,
                mmap_offset: 0,
                fd: 0,
            }],
            rings: vec![RingState {
                size: 256,
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
                next_avail: 65535,
                next_used: 65530,
                ready: true,
                enabled: true,
                event_idx: true,
                kick: Some(1),
                call: Some(2),
                err: None,
            }],
        }
    }

    #[test]
    fn the_state_survives_its_bytes() {
        let s = state();
        assert_eq!(ConnectionState::from_bytes(&s.to_bytes()).unwrap(), s);
    }

    #[test]
    fn another_version_or_garbage_is_refused_with_a_reason() {
        let mut s = state();
        s.version = STATE_VERSION + 1;
        let e = ConnectionState::from_bytes(&s.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("this binary reads version 1"), "{e}");
        let e = ConnectionState::from_bytes(b"{\"version\":1}").unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        assert!(ConnectionState::from_bytes(b"\x00").is_err());
    }
}
