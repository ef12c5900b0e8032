//! The control socket: a local, read-only view of the daemon for operators and tests.
//!
//! A client connects to the unix socket, writes one command line and reads the answer until
//! the daemon closes the connection:
//! - `state`: JSON with the live domains (and their mappings), the endpoints and the counters;
//! - `metrics`: the counters in Prometheus text format.
//!
//! It never changes anything; who may connect is decided by the socket file's permissions.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::warn;

use crate::metrics::Metrics;
use crate::vhost::IommuDevice;

/// The device of the current connection, if any.
pub type CurrentDevice = Arc<Mutex<Option<IommuDevice>>>;

/// Starts the control socket's thread.
pub fn spawn(path: &Path, device: CurrentDevice, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &device, &metrics) {
                            warn!("control socket: {e}");
                        }
                    }
                    Err(e) => warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, device: &CurrentDevice, metrics: &Metrics) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?)
        .take(64)
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
            });
            writeln!(conn, "{v}")
        }
        "metrics" => conn.write_all(metrics.render().as_bytes()),
        other => writeln!(conn, "unknown command {other:?}; try state or metrics"),
    }
}
