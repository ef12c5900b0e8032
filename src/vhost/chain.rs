//! Reading descriptor chains and keeping track of requests in flight.
//!
//! This is the only code that reads a request out of guest memory: each chain is walked once,
//! its device-readable bytes copied into a fixed buffer (at most `MAX_REQUEST_SIZE`) and its
//! device-writable descriptors recorded after checking that they lie in guest RAM. It decides
//! nothing about the request itself.

use std::time::Instant;

use log::warn;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::protocol::{MAX_REQUEST_SIZE, RequestType, TAIL_SIZE};

/// Most device-writable descriptors a request may use; more is descriptor abuse.
const MAX_WRITABLE_SEGMENTS: usize = 16;

/// Where a request's device-writable bytes are: guest-physical segments in chain order.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segments {
    pub(super) seg: [(u64, u32); MAX_WRITABLE_SEGMENTS],
    pub(super) n: usize,
    pub(super) total: u64,
}

impl Segments {
    /// Writes `data` at byte `offset` of the writable area. The segments were checked to be
    /// guest RAM when the chain was parsed; a failure here means the memory table changed.
    pub(super) fn write(&self, mem: &GuestMemoryMmap, mut offset: u64, mut data: &[u8]) -> bool {
        for &(addr, len) in &self.seg[..self.n] {
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = data.len().min((len - offset) as usize);
            if mem
                .write_slice(&data[..n], GuestAddress(addr + offset))
                .is_err()
            {
                return false;
            }
            data = &data[n..];
            offset = 0;
            if data.is_empty() {
                return true;
            }
        }
        data.is_empty()
    }
}

/// What a descriptor chain turned out to be. Lives on the stack for one request only.
#[allow(clippy::large_enum_variant)]
pub(super) enum Chain {
    /// Not a request we can answer: returned with used length 0.
    Unusable(&'static str),
    Request {
        bytes: [u8; MAX_REQUEST_SIZE],
        len: usize,
        writable: Segments,
    },
}

/// Reads a chain: device-readable descriptors first (copied, at most MAX_REQUEST_SIZE bytes),
/// then device-writable ones (recorded, checked to be guest RAM).
pub(super) fn read_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> Chain
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut bytes = [0u8; MAX_REQUEST_SIZE];
    let mut len = 0usize;
    let mut writable = Segments {
        seg: [(0, 0); MAX_WRITABLE_SEGMENTS],
        n: 0,
        total: 0,
    };
    for desc in chain {
        let (addr, dlen) = (desc.addr(), desc.len());
        if !mem.check_range(addr, dlen as usize) {
            return Chain::Unusable("descriptor outside guest RAM");
        }
        if desc.is_write_only() {
            if writable.n == MAX_WRITABLE_SEGMENTS {
                return Chain::Unusable("too many writable descriptors");
            }
            if dlen > 0 {
                writable.seg[writable.n] = (addr.0, dlen);
                writable.n += 1;
                writable.total += u64::from(dlen);
            }
        } else {
            if writable.n > 0 {
                return Chain::Unusable("readable descriptor after a writable one");
            }
            let take = (dlen as usize).min(MAX_REQUEST_SIZE - len);
            if take > 0 && mem.read_slice(&mut bytes[len..len + take], addr).is_err() {
                return Chain::Unusable("unreadable descriptor");
            }
            len += take;
        }
    }
    if writable.total < TAIL_SIZE as u64 {
        return Chain::Unusable("no room for the tail");
    }
    Chain::Request {
        bytes,
        len,
        writable,
    }
}

/// A request in flight: where to answer it.
pub(super) struct Pending {
    /// Its position in the avail ring.
    pub(super) avail: u16,
    pub(super) head: u16,
    pub(super) kind: RequestType,
    /// The request as decoded (for the trace).
    pub(super) req: crate::protocol::Request,
    pub(super) writable: Segments,
    pub(super) tail_offset: u64,
    pub(super) started: Instant,
}

/// Fixed-capacity table of requests in flight; the token is the slot.
pub(super) struct PendingTable {
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
}

impl PendingTable {
    pub(super) fn new(cap: usize) -> Self {
        PendingTable {
            slots: (0..cap).map(|_| None).collect(),
            free: (0..cap as u32).rev().collect(),
        }
    }

    pub(super) fn insert(&mut self, p: Pending) -> Option<u64> {
        let i = self.free.pop()?;
        self.slots[i as usize] = Some(p);
        Some(u64::from(i))
    }

    pub(super) fn take(&mut self, token: u64) -> Option<Pending> {
        let p = self.slots.get_mut(token as usize)?.take()?;
        self.free.push(token as u32);
        Some(p)
    }

