//! Boot bypass's guest RAM, followed on a thread of its own.
//!
//! Covering new RAM in the identity domain pins it, and at the VMM's start that is all of guest
//! RAM: the kernel allocates and zeroes every page as it pins (seconds per GiB under emulation,
//! and seconds for a large guest on any host). QEMU waits for each vfio-user reply at most its
//! `x-msg-timeout` (5 s by default), then reports "vfio_wait_reqs - timed out" and goes on
//! without it. So a DMA_MAP is answered as soon as it is recorded, and this thread applies the
//! clients' maps to the identity domain behind it (only the latest state when changes queue up).
//!
//! A device cannot DMA before its bus mastering is on, so the config write that turns it on
//! waits until the thread has caught up ([`Follower::before_bus_master`], at most
//! [`BUS_MASTER_WAIT`], below QEMU's default timeout). A region that leaves guest RAM may stay
//! reachable by identity until the thread catches up: it is still this guest's memory (the
//! identity mapping holds it pinned), so no other VM is ever reached.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::BootRam;
use crate::control::CurrentDevice;
use crate::log_limit::EveryNth;
use crate::vfio_user::{DeviceServer, DmaMaps};

/// How long a config write that enables bus mastering waits for guest RAM to be in the
/// identity domain before it goes through anyway (with a warning): under QEMU's default
/// vfio-user message timeout of 5 s.
pub const BUS_MASTER_WAIT: Duration = Duration::from_secs(4);

/// Applies the vfio-user clients' DMA maps to boot bypass's identity domain, off the server
/// threads. Dropping it stops its thread.
pub struct Follower(Arc<Inner>);

struct Inner {
    boot: BootRam,
    current: CurrentDevice,
    /// Every client's maps (each describes all of guest RAM).
    clients: Mutex<Vec<DmaMaps>>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Changes posted so far, and how many of them are applied.
    posted: u64,
    applied: u64,
    /// The client whose maps changed last, since the last apply.
    last: Option<DmaMaps>,
    /// A device connected since the last apply: apply even if the maps did not change.
    device: bool,
    stop: bool,
}

/// Warnings about the RAM the maps describe, and bus mastering that did not wait long enough.
static LOG: EveryNth = EveryNth::new();
/// The RAM applied, and what bus mastering waited for it (the VMM decides how often either
/// happens).
static APPLIED_LOG: EveryNth = EveryNth::new();

