//! Watching the request ring instead of sleeping: the polling window after a batch of answers
//! (see `poll_window`), and the poll after an assigned device's interrupt (see `irq_watch`).

use super::requests::{Answerer, signal};
use super::*;

/// Polling iterations between two `sched_yield`s (a few microseconds of spinning).
const YIELD_EVERY: u32 = 64;

/// Spins for up to `window` until the guest adds a request or an executor completes one;
/// true if there is new work on the ring.
pub(super) fn poll_for_work(
    window: std::time::Duration,
    vring: &VringRwLock,
    mem: &MemGuard,
    dispatcher: &mut Dispatcher,
    a: &mut Answerer<'_>,
    mailbox: &Mailbox<Event>,
) -> bool {
    if window.is_zero() && dispatcher.in_flight() == 0 {
        return false;
    }
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if dispatcher.in_flight() > 0 {
            dispatcher.poll();
            dispatcher.completed().for_each(|c| a.complete(c));
            if a.used {
                signal(vring);
                a.used = false;
            }
        }
        let pending = {
            let g = vring.get_ref();
            let q = g.get_queue();
            q.avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
                .map(|i| i.0 != q.next_avail())
                .unwrap_or(false)
        };
        if pending {
            return true;
        }
        // Other threads' events must not wait out the window.
        if start.elapsed() >= window || mailbox.has_mail() {
            return false;
        }
        // On a host with more runnable threads than cores (many busy VMs), the thread that
        // would post the next request may be waiting for this very core: give it up now and
        // then (sched_yield returns at once on an idle core). Measured in BENCHMARKS.md
        // ("Many busy daemons").
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(YIELD_EVERY) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl IommuDevice {
    /// After assigned devices' interrupts (`fired`, see `irq_watch`): polls the ring for the
    /// guest's answer for the longest of the devices' windows, and teaches each window what
    /// came. Returns whether there is a request to serve.
    pub(super) fn poll_after_interrupt(
        &self,
        s: &mut Session,
        vring: &VringRwLock,
        mem: &MemGuard,
        fired: crate::irq_watch::Fired,
    ) -> io::Result<bool> {
        let metrics = &*self.0.metrics;
        // Each device's window learns how its own interrupts are answered (a NIC's receive
        // interrupts may bring no request where an NVMe's completions bring an UNMAP).
        let ceiling = s.window.ceiling();
        let mut polled: crate::irq_watch::Fired = 0;
        let mut window = std::time::Duration::ZERO;
        for (i, w) in s.irq_windows.iter_mut().enumerate() {
            if fired & (1 << i) != 0 {
                let d = w.next(ceiling);
                if !d.is_zero() {
                    polled |= 1 << i;
                    window = window.max(d);
                }
            }
        }
        metrics
            .irq_wakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if window.is_zero() {
            return Ok(false);
        }
        metrics
            .irq_polls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        vring.disable_notification().map_err(io::Error::other)?;
        let started_polling = Instant::now();
        let found = {
            let mut a = Answerer::new(mem, vring, &mut s.pending, &mut s.limiter, self.sinks());
            let found = poll_for_work(
                window,
                vring,
                mem,
                &mut s.dispatcher,
                &mut a,
                &self.0.mailbox,
            );
            if a.used {
                signal(vring);
            }
            found
        };
        let after = started_polling.elapsed();
        let windows = s.irq_windows.iter_mut().enumerate();
        for (_, w) in windows.filter(|(i, _)| polled & (1 << i) != 0) {
            if found {
                w.hit(after, ceiling);
            } else {
                w.missed(ceiling);
            }
        }
        if found {
            // The interrupt bridged the guest's gap: no wake-up by a kick.
            s.quiet_since = None;
            metrics
                .irq_poll_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(true)
        } else {
            // A request that came as the window closed is served as a kick's would be.
            vring.enable_notification().map_err(io::Error::other)
        }
    }
}
