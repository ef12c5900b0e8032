//! The two rings in guest RAM: where they and each head's buffers live, and how they are
//! announced to the daemon (SET_VRING_*), as QEMU's `vhost_virtqueue_start` does.

use super::*;

/// One queue: ring state, eventfds, per-head buffer area.
pub(super) struct Queue {
    pub(super) vq: Virtqueue,
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
    slots: u64,
    slot_size: u64,
}

impl Queue {
    pub(super) fn slot(&self, head: u16) -> u64 {
        self.slots + u64::from(head) * self.slot_size
    }
}

/// Where things live in guest RAM.
#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    pub(super) usable_end: u64,
    pub(super) rings: [RingLayout; 2],
    pub(super) slots: [u64; 2],
}

impl Layout {
    pub(super) fn new(ram_size: u64, qsize: u16) -> Result<Self, DriverError> {
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

impl TestVm {
    /// Fresh rings from index 0 for both queues, announced with SET_VRING_*.
    pub(super) fn setup_queues(&mut self) -> Result<(), DriverError> {
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
    pub(super) fn announce_queue(
        &mut self,
        q: usize,
        queue: &Queue,
        base: u16,
    ) -> Result<(), DriverError> {
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
}

/// Posts one `FAULT_SIZE` device-writable buffer in the event queue.
pub(super) fn post_event_buffer(ram: &GuestRam, q: &mut Queue) -> Result<(), DriverError> {
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
