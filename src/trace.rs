//! The request trace (`--trace FILE`): one JSON line per guest request the device answered and
//! per vhost-user message, for debugging a guest driver or a VMM without `-vv` logs.
//!
//! A request line: `{"t_us":…,"kind":"request","head":3,"type":"map","domain":1,
//! "start":"0x1000","end":"0x1fff","phys":"0x20000","flags":3,"status":"ok","latency_ns":850}`
//! (failed requests add `"reason"`); a message line: `{"t_us":…,"kind":"vhost-user",
//! "request":5,"name":"SET_MEM_TABLE","ok":true}`. `t_us` counts from the trace's start.
//!
//! Bounded: when the file reaches its cap it is renamed to `FILE.1` (replacing an older one)
//! and a new `FILE` starts, so the trace never holds more than twice the cap. Lines are buffered
//! and written out after each batch of requests (and at once for messages), so the request path
//! pays a formatted line into memory; `bench --trace-cost` measures what that costs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::protocol::{Request, Status};

/// The default cap of one trace file.
pub const DEFAULT_CAP: u64 = 64 << 20;

/// An open trace, shared by the threads that write to it.
pub struct Tracer {
    start: Instant,
    cap: u64,
    sink: Mutex<Sink>,
}

struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    /// Writing failed once: the trace stops (logged once) and the daemon goes on.
    broken: bool,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        write!(f, "Tracer({}, cap {} bytes)", s.path.display(), self.cap)
    }
}

impl Tracer {
    /// Appends to `path` (created if need be: a daemon upgraded in place goes on with the same
    /// trace); lines go there until it holds `cap` bytes.
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Tracer> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Tracer {
            start: Instant::now(),
            cap: cap.max(4096),
            sink: Mutex::new(Sink {
                path: path.to_path_buf(),
                out: BufWriter::with_capacity(1 << 16, file),
                written,
                broken: false,
            }),
        })
    }

    fn t_us(&self) -> u128 {
        self.start.elapsed().as_micros()
    }

    /// A request the device answered. Formatted straight into the buffer: no allocation
    /// unless the request failed (its reason is escaped).
    pub fn request(
        &self,
        head: u16,
        req: &Request,
        status: Status,
        reason: Option<&str>,
        latency_ns: u64,
    ) {
        let t_us = self.t_us();
        let reason = reason.map(|r| serde_json::to_string(r).unwrap_or_default());
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if s.broken {
            return;
        }
        // Room for the longest line (MAP: ~230 bytes) plus a reason.
        let longest = 256 + reason.as_ref().map_or(0, |r| r.len() + 12) as u64;
        if s.written + longest > self.cap
            && let Err(e) = s.rotate()
        {
            s.fail(e);
            return;
        }
        let before = s.out.buffer().len();
        let o = &mut s.out;
        let r = (|| -> std::io::Result<()> {
            write!(
                o,
                "{{\"t_us\":{t_us},\"kind\":\"request\",\"head\":{head},\"type\":\"{}\",",
                req.kind().name()
            )?;
            match *req {
                Request::Attach {
                    domain,
                    endpoint,
                    flags,
                    ..
                } => write!(
                    o,
                    "\"domain\":{},\"endpoint\":{},\"flags\":{flags}",
                    domain.0, endpoint.0
                )?,
                Request::Detach { domain, endpoint } => {
                    write!(o, "\"domain\":{},\"endpoint\":{}", domain.0, endpoint.0)?
                }
                Request::Map {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                } => write!(
                    o,
                    "\"domain\":{},\"start\":\"{virt_start:#x}\",\"end\":\"{virt_end:#x}\",\
                     \"phys\":\"{phys_start:#x}\",\"flags\":{flags}",
                    domain.0
                )?,
                Request::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                    ..
                } => write!(
                    o,
                    "\"domain\":{},\"start\":\"{virt_start:#x}\",\"end\":\"{virt_end:#x}\"",
                    domain.0
                )?,
                Request::Probe { endpoint } => write!(o, "\"endpoint\":{}", endpoint.0)?,
            }
            write!(
                o,
                ",\"status\":\"{}\",\"latency_ns\":{latency_ns}",
                status.name()
            )?;
            if let Some(r) = &reason {
                write!(o, ",\"reason\":{r}")?;
            }
            o.write_all(b"}\n")
        })();
        match r {
            // What the buffer grew by (it may have written out in between: then count the line's
            // bound, close enough for the cap).
            Ok(()) => {
                let after = s.out.buffer().len();
                s.written += if after > before {
                    (after - before) as u64
                } else {
                    longest
                };
            }
            Err(e) => s.fail(e),
        }
    }

    /// A vhost-user message the daemon answered (`ok`: it was applied).
    pub fn message(&self, channel: &str, request: u32, name: &str, ok: bool) {
        let line = format!(
            "{{\"t_us\":{},\"kind\":\"{channel}\",\"request\":{request},\"name\":\"{name}\",\
             \"ok\":{ok}}}\n",
            self.t_us()
        );
        self.write(&line, true);
    }

    /// Writes out what is buffered (after a batch of requests).
    pub fn flush(&self) {
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if !s.broken
            && let Err(e) = s.out.flush()
        {
            s.fail(e);
        }
    }

    fn write(&self, line: &str, flush: bool) {
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if s.broken {
            return;
        }
        if s.written + line.len() as u64 > self.cap
            && let Err(e) = s.rotate()
        {
            s.fail(e);
            return;
        }
        let mut r = s.out.write_all(line.as_bytes());
        if flush && r.is_ok() {
            r = s.out.flush();
        }
        match r {
            Ok(()) => s.written += line.len() as u64,
            Err(e) => s.fail(e),
        }
    }
}

