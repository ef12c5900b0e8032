//! Temporary files and directories for tests: unique per process and per call, so tests running
//! in parallel (and several test binaries at once) never share one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh path under the temporary directory, `viommu-{what}-{pid}-{n}`: nothing is created.
pub fn temp_path(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("viommu-{what}-{}-{n}", std::process::id()))
}

/// A fresh, empty directory, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A directory for a test.
    pub fn new() -> TempDir {
        TempDir::named("test")
    }

    /// A directory whose name says what it is for (`what`).
    pub fn named(what: &str) -> TempDir {
        let p = temp_path(what);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_is_fresh_and_goes_away_when_dropped() {
        let (a, b) = (TempDir::named("t"), TempDir::named("t"));
        assert_ne!(a.0, b.0);
        std::fs::write(a.join("f"), b"x").unwrap();
        let path = a.0.clone();
        drop(a);
        assert!(!path.exists());
        assert!(b.is_dir());
    }
}
