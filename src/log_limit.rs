//! Rate limits for log lines whose rate an outside party decides (the VMM, the guest): the daemon
//! logs and goes on, and must not let them flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets the first 10 events through, then one in 1,000. Cheap enough for a static per call site.
pub struct EveryNth(AtomicU64);

impl EveryNth {
    pub const fn new() -> Self {
        EveryNth(AtomicU64::new(0))
    }

    /// Counts one event; true if it should be logged. The count so far is `seen()`.
    pub fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        n < 10 || n.is_multiple_of(1000)
    }

    /// Events counted so far.
    pub fn seen(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for EveryNth {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ten_then_one_in_a_thousand() {
        let l = EveryNth::new();
        let allowed: Vec<u64> = (0..3001).filter(|_| l.allow()).collect();
        assert_eq!(
            allowed,
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000, 2000, 3000]
        );
        assert_eq!(l.seen(), 3001);
    }
}
