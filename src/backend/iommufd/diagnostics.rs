//! What benchmarks and the VM tier read and tune: map strategy and path, probe results,
//! counters. Nothing on the request path calls these.

use std::fmt::Write as _;

use super::*;

impl IommufdBackend {
    /// Whether the kernel has `IOMMU_IOAS_MAP_FILE` (probed once in `open`).
    pub fn map_file_supported(&self) -> bool {
        self.shared.map_file_supported
    }

    /// Forces MAP_FILE (`true`) or MAP by user VA (`false`) for guest MAPs from now on: the same
    /// as `set_map_strategy(Some(MapFile | Map))`. Mappings already made keep their path.
    pub fn prefer_map_file(&self, on: bool) {
        self.shared.use_map_file.store(on, Ordering::Relaxed);
        self.set_map_strategy(Some(if on {
            MapStrategy::MapFile
        } else {
            MapStrategy::Map
        }));
    }

    /// Overrides the map strategy of guest MAPs from now on (`None`: automatic, by capability:
    /// see `map_strategy`). Measurements only; mappings already made keep theirs.
    /// A `Copy` override stages all guest RAM at once if a RAM table is there (and at every
    /// memory table from then on).
    pub fn set_map_strategy(&self, s: Option<MapStrategy>) {
        self.shared
            .strategy_override
            .store(MapStrategy::code(s), Ordering::Relaxed);
        if s == Some(MapStrategy::Copy) {
            let mut topo = lock(&self.shared.topo);
            if let Err(e) = self.shared.ensure_identity(&mut topo) {
                warn!("staging guest RAM for the COPY strategy: {e}");
            }
        }
    }

    /// The strategy the next guest MAP tries first (a `Copy` falls back to a direct map while
    /// its memory is not staged).
    pub fn map_strategy(&self) -> MapStrategy {
        self.shared.strategy()
    }

    /// The automatic strategy this kernel and these devices allow.
    pub fn auto_map_strategy(&self) -> MapStrategy {
        self.shared.auto_strategy()
    }

    /// The HWPT that keeps staged guest RAM pinned, if `IOMMU_HWPT_ALLOC` worked.
    pub fn staging_hwpt(&self) -> Option<u32> {
        self.shared.staging_hwpt
    }

    /// Whether a sub-range `IOMMU_IOAS_COPY` from the staging IOAS worked (`None`: not probed
    /// yet; probed at the first `set_ram` when there is a staging HWPT).
    pub fn copy_works(&self) -> Option<bool> {
        match self.shared.copy_works.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Guest MAPs done by `IOMMU_IOAS_COPY` from the staging IOAS so far.
    pub fn copy_count(&self) -> u64 {
        self.shared.maps_copy.load(Ordering::Relaxed)
    }

    /// The `/dev/iommu` fd (benchmarks: raw ioctl loops on IOASes of this context).
    pub fn iommufd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.fd()
    }

    /// The path the next direct (non-COPY) map of file-backed RAM takes.
    pub fn map_path(&self) -> MapPath {
        self.shared.path(true)
    }

    /// `IOMMU_IOAS_UNMAP` ioctls issued so far.
    pub fn unmap_ioctls(&self) -> u64 {
        self.shared.unmaps.load(Ordering::Relaxed)
    }

    /// The backend's metrics in Prometheus text: the latency of each kind of ioctl on the
    /// request path (`op`: map, map_file, copy, unmap, attach) and the map strategy in force.
    pub fn render_metrics(&self) -> String {
        let mut out = String::from("# TYPE viommu_backend_ioctl_seconds histogram\n");
        for (op, h) in self.shared.latency.ops() {
            h.render(
                &mut out,
                "viommu_backend_ioctl_seconds",
                &format!("op=\"{op}\""),
            );
        }
        out.push_str("# TYPE viommu_backend_map_strategy gauge\n");
        let now = self.shared.strategy();
        for s in MapStrategy::ALL {
            let _ = writeln!(
                out,
                "viommu_backend_map_strategy{{strategy=\"{}\"}} {}",
                s.name(),
                u8::from(s == now)
            );
        }
        out
    }

    /// Maps done so far: `(by MAP_FILE, by user VA)`, identity IOAS included.
    pub fn map_counts(&self) -> (u64, u64) {
        (
            self.shared.maps_file.load(Ordering::Relaxed),
            self.shared.maps_va.load(Ordering::Relaxed),
        )
    }
}
