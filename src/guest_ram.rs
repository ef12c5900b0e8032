//! The guest's RAM as the VMM described it in the vhost-user memory table.
//!
//! Pure data: which guest-physical ranges are RAM, where the daemon has them mapped, and which
//! file (memfd) and offset back them. The domain model asks it whether a MAP's GPA range is
//! entirely guest RAM (nothing outside it may ever be mapped for a device), and whether a mapping
//! still points at the same memory after the table changed.

use std::fs::File;
use std::sync::Arc;

use crate::ids::GpaRange;

/// The file that backs a region: the fd, the offset of the region's first byte in it and the
/// file's identity (st_dev, st_ino) so two tables can be compared.
#[derive(Clone, Debug)]
pub struct Backing {
    pub file: Arc<File>,
    pub offset: u64,
    pub file_id: (u64, u64),
}

/// One contiguous region of guest RAM.
#[derive(Clone, Debug)]
pub struct RamRegion {
    pub gpa: GpaRange,
    /// Address of the region's first byte in this process.
    pub host_addr: u64,
    pub backing: Option<Backing>,
}

/// Where a guest-physical range lives: enough for a backend to map it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLocation {
    pub host_addr: u64,
    /// `(file_id, offset in file)` when the region is file-backed.
    pub file: Option<((u64, u64), u64)>,
}

/// The whole memory table, regions sorted by GPA and non-overlapping.
#[derive(Clone, Debug, Default)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Builds a table; overlapping regions are rejected (a VMM bug we must not paper over).
    pub fn new(mut regions: Vec<RamRegion>) -> Result<Self, String> {
        regions.sort_by_key(|r| r.gpa.start());
        for w in regions.windows(2) {
            if w[0].gpa.overlaps(&w[1].gpa) {
                return Err(format!(
                    "memory regions {} and {} overlap",
                    w[0].gpa, w[1].gpa
                ));
            }
        }
        Ok(GuestRam { regions })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Bytes of guest RAM the table describes.
    pub fn size(&self) -> u64 {
        self.regions.iter().fold(0u64, |n, r| {
            n.saturating_add(r.gpa.len().unwrap_or(u64::MAX))
        })
    }

    /// The region holding all of `gpa`, if one does. A range that spans two regions is refused
    /// even if they are adjacent: a backend maps from one place.
    pub fn region_of(&self, gpa: &GpaRange) -> Option<&RamRegion> {
        let i = self
            .regions
            .partition_point(|r| r.gpa.start() <= gpa.start())
            .checked_sub(1)?;
        let r = &self.regions[i];
        r.gpa.contains(gpa).then_some(r)
    }

    /// Where `gpa` lives, if it is entirely inside one region.
    pub fn locate(&self, gpa: &GpaRange) -> Option<HostLocation> {
        let r = self.region_of(gpa)?;
        let delta = gpa.start() - r.gpa.start();
        Some(HostLocation {
            host_addr: r.host_addr.checked_add(delta)?,
            file: r
                .backing
                .as_ref()
                .and_then(|b| Some((b.file_id, b.offset.checked_add(delta)?))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, len: u64) -> RamRegion {
        RamRegion {
            gpa: GpaRange::with_len(start, len).unwrap(),
            host_addr: 0x7f00_0000_0000 + start,
            backing: None,
        }
    }

    #[test]
    fn only_ranges_inside_one_region_are_guest_ram() {
        let ram = GuestRam::new(vec![region(0x10_0000, 0x10_0000), region(0, 0x8_0000)]).unwrap();
        let r = |s, e| GpaRange::new(s, e).unwrap();
        assert!(ram.locate(&r(0, 0xfff)).is_some());
        assert!(ram.locate(&r(0x7_f000, 0x7_ffff)).is_some());
        assert!(ram.locate(&r(0x7_f000, 0x8_0000)).is_none());
        assert!(ram.locate(&r(0x9_0000, 0x9_0fff)).is_none());
        assert_eq!(
            ram.locate(&r(0x10_1000, 0x10_1fff)).unwrap().host_addr,
            0x7f00_0010_1000
        );
        assert!(ram.locate(&r(0x1f_f000, 0x20_0000)).is_none());
        assert!(ram.locate(&r(u64::MAX, u64::MAX)).is_none());
    }

    #[test]
    fn overlapping_regions_are_refused() {
        assert!(GuestRam::new(vec![region(0, 0x2000), region(0x1000, 0x1000)]).is_err());
    }
}
