//! Identifiers and address ranges shared by every stage of the request path.
//!
//! Newtypes keep a domain id from being passed where an endpoint id belongs, and [`IovaRange`]
//! can only be built inclusive and non-wrapping, so overflow is impossible downstream.

use std::fmt;

/// A guest-chosen domain id (an address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u32);

/// A guest-visible endpoint id (from the VIOT table: one per assigned device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub u32);

/// `Display` for a newtype: the value with what it is in front ("domain 3", "IOVA 0x1000").
macro_rules! display_as {
    ($($ty:ty => $fmt:literal;)*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    )*};
}

display_as! {
    DomainId => "domain {}";
    EndpointId => "endpoint {}";
    Iova => "IOVA {:#x}";
    Gpa => "GPA {:#x}";
}

/// An I/O virtual address: what a device puts on the bus inside a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Iova(pub u64);

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

/// `{:x}` of an address is its number's.
macro_rules! lower_hex {
    ($($ty:ty),*) => {$(
        impl fmt::LowerHex for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    )*};
}

lower_hex!(Iova, Gpa);

/// Which address space a [`Range`] is in: the type parameter that keeps an IOVA range from
/// being passed where a guest-physical one belongs.
pub trait AddressSpace: Copy {}

/// Marks [`IovaRange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IovaSpace {}
impl AddressSpace for IovaSpace {}

/// Marks [`GpaRange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GpaSpace {}
impl AddressSpace for GpaSpace {}

/// An inclusive, non-empty range of 64-bit addresses `[start, end]` in one address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range<S: AddressSpace> {
    start: u64,
    end: u64,
    space: std::marker::PhantomData<S>,
}

/// A range of I/O virtual addresses.
pub type IovaRange = Range<IovaSpace>;
/// A range of guest-physical addresses.
pub type GpaRange = Range<GpaSpace>;

impl<S: AddressSpace> Range<S> {
    /// `None` when `end < start`.
    pub fn new(start: u64, end: u64) -> Option<Self> {
        (start <= end).then_some(Range {
            start,
            end,
            space: std::marker::PhantomData,
        })
    }

    /// `None` when `len` is 0 or the range would pass the end of the address space.
    pub fn with_len(start: u64, len: u64) -> Option<Self> {
        let end = start.checked_add(len.checked_sub(1)?)?;
        Self::new(start, end)
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// Length in bytes; `None` only for the whole 64-bit space, whose length is 2^64.
    #[allow(clippy::len_without_is_empty)] // a range is never empty by construction
    pub fn len(&self) -> Option<u64> {
        (self.end - self.start).checked_add(1)
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    pub fn contains(&self, other: &Self) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub fn contains_addr(&self, a: u64) -> bool {
        self.start <= a && a <= self.end
    }
}

impl IovaRange {
    /// The IOVAs `[start, end]` of a request.
    pub fn of(start: Iova, end: Iova) -> Option<Self> {
        Self::new(start.0, end.0)
    }
}

impl GpaRange {
    /// `len` bytes of guest-physical memory from `start`.
    pub fn at(start: Gpa, len: u64) -> Option<Self> {
        Self::with_len(start.0, len)
    }

    /// The IOVAs equal to these guest-physical addresses: what an identity (bypass) domain
    /// maps them at.
    pub fn identity(self) -> IovaRange {
        Range {
            start: self.start,
            end: self.end,
            space: std::marker::PhantomData,
        }
    }
}

impl<S: AddressSpace> fmt::Display for Range<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.end)
    }
}

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
}

impl Perms {
    pub const RW: Perms = Perms {
        read: true,
        write: true,
    };
    pub const RO: Perms = Perms {
        read: true,
        write: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_inclusive_and_cannot_wrap() {
        assert!(IovaRange::new(5, 4).is_none());
        assert_eq!(IovaRange::new(0, 0xfff).unwrap().len(), Some(0x1000));
        assert_eq!(IovaRange::new(0, u64::MAX).unwrap().len(), None);
        assert!(IovaRange::with_len(u64::MAX, 2).is_none());
        assert!(IovaRange::with_len(1, 0).is_none());
        assert_eq!(IovaRange::with_len(u64::MAX, 1).unwrap().end(), u64::MAX);
    }

    #[test]
    fn overlap_and_containment_use_inclusive_ends() {
        let a = IovaRange::new(0x1000, 0x1fff).unwrap();
        let b = IovaRange::new(0x1fff, 0x2fff).unwrap();
        let c = IovaRange::new(0x2000, 0x2fff).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(IovaRange::new(0, u64::MAX).unwrap().contains(&a));
        assert!(!a.contains(&b));
    }
}
