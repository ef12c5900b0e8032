use super::*;

fn resv(kind: ResvKind, start: u64, end: u64) -> ResvMem {
    ResvMem { kind, start, end }
}

#[test]
fn intel_like_ranges_become_a_granule_a_span_and_an_msi_window() {
    // What an intel-iommu (39-bit) device reports: everything but the MSI window.
    let c =
        constraints_from_ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)], 4096).unwrap();
    assert_eq!(c.page_size_mask, !0xfff);
    assert_eq!(c.input_range, IovaRange::new(0, (1 << 39) - 1).unwrap());
    assert_eq!(
        c.reserved,
        vec![resv(ResvKind::Msi, 0xfee0_0000, 0xfeef_ffff)]
    );
}

#[test]
fn holes_become_reserved_and_are_split_around_the_msi_window() {
    let c = constraints_from_ranges(
        &[
            (0x10_0000, 0x7fff_ffff),
            (0x1_0000_0000, u64::MAX),
            (0x8000_1000, 0xfed0_0fff),
        ],
        1,
    )
    .unwrap();
    assert_eq!(c.page_size_mask, !0xfff);
    assert_eq!(c.input_range, IovaRange::new(0x10_0000, u64::MAX).unwrap());
    assert_eq!(
        c.reserved,
        vec![
            resv(ResvKind::Reserved, 0x8000_0000, 0x8000_0fff),
            resv(ResvKind::Reserved, 0xfed0_1000, 0xfedf_ffff),
            resv(ResvKind::Msi, 0xfee0_0000, 0xfeef_ffff),
            resv(ResvKind::Reserved, 0xfef0_0000, 0xffff_ffff),
        ]
    );
}

#[test]
fn the_full_space_and_coarse_alignment() {
    let c = constraints_from_ranges(&[(0, u64::MAX)], 0x1_0000).unwrap();
    assert_eq!(c.page_size_mask, !0xffff);
    assert_eq!(c.input_range, IovaRange::new(0, u64::MAX).unwrap());
    assert_eq!(c.reserved.len(), 1);
    // Unaligned ends are trimmed to whole granules.
    let c = constraints_from_ranges(&[(0x123, 0x5_0122)], 4096).unwrap();
    assert_eq!(c.input_range, IovaRange::new(0x1000, 0x4_ffff).unwrap());
}

#[test]
fn bad_reports_are_refused() {
    assert!(constraints_from_ranges(&[], 4096).is_err());
    assert!(constraints_from_ranges(&[(0, 0xfff), (0x800, 0x1fff)], 4096).is_err());
    assert!(constraints_from_ranges(&[(0x10, 0x20)], 4096).is_err());
    assert!(constraints_from_ranges(&[(5, 4)], 4096).is_err());
}

#[test]
fn memlock_hint_names_the_limit_and_the_need() {
    let h = memlock_hint(0x100_0000, 0x1000);
    assert!(h.contains("RLIMIT_MEMLOCK"), "{h}");
    assert!(h.contains(&format!("{}", 0x100_1000)), "{h}");
    assert!(h.contains("CAP_IPC_LOCK"), "{h}");
}

#[test]
fn open_names_the_node_that_is_missing() {
    let e = IommufdBackend::open_with(Path::new("/nonexistent/iommu"), &[], false)
        .err()
        .expect("no such node");
    assert!(e.to_string().contains("/nonexistent/iommu"), "{e}");
    assert_eq!(e.errno(), Some(libc::ENOENT));
}
