//! The sysfs reads and writes the device checks share: PCI devices by class, one-line files.

use std::fs;

pub type Result<T> = std::result::Result<T, String>;

/// The PCI addresses of this machine's devices of `class` (e.g. "0x010802"), sorted.
pub fn bdfs_of_class(class: &str) -> Result<Vec<String>> {
    let dir = "/sys/bus/pci/devices";
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if fs::read_to_string(p.join("class"))
            .unwrap_or_default()
            .trim()
            == class
        {
            out.push(
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    out.sort();
    Ok(out)
}

/// A sysfs attribute's value without its newline.
pub fn read_trim(path: &str) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("{path}: {e}"))
}

pub fn write(path: &str, v: &str) -> Result<()> {
    fs::write(path, v).map_err(|e| format!("write {v:?} to {path}: {e}"))
}
