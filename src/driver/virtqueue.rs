//! The driver's side of one split virtqueue (virtio 1.x §2.7) laid out in guest RAM: where the
//! descriptor table, available and used rings live, a FIFO free list of descriptors, per-head
//! bookkeeping of what each in-flight chain uses, and the index arithmetic (free-running `u16`
//! indices, slot = index mod queue size) including `EVENT_IDX`'s `used_event`/`avail_event`.
//! It publishes with release ordering and consumes the used ring with acquire ordering, the way
//! the Linux driver's `virtio_wmb`/`virtio_rmb` pair does.

use std::collections::VecDeque;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::DriverError;
use super::memory::GuestRam;

/// Size of one descriptor in the table (and in an indirect table).
pub const DESC_SIZE: u64 = 16;
const PAGE: u64 = 4096;

pub(crate) fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Guest-physical addresses of one split ring's three parts, each 4 KiB aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingLayout {
    /// Lays a ring of `size` entries out from `base` (4 KiB aligned).
    pub fn new(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = align_up(base, PAGE);
        let avail = align_up(desc + DESC_SIZE * n, PAGE);
        let used = align_up(avail + 6 + 2 * n, PAGE);
        RingLayout {
            size,
            desc,
            avail,
            used,
        }
    }

    /// First byte after the ring (4 KiB aligned).
    pub fn end(&self) -> u64 {
        align_up(self.used + 6 + 8 * u64::from(self.size), PAGE)
    }

    /// Bytes a ring of `size` entries needs, alignment included.
    pub fn footprint(size: u16) -> u64 {
        Self::new(0, size).end()
    }

    fn desc_addr(&self, i: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(i)
    }
    fn avail_idx(&self) -> u64 {
        self.avail + 2
    }
    fn avail_ring(&self, idx: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(self.slot(idx))
    }
    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    fn used_idx(&self) -> u64 {
        self.used + 2
    }
    fn used_ring(&self, idx: u16) -> u64 {
        self.used + 4 + 8 * u64::from(self.slot(idx))
    }
    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    /// Ring slot of a free-running index. The size is a power of two, so this stays right when
    /// the `u16` index wraps (65536 is a multiple of the size).
    pub fn slot(&self, idx: u16) -> u16 {
        idx & (self.size - 1)
    }
}

/// One descriptor as written into a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// `VRING_DESC_F_WRITE` and/or `VRING_DESC_F_INDIRECT`; `NEXT` is added by the chaining code.
    pub flags: u16,
}

impl RawDesc {
    pub fn readable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: 0,
        }
    }
    pub fn writable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
        }
    }
    pub fn indirect(table: u64, count: usize) -> Self {
        RawDesc {
            addr: table,
            len: (count as u64 * DESC_SIZE) as u32,
            flags: VRING_DESC_F_INDIRECT as u16,
        }
    }
}

/// Writes `descs` as a chain at `table` (entries `0..n`, each `next` pointing at the following
/// one): the layout of an indirect table.
pub fn write_table(ram: &GuestRam, table: u64, descs: &[RawDesc]) -> Result<(), DriverError> {
    for (i, d) in descs.iter().enumerate() {
        let next = (i + 1 < descs.len()).then_some((i + 1) as u16);
        write_desc(ram, table + DESC_SIZE * i as u64, d, next)?;
    }
    Ok(())
}

fn write_desc(ram: &GuestRam, at: u64, d: &RawDesc, next: Option<u16>) -> Result<(), DriverError> {
    let mut b = [0u8; DESC_SIZE as usize];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    let flags = d.flags
        | if next.is_some() {
            VRING_DESC_F_NEXT as u16
        } else {
            0
        };
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
    ram.write(at, &b)
}

/// `vring_need_event` (virtio spec §2.7.10): whether moving the index from `old` to `new`
/// crosses `event`, i.e. the other side asked to be notified.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A FIFO free list of descriptor indices.
#[derive(Clone, Debug)]
pub struct FreeList {
    free: VecDeque<u16>,
    is_free: Vec<bool>,
}

impl FreeList {
    pub fn new(size: u16) -> Self {
        FreeList {
            free: (0..size).collect(),
            is_free: vec![true; usize::from(size)],
        }
    }

    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// The index the next `take` returns first.
    pub fn peek(&self) -> Option<u16> {
        self.free.front().copied()
    }

