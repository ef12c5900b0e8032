//! The decoder: bytes from anywhere (QEMU's table, a file) to a [`Viot`], strictly, never
//! panicking.

use super::*;

impl Viot {
    /// Strict decoder: accepts exactly the tables `to_bytes` could produce,
    /// apart from the OEM/creator ids (so a QEMU-built table decodes too).
    /// Checks signature, length, revision, checksum, node_offset, every
    /// node's type, length and bounds, zero reserved bytes, that every range
    /// points at the one virtio-pci IOMMU node, and then the same rules as
    /// `to_bytes`. Never panics: every read is bounds-checked.
    pub fn parse(bytes: &[u8]) -> Result<Viot, ViotError> {
        let r = Reader(bytes);
        if bytes.len() < VIOT_HEADER_LEN {
            return Err(ViotError::TooShort {
                length: bytes.len(),
                minimum: VIOT_HEADER_LEN,
            });
        }
        let signature = r.bytes(0, 4)?;
        if signature != SIGNATURE {
            return Err(ViotError::BadSignature {
                found: signature.escape_ascii().to_string(),
            });
        }
        let header_length = r.le32(4)?;
        if usize::try_from(header_length) != Ok(bytes.len()) {
            return Err(ViotError::LengthMismatch {
                header: header_length,
                actual: bytes.len(),
            });
        }
        let revision = r.u8(8)?;
        if revision != REVISION {
            return Err(ViotError::UnsupportedRevision { found: revision });
        }
        let sum = byte_sum(bytes);
        if sum != 0 {
            return Err(ViotError::BadChecksum {
                sum,
                stored: r.u8(9)?,
            });
        }
        let node_count = r.le16(36)?;
        let node_offset = r.le16(38)?;
        if node_offset != IOMMU_NODE_OFFSET {
            return Err(ViotError::BadNodeOffset { node_offset });
        }
        r.reserved(40, 8)?;

        let mut iommu: Option<(usize, u16, Bdf)> = None;
        // (node offset, output_node, range)
        let mut ranges: Vec<(usize, u16, PciRange)> = Vec::new();
        let mut offset = usize::from(node_offset);
        for _ in 0..node_count {
            let available = bytes.len().saturating_sub(offset);
            if available < NODE_HEADER_LEN {
                return Err(ViotError::TruncatedNode {
                    offset,
                    needed: NODE_HEADER_LEN,
                    available,
                });
            }
            let node_type = r.u8(offset)?;
            let length = r.le16(offset + 2)?;
            let expected = match node_type {
                NODE_PCI_RANGE => PCI_RANGE_LEN,
                NODE_VIRTIO_PCI_IOMMU => VIRTIO_PCI_IOMMU_LEN,
                other => {
                    return Err(ViotError::UnsupportedNodeType {
                        offset,
                        node_type: other,
                        name: node_type_name(other),
                    });
                }
            };
            if length != expected {
                return Err(ViotError::BadNodeLength {
                    offset,
                    node_type,
                    length,
                    expected,
                });
            }
            if available < usize::from(length) {
                return Err(ViotError::TruncatedNode {
                    offset,
                    needed: usize::from(length),
                    available,
                });
            }
            r.reserved(offset + 1, 1)?;

            if node_type == NODE_VIRTIO_PCI_IOMMU {
                if let Some((first, _, _)) = iommu {
                    return Err(ViotError::MultipleIommuNodes { first, offset });
                }
                let segment = r.le16(offset + 4)?;
                let bdf = Bdf(r.le16(offset + 6)?);
                r.reserved(offset + 8, 8)?;
                iommu = Some((offset, segment, bdf));
            } else {
                let endpoint_start = r.le32(offset + 4)?;
                let segment_start = r.le16(offset + 8)?;
                let segment_end = r.le16(offset + 10)?;
                let bdf_start = Bdf(r.le16(offset + 12)?);
                let bdf_end = Bdf(r.le16(offset + 14)?);
                let output_node = r.le16(offset + 16)?;
                r.reserved(offset + 18, 6)?;
                if segment_start != segment_end {
                    return Err(ViotError::MultiSegmentRange {
                        offset,
                        segment_start,
                        segment_end,
                    });
                }
                ranges.push((
                    offset,
                    output_node,
                    PciRange {
                        endpoint_start,
                        segment: segment_start,
                        bdf_start,
                        bdf_end,
                    },
                ));
            }
            offset += usize::from(length);
        }
        if offset != bytes.len() {
            return Err(ViotError::TrailingBytes {
                offset,
                count: bytes.len().saturating_sub(offset),
            });
        }

        let (iommu_offset, iommu_segment, iommu_bdf) = iommu.ok_or(ViotError::MissingIommuNode)?;
        for &(offset, output_node, _) in &ranges {
            if usize::from(output_node) != iommu_offset {
                return Err(ViotError::BadOutputNode {
                    offset,
                    output_node,
                    iommu_offset,
                });
            }
        }
        let offsets: Vec<usize> = ranges.iter().map(|&(offset, _, _)| offset).collect();
        let viot = Viot {
            iommu_segment,
            iommu_bdf,
            ranges: ranges.into_iter().map(|(_, _, range)| range).collect(),
        };
        viot.validate()
            .map_err(|e| match e.range_index().and_then(|i| offsets.get(i)) {
                Some(&offset) => ViotError::InvalidRangeNode {
                    offset,
                    source: Box::new(e),
                },
                None => e,
            })?;
        Ok(viot)
    }
}

fn node_type_name(node_type: u8) -> &'static str {
    match node_type {
        NODE_PCI_RANGE => "PCI range",
        NODE_MMIO_ENDPOINT => "MMIO endpoint",
        NODE_VIRTIO_PCI_IOMMU => "virtio-pci IOMMU",
        NODE_VIRTIO_MMIO_IOMMU => "virtio-mmio IOMMU",
        _ => "reserved",
    }
}

/// Bounds-checked little-endian reads; an out-of-bounds read is reported as
/// a truncated node at that offset instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&self, offset: usize, len: usize) -> Result<&'a [u8], ViotError> {
        offset
            .checked_add(len)
            .and_then(|end| self.0.get(offset..end))
            .ok_or(ViotError::TruncatedNode {
                offset,
                needed: len,
                available: self.0.len().saturating_sub(offset),
            })
    }

    fn u8(&self, offset: usize) -> Result<u8, ViotError> {
        Ok(self.bytes(offset, 1)?[0])
    }

    fn le16(&self, offset: usize) -> Result<u16, ViotError> {
        let b = self.bytes(offset, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn le32(&self, offset: usize) -> Result<u32, ViotError> {
        let b = self.bytes(offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reserved bytes must be zero: a non-zero one means either corruption
    /// or a newer layout we do not understand.
    fn reserved(&self, offset: usize, len: usize) -> Result<(), ViotError> {
        let b = self.bytes(offset, len)?;
        match b.iter().position(|&v| v != 0) {
            Some(i) => Err(ViotError::ReservedNotZero {
                offset: offset + i,
                value: b[i],
            }),
            None => Ok(()),
        }
    }
}