impl Follower {
    /// Starts the thread that follows the clients' maps into the device in `current`.
    pub fn start(current: CurrentDevice) -> std::io::Result<Follower> {
        let inner = Arc::new(Inner {
            boot: BootRam::default(),
            current,
            clients: Mutex::default(),
            state: Mutex::default(),
            wake: Condvar::new(),
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("boot-ram".into())
            .spawn(move || worker.run())?;
        Ok(Follower(inner))
    }

    /// Follows the guest RAM `server`'s client describes (`device` names it in the log): a
    /// change of its maps is applied behind the reply, and its device's bus mastering waits
    /// for the follower to catch up.
    pub fn follow(self: &Arc<Self>, server: DeviceServer, device: &str) -> DeviceServer {
        let own = server.dma_maps();
        lock(&self.0.clients).push(own.clone());
        let (on_change, gate, device) = (self.clone(), self.clone(), device.to_string());
        server
            .on_dma_change(move || on_change.changed(&own))
            .before_bus_master(move || gate.before_bus_master(&device))
    }

    /// `maps` changed (a DMA_MAP, a DMA_UNMAP, a client gone): returns at once, the thread
    /// applies it.
    fn changed(&self, maps: &DmaMaps) {
        self.post(|s| s.last = Some(maps.clone()));
    }

    /// The vhost-user device connected: it gets the RAM the maps describe now.
    pub fn device_connected(&self) {
        self.post(|s| s.device = true);
    }

    /// Waits (at most `limit`) until every change posted so far is applied; whether it is.
    pub fn settle(&self, limit: Duration) -> bool {
        let st = lock(&self.0.state);
        let target = st.posted;
        let (st, _) = self
            .0
            .wake
            .wait_timeout_while(st, limit, |s| s.applied < target && !s.stop)
            .unwrap_or_else(|p| p.into_inner());
        st.applied >= target
    }

    /// Before a device's bus mastering goes on: waits for the RAM the maps describe to be in
    /// the identity domain (at most [`BUS_MASTER_WAIT`]).
    fn before_bus_master(&self, device: &str) {
        let t0 = Instant::now();
        if self.settle(BUS_MASTER_WAIT) {
            let waited = t0.elapsed();
            if waited >= Duration::from_millis(10) && APPLIED_LOG.allow() {
                info!(
                    "boot bypass: {device}: bus mastering waited {waited:?} for guest RAM to be in the identity domain"
                );
            }
        } else if LOG.allow() {
            warn!(
                "boot bypass: {device}: bus mastering goes on before all guest RAM is in the \
                 identity domain (still pinning after {BUS_MASTER_WAIT:?}): firmware DMA may \
                 fault; preallocated guest RAM pins faster (docs/deploying.md)"
            );
        }
    }

    fn post(&self, f: impl FnOnce(&mut State)) {
        let mut st = lock(&self.0.state);
        f(&mut st);
        st.posted += 1;
        self.0.wake.notify_all();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        lock(&self.0.state).stop = true;
        self.0.wake.notify_all();
    }
}

impl Inner {
    fn run(&self) {
        loop {
            let (target, last, device) = {
                let st = lock(&self.state);
                let mut st = self
                    .wake
                    .wait_while(st, |s| s.applied == s.posted && !s.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if st.stop {
                    return;
                }
                (st.posted, st.last.take(), std::mem::take(&mut st.device))
            };
            // A device that connects gets the maps as they are (a server handed over by an
            // upgrade has its client's maps before any change).
            let changed = (last.is_some() || device) && self.update(last.as_ref());
            if changed || device {
                self.apply();
            }
            lock(&self.state).applied = target;
            self.wake.notify_all();
        }
    }

    /// Takes the maps of `last` (the client that changed last, or when it has none left or
    /// there is none, any client that has some): whether the RAM they describe changed.
    fn update(&self, last: Option<&DmaMaps>) -> bool {
        let mut maps = last.map(DmaMaps::snapshot).unwrap_or_default();
        if maps.is_empty() {
            maps = lock(&self.clients)
                .iter()
                .map(|m| m.snapshot())
                .find(|m| !m.is_empty())
                .unwrap_or_default();
        }
        let (changed, skipped) = self.boot.update(&maps);
        for why in skipped {
            if LOG.allow() {
                warn!("boot bypass: a DMA map left out of guest RAM: {why}");
            }
        }
        changed
    }

    /// Gives the connected device the RAM the maps describe (it ignores it once it has a
    /// memory table).
    fn apply(&self) {
        let Some(d) = lock(&self.current).clone() else {
            return;
        };
        let ram = match self.boot.ram() {
            Ok(ram) => ram,
            Err(e) => {
                if LOG.allow() {
                    warn!("boot bypass: the DMA maps describe no usable guest RAM: {e}");
                }
                return;
            }
        };
        let t0 = Instant::now();
        match d.set_boot_ram(&ram) {
            Ok(false) => {}
            Ok(true) if APPLIED_LOG.allow() => info!(
                "boot bypass: identity translation over the {} RAM regions the VMM's DMA maps \
                 describe (no memory table yet), in place after {:?}",
                ram.regions().len(),
                t0.elapsed()
            ),
            Ok(true) => {}
            Err(e) => {
                if LOG.allow() {
                    warn!(
                        "boot bypass: cannot follow the VMM's DMA maps in the identity domain: {e}"
                    );
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