    /// Takes `n` indices, or none if fewer are free.
    pub fn take(&mut self, n: usize) -> Option<Vec<u16>> {
        if n > self.free.len() {
            return None;
        }
        let out: Vec<u16> = self.free.drain(..n).collect();
        for &i in &out {
            self.is_free[usize::from(i)] = false;
        }
        Some(out)
    }

    /// Returns indices; an index that is already free is a bookkeeping bug and panics.
    pub fn give_back(&mut self, ids: &[u16]) {
        for &i in ids {
            assert!(
                !std::mem::replace(&mut self.is_free[usize::from(i)], true),
                "descriptor {i} freed twice"
            );
            self.free.push_back(i);
        }
    }
}

/// What an in-flight chain holds.
#[derive(Clone, Debug)]
struct InFlight {
    descs: Vec<u16>,
    writable: Option<(u64, u32)>,
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub head: u16,
    pub len: u32,
}

/// The driver's state of one split virtqueue.
#[derive(Debug)]
pub struct Virtqueue {
    layout: RingLayout,
    event_idx: bool,
    free: FreeList,
    /// Next available index to publish (free-running).
    avail_idx: u16,
    /// Available index at the last `kick_needed` check.
    kicked_idx: u16,
    /// Next used index to consume (free-running).
    last_used: u16,
    in_flight: Vec<Option<InFlight>>,
    /// Device-writable buffer of the last completed chain per head.
    done: Vec<Option<(u64, u32)>>,
}

