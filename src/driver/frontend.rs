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

/// One queue: ring state, eventfds, per-head buffer area.
struct Queue {
    vq: Virtqueue,
    kick: EventFd,
    call: EventFd,
    slots: u64,
    slot_size: u64,
}

impl Queue {
    fn slot(&self, head: u16) -> u64 {
        self.slots + u64::from(head) * self.slot_size
    }
}

/// Where things live in guest RAM.
#[derive(Clone, Copy, Debug)]
struct Layout {
    usable_end: u64,
    rings: [RingLayout; 2],
    slots: [u64; 2],
}

impl Layout {
    fn new(ram_size: u64, qsize: u16) -> Result<Self, DriverError> {
        if qsize == 0 || !qsize.is_power_of_two() || qsize > 32768 {
            return Err(DriverError::QueueSize(qsize));
        }
        let n = u64::from(qsize);
        let ring = RingLayout::footprint(qsize);
        let req_slots = align_up(n * REQ_SLOT, PAGE);
        let evt_slots = align_up(n * EVT_SLOT, PAGE);
        let reserved = 2 * ring + req_slots + evt_slots;
        let base = ram_size
            .checked_sub(reserved)
            .map(|b| b / PAGE * PAGE)
            .filter(|&b| b >= PAGE)
            .ok_or(DriverError::RamTooSmall {
                ram: ram_size,
                reserved,
            })?;
        let r0 = RingLayout::new(base, qsize);
        let r1 = RingLayout::new(r0.end(), qsize);
        let s0 = r1.end();
        let s1 = s0 + req_slots;
        debug_assert!(s1 + evt_slots <= ram_size);
        Ok(Layout {
            usable_end: base,
            rings: [r0, r1],
            slots: [s0, s1],
        })
    }
}

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

    /// Fresh rings from index 0 for both queues, announced with SET_VRING_*.
    fn setup_queues(&mut self) -> Result<(), DriverError> {
        self.queues.clear();
        let event_idx = self.event_idx();
        for q in [REQUEST_QUEUE, EVENT_QUEUE] {
            let ring = self.layout.rings[q];
            let vq = Virtqueue::new(&self.ram, ring, event_idx)?;
            let hostile = q == REQUEST_QUEUE && self.opts.saturated_call;
            if q == REQUEST_QUEUE && !event_idx && !hostile {
                // Like the Linux driver, whose request queue has no callback: it polls the used
                // ring and asks for no interrupt (VRING_AVAIL_F_NO_INTERRUPT).
                self.ram.write(ring.avail, &1u16.to_le_bytes())?;
            }
            let mut queue = Queue {
                vq,
                kick: EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::io("kick eventfd"))?,
                call: if hostile {
                    let fd = EventFd::new(0).map_err(DriverError::io("call eventfd"))?;
                    fd.write(u64::MAX - 1)
                        .map_err(DriverError::io("saturate the call eventfd"))?;
                    fd
                } else {
                    EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::io("call eventfd"))?
                },
                slots: self.layout.slots[q],
                slot_size: if q == REQUEST_QUEUE {
                    REQ_SLOT
                } else {
                    EVT_SLOT
                },
            };
            if q == EVENT_QUEUE && self.opts.fill_event_queue {
                for _ in 0..ring.size {
                    post_event_buffer(&self.ram, &mut queue)?;
                }
            }
            self.announce_queue(q, &queue, 0)?;
            if q == EVENT_QUEUE && self.opts.fill_event_queue {
                queue.kick.write(1).map_err(DriverError::io("kick"))?;
            }
            self.queues.push(queue);
        }
        Ok(())
    }

    /// Tells the daemon where queue `q`'s ring lives and starts it at `base` (SET_VRING_NUM,
    /// ADDR, BASE, CALL, KICK, ENABLE), as QEMU's `vhost_virtqueue_start` does.
    fn announce_queue(&mut self, q: usize, queue: &Queue, base: u16) -> Result<(), DriverError> {
        let ring = *queue.vq.layout();
        let host = |gpa: u64, len: u64| {
            self.ram
                .host_addr_of(gpa, len)
                .ok_or(DriverError::OutOfRam {
                    gpa,
                    len,
                    base: 0,
                    size: self.ram.size(),
                })
        };
        let n = u64::from(ring.size);
        let addr = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: host(ring.desc, 16 * n)?,
            used_ring_addr: host(ring.used, 6 + 8 * n)?,
            avail_ring_addr: host(ring.avail, 6 + 2 * n)?,
            log_addr: None,
        };
        let f = &mut self.frontend;
        f.set_vring_num(q, ring.size)
            .map_err(DriverError::vhost("SET_VRING_NUM"))?;
        f.set_vring_addr(q, &addr)
            .map_err(DriverError::vhost("SET_VRING_ADDR"))?;
        f.set_vring_base(q, base)
            .map_err(DriverError::vhost("SET_VRING_BASE"))?;
        f.set_vring_call(q, &queue.call)
            .map_err(DriverError::vhost("SET_VRING_CALL"))?;
        f.set_vring_kick(q, &queue.kick)
            .map_err(DriverError::vhost("SET_VRING_KICK"))?;
        f.set_vring_enable(q, true)
            .map_err(DriverError::vhost("SET_VRING_ENABLE"))
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

    /// Stops both rings like QEMU on a device reset (GET_VRING_BASE for 0 and 1), then sets them
    /// up again from index 0 (SET_FEATURES again, fresh zeroed rings at the same addresses).
    /// Chains in flight are forgotten.
    pub fn reset_rings(&mut self) -> Result<(), DriverError> {
        let mut bases = [0u32; 2];
        for q in [REQUEST_QUEUE, EVENT_QUEUE] {
            // No SET_VRING_ENABLE 0 first: after RESET_DEVICE the features are un-acked and a
            // daemon refuses it (and drops the connection).
            bases[q] = self
                .frontend
                .get_vring_base(q)
                .map_err(DriverError::vhost("GET_VRING_BASE"))?;
        }
        self.last_bases = Some(bases);
        self.frontend
            .set_features(self.features)
            .map_err(DriverError::vhost("SET_FEATURES"))?;
        self.setup_queues()
    }

    /// Stops both rings and starts them again where they stopped, like QEMU around a VM pause
    /// (`vhost_dev_stop`: SET_VRING_ENABLE 0 and GET_VRING_BASE; `vhost_dev_start`: SET_FEATURES
    /// and SET_VRING_* with the bases GET_VRING_BASE returned). The ring memory and every chain
    /// in it are kept; the bases are returned.
    pub fn pause_and_resume(&mut self) -> Result<[u32; 2], DriverError> {
        let mut bases = [0u32; 2];
        for q in [REQUEST_QUEUE, EVENT_QUEUE] {
            self.frontend
                .set_vring_enable(q, false)
                .map_err(DriverError::vhost("SET_VRING_ENABLE"))?;
            bases[q] = self
                .frontend
                .get_vring_base(q)
                .map_err(DriverError::vhost("GET_VRING_BASE"))?;
        }
        self.frontend
            .set_features(self.features)
            .map_err(DriverError::vhost("SET_FEATURES"))?;
        let queues = std::mem::take(&mut self.queues);
        let announced = [REQUEST_QUEUE, EVENT_QUEUE]
            .into_iter()
            .try_for_each(|q| self.announce_queue(q, &queues[q], bases[q] as u16));
        self.queues = queues;
        announced?;
        Ok(bases)
    }

    /// VHOST_USER_RESET_DEVICE (error if the protocol feature was not negotiated). The rings
    /// are stopped by it; [`TestVm::reset_rings`] sets them up again.
    pub fn reset_device(&mut self) -> Result<(), DriverError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            return Err(DriverError::NotNegotiated(
                "VHOST_USER_PROTOCOL_F_RESET_DEVICE",
            ));
        }
        self.frontend
            .reset_device()
            .map_err(DriverError::vhost("RESET_DEVICE"))
    }

    /// ADD_MEM_REG of an extra memfd region at `gpa` (CONFIGURE_MEM_SLOTS).
    pub fn add_region(&mut self, gpa: u64, size: u64) -> Result<(), DriverError> {
        self.need_mem_slots()?;
        let r = GuestRam::new_at(gpa, size).map_err(DriverError::io("creating memory region"))?;
        self.frontend
            .add_mem_region(&region_info(&r))
            .map_err(DriverError::vhost("ADD_MEM_REG"))?;
        self.regions.push(r);
        Ok(())
    }

    /// ADD_MEM_REG of a region at `gpa` that claims `memory_size` bytes at `mmap_offset` of a
    /// fresh memfd of only `file_size` bytes: a VMM describing more memory than its file has.
    /// Kept like [`TestVm::add_region`]'s region if the daemon accepts it.
    pub fn add_region_claiming(
        &mut self,
        gpa: u64,
        file_size: u64,
        memory_size: u64,
        mmap_offset: u64,
    ) -> Result<(), DriverError> {
        self.need_mem_slots()?;
        let (r, info) = claiming_region(gpa, file_size, memory_size, mmap_offset)?;
        self.frontend
            .add_mem_region(&info)
            .map_err(DriverError::vhost("ADD_MEM_REG"))?;
        self.regions.push(r);
        Ok(())
    }

    /// SET_MEM_TABLE with guest RAM and, like [`TestVm::add_region_claiming`], a region at
    /// `gpa` that claims more of its memfd than the file holds.
    pub fn set_mem_table_claiming(
        &mut self,
        gpa: u64,
        file_size: u64,
        memory_size: u64,
        mmap_offset: u64,
    ) -> Result<(), DriverError> {
        let (r, info) = claiming_region(gpa, file_size, memory_size, mmap_offset)?;
        self.frontend
            .set_mem_table(&[region_info(&self.ram), info])
            .map_err(DriverError::vhost("SET_MEM_TABLE"))?;
        self.regions.push(r);
        Ok(())
    }

    /// REM_MEM_REG of the extra region starting at `gpa`.
    pub fn remove_region(&mut self, gpa: u64) -> Result<(), DriverError> {
        self.need_mem_slots()?;
        let i = self
            .regions
            .iter()
            .position(|r| r.base() == gpa)
            .ok_or(DriverError::NoSuchRegion(gpa))?;
        self.frontend
            .remove_mem_region(&region_info(&self.regions[i]))
            .map_err(DriverError::vhost("REM_MEM_REG"))?;
        self.regions.remove(i);
        Ok(())
    }

    /// An extra region added with [`TestVm::add_region`], by its first GPA.
    pub fn region(&self, gpa: u64) -> Option<&GuestRam> {
        self.regions.iter().find(|r| r.base() == gpa)
    }

    fn need_mem_slots(&self) -> Result<(), DriverError> {
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            Ok(())
        } else {
            Err(DriverError::NotNegotiated(
                "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
            ))
        }
    }

    /// Closes the socket.
    pub fn disconnect(self) {
        drop(self);
    }
}

