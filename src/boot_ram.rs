//! Guest RAM before the vhost-user memory table, as the VMM's vfio-user DMA_MAPs describe it.
//!
//! With `boot_bypass`, an endpoint no guest driver attached yet translates identity over guest
//! RAM: that is how firmware and option ROMs (SeaBIOS probing an NVMe boot disk, a NIC's PXE ROM)
//! reach memory before the OS starts the IOMMU. But QEMU sends the vhost-user memory table only
//! when the guest's virtio-iommu driver starts the device (DRIVER_OK, `vhost_dev_start`), long
//! after the firmware ran; until then the identity domain would be empty and every firmware DMA
//! would fault. The one description of guest RAM the daemon has by then is the one each
//! vfio-user client sends as it connects: a DMA_MAP of every RAM section with its memfd and
//! offset (QEMU's memory listener, replayed at realize and kept current as the firmware reshapes
//! memory, e.g. PAM shadowing below 1 MiB).
//!
//! So until the memory table arrives, the identity domain follows the fd-backed DMA maps of a
//! connected vfio-user client: the one whose maps changed last (each client describes all of
//! guest RAM, and QEMU updates them one after the other, so while it does two clients may
//! disagree for a moment). This gives the VMM no power it lacks anyway: the
//! same VMM sends the memory table, and it says only what guest RAM is, never what a device may
//! reach (that stays the guest's choice: identity only in bypass, and only over this RAM). The
//! same checks apply as to the memory table (a region must lie inside its file). Once the memory
//! table is there it alone rules (`IommuDevice::set_boot_ram` ignores this one).
//!
//! Identical maps count once; a map that overlaps a different one is left out (the vfio-user
//! server already refuses overlapping maps from one client), the one at the lower address (or of
//! the lower file identity at the same address) stays.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::guest_ram::GuestRam;
use crate::vfio_user::DmaRegion;

mod follower;
pub use follower::{BUS_MASTER_WAIT, Follower};

/// One fd-backed DMA map, as far as guest RAM is concerned: guest-physical start and size, and
/// the file identity and offset that back it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RamMap {
    pub gpa: u64,
    pub size: u64,
    pub file_id: (u64, u64),
    pub offset: u64,
}

/// The guest RAM layout the clients' maps describe, sorted by GPA, without duplicates; maps
/// that overlap a different earlier one are returned apart.
pub fn layout(maps: impl IntoIterator<Item = RamMap>) -> (Vec<RamMap>, Vec<RamMap>) {
    let mut all: Vec<RamMap> = maps.into_iter().collect();
    all.sort();
    all.dedup();
    let mut kept: Vec<RamMap> = Vec::with_capacity(all.len());
    let mut conflicts = Vec::new();
    for m in all {
        match kept.last() {
            Some(prev) if m.gpa < prev.gpa.saturating_add(prev.size) => conflicts.push(m),
            _ => kept.push(m),
        }
    }
    (kept, conflicts)
}

/// The daemon's mappings of the RAM the clients described, kept across updates so that an
/// unchanged region keeps its host address (the identity domain then leaves it alone).
#[derive(Default)]
pub struct BootRam {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    mapped: BTreeMap<RamMap, Arc<GuestRegionMmap>>,
    /// The layout last returned by `update`.
    current: Vec<RamMap>,
}

impl BootRam {
    /// Takes the DMA maps that describe guest RAM now. Returns whether the guest RAM they
    /// describe changed since the last call, and the maps left out (overlapping a different
    /// one, or unusable), with why.
    pub fn update(&self, maps: &[DmaRegion]) -> (bool, Vec<String>) {
        let mut files: BTreeMap<(u64, u64), Arc<File>> = BTreeMap::new();
        let mut described = Vec::new();
        for r in maps {
            let (Some(file), Some(id)) = (&r.file, r.file_id) else {
                continue;
            };
            files.entry(id).or_insert_with(|| file.clone());
            described.push(RamMap {
                gpa: r.address,
                size: r.size,
                file_id: id,
                offset: r.offset,
            });
        }
        let (wanted, conflicts) = layout(described);
        let mut skipped: Vec<String> = conflicts
            .iter()
            .map(|m| format!("{:#x}+{:#x} overlaps another map", m.gpa, m.size))
            .collect();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut used = Vec::with_capacity(wanted.len());
        for m in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = st.mapped.entry(m) {
                match map_region(&m, &files[&m.file_id]) {
                    Ok(r) => {
                        slot.insert(Arc::new(r));
                    }
                    Err(e) => {
                        skipped.push(format!("{:#x}+{:#x}: {e}", m.gpa, m.size));
                        continue;
                    }
                }
            }
            used.push(m);
        }
        st.mapped.retain(|m, _| used.binary_search(m).is_ok());
        let changed = used != st.current;
        st.current = used;
        (changed, skipped)
    }

    /// The guest RAM the clients' maps describe now (empty when there is none).
    pub fn ram(&self) -> Result<GuestRam, String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let regions: Vec<Arc<GuestRegionMmap>> =
            st.current.iter().map(|m| st.mapped[m].clone()).collect();
        if regions.is_empty() {
            return Ok(GuestRam::default());
        }
        let mem = GuestMemoryMmap::from_arc_regions(regions).map_err(|e| e.to_string())?;
        crate::vhost::describe_ram(&mem)
    }
}

