//! The assigned devices' interrupts as a hint for the vring thread: the eventfds the VMM gave
//! each device for its MSI/MSI-X vectors (vfio-user `DEVICE_SET_IRQS`), watched without being
//! read.
//!
//! Why: a guest driver in strict mode unmaps a buffer as soon as the device says it is done
//! with it, in its interrupt handler, and most drivers then map the next one. Between the I/O
//! and that request the guest is quiet for longer than the polling window, so without a hint
//! the request finds the vring thread asleep and pays a wake-up (on a host whose CPUs went
//! idle, often more than the request itself; measured in BENCHMARKS.md). The device's interrupt
//! comes first: it wakes the vring thread while the VMM is still injecting it into the guest,
//! and the thread polls the ring for the request that follows (see `vhost::poll_window`'s
//! `IrqWindow`). An in-process vIOMMU cannot do this: it does not own the devices.
//!
//! The VMM's eventfds are duplicated and registered edge-triggered in one epoll set of their
//! own, whose fd sits in the vring thread's epoll set. Nothing here reads them: the VMM's own
//! reader (its interrupt injection) still consumes every count. A duplicate is taken out of the
//! set before it is closed (an epoll registration lives as long as the VMM's copy, not ours).
//! The hint only ever starts a bounded poll, so a VMM that signals its eventfds without end can
//! make the daemon poll, no more (it could kick the ring as well).
//!
//! Not handed over: a daemon that took over from an upgraded or crashed one does not have the
//! VMM's eventfds (the kernel's VFIO device holds them, and the VMM does not send them again),
//! so it serves as with `poll_after_irq = false` until the VMM next sets a device's interrupts
//! (the guest's driver reloads, the device resets). Nothing is lost but the hint.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// One watched vector: the device's name, its IRQ index and vector number.
type Vector = (String, u32, u32);

/// How many devices [`IrqWatch::drain`] tells apart; a device beyond them shares the last slot.
pub const SLOTS: usize = 64;

/// The devices that raised an interrupt, a bit per slot (see [`IrqWatch::slot_of`]).
pub type Fired = u64;

#[derive(Default)]
struct Watched {
    /// The device names in slot order.
    slots: Vec<String>,
    fds: HashMap<Vector, OwnedFd>,
}

impl Watched {
    fn slot(&mut self, device: &str) -> usize {
        match self.slots.iter().position(|d| d == device) {
            Some(i) => i.min(SLOTS - 1),
            None => {
                self.slots.push(device.to_owned());
                (self.slots.len() - 1).min(SLOTS - 1)
            }
        }
    }
}

/// The watched interrupt eventfds of every assigned device.
pub struct IrqWatch {
    epoll: Epoll,
    watched: Mutex<Watched>,
}

impl std::fmt::Debug for IrqWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqWatch")
            .field("vectors", &self.len())
            .finish()
    }
}

impl IrqWatch {
    pub fn new() -> io::Result<Self> {
        Ok(IrqWatch {
            epoll: Epoll::new()?,
            watched: Mutex::new(Watched::default()),
        })
    }

