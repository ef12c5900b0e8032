//! A paging domain's shadow: its mappings by IOVA start, as the host holds them.

use std::collections::BTreeMap;

use crate::guest_ram::HostLocation;
use crate::ids::Perms;

/// One mapping: the IOVAs from its key to `end`, onto guest RAM from `gpa`.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) end: u64,
    pub(super) gpa: u64,
    pub(super) perms: Perms,
    pub(super) host: HostLocation,
}

/// A paging domain's mappings by IOVA start, with the bytes they cover kept as they change (so
/// that a gauge never walks the tree).
#[derive(Default)]
pub(super) struct Shadow {
    tree: BTreeMap<u64, Mapping>,
    pub(super) bytes: u128,
}

impl Shadow {
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
