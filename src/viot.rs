//! ACPI VIOT (Virtual I/O Translation Table) for a virtio-pci IOMMU.
//!
//! This module owns the byte layout of the VIOT table that tells the guest
//! which PCI devices sit behind our vhost-user virtio-iommu and which
//! virtio-iommu endpoint id each of them has. The daemon writes the bytes to a
//! file that QEMU loads with `-acpitable file=viot.bin`; QEMU does not know the
//! vhost-user device is an IOMMU, so it cannot build this table itself.
//! [`Viot::parse`] is the strict inverse of [`Viot::to_bytes`], used to check
//! a table before handing it to a guest.
//!
//! The module is pure: it must never do I/O, never use `unsafe`, and never
//! panic on any input (the decoder in particular is fed untrusted bytes). It
//! knows nothing about the rest of the daemon; callers turn configuration
//! into a [`Viot`] and decide where the bytes go.
//!
//! Layout reference: ACPI Specification 6.5, section 5.2, "Virtual I/O
//! Translation Table (VIOT)" (introduced in ACPI 6.4), and its consumer,
//! Linux `drivers/acpi/viot.c`. All multi-byte fields are little-endian.
//!
//! ```text
//! offset  size  field
//!      0    36  ACPI header: "VIOT", length, revision 0, checksum, OEM ids
//!     36     2  node_count
//!     38     2  node_offset = 48 (first node, from the table start)
//!     40     8  reserved
//!     48    16  virtio-pci IOMMU node (type 3): segment, bdf
//!     64  24*n  PCI range nodes (type 1), each pointing back at offset 48
//! ```
//!
//! Only what a single virtio-pci IOMMU needs is supported: exactly one
//! virtio-pci IOMMU node and single-segment PCI range nodes. MMIO endpoint
//! and virtio-mmio IOMMU nodes are rejected by the decoder rather than
//! silently dropped, so `parse` never returns less than the table says.

use std::fmt;
use std::str::FromStr;

/// Table signature (ACPI header bytes 0..4).
pub const SIGNATURE: [u8; 4] = *b"VIOT";
/// The only VIOT revision defined so far.
pub const REVISION: u8 = 0;
/// OEM id written into the header: "VHost-User IOMmu". Guests ignore it;
/// it only lets a human spot our table in `acpidump` output.
pub const OEM_ID: [u8; 6] = *b"VHUIOM";
/// OEM table id written into the header.
pub const OEM_TABLE_ID: [u8; 8] = *b"VHUIOMMU";
/// OEM revision; bump if the generated layout ever changes.
pub const OEM_REVISION: u32 = 1;
/// Creator (the tool that built the table) id: this daemon.
pub const CREATOR_ID: [u8; 4] = *b"VHUI";
/// Creator revision.
pub const CREATOR_REVISION: u32 = 1;

/// ACPI common header (signature .. creator_revision).
const ACPI_HEADER_LEN: usize = 36;
/// ACPI header plus node_count, node_offset and 8 reserved bytes.
const VIOT_HEADER_LEN: usize = 48;
/// Every node starts with type, reserved, le16 length.
const NODE_HEADER_LEN: usize = 4;

const NODE_PCI_RANGE: u8 = 1;
const NODE_MMIO_ENDPOINT: u8 = 2;
const NODE_VIRTIO_PCI_IOMMU: u8 = 3;
const NODE_VIRTIO_MMIO_IOMMU: u8 = 4;

const PCI_RANGE_LEN: u16 = 24;
const VIRTIO_PCI_IOMMU_LEN: u16 = 16;

/// We always place the IOMMU node first, so every range's output_node is 48.
const IOMMU_NODE_OFFSET: u16 = VIOT_HEADER_LEN as u16;

/// node_count is 16 bits and one node is the IOMMU.
pub const MAX_RANGES: usize = u16::MAX as usize - 1;

