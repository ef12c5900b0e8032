//! How long the vring thread watches the request ring for the next request after answering one,
//! before it sleeps until the guest kicks: an adaptive window, grown and shrunk the way KVM
//! sizes its halt-polling window.
//!
//! Polling pays when the guest's next request comes soon: the guest then skips its kick and the
//! daemon skips a wake-up, which on a host whose CPU went idle costs far more than the request
//! itself. It wastes a core when the guest has gone quiet. So the window follows the gaps the
//! guest actually leaves between requests:
//! - a request that arrived after the window ran out, but within the ceiling, would have been
//!   caught by a longer window: the window doubles (from the floor when it was 0), up to the
//!   ceiling;
//! - a gap longer than the ceiling means the guest went idle and the spin was wasted: the
//!   window falls back to the floor;
//! - a request caught while polling leaves the window as it is.
//!
//! Pure bookkeeping: the caller measures time and spins.

use std::time::Duration;

/// Where the window starts and falls back to; also the step of the first growth.
pub const FLOOR: Duration = Duration::from_micros(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    current: Duration,
    ceiling: Duration,
}

impl PollWindow {
    /// A window that never exceeds `ceiling` (zero: never poll).
    pub fn new(ceiling: Duration) -> Self {
        PollWindow {
            current: FLOOR.min(ceiling),
            ceiling,
        }
    }

    /// How long to poll after the current answer.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The window ran out and the next request came `gap` after the answer that started it
    /// (the spin included).
    pub fn missed(&mut self, gap: Duration) {
        if self.ceiling.is_zero() {
            return;
        }
        self.current = if gap <= self.ceiling {
            (self.current * 2).clamp(FLOOR.min(self.ceiling), self.ceiling)
        } else {
            FLOOR.min(self.ceiling)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_zero_ceiling_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert!(w.current().is_zero());
        w.missed(Duration::from_micros(1));
        w.missed(MS);
        assert!(w.current().is_zero());
    }
}
