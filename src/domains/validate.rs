//! The pure half of MAP and UNMAP (§5.13.6.4, §5.13.6.5): a request checked against a paging
//! domain's shadow becomes the operation the backend is to execute, or the guest's rejection.
//! No backend handle, no counter, no log: the table commits what these return once the backend
//! has done it.

use super::shadow::Shadow;
use super::*;
use crate::backend::MapOp;
use crate::guest_ram::GuestRam;
use crate::ids::{GpaRange, Iova, Perms};
use crate::protocol::{MapFlags, MapRequest};

/// The flags alone, checked before the domain is looked up (an unknown bit is INVAL whatever
/// the domain).
pub fn map_flags(flags: MapFlags) -> Result<(), Rejection> {
    match flags.unknown() {
        0 => Ok(()),
        unknown => Err(Rejection::rule(Status::Inval, Rule::UnknownFlags(unknown))),
    }
}

/// A MAP of `[start, end]` to `gpa` in a paging domain holding `maps`, checked completely:
/// the operation for the backend. `held` is how many mappings the caps already count.
pub fn map(
    rules: &Rules,
    ram: &GuestRam,
    maps: &Shadow,
    held: usize,
    m: &MapRequest,
) -> Result<MapOp, Rejection> {
    let MapRequest {
        virt_start: start,
        virt_end: end,
        phys_start: gpa,
        flags,
        ..
    } = *m;
    if flags.mmio() {
        return Err(Rejection::rule(Status::Unsupp, Rule::Mmio));
    }
    let iova = IovaRange::of(start, end).ok_or_else(|| bad_range(start, end))?;
    // At least 4-byte alignment whatever the granule (every IOMMU's smallest page is 4 KiB):
    // the shadow keeps a mapping's permissions in its GPA's two low bits.
    for a in [start.0, gpa.0, end.0.wrapping_add(1)] {
        if a & (rules.granule_mask | Shadow::GPA_SPARE_BITS) != 0 {
            return Err(Rejection::rule(Status::Range, Rule::Misaligned(a)));
        }
    }
    if !rules.input_range.contains(&iova) {
        return Err(Rejection::rule(
            Status::Range,
            Rule::OutsideInputRange(iova),
        ));
    }
    if let Some((_, m)) = maps.range(..=end.0).next_back()
        && m.end >= start.0
    {
        return Err(Rejection::rule(Status::Inval, Rule::Overlap(iova)));
    }
    if rules.overlaps_reserved(&iova) {
        return Err(Rejection::rule(Status::Inval, Rule::Reserved(iova)));
    }
    // The whole 64-bit space cannot be RAM, so a length that does not fit is simply not RAM.
    let not_ram = || Rejection::rule(Status::Fault, Rule::NotGuestRam(gpa.0));
    let gpas = iova
        .len()
        .and_then(|len| GpaRange::at(gpa, len))
        .ok_or_else(not_ram)?;
    let host = ram.locate(&gpas).ok_or_else(not_ram)?;
    if maps.len() >= rules.limits.max_mappings_per_domain || held >= rules.limits.max_mappings_total
    {
        return Err(Rejection::rule(Status::NoMem, Rule::TooManyMappings));
    }
    Ok(MapOp {
        iova,
        gpa: gpa.0,
        host,
        perms: Perms {
            read: flags.read(),
            write: flags.write(),
        },
    })
}

/// What a valid UNMAP removes: the mappings it covers, first to last.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmapping {
    /// The range holds no mapping (OK: holes are fine).
    Nothing,
    /// One mapping: the common case, with no list to build on the request path.
    One(IovaRange),
    Many(Vec<IovaRange>),
}

