//! How long the vring thread watches the request ring for the next request after answering one,
//! before it sleeps until the guest kicks: an adaptive window, grown and shrunk the way KVM
//! sizes its halt-polling window, under a ceiling that follows the machine's speed.
//!
//! Polling pays when the guest's next request comes soon: the guest then skips its kick and the
//! daemon skips a wake-up, which on a host whose CPU went idle costs far more than the request
//! itself. It wastes a core when the guest has gone quiet. So the window follows the gaps the
//! guest actually leaves between requests:
//! - a request that arrived after the window ran out, but within the ceiling, would have been
//!   caught by a longer window: the window doubles (from the floor), up to the ceiling;
//! - a gap longer than the ceiling means the guest went idle and the spin was wasted: the
//!   window falls back to the floor;
//! - a request caught while polling leaves the window as it is.
//!
//! The ceiling is the configured cap (`poll_us`), or [`SERVICE_MULTIPLE`] times the recent time
//! the daemon takes to serve one request, whichever is lower. A wake-up, the guest's next
//! request and the daemon's service all run at the machine's speed: where a request is served
//! in 5 µs (a host with KVM), the window stops at 640 µs, comparable to KVM's own halt polling;
//! where the same work takes 80 µs (a nested guest under TCG, everything some 20 times slower),
//! it may reach 10 ms. Measured in BENCHMARKS.md ("The peers").
//!
//! Pure bookkeeping: the caller measures time and spins.

use std::time::Duration;

/// Where the window starts and falls back to; also the step of the first growth.
pub const FLOOR: Duration = Duration::from_micros(50);
/// The ceiling in units of the recent per-request service time.
pub const SERVICE_MULTIPLE: u32 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    current: Duration,
    cap: Duration,
    /// Moving average of the time to serve one request (zero before the first).
    service: Duration,
}

impl PollWindow {
    /// A window that never exceeds `cap` (zero: never poll).
    pub fn new(cap: Duration) -> Self {
        PollWindow {
            current: FLOOR.min(cap),
            cap,
            service: Duration::ZERO,
        }
    }

    /// The window's upper bound now: the cap, or the service-time multiple if lower.
    pub fn ceiling(&self) -> Duration {
        if self.service.is_zero() {
            return self.cap;
        }
        (self.service * SERVICE_MULTIPLE).clamp(FLOOR.min(self.cap), self.cap)
    }

    /// How long to poll after the current answer.
    pub fn current(&self) -> Duration {
        self.current.min(self.ceiling())
    }

    /// A batch was served in `per_request` per request (a moving average over batches, 1/8
    /// weight for the newest).
    pub fn served(&mut self, per_request: Duration) {
        self.service = if self.service.is_zero() {
            per_request
        } else {
            (self.service * 7 + per_request) / 8
        };
    }

    /// The window ran out and the next request came `gap` after the answer that started it
    /// (the spin included).
    pub fn missed(&mut self, gap: Duration) {
        let ceiling = self.ceiling();
        if ceiling.is_zero() {
            return;
        }
        let floor = FLOOR.min(ceiling);
        self.current = if gap <= ceiling {
            (self.current() * 2).clamp(floor, ceiling)
        } else {
            floor
        };
    }
}

/// Interrupts to let pass without polling once polling after them kept finding nothing.
pub const IRQ_RETRY_AFTER: u32 = 64;

/// How long the vring thread polls the ring after an assigned device's interrupt (see
/// `irq_watch`), under the ceiling of the [`PollWindow`]: the guest's reaction to an interrupt
/// (a strict-mode UNMAP in the handler, the next MAP) comes within a delay that depends on the
/// machine and the driver, so the window follows it:
/// - it starts at the ceiling;
/// - a request caught `after` the interrupt keeps the window at least twice that;
/// - an interrupt with no request in the window halves it; below the floor, the next
///   [`IRQ_RETRY_AFTER`] interrupts pass without polling (a lazy-mode guest, a NIC in a
///   passthrough domain), then it starts again at the ceiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqWindow {
    /// Zero: the ceiling (not learned yet, or starting again).
    current: Duration,
    skip: u32,
}

impl IrqWindow {
    /// How long to poll after this interrupt (zero: not this time).
    pub fn next(&mut self, ceiling: Duration) -> Duration {
        if self.skip > 0 {
            self.skip -= 1;
            return Duration::ZERO;
        }
        self.window(ceiling)
    }

    fn window(&self, ceiling: Duration) -> Duration {
        if self.current.is_zero() {
            ceiling
        } else {
            self.current.min(ceiling)
        }
    }

    /// A request came `after` the interrupt, inside the window.
    pub fn hit(&mut self, after: Duration, ceiling: Duration) {
        self.current = self
            .window(ceiling)
            .max(after * 2)
            .clamp(FLOOR.min(ceiling), ceiling);
    }