    pub(super) fn is_full(&self) -> bool {
        self.free.is_empty()
    }
}

/// Logs guest misbehaviour at most a few times per second.
pub(super) struct LogLimiter {
    pub(super) window: Instant,
    pub(super) count: u32,
    pub(super) suppressed: u64,
}

impl LogLimiter {
    const PER_SECOND: u32 = 10;

    pub(super) fn allow(&mut self) -> bool {
        if self.window.elapsed().as_secs() >= 1 {
            if self.suppressed > 0 {
                warn!("{} more guest errors were not logged", self.suppressed);
            }
            self.window = Instant::now();
            self.count = 0;
            self.suppressed = 0;
        }
        self.count += 1;
        if self.count > Self::PER_SECOND {
            self.suppressed += 1;
        }
        self.count <= Self::PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    const RAM: u64 = 0x20_0000;
    const REQ: u64 = 0x10_0000;
    const REPLY: u64 = 0x11_0000;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn readable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    /// Builds `descs` as one chain in a mock queue and reads it.
    fn read(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Chain {
        let q = MockSplitQueue::new(mem, 32);
        let chain = q.build_desc_chain(descs).unwrap();
        read_chain(mem, chain)
    }

    fn unusable(c: Chain) -> &'static str {
        match c {
            Chain::Unusable(why) => why,
            Chain::Request { .. } => panic!("the chain was taken as a request"),
        }
    }

    #[test]
    fn a_request_is_copied_out_once_and_its_writable_segments_recorded_in_order() {
        let mem = ram();
        mem.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8], GuestAddress(REQ))
            .unwrap();
        let c = read(
            &mem,
            &[
                readable(REQ, 4),
                readable(REQ + 4, 4),
                writable(REPLY, 2),
                writable(REPLY + 0x100, 6),
            ],
        );
        let Chain::Request {
            bytes,
            len,
            writable,
        } = c
        else {
            panic!("not a request");
        };
        assert_eq!(&bytes[..len], &[1, 2, 3, 4, 5, 6, 7, 8]);
        // A later change of guest memory does not change what was read (no double fetch).
        mem.write_slice(&[9; 8], GuestAddress(REQ)).unwrap();
        assert_eq!(&bytes[..len], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(writable.total, 8);
        assert_eq!(
            &writable.seg[..writable.n],
            &[(REPLY, 2), (REPLY + 0x100, 6)]
        );
        // A tail written across the two segments lands in both.
        assert!(writable.write(&mem, 1, &[0xaa, 0xbb, 0xcc]));
        let mut out = [0u8; 2];
        mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        assert_eq!(out, [0, 0xaa]);
        mem.read_slice(&mut out, GuestAddress(REPLY + 0x100))
            .unwrap();
        assert_eq!(out, [0xbb, 0xcc]);
        assert!(!writable.write(&mem, 7, &[1, 2]), "past the writable part");
    }

    #[test]
    fn at_most_max_request_size_bytes_are_copied() {
        let mem = ram();
        let c = read(&mem, &[readable(REQ, 4096), writable(REPLY, 4)]);
        let Chain::Request { len, .. } = c else {
            panic!("not a request");
        };
        assert_eq!(len, MAX_REQUEST_SIZE);
    }

    #[test]
    fn abusive_chains_are_unusable() {
        let mem = ram();
        assert_eq!(
            unusable(read(&mem, &[readable(REQ, 8), writable(REPLY, 3)])),
            "no room for the tail"
        );
        assert_eq!(
            unusable(read(&mem, &[writable(REPLY, 4), readable(REQ, 8)])),
            "readable descriptor after a writable one"
        );
        assert_eq!(
            unusable(read(&mem, &[readable(RAM - 4, 8), writable(REPLY, 4)])),
            "descriptor outside guest RAM"
        );
        assert_eq!(
            unusable(read(&mem, &[readable(REQ, 8), writable(u64::MAX - 1, 4)])),
            "descriptor outside guest RAM"
        );
        let mut many = vec![readable(REQ, 8)];
        many.extend((0..=MAX_WRITABLE_SEGMENTS as u64).map(|i| writable(REPLY + i * 16, 4)));
        assert_eq!(unusable(read(&mem, &many)), "too many writable descriptors");
    }

    #[test]
    fn zero_length_writable_descriptors_take_no_segment() {
        let mem = ram();
        let mut descs = vec![readable(REQ, 8)];
        descs.extend((0..20).map(|_| writable(REPLY, 0)));
        descs.push(writable(REPLY, 4));
        let Chain::Request { writable, .. } = read(&mem, &descs) else {
            panic!("not a request");
        };
        assert_eq!((writable.n, writable.total), (1, 4));
    }
}
