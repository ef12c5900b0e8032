//! The per-VM configuration file (TOML) and the settings derived from it.
//!
//! One file describes one VM: its vhost-user socket, its endpoints (guest endpoint id, host PCI
//! device, vfio-user socket), boot bypass, domain range, caps, backend and threads. Parsing is
//! strict (unknown keys are errors) and every error names the file and, from the TOML parser,
//! the line. This module reads the file and nothing else.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::backend::iommufd::Staging;
use crate::domains::{Limits, RamCaps};

/// Which translation backend serves the VM.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// iommufd when endpoints name host devices and /dev/iommu exists, else soft.
    #[default]
    Auto,
    /// The software translation table (no host IOMMU).
    Soft,
    /// The host kernel's iommufd.
    Iommufd,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The endpoint id the guest uses (from the VIOT table).
    pub id: u32,
    /// The host PCI device behind it, e.g. "0000:01:00.0" (needed for iommufd).
    pub pci: Option<String>,
    /// Where the daemon serves this device to the VMM over vfio-user.
    pub vfio_user_socket: Option<PathBuf>,
    /// The device's PCI address in the guest, e.g. "00:04.0" (for the VIOT table).
    pub guest_pci: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_domains: Option<usize>,
    pub max_mappings_per_domain: Option<usize>,
    pub max_mappings_total: Option<usize>,
}