/// Errors from building, decoding or parsing VIOT data. Decoder errors name
/// the byte offset (from the table start) of the offending field or node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViotError {
    #[error("invalid PCI address {input:?}: {reason}")]
    InvalidPciAddress { input: String, reason: String },

    #[error("VIOT needs at least one PCI range: no endpoint would be translated")]
    NoRanges,

    #[error(
        "too many PCI ranges ({count}): node_count is 16 bits, so at most {max} fit beside the IOMMU node"
    )]
    TooManyRanges { count: usize, max: usize },

    #[error("PCI range #{index}: bdf_start {start} is after bdf_end {end}")]
    InvertedRange { index: usize, start: Bdf, end: Bdf },

    #[error(
        "PCI ranges #{first} and #{second} overlap on segment {segment:04x}: Linux would silently use only the first for the shared BDFs"
    )]
    OverlappingRanges {
        first: usize,
        second: usize,
        segment: u16,
    },

    #[error("PCI range #{index}: endpoint ids {endpoint_start:#x} + {span:#x} overflow 32 bits")]
    EndpointIdOverflow {
        index: usize,
        endpoint_start: u32,
        span: u32,
    },

    #[error(
        "PCI ranges #{first} and #{second} map devices to the same endpoint ids: an endpoint id must name one device"
    )]
    SharedEndpointIds { first: usize, second: usize },

    #[error("table is {length} bytes, shorter than the {minimum}-byte VIOT header")]
    TooShort { length: usize, minimum: usize },

    #[error("signature at byte offset 0 is \"{found}\", expected \"VIOT\"")]
    BadSignature { found: String },

    #[error("length field at byte offset 4 says {header} bytes but the table is {actual} bytes")]
    LengthMismatch { header: u32, actual: usize },

    #[error("revision at byte offset 8 is {found}, only revision 0 is defined")]
    UnsupportedRevision { found: u8 },

    #[error(
        "table bytes sum to {sum:#04x} mod 256 instead of 0 (checksum byte at offset 9 is {stored:#04x})"
    )]
    BadChecksum { sum: u8, stored: u8 },

    #[error(
        "node_offset at byte offset 38 is {node_offset}, expected 48 (nodes follow the VIOT header)"
    )]
    BadNodeOffset { node_offset: u16 },

    #[error(
        "node at byte offset {offset} is truncated: needs {needed} bytes, only {available} left in the table"
    )]
    TruncatedNode {
        offset: usize,
        needed: usize,
        available: usize,
    },

    #[error(
        "node at byte offset {offset} (type {node_type}) has length {length}, expected {expected}"
    )]
    BadNodeLength {
        offset: usize,
        node_type: u8,
        length: u16,
        expected: u16,
    },

    #[error(
        "node at byte offset {offset} has type {node_type} ({name}), which a virtio-pci IOMMU table does not use"
    )]
    UnsupportedNodeType {
        offset: usize,
        node_type: u8,
        name: &'static str,
    },

    #[error("reserved byte at offset {offset} is {value:#04x}, must be zero")]
    ReservedNotZero { offset: usize, value: u8 },

    #[error(
        "{count} bytes after the last node, from byte offset {offset}: node_count does not cover the table"
    )]
    TrailingBytes { offset: usize, count: usize },

    #[error("no virtio-pci IOMMU node (type 3) in the table")]
    MissingIommuNode,

    #[error(
        "second virtio-pci IOMMU node at byte offset {offset} (first at {first}): only one IOMMU is supported"
    )]
    MultipleIommuNodes { first: usize, offset: usize },

    #[error(
        "PCI range node at byte offset {offset} spans segments {segment_start:04x}..={segment_end:04x}: only single-segment ranges are supported"
    )]
    MultiSegmentRange {
        offset: usize,
        segment_start: u16,
        segment_end: u16,
    },

    #[error(
        "PCI range node at byte offset {offset}: output_node {output_node} is not the virtio-pci IOMMU node (at {iommu_offset})"
    )]
    BadOutputNode {
        offset: usize,
        output_node: u16,
        iommu_offset: usize,
    },

    #[error("PCI range node at byte offset {offset}: {source}")]
    InvalidRangeNode {
        offset: usize,
        source: Box<ViotError>,
    },
}

impl ViotError {
    /// The range a validation error is about (the later one for pairs), so
    /// the decoder can translate it into that range node's byte offset.
    fn range_index(&self) -> Option<usize> {
        match *self {
            ViotError::InvertedRange { index, .. }
            | ViotError::EndpointIdOverflow { index, .. } => Some(index),
            ViotError::OverlappingRanges { second, .. }
            | ViotError::SharedEndpointIds { second, .. } => Some(second),
            _ => None,
        }
    }
}

/// A PCI requester id within a segment: `bus << 8 | device << 3 | function`,
/// the encoding VIOT's bdf fields and Linux's `pci_dev_id()` use.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf(pub u16);

impl Bdf {
    /// Builds a BDF, rejecting device >= 32 and function >= 8 (they would
    /// spill into the neighbouring bit fields).
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Bdf, ViotError> {
        let invalid = |reason: &str| ViotError::InvalidPciAddress {
            input: format!("{bus:02x}:{device:02x}.{function:x}"),
            reason: reason.to_string(),
        };
        if device >= 32 {
            return Err(invalid("device must be below 0x20"));
        }
        if function >= 8 {
            return Err(invalid("function must be below 8"));
        }
        Ok(Bdf((u16::from(bus) << 8)
            | (u16::from(device) << 3)
            | u16::from(function)))
    }

    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }

    pub const fn function(self) -> u8 {
        (self.0 & 0x7) as u8
    }
}

