//! What the host IOMMU allows, as the guest is told it (pure: no ioctl).

use super::*;

/// Turns what `IOMMU_IOAS_IOVA_RANGES` reported into what the guest is told: the granule from
/// `out_iova_alignment` (at least 4 KiB), the input range spanning the allowed ranges (trimmed to
/// whole granules), every hole between them as RESV_MEM RESERVED (minus the MSI window) and the
/// x86 MSI window as RESV_MEM MSI.
pub fn constraints_from_ranges(
    ranges: &[(u64, u64)],
    alignment: u64,
) -> std::result::Result<HostConstraints, String> {
    let granule = alignment
        .max(MIN_GRANULE)
        .checked_next_power_of_two()
        .ok_or_else(|| format!("IOVA alignment {alignment:#x} is not a page size"))?;
    let mut sorted: Vec<(u64, u64)> = ranges.to_vec();
    sorted.sort_unstable();
    for &(s, l) in &sorted {
        if l < s {
            return Err(format!("IOVA range {s:#x}..={l:#x} is reversed"));
        }
    }
    for w in sorted.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(format!(
                "IOVA ranges {:#x}..={:#x} and {:#x}..={:#x} overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
    }
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return Err("no allowed IOVA range".into());
    };
    let mask = granule - 1;
    let start = first
        .0
        .checked_add(mask)
        .map(|s| s & !mask)
        .ok_or("input range start overflows")?;
    let end = match last.1.checked_add(1) {
        None => u64::MAX,
        Some(e) => (e & !mask)
            .checked_sub(1)
            .ok_or("input range is smaller than a granule")?,
    };
    let input_range = IovaRange::new(start, end)
        .ok_or_else(|| format!("allowed IOVAs hold no whole {granule:#x}-byte page"))?;

    let msi = (X86_MSI_WINDOW.0, X86_MSI_WINDOW.1);
    let mut reserved = Vec::new();
    for w in sorted.windows(2) {
        let (hs, he) = (w[0].1 + 1, w[1].0 - 1);
        // Split the hole around the MSI window, which is reported with its own type.
        if he < msi.0 || hs > msi.1 {
            reserved.push((hs, he));
        } else {
            if hs < msi.0 {
                reserved.push((hs, msi.0 - 1));
            }
            if he > msi.1 {
                reserved.push((msi.1 + 1, he));
            }
        }
    }
    let mut out: Vec<ResvMem> = reserved
        .into_iter()
        .map(|(start, end)| ResvMem {
            kind: ResvKind::Reserved,
            start,
            end,
        })
        .collect();
    out.push(ResvMem {
        kind: ResvKind::Msi,
        start: msi.0,
        end: msi.1,
    });
    out.sort_by_key(|r| r.start);
    Ok(HostConstraints {
        page_size_mask: !mask,
        input_range,
        reserved: out,
    })
}
