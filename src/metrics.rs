//! Counters the daemon keeps about what the guest asked and how it went.
//!
//! The Linux driver ignores MAP/UNMAP statuses, so a failure the guest cannot see shows up only
//! here. All counters are relaxed atomics: they are written on the request path by one thread
//! and read by whoever reports them, and never synchronise anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::{RequestType, Status};

/// Latency buckets: upper bounds in nanoseconds, powers of two from 256 ns to ~1 s.
const BUCKETS: usize = 24;

#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; 9]; 5],
    /// Chains returned unwritten: no tail room, bad descriptors, memory outside guest RAM.
    pub malformed: AtomicU64,
    /// Requests of an unknown type (used length 0).
    pub unknown_type: AtomicU64,
    /// Requests the host backend failed (after the request passed every spec check).
    pub backend_errors: AtomicU64,
    /// Times the vring thread found the guest's next request while polling after an answer.
    pub poll_hits: AtomicU64,
    /// Times the vring thread slept through a quiet guest and a kick woke it for more.
    pub wakeups: AtomicU64,
    /// Times an assigned device's interrupt woke the vring thread and it found the guest's next
    /// request while polling after it (see `irq_watch`): a wake-up by a kick saved.
    pub irq_poll_hits: AtomicU64,
    /// Times assigned devices' interrupts reached the vring thread (one per wake, however many
    /// fired).
    pub irq_wakes: AtomicU64,
    /// Of `irq_wakes`, the times it polled the ring after them (the rest: paused windows).
    pub irq_polls: AtomicU64,
    /// Latency histogram per request type (ATTACH .. PROBE), and the sum of latencies.
    latency: [[AtomicU64; BUCKETS]; 5],
    latency_sum_ns: [AtomicU64; 5],
    /// How many requests the vring thread found waiting each time it drained the queue (the
    /// queue depth the device sees): per power-of-two bucket, their sum and the batches.
    depth: [AtomicU64; DEPTH_BUCKETS],
    depth_sum: AtomicU64,
    batches: AtomicU64,
}

/// Queue-depth buckets: at most 1, 2, 4, … 1024 requests (the largest queue).
const DEPTH_BUCKETS: usize = 11;

