//! Fault injection: a backend wrapper that fails chosen calls with a chosen errno, or slows
//! them down.
//!
//! Used by tests to prove that every backend error becomes the right status, that the shadow
//! state rolls back and that nothing leaks, and (with delays) that calls which must not overlap
//! do not. It forwards everything else unchanged and must never be selected by a production
//! configuration.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Attachment, BackendError, DmaBackend, HostConstraints, HwDomain, MapOp, Result};
use crate::guest_ram::GuestRam;
use crate::ids::{EndpointId, IovaRange};

/// A backend operation that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    CreateDomain,
    Attach,
    Map,
    Unmap,
    SetRam,
}

#[derive(Debug)]
struct Rule {
    op: Op,
    /// Calls of `op` to let through before failing.
    skip: u32,
    /// How many calls to fail once `skip` is used up.
    count: u32,
    errno: i32,
}

/// Shared switchboard: tests keep one handle, the wrapper another.
#[derive(Default, Debug)]
pub struct Injector {
    rules: Mutex<Vec<Rule>>,
    delays: Mutex<Vec<(Op, Duration)>>,
    /// Operations whose calls wait until released, and how many calls wait now.
    held: Mutex<(Vec<Op>, usize)>,
    released: Condvar,
    /// MAP and UNMAP calls running right now.
    mapping: AtomicUsize,
    /// `set_ram` calls made while a MAP or UNMAP was running.
    set_ram_while_mapping: AtomicUsize,
    /// Every call since [`record_callers`](Injector::record_callers), with the name of the
    /// thread that made it (who changes the backend). Off by default: a long run (a benchmark)
    /// would grow the log without bound.
    callers: Mutex<Vec<(Op, String)>>,
    recording: AtomicBool,
}

impl Injector {
    /// Lets `skip` calls of `op` through, then fails the next `count` with `errno`.
    pub fn fail(&self, op: Op, skip: u32, count: u32, errno: i32) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Rule {
                op,
                skip,
                count,
                errno,
            });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Makes every later call of `op` take `d` longer (holds requests in flight).
    pub fn delay(&self, op: Op, d: Duration) {
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((op, d));
    }

    /// Makes every later call of `op` wait until [`release`](Self::release) (holds it in
    /// progress for as long as a test needs).
    pub fn hold(&self, op: Op) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push(op);
    }

    /// Lets the calls held by [`hold`](Self::hold) go on.
    pub fn release(&self, op: Op) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .retain(|o| *o != op);
        self.released.notify_all();
    }

    /// Calls waiting in [`hold`](Self::hold) now.
    pub fn waiting(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// MAP and UNMAP calls running right now.
    pub fn mapping(&self) -> usize {
        self.mapping.load(Ordering::SeqCst)
    }

    /// `set_ram` calls that were made while a MAP or UNMAP was running: the pipeline's contract
    /// says a memory table changes only with nothing in flight.
    pub fn set_ram_while_mapping(&self) -> usize {
        self.set_ram_while_mapping.load(Ordering::SeqCst)
    }

    fn pause(&self, op: Op) {
        let d: Duration = self
            .delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, d)| *d)
            .sum();
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.0.contains(&op) {
            held.1 += 1;
            held = self
                .released
                .wait_while(held, |h| h.0.contains(&op))
                .unwrap_or_else(|p| p.into_inner());
            held.1 -= 1;
        }
    }

    /// Runs a MAP or UNMAP, counted in [`Injector::mapping`] while it runs.
    fn mapping_call<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        self.mapping.fetch_add(1, Ordering::SeqCst);
        self.pause(op);
        let r = f();
        self.mapping.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// From now on, logs every backend call with the name of the thread that made it.
    pub fn record_callers(&self) {
        self.recording.store(true, Ordering::SeqCst);
    }

    /// Every backend call logged so far (see [`record_callers`](Self::record_callers)), with the
    /// name of the thread that made it; empties the log.
    pub fn take_callers(&self) -> Vec<(Op, String)> {
        std::mem::take(&mut *self.callers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn check(&self, op: Op, what: &dyn Fn() -> String) -> Result<()> {
        if self.recording.load(Ordering::Relaxed) {
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            self.callers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((op, thread));
        }
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in rules.iter_mut().filter(|r| r.op == op && r.count > 0) {
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            r.count -= 1;
            let name = match op {
                Op::CreateDomain => "create_domain",
                Op::Attach => "attach",
                Op::Map => "map",
                Op::Unmap => "unmap",
                Op::SetRam => "set_ram",
            };
            return Err(BackendError::new(
                name,
                r.errno,
                format!("injected: {}", what()),
            ));
        }
        Ok(())
    }
}

/// Wraps a backend so that the injector's rules apply to it.
pub struct FaultyBackend<B> {
    inner: B,
    injector: Arc<Injector>,
}

impl<B: DmaBackend> FaultyBackend<B> {
    pub fn new(inner: B, injector: Arc<Injector>) -> Self {
        FaultyBackend { inner, injector }
    }
}

struct FaultyDomain {
    inner: Box<dyn HwDomain>,
    injector: Arc<Injector>,
}

impl HwDomain for FaultyDomain {
    fn id(&self) -> u32 {
        self.inner.id()
    }
    fn map(&mut self, op: &MapOp) -> Result<()> {
        let (injector, inner) = (&self.injector, &mut self.inner);
        injector.mapping_call(Op::Map, || {
            injector.check(Op::Map, &|| format!("map {}", op.iova))?;
            inner.map(op)
        })
    }
    fn unmap(&mut self, iova: IovaRange) -> Result<()> {
        let (injector, inner) = (&self.injector, &mut self.inner);
        injector.mapping_call(Op::Unmap, || {
            injector.check(Op::Unmap, &|| format!("unmap {iova}"))?;
            inner.unmap(iova)
        })
    }
}

impl<B: DmaBackend> DmaBackend for FaultyBackend<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn constraints(&self) -> HostConstraints {
        self.inner.constraints()
    }
    fn create_domain(&self) -> Result<Box<dyn HwDomain>> {
        self.injector
            .check(Op::CreateDomain, &|| "create domain".into())?;
        Ok(Box::new(FaultyDomain {
            inner: self.inner.create_domain()?,
            injector: self.injector.clone(),
        }))
    }
    fn attach(&self, endpoint: EndpointId, to: Attachment) -> Result<()> {
        self.injector
            .check(Op::Attach, &|| format!("{endpoint} to {to:?}"))?;
        self.inner.attach(endpoint, to)
    }
    fn set_ram(&self, ram: &GuestRam) -> Result<()> {
        if self.injector.mapping() > 0 {
            self.injector
                .set_ram_while_mapping
                .fetch_add(1, Ordering::SeqCst);
        }
        self.injector.pause(Op::SetRam);
        self.injector.check(Op::SetRam, &|| "set ram".into())?;
        self.inner.set_ram(ram)
    }
}
