//! One-time probes of what the running kernel supports (MAP_FILE, COPY from staging).

use super::*;

/// Tries `IOMMU_IOAS_MAP_FILE` of one memfd page into `ioas` (left as it was).
pub(super) fn probe_map_file(iommufd: &File, ioas: u32) -> bool {
    let name = c"vhost-user-iommu-probe";
    // SAFETY: `name` is NUL-terminated; memfd_create has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        warn!(
            "memfd_create for the MAP_FILE probe: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if let Err(e) = file.set_len(MIN_GRANULE) {
        warn!("sizing the MAP_FILE probe memfd: {e}");
        return false;
    }
    // Any granule-aligned IOVA the scratch IOAS allows: its allowed ranges, first one.
    let iova = match sys::ioas_iova_ranges(iommufd.as_fd(), ioas) {
        Ok((r, _)) => match r
            .iter()
            .find(|r| r.last.saturating_sub(r.start) >= 2 * MIN_GRANULE)
        {
            Some(r) => (r.start + MIN_GRANULE - 1) & !(MIN_GRANULE - 1),
            None => return false,
        },
        Err(_) => return false,
    };
    let flags = sys::IOMMU_IOAS_MAP_READABLE;
    match sys::ioas_map_file(
        iommufd.as_fd(),
        ioas,
        iova,
        file.as_fd(),
        0,
        MIN_GRANULE,
        flags,
    ) {
        Ok(()) => {
            if let Err(e) = sys::ioas_unmap(iommufd.as_fd(), ioas, iova, MIN_GRANULE) {
                warn!("unmapping the MAP_FILE probe: errno {}", e.errno);
            }
            true
        }
        Err(e) => {
            let why = match e.errno {
                libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL => "not supported by this kernel",
                _ => "failed",
            };
            info!(
                "IOMMU_IOAS_MAP_FILE {why} ({}): mapping by user VA",
                std::io::Error::from_raw_os_error(e.errno)
            );
            false
        }
    }
}

/// Tries `IOMMU_IOAS_COPY` of one granule from the middle of the first staged RAM region into a
/// scratch IOAS (destroyed again). `None` when there is nothing to try it on.
pub(super) fn probe_copy(shared: &Shared, ram: &GuestRam) -> Option<bool> {
    let r = ram
        .regions()
        .iter()
        .find(|r| r.gpa.len().is_some_and(|l| l >= 3 * MIN_GRANULE))?;
    let scratch = match sys::ioas_alloc(shared.fd()) {
        Ok(id) => id,
        Err(e) => {
            warn!("scratch IOAS for the COPY probe: errno {}", e.errno);
            return None;
        }
    };
    let src = r.gpa.start() + MIN_GRANULE;
    let res = sys::ioas_copy(
        shared.fd(),
        scratch,
        src,
        shared.identity_id,
        src,
        MIN_GRANULE,
        sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE,
    );
    if let Err(e) = sys::destroy(shared.fd(), scratch) {
        warn!(
            "cannot destroy the COPY probe IOAS {scratch}: errno {}",
            e.errno
        );
    }
    match res {
        Ok(()) => {
            info!("IOMMU_IOAS_COPY of a sub-range of staged RAM works: MAPs copy from staging");
            Some(true)
        }
        Err(e) => {
            info!(
                "IOMMU_IOAS_COPY of a sub-range of staged RAM fails ({}): MAPs map directly",
                std::io::Error::from_raw_os_error(e.errno)
            );
            Some(false)
        }
    }
}
