//! [`TestVm`]: the VMM and the guest driver in one object. It speaks vhost-user to the daemon
//! through the `vhost` crate's [`Frontend`] in the order QEMU does (owner, features, protocol
//! features, memory table, config, vrings), owns guest RAM and both split rings, and submits
//! virtio-iommu requests the way the Linux driver does: request bytes in one device-readable
//! buffer, the tail (or PROBE properties + tail) in one device-writable buffer, then a kick and a
//! busy-poll of the used ring.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use super::virtqueue::{RawDesc, RingLayout, Virtqueue, align_up, write_table};
use super::{Desc, DriverError, VmOptions};
use crate::protocol::{
    CONFIG_SIZE, Config, EVENT_QUEUE, FAULT_SIZE, FaultEvent, REQUEST_QUEUE, Request, RequestType,
    Status, TAIL_SIZE,
};

const PAGE: u64 = 4096;
/// Per-head request area of the request queue: readable bytes, writable bytes, indirect table.
const READ_MAX: usize = 4096;
const WRITE_MAX: usize = 8192;
/// Descriptors an indirect table built by `push_chain` may hold.
pub const INDIRECT_MAX: usize = 512;
const READ_OFF: u64 = 0;
const WRITE_OFF: u64 = READ_MAX as u64;
const INDIRECT_OFF: u64 = WRITE_OFF + WRITE_MAX as u64;
const REQ_SLOT: u64 = INDIRECT_OFF + INDIRECT_MAX as u64 * 16;
/// Per-head buffer of the event queue.
const EVT_SLOT: u64 = 64;
/// Byte the writable area is filled with before submission, so an unwritten tail shows up as
/// an unknown status.
pub const POISON: u8 = 0xff;
/// Every virtio-iommu feature bit (0..=6).
const IOMMU_FEATURES: u64 = 0x7f;

