//! The control socket: a local view of the daemon for operators and tests.
//!
//! A client connects to the unix socket, writes one command line and reads the answer until
//! the daemon closes the connection:
//! - `summary`: a few lines for people (domains, mappings, endpoints, requests by type);
//! - `state`: JSON with the live domains (and their mappings), the endpoints and the counters;
//! - `metrics`: the counters in Prometheus text format;
//! - `trace`, `trace start MAX_MB FILE`, `trace stop`: where the request trace goes, start it
//!   (or move it to another file), stop it, on the running daemon.
//!
//! `vhost-user-iommu ctl --control-socket PATH [summary|state|metrics|trace ...]` is such a
//! client.
//!
//! It changes nothing the guest or the VMM sees; only the trace can be switched. Who may
//! connect is decided by the socket file's permissions (0600: the daemon's user and root).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::warn;

use crate::domains::{DomainSummary, EndpointView};
use crate::metrics::Metrics;
use crate::trace::Tracer;
use crate::vhost::IommuDevice;

/// How long an answer may wait for a client to read it before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The device of the current connection, if any.
pub type CurrentDevice = Arc<Mutex<Option<IommuDevice>>>;

/// The iommufd backend, when the daemon uses it: what it pins and its own metrics (the software
/// backend pins nothing and has none).
pub type Iommufd = Option<Arc<crate::backend::iommufd::IommufdBackend>>;

fn pinned(b: &Iommufd) -> u64 {
    b.as_ref().map_or(0, |b| b.pinned_bytes())
}

/// Starts the control socket's thread.
pub fn spawn(
    path: &Path,
    device: CurrentDevice,
    metrics: Arc<Metrics>,
    backend: Iommufd,
    trace: Arc<Tracer>,
) -> std::io::Result<()> {
    let listener = crate::listen::bind_with_mode(path, crate::listen::PRIVATE_SOCKET_MODE)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &device, &metrics, &backend, &trace) {
                            warn!("control socket: {e}");
                        }
                    }
                    Err(e) => warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(())
}

fn answer(
    conn: UnixStream,
    device: &CurrentDevice,
    metrics: &Metrics,
    backend: &Iommufd,
    trace: &Tracer,
) -> std::io::Result<()> {
    // One thread answers every client in turn: one that sends a command and then reads slowly
    // or not at all may hold it this long per answer, not forever.
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?)
        .take(4096 + 64)
        .read_line(&mut line)?;
    let mut conn = conn;
    match line.trim() {
        "state" => {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (domains, endpoints) = dev.map(|d| d.snapshot()).unwrap_or_default();
            let v = serde_json::json!({
                "domains": domains,
                "endpoints": endpoints,
                "failed_requests": metrics.failed(),
                "mappings": domains.iter().map(|d| d.mappings.len()).sum::<usize>(),
                "pinned_bytes": pinned(backend),
            });
            // One buffer, one write: formatting straight into the socket cost a sendto(2) per
            // JSON token.
            let mut text = v.to_string();
            text.push('\n');
            conn.write_all(text.as_bytes())
        }
        "metrics" => {
            // Counts only: a scrape never copies the mappings (see `IommuDevice::summary`).
            let dev = device.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (domains, endpoints) = dev.map(|d| d.summary()).unwrap_or_default();
            conn.write_all(metrics.render().as_bytes())?;
            conn.write_all(state_metrics(&domains, &endpoints).as_bytes())?;
            writeln!(
                conn,
                "# TYPE viommu_pinned_bytes gauge\nviommu_pinned_bytes {}",
                pinned(backend)
            )?;
            match backend {
                Some(b) => conn.write_all(b.render_metrics().as_bytes()),
                None => Ok(()),
            }
        }
        "summary" => {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (domains, endpoints) = dev.map(|d| d.summary()).unwrap_or_default();
            conn.write_all(summary(&domains, &endpoints, metrics, pinned(backend)).as_bytes())
        }
        t if t == "trace" || t.starts_with("trace ") => {
            conn.write_all(trace_command(trace, t["trace".len()..].trim()).as_bytes())
        }
        other => writeln!(
            conn,
            "error: unknown command {other:?}; try summary, state, metrics, trace, trace start MAX_MB FILE or trace stop"
        ),
    }
}

