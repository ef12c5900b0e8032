//! Presenting bench results: the table, the JSON lines and the SVG latency plot.
//!
//! Pure formatting: it computes ratios from measurements taken in the same run and never
//! measures anything itself.

use std::fmt::Write;

use super::{Measurement, Path};
use crate::pipeline::Mode;

fn path_name(p: Path) -> String {
    match p {
        Path::Raw => "raw".into(),
        Path::Socket(Mode::Inline) => "inline".into(),
        Path::Socket(Mode::Pipeline(n)) => format!("pipeline({n})"),
    }
}

/// Nanoseconds per request of a measurement.
fn ns_per_request(m: &Measurement) -> f64 {
    m.elapsed_ns as f64 / m.requests.max(1) as f64
}

/// The baseline a measurement is compared with, and the ratio: for inline, its cost relative
/// to the raw loop (overhead, lower is better); for the pipeline, its throughput relative to
/// inline (speedup, higher is better).
pub fn ratio(m: &Measurement, all: &[Measurement]) -> Option<(&'static str, f64)> {
    let find = |want: fn(Path) -> bool| {
        all.iter()
            .find(|o| o.workload.name == m.workload.name && want(o.path))
    };
    match m.path {
        Path::Raw => None,
        Path::Socket(Mode::Inline) => find(|p| p == Path::Raw)
            .map(|raw| ("raw (overhead ×)", ns_per_request(m) / ns_per_request(raw))),
        Path::Socket(Mode::Pipeline(_)) => find(|p| p == Path::Socket(Mode::Inline)).map(|inl| {
            (
                "inline (speedup ×)",
                m.requests_per_sec() / inl.requests_per_sec(),
            )
        }),
    }
}

/// The human-readable table.
pub fn table(all: &[Measurement]) -> String {
    let mut out = String::new();
    out.push_str(
        "workload         path           requests/s      pairs/s     p50 µs     p99 µs  ratio\n",
    );
    for m in all {
        let r = ratio(m, all)
            .map(|(b, r)| format!("{r:.2} vs {b}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:>12.0} {:>12.0} {:>10.2} {:>10.2}  {}",
            m.workload.name,
            path_name(m.path),
            m.requests_per_sec(),
            m.pairs_per_sec(),
            m.p50_ns as f64 / 1e3,
            m.p99_ns as f64 / 1e3,
            r
        );
    }
    out
}

/// One JSON object per measurement, one per line.
pub fn json(all: &[Measurement], backend: &str) -> String {
    let mut out = String::new();
    for m in all {
        let (baseline, r) = match ratio(m, all) {
            Some((b, r)) => (Some(b), Some(r)),
            None => (None, None),
        };
        let v = serde_json::json!({
            "workload": m.workload.name,
            "pattern": m.workload.pattern,
            "size": m.workload.size,
            "mode": path_name(m.path),
            "backend": backend,
            "requests": m.requests,
            "requests_per_sec": m.requests_per_sec(),
            "pairs_per_sec": m.pairs_per_sec(),
            "p50_us": m.p50_ns as f64 / 1e3,
            "p99_us": m.p99_ns as f64 / 1e3,
            "baseline": baseline,
            "ratio": r,
        });
        let _ = writeln!(out, "{v}");
    }
    out
}

/// An SVG with one panel per workload: the distribution (CDF) of kick-to-used latency of each
/// path, on a logarithmic time axis.
pub fn svg(all: &[Measurement]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for m in all {
        if !names.contains(&m.workload.name) {
            names.push(m.workload.name);
        }
    }
    let (pw, ph, cols) = (300.0, 200.0, 4usize);
    let rows = names.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64, ph * rows as f64 + 30.0);
    let colors = ["#444444", "#1f77b4", "#d62728", "#2ca02c"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let (lo, hi) = all
        .iter()
        .flat_map(|m| {
            [
                m.latencies_ns.first().copied(),
                m.latencies_ns.last().copied(),
            ]
        })
        .flatten()
        .fold((u64::MAX, 1u64), |(lo, hi), v| {
            (lo.min(v.max(1)), hi.max(v))
        });
    let (llo, lhi) = (
        (lo.max(1) as f64).log10().floor(),
        (hi as f64).log10().ceil().max(1.0),
    );
    for (i, name) in names.iter().enumerate() {
        let (x0, y0) = ((i % cols) as f64 * pw + 40.0, (i / cols) as f64 * ph + 20.0);
        let (iw, ih) = (pw - 60.0, ph - 60.0);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{name}</text>"#,
            x0,
            y0 - 5.0
        );
        let _ = writeln!(
            s,
            r#"<rect x="{x0}" y="{y0}" width="{iw}" height="{ih}" fill="none" stroke="gray"/>"#
        );
        let mut d = llo;
        while d <= lhi {
            let x = x0 + (d - llo) / (lhi - llo).max(1e-9) * iw;
            let label = 10f64.powf(d) / 1e3;
            let _ = writeln!(
                s,
                r#"<text x="{x}" y="{}" text-anchor="middle">{label}µs</text>"#,
                y0 + ih + 14.0
            );
            d += 1.0;
        }
        for (k, m) in all.iter().filter(|m| m.workload.name == *name).enumerate() {
            let n = m.latencies_ns.len();
            if n == 0 {
                continue;
            }
            let step = (n / 200).max(1);
            let mut pts = String::new();
            for (j, &v) in m.latencies_ns.iter().enumerate().step_by(step) {
                let x = x0 + ((v.max(1) as f64).log10() - llo) / (lhi - llo).max(1e-9) * iw;
                let y = y0 + ih - (j + 1) as f64 / n as f64 * ih;
                let _ = write!(pts, "{x:.1},{y:.1} ");
            }
            let c = colors[k % colors.len()];
            let _ = writeln!(
                s,
                r#"<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"/>"#
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" fill="{c}">{}</text>"#,
                x0 + 5.0,
                y0 + 14.0 + 13.0 * k as f64,
                path_name(m.path)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}">kick-to-used latency CDF per workload (x: log time, y: fraction of kicks)</text></svg>"#,
        h - 8.0
    );
    s
}
