//! The device state's one owner and the way other threads reach it.
//!
//! The device state (topology, domains, memory table, ring bookkeeping) is changed by one thread
//! only: the connection's vring thread while it runs, the serve loop's thread before it starts
//! and after it ended. Every other thread (the vhost-user message thread, the vfio-user fronts,
//! the hot-plug watcher, the control socket) posts its event here and waits for the answer; the
//! owner takes the events between request batches (an eventfd in its epoll set wakes it when it
//! sleeps, [`Mailbox::has_mail`] tells it when it polls the ring).
//!
//! When no vring thread runs (before the connection's threads start, after they ended, or after
//! one died on an error), [`Mailbox::post`] hands the event back and the poster applies it itself
//! under the same rules: there is still exactly one owner at a time.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

struct Queue<E> {
    /// A vring thread owns the state and takes the events.
    running: bool,
    events: VecDeque<E>,
}

/// Events for the owner thread.
pub struct Mailbox<E> {
    queue: Mutex<Queue<E>>,
    /// Readable while events wait (registered with the vring thread's epoll).
    wake: EventFd,
    /// Set while events wait: the owner checks it while it spins on the ring.
    mail: AtomicBool,
}

impl<E> Mailbox<E> {
    pub fn new() -> std::io::Result<Self> {
        Ok(Mailbox {
            queue: Mutex::new(Queue {
                running: false,
                events: VecDeque::new(),
            }),
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            mail: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue<E>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event` for the running owner thread, or gives it back when none runs (the caller
    /// is then the owner for this event).
    pub fn post(&self, event: E) -> Result<(), E> {
        let mut q = self.lock();
        if !q.running {
            return Err(event);
        }
        q.events.push_back(event);
        self.mail.store(true, Ordering::Release);
        // An eventfd write fails only when its counter would overflow, i.e. when it is readable
        // already, which is all that is needed.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The owner: takes every waiting event, in the order they were posted.
    pub fn take(&self) -> VecDeque<E> {
        let mut q = self.lock();
        let _ = self.wake.read();
        self.mail.store(false, Ordering::Release);
        std::mem::take(&mut q.events)
    }

    /// Whether events wait (cheap: for the owner's polling loop).
    pub fn has_mail(&self) -> bool {
        self.mail.load(Ordering::Acquire)
    }

    /// A vring thread owns the state from now on (its epoll set has [`Mailbox::fd`]).
    pub fn start(&self) {
        self.lock().running = true;
    }

    /// The vring thread is gone: posters apply their events themselves from now on. Returns the
    /// events it did not take, for the caller to apply.
    pub fn stop(&self) -> VecDeque<E> {
        let mut q = self.lock();
        q.running = false;
        let _ = self.wake.read();
        self.mail.store(false, Ordering::Release);
        std::mem::take(&mut q.events)
    }

    /// The eventfd for the owner's epoll set.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_owner_thread_the_event_comes_back() {
        let m = Mailbox::new().unwrap();
        assert_eq!(m.post(1), Err(1));
        assert!(!m.has_mail());
    }

    #[test]
    fn a_running_owner_gets_the_events_in_order_and_the_eventfd_wakes_it() {
        let m = Mailbox::new().unwrap();
        m.start();
        m.post(1).unwrap();
        m.post(2).unwrap();
        assert!(m.has_mail());
        let mut p = libc::pollfd {
            fd: m.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1, "eventfd readable");
        assert_eq!(m.take(), [1, 2]);
        assert!(!m.has_mail());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0, "eventfd drained");
    }

    #[test]
    fn stopping_hands_back_what_the_owner_did_not_take() {
        let m = Mailbox::new().unwrap();
        m.start();
        m.post(7).unwrap();
        assert_eq!(m.stop(), [7]);
        assert_eq!(m.post(8), Err(8));
    }
}
