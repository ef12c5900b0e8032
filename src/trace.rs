//! The request trace (`--trace FILE`): one JSON line per guest request the device answered and
//! per vhost-user message, for debugging a guest driver or a VMM without `-vv` logs.
//!
//! A request line: `{"t_us":…,"kind":"request","head":3,"type":"map","domain":1,
//! "start":"0x1000","end":"0x1fff","phys":"0x20000","flags":3,"status":"ok","latency_ns":850}`
//! (failed requests add `"reason"`); a message line: `{"t_us":…,"kind":"vhost-user",
//! "request":5,"name":"SET_MEM_TABLE","ok":true}`. `t_us` counts from the trace's start.
//!
//! A vfio-user message line: `{"t_us":…,"kind":"vfio-user","device":"nic0","request":2,
//! "name":"DMA_MAP","id":7,"iova":"0x100000","size":"0x1000","ok":true,"latency_ns":9000}`
//! (a refused one adds `"errno"`). Vhost-user message lines carry `latency_ns` too.
//!
//! One [`Tracer`] lives as long as the daemon; it is off until started (`--trace`, or `trace
//! start` on the control socket) and can be stopped and started again while the daemon runs.
//! When off, the request path pays one relaxed atomic load.
//!
//! Bounded: when the file reaches its cap it is renamed to `FILE.1` (replacing an older one)
//! and a new `FILE` starts, so the trace never holds more than twice the cap. Lines are buffered
//! and written out after each batch of requests (and at once for messages), so the request path
//! pays a formatted line into memory; `bench --trace-cost` measures what that costs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::protocol::{Request, Status};

/// The default cap of one trace file.
pub const DEFAULT_CAP: u64 = 64 << 20;

/// The daemon's trace, shared by the threads that write to it: off, or writing to a file.
pub struct Tracer {
    start: Instant,
    /// A sink is open (read without the lock on the request path).
    on: AtomicBool,
    sink: Mutex<Option<Sink>>,
}

struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    cap: u64,
    /// Writing failed once: the trace stops (logged once) and the daemon goes on.
    broken: bool,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status() {
            Some((p, cap)) => write!(f, "Tracer({}, cap {cap} bytes)", p.display()),
            None => write!(f, "Tracer(off)"),
        }
    }
}

impl Tracer {
    /// A trace that writes nothing until [`Tracer::start`].
    pub fn off() -> Tracer {
        Tracer {
            start: Instant::now(),
            on: AtomicBool::new(false),
            sink: Mutex::new(None),
        }
    }

    /// A trace writing to `path` from the start (see [`Tracer::start`]).
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Tracer> {
        let t = Tracer::off();
        t.start(path, cap)?;
        Ok(t)
    }

    /// Starts writing to `path` (appended to, created if need be: a daemon upgraded in place
    /// goes on with the same trace), rotated at `cap` bytes; a trace already on is written out
    /// and moves to the new file. A path that exists and is not a regular file is refused.
    pub fn start(&self, path: &Path, cap: u64) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let mut s = self.lock();
        if let Some(old) = s.as_mut() {
            let _ = old.out.flush();
        }
        *s = Some(Sink {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
            written: meta.len(),
            cap: cap.max(4096),
            broken: false,
        });
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops tracing (what is buffered is written out); returns the file it wrote, if it was on.
    pub fn stop(&self) -> Option<PathBuf> {
        let mut s = self.lock();
        self.on.store(false, Ordering::Release);
        let mut sink = s.take()?;
        if let Err(e) = sink.out.flush() {
            sink.fail(e);
        }
        Some(sink.path)
    }

