//! The small system helpers every guest program needs (std and libc only): opening device nodes,
//! a raw serial line to the host, a device's VFIO cdev, an unlimited memlock limit.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

pub type Result<T> = std::result::Result<T, String>;

/// Opens `path` for reading and writing.
pub fn open_rw(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// Opens the serial line `path` (not as the controlling terminal) and puts it in raw mode: the
/// host's control channel, byte for byte.
pub fn open_raw_tty(path: &str) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: termios is plain data filled by tcgetattr for a valid fd; cfmakeraw and tcsetattr
    // only touch that local struct and the fd's settings.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) != 0 {
            return Err(format!("tcgetattr {path}: {}", io::Error::last_os_error()));
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(format!("tcsetattr {path}: {}", io::Error::last_os_error()));
        }
    }
    Ok(f)
}

/// /dev/vfio/devices/vfioN of the PCI device `bdf`, from its sysfs `vfio-dev` directory (there
/// only while vfio-pci drives it).
pub fn vfio_cdev(bdf: &str) -> Result<String> {
    let dir = format!("/sys/bus/pci/devices/{bdf}/vfio-dev");
    let name = fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e} (not bound to vfio-pci?)"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vfio"))
        .ok_or_else(|| format!("{dir} lists no vfioN"))?;
    Ok(format!("/dev/vfio/devices/{name}"))
}

/// Lifts RLIMIT_MEMLOCK (the program runs as root in its own VM and pins DMA buffers); a
/// failure is printed, and the pinning that needs it fails later with its own error.
pub fn unlimited_memlock() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) } != 0 {
        eprintln!("setrlimit(RLIMIT_MEMLOCK): {}", io::Error::last_os_error());
    }
}
