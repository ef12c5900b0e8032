//! The sysfs and procfs reads and writes the device checks share: PCI devices by class,
//! one-line files, interrupt counts.

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

/// One line of `/proc/interrupts`: the handler's name, its count over every CPU, MSI-X or not.
#[derive(Debug)]
pub struct Vector {
    pub name: String,
    pub count: u64,
    pub msix: bool,
}

/// The interrupt vectors whose handler name starts with `prefix`, sorted by name.
pub fn interrupts(prefix: &str) -> Vec<Vector> {
    let text = fs::read_to_string("/proc/interrupts").unwrap_or_default();
    let mut out: Vec<Vector> = text
        .lines()
        .filter_map(|line| {
            let name = line.split_whitespace().last()?;
            if !name.starts_with(prefix) {
                return None;
            }
            let (_, rest) = line.split_once(':')?;
            let count = rest
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .sum();
            Some(Vector {
                name: name.to_owned(),
                count,
                msix: line.contains("MSIX") || line.contains("MSI-X"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The MSI-X vectors of `after` whose count grew since `before`, as `name=count`.
pub fn msix_fired(before: &[Vector], after: &[Vector]) -> Vec<String> {
    after
        .iter()
        .filter(|v| {
            let was = before
                .iter()
                .find(|b| b.name == v.name)
                .map_or(0, |b| b.count);
            v.msix && was < v.count
        })
        .map(|v| format!("{}={}", v.name, v.count))
        .collect()
}
