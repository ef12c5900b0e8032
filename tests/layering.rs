//! The request path runs one way: vhost (rings, events) → pipeline (who executes) → domains (the
//! spec's rules on the shadow state) → backend (the host's tables), with completions coming back
//! as values. This test reads the sources and fails if a module on that path names a module above
//! it, so a call back up cannot creep in unnoticed. The vocabulary every layer shares (`ids`,
//! `protocol`, `guest_ram`, `config`, `heap`, `metrics`, `vfio`) may be used from anywhere.

use std::fs;
use std::path::{Path, PathBuf};

/// A layer's sources (a file and the folder of its submodules) and the crate modules it must
/// not name.
struct Layer {
    name: &'static str,
    forbidden: &'static [&'static str],
}

/// Everything above the request path's lower layers, and the path's own upper steps.
const ABOVE: &[&str] = &[
    "vhost",
    "server",
    "control",
    "recovery",
    "hotplug",
    "upgrade",
    "assembly",
    "boot_ram",
    "journal",
    "vfio_user",
    "trace",
    "exporter",
    "listen",
    "deploy",
    "driver",
    "testing",
    "bench",
];

const LAYERS: &[Layer] = &[
    Layer {
        name: "protocol",
        forbidden: &["pipeline", "domains", "backend"],
    },
    Layer {
        name: "backend",
        forbidden: &["pipeline", "domains"],
    },
    Layer {
        name: "domains",
        forbidden: &["pipeline"],
    },
    Layer {
        name: "pipeline",
        forbidden: &[],
    },
];

fn sources(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = root.join(format!("{name}.rs"));
    if file.exists() {
        out.push(file);
    }
    let mut dirs = vec![root.join(name)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs")
                && p.file_stem().is_some_and(|s| s != "tests")
            {
                out.push(p);
            }
        }
    }
    out
}

/// The crate modules a source names through `crate::…` paths (the crate's own spelling; the
/// library never names itself by its package name).
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let module: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !module.is_empty() {
                out.push((n + 1, module));
            }
        }
        assert!(
            !code.contains("vhost_user_iommu::"),
            "line {}: the library names itself by its package name",
            n + 1
        );
    }
    out
}

#[test]
fn the_request_path_never_names_a_module_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for layer in LAYERS {
        let files = sources(&root, layer.name);
        assert!(!files.is_empty(), "no sources for {}", layer.name);
        for f in files {
            let text = fs::read_to_string(&f).unwrap();
            // A module's tests (`tests.rs` files, and an inline `mod tests`, which comes last)
            // may build whatever they need.
            let text = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or("");
            for (line, module) in named_modules(text) {
                if ABOVE.contains(&module.as_str()) || layer.forbidden.contains(&module.as_str()) {
                    violations.push(format!(
                        "{}:{line}: {} names crate::{module}",
                        f.strip_prefix(&root).unwrap().display(),
                        layer.name
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "calls back up the request path:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scan_sees_a_call_back_up() {
    // The scanner itself: a `crate::` path is found wherever it stands in a line, a comment is
    // not code.
    let found = named_modules(
        "use crate::ids::DomainId;\nlet x = crate::vhost::signal(); // crate::pipeline\n",
    );
    assert_eq!(
        found,
        vec![(1, "ids".to_string()), (2, "vhost".to_string())]
    );
}
