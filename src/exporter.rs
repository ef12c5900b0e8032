//! `vhost-user-iommu exporter`: every VM's metrics on one HTTP endpoint for Prometheus.
//!
//! The per-VM daemons have no network at all (the unit gives them `PrivateNetwork=yes` and
//! only `AF_UNIX`), so they cannot serve HTTP themselves. One exporter per host does it: on
//! each scrape of `/metrics` it asks every control socket (`*.ctl`) in the runtime directory
//! for `metrics`, adds a `vm` label (the socket's name) to each sample, groups the samples of
//! each metric family under one `# TYPE` line as the text format requires, and adds
//! `viommu_up{vm=…}` (0 when a daemon did not answer). It listens on loopback unless told
//! otherwise, runs as the daemons' user (the control sockets are 0600) and reads nothing but
//! the request line of what it is sent.
//!
//! The HTTP side is a few lines of std: one GET per connection, `Connection: close`, bounded
//! in size and time; a well-kept server crate would bring an async runtime or a thread pool
//! for what is one request every 15 s.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use log::{info, warn};

/// Where the exporter listens by default (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9848";
/// The most of a request the exporter reads (the request line and headers).
const MAX_REQUEST: usize = 8192;
/// How long a client has to send its request, and to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listen` for the control sockets in `dir` until the process is stopped.
pub fn run(listen: SocketAddr, dir: &Path) -> Result<(), String> {
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    if !listen.ip().is_loopback() {
        warn!(
            "listening on {listen}, not loopback: anyone who reaches it reads every VM's metrics"
        );
    }
    let at = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    info!(
        "serving the metrics of every control socket in {} on http://{at}/metrics",
        dir.display()
    );
    if let Err(e) = crate::deploy::notify_ready() {
        warn!("cannot tell systemd the exporter is ready: {e}");
    }
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                if let Err(e) = answer(c, dir) {
                    warn!("exporter client: {e}");
                }
            }
            Err(e) => warn!("exporter accept: {e}"),
        }
    }
    Ok(())
}

