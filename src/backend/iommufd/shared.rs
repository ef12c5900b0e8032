//! What the backend's handles share: the iommufd, the devices, the attachments and the
//! identity IOAS's RAM, the map strategy and counters; and how a mapping goes into an IOAS.

use super::*;

/// The error text for an ENOMEM from a map: which limit, how much is needed.
pub(super) fn memlock_hint(pinned: u64, len: u64) -> String {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } == 0 {
        if rl.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} bytes", rl.rlim_cur)
        }
    } else {
        "unknown".to_string()
    };
    format!(
        "ENOMEM pinning {len:#x} bytes: RLIMIT_MEMLOCK (now {limit}) must be at least {} bytes \
         ({pinned:#x} already pinned by this backend + this mapping; every IOAS pins guest RAM \
         separately): raise it (ulimit -l, systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
        pinned.saturating_add(len)
    )
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything that can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) const UNPLUGGED_WARN_EVERY: Duration = Duration::from_secs(10);

/// `(file id and offset, host VA)`: what makes two RAM regions the same memory.
pub(super) type MemoryKey = (Option<((u64, u64), u64)>, u64);

/// One region of guest RAM in the identity IOAS: the same pages keep their mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IdentityEntry {
    pub(super) gpa: IovaRange,
    pub(super) key: MemoryKey,
}

impl IdentityEntry {
    /// The same guest range over the same pages: the same file and offset when file-backed
    /// (wherever the daemon maps it, e.g. after an upgrade), else the same host address.
    pub(super) fn same_memory(&self, other: &IdentityEntry) -> bool {
        self.gpa == other.gpa
            && match (self.key.0, other.key.0) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.key.1 == other.key.1,
                _ => false,
            }
    }
}

/// What the topology lock guards: the guest RAM in the identity IOAS. A device is pointed
/// somewhere with it held (`Shared::point`), so that the identity IOAS cannot lose RAM while an
/// endpoint goes to it; where each device points is the device's own (`Device::attached`).
pub(super) struct Topo {
    pub(super) identity: Vec<IdentityEntry>,
}

pub(super) struct Shared {
    pub(super) iommufd: File,
    /// Locked after `topo` when both are held.
    pub(super) devices: Mutex<BTreeMap<EndpointId, Device>>,
    pub(super) identity_id: u32,
    pub(super) topo: Mutex<Topo>,
    pub(super) ram: Mutex<Arc<GuestRam>>,
    pub(super) ram_gen: AtomicU64,
    pub(super) map_file_supported: bool,
    pub(super) use_map_file: AtomicBool,
    /// `MapStrategy::code` of the override (0: automatic).
    pub(super) strategy_override: AtomicU8,
    /// The unattached HWPT on the identity IOAS that keeps the staged guest RAM pinned (and
    /// answers PFN lookups for copies); `None` if `IOMMU_HWPT_ALLOC` failed.
    pub(super) staging_hwpt: Option<u32>,
    /// The `ram_gen` whose RAM the identity (staging) IOAS holds completely; `u64::MAX` while
    /// `set_ram` is changing it, after it failed, and while RAM is staged on demand and no
    /// endpoint needed it yet.
    pub(super) staged_gen: AtomicU64,
    /// [`Staging::AllRam`]: all guest RAM is staged from `set_ram` on, whatever the endpoints do.
    pub(super) stage_all: AtomicBool,
    /// Whether `IOMMU_IOAS_COPY` of a sub-range of a staged region works (probed at the first
    /// staging): 0 unknown, 1 yes, 2 no.
    pub(super) copy_works: AtomicU8,
    /// Live paging IOASes (ids), for tests and leak checks.
    pub(super) domains: Mutex<BTreeMap<u32, ()>>,
    pub(super) pinned: AtomicU64,
    /// Paging IOASes a previous daemon handed over, by the guest domain each serves, until the
    /// domain model claims them (`create_domain_for`).
    pub(super) adopted: Mutex<HashMap<DomainId, HwDomainState>>,
    /// While a handed-over device state (an upgrade's, a crash's checkpoint and records) is
    /// replayed into the domain model: everything replayed is done in the kernel already, so
    /// MAP, UNMAP, ATTACH and a domain's destruction only update the bookkeeping.
    pub(super) replaying: AtomicBool,
    /// While a crash's records are replayed: their MAPs are not in the handed-over accounting.
    pub(super) replay_new: AtomicBool,
    /// The IOAS of each live guest domain (for the crash journal's records).
    pub(super) live: Mutex<HashMap<DomainId, u32>>,
    /// IOASes the rebuilt state has that the kernel no longer has (after a crash: see
    /// `IommufdBackend::reconcile`): not destroyed again.
    pub(super) vanished: Mutex<HashSet<u32>>,
    /// This daemon took over a crashed one's state: the kernel may hold what a request in
    /// flight at the crash left (expected, logged at info; otherwise a warning).
    pub(super) after_crash: AtomicBool,
    pub(super) maps_file: AtomicU64,
    pub(super) maps_va: AtomicU64,
    pub(super) maps_copy: AtomicU64,
    /// `IOMMU_IOAS_UNMAP` ioctls issued.
    pub(super) unmaps: AtomicU64,
    /// How long the request path's ioctls take.
    pub(super) latency: IoctlLatency,
}