impl Virtqueue {
    /// A fresh queue; zeroes the ring memory. `layout.size` must be a power of two.
    pub fn new(ram: &GuestRam, layout: RingLayout, event_idx: bool) -> Result<Self, DriverError> {
        if layout.size == 0 || !layout.size.is_power_of_two() {
            return Err(DriverError::QueueSize(layout.size));
        }
        ram.fill(layout.desc, (layout.end() - layout.desc) as usize, 0)?;
        let n = usize::from(layout.size);
        Ok(Virtqueue {
            layout,
            event_idx,
            free: FreeList::new(layout.size),
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            in_flight: vec![None; n],
            done: vec![None; n],
        })
    }

    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|f| f.is_some()).count()
    }

    /// The head the next `add` will use.
    pub fn next_head(&self) -> Option<u16> {
        self.free.peek()
    }

    /// Free-running available index (what the device sees in `avail.idx`).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Free-running index of the next used entry to consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Writes `descs` as a chain into free table entries and publishes its head in the
    /// available ring. `writable` is remembered for [`Virtqueue::writable_of`].
    pub fn add(
        &mut self,
        ram: &GuestRam,
        descs: &[RawDesc],
        writable: Option<(u64, u32)>,
    ) -> Result<u16, DriverError> {
        if descs.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        let ids = self
            .free
            .take(descs.len())
            .ok_or(DriverError::NoFreeDescriptors {
                need: descs.len(),
                free: self.free.len(),
            })?;
        let written = (|| {
            for (k, d) in descs.iter().enumerate() {
                write_desc(
                    ram,
                    self.layout.desc_addr(ids[k]),
                    d,
                    ids.get(k + 1).copied(),
                )?;
            }
            ram.write_u16(self.layout.avail_ring(self.avail_idx), ids[0])
        })();
        if let Err(e) = written {
            self.free.give_back(&ids);
            return Err(e);
        }
        let head = ids[0];
        self.in_flight[usize::from(head)] = Some(InFlight {
            descs: ids,
            writable,
        });
        self.done[usize::from(head)] = None;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and the ring entry must be visible before the new index.
        fence(Ordering::Release);
        ram.store_u16_release(self.layout.avail_idx(), self.avail_idx)?;
        Ok(head)
    }

    /// Whether the device wants a notification for what was published since the last call
    /// (always true without `EVENT_IDX` unless the device set `VRING_USED_F_NO_NOTIFY`).
    pub fn kick_needed(&mut self, ram: &GuestRam) -> Result<bool, DriverError> {
        // Publishing avail.idx must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.kicked_idx, self.avail_idx);
        if self.event_idx {
            let event = ram.load_u16_acquire(self.layout.avail_event())?;
            Ok(need_event(event, self.avail_idx, old))
        } else {
            Ok(!self.device_polls(ram)?)
        }
    }

    /// Whether the device set `VRING_USED_F_NO_NOTIFY`: it watches the ring and needs no
    /// notification (the flag is not used with `EVENT_IDX`).
    pub fn device_polls(&self, ram: &GuestRam) -> Result<bool, DriverError> {
        let flags = ram.load_u16_acquire(self.layout.used)?;
        Ok(flags & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 != 0)
    }

    /// Consumes one used entry if the device has published one; recycles the chain's
    /// descriptors. With `EVENT_IDX`, moves `used_event` along.
    pub fn poll_used(&mut self, ram: &GuestRam) -> Result<Option<UsedElem>, DriverError> {
        let used_idx = ram.load_u16_acquire(self.layout.used_idx())?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let outstanding = self.avail_idx.wrapping_sub(self.last_used);
        if used_idx.wrapping_sub(self.last_used) > outstanding {
            return Err(DriverError::UsedIndexRunaway {
                used_idx,
                last_used: self.last_used,
                avail_idx: self.avail_idx,
            });
        }
        // Entries must be read after the index that published them.
        fence(Ordering::Acquire);
        let at = self.layout.used_ring(self.last_used);
        let id = ram.read_u32(at)?;
        let len = ram.read_u32(at + 4)?;
        let slot = usize::try_from(id)
            .ok()
            .filter(|&i| i < self.in_flight.len());
        let Some(f) = slot.and_then(|i| self.in_flight[i].take()) else {
            return Err(DriverError::BadUsedId {
                id,
                used_idx: self.last_used,
            });
        };
        self.free.give_back(&f.descs);
        let head = id as u16;
        self.done[usize::from(head)] = f.writable;
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            ram.store_u16_release(self.layout.used_event(), self.last_used)?;
        }
        Ok(Some(UsedElem { head, len }))
    }

    /// The device-writable buffer of `head`: of its in-flight chain, or of its last completed
    /// one (until the head is reused).
    pub fn writable_of(&self, head: u16) -> Option<(u64, u32)> {
        let i = usize::from(head);
        match self.in_flight.get(i)? {
            Some(f) => f.writable,
            None => self.done[i],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_is_fifo_and_recycles() {
        let mut f = FreeList::new(4);
        assert_eq!(f.take(3), Some(vec![0, 1, 2]));
        assert_eq!(f.take(2), None);
        assert_eq!(f.len(), 1);
        f.give_back(&[1, 0]);
        assert_eq!(f.peek(), Some(3));
        assert_eq!(f.take(3), Some(vec![3, 1, 0]));
        f.give_back(&[3]);
        assert_eq!(f.len(), 1);
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn double_free_is_caught() {
        let mut f = FreeList::new(2);
        f.give_back(&[0]);
    }

    #[test]
    fn layout_is_page_aligned_and_sized_by_the_spec() {
        let l = RingLayout::new(0x1234, 256);
        assert_eq!(l.desc, 0x2000);
        assert_eq!(l.avail, 0x3000);
        assert_eq!(l.used, 0x4000);
        assert_eq!(l.end(), 0x5000);
        assert_eq!(l.used_event(), 0x3000 + 4 + 512);
        assert_eq!(l.avail_event(), 0x4000 + 4 + 2048);
        assert_eq!(l.slot(65535), 255);
        assert_eq!(l.slot(256), 0);
    }

    #[test]
    fn need_event_handles_wrap() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(65535, 0, 65534));
        assert!(need_event(65535, 2, 65534));
        assert!(!need_event(3, 2, 65534));
        assert!(!need_event(5, 10, 6));
    }

    /// A tiny device: consumes every available chain, answers with len = head + 1.
    struct FakeDevice {
        last_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice {
        fn run(&mut self, ram: &GuestRam, l: &RingLayout) -> usize {
            let avail = ram.load_u16_acquire(l.avail_idx()).unwrap();
            let mut n = 0;
            while self.last_avail != avail {
                let head = ram.read_u16(l.avail_ring(self.last_avail)).unwrap();
                self.last_avail = self.last_avail.wrapping_add(1);
                let at = l.used_ring(self.used_idx);
                ram.write_u32(at, u32::from(head)).unwrap();
                ram.write_u32(at + 4, u32::from(head) + 1).unwrap();
                self.used_idx = self.used_idx.wrapping_add(1);
                ram.store_u16_release(l.used_idx(), self.used_idx).unwrap();
                ram.write_u16(l.avail_event(), self.last_avail).unwrap();
                n += 1;
            }
            n
        }
    }

    #[test]
    fn indices_wrap_past_u16_max_and_descriptors_recycle() {
        let ram = GuestRam::new(0x10_0000).unwrap();
        let l = RingLayout::new(0x8_0000, 8);
        let mut q = Virtqueue::new(&ram, l, true).unwrap();
        let mut dev = FakeDevice {
            last_avail: 0,
            used_idx: 0,
        };
        let mut total = 0u32;
        // 3 chains of 2 descriptors per round: 70_000 chains cross 65_535 several ways.
        while total < 70_000 {
            let mut heads = Vec::new();
            for k in 0..3u64 {
                let h = q
                    .add(
                        &ram,
                        &[
                            RawDesc::readable(0x1000 * k, 8),
                            RawDesc::writable(0x1000 * k + 8, 4),
                        ],
                        Some((0x1000 * k + 8, 4)),
                    )
                    .unwrap();
                heads.push(h);
            }
            assert!(q.kick_needed(&ram).unwrap());
            assert!(!q.kick_needed(&ram).unwrap(), "nothing new published");
            assert_eq!(q.num_free(), 2);
            assert_eq!(dev.run(&ram, &l), 3);
            for &h in &heads {
                let e = q.poll_used(&ram).unwrap().unwrap();
                assert_eq!(
                    e,
                    UsedElem {
                        head: h,
                        len: u32::from(h) + 1
                    }
                );
                assert!(q.writable_of(h).is_some());
            }
            assert_eq!(q.poll_used(&ram).unwrap(), None);
            assert_eq!(q.num_free(), 8);
            assert_eq!(ram.read_u16(l.used_event()).unwrap(), q.last_used());
            total += 3;
        }
        assert_eq!(q.avail_idx(), (total % 65536) as u16);
        assert_eq!(q.last_used(), q.avail_idx());
    }

    #[test]
    fn bogus_used_entries_are_reported() {
        let ram = GuestRam::new(0x10_0000).unwrap();
        let l = RingLayout::new(0, 4);
        let mut q = Virtqueue::new(&ram, l, false).unwrap();
        // used.idx moves without anything in flight.
        ram.store_u16_release(l.used_idx(), 1).unwrap();
        assert!(matches!(
            q.poll_used(&ram),
            Err(DriverError::UsedIndexRunaway { .. })
        ));
        ram.store_u16_release(l.used_idx(), 0).unwrap();
        q.add(&ram, &[RawDesc::readable(0, 4)], None).unwrap();
        ram.write_u32(l.used_ring(0), 3).unwrap(); // head 3 is not in flight
        ram.store_u16_release(l.used_idx(), 1).unwrap();
        assert!(matches!(
            q.poll_used(&ram),
            Err(DriverError::BadUsedId { id: 3, .. })
        ));
    }

    #[test]
    fn a_full_queue_refuses_more_and_an_indirect_table_is_chained() {
        let ram = GuestRam::new(0x10_0000).unwrap();
        let mut q = Virtqueue::new(&ram, RingLayout::new(0, 2), false).unwrap();
        let descs = [RawDesc::readable(0, 1); 3];
        assert!(matches!(
            q.add(&ram, &descs, None),
            Err(DriverError::NoFreeDescriptors { need: 3, free: 2 })
        ));
        assert_eq!(q.num_free(), 2);
        write_table(&ram, 0x9000, &descs).unwrap();
        assert_eq!(ram.read_u16(0x9000 + 12).unwrap(), VRING_DESC_F_NEXT as u16);
        assert_eq!(ram.read_u16(0x9000 + 14).unwrap(), 1);
        assert_eq!(ram.read_u16(0x9000 + 32 + 12).unwrap(), 0);
        assert!(Virtqueue::new(&ram, RingLayout::new(0, 3), false).is_err());
    }
}