/// `BB:DD.F`, lower-case hex, as `lspci` prints it.
impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// Parses `BB:DD.F` or `0000:BB:DD.F` (hex). A non-zero segment is an error
/// here because a bare [`Bdf`] cannot carry it; use [`parse_pci_address`].
impl FromStr for Bdf {
    type Err = ViotError;

    fn from_str(s: &str) -> Result<Bdf, ViotError> {
        let (segment, bdf) = parse_pci_address(s)?;
        if segment != 0 {
            return Err(ViotError::InvalidPciAddress {
                input: s.to_string(),
                reason: format!(
                    "segment {segment:04x} is not 0000; use parse_pci_address to keep the segment"
                ),
            });
        }
        Ok(bdf)
    }
}

/// Parses `BB:DD.F` (segment 0) or `SSSS:BB:DD.F`, all hex, with the daemon's one PCI-address
/// parser (`vfio::PciAddress`: bus 1-2 digits, device 1-2 (< 0x20), function 1 (< 8)); the
/// segment must fit the VIOT's 16 bits. Signs, spaces and `0x` prefixes are rejected so a typo
/// cannot name a different device.
pub fn parse_pci_address(s: &str) -> Result<(u16, Bdf), ViotError> {
    let invalid = |reason: String| ViotError::InvalidPciAddress {
        input: s.to_string(),
        reason,
    };
    // One parser of PCI addresses for the whole daemon (`vfio::PciAddress`); the VIOT narrows
    // the domain to its 16-bit PCI segment.
    let addr: crate::vfio::PciAddress = s.parse().map_err(|e: crate::vfio::VfioError| {
        invalid(match e {
            crate::vfio::VfioError::BadAddress { reason, .. } => reason,
            other => other.to_string(),
        })
    })?;
    let segment = u16::try_from(addr.domain)
        .map_err(|_| invalid(format!("segment {:x} does not fit 16 bits", addr.domain)))?;
    Ok((segment, Bdf::new(addr.bus, addr.device, addr.function)?))
}

/// Devices `bdf_start..=bdf_end` on `segment` are endpoints
/// `endpoint_start + (bdf - bdf_start)` of the IOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciRange {
    pub endpoint_start: u32,
    pub segment: u16,
    pub bdf_start: Bdf,
    pub bdf_end: Bdf,
}

impl PciRange {
    fn contains(&self, segment: u16, bdf: Bdf) -> bool {
        segment == self.segment && self.bdf_start <= bdf && bdf <= self.bdf_end
    }
}

/// One virtio-pci IOMMU and the PCI ranges it translates.
///
/// The IOMMU's own BDF may fall inside a range (a whole-bus range is the
/// natural way to write "everything on bus 0"): Linux refuses to translate the
/// IOMMU through itself, and [`Viot::endpoint_id`] mirrors that by returning
/// `None` for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viot {
    pub iommu_segment: u16,
    pub iommu_bdf: Bdf,
    pub ranges: Vec<PciRange>,
}

impl Viot {
    /// One single-BDF range per endpoint, mapping that BDF to exactly the
    /// given endpoint id. Not validated here; [`Viot::to_bytes`] rejects
    /// duplicate BDFs or endpoint ids.
    pub fn single_endpoints(
        iommu_segment: u16,
        iommu_bdf: Bdf,
        endpoints: &[(u32, u16, Bdf)],
    ) -> Viot {
        Viot {
            iommu_segment,
            iommu_bdf,
            ranges: endpoints
                .iter()
                .map(|&(endpoint_start, segment, bdf)| PciRange {
                    endpoint_start,
                    segment,
                    bdf_start: bdf,
                    bdf_end: bdf,
                })
                .collect(),
        }
    }

    /// The endpoint id Linux (`viot_pci_dev_iommu_init`) gives `segment:bdf`:
    /// `((segment - segment_start) << 16) + (bdf - bdf_start) + endpoint_start`
    /// from the first range covering it, in table order. Our ranges are
    /// single-segment, so the segment term is always 0. `None` if no range
    /// covers the device, if it is the IOMMU itself (Linux skips it), or if
    /// the id would overflow (only possible on a `Viot` that `to_bytes`
    /// would reject).
    pub fn endpoint_id(&self, segment: u16, bdf: Bdf) -> Option<u32> {
        if segment == self.iommu_segment && bdf == self.iommu_bdf {
            return None;
        }
        let range = self.ranges.iter().find(|r| r.contains(segment, bdf))?;
        range
            .endpoint_start
            .checked_add(u32::from(bdf.0 - range.bdf_start.0))
    }

