//! Guest RAM the VMM takes away: a SIGBUS on the daemon's mappings of guest memory must not kill
//! the daemon.
//!
//! The daemon maps each memory region the VMM sends (a memfd, a tmpfs or hugetlbfs file) and
//! reads the rings and requests through that mapping. `vhost::memory::check_backing` refuses a
//! region that reaches past the end of its file, but the VMM keeps the file: if it truncates it
//! later (a buggy or hostile VMM; QEMU seals memfd RAM against that by default, not file RAM),
//! the next access to a lost page raises SIGBUS, whose default action kills the daemon.
//!
//! So every mapping of guest RAM is registered here ([`watch`]), and a SIGBUS handler
//! ([`install`]) absorbs a fault inside a registered mapping: it puts an anonymous zero page in
//! place of the lost page (the access is retried and reads zeros; writes land nowhere), records
//! the address and makes [`lost_fd`] readable. The vhost-user connection waits on that fd and
//! ends itself ("the VMM truncated guest RAM"), with the teardown of any disconnect; the daemon
//! serves the next connection. A SIGBUS anywhere else keeps its default action.
//!
//! The handler only loads atomics and makes two system calls (mmap, write to an eventfd); it
//! acts only on the kernel's own fault (`BUS_ADRERR`), never on a SIGBUS sent by a process.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// How many mappings can be watched at once (a memory table has at most 509 regions with
/// CONFIGURE_MEM_SLOTS; QEMU uses a handful).
const SLOTS: usize = 512;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// The address of the last absorbed fault (0: none since the last [`take_lost`]).
static LOST_AT: AtomicUsize = AtomicUsize::new(0);
/// The eventfd the handler writes to (-1 until [`lost_fd`] made it).
static LOST_FD: AtomicI32 = AtomicI32::new(-1);
static LOST_EVENTFD: OnceLock<OwnedFd> = OnceLock::new();

/// A registered mapping; unregistered when dropped.
#[derive(Debug)]
pub struct Watched(Option<usize>);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            LENS[i].store(0, Ordering::Release);
            STARTS[i].store(0, Ordering::Release);
        }
    }
}

/// Registers the mapping `[addr, addr + len)` of guest RAM. With every slot taken it is not
/// watched (logged): a SIGBUS there kills the daemon as before.
pub fn watch(addr: usize, len: usize) -> Watched {
    for i in 0..SLOTS {
        if STARTS[i]
            .compare_exchange(0, addr, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LENS[i].store(len, Ordering::Release);
            return Watched(Some(i));
        }
    }
    log::warn!("guest RAM at {addr:#x}: more than {SLOTS} mappings; not guarded against SIGBUS");
    Watched(None)
}

/// The eventfd that becomes readable once a fault in guest RAM was absorbed (see
/// [`take_lost`]).
pub fn lost_fd() -> BorrowedFd<'static> {
    LOST_EVENTFD
        .get_or_init(|| {
            // SAFETY: eventfd takes no pointers; a valid fd is ours to own.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            assert!(
                fd >= 0,
                "cannot create an eventfd: {}",
                std::io::Error::last_os_error()
            );
            LOST_FD.store(fd, Ordering::Release);
            // SAFETY: `fd` was just created and nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .as_fd()
}

/// The address of a fault absorbed since the last call, if any (and [`lost_fd`] drained).
pub fn take_lost() -> Option<usize> {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a u64 from our eventfd (non-blocking: EAGAIN when empty).
    unsafe {
        libc::read(
            lost_fd().as_raw_fd(),
            (&mut v as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    match LOST_AT.swap(0, Ordering::AcqRel) {
        0 => None,
        a => Some(a),
    }
}

/// Installs the SIGBUS handler (once, before guest RAM is mapped).
pub fn install() -> std::io::Result<()> {
    lost_fd();
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn with the SA_SIGINFO
    // signature and does only what the module documentation says.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The watched mapping holding `addr`: (start, len).
fn watched_at(addr: usize) -> Option<(usize, usize)> {
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::Acquire);
        let len = LENS[i].load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            return Some((start, len));
        }
    }
    None
}

/// Puts an anonymous zero page over the page of `addr` (or the huge page, for hugetlbfs RAM,
/// whose mappings cannot be split at 4 KiB), within `[start, start + len)`.
fn replace_page(addr: usize, start: usize, len: usize) -> bool {
    for size in [4096usize, 2 << 20, 1 << 30] {
        let page = addr & !(size - 1);
        if page < start || page + size > start + len {
            continue;
        }
        // SAFETY: MAP_FIXED over a page of a mapping this process made for guest RAM (it lies
        // inside a watched mapping); nothing but that page changes.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only the kernel's fault for a page past the end of a file (a SIGBUS sent with kill(2) has
    // no fault address: its si_addr is other fields).
    if code == libc::BUS_ADRERR
        && let Some((start, len)) = watched_at(addr)
        && replace_page(addr, start, len)
    {
        LOST_AT.store(addr, Ordering::Release);
        let fd = LOST_FD.load(Ordering::Acquire);
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes to our eventfd is async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        return;
    }
    // Not guest RAM (or the page could not be replaced): the default action, when the faulting
    // access is retried.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_on_a_truncated_watched_file_mapping_reads_zeros_and_is_reported() {
        install().unwrap();
        let name = std::ffi::CString::new("sigbus-test").unwrap();
        // SAFETY: plain system calls on a memfd and a mapping this test owns.
        unsafe {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, 3 * 4096), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let base = p as usize;
            let w = watch(base, 3 * 4096);
            std::ptr::write_volatile((base + 4096) as *mut u8, 7);
            // The VMM shrinks the file under the mapping: the last two pages are gone.
            assert_eq!(libc::ftruncate(fd, 4096), 0);
            assert_eq!(std::ptr::read_volatile((base + 4096 + 8) as *const u8), 0);
            assert_eq!(take_lost(), Some(base + 4096 + 8));
            assert_eq!(take_lost(), None);
            // The page stays readable and writable (private now); the first page still shared.
            std::ptr::write_volatile((base + 4096) as *mut u8, 9);
            assert_eq!(std::ptr::read_volatile((base + 4096) as *const u8), 9);
            drop(w);
            assert!(watched_at(base).is_none());
            libc::munmap(p, 3 * 4096);
            libc::close(fd);
        }
    }
}
