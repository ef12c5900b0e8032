//! Giving the memory of freed mappings back to the system. The shadow of every mapping (and the
//! soft backend's table) lives on the heap, and glibc keeps freed heap memory for reuse: a guest
//! that made 10⁶ mappings and tore them down would leave the daemon at its peak size for good.
//! Once the live mappings fell to half of their high-water mark (of at least
//! [`HeapTrim::FLOOR`]), the owner asks glibc to return what is free (`malloc_trim`, which walks
//! every arena: the executors' too).

/// When to trim: the live mappings' high-water mark since the last trim.
#[derive(Debug, Default)]
pub struct HeapTrim {
    high_water: usize,
}

impl HeapTrim {
    /// Below this many live mappings at the peak, what could be returned is not worth a trim.
    pub const FLOOR: usize = 1 << 16;

    /// Notes `live` mappings; whether the heap is worth trimming now (then the mark restarts
    /// from `live`).
    pub fn due(&mut self, live: usize) -> bool {
        self.high_water = self.high_water.max(live);
        if self.high_water < Self::FLOOR || live > self.high_water / 2 {
            return false;
        }
        self.high_water = live;
        true
    }

    /// Trims the heap if [`due`](Self::due); returns whether it did.
    pub fn after(&mut self, live: usize) -> bool {
        if !self.due(live) {
            return false;
        }
        let before = rss_kib();
        // SAFETY: malloc_trim takes no pointers; it only releases free heap pages.
        unsafe { libc::malloc_trim(0) };
        log::debug!(
            "{live} mappings live (half of the peak or less): heap trimmed, RSS {before} -> {} KiB",
            rss_kib()
        );
        true
    }
}

/// This process's resident set, KiB (0 if /proc cannot tell).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_once_the_mappings_fell_to_half_of_a_large_peak() {
        let mut t = HeapTrim::default();
        assert!(!t.due(0));
        assert!(!t.due(HeapTrim::FLOOR - 1), "a peak below the floor");
        assert!(!t.due(0), "nothing worth returning");
        assert!(!t.due(1_000_000), "growing");
        assert!(!t.due(500_001), "more than half left");
        assert!(t.due(500_000), "half of the peak");
        assert!(!t.due(400_000), "the mark restarted from 500,000");
        assert!(t.due(0), "then half of that");
        assert!(!t.due(0), "once");
    }
}