/// The longest polling window a config or the command line may ask for (µs).
pub const MAX_POLL_US: u64 = 1_000_000;
/// The most domains `limits.max_domains` may allow.
pub const MAX_DOMAINS: usize = 1 << 20;
/// The most mappings `limits.max_mappings_*` may allow (2^26: ~3.4 GB of daemon memory at ~50
/// bytes each).
pub const MAX_MAPPINGS: usize = 1 << 26;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The vhost-user socket the VMM connects to.
    pub socket: Option<PathBuf>,
    /// The read-only control socket (state and metrics) for operators and scrapers.
    pub control_socket: Option<PathBuf>,
    #[serde(default)]
    pub backend: BackendKind,
    /// Initial value of the config-space `bypass` field.
    #[serde(default)]
    pub boot_bypass: bool,
    /// iommufd backend: when guest RAM is pinned into the identity (staging) IOAS:
    /// `"on-demand"` (default: when an endpoint first translates identity) or `"all-ram"` (at
    /// every memory table).
    #[serde(default)]
    pub staging: Staging,
    /// Inclusive range of domain ids the guest may use.
    pub domain_range: Option<[u32; 2]>,
    /// Executor threads; 0 runs requests in the vring thread.
    pub threads: Option<usize>,
    pub probe_size: Option<u32>,
    /// Polling window of the vring thread in microseconds (0 disables polling).
    pub poll_us: Option<u64>,
    /// Poll for the guest's next request after an assigned device's interrupt (default false;
    /// see `irq_watch` and BENCHMARKS.md, "Polling after device interrupts").
    pub poll_after_irq: Option<bool>,
    pub limits: Option<LimitsConfig>,
    /// The virtio-iommu device's PCI address in the guest, e.g. "00:03.0" (for the VIOT table).
    pub iommu_guest_pci: Option<String>,
    /// The uid the VMM runs as: vhost-user and vfio-user clients with another uid are refused
    /// (`SO_PEERCRED`).
    pub vmm_uid: Option<u32>,
    /// The gid the VMM runs as: vhost-user and vfio-user clients with another gid are refused.
    pub vmm_gid: Option<u32>,
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl VmConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: VmConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let mut ids: Vec<u32> = self.endpoints.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("endpoint id {} is listed twice", w[0]));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (_, p) in self.socket_paths() {
            if !seen.insert(p.clone()) {
                return Err(format!(
                    "socket path {} is used twice: each socket needs its own path",
                    p.display()
                ));
            }
        }
        if let Some([s, e]) = self.domain_range
            && s > e
        {
            return Err(format!("domain_range [{s}, {e}] is reversed"));
        }
        if let Some(p) = self.probe_size
            && !(64..=65536).contains(&p)
        {
            return Err(format!("probe_size {p} must be between 64 and 65536"));
        }
        if let Some(t) = self.threads
            && t > 64
        {
            return Err(format!("threads {t} is more than 64"));
        }
        if let Some(us) = self.poll_us
            && us > MAX_POLL_US
        {
            return Err(format!(
                "poll_us {us} must be between 0 and {MAX_POLL_US} (1 s): a longer window only burns a core"
            ));
        }
        if let Some(l) = &self.limits {
            for (name, v, max) in [
                ("max_domains", l.max_domains, MAX_DOMAINS),
                (
                    "max_mappings_per_domain",
                    l.max_mappings_per_domain,
                    MAX_MAPPINGS,
                ),
                ("max_mappings_total", l.max_mappings_total, MAX_MAPPINGS),
            ] {
                if let Some(v) = v
                    && !(1..=max).contains(&v)
                {
                    return Err(format!(
                        "limits.{name} {v} must be between 1 and {max} (0 refuses every request of its kind; beyond, one guest could make the daemon hold more memory than any host has, ~50 bytes per mapping)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every socket the daemon listens on for this VM, with what it is for, as normalised
    /// paths (`a//b` and `a/./b` are `a/b`; `..` is kept: it cannot be resolved lexically).
    pub fn socket_paths(&self) -> Vec<(String, PathBuf)> {
        let norm = |p: &Path| p.components().collect::<PathBuf>();
        let vhost = self
            .socket
            .iter()
            .map(|p| ("vhost-user socket".to_string(), norm(p)));
        let vfio = self.endpoints.iter().filter_map(|e| {
            let p = e.vfio_user_socket.as_deref()?;
            Some((format!("endpoint {}: vfio-user socket", e.id), norm(p)))
        });
        let control = self
            .control_socket
            .iter()
            .map(|p| ("control socket".to_string(), norm(p)));
        vhost.chain(vfio).chain(control).collect()
    }

    /// The mapping caps the configuration leaves unset: they follow the guest's RAM.
    pub fn ram_caps(&self) -> RamCaps {
        let l = self.limits.as_ref();
        RamCaps {
            per_domain: l.is_none_or(|l| l.max_mappings_per_domain.is_none()),
            total: l.is_none_or(|l| l.max_mappings_total.is_none()),
        }
    }

    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        let l = self.limits.unwrap_or(LimitsConfig {
            max_domains: None,
            max_mappings_per_domain: None,
            max_mappings_total: None,
        });
        Limits {
            max_domains: l.max_domains.unwrap_or(d.max_domains),
            max_mappings_per_domain: l
                .max_mappings_per_domain
                .unwrap_or(d.max_mappings_per_domain),
            max_mappings_total: l.max_mappings_total.unwrap_or(d.max_mappings_total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = VmConfig::parse(
            r#"
socket = "/run/vhost-user-iommu/vm1.sock"
backend = "soft"
boot_bypass = true
staging = "all-ram"
domain_range = [1, 1000]
threads = 2
[limits]
max_domains = 8
[[endpoint]]
id = 8
pci = "0000:01:00.0"
vfio_user_socket = "/run/vhost-user-iommu/vm1-01.sock"
"#,
            Path::new("vm1.toml"),
        )
        .unwrap();
        assert_eq!(c.backend, BackendKind::Soft);
        assert_eq!(c.staging, Staging::AllRam);
        assert_eq!(c.endpoints[0].id, 8);
        assert_eq!(c.limits().max_domains, 8);
        assert_eq!(
            c.limits().max_mappings_total,
            Limits::default().max_mappings_total
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e = VmConfig::parse("threads = 2\nbogus = 1\n", Path::new("/etc/x.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/x.toml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn a_socket_path_used_twice_in_one_config_is_rejected() {
        let p = Path::new("a.toml");
        let two_vfio = "[[endpoint]]\nid = 1\nvfio_user_socket = \"/run/v/a.sock\"\n\
                        [[endpoint]]\nid = 2\nvfio_user_socket = \"/run/v/./a.sock\"\n";
        let vhost_and_vfio = "socket = \"/run/v/a.sock\"\n\
                              [[endpoint]]\nid = 1\nvfio_user_socket = \"/run/v//a.sock\"\n";
        for twice in [two_vfio, vhost_and_vfio] {
            let msg = VmConfig::parse(twice, p).unwrap_err().to_string();
            assert!(
                msg.contains("/run/v/a.sock") && msg.contains("twice"),
                "{msg}"
            );
        }
        let distinct = "socket = \"/run/v/a.sock\"\n\
                        [[endpoint]]\nid = 1\nvfio_user_socket = \"/run/v/b.sock\"\n";
        assert!(VmConfig::parse(distinct, p).is_ok());
    }

    #[test]
    fn staging_defaults_to_on_demand_and_names_its_choices() {
        let p = Path::new("a.toml");
        assert_eq!(VmConfig::parse("", p).unwrap().staging, Staging::OnDemand);
        assert_eq!(
            VmConfig::parse("staging = \"on-demand\"\n", p)
                .unwrap()
                .staging,
            Staging::OnDemand
        );
        let msg = VmConfig::parse("staging = \"lazy\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("on-demand") && msg.contains("all-ram"),
            "{msg}"
        );
    }

    #[test]
    fn mapping_caps_left_unset_follow_guest_ram() {
        let p = Path::new("a.toml");
        let none = VmConfig::parse("", p).unwrap().ram_caps();
        assert!(none.per_domain && none.total);
        let total = VmConfig::parse("[limits]\nmax_mappings_total = 100\n", p)
            .unwrap()
            .ram_caps();
        assert!(total.per_domain && !total.total);
        let domains_only = VmConfig::parse("[limits]\nmax_domains = 8\n", p)
            .unwrap()
            .ram_caps();
        assert!(domains_only.per_domain && domains_only.total);
    }

    #[test]
    fn duplicate_endpoints_and_reversed_ranges_are_rejected() {
        let p = Path::new("a.toml");
        assert!(VmConfig::parse("[[endpoint]]\nid = 1\n[[endpoint]]\nid = 1\n", p).is_err());
        assert!(VmConfig::parse("domain_range = [5, 1]\n", p).is_err());
    }

    #[test]
    fn limits_of_zero_or_beyond_reason_and_a_huge_poll_window_are_rejected() {
        let p = Path::new("a.toml");
        for bad in [
            "[limits]\nmax_domains = 0\n",
            "[limits]\nmax_mappings_per_domain = 0\n",
            "[limits]\nmax_mappings_total = 0\n",
            "[limits]\nmax_mappings_total = 1000000000\n",
            "[limits]\nmax_domains = 10000000\n",
            "poll_us = 5000000\n",
        ] {
            let e = VmConfig::parse(bad, p).expect_err(bad).to_string();
            assert!(e.contains("between"), "{bad}: {e}");
        }
        for good in [
            "[limits]\nmax_domains = 1\nmax_mappings_total = 67108864\n",
            "poll_us = 0\n",
            "poll_us = 1000000\n",
        ] {
            assert!(VmConfig::parse(good, p).is_ok(), "{good}");
        }
    }
}