fn region_info(r: &GuestRam) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.base(),
        memory_size: r.size(),
        userspace_addr: r.host_addr(),
        mmap_offset: 0,
        mmap_handle: r.fd(),
    }
}

/// A fresh memfd of `file_size` bytes at `gpa` and a region description that claims
/// `memory_size` bytes of it at `mmap_offset`: what a VMM that overstates its file sends.
fn claiming_region(
    gpa: u64,
    file_size: u64,
    memory_size: u64,
    mmap_offset: u64,
) -> Result<(GuestRam, VhostUserMemoryRegionInfo), DriverError> {
    let r = GuestRam::new_at(gpa, file_size).map_err(DriverError::io("creating memory region"))?;
    let info = VhostUserMemoryRegionInfo {
        memory_size,
        mmap_offset,
        ..region_info(&r)
    };
    Ok((r, info))
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

/// Posts one `FAULT_SIZE` device-writable buffer in the event queue.
fn post_event_buffer(ram: &GuestRam, q: &mut Queue) -> Result<(), DriverError> {
    let head =
        q.vq.next_head()
            .ok_or(DriverError::NoFreeDescriptors { need: 1, free: 0 })?;
    let slot = q.slot(head);
    ram.fill(slot, FAULT_SIZE, 0)?;
    q.vq.add(
        ram,
        &[RawDesc::writable(slot, FAULT_SIZE as u32)],
        Some((slot, FAULT_SIZE as u32)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