/// Maps one region of a client's file into the daemon, after checking that it lies inside the
/// file (a mapping past the end would fault when the kernel pins it).
fn map_region(m: &RamMap, file: &Arc<File>) -> Result<GuestRegionMmap, String> {
    let md = file.metadata().map_err(|e| format!("fstat: {e}"))?;
    if md.is_file()
        && m.offset
            .checked_add(m.size)
            .is_none_or(|end| end > md.len())
    {
        return Err(format!(
            "reaches past the end of its file ({:#x} bytes at offset {:#x} of {:#x})",
            m.size,
            m.offset,
            md.len()
        ));
    }
    let size = usize::try_from(m.size).map_err(|_| "too large".to_string())?;
    GuestRegionMmap::from_range(
        GuestAddress(m.gpa),
        size,
        Some(FileOffset::from_arc(file.clone(), m.offset)),
    )
    .map_err(|e| format!("mmap: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(gpa: u64, size: u64, ino: u64, offset: u64) -> RamMap {
        RamMap {
            gpa,
            size,
            file_id: (1, ino),
            offset,
        }
    }

    fn ram_file(len: u64) -> Arc<File> {
        Arc::new(crate::testing::unlinked_file(len))
    }

    fn dma(address: u64, size: u64, offset: u64, file: Option<&Arc<File>>) -> DmaRegion {
        use std::os::unix::fs::MetadataExt;
        DmaRegion {
            address,
            size,
            flags: 3,
            offset,
            file_id: file.map(|f| {
                let md = f.metadata().unwrap();
                (md.dev(), md.ino())
            }),
            file: file.cloned(),
        }
    }

    #[test]
    fn the_clients_maps_become_guest_ram_that_keeps_its_host_address_until_it_changes() {
        let ram = ram_file(0x20_0000);
        let boot = BootRam::default();
        assert!(boot.ram().unwrap().is_empty());
        // Two clients describe the same RAM; a map without an fd (a ROM) is no RAM.
        let low = dma(0, 0xa_0000, 0, Some(&ram));
        let high = dma(0x10_0000, 0x10_0000, 0x10_0000, Some(&ram));
        let rom = dma(0xfffc_0000, 0x4_0000, 0, None);
        let maps = [low.clone(), high.clone(), rom, low.clone(), high.clone()];
        assert_eq!(boot.update(&maps), (true, vec![]));
        let first = boot.ram().unwrap();
        let spans: Vec<(u64, u64)> = first
            .regions()
            .iter()
            .map(|r| (r.gpa.start(), r.gpa.end()))
            .collect();
        assert_eq!(spans, vec![(0, 0x9_ffff), (0x10_0000, 0x1f_ffff)]);
        assert!(first.regions().iter().all(|r| r.backing.is_some()));
        // The same maps again: nothing changed, and the regions stay where they are mapped.
        assert_eq!(boot.update(&maps[..2]), (false, vec![]));
        let again = boot.ram().unwrap();
        let addrs = |r: &GuestRam| r.regions().iter().map(|x| x.host_addr).collect::<Vec<_>>();
        assert_eq!(addrs(&again), addrs(&first));
        // One region gone (e.g. PAM reshaping low memory): the other keeps its address.
        assert_eq!(boot.update(std::slice::from_ref(&high)), (true, vec![]));
        let after = boot.ram().unwrap();
        assert_eq!(after.regions().len(), 1);
        assert_eq!(after.regions()[0].host_addr, first.regions()[1].host_addr);
        // Every client gone: no RAM.
        assert_eq!(boot.update(&[]), (true, vec![]));
        assert!(boot.ram().unwrap().is_empty());
    }

    #[test]
    fn a_map_past_the_end_of_its_file_is_left_out() {
        let ram = ram_file(0x10_0000);
        let boot = BootRam::default();
        let inside = dma(0, 0x8_0000, 0, Some(&ram));
        let beyond = dma(0x10_0000, 0x10_0000, 0x8_0000, Some(&ram));
        let (changed, skipped) = boot.update(&[inside, beyond]);
        assert!(changed);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].contains("past the end of its file"),
            "{skipped:?}"
        );
        assert_eq!(boot.ram().unwrap().regions().len(), 1);
    }

    #[test]
    fn every_client_describing_the_same_ram_counts_once() {
        let low = m(0, 0xa_0000, 7, 0);
        let high = m(0x10_0000, 0xff0_0000, 7, 0x10_0000);
        let (kept, conflicts) = layout([high, low, low, high, high]);
        assert_eq!(kept, vec![low, high]);
        assert!(conflicts.is_empty());
    }

    #[test]
    fn a_map_overlapping_a_different_one_is_left_out() {
        let a = m(0x1000, 0x3000, 7, 0);
        let b = m(0x2000, 0x1000, 8, 0);
        let c = m(0x4000, 0x1000, 7, 0x3000);
        let (kept, conflicts) = layout([c, b, a]);
        assert_eq!(kept, vec![a, c]);
        assert_eq!(conflicts, vec![b]);
    }
}