impl Sink {
    /// FILE → FILE.1, and a new FILE.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, old)?;
        self.out = BufWriter::with_capacity(1 << 16, File::create(&self.path)?);
        self.written = 0;
        Ok(())
    }

    fn fail(&mut self, e: std::io::Error) {
        self.broken = true;
        log::error!("request trace {}: {e}; tracing stops", self.path.display());
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DomainId, EndpointId};

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("viommu-trace-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn each_line_is_json_with_the_requests_fields() {
        let d = dir();
        let p = d.join("a.jsonl");
        let t = Tracer::open(&p, DEFAULT_CAP).unwrap();
        let map = Request::Map {
            domain: DomainId(1),
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x20000,
            flags: 3,
        };
        t.request(3, &map, Status::Ok, None, 850);
        let attach = Request::Attach {
            domain: DomainId(2),
            endpoint: EndpointId(9),
            flags: 0,
            reserved: [0; 4],
        };
        t.request(4, &attach, Status::NoEnt, Some("no endpoint \"9\""), 10);
        t.message("vhost-user", 5, "SET_MEM_TABLE", true);
        drop(t);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["type"], "map");
        assert_eq!(lines[0]["start"], "0x1000");
        assert_eq!(lines[0]["phys"], "0x20000");
        assert_eq!(lines[0]["status"], "ok");
        assert_eq!(lines[1]["status"], "noent");
        assert_eq!(lines[1]["reason"], "no endpoint \"9\"");
        assert_eq!(lines[2]["name"], "SET_MEM_TABLE");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_trace_rotates_at_its_cap_and_never_holds_more_than_twice_it() {
        let d = dir();
        let p = d.join("b.jsonl");
        let t = Tracer::open(&p, 4096).unwrap();
        let unmap = Request::Unmap {
            domain: DomainId(1),
            virt_start: 0,
            virt_end: 0xfff,
            reserved: [0; 4],
        };
        for _ in 0..1000 {
            t.request(0, &unmap, Status::Ok, None, 1);
        }
        drop(t);
        let a = std::fs::metadata(&p).unwrap().len();
        let b = std::fs::metadata(p.with_extension("jsonl.1"))
            .unwrap()
            .len();
        assert!(a <= 4096 && b <= 4096, "{a} {b}");
        assert!(b > 3000, "the rotated file was full: {b}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