/// `trace` (where it goes), `trace start MAX_MB FILE`, `trace stop`: the answer, one line
/// (`error: …` when refused).
fn trace_command(trace: &Tracer, args: &str) -> String {
    let status = |t: &Tracer| match t.status() {
        Some((p, cap)) => format!(
            "tracing to {} (rotated at {} MiB)\n",
            p.display(),
            cap >> 20
        ),
        None => "trace off\n".to_string(),
    };
    let mut words = args.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("") | None, None, None) => status(trace),
        (Some("stop"), None, None) => match trace.stop() {
            Some(p) => {
                log::info!("request trace to {} stopped (control socket)", p.display());
                format!("trace to {} stopped\n", p.display())
            }
            None => "trace off\n".to_string(),
        },
        (Some("start"), Some(mb), Some(file)) => {
            let Some(mb) = mb
                .parse::<u64>()
                .ok()
                .filter(|&m| (1..=1 << 20).contains(&m))
            else {
                return format!("error: {mb:?} is not a size in MiB (1..=1048576)\n");
            };
            let path = Path::new(file);
            if !path.is_absolute() {
                return format!("error: {file:?} is not an absolute path\n");
            }
            match trace.start(path, mb << 20) {
                Ok(()) => {
                    log::info!(
                        "request trace to {} started (control socket)",
                        path.display()
                    );
                    status(trace)
                }
                Err(e) => format!("error: cannot write the trace {file}: {e}\n"),
            }
        }
        _ => format!("error: {args:?}: try trace, trace start MAX_MB FILE or trace stop\n"),
    }
}

/// The state in a few lines for people.
fn summary(
    domains: &[DomainSummary],
    endpoints: &[EndpointView],
    metrics: &Metrics,
    pinned: u64,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mappings: usize = domains.iter().map(|d| d.mappings).sum();
    let bytes: u128 = domains.iter().map(|d| d.mapped_bytes).sum();
    let _ = writeln!(
        out,
        "domains:   {} ({mappings} mappings, {bytes} bytes mapped; {pinned} bytes of guest RAM pinned)",
        domains.len()
    );
    let attached: Vec<String> = endpoints
        .iter()
        .filter_map(|e| Some(format!("{} in domain {}", e.id, e.domain?)))
        .collect();
    let _ = writeln!(
        out,
        "endpoints: {} ({} attached{}{})",
        endpoints.len(),
        attached.len(),
        if attached.is_empty() { "" } else { ": " },
        attached.join(", ")
    );
    let mut req = Vec::new();
    for k in crate::protocol::RequestType::ALL {
        let ok = metrics.count(k, crate::protocol::Status::Ok);
        let failed: u64 = crate::protocol::Status::ALL[1..]
            .iter()
            .map(|&s| metrics.count(k, s))
            .sum();
        if ok + failed > 0 {
            req.push(format!("{} {ok} ok, {failed} failed", k.name()));
        }
    }
    let _ = writeln!(
        out,
        "requests:  {}",
        if req.is_empty() {
            "none yet".to_string()
        } else {
            req.join("; ")
        }
    );
    out
}

/// Gauges of the current state: live domains, mappings and mapped bytes per domain, attached
/// endpoints (mapped bytes are what the backend pins for the guest).
fn state_metrics(domains: &[DomainSummary], endpoints: &[EndpointView]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# TYPE viommu_domains gauge\nviommu_domains {}",
        domains.len()
    );
    let attached = endpoints.iter().filter(|e| e.domain.is_some()).count();
    let _ = writeln!(
        out,
        "# TYPE viommu_endpoints_attached gauge\nviommu_endpoints_attached {attached}"
    );
    type Gauge = (&'static str, fn(&DomainSummary) -> u128);
    let per_domain: [Gauge; 2] = [
        ("viommu_domain_mappings", |d| d.mappings as u128),
        ("viommu_domain_mapped_bytes", |d| d.mapped_bytes),
    ];
    for (name, value) in per_domain {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for d in domains {
            let _ = writeln!(out, "{name}{{domain=\"{}\"}} {}", d.id, value(d));
        }
    }
    out
}

/// Sends one command to a daemon's control socket and returns its whole answer.
pub fn query(path: &Path, command: &str) -> std::io::Result<String> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(conn, "{command}")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}