/// A simulated VM with a virtio-iommu device served by the daemon at the other end of a socket.
pub struct TestVm {
    frontend: Frontend,
    ram: GuestRam,
    opts: VmOptions,
    layout: Layout,
    device_features: u64,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    max_mem_slots: Option<u64>,
    config: Config,
    queues: Vec<Queue>,
    regions: Vec<GuestRam>,
    last_bases: Option<[u32; 2]>,
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, DriverError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && start.elapsed() < timeout =>
            {
                thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(DriverError::Connect {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

impl TestVm {
    /// Connects (retrying for up to `opts.connect_timeout` while the socket does not exist or
    /// refuses) and does the VMM's handshake like QEMU; see the module documentation.
    pub fn connect(socket: &Path, opts: VmOptions) -> Result<TestVm, DriverError> {
        let layout = Layout::new(opts.ram_size, opts.queue_size)?;
        let ram = GuestRam::new(opts.ram_size).map_err(DriverError::io("creating guest RAM"))?;
        let stream = connect_socket(socket, opts.connect_timeout)?;
        let mut frontend = Frontend::from_stream(stream, 2);

        frontend
            .set_owner()
            .map_err(DriverError::vhost("SET_OWNER"))?;
        let device_features = frontend
            .get_features()
            .map_err(DriverError::vhost("GET_FEATURES"))?;
        if device_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DriverError::NotOffered("VIRTIO_F_VERSION_1"));
        }
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if device_features & proto_bit == 0 {
            return Err(DriverError::NotOffered("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(DriverError::vhost("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        let protocol = offered & wanted;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(DriverError::NotOffered("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        frontend
            .set_protocol_features(protocol)
            .map_err(DriverError::vhost("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request without a reply of its own now gets an ack that is checked.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend
                .get_queue_num()
                .map_err(DriverError::vhost("GET_QUEUE_NUM"))?;
            if n < 2 {
                return Err(DriverError::TooFewQueues(n));
            }
        }
        let max_mem_slots = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            Some(
                frontend
                    .get_max_mem_slots()
                    .map_err(DriverError::vhost("GET_MAX_MEM_SLOTS"))?,
            )
        } else {
            None
        };

        let mut features =
            (1 << VIRTIO_F_VERSION_1) | proto_bit | (device_features & IOMMU_FEATURES);
        if device_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0 {
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        if opts.event_idx {
            if device_features & (1 << VIRTIO_RING_F_EVENT_IDX) == 0 {
                return Err(DriverError::NotOffered("VIRTIO_RING_F_EVENT_IDX"));
            }
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        frontend
            .set_features(features)
            .map_err(DriverError::vhost("SET_FEATURES"))?;

        let main = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_addr(),
            mmap_offset: 0,
            mmap_handle: ram.fd(),
        };
        frontend
            .set_mem_table(&[main])
            .map_err(DriverError::vhost("SET_MEM_TABLE"))?;

        let config = read_config(&mut frontend)?;
        let mut vm = TestVm {
            frontend,
            ram,
            opts,
            layout,
            device_features,
            features,
            protocol,
            max_mem_slots,
            config,
            queues: Vec::new(),
            regions: Vec::new(),
            last_bases: None,
        };
        vm.setup_queues()?;
        Ok(vm)
    }

    /// GET_CONFIG (40 bytes), decoded.
    pub fn config(&mut self) -> Result<Config, DriverError> {
        let c = read_config(&mut self.frontend)?;
        self.config = c;
        Ok(c)
    }

    /// The config read at connect time (or by the last [`TestVm::config`]).
    pub fn cached_config(&self) -> Config {
        self.config
    }

    /// SET_CONFIG of the `bypass` byte (offset 36, 1 byte).
    pub fn write_bypass(&mut self, bypass: u8) -> Result<(), DriverError> {
        self.write_config(Config::BYPASS_OFFSET as u32, &[bypass])
    }

    /// SET_CONFIG of arbitrary bytes (for tests of read-only fields).
    pub fn write_config(&mut self, offset: u32, bytes: &[u8]) -> Result<(), DriverError> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), bytes)
            .map_err(DriverError::vhost("SET_CONFIG"))
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Free guest RAM usable by tests for DMA buffers: `[0, usable_ram_end)`.
    pub fn usable_ram_end(&self) -> u64 {
        self.layout.usable_end
    }

    /// Features the device offered in GET_FEATURES.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features sent in SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Protocol features acked in SET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// GET_MAX_MEM_SLOTS' answer, if CONFIGURE_MEM_SLOTS was negotiated.
    pub fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    pub fn event_idx(&self) -> bool {
        self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    pub fn queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    /// Free descriptors of the request queue.
    pub fn free_descriptors(&self) -> usize {
        self.queues[REQUEST_QUEUE].vq.num_free()
    }

    /// Chains of the request queue the device has not returned yet.
    pub fn in_flight(&self) -> usize {
        self.queues[REQUEST_QUEUE].vq.in_flight()
    }

    /// The request queue's ring state (indices, layout).
    pub fn request_queue(&self) -> &Virtqueue {
        &self.queues[REQUEST_QUEUE].vq
    }

    /// Vring bases GET_VRING_BASE returned at the last [`TestVm::reset_rings`].
    pub fn last_vring_bases(&self) -> Option<[u32; 2]> {
        self.last_bases
    }

    /// Builds a chain: `readable` in one device-readable buffer (left out if empty),
    /// `writable_len` device-writable bytes (filled with [`POISON`]; left out if 0) in another;
    /// places it in the avail ring; returns the head index. Does not kick.
    pub fn push(&mut self, readable: &[u8], writable_len: u32) -> Result<u16, DriverError> {
        if readable.len() > READ_MAX {
            return Err(DriverError::TooLarge {
                what: "readable buffer",
                len: readable.len(),
                max: READ_MAX,
            });
        }
        if writable_len as usize > WRITE_MAX {
            return Err(DriverError::TooLarge {
                what: "writable buffer",
                len: writable_len as usize,
                max: WRITE_MAX,
            });
        }
        let q = &mut self.queues[REQUEST_QUEUE];
        let need = usize::from(!readable.is_empty()) + usize::from(writable_len > 0);
        if need == 0 {
            return Err(DriverError::EmptyChain);
        }
        let head = q.vq.next_head().filter(|_| q.vq.num_free() >= need).ok_or(
            DriverError::NoFreeDescriptors {
                need,
                free: q.vq.num_free(),
            },
        )?;
        let slot = q.slot(head);
        let mut descs = Vec::with_capacity(2);
        if !readable.is_empty() {
            self.ram.write(slot + READ_OFF, readable)?;
            descs.push(RawDesc::readable(slot + READ_OFF, readable.len() as u32));
        }
        let wgpa = slot + WRITE_OFF;
        if writable_len > 0 {
            self.ram.fill(wgpa, writable_len as usize, POISON)?;
            descs.push(RawDesc::writable(wgpa, writable_len));
        }
        let got = q.vq.add(&self.ram, &descs, Some((wgpa, writable_len)))?;
        debug_assert_eq!(got, head);
        Ok(got)
    }

    /// Places an arbitrary chain (descriptor abuse: wrong order, zero lengths, addresses outside
    /// RAM, too many descriptors). If `indirect`, the descriptors (up to [`INDIRECT_MAX`], none
    /// at all allowed) go into an indirect table referenced by a single ring descriptor; the
    /// INDIRECT_DESC feature is not checked, so a test can use it un-negotiated.
    pub fn push_chain(&mut self, descs: &[Desc], indirect: bool) -> Result<u16, DriverError> {
        let raw: Vec<RawDesc> = descs
            .iter()
            .map(|d| {
                if d.write {
                    RawDesc::writable(d.addr, d.len)
                } else {
                    RawDesc::readable(d.addr, d.len)
                }
            })
            .collect();
        let q = &mut self.queues[REQUEST_QUEUE];
        if !indirect {
            return q.vq.add(&self.ram, &raw, None);
        }
        if raw.len() > INDIRECT_MAX {
            return Err(DriverError::TooLarge {
                what: "indirect table",
                len: raw.len(),
                max: INDIRECT_MAX,
            });
        }
        let head =
            q.vq.next_head()
                .ok_or(DriverError::NoFreeDescriptors { need: 1, free: 0 })?;
        let table = q.slot(head) + INDIRECT_OFF;
        write_table(&self.ram, table, &raw)?;
        q.vq.add(&self.ram, &[RawDesc::indirect(table, raw.len())], None)
    }

    /// Notifies the request queue (always, like a driver that ignores suppression).
    pub fn kick(&mut self) -> Result<(), DriverError> {
        self.queues[REQUEST_QUEUE]
            .kick
            .write(1)
            .map_err(DriverError::io("kick"))
    }

    /// Notifies the request queue only if the device asked for it (`avail_event` with
    /// EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without); returns whether it kicked.
    pub fn kick_if_needed(&mut self) -> Result<bool, DriverError> {
        let q = &mut self.queues[REQUEST_QUEUE];
        if q.vq.kick_needed(&self.ram)? {
            q.kick.write(1).map_err(DriverError::io("kick"))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether the device watches the request ring without waiting for a kick (see
    /// [`Virtqueue::device_polls`]; without `EVENT_IDX`).
    pub fn device_polls(&self) -> Result<bool, DriverError> {
        self.queues[REQUEST_QUEUE].vq.device_polls(&self.ram)
    }

    /// Waits until `n` used entries have arrived (busy-polling the used ring), returns
    /// `(head, used_len)` in used order. On timeout the entries consumed so far are in the error.
    pub fn wait_used(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(u16, u32)>, DriverError> {
        let start = Instant::now();
        let mut out = Vec::with_capacity(n);
        let q = &mut self.queues[REQUEST_QUEUE];
        let mut spins = 0u32;
        while out.len() < n {
            if let Some(e) = q.vq.poll_used(&self.ram)? {
                out.push((e.head, e.len));
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if start.elapsed() > timeout {
                    return Err(DriverError::Timeout { want: n, got: out });
                }
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Interrupts are not used; keep the call eventfd from just counting up (a saturated one
        // stays saturated: that is its point).
        if !self.opts.saturated_call {
            let _ = q.call.read();
        }
        Ok(out)
    }

    /// The device-writable bytes of a chain pushed with `push` (to read the tail / PROBE
    /// properties); empty for chains from `push_chain` or unknown heads.
    pub fn writable_bytes(&self, head: u16) -> Vec<u8> {
        let Some((gpa, len)) = self.queues[REQUEST_QUEUE].vq.writable_of(head) else {
            return Vec::new();
        };
        let mut b = vec![0u8; len as usize];
        match self.ram.read(gpa, &mut b) {
            Ok(()) => b,
            Err(_) => Vec::new(),
        }
    }

    fn writable_len(&self, req: &Request) -> u32 {
        if req.kind() == RequestType::Probe {
            self.config.probe_size.saturating_add(TAIL_SIZE as u32)
        } else {
            TAIL_SIZE as u32
        }
    }

    /// The status in the tail (the last 4 writable bytes) of a completed chain.
    fn status_of(&self, head: u16, used_len: u32) -> Result<Status, DriverError> {
        if used_len == 0 {
            return Err(DriverError::NoReply { head });
        }
        let w = self.writable_bytes(head);
        let byte = w
            .len()
            .checked_sub(TAIL_SIZE)
            .map(|i| w[i])
            .unwrap_or(POISON);
        Status::from_u8(byte).ok_or(DriverError::UnknownStatus {
            head,
            len: used_len,
            byte,
        })
    }

    /// One request, one kick, wait: the tail status. A PROBE gets `probe_size + 4` writable
    /// bytes.
    pub fn request(&mut self, req: &Request) -> Result<Status, DriverError> {
        Ok(self.batch(std::slice::from_ref(req))?[0])
    }

    /// Several requests, one kick: statuses in submission order. Chains still in flight from
    /// earlier `push`es must be waited for first.
    pub fn batch(&mut self, reqs: &[Request]) -> Result<Vec<Status>, DriverError> {
        let heads = self.submit(reqs)?;
        self.collect(&heads)?
            .into_iter()
            .map(|(h, len)| self.status_of(h, len))
            .collect()
    }

    /// Pushes `reqs` and kicks once; returns their heads.
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<u16>, DriverError> {
        let free = self.free_descriptors();
        if reqs.len() * 2 > free {
            return Err(DriverError::NoFreeDescriptors {
                need: reqs.len() * 2,
                free,
            });
        }
        let mut heads = Vec::with_capacity(reqs.len());
        for r in reqs {
            let (bytes, n) = r.encode();
            let wlen = self.writable_len(r);
            heads.push(self.push(&bytes[..n], wlen)?);
        }
        // virtqueue_kick(): no notification while the device said it is polling.
        self.kick_if_needed()?;
        Ok(heads)
    }

    /// Waits for exactly `heads` to complete; `(head, used_len)` in `heads`' order.
    fn collect(&mut self, heads: &[u16]) -> Result<Vec<(u16, u32)>, DriverError> {
        let used = self.wait_used(heads.len(), self.opts.request_timeout)?;
        let mut lens = vec![None; heads.len()];
        for (h, len) in used {
            match heads.iter().position(|&x| x == h) {
                Some(i) if lens[i].is_none() => lens[i] = Some(len),
                _ => {
                    return Err(DriverError::UnexpectedHead {
                        head: h,
                        expected: heads.to_vec(),
                    });
                }
            }
        }
        Ok(heads
            .iter()
            .zip(lens)
            .map(|(&h, l)| (h, l.unwrap_or(0)))
            .collect())
    }

    /// PROBE with `probe_size` from the config: status and the raw properties buffer
    /// (`probe_size` bytes; decode with [`crate::protocol::decode_probe_properties`]).
    pub fn probe(&mut self, endpoint: u32) -> Result<(Status, Vec<u8>), DriverError> {
        let req = Request::Probe {
            endpoint: crate::ids::EndpointId(endpoint),
        };
        let heads = self.submit(std::slice::from_ref(&req))?;
        let (head, len) = self.collect(&heads)?[0];
        let status = self.status_of(head, len)?;
        let mut w = self.writable_bytes(head);
        w.truncate(w.len().saturating_sub(TAIL_SIZE));
        Ok((status, w))
    }

    /// Fault reports the device put in the event queue since the last call; their buffers are
    /// posted again.
    pub fn events(&mut self) -> Result<Vec<FaultEvent>, DriverError> {
        let q = &mut self.queues[EVENT_QUEUE];
        let mut out = Vec::new();
        while let Some(e) = q.vq.poll_used(&self.ram)? {
            let mut b = [0u8; FAULT_SIZE];
            self.ram.read(q.slot(e.head), &mut b)?;
            if let Some(f) = FaultEvent::from_bytes(&b)
                && e.len as usize >= FAULT_SIZE
            {
                out.push(f);
            }
            post_event_buffer(&self.ram, q)?;
        }
        if !out.is_empty() {
            q.kick.write(1).map_err(DriverError::io("kick"))?;
        }
        Ok(out)
    }

    /// Closes the socket.
    pub fn disconnect(self) {
        drop(self);
    }
}

fn read_config(f: &mut Frontend) -> Result<Config, DriverError> {
    let (_, payload) = f
        .get_config(
            0,
            CONFIG_SIZE as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_SIZE],
        )
        .map_err(DriverError::vhost("GET_CONFIG"))?;
    Config::from_bytes(&payload).ok_or(DriverError::BadConfig(payload.len()))
}

mod rings;
#[cfg(test)]
mod tests;
mod vmm_ops;
pub use vmm_ops::Claim;

use rings::{Layout, Queue, post_event_buffer};
