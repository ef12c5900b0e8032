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
    /// Latency histogram per request type (ATTACH .. PROBE), and the sum of latencies.
    latency: [[AtomicU64; BUCKETS]; 5],
    latency_sum_ns: [AtomicU64; 5],
}

impl Metrics {
    pub fn record(&self, kind: RequestType, status: Status, latency_ns: u64) {
        let k = kind as usize - 1;
        self.requests[k][status as usize].fetch_add(1, Ordering::Relaxed);
        let bucket = (64 - latency_ns.leading_zeros()).saturating_sub(8) as usize;
        self.latency[k][bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns[k].fetch_add(latency_ns, Ordering::Relaxed);
    }

    /// Every counter, in one fixed order (for handing them to the next binary at an upgrade).
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
    }

    /// The counters' values, for [`Metrics::import`] in the next binary.
    pub fn export(&self) -> Vec<u64> {
        self.all().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Adds what a previous binary counted; refuses values of another layout.
    pub fn import(&self, values: &[u64]) -> Result<(), String> {
        let n = self.all().count();
        if values.len() != n {
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
            let mut cum = 0;
            for (b, n) in self.latency[i].iter().enumerate() {
                cum += n.load(Ordering::Relaxed);
                let le = (256u64 << b) as f64 / 1e9;
                let _ = writeln!(
                    out,
                    "viommu_request_latency_seconds_bucket{{type=\"{}\",le=\"{le:e}\"}} {cum}",
                    k.name()
                );
            }
            let sum = self.latency_sum_ns[i].load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "viommu_request_latency_seconds_bucket{{type=\"{0}\",le=\"+Inf\"}} {cum}\n\
                 viommu_request_latency_seconds_sum{{type=\"{0}\"}} {sum}\n\
                 viommu_request_latency_seconds_count{{type=\"{0}\"}} {cum}",
                k.name()
            );
        }
        out
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
        assert!(b.import(&[1, 2, 3]).is_err());
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
    }
}