impl Metrics {
    pub fn record(&self, kind: RequestType, status: Status, latency_ns: u64) {
        let k = kind as usize - 1;
        self.requests[k][status as usize].fetch_add(1, Ordering::Relaxed);
        // Past the last bucket: counted in +Inf only (the request count).
        if let Some(b) = bucket_of(latency_ns) {
            self.latency[k][b].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_ns[k].fetch_add(latency_ns, Ordering::Relaxed);
    }

    /// A drain of the request queue that found `n` requests (not counted when 0).
    pub fn record_batch(&self, n: u32) {
        if n == 0 {
            return;
        }
        let b = (32 - (n - 1).leading_zeros()) as usize;
        self.depth[b.min(DEPTH_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.depth_sum.fetch_add(u64::from(n), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter, in one fixed order (for handing them to the next binary at an upgrade).
    /// New counters go at the end: a newer binary then takes an older one's as a prefix.
    fn all(&self) -> impl Iterator<Item = &AtomicU64> {
        self.requests
            .iter()
            .flatten()
            .chain([
                &self.malformed,
                &self.unknown_type,
                &self.backend_errors,
                &self.poll_hits,
                &self.wakeups,
            ])
            .chain(self.latency.iter().flatten())
            .chain(self.latency_sum_ns.iter())
            .chain(self.depth.iter())
            .chain([&self.depth_sum, &self.batches])
            // Kept last: an older binary's handed-over counters are a prefix of this layout.
            .chain([&self.irq_poll_hits, &self.irq_wakes, &self.irq_polls])
    }

    /// The counters' values, for [`Metrics::import`] in the next binary.
    pub fn export(&self) -> Vec<u64> {
        self.all().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Adds what a previous binary counted (an older binary's fewer counters are the first
    /// ones of this layout); refuses more counters than this binary keeps.
    pub fn import(&self, values: &[u64]) -> Result<(), String> {
        let n = self.all().count();
        if values.len() > n {
            return Err(format!(
                "{} counters handed over, this binary keeps {n}",
                values.len()
            ));
        }
        for (c, v) in self.all().zip(values) {
            c.fetch_add(*v, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn count(&self, kind: RequestType, status: Status) -> u64 {
        self.requests[kind as usize - 1][status as usize].load(Ordering::Relaxed)
    }

    /// Requests of any type that did not end in `S_OK`.
    pub fn failed(&self) -> u64 {
        RequestType::ALL
            .iter()
            .flat_map(|&k| Status::ALL[1..].iter().map(move |&s| self.count(k, s)))
            .sum()
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE viommu_requests_total counter\n");
        for k in RequestType::ALL {
            for s in Status::ALL {
                let n = self.count(k, s);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "viommu_requests_total{{type=\"{}\",status=\"{}\"}} {n}",
                        k.name(),
                        s.name()
                    );
                }
            }
        }
        for (name, v) in [
            ("viommu_malformed_chains_total", &self.malformed),
            ("viommu_unknown_requests_total", &self.unknown_type),
            ("viommu_backend_errors_total", &self.backend_errors),
            ("viommu_poll_hits_total", &self.poll_hits),
            ("viommu_wakeups_total", &self.wakeups),
            ("viommu_irq_poll_hits_total", &self.irq_poll_hits),
            ("viommu_irq_wakes_total", &self.irq_wakes),
            ("viommu_irq_polls_total", &self.irq_polls),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        // One histogram per request type: a MAP and an ATTACH (a barrier that waits for every
        // request in flight) cost different things.
        out.push_str("# TYPE viommu_request_latency_seconds histogram\n");
        for k in RequestType::ALL {
            let i = k as usize - 1;
            let count = Status::ALL.iter().map(|&s| self.count(k, s)).sum();
            render_histogram(
                &mut out,
                "viommu_request_latency_seconds",
                &format!("type=\"{}\"", k.name()),
                &self.latency[i],
                self.latency_sum_ns[i].load(Ordering::Relaxed),
                count,
            );
        }
        out.push_str("# TYPE viommu_queue_depth histogram\n");
        let mut cum = 0;
        for (b, n) in self.depth.iter().enumerate().take(DEPTH_BUCKETS - 1) {
            cum += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "viommu_queue_depth_bucket{{le=\"{}\"}} {cum}",
                1u32 << b
            );
        }
        let batches = self.batches.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "viommu_queue_depth_bucket{{le=\"+Inf\"}} {batches}\n\
             viommu_queue_depth_sum {}\nviommu_queue_depth_count {batches}",
            self.depth_sum.load(Ordering::Relaxed)
        );
        out
    }
}

/// The bucket of a latency: bucket `b` holds what took at most 256 << b ns; `None` past the
/// last one.
fn bucket_of(ns: u64) -> Option<usize> {
    let b = (64 - ns.saturating_sub(1).leading_zeros()).saturating_sub(8) as usize;
    (b < BUCKETS).then_some(b)
}

/// One Prometheus histogram (`name` with `labels`) from per-bucket counts.
fn render_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: &[AtomicU64; BUCKETS],
    sum_ns: u64,
    count: u64,
) {
    let mut cum = 0;
    for (b, n) in buckets.iter().enumerate() {
        cum += n.load(Ordering::Relaxed);
        let le = (256u64 << b) as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le:e}\"}} {cum}");
    }
    let sum = sum_ns as f64 / 1e9;
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n\
         {name}_sum{{{labels}}} {sum}\n\
         {name}_count{{{labels}}} {count}"
    );
}

/// A latency histogram of one kind of operation (e.g. one backend ioctl), with the same
/// buckets as the request latencies.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn record(&self, ns: u64) {
        if let Some(b) = bucket_of(ns) {
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Times it was recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram in Prometheus text as `name{labels,le=…}` (no `# TYPE` line).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        render_histogram(
            out,
            name,
            labels,
            &self.buckets,
            self.sum_ns.load(Ordering::Relaxed),
            self.count(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_pass_to_the_next_binary_whole() {
        let a = Metrics::default();
        a.record(RequestType::Map, Status::Ok, 1000);
        a.record(RequestType::Unmap, Status::Range, 5_000_000);
        a.poll_hits.fetch_add(7, Ordering::Relaxed);
        let b = Metrics::default();
        b.record(RequestType::Map, Status::Ok, 10);
        b.import(&a.export()).unwrap();
        assert_eq!(b.count(RequestType::Map, Status::Ok), 2);
        assert_eq!(b.count(RequestType::Unmap, Status::Range), 1);
        assert_eq!(b.poll_hits.load(Ordering::Relaxed), 7);
        assert!(
            b.render()
                .contains("viommu_request_latency_seconds_sum{type=\"unmap\"} 0.005")
        );
        assert!(b.import(&vec![0; a.export().len() + 1]).is_err());
        // An older binary kept fewer counters: they are the first ones of this layout.
        let c = Metrics::default();
        c.import(&a.export()[..a.export().len() - 3]).unwrap();
        assert_eq!(c.count(RequestType::Unmap, Status::Range), 1);
    }

    #[test]
    fn the_queue_depth_counts_requests_per_drain() {
        let m = Metrics::default();
        for n in [1, 1, 3, 4, 5, 0, 2000] {
            m.record_batch(n);
        }
        let text = m.render();
        for line in [
            "viommu_queue_depth_bucket{le=\"1\"} 2",
            "viommu_queue_depth_bucket{le=\"2\"} 2",
            "viommu_queue_depth_bucket{le=\"4\"} 4",
            "viommu_queue_depth_bucket{le=\"8\"} 5",
            "viommu_queue_depth_bucket{le=\"512\"} 5",
            "viommu_queue_depth_bucket{le=\"+Inf\"} 6",
            "viommu_queue_depth_sum 2014",
            "viommu_queue_depth_count 6",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}: {text}");
        }
    }

    #[test]
    fn a_latency_is_counted_in_the_first_bucket_that_holds_it() {
        assert_eq!(bucket_of(0), Some(0));
        assert_eq!(bucket_of(256), Some(0));
        assert_eq!(bucket_of(257), Some(1));
        assert_eq!(bucket_of(512), Some(1));
        assert_eq!(bucket_of(256 << (BUCKETS - 1)), Some(BUCKETS - 1));
        assert_eq!(bucket_of((256 << (BUCKETS - 1)) + 1), None);
        let h = Histogram::default();
        h.record(300);
        h.record(1 << 40);
        let mut text = String::new();
        h.render(&mut text, "x_seconds", "op=\"map\"");
        assert!(
            text.contains("x_seconds_bucket{op=\"map\",le=\"2.56e-7\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{op=\"map\",le=\"5.12e-7\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{op=\"map\",le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{op=\"map\"} 2"), "{text}");
    }

    #[test]
    fn failed_counts_every_non_ok_status() {
        let m = Metrics::default();
        m.record(RequestType::Map, Status::Ok, 1000);
        m.record(RequestType::Map, Status::Range, 1000);
        m.record(RequestType::Attach, Status::NoEnt, 1 << 40);
        assert_eq!(m.failed(), 2);
        let text = m.render();
        assert!(text.contains("viommu_requests_total{type=\"map\",status=\"range\"} 1"));
        assert!(text.contains("viommu_request_latency_seconds_count{type=\"map\"} 2"));
        assert!(text.contains("viommu_request_latency_seconds_count{type=\"attach\"} 1"));
        assert!(text.contains("viommu_request_latency_seconds_count{type=\"probe\"} 0"));
        // The ATTACH took 2^40 ns: past the last bucket, so only in +Inf.
        assert!(
            text.contains("viommu_request_latency_seconds_bucket{type=\"attach\",le=\"+Inf\"} 1")
        );
        assert!(text.contains("viommu_request_latency_seconds_sum{type=\"map\"} 0.000002"));
        // ... and in no finite bucket.
        let last = format!("le=\"{:e}\"", (256u64 << (BUCKETS - 1)) as f64 / 1e9);
        assert!(
            text.contains(&format!(
                "viommu_request_latency_seconds_bucket{{type=\"attach\",{last}}} 0"
            )),
            "{text}"
        );
    }
}
