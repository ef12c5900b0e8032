//! The vhost-user memory table as the domain model sees it.
//!
//! Converts the regions the VMM sent (already mmapped by `Connection`) into
//! [`GuestRam`]: guest-physical ranges, the daemon's host addresses and the backing memfd with
//! its identity, so a changed table can be compared with the old one page for page.
//!
//! It also refuses a table the daemon could not safely touch: a region that reaches past the end
//! of its file. Such a mapping succeeds, but reading or writing one of its pages beyond the end
//! raises SIGBUS (DESIGN §6: a VMM must not be able to crash it). A file truncated after the
//! check is `sigbus`'s: the fault is absorbed and the connection ends.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::guest_ram::{Backing, GuestRam, RamRegion};
use crate::ids::GpaRange;

/// fstat of an open fd.
fn stat(fd: i32) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer; an invalid fd just fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// (st_dev, st_ino) of an open fd.
pub(super) fn file_identity(fd: i32) -> Option<(u64, u64)> {
    stat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// Whether some region of a table came without F_SEAL_SHRINK (said once per process).
static SHRINKABLE_WARNED: AtomicBool = AtomicBool::new(false);

/// Checks that every file-backed region lies inside its file: `mmap_offset + memory_size` at most
/// the file's size. Only regular files (memfd, tmpfs, hugetlbfs) are checked: for other fds
/// (device files) `st_size` says nothing about what can be mapped. Warns once when a region's
/// file could still be shrunk later (no F_SEAL_SHRINK): that residual risk is in SECURITY.md.
pub(super) fn check_backing(mem: &GuestMemoryMmap) -> Result<(), String> {
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else { continue };
        let gpa = r.start_addr().0;
        let fd = fo.file().as_raw_fd();
        let st = stat(fd).map_err(|e| format!("memory region at GPA {gpa:#x}: fstat: {e}"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let file_size = u64::try_from(st.st_size).unwrap_or(0);
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|end| end > file_size) {
            return Err(format!(
                "memory region at GPA {gpa:#x} maps {:#x} bytes at offset {:#x} of a file of {file_size:#x} bytes: it reaches past the end of the file (touching those pages would kill the daemon with SIGBUS)",
                r.len(),
                fo.start()
            ));
        }
        // SAFETY: F_GET_SEALS takes no argument and only reads the fd's seals.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if (seals < 0 || seals & libc::F_SEAL_SHRINK == 0)
            && !SHRINKABLE_WARNED.swap(true, Ordering::Relaxed)
        {
            log::info!(
                "memory region at GPA {gpa:#x}: its file has no F_SEAL_SHRINK seal; if the VMM truncates it, the connection ends when the daemon touches a lost page (SIGBUS absorbed, see `sigbus`; logged once)"
            );
        }
    }
    Ok(())
}

/// Converts the vhost-user memory table into the domain model's view of guest RAM.
pub(super) fn guest_ram(mem: &GuestMemoryMmap) -> Result<GuestRam, String> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let gpa = GpaRange::with_len(r.start_addr().0, r.len())
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
