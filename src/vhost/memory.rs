//! The vhost-user memory table as the domain model sees it.
//!
//! Converts the regions the VMM sent (already mmapped by the vhost-user library) into
//! [`GuestRam`]: guest-physical ranges, the daemon's host addresses and the backing memfd with
//! its identity, so a changed table can be compared with the old one page for page.

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::guest_ram::{Backing, GuestRam, RamRegion};
use crate::ids::IovaRange;

/// (st_dev, st_ino) of an open fd.
pub(super) fn file_identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes only into `st`; an invalid fd just fails with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Converts the vhost-user memory table into the domain model's view of guest RAM.
pub(super) fn guest_ram(mem: &GuestMemoryMmap) -> Result<GuestRam, String> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let gpa = IovaRange::with_len(r.start_addr().0, r.len())
            .ok_or_else(|| format!("memory region at {:#x} has a bad length", r.start_addr().0))?;
        let host_addr = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| e.to_string())? as u64;
        let backing = match r.file_offset() {
            None => None,
            Some(fo) => {
                let file_id = file_identity(fo.file().as_raw_fd()).ok_or_else(|| {
                    format!("fstat of memory region fd: {}", io::Error::last_os_error())
                })?;
                Some(Backing {
                    file: fo.arc().clone(),
                    offset: fo.start(),
                    file_id,
                })
            }
        };
        regions.push(RamRegion {
            gpa,
            host_addr,
            backing,
        });
    }
    GuestRam::new(regions)
}
