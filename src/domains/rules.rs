//! The rules a guest is held to: what the host allows (granule, input range, reserved
//! regions, PROBE size) and the resource caps.

use std::sync::Arc;

use crate::backend::HostConstraints;
use crate::ids::{DomainId, IovaRange};
use crate::protocol::ResvMem;

/// Resource caps: what one guest may make the daemon hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_domains: usize,
    pub max_mappings_per_domain: usize,
    pub max_mappings_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 20,
            max_mappings_total: 1 << 21,
        }
    }
}

/// Which mapping caps follow the guest's RAM (those the configuration leaves unset): at every
/// memory table they become [`RamCaps::mappings_for`] of its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamCaps {
    pub per_domain: bool,
    pub total: bool,
}

impl RamCaps {
    /// Mappings allowed per 4 KiB page of guest RAM: every page mapped twice (e.g. at two IOVAs,
    /// or in two domains) still fits.
    pub const PER_PAGE: usize = 2;
    /// Never fewer, whatever the RAM size (a guest with no RAM table yet, or a small one).
    pub const FLOOR: usize = 1 << 16;
    /// Never more (the configuration's own ceiling).
    pub const CEILING: usize = crate::config::MAX_MAPPINGS;

    /// The cap for a guest with `ram_bytes` of RAM.
    pub fn mappings_for(ram_bytes: u64) -> usize {
        let pages = usize::try_from(ram_bytes / 4096).unwrap_or(usize::MAX);
        pages
            .saturating_mul(Self::PER_PAGE)
            .clamp(Self::FLOOR, Self::CEILING)
    }

    /// `limits` with the caps that follow RAM set for `ram_bytes`.
    pub fn apply(self, limits: Limits, ram_bytes: u64) -> Limits {
        let cap = Self::mappings_for(ram_bytes);
        Limits {
            max_mappings_per_domain: if self.per_domain {
                cap
            } else {
                limits.max_mappings_per_domain
            },
            max_mappings_total: if self.total {
                cap
            } else {
                limits.max_mappings_total
            },
            ..limits
        }
    }
}

/// The parameters every check uses; fixed for the life of a connection.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Lowest supported page size minus one.
    pub granule_mask: u64,
    pub input_range: IovaRange,
    pub domain_range: (u32, u32),
    /// Regions reported by PROBE (the same for every endpoint) and refused to MAP.
    pub resv_mem: Vec<ResvMem>,
    pub limits: Limits,
    /// The caps of `limits` that follow the guest's RAM (none unless asked for).
    pub ram_caps: RamCaps,
    pub probe_size: u32,
}

impl Rules {
    /// The rules a host imposes: granule, input range and reserved regions from the backend's
    /// constraints, the rest from the VM's configuration.
    pub fn for_host(
        c: &HostConstraints,
        domain_range: (u32, u32),
        limits: Limits,
        probe_size: u32,
    ) -> Rules {
        Rules {
            // The lowest set bit of the mask is the granule (§5.13.4).
            granule_mask: (c.page_size_mask & c.page_size_mask.wrapping_neg()).wrapping_sub(1),
            input_range: c.input_range,
            domain_range,
            resv_mem: c.reserved.clone(),
            limits,
            ram_caps: RamCaps::default(),
            probe_size,
        }
    }

    /// These rules with the mapping caps of `caps` following the guest's RAM, set for no RAM
    /// until the first memory table.
    pub fn with_ram_caps(self, caps: RamCaps) -> Rules {
        Rules {
            limits: caps.apply(self.limits, 0),
            ram_caps: caps,
            ..self
        }
    }

    /// The rules for a guest with `ram_bytes` of RAM: `self` unless some cap follows RAM.
    pub(super) fn for_ram(self: &Arc<Rules>, ram_bytes: u64) -> Arc<Rules> {
        if self.ram_caps == RamCaps::default() {
            return self.clone();
        }
        Arc::new(Rules {
            limits: self.ram_caps.apply(self.limits, ram_bytes),
            ..(**self).clone()
        })
    }

    pub(super) fn domain_in_range(&self, d: DomainId) -> bool {
        self.domain_range.0 <= d.0 && d.0 <= self.domain_range.1
    }

    pub(super) fn overlaps_reserved(&self, r: &IovaRange) -> bool {
        self.resv_mem.iter().any(|m| {
            IovaRange::new(m.start, m.end)
                .map(|m| m.overlaps(r))
                .unwrap_or(false)
        })
    }
}