/// An UNMAP of `[start, end]` in a paging domain holding `maps`: all or nothing, so a mapping
/// the range would split is RANGE and nothing is removed.
pub fn unmap(maps: &Shadow, start: Iova, end: Iova) -> Result<Unmapping, Rejection> {
    let range = IovaRange::of(start, end).ok_or_else(|| bad_range(start, end))?;
    let split = || Rejection::rule(Status::Range, Rule::Split(range));
    // A mapping that starts before the range and reaches into it would be split.
    if let Some((_, m)) = maps.range(..start.0).next_back()
        && m.end >= start.0
    {
        return Err(split());
    }
    // So would the last mapping starting inside the range if it ends past it.
    if let Some((_, m)) = maps.range(start.0..=end.0).next_back()
        && m.end > end.0
    {
        return Err(split());
    }
    let mut covered = maps
        .range(start.0..=end.0)
        .map(|(&s, m)| IovaRange::new(s, m.end).expect("stored mappings are valid"));
    Ok(match (covered.next(), covered.next()) {
        (None, _) => Unmapping::Nothing,
        (Some(one), None) => Unmapping::One(one),
        (Some(a), Some(b)) => Unmapping::Many([a, b].into_iter().chain(covered).collect()),
    })
}

fn bad_range(start: Iova, end: Iova) -> Rejection {
    Rejection::rule(
        Status::Range,
        Rule::BadRange {
            start: start.0,
            end: end.0,
        },
    )
}

#[cfg(test)]
mod tests {
    //! The validate step alone, against the spec's own examples (§5.13.6.4, §5.13.6.5): no
    //! backend is involved, so what is checked is the decision and nothing else.

    use super::super::shadow::Mapping;
    use super::super::tests::{RAM, ram, rules};
    use super::*;

    const PAGE: u64 = 0x1000;

    /// A MAP of `[s, e]` to `gpa` (the domain plays no part in the decision).
    fn req((s, e): (Iova, Iova), gpa: u64, flags: MapFlags) -> MapRequest {
        MapRequest {
            domain: crate::ids::DomainId(1),
            virt_start: s,
            virt_end: e,
            phys_start: crate::ids::Gpa(gpa),
            flags,
        }
    }

    /// A shadow holding `[start, end]` pairs (page numbers) mapped 1:1.
    fn shadow(pages: &[(u64, u64)]) -> Shadow {
        let mut s = Shadow::default();
        for &(a, b) in pages {
            s.insert(
                a * PAGE,
                Mapping::new((b + 1) * PAGE - 1, a * PAGE, Perms::RW),
            );
        }
        s
    }

    /// `[a, b]` in pages, as an UNMAP or MAP names it.
    fn pages(a: u64, b: u64) -> (Iova, Iova) {
        (Iova(a * PAGE), Iova((b + 1) * PAGE - 1))
    }

    fn range(a: u64, b: u64) -> IovaRange {
        IovaRange::new(a * PAGE, (b + 1) * PAGE - 1).unwrap()
    }

    fn status<T>(r: Result<T, Rejection>) -> Status {
        r.err().map_or(Status::Ok, |r| r.status)
    }

    #[test]
    fn unmap_follows_the_specs_examples() {
        // MAP [0,9], MAP [10,19]; UNMAP [0,9] removes the first only.
        let (a, b) = pages(0, 9);
        assert_eq!(
            unmap(&shadow(&[(0, 9), (10, 19)]), a, b),
            Ok(Unmapping::One(range(0, 9)))
        );
        // MAP [0,4], MAP [5,9]; UNMAP [0,9] removes both.
        assert_eq!(
            unmap(&shadow(&[(0, 4), (5, 9)]), a, b),
            Ok(Unmapping::Many(vec![range(0, 4), range(5, 9)]))
        );
        // MAP [0,9]; UNMAP [0,4] would split it: RANGE, nothing removed.
        let (c, d) = pages(0, 4);
        assert_eq!(status(unmap(&shadow(&[(0, 9)]), c, d)), Status::Range);
        // ... and so would UNMAP [5,14] from its other side.
        let (e, f) = pages(5, 14);
        assert_eq!(status(unmap(&shadow(&[(0, 9)]), e, f)), Status::Range);
        // MAP [0,4], MAP [10,14]; UNMAP [0,14] removes both, the hole between is fine.
        let (g, h) = pages(0, 14);
        assert_eq!(
            unmap(&shadow(&[(0, 4), (10, 14)]), g, h),
            Ok(Unmapping::Many(vec![range(0, 4), range(10, 14)]))
        );
        // UNMAP over nothing is OK and removes nothing.
        assert_eq!(unmap(&shadow(&[]), a, b), Ok(Unmapping::Nothing));
        // A reversed range is RANGE.
        assert_eq!(status(unmap(&shadow(&[]), b, a)), Status::Range);
    }