    /// Checks what a guest cannot be trusted to cope with: no ranges, inverted
    /// or overlapping BDF ranges (Linux would silently use the first match),
    /// endpoint ids that wrap past `u32::MAX` or are shared by two devices
    /// (virtio-iommu attaches by endpoint id, so two devices with one id
    /// could not be put in different domains), and more nodes than the
    /// 16-bit node_count can count.
    fn validate(&self) -> Result<(), ViotError> {
        if self.ranges.is_empty() {
            return Err(ViotError::NoRanges);
        }
        if self.ranges.len() > MAX_RANGES {
            return Err(ViotError::TooManyRanges {
                count: self.ranges.len(),
                max: MAX_RANGES,
            });
        }
        // Inclusive endpoint id interval of each range, checked for overflow.
        let mut endpoint_ends = Vec::with_capacity(self.ranges.len());
        for (index, range) in self.ranges.iter().enumerate() {
            if range.bdf_start > range.bdf_end {
                return Err(ViotError::InvertedRange {
                    index,
                    start: range.bdf_start,
                    end: range.bdf_end,
                });
            }
            let span = u32::from(range.bdf_end.0 - range.bdf_start.0);
            let end =
                range
                    .endpoint_start
                    .checked_add(span)
                    .ok_or(ViotError::EndpointIdOverflow {
                        index,
                        endpoint_start: range.endpoint_start,
                        span,
                    })?;
            endpoint_ends.push(end);
        }

        // Sorting by start makes any overlap show up between neighbours, so
        // this stays O(n log n) even for 65534 ranges.
        let mut order: Vec<usize> = (0..self.ranges.len()).collect();
        order.sort_by_key(|&i| (self.ranges[i].segment, self.ranges[i].bdf_start));
        for pair in order.windows(2) {
            let (a, b) = (&self.ranges[pair[0]], &self.ranges[pair[1]]);
            if a.segment == b.segment && b.bdf_start <= a.bdf_end {
                return Err(ViotError::OverlappingRanges {
                    first: pair[0].min(pair[1]),
                    second: pair[0].max(pair[1]),
                    segment: a.segment,
                });
            }
        }

        order.sort_by_key(|&i| self.ranges[i].endpoint_start);
        for pair in order.windows(2) {
            if self.ranges[pair[1]].endpoint_start <= endpoint_ends[pair[0]] {
                return Err(ViotError::SharedEndpointIds {
                    first: pair[0].min(pair[1]),
                    second: pair[0].max(pair[1]),
                });
            }
        }
        Ok(())
    }

    /// Validates and encodes the table: the IOMMU node at offset 48, then one
    /// PCI range node per range in order (Linux matches ranges in table
    /// order), checksum fixed up last.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ViotError> {
        self.validate()?;
        let length = VIOT_HEADER_LEN
            + usize::from(VIRTIO_PCI_IOMMU_LEN)
            + self.ranges.len() * usize::from(PCI_RANGE_LEN);
        // validate() capped ranges at MAX_RANGES, so both fit (length < 1.6 MB).
        let node_count = (self.ranges.len() + 1) as u16;
        let mut t = Vec::with_capacity(length);

        t.extend_from_slice(&SIGNATURE);
        t.extend_from_slice(&(length as u32).to_le_bytes());
        t.push(REVISION);
        t.push(0); // checksum, fixed below
        t.extend_from_slice(&OEM_ID);
        t.extend_from_slice(&OEM_TABLE_ID);
        t.extend_from_slice(&OEM_REVISION.to_le_bytes());
        t.extend_from_slice(&CREATOR_ID);
        t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
        debug_assert_eq!(t.len(), ACPI_HEADER_LEN);

        t.extend_from_slice(&node_count.to_le_bytes());
        t.extend_from_slice(&IOMMU_NODE_OFFSET.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        debug_assert_eq!(t.len(), usize::from(IOMMU_NODE_OFFSET));

        t.push(NODE_VIRTIO_PCI_IOMMU);
        t.push(0);
        t.extend_from_slice(&VIRTIO_PCI_IOMMU_LEN.to_le_bytes());
        t.extend_from_slice(&self.iommu_segment.to_le_bytes());
        t.extend_from_slice(&self.iommu_bdf.0.to_le_bytes());
        t.extend_from_slice(&[0; 8]);

        for range in &self.ranges {
            t.push(NODE_PCI_RANGE);
            t.push(0);
            t.extend_from_slice(&PCI_RANGE_LEN.to_le_bytes());
            t.extend_from_slice(&range.endpoint_start.to_le_bytes());
            t.extend_from_slice(&range.segment.to_le_bytes()); // segment_start
            t.extend_from_slice(&range.segment.to_le_bytes()); // segment_end
            t.extend_from_slice(&range.bdf_start.0.to_le_bytes());
            t.extend_from_slice(&range.bdf_end.0.to_le_bytes());
            t.extend_from_slice(&IOMMU_NODE_OFFSET.to_le_bytes());
            t.extend_from_slice(&[0; 6]);
        }
        debug_assert_eq!(t.len(), length);

        t[9] = 0u8.wrapping_sub(byte_sum(&t));
        Ok(t)
    }
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

mod decode;

#[cfg(test)]
mod tests;
