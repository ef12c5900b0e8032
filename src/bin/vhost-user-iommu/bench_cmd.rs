//! `vhost-user-iommu bench`: the daemon measured end to end over a real socket (test-utils
//! builds).

use std::path::PathBuf;
#[cfg(feature = "test-utils")]
use std::sync::Arc;

use clap::Args;

use vhost_user_iommu::config::BackendKind;
#[cfg(feature = "test-utils")]
use vhost_user_iommu::pipeline::Mode;

#[derive(Args, Debug)]
#[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
pub(crate) struct BenchArgs {
    /// Translation backend to measure (only soft in this build).
    #[arg(long, value_enum, default_value = "soft")]
    backend: BackendKind,
    /// Executor modes to measure; `both` measures inline and the pipeline.
    #[arg(long, value_enum, default_value = "both")]
    mode: BenchMode,
    /// Executor threads of the pipeline mode.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Polling window of the vring thread in microseconds (default: the daemon's default).
    #[arg(long)]
    poll_us: Option<u64>,
    /// Rounds per workload (each round is one MAP/UNMAP cycle of the pattern).
    #[arg(long, default_value_t = 20000)]
    rounds: usize,
    /// Only workloads whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Print one JSON object per measurement instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw the latency distributions into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead of the workloads: MAP/UNMAP latency against the number of live mappings in the
    /// domain (comma-separated sizes, e.g. 1,1000,100000,1000000), `--rounds` pairs at each.
    #[arg(long, value_delimiter = ',')]
    state_sweep: Vec<usize>,
    /// Instead of the workloads: the domain model's heap bytes per live 4 KiB mapping with N
    /// mappings in one domain (what the daemon holds when the kernel holds the translation).
    #[arg(long)]
    model_bytes: Option<usize>,
    /// Instead of the workloads: CPU and memory of N idle daemons (each after a burst of
    /// requests), measured over 10 s.
    #[arg(long)]
    idle_daemons: Option<usize>,
    /// Instead of the workloads: one daemon as its own process (this binary), idle after a
    /// burst of requests: its CPU over 10 s and its RSS.
    #[arg(long)]
    idle_process: bool,
    /// Instead of the workloads: N daemons all busy at once (comma-separated counts, e.g.
    /// 1,8,32), each with its own guest sending MAP+UNMAP pairs for 5 s; latency and
    /// throughput against the first count, in the same run.
    #[arg(long, value_delimiter = ',')]
    busy_daemons: Vec<usize>,
    /// Instead of the workloads: the cost of `--trace`, the first selected workload with the
    /// trace off and on, alternating, three times each, in each selected mode.
    #[arg(long)]
    trace_cost: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchMode {
    Inline,
    Pipeline,
    Both,
}

/// The benchmark kit (a simulated VMM and guest in this process) is test code, left out of the
/// daemon operators install.
#[cfg(not(feature = "test-utils"))]
pub(crate) fn bench(_: BenchArgs) -> Result<(), String> {
    Err("this build has no benchmark kit: build it with `cargo build --release --features test-utils` (or run `cargo run --release --features test-utils -- bench`)".into())
}

/// `bench --trace-cost`: p50 and p99 kick-to-answer latency and requests/s without and with
/// the request trace, same workload, same run, interleaved.
#[cfg(feature = "test-utils")]
fn trace_cost(a: &BenchArgs) -> Result<(), String> {
    use vhost_user_iommu::bench;
    let w = bench::workloads()
        .into_iter()
        .find(|w| {
            a.filter
                .as_ref()
                .is_none_or(|f| w.name.contains(f.as_str()))
        })
        .ok_or("no workload matches --filter")?;
    let poll = a
        .poll_us
        .map(std::time::Duration::from_micros)
        .unwrap_or(vhost_user_iommu::vhost::DEFAULT_POLL);
    let dir = std::env::temp_dir().join(format!("viommu-trace-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut modes = vec![Mode::Inline];
    if a.mode != BenchMode::Inline {
        modes = vec![Mode::Pipeline(a.threads)];
        if a.mode == BenchMode::Both {
            modes.insert(0, Mode::Inline);
        }
    }
    println!("workload {}, {} rounds per run", w.name, a.rounds);
    println!("mode | trace | p50 µs | p99 µs | requests/s");
    for mode in modes {
        let mut rows: [Vec<bench::Measurement>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (i, on) in [false, true].into_iter().enumerate() {
                let trace = if on {
                    let path = dir.join("trace.jsonl");
                    let _ = std::fs::remove_file(&path);
                    Some(Arc::new(
                        vhost_user_iommu::trace::Tracer::open(&path, 1 << 30)
                            .map_err(|e| e.to_string())?,
                    ))
                } else {
                    None
                };
                let m = bench::run_socket_traced(&w, mode, poll, a.rounds, trace)
                    .map_err(|e| e.to_string())?;
                rows[i].push(m);
            }
        }
        let med = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let mut p50 = [0u64; 2];
        let mut rps = [0f64; 2];
        for (i, r) in rows.iter().enumerate() {
            let p50s: &mut Vec<u64> = &mut r.iter().map(|m| m.p50_ns).collect();
            let p99s: &mut Vec<u64> = &mut r.iter().map(|m| m.p99_ns).collect();
            let mut rates: Vec<f64> = r.iter().map(|m| m.requests_per_sec()).collect();
            rates.sort_by(f64::total_cmp);
            p50[i] = med(p50s);
            rps[i] = rates[rates.len() / 2];
            println!(
                "{mode:?} | {} | {:.1} | {:.1} | {:.0}",
                if i == 0 { "off" } else { "on" },
                p50[i] as f64 / 1e3,
                med(p99s) as f64 / 1e3,
                rps[i]
            );
        }
        println!(
            "{mode:?}: with the trace, p50 × {:.2}, requests/s × {:.2} (medians of 3 runs each)",
            p50[1] as f64 / p50[0].max(1) as f64,
            rps[1] / rps[0].max(1.0)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Prints `v` as one JSON line (`--json`) or as the sentence `text` makes of it.
#[cfg(feature = "test-utils")]
fn print_as<T: serde::Serialize>(
    json: bool,
    v: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<(), String> {
    if json {
        println!("{}", serde_json::to_string(v).map_err(|e| e.to_string())?);
    } else {
        println!("{}", text(v));
    }
    Ok(())
}

#[cfg(feature = "test-utils")]
pub(crate) fn bench(a: BenchArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    use vhost_user_iommu::bench::{self, report};
    if a.backend != BackendKind::Soft {
        return Err("only --backend soft can be benchmarked in this build".into());
    }
    if a.rounds == 0 || a.threads == 0 {
        return Err("--rounds and --threads must be at least 1".into());
    }
    if let Some(n) = a.idle_daemons {
        let p = bench::state::run_idle(n.max(1), std::time::Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        return print_as(a.json, &p, |p| {
            format!(
                "{} idle daemons over {:.0} s: {:.3} CPU s in total ({:.2} % of one core per daemon), {} KiB RSS per daemon",
                p.daemons,
                p.idle_secs,
                p.cpu_secs,
                p.cpu_secs / p.idle_secs / p.daemons as f64 * 100.0,
                p.rss_kib_per_daemon
            )
        });
    }
    if a.idle_process {
        let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
        let p = bench::state::run_idle_process(&exe, std::time::Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        return print_as(a.json, &p, |p| {
            format!(
                "one daemon process idle over {:.0} s: {:.3} CPU s ({:.3} % of one core); RSS {} KiB with no VMM, {} KiB idle with one connected",
                p.idle_secs,
                p.cpu_secs,
                p.cpu_secs / p.idle_secs * 100.0,
                p.rss_kib_alone,
                p.rss_kib_idle
            )
        });
    }
    if !a.busy_daemons.is_empty() {
        let mut points = Vec::new();
        for &n in &a.busy_daemons {
            let p = bench::state::run_busy(n.max(1), std::time::Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            eprintln!("{n} busy daemons: {:.0} requests/s", p.requests_per_sec);
            points.push(p);
        }
        if a.json {
            println!(
                "{}",
                serde_json::to_string(&points).map_err(|e| e.to_string())?
            );
        } else {
            let base = &points[0];
            let per = |p: &bench::state::BusyPoint| p.requests_per_sec / p.daemons as f64;
            println!(
                "daemons | requests/s (all) | per daemon (× first) | p50 µs (× first) | p99 µs | worst daemon p99 µs | fewest requests"
            );
            for p in &points {
                println!(
                    "{} | {:.0} | {:.0} (× {:.2}) | {:.1} (× {:.2}) | {:.1} | {:.1} | {}",
                    p.daemons,
                    p.requests_per_sec,
                    per(p),
                    per(p) / per(base),
                    p.p50_ns as f64 / 1e3,
                    p.p50_ns as f64 / base.p50_ns.max(1) as f64,
                    p.p99_ns as f64 / 1e3,
                    p.worst_p99_ns as f64 / 1e3,
                    p.fewest_requests
                );
            }
        }
        return Ok(());
    }
    if let Some(n) = a.model_bytes {
        let rows = bench::state::model_bytes_per_mapping(n).map_err(|e| e.to_string())?;
        println!("| IOVA order | mappings | heap bytes per mapping |\n|---|---|---|");
        for (order, b) in rows {
            println!("| {order} | {n} | {b:.1} |");
        }
        return Ok(());
    }
    if !a.state_sweep.is_empty() {
        let points =
            bench::state::run_state_sweep(&a.state_sweep, a.rounds).map_err(|e| e.to_string())?;
        if a.json {
            for p in &points {
                println!("{}", serde_json::to_string(p).map_err(|e| e.to_string())?);
            }
        } else {
            print!("{}", bench::state::state_table(&points));
        }
        return Ok(());
    }
    if a.trace_cost {
        return trace_cost(&a);
    }
    let mut modes = Vec::new();
    if a.mode != BenchMode::Pipeline {
        modes.push(Mode::Inline);
    }
    if a.mode != BenchMode::Inline {
        modes.push(Mode::Pipeline(a.threads));
    }
    let wls: Vec<_> = bench::workloads()
        .into_iter()
        .filter(|w| {
            a.filter
                .as_ref()
                .is_none_or(|f| w.name.contains(f.as_str()))
        })
        .collect();
    if wls.is_empty() {
        return Err("no workload matches --filter".into());
    }
    let total = wls.len() * (1 + modes.len());
    let progress = std::io::stderr().is_terminal();
    let mut results = Vec::new();
    for w in &wls {
        let step = |what: &str, done: usize| {
            if progress {
                let bar: String = (0..30)
                    .map(|i| if i * total < done * 30 { '#' } else { '.' })
                    .collect();
                eprint!("\r[{bar}] {done}/{total} {:<16} {what:<12}", w.name);
            }
        };
        step("raw", results.len());
        results.push(bench::run_raw(w, a.rounds));
        for &m in &modes {
            step(
                if m == Mode::Inline {
                    "inline"
                } else {
                    "pipeline"
                },
                results.len(),
            );
            let poll = a
                .poll_us
                .map(std::time::Duration::from_micros)
                .unwrap_or(vhost_user_iommu::vhost::DEFAULT_POLL);
            results.push(bench::run_socket(w, m, poll, a.rounds).map_err(|e| e.to_string())?);
        }
    }
    if progress {
        eprintln!();
    }
    if a.json {
        print!("{}", report::json(&results, "soft"));
    } else {
        print!("{}", report::table(&results));
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, report::svg(&results))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}
