//! DEVICE_GET_REGION_INFO and the region capability chain (sparse mmap, type, MSI-X
//! mappable).

use super::*;

/// One capability of a region's capability chain: its id, version and the bytes after its
/// 8-byte header (`struct vfio_info_cap_header`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionCap {
    pub id: u16,
    pub version: u16,
    pub body: Vec<u8>,
}

/// One mmappable area of a region, relative to the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

impl SparseArea {
    pub const fn new(offset: u64, size: u64) -> SparseArea {
        SparseArea { offset, size }
    }
}

impl RegionCap {
    /// A SPARSE_MMAP capability (version 1) listing `areas`.
    pub fn sparse_mmap(areas: &[SparseArea]) -> RegionCap {
        let mut body = Vec::with_capacity(8 + 16 * areas.len());
        body.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for a in areas {
            body.extend_from_slice(&a.offset.to_ne_bytes());
            body.extend_from_slice(&a.size.to_ne_bytes());
        }
        RegionCap {
            id: VFIO_REGION_INFO_CAP_SPARSE_MMAP,
            version: 1,
            body,
        }
    }

    /// The areas of a SPARSE_MMAP capability; `None` for other capabilities or a body too
    /// short for its `nr_areas`.
    pub fn sparse_areas(&self) -> Option<Vec<SparseArea>> {
        if self.id != VFIO_REGION_INFO_CAP_SPARSE_MMAP || self.body.len() < 8 {
            return None;
        }
        let n = u32_at(&self.body, 0) as usize;
        let need = n.checked_mul(16)?.checked_add(8)?;
        if self.body.len() < need {
            return None;
        }
        Some(
            (0..n)
                .map(|i| SparseArea {
                    offset: u64_at(&self.body, 8 + 16 * i),
                    size: u64_at(&self.body, 16 + 16 * i),
                })
                .collect(),
        )
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says about a region.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the region fd (VFIO: `index << 40`), used verbatim as the mmap
    /// offset by the client.
    pub offset: u64,
    /// The capability chain, in order (without the CAPS flag's bookkeeping).
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    pub fn cap(&self, id: u16) -> Option<&RegionCap> {
        self.caps.iter().find(|c| c.id == id)
    }
}

/// Parses a capability chain out of `buf` (a whole `vfio_region_info` reply, offsets relative
/// to its start) beginning at `first`. Each `next` must point past the current capability
/// (so the walk ends); a capability's body runs to the next one, the last one's to the end.
pub fn parse_cap_chain(buf: &[u8], first: u32) -> Result<Vec<RegionCap>, Errno> {
    let mut caps = Vec::new();
    let mut off = first as usize;
    while off != 0 {
        if off < REGION_INFO_SIZE || off.checked_add(8).is_none_or(|e| e > buf.len()) {
            return Err(einval("region capability outside the reply"));
        }
        let id = u16_at(buf, off);
        let version = u16_at(buf, off + 2);
        let next = u32_at(buf, off + 4) as usize;
        let end = if next == 0 {
            buf.len()
        } else if next >= off + 8 && next <= buf.len() {
            next
        } else {
            return Err(einval("region capability chain is malformed"));
        };
        caps.push(RegionCap {
            id,
            version,
            body: buf[off + 8..end].to_vec(),
        });
        off = next;
    }
    Ok(caps)
}

/// Encodes `caps` as a chain placed at `base` (relative to the info struct), each
/// capability 8-byte aligned, the last one's `next` 0.
pub fn encode_cap_chain(base: usize, caps: &[RegionCap]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in caps.iter().enumerate() {
        let start = out.len();
        let len = (8 + c.body.len()).next_multiple_of(8);
        let next = if i + 1 == caps.len() {
            0
        } else {
            (base + start + len) as u32
        };
        out.extend_from_slice(&c.id.to_ne_bytes());
        out.extend_from_slice(&c.version.to_ne_bytes());
        out.extend_from_slice(&next.to_ne_bytes());
        out.extend_from_slice(&c.body);
        out.resize(start + len, 0);
    }
    out
}

/// A DEVICE_GET_REGION_INFO request: the reply room the client offers and the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfoReq {
    pub argsz: u32,
    pub index: u32,
}

pub fn decode_region_info_req(p: &[u8]) -> Result<RegionInfoReq, Errno> {
    if p.len() < REGION_INFO_SIZE {
        return Err(einval(
            "DEVICE_GET_REGION_INFO payload shorter than 32 bytes",
        ));
    }
    let r = RegionInfoReq {
        argsz: u32_at(p, 0),
        index: u32_at(p, 8),
    };
    if (r.argsz as usize) < REGION_INFO_SIZE {
        return Err(einval(
            "DEVICE_GET_REGION_INFO argsz smaller than the struct",
        ));
    }
    Ok(r)
}

/// The region-info reply payload for a client that offered `argsz` bytes: the full struct
/// and capability chain if it fits, else the bare struct whose `argsz` says what is needed
/// (without the CAPS flag, so a client that checks `cap_offset` does not reject the short
/// answer). Returns the payload and whether it is the full answer.
pub fn encode_region_info(index: u32, info: &RegionInfo, argsz: u32) -> (Vec<u8>, bool) {
    let chain = encode_cap_chain(REGION_INFO_SIZE, &info.caps);
    let needed = REGION_INFO_SIZE + chain.len();
    let full = needed <= argsz as usize;
    let mut flags = info.flags & !VFIO_REGION_INFO_FLAG_CAPS;
    let mut cap_offset = 0u32;
    if full && !chain.is_empty() {
        flags |= VFIO_REGION_INFO_FLAG_CAPS;
        cap_offset = REGION_INFO_SIZE as u32;
    }
    let mut out = Vec::with_capacity(if full { needed } else { REGION_INFO_SIZE });
    out.extend_from_slice(&(needed as u32).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&index.to_ne_bytes());
    out.extend_from_slice(&cap_offset.to_ne_bytes());
    out.extend_from_slice(&info.size.to_ne_bytes());
    out.extend_from_slice(&info.offset.to_ne_bytes());
    if full {
        out.extend_from_slice(&chain);
    }
    (out, full)
}