    /// Whether a trace is being written (false also after a write failed).
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// The file being written and its cap, when on (not after a write failed).
    pub fn status(&self) -> Option<(PathBuf, u64)> {
        self.lock()
            .as_ref()
            .filter(|s| !s.broken)
            .map(|s| (s.path.clone(), s.cap))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
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
        if !self.is_on() {
            return;
        }
        let t_us = self.t_us();
        let reason = reason.map(|r| serde_json::to_string(r).unwrap_or_default());
        let mut guard = self.lock();
        let Some(s) = guard.as_mut().filter(|s| !s.broken) else {
            return;
        };
        // Room for the longest line (MAP: ~230 bytes) plus a reason.
        let longest = 256 + reason.as_ref().map_or(0, |r| r.len() + 12) as u64;
        if s.written + longest > s.cap
            && let Err(e) = s.rotate()
        {
            s.fail(e);
            self.on.store(false, Ordering::Relaxed);
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
                Request::Map(m) => write!(
                    o,
                    "\"domain\":{},\"start\":\"{:#x}\",\"end\":\"{:#x}\",\"phys\":\"{:#x}\",\
                     \"flags\":{}",
                    m.domain.0, m.virt_start, m.virt_end, m.phys_start, m.flags.0
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
            Err(e) => {
                s.fail(e);
                self.on.store(false, Ordering::Relaxed);
            }
        }
    }

    /// A vhost-user message the daemon answered (`ok`: it was applied), `latency_ns` after it
    /// was read.
    pub fn message(&self, channel: &str, request: u32, name: &str, ok: bool, latency_ns: u64) {
        if !self.is_on() {
            return;
        }
        let line = format!(
            "{{\"t_us\":{},\"kind\":\"{channel}\",\"request\":{request},\"name\":\"{name}\",\
             \"ok\":{ok},\"latency_ns\":{latency_ns}}}\n",
            self.t_us()
        );
        self.write(&line, true);
    }

    /// A vfio-user message from the VMM about `device`, answered after `latency_ns`: `fields`
    /// are the message's own (`"iova":"0x…","size":"0x…"`, or empty), `errno` its refusal.
    pub fn vfio_user(
        &self,
        device: &str,
        msg: VfioUserMessage<'_>,
        errno: Option<i32>,
        latency_ns: u64,
    ) {
        if !self.is_on() {
            return;
        }
        let mut line = format!(
            "{{\"t_us\":{},\"kind\":\"vfio-user\",\"device\":{},\"request\":{},\"name\":\"{}\",\
             \"id\":{}",
            self.t_us(),
            serde_json::to_string(device).unwrap_or_default(),
            msg.command,
            msg.name,
            msg.id
        );
        if !msg.fields.is_empty() {
            line.push(',');
            line.push_str(msg.fields);
        }
        match errno {
            None => line.push_str(",\"ok\":true"),
            Some(e) => line.push_str(&format!(",\"ok\":false,\"errno\":{e}")),
        }
        line.push_str(&format!(",\"latency_ns\":{latency_ns}}}\n"));
        self.write(&line, true);
    }

    /// Writes out what is buffered (after a batch of requests).
    pub fn flush(&self) {
        if !self.is_on() {
            return;
        }
        let mut guard = self.lock();
        if let Some(s) = guard.as_mut().filter(|s| !s.broken)
            && let Err(e) = s.out.flush()
        {
            s.fail(e);
            self.on.store(false, Ordering::Relaxed);
        }
    }

    fn write(&self, line: &str, flush: bool) {
        let mut guard = self.lock();
        let Some(s) = guard.as_mut().filter(|s| !s.broken) else {
            return;
        };
        let mut r = if s.written + line.len() as u64 > s.cap {
            s.rotate()
        } else {
            Ok(())
        };
        if r.is_ok() {
            r = s.out.write_all(line.as_bytes());
        }
        if flush && r.is_ok() {
            r = s.out.flush();
        }
        match r {
            Ok(()) => s.written += line.len() as u64,
            Err(e) => {
                s.fail(e);
                self.on.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// What a vfio-user trace line says of the message (see [`Tracer::vfio_user`]).
#[derive(Clone, Copy, Debug)]
pub struct VfioUserMessage<'a> {
    pub command: u16,
    pub name: &'a str,
    pub id: u16,
    /// JSON members, comma-separated, without braces (may be empty).
    pub fields: &'a str,
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
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EndpointId;

    fn dir() -> crate::testing::TempDir {
        crate::testing::TempDir::named("trace")
    }

    #[test]
    fn each_line_is_json_with_the_requests_fields() {
        let d = dir();
        let p = d.join("a.jsonl");
        let t = Tracer::open(&p, DEFAULT_CAP).unwrap();
        let map = Request::map(1, 0x1000, 0x1fff, 0x20000, 3);
        t.request(3, &map, Status::Ok, None, 850);
        let attach = Request::attach(2, 9);
        t.request(4, &attach, Status::NoEnt, Some("no endpoint \"9\""), 10);
        t.message("vhost-user", 5, "SET_MEM_TABLE", true, 1200);
        t.vfio_user(
            "nic0",
            VfioUserMessage {
                command: 2,
                name: "DMA_MAP",
                id: 7,
                fields: "\"iova\":\"0x100000\",\"size\":\"0x1000\"",
            },
            Some(libc::EEXIST),
            9000,
        );
        drop(t);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["type"], "map");
        assert_eq!(lines[0]["start"], "0x1000");
        assert_eq!(lines[0]["phys"], "0x20000");
        assert_eq!(lines[0]["status"], "ok");
        assert_eq!(lines[1]["status"], "noent");
        assert_eq!(lines[1]["reason"], "no endpoint \"9\"");
        assert_eq!(lines[2]["name"], "SET_MEM_TABLE");
        assert_eq!(lines[2]["latency_ns"], 1200);
        assert_eq!(lines[3]["kind"], "vfio-user");
        assert_eq!(lines[3]["device"], "nic0");
        assert_eq!(lines[3]["name"], "DMA_MAP");
        assert_eq!(lines[3]["iova"], "0x100000");
        assert_eq!(lines[3]["ok"], false);
        assert_eq!(lines[3]["errno"], libc::EEXIST);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_trace_stops_and_starts_again_on_another_file_while_in_use() {
        let d = dir();
        let (a, b) = (d.join("a.jsonl"), d.join("b.jsonl"));
        let t = Tracer::off();
        let probe = Request::Probe {
            endpoint: EndpointId(1),
        };
        t.request(1, &probe, Status::Ok, None, 1);
        assert!(!t.is_on() && t.status().is_none());
        t.start(&a, DEFAULT_CAP).unwrap();
        t.request(2, &probe, Status::Ok, None, 1);
        t.start(&b, DEFAULT_CAP).unwrap();
        t.request(3, &probe, Status::Ok, None, 1);
        assert_eq!(t.stop(), Some(b.clone()));
        t.request(4, &probe, Status::Ok, None, 1);
        assert_eq!(t.stop(), None);
        let heads = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["head"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(heads(&a), [2]);
        assert_eq!(heads(&b), [3]);
        // Not a regular file: refused, the trace stays off.
        assert!(t.start(&d, DEFAULT_CAP).is_err());
        let link = d.join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        assert!(t.start(&link, DEFAULT_CAP).is_err());
        assert!(!t.is_on());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_trace_rotates_at_its_cap_and_never_holds_more_than_twice_it() {
        let d = dir();
        let p = d.join("b.jsonl");
        let t = Tracer::open(&p, 4096).unwrap();
        let unmap = Request::unmap(1, 0, 0xfff);
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