/// How long each kind of iommufd/VFIO ioctl on the request path takes (`op` in the metrics):
/// the three ways a guest MAP becomes a kernel mapping (the map strategies), UNMAP, and
/// pointing a device somewhere (ATTACH, DETACH, bypass).
#[derive(Debug, Default)]
pub(super) struct IoctlLatency {
    /// `IOMMU_IOAS_MAP` by user VA.
    pub(super) map: Histogram,
    /// `IOMMU_IOAS_MAP_FILE`.
    pub(super) map_file: Histogram,
    /// `IOMMU_IOAS_COPY` from the staging IOAS.
    pub(super) copy: Histogram,
    /// `IOMMU_IOAS_UNMAP`.
    pub(super) unmap: Histogram,
    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` / `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    pub(super) attach: Histogram,
}

impl IoctlLatency {
    pub(super) fn ops(&self) -> [(&'static str, &Histogram); 5] {
        [
            ("map", &self.map),
            ("map_file", &self.map_file),
            ("copy", &self.copy),
            ("unmap", &self.unmap),
            ("attach", &self.attach),
        ]
    }
}

/// Runs `f` (one ioctl) and records how long it took in `h`.
pub(super) fn timed<T>(h: &Histogram, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    h.record(t.elapsed().as_nanos() as u64);
    r
}

pub(super) fn map_flags(perms: Perms) -> u32 {
    let mut flags = 0;
    if perms.read {
        flags |= sys::IOMMU_IOAS_MAP_READABLE;
    }
    if perms.write {
        flags |= sys::IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

impl Shared {
    /// Logs a state/kernel difference fixed: expected after a crash restart, a warning else.
    pub(super) fn fixed(&self, what: std::fmt::Arguments<'_>) {
        if self.after_crash.load(Ordering::Relaxed) {
            info!("{what}");
        } else {
            warn!("{what}");
        }
    }

    /// A backend's shared state with nothing mapped through it yet: the automatic map strategy,
    /// no RAM table, all counters at zero.
    pub(super) fn new(
        iommufd: File,
        devices: BTreeMap<EndpointId, Device>,
        identity_id: u32,
        topo: Topo,
        map_file_supported: bool,
        staging_hwpt: Option<u32>,
    ) -> Self {
        Shared {
            iommufd,
            devices: Mutex::new(devices),
            identity_id,
            topo: Mutex::new(topo),
            ram: Mutex::new(Arc::new(GuestRam::default())),
            ram_gen: AtomicU64::new(0),
            map_file_supported,
            use_map_file: AtomicBool::new(true),
            strategy_override: AtomicU8::new(0),
            staging_hwpt,
            staged_gen: AtomicU64::new(u64::MAX),
            stage_all: AtomicBool::new(false),
            copy_works: AtomicU8::new(0),
            domains: Mutex::new(BTreeMap::new()),
            pinned: AtomicU64::new(0),
            adopted: Mutex::new(HashMap::new()),
            replaying: AtomicBool::new(false),
            replay_new: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            vanished: Mutex::new(HashSet::new()),
            after_crash: AtomicBool::new(false),
            maps_file: AtomicU64::new(0),
            maps_va: AtomicU64::new(0),
            maps_copy: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            latency: IoctlLatency::default(),
        }
    }

    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.iommufd.as_fd()
    }

    /// The automatic choice (by measurement, see BENCHMARKS.md, "The default map path and
    /// why"): COPY while all guest RAM is staged (the staging HWPT exists, a sub-range COPY
    /// worked), else MAP_FILE when the kernel has it, else MAP.
    pub(super) fn auto_strategy(&self) -> MapStrategy {
        if self.staging_hwpt.is_some()
            && self.copy_works.load(Ordering::Relaxed) != 2
            && self.staged_gen.load(Ordering::Acquire) == self.ram_gen.load(Ordering::Acquire)
        {
            MapStrategy::Copy
        } else if self.map_file_supported {
            MapStrategy::MapFile
        } else {
            MapStrategy::Map
        }
    }

    pub(super) fn strategy(&self) -> MapStrategy {
        MapStrategy::from_code(self.strategy_override.load(Ordering::Relaxed))
            .unwrap_or_else(|| self.auto_strategy())
    }

    pub(super) fn path(&self, from_file: bool) -> MapPath {
        let file_wanted =
            match MapStrategy::from_code(self.strategy_override.load(Ordering::Relaxed)) {
                Some(MapStrategy::Map) => false,
                Some(MapStrategy::MapFile) => true,
                _ => self.use_map_file.load(Ordering::Relaxed),
            };
        if from_file && self.map_file_supported && file_wanted {
            MapPath::File
        } else {
            MapPath::UserVa
        }
    }

    /// Maps `len` bytes at `iova` from RAM table `ram`: by file when possible, else by VA.
    pub(super) fn map(
        &self,
        ram: &GuestRam,
        ioas: u32,
        iova: u64,
        len: u64,
        host: &crate::guest_ram::HostLocation,
        perms: Perms,
    ) -> std::result::Result<MapPath, sys::Errno> {
        let flags = map_flags(perms);
        let file = host.file.and_then(|(id, off)| {
            ram.regions()
                .iter()
                .filter_map(|r| r.backing.as_ref())
                .find(|b| b.file_id == id)
                .map(|b| (b.file.clone(), off))
        });
        let path = self.path(file.is_some());
        match (path, file) {
            (MapPath::File, Some((f, off))) => {
                timed(&self.latency.map_file, || {
                    sys::ioas_map_file(self.fd(), ioas, iova, f.as_fd(), off, len, flags)
                })?;
                self.maps_file.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                timed(&self.latency.map, || {
                    sys::ioas_map(self.fd(), ioas, iova, host.host_addr, len, flags)
                })?;
                self.maps_va.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pinned.fetch_add(len, Ordering::Relaxed);
        Ok(path)
    }

    /// `IOMMU_IOAS_UNMAP` (counted); the bytes unmapped.
    pub(super) fn ioas_unmap(
        &self,
        ioas: u32,
        iova: u64,
        len: u64,
    ) -> std::result::Result<u64, sys::Errno> {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        timed(&self.latency.unmap, || {
            sys::ioas_unmap(self.fd(), ioas, iova, len)
        })
    }

    pub(super) fn unmap(
        &self,
        ioas: u32,
        iova: u64,
        len: u64,
    ) -> std::result::Result<(), sys::Errno> {
        let done = self.ioas_unmap(ioas, iova, len)?;
        self.pinned.fetch_sub(done.min(len), Ordering::Relaxed);
        if done != len {
            // Cannot happen for a range that is exactly earlier maps; say so loudly if it does.
            error!("IOAS {ioas}: unmap of {len:#x} bytes at {iova:#x} removed {done:#x}");
        }
        Ok(())
    }

    /// Points one device somewhere. Caller holds the topology lock.
    pub(super) fn point(
        &self,
        topo: &mut Topo,
        endpoint: EndpointId,
        to: Attachment,
    ) -> Result<()> {
        if to == Attachment::Identity && !self.replaying.load(Ordering::Acquire) {
            // Identity translation reaches all of guest RAM: all of it in the identity IOAS
            // first (staged on demand: the first endpoint to need it pays).
            self.ensure_identity(topo)?;
        }
        let mut devices = lock(&self.devices);
        let dev = devices.get_mut(&endpoint).ok_or_else(|| {
            BackendError::new("attach", libc::ENODEV, format!("{endpoint}: no device"))
        })?;
        if dev.file.is_none() {
            // Unplugged: no DMA at all, which satisfies blocked and identity; a paging domain
            // is refused (ENODEV: S_DEVERR) until the device is back.
            if let Attachment::Domain(_) = to {
                if dev
                    .last_warn
                    .is_none_or(|t| t.elapsed() >= UNPLUGGED_WARN_EVERY)
                {
                    dev.last_warn = Some(Instant::now());
                    warn!(
                        "{endpoint}: ATTACH refused (S_DEVERR): {} is unplugged from vfio-pci",
                        dev.path.display()
                    );
                }
                return Err(dev.file(endpoint).unwrap_err());
            }
            dev.attached = to;
            return Ok(());
        }
        if self.replaying.load(Ordering::Acquire) {
            // Replayed: the kernel already points it where the replay says.
            dev.attached = to;
            return Ok(());
        }
        let file = dev.file(endpoint)?;
        let what = |op: &str| format!("{endpoint} ({}) {op}", dev.path.display());
        let r = timed(&self.latency.attach, || match to {
            Attachment::Blocked => sys::detach_pt(file.as_fd()),
            Attachment::Identity => sys::attach_pt(file.as_fd(), self.identity_id),
            Attachment::Domain(id) => sys::attach_pt(file.as_fd(), id),
        });
        r.map_err(|e| {
            let target = match to {
                Attachment::Blocked => "detach".to_string(),
                Attachment::Identity => format!("to identity IOAS {}", self.identity_id),
                Attachment::Domain(id) => format!("to IOAS {id}"),
            };
            BackendError::new(e.name, e.errno, what(&target))
        })?;
        dev.attached = to;
        debug!("{endpoint}: {to:?}");
        Ok(())
    }
}
