//! The rules a guest is held to: what the host allows (granule, input range, reserved
//! regions, PROBE size) and the resource caps.

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
            // The lowest set bit of the mask is the granule (§5.13.4); at least 4 bytes, since
            // the shadow keeps a mapping's permissions in its GPA's two low bits (every IOMMU's
            // smallest page is 4 KiB anyway).
            granule_mask: (c.page_size_mask & c.page_size_mask.wrapping_neg()).wrapping_sub(1)
                | 0b11,
            input_range: c.input_range,
            domain_range,
            resv_mem: c.reserved.clone(),
            limits,
            probe_size,
        }
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
