//! A paging domain's shadow: its mappings by IOVA start, as the host holds them.
//!
//! Compact on purpose (issue 19: a guest may keep 10⁶ mappings): an entry is its IOVA start (the
//! key), its IOVA end, and its GPA with the permissions in the GPA's two low bits (a MAP's GPA
//! must be aligned to the granule and to at least [`Shadow::GPA_SPARE_BITS`] + 1 bytes:
//! `validate::map`): 24 bytes in the tree. Where the GPA lies in the host is not kept: the
//! domain's RAM table answers it (every mapping was checked against it, and a table change
//! removes what moved).

use std::collections::BTreeMap;

use crate::ids::Perms;

const READ: u64 = 1;
const WRITE: u64 = 2;
const PERM_BITS: u64 = READ | WRITE;

/// One mapping: the IOVAs from its key to its end, onto guest RAM from its GPA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mapping {
    pub(super) end: u64,
    gpa_perms: u64,
}

impl Mapping {
    /// `gpa` must have its two low bits clear (`validate::map` refuses any other).
    pub(super) fn new(end: u64, gpa: u64, perms: Perms) -> Mapping {
        debug_assert_eq!(gpa & PERM_BITS, 0, "GPA {gpa:#x} is not 4-byte aligned");
        let bits = if perms.read { READ } else { 0 } | if perms.write { WRITE } else { 0 };
        Mapping {
            end,
            gpa_perms: (gpa & !PERM_BITS) | bits,
        }
    }

    pub(super) fn gpa(&self) -> u64 {
        self.gpa_perms & !PERM_BITS
    }

    pub(super) fn perms(&self) -> Perms {
        Perms {
            read: self.gpa_perms & READ != 0,
            write: self.gpa_perms & WRITE != 0,
        }
    }
}

/// A paging domain's mappings by IOVA start, with the bytes they cover kept as they change (so
/// that a gauge never walks the tree).
#[derive(Default)]
pub(super) struct Shadow {
    tree: BTreeMap<u64, Mapping>,
    pub(super) bytes: u128,
}

impl Shadow {
    /// The low GPA bits a mapping keeps its permissions in: a MAP's GPA must have them clear.
    pub(super) const GPA_SPARE_BITS: u64 = PERM_BITS;

    pub(super) fn size(start: u64, m: &Mapping) -> u128 {
        u128::from(m.end - start) + 1
    }

    pub(super) fn insert(&mut self, start: u64, m: Mapping) {
        self.bytes += Self::size(start, &m);
        if let Some(old) = self.tree.insert(start, m) {
            self.bytes -= Self::size(start, &old);
        }
    }

    pub(super) fn remove(&mut self, start: u64) -> Option<Mapping> {
        let m = self.tree.remove(&start)?;
        self.bytes -= Self::size(start, &m);
        Some(m)
    }

    pub(super) fn range<R: std::ops::RangeBounds<u64>>(
        &self,
        r: R,
    ) -> std::collections::btree_map::Range<'_, u64, Mapping> {
        self.tree.range(r)
    }

    pub(super) fn iter(&self) -> std::collections::btree_map::Iter<'_, u64, Mapping> {
        self.tree.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.tree.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_keeps_its_gpa_and_each_permission_apart() {
        for gpa in [0, 0x1000, 0xffff_ffff_ffff_f000] {
            for (read, write) in [(false, false), (true, false), (false, true), (true, true)] {
                let m = Mapping::new(0x1fff, gpa, Perms { read, write });
                assert_eq!(
                    (m.end, m.gpa(), m.perms()),
                    (0x1fff, gpa, Perms { read, write })
                );
            }
        }
        assert_eq!(std::mem::size_of::<Mapping>(), 16);
    }
}