    #[test]
    fn a_gpa_the_shadow_could_not_pack_is_refused_whatever_the_granule() {
        let rules = Rules {
            granule_mask: 0,
            ..rules()
        };
        let ram = ram();
        let m = |gpa: u64| {
            status(map(
                &rules,
                &ram,
                &shadow(&[]),
                0,
                &req((Iova(0x4000), Iova(0x4fff)), gpa, MapFlags::RW),
            ))
        };
        assert_eq!(m(0x1002), Status::Range);
        assert_eq!(m(0x1001), Status::Range);
        assert_eq!(m(0x1004), Status::Ok);
    }

    #[test]
    fn map_decides_every_status_without_a_backend() {
        let (rules, ram) = (rules(), ram());
        let rw = MapFlags::RW;
        let m = |maps: &Shadow, held, range, gpa, flags| {
            status(map(&rules, &ram, maps, held, &req(range, gpa, flags)))
        };
        let empty = shadow(&[]);
        assert_eq!(m(&empty, 0, pages(0, 0), 0, rw), Status::Ok);
        assert_eq!(m(&empty, 0, pages(0, 0), 0, MapFlags::MMIO), Status::Unsupp);
        assert_eq!(m(&empty, 0, (Iova(1), Iova(PAGE)), 0, rw), Status::Range);
        assert_eq!(m(&empty, 0, pages(1, 0), 0, rw), Status::Range);
        assert_eq!(m(&empty, 0, pages(0, 0), 1, rw), Status::Range);
        assert_eq!(m(&empty, 0, pages(1 << 36, 1 << 36), 0, rw), Status::Range);
        assert_eq!(m(&shadow(&[(3, 5)]), 1, pages(5, 6), 0, rw), Status::Inval);
        assert_eq!(m(&shadow(&[(3, 5)]), 1, pages(6, 6), 0, rw), Status::Ok);
        let msi = 0xfee0_0000 / PAGE;
        assert_eq!(m(&empty, 0, pages(msi, msi), 0, rw), Status::Inval);
        assert_eq!(m(&empty, 0, pages(0, 0), RAM, rw), Status::Fault);
        assert_eq!(m(&empty, 0, pages(0, 0), !(PAGE - 1), rw), Status::Fault);
        // The caps of `rules()`: 8 mappings a domain, 12 in all.
        let full: Vec<(u64, u64)> = (0..8).map(|p| (p, p)).collect();
        assert_eq!(m(&shadow(&full), 8, pages(9, 9), 0, rw), Status::NoMem);
        assert_eq!(m(&shadow(&[(0, 0)]), 12, pages(9, 9), 0, rw), Status::NoMem);
        assert_eq!(m(&shadow(&[(0, 0)]), 11, pages(9, 9), 0, rw), Status::Ok);
        assert_eq!(status(map_flags(MapFlags(8))), Status::Inval);
        assert_eq!(status(map_flags(MapFlags::RW)), Status::Ok);
    }

    #[test]
    fn a_valid_map_carries_the_permissions_and_the_host_location() {
        let op = map(
            &rules(),
            &ram(),
            &shadow(&[]),
            0,
            &req((Iova(PAGE), Iova(2 * PAGE - 1)), 3 * PAGE, MapFlags::READ),
        )
        .unwrap();
        assert_eq!(op.iova, range(1, 1));
        assert_eq!(op.gpa, 3 * PAGE);
        assert_eq!(op.perms, Perms::RO);
        assert_eq!(op.host.host_addr, 0x7000_0000_0000 + 3 * PAGE);
    }
}