fn answer(mut c: TcpStream, dir: &Path) -> std::io::Result<()> {
    c.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    c.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let (status, body) = match route(line.trim_end()) {
        Route::Metrics => ("200 OK", scrape(dir)),
        Route::Index => (
            "200 OK",
            "vhost-user-iommu exporter: the metrics are at /metrics\n".to_string(),
        ),
        Route::NotFound => ("404 Not Found", "not found: try /metrics\n".to_string()),
        Route::BadMethod => ("405 Method Not Allowed", "only GET is served\n".to_string()),
        Route::Bad => ("400 Bad Request", "bad request\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Index,
    NotFound,
    BadMethod,
    Bad,
}

/// What a request line (`GET /metrics HTTP/1.1`) asks for.
fn route(line: &str) -> Route {
    let mut w = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (w.next(), w.next(), w.next(), w.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Route::BadMethod;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        Some("/") => Route::Index,
        _ => Route::NotFound,
    }
}

/// Every control socket's metrics, merged (see the module documentation).
pub fn scrape(dir: &Path) -> String {
    let mut vms: Vec<(String, Result<String, String>)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warn!("cannot list {}: {e}", dir.display());
            return merge(&[]);
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(vm) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ctl"))
        else {
            continue;
        };
        let answer = crate::control::query(&path, "metrics").map_err(|e| e.to_string());
        if let Err(e) = &answer {
            warn!("{}: {e}", path.display());
        }
        vms.push((vm.to_string(), answer));
    }
    vms.sort_by(|a, b| a.0.cmp(&b.0));
    merge(&vms)
}

/// One exposition from several daemons' expositions: each sample gets `vm="…"`; the samples of
/// a family from every VM follow its one `# TYPE` line; `viommu_up` says which VMs answered.
pub fn merge(vms: &[(String, Result<String, String>)]) -> String {
    // Families in the order first seen: name, type, samples.
    let mut families: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut up = Vec::new();
    for (vm, answer) in vms {
        let label = format!("vm=\"{}\"", escape(vm));
        up.push(format!("viommu_up{{{label}}} {}", u8::from(answer.is_ok())));
        let Ok(text) = answer else { continue };
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                    continue;
                };
                let i = *index.entry(name.to_string()).or_insert_with(|| {
                    families.push((name.to_string(), kind.to_string(), Vec::new()));
                    families.len() - 1
                });
                current = Some(i);
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let sample = with_label(line, &label);
                let i = match current {
                    Some(i) => i,
                    // A sample before any TYPE line: its own untyped family.
                    None => {
                        let name = line.split(['{', ' ']).next().unwrap_or(line).to_string();
                        *index.entry(name.clone()).or_insert_with(|| {
                            families.push((name, "untyped".into(), Vec::new()));
                            families.len() - 1
                        })
                    }
                };
                families[i].2.push(sample);
            }
        }
    }
    let mut out = String::from("# TYPE viommu_up gauge\n");
    for l in up {
        out.push_str(&l);
        out.push('\n');
    }
    for (name, kind, samples) in families {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

/// `name{a="b"} 1` → `name{vm="x",a="b"} 1`; `name 1` → `name{vm="x"} 1`.
fn with_label(sample: &str, label: &str) -> String {
    match sample.find(['{', ' ']) {
        Some(i) if sample.as_bytes()[i] == b'{' => {
            let rest = &sample[i + 1..];
            let sep = if rest.starts_with('}') { "" } else { "," };
            format!("{}{{{label}{sep}{rest}", &sample[..i])
        }
        Some(i) => format!("{}{{{label}}}{}", &sample[..i], &sample[i..]),
        None => sample.to_string(),
    }
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(route("GET /metrics HTTP/1.1"), Route::Metrics);
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(route("HEAD / HTTP/1.1"), Route::Index);
        assert_eq!(route("GET /state HTTP/1.1"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1"), Route::BadMethod);
        assert_eq!(route("GET /metrics"), Route::Bad);
        assert_eq!(route("GET /metrics SPDY/3"), Route::Bad);
        assert_eq!(route(""), Route::Bad);
    }

    #[test]
    fn each_family_has_one_type_line_with_the_samples_of_every_vm() {
        let a = "# TYPE viommu_domains gauge\nviommu_domains 2\n\
                 # TYPE viommu_requests_total counter\n\
                 viommu_requests_total{type=\"map\",status=\"ok\"} 5\n";
        let b = "# TYPE viommu_domains gauge\nviommu_domains 1\n\
                 # TYPE viommu_request_latency_seconds histogram\n\
                 viommu_request_latency_seconds_bucket{type=\"map\",le=\"+Inf\"} 3\n\
                 viommu_request_latency_seconds_count{type=\"map\"} 3\n";
        let out = merge(&[
            ("vm1".into(), Ok(a.into())),
            ("vm2".into(), Ok(b.into())),
            ("vm3".into(), Err("connection refused".into())),
        ]);
        assert_eq!(
            out,
            "# TYPE viommu_up gauge\n\
             viommu_up{vm=\"vm1\"} 1\nviommu_up{vm=\"vm2\"} 1\nviommu_up{vm=\"vm3\"} 0\n\
             # TYPE viommu_domains gauge\n\
             viommu_domains{vm=\"vm1\"} 2\nviommu_domains{vm=\"vm2\"} 1\n\
             # TYPE viommu_requests_total counter\n\
             viommu_requests_total{vm=\"vm1\",type=\"map\",status=\"ok\"} 5\n\
             # TYPE viommu_request_latency_seconds histogram\n\
             viommu_request_latency_seconds_bucket{vm=\"vm2\",type=\"map\",le=\"+Inf\"} 3\n\
             viommu_request_latency_seconds_count{vm=\"vm2\",type=\"map\"} 3\n"
        );
        assert_eq!(with_label("x{} 1", "vm=\"a\""), "x{vm=\"a\"} 1");
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