    /// The window ran out with no request.
    pub fn missed(&mut self, ceiling: Duration) {
        let half = self.window(ceiling) / 2;
        if half < FLOOR {
            *self = IrqWindow {
                current: Duration::ZERO,
                skip: IRQ_RETRY_AFTER,
            };
        } else {
            self.current = half;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interrupt_window_keeps_what_caught_requests_and_rests_when_nothing_comes() {
        let ceiling = 10 * MS;
        let mut w = IrqWindow::default();
        assert_eq!(w.next(ceiling), ceiling);
        // Requests 3 ms after the interrupt: the window never falls below 6 ms on a miss streak
        // that ends in a hit.
        w.missed(ceiling);
        assert_eq!(w.next(ceiling), 5 * MS);
        w.hit(3 * MS, ceiling);
        assert_eq!(w.next(ceiling), 6 * MS);
        // An early hit (the request was already there) does not shrink it.
        w.hit(Duration::ZERO, ceiling);
        assert_eq!(w.next(ceiling), 6 * MS);
        // A lower ceiling (a faster machine) binds at once.
        assert_eq!(w.next(2 * MS), 2 * MS);
        // Nothing after the interrupts (a lazy guest): halves down to the floor, then rests.
        let mut polled = Vec::new();
        for _ in 0..10 {
            let d = w.next(ceiling);
            if d.is_zero() {
                break;
            }
            polled.push(d.as_micros());
            w.missed(ceiling);
        }
        assert_eq!(polled, [6000, 3000, 1500, 750, 375, 187, 93]);
        for _ in 0..IRQ_RETRY_AFTER - 1 {
            assert!(w.next(ceiling).is_zero());
        }
        // Then tries again from the ceiling.
        assert_eq!(w.next(ceiling), ceiling);
    }

    #[test]
    fn no_interrupt_window_without_polling() {
        let mut w = IrqWindow::default();
        assert!(w.next(Duration::ZERO).is_zero());
        w.hit(MS, Duration::ZERO);
        assert!(w.next(Duration::ZERO).is_zero());
        w.missed(Duration::ZERO);
        assert!(w.next(Duration::ZERO).is_zero());
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_while_requests_come_within_the_ceiling() {
        let mut w = PollWindow::new(2 * MS);
        assert_eq!(w.current(), FLOOR);
        let mut seen = vec![w.current()];
        for _ in 0..8 {
            w.missed(MS + Duration::from_micros(500));
            seen.push(w.current());
        }
        let us: Vec<u128> = seen.iter().map(|d| d.as_micros()).collect();
        assert_eq!(us, [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn falls_back_to_the_floor_when_the_guest_goes_idle() {
        let mut w = PollWindow::new(2 * MS);
        for _ in 0..6 {
            w.missed(MS);
        }
        assert_eq!(w.current(), 2 * MS);
        w.missed(2 * MS + Duration::from_nanos(1));
        assert_eq!(w.current(), FLOOR);
    }

    #[test]
    fn a_ceiling_below_the_floor_is_the_window() {
        let mut w = PollWindow::new(Duration::from_micros(20));
        assert_eq!(w.current(), Duration::from_micros(20));
        w.missed(Duration::from_micros(10));
        assert_eq!(w.current(), Duration::from_micros(20));
        w.missed(MS);
        assert_eq!(w.current(), Duration::from_micros(20));
    }

    #[test]
    fn the_ceiling_follows_the_time_to_serve_a_request() {
        let mut w = PollWindow::new(10 * MS);
        // A fast host: 5 us per request puts the ceiling at 640 us.
        w.served(Duration::from_micros(5));
        assert_eq!(w.ceiling(), Duration::from_micros(640));
        for _ in 0..10 {
            w.missed(Duration::from_micros(500));
        }
        assert_eq!(w.current(), Duration::from_micros(640));
        // Gaps of 1 ms are idleness there: back to the floor.
        w.missed(MS);
        assert_eq!(w.current(), FLOOR);
        // A slow machine (80 us per request, as a nested TCG guest): the cap of 10 ms binds.
        for _ in 0..64 {
            w.served(Duration::from_micros(80));
        }
        assert_eq!(w.ceiling(), 10 * MS);
        for _ in 0..10 {
            w.missed(5 * MS);
        }
        assert_eq!(w.current(), 10 * MS);
        // Faster again: the window shrinks with the ceiling at once.
        for _ in 0..64 {
            w.served(Duration::from_micros(2));
        }
        assert!(
            w.current() <= Duration::from_micros(300),
            "{:?}",
            w.current()
        );
    }

    #[test]
    fn a_zero_ceiling_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert!(w.current().is_zero());
        w.missed(Duration::from_micros(1));
        w.missed(MS);
        assert!(w.current().is_zero());
    }
}