    /// Readable while an interrupt fired since the last [`IrqWatch::drain`]: for the vring
    /// thread's epoll set.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn watched(&self) -> MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `device`'s vectors `start..` of IRQ index `index` now signal `fds` (-1: none), as the
    /// VMM just set them on the device.
    pub fn set(&self, device: &str, index: u32, start: u32, fds: &[RawFd]) -> io::Result<()> {
        let mut watched = self.watched();
        let slot = watched.slot(device);
        for (vector, &fd) in (start..).zip(fds) {
            let key = (device.to_owned(), index, vector);
            if let Some(old) = watched.fds.remove(&key) {
                self.forget_fd(&old);
            }
            if fd < 0 {
                continue;
            }
            // SAFETY: the caller holds `fd` open for the duration of this call (it came with the
            // VMM's message); the borrow ends before it returns.
            let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
            let event = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, slot as u64);
            self.epoll
                .ctl(ControlOperation::Add, dup.as_raw_fd(), event)?;
            watched.fds.insert(key, dup);
        }
        Ok(())
    }

    /// `device`'s IRQ index `index` is disabled: none of its vectors is watched any more.
    pub fn clear_index(&self, device: &str, index: u32) {
        self.remove(|(d, i, _)| d == device && *i == index);
    }

    /// `device`'s VMM is gone: none of its vectors is watched any more.
    pub fn forget(&self, device: &str) {
        self.remove(|(d, _, _)| d == device);
    }

    /// How many vectors are watched (metrics, tests).
    pub fn len(&self) -> usize {
        self.watched().fds.len()
    }

    /// The bit of `device` in what [`IrqWatch::drain`] returns (it keeps its slot for the
    /// daemon's life).
    pub fn slot_of(&self, device: &str) -> Fired {
        1 << self.watched().slot(device)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the interrupts that fired since the last call: which devices raised them.
    pub fn drain(&self) -> Fired {
        let mut events = [EpollEvent::default(); 16];
        let mut fired = 0;
        loop {
            match self.epoll.wait(0, &mut events) {
                Ok(n) => {
                    for e in &events[..n] {
                        fired |= 1 << e.data().min(SLOTS as u64 - 1);
                    }
                    if n < events.len() {
                        return fired;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return fired,
            }
        }
    }

    fn remove(&self, which: impl Fn(&Vector) -> bool) {
        let mut watched = self.watched();
        let gone: Vec<Vector> = watched.fds.keys().filter(|k| which(k)).cloned().collect();
        for key in gone {
            if let Some(fd) = watched.fds.remove(&key) {
                self.forget_fd(&fd);
            }
        }
    }

    fn forget_fd(&self, fd: &OwnedFd) {
        // Cannot fail for an fd we registered; an error would only leave a registration that
        // ends with the VMM's copy.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn an_interrupt_is_seen_once_and_left_for_the_vmm() {
        let w = IrqWatch::new().unwrap();
        let (a, b) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        w.set("nvme", 2, 0, &[a.as_raw_fd(), b.as_raw_fd()])
            .unwrap();
        assert_eq!(w.len(), 2);
        assert!(!readable(w.fd()));
        a.write(1).unwrap();
        assert!(readable(w.fd()));
        assert_eq!(w.drain(), w.slot_of("nvme"));
        assert!(!readable(w.fd()), "drained");
        // The VMM still reads its count: nothing here consumed it.
        assert_eq!(a.read().unwrap(), 1);
        // Each new signal is seen again (edge-triggered), even before the VMM reads.
        b.write(1).unwrap();
        b.write(1).unwrap();
        assert_eq!(w.drain(), w.slot_of("nvme"));
        assert_eq!(b.read().unwrap(), 2);
        assert_eq!(w.drain(), 0);
    }

    #[test]
    fn vectors_set_again_cleared_or_forgotten_are_no_longer_watched() {
        let w = IrqWatch::new().unwrap();
        let (a, b, c) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        w.set("nvme", 2, 0, &[a.as_raw_fd(), b.as_raw_fd()])
            .unwrap();
        w.set("nic", 2, 0, &[c.as_raw_fd()]).unwrap();
        // Vector 0 re-assigned to nothing: a no longer wakes the watch.
        w.set("nvme", 2, 0, &[-1]).unwrap();
        a.write(1).unwrap();
        assert_eq!(w.drain(), 0);
        w.clear_index("nvme", 2);
        b.write(1).unwrap();
        assert_eq!(w.drain(), 0);
        assert_eq!(w.len(), 1);
        c.write(1).unwrap();
        assert_eq!(w.drain(), w.slot_of("nic"));
        assert_ne!(w.slot_of("nic"), w.slot_of("nvme"));
        a.write(1).unwrap();
        c.write(1).unwrap();
        w.set("nvme", 2, 0, &[a.as_raw_fd()]).unwrap();
        a.write(1).unwrap();
        assert_eq!(w.drain(), w.slot_of("nic") | w.slot_of("nvme"));
        w.forget("nic");
        w.forget("nvme");
        assert!(w.is_empty());
        c.write(1).unwrap();
        a.write(1).unwrap();
        assert_eq!(w.drain(), 0);
    }
}
