use super::*;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// IOMMU at 00:01.0, a whole bus 01 range, and two single endpoints.
fn sample() -> Viot {
    Viot {
        iommu_segment: 0,
        iommu_bdf: bdf("00:01.0"),
        ranges: vec![
            PciRange {
                endpoint_start: 0x100,
                segment: 0,
                bdf_start: bdf("01:00.0"),
                bdf_end: bdf("01:1f.7"),
            },
            PciRange {
                endpoint_start: 3,
                segment: 0,
                bdf_start: bdf("00:03.0"),
                bdf_end: bdf("00:03.0"),
            },
            PciRange {
                endpoint_start: 4,
                segment: 0,
                bdf_start: bdf("00:04.0"),
                bdf_end: bdf("00:04.0"),
            },
        ],
    }
}

fn le16_at(t: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([t[off], t[off + 1]])
}

fn le32_at(t: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([t[off], t[off + 1], t[off + 2], t[off + 3]])
}

/// Rewrites the length field and checksum so a hand-corrupted table gets
/// past those checks and reaches the rule under test.
fn reseal(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(byte_sum(t));
}

#[test]
fn bdf_parses_bus_device_function_in_hex() {
    assert_eq!(bdf("00:00.0"), Bdf(0));
    assert_eq!(bdf("01:02.3"), Bdf(0x0113));
    assert_eq!(bdf("ff:1f.7"), Bdf(0xffff));
    assert_eq!(bdf("Ab:1F.7"), Bdf(0xabff));
    assert_eq!(bdf("1:2.3"), Bdf(0x0113));
    let b = bdf("3a:0c.5");
    assert_eq!((b.bus(), b.device(), b.function()), (0x3a, 0x0c, 5));
    assert_eq!(Bdf::new(0x3a, 0x0c, 5).unwrap(), b);
}

#[test]
fn bdf_accepts_segment_zero_prefix() {
    assert_eq!(bdf("0000:01:02.3"), Bdf(0x0113));
}

#[test]
fn bdf_from_str_rejects_nonzero_segment() {
    let err = "0001:01:02.3".parse::<Bdf>().unwrap_err();
    assert!(err.to_string().contains("parse_pci_address"), "{err}");
}

#[test]
fn parse_pci_address_returns_the_segment_separately() {
    assert_eq!(parse_pci_address("0001:01:02.3").unwrap(), (1, Bdf(0x0113)));
    assert_eq!(parse_pci_address("ffff:00:00.0").unwrap(), (0xffff, Bdf(0)));
    assert_eq!(parse_pci_address("05:00.1").unwrap(), (0, Bdf(0x0501)));
}

#[test]
fn bdf_rejects_device_over_31_and_function_over_7() {
    assert!("00:20.0".parse::<Bdf>().is_err());
    assert!("00:1f.8".parse::<Bdf>().is_err());
    assert!(Bdf::new(0, 32, 0).is_err());
    assert!(Bdf::new(0, 0, 8).is_err());
}

#[test]
fn bdf_rejects_malformed_text() {
    for bad in [
        "",
        "00",
        "00:00",
        "00.0",
        "000:00.0",
        "00:000.0",
        "00:00.00",
        "00:00.",
        ":00.0",
        "+1:00.0",
        " 01:00.0",
        "01:00.0 ",
        "0x1:00.0",
        "g0:00.0",
        "10000:00:00.0",
        "0:0:0:00.0",
        "00:00.0.0",
        "00:-1.0",
    ] {
        assert!(bad.parse::<Bdf>().is_err(), "{bad:?} was accepted");
        assert!(parse_pci_address(bad).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn bdf_display_is_lspci_format_and_round_trips() {
    assert_eq!(Bdf(0x0113).to_string(), "01:02.3");
    assert_eq!(Bdf(0xabff).to_string(), "ab:1f.7");
    for raw in 0..=u16::MAX {
        let b = Bdf(raw);
        assert_eq!(b.to_string().parse::<Bdf>().unwrap(), b);
    }
}

#[test]
fn table_layout_matches_acpi_viot_offsets() {
    let t = sample().to_bytes().unwrap();
    assert_eq!(&t[0..4], b"VIOT");
    assert_eq!(t.len(), 48 + 16 + 3 * 24);
    assert_eq!(t[8], 0, "revision");
    assert_eq!(&t[10..16], b"VHUIOM");
    assert_eq!(&t[16..24], b"VHUIOMMU");
    assert_eq!(le32_at(&t, 24), OEM_REVISION);
    assert_eq!(&t[28..32], b"VHUI");
    assert_eq!(le32_at(&t, 32), CREATOR_REVISION);
    assert_eq!(le16_at(&t, 36), 4, "node_count");
    assert_eq!(le16_at(&t, 38), 48, "node_offset");
    assert_eq!(&t[40..48], &[0; 8]);
    // virtio-pci IOMMU node
    assert_eq!(&t[48..52], &[3, 0, 16, 0]);
    assert_eq!(le16_at(&t, 52), 0, "iommu segment");
    assert_eq!(le16_at(&t, 54), 0x0008, "iommu bdf 00:01.0");
    assert_eq!(&t[56..64], &[0; 8]);
    // first PCI range node
    assert_eq!(&t[64..68], &[1, 0, 24, 0]);
    assert_eq!(le32_at(&t, 68), 0x100, "endpoint_start");
    assert_eq!(le16_at(&t, 72), 0, "segment_start");
    assert_eq!(le16_at(&t, 74), 0, "segment_end");
    assert_eq!(le16_at(&t, 76), 0x0100, "bdf_start");
    assert_eq!(le16_at(&t, 78), 0x01ff, "bdf_end");
    assert_eq!(le16_at(&t, 80), 48, "output_node");
    assert_eq!(&t[82..88], &[0; 6]);
}

#[test]
fn header_length_field_equals_table_length() {
    let t = sample().to_bytes().unwrap();
    assert_eq!(le32_at(&t, 4) as usize, t.len());
}

#[test]
fn checksum_makes_table_bytes_sum_to_zero() {
    for viot in [
        sample(),
        Viot::single_endpoints(0, bdf("00:02.0"), &[(7, 0, bdf("00:05.0"))]),
    ] {
        let t = viot.to_bytes().unwrap();
        assert_eq!(t.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
    }
}

#[test]
fn every_range_node_points_at_the_iommu_node() {
    let t = sample().to_bytes().unwrap();
    assert_eq!(t[48], 3);
    for i in 0..3 {
        let node = 64 + 24 * i;
        assert_eq!(t[node], 1);
        assert_eq!(le16_at(&t, node + 16), 48);
    }
}

#[test]
fn round_trip_to_bytes_then_parse_is_identity() {
    let multi_segment = Viot {
        iommu_segment: 2,
        iommu_bdf: bdf("00:00.0"),
        ranges: vec![
            PciRange {
                endpoint_start: 0,
                segment: 2,
                bdf_start: bdf("00:00.0"),
                bdf_end: bdf("ff:1f.7"),
            },
            PciRange {
                endpoint_start: 0x1_0000,
                segment: 3,
                bdf_start: bdf("00:00.0"),
                bdf_end: bdf("ff:1f.7"),
            },
        ],
    };
    for viot in [sample(), multi_segment] {
        let t = viot.to_bytes().unwrap();
        let back = Viot::parse(&t).unwrap();
        assert_eq!(back, viot);
        assert_eq!(back.to_bytes().unwrap(), t);
    }
}

#[test]
fn encoder_rejects_empty_ranges() {
    let viot = Viot::single_endpoints(0, bdf("00:01.0"), &[]);
    assert_eq!(viot.to_bytes(), Err(ViotError::NoRanges));
}

#[test]
fn encoder_rejects_inverted_range() {
    let mut viot = sample();
    viot.ranges[1].bdf_start = bdf("00:05.0");
    viot.ranges[1].bdf_end = bdf("00:04.7");
    assert!(matches!(
        viot.to_bytes(),
        Err(ViotError::InvertedRange { index: 1, .. })
    ));
}

#[test]
fn encoder_rejects_overlapping_ranges() {
    let mut viot = sample();
    viot.ranges.push(PciRange {
        endpoint_start: 0x1000,
        segment: 0,
        bdf_start: bdf("01:1f.7"),
        bdf_end: bdf("02:00.0"),
    });
    assert_eq!(
        viot.to_bytes(),
        Err(ViotError::OverlappingRanges {
            first: 0,
            second: 3,
            segment: 0
        })
    );
    // The same BDF twice via single_endpoints is an overlap too.
    let dup = Viot::single_endpoints(
        0,
        bdf("00:01.0"),
        &[(1, 0, bdf("00:03.0")), (2, 0, bdf("00:03.0"))],
    );
    assert!(matches!(
        dup.to_bytes(),
        Err(ViotError::OverlappingRanges { .. })
    ));
}

#[test]
fn encoder_allows_adjacent_ranges_and_same_bdfs_on_other_segments() {
    let viot = Viot {
        iommu_segment: 0,
        iommu_bdf: bdf("00:01.0"),
        ranges: vec![
            PciRange {
                endpoint_start: 0,
                segment: 0,
                bdf_start: bdf("01:00.0"),
                bdf_end: bdf("01:1f.7"),
            },
            PciRange {
                endpoint_start: 0x100,
                segment: 0,
                bdf_start: bdf("02:00.0"),
                bdf_end: bdf("02:1f.7"),
            },
            PciRange {
                endpoint_start: 0x200,
                segment: 1,
                bdf_start: bdf("01:00.0"),
                bdf_end: bdf("01:1f.7"),
            },
        ],
    };
    assert!(viot.to_bytes().is_ok());
}

#[test]
fn encoder_rejects_endpoint_id_overflow() {
    let viot = Viot {
        iommu_segment: 0,
        iommu_bdf: bdf("00:01.0"),
        ranges: vec![PciRange {
            endpoint_start: u32::MAX - 0xfe,
            segment: 0,
            bdf_start: bdf("01:00.0"),
            bdf_end: bdf("01:1f.7"),
        }],
    };
    assert!(matches!(
        viot.to_bytes(),
        Err(ViotError::EndpointIdOverflow { index: 0, .. })
    ));
}

#[test]
fn encoder_allows_endpoint_ids_ending_at_u32_max() {
    let viot = Viot {
        iommu_segment: 0,
        iommu_bdf: bdf("00:01.0"),
        ranges: vec![PciRange {
            endpoint_start: u32::MAX - 0xff,
            segment: 0,
            bdf_start: bdf("01:00.0"),
            bdf_end: bdf("01:1f.7"),
        }],
    };
    assert!(viot.to_bytes().is_ok());
    assert_eq!(viot.endpoint_id(0, bdf("01:1f.7")), Some(u32::MAX));
}

#[test]
fn encoder_rejects_shared_endpoint_ids() {
    let viot = Viot::single_endpoints(
        0,
        bdf("00:01.0"),
        &[(5, 0, bdf("00:03.0")), (5, 0, bdf("00:04.0"))],
    );
    assert_eq!(
        viot.to_bytes(),
        Err(ViotError::SharedEndpointIds {
            first: 0,
            second: 1
        })
    );
    // A single endpoint landing inside another range's id interval.
    let mut viot = sample();
    viot.ranges[1].endpoint_start = 0x1ff;
    assert!(matches!(
        viot.to_bytes(),
        Err(ViotError::SharedEndpointIds { .. })
    ));
}

#[test]
fn encoder_allows_iommu_bdf_inside_a_range() {
    // QEMU itself emits a whole-bus range that covers the IOMMU.
    let viot = Viot {
        iommu_segment: 0,
        iommu_bdf: bdf("00:02.0"),
        ranges: vec![PciRange {
            endpoint_start: 0,
            segment: 0,
            bdf_start: bdf("00:00.0"),
            bdf_end: bdf("00:1f.7"),
        }],
    };
    let t = viot.to_bytes().unwrap();
    assert_eq!(Viot::parse(&t).unwrap(), viot);
    assert_eq!(viot.endpoint_id(0, bdf("00:02.0")), None);
    assert_eq!(viot.endpoint_id(0, bdf("00:03.0")), Some(0x18));
}

#[test]
fn encoder_rejects_more_ranges_than_node_count_can_hold() {
    let all: Vec<(u32, u16, Bdf)> = (0..=MAX_RANGES)
        .map(|i| (i as u32, (i >> 16) as u16, Bdf(i as u16)))
        .collect();
    let too_many = Viot::single_endpoints(0xffff, Bdf(0xffff), &all);
    assert_eq!(
        too_many.to_bytes(),
        Err(ViotError::TooManyRanges {
            count: MAX_RANGES + 1,
            max: MAX_RANGES
        })
    );
    let max = Viot::single_endpoints(0xffff, Bdf(0xffff), &all[..MAX_RANGES]);
    let t = max.to_bytes().unwrap();
    assert_eq!(le16_at(&t, 36), u16::MAX);
    assert_eq!(Viot::parse(&t).unwrap(), max);
}

#[test]
fn endpoint_id_follows_linux_formula() {
    // epid = ((segment - segment_start) << 16) + (bdf - bdf_start) + endpoint_start
    let viot = sample();
    assert_eq!(viot.endpoint_id(0, bdf("01:00.0")), Some(0x100));
    assert_eq!(viot.endpoint_id(0, bdf("01:02.3")), Some(0x100 + 0x13));
    assert_eq!(viot.endpoint_id(0, bdf("01:1f.7")), Some(0x1ff));
    assert_eq!(viot.endpoint_id(0, bdf("00:03.0")), Some(3));
    assert_eq!(viot.endpoint_id(0, bdf("00:04.0")), Some(4));
    // The same formula, evaluated independently over the whole range.
    let r = &viot.ranges[0];
    let (segment, segment_start) = (0u16, r.segment);
    for raw in r.bdf_start.0..=r.bdf_end.0 {
        let epid = (u32::from(segment - segment_start) << 16)
            + u32::from(raw - r.bdf_start.0)
            + r.endpoint_start;
        assert_eq!(viot.endpoint_id(0, Bdf(raw)), Some(epid));
    }
}

#[test]
fn endpoint_id_is_none_for_the_iommu_itself() {
    let mut viot = sample();
    viot.iommu_bdf = bdf("01:05.0");
    assert_eq!(viot.endpoint_id(0, bdf("01:05.0")), None);
    assert_eq!(viot.endpoint_id(0, bdf("01:05.1")), Some(0x129));
}

#[test]
fn endpoint_id_is_none_outside_every_range() {
    let viot = sample();
    assert_eq!(viot.endpoint_id(0, bdf("00:05.0")), None);
    assert_eq!(viot.endpoint_id(0, bdf("02:00.0")), None);
    assert_eq!(viot.endpoint_id(1, bdf("01:00.0")), None, "other segment");
}

#[test]
fn single_endpoints_maps_each_bdf_to_exactly_its_endpoint_id() {
    let eps = [
        (42, 0, bdf("00:03.0")),
        (7, 0, bdf("00:04.0")),
        (1000, 1, bdf("00:03.0")),
    ];
    let viot = Viot::single_endpoints(0, bdf("00:01.0"), &eps);
    assert_eq!(viot.ranges.len(), 3);
    for &(id, seg, b) in &eps {
        assert_eq!(viot.endpoint_id(seg, b), Some(id));
    }
    assert_eq!(viot.endpoint_id(0, bdf("00:03.1")), None);
    let t = viot.to_bytes().unwrap();
    assert_eq!(Viot::parse(&t).unwrap(), viot);
}

#[test]
fn decoder_rejects_too_short_table() {
    let t = sample().to_bytes().unwrap();
    assert_eq!(
        Viot::parse(&t[..47]),
        Err(ViotError::TooShort {
            length: 47,
            minimum: 48
        })
    );
    assert!(Viot::parse(&[]).is_err());
}

#[test]
fn decoder_rejects_bad_signature() {
    let mut t = sample().to_bytes().unwrap();
    t[0..4].copy_from_slice(b"IORT");
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::BadSignature {
            found: "IORT".into()
        })
    );
}

#[test]
fn decoder_rejects_length_field_mismatch() {
    let mut t = sample().to_bytes().unwrap();
    t.push(0);
    assert!(matches!(
        Viot::parse(&t),
        Err(ViotError::LengthMismatch {
            header: 136,
            actual: 137
        })
    ));
}

#[test]
fn decoder_rejects_bad_checksum() {
    let mut t = sample().to_bytes().unwrap();
    t[70] ^= 0x01;
    assert!(matches!(
        Viot::parse(&t),
        Err(ViotError::BadChecksum { sum: 1, .. })
    ));
}

#[test]
fn decoder_rejects_unknown_revision() {
    let mut t = sample().to_bytes().unwrap();
    t[8] = 1;
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::UnsupportedRevision { found: 1 })
    );
}

#[test]
fn decoder_rejects_node_offset_other_than_48() {
    let mut t = sample().to_bytes().unwrap();
    t[38] = 64;
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::BadNodeOffset { node_offset: 64 })
    );
}

#[test]
fn decoder_rejects_truncated_node() {
    let t = sample().to_bytes().unwrap();
    // Cut the last range node short, keeping header length and checksum
    // consistent so the node walk itself must notice.
    let mut cut = t[..t.len() - 10].to_vec();
    reseal(&mut cut);
    assert_eq!(
        Viot::parse(&cut),
        Err(ViotError::TruncatedNode {
            offset: 112,
            needed: 24,
            available: 14
        })
    );
    // node_count promising one more node than the table holds.
    let mut more = t.clone();
    more[36] += 1;
    reseal(&mut more);
    assert_eq!(
        Viot::parse(&more),
        Err(ViotError::TruncatedNode {
            offset: 136,
            needed: 4,
            available: 0
        })
    );
}

#[test]
fn decoder_rejects_wrong_node_length() {
    let mut t = sample().to_bytes().unwrap();
    t[66] = 20;
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::BadNodeLength {
            offset: 64,
            node_type: 1,
            length: 20,
            expected: 24
        })
    );
}

#[test]
fn decoder_rejects_unknown_and_mmio_node_types() {
    for (ty, name) in [
        (0, "reserved"),
        (2, "MMIO endpoint"),
        (4, "virtio-mmio IOMMU"),
        (0xff, "reserved"),
    ] {
        let mut t = sample().to_bytes().unwrap();
        t[88] = ty;
        reseal(&mut t);
        assert_eq!(
            Viot::parse(&t),
            Err(ViotError::UnsupportedNodeType {
                offset: 88,
                node_type: ty,
                name
            })
        );
    }
}

#[test]
fn decoder_rejects_nonzero_reserved_bytes() {
    for off in [40, 47, 49, 56, 63, 65, 82, 87] {
        let mut t = sample().to_bytes().unwrap();
        t[off] = 0x5a;
        reseal(&mut t);
        assert_eq!(
            Viot::parse(&t),
            Err(ViotError::ReservedNotZero {
                offset: off,
                value: 0x5a
            }),
            "offset {off}"
        );
    }
}

#[test]
fn decoder_rejects_trailing_bytes_after_last_node() {
    let mut t = sample().to_bytes().unwrap();
    t[36] -= 1;
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::TrailingBytes {
            offset: 112,
            count: 24
        })
    );
}

#[test]
fn decoder_rejects_range_not_pointing_at_the_iommu_node() {
    let mut t = sample().to_bytes().unwrap();
    t[80] = 64; // first range points at itself
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::BadOutputNode {
            offset: 64,
            output_node: 64,
            iommu_offset: 48
        })
    );
}

#[test]
fn decoder_rejects_missing_or_second_iommu_node() {
    let mut t = sample().to_bytes().unwrap();
    // Drop the IOMMU node (bytes 48..64) and keep only the ranges.
    let mut no_iommu = t[..48].to_vec();
    no_iommu.extend_from_slice(&t[64..]);
    no_iommu[36] -= 1;
    reseal(&mut no_iommu);
    assert_eq!(Viot::parse(&no_iommu), Err(ViotError::MissingIommuNode));

    let iommu_node = t[48..64].to_vec();
    t.extend_from_slice(&iommu_node);
    t[36] += 1;
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::MultipleIommuNodes {
            first: 48,
            offset: 136
        })
    );
}

#[test]
fn decoder_rejects_multi_segment_range() {
    let mut t = sample().to_bytes().unwrap();
    t[74] = 1; // segment_end of the first range
    reseal(&mut t);
    assert_eq!(
        Viot::parse(&t),
        Err(ViotError::MultiSegmentRange {
            offset: 64,
            segment_start: 0,
            segment_end: 1
        })
    );
}

#[test]
fn decoder_applies_encoder_rules_and_names_the_range_node() {
    let mut t = sample().to_bytes().unwrap();
    // Make the third range (node at 112) reuse the second range's BDF.
    t[112 + 12] = t[88 + 12];
    t[112 + 13] = t[88 + 13];
    t[112 + 14] = t[88 + 14];
    t[112 + 15] = t[88 + 15];
    reseal(&mut t);
    let err = Viot::parse(&t).unwrap_err();
    assert!(
        matches!(&err, ViotError::InvalidRangeNode { offset: 112, source }
            if matches!(**source, ViotError::OverlappingRanges { first: 1, second: 2, .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("byte offset 112"), "{err}");
}

#[test]
fn decoder_accepts_qemu_style_whole_bus_table() {
    // What QEMU's hw/acpi/viot.c emits for one host bridge covering buses
    // 0..=0xff with the virtio-iommu at 00:02.0, OEM "BOCHS "/"BXPC    ".
    let mut t = Vec::new();
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&88u32.to_le_bytes());
    t.push(0);
    t.push(0);
    t.extend_from_slice(b"BOCHS ");
    t.extend_from_slice(b"BXPC    ");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"BXPC");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&2u16.to_le_bytes());
    t.extend_from_slice(&48u16.to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&[3, 0, 16, 0, 0, 0, 0x10, 0]);
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&[1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 48, 0]);
    t.extend_from_slice(&[0; 6]);
    reseal(&mut t);
    let viot = Viot::parse(&t).unwrap();
    assert_eq!(viot.iommu_bdf, bdf("00:02.0"));
    assert_eq!(viot.endpoint_id(0, bdf("00:03.0")), Some(0x18));
    assert_eq!(viot.endpoint_id(0, bdf("00:02.0")), None);
    assert_eq!(viot.endpoint_id(0, bdf("ff:1f.7")), Some(0xffff));
}

#[test]
fn error_messages_name_the_byte_offset() {
    let t = sample().to_bytes().unwrap();
    let mut cut = t[..t.len() - 10].to_vec();
    reseal(&mut cut);
    let msg = Viot::parse(&cut).unwrap_err().to_string();
    assert!(msg.contains("byte offset 112"), "{msg}");
    let mut bad = t.clone();
    bad[80] = 0;
    reseal(&mut bad);
    let msg = Viot::parse(&bad).unwrap_err().to_string();
    assert!(msg.contains("byte offset 64"), "{msg}");
}

#[test]
fn decoder_never_panics_on_truncations_and_bit_flips() {
    let t = sample().to_bytes().unwrap();
    for len in 0..t.len() {
        assert!(Viot::parse(&t[..len]).is_err(), "truncated to {len}");
        // Also with a consistent header, so the node walk sees the cut.
        let mut sealed = t[..len].to_vec();
        if sealed.len() >= 10 {
            reseal(&mut sealed);
        }
        assert!(Viot::parse(&sealed).is_err(), "resealed at {len}");
    }
    for bit in 0..t.len() * 8 {
        let mut flipped = t.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        // A single flip always breaks the checksum...
        assert!(Viot::parse(&flipped).is_err(), "bit {bit}");
        // ...so also re-seal it to push the flip into the later checks.
        // Whatever is accepted must be a table the encoder would emit
        // (the ids and checksum in bytes 9..36 are not part of the model).
        if bit / 8 != 9 && !(4..8).contains(&(bit / 8)) {
            reseal(&mut flipped);
        }
        if let Ok(viot) = Viot::parse(&flipped) {
            let again = viot.to_bytes().unwrap();
            assert_eq!(again[..9], flipped[..9], "bit {bit}");
            assert_eq!(again[36..], flipped[36..], "bit {bit}");
        }
    }
}

#[test]
fn decoder_never_panics_on_random_mutations() {
    // xorshift64: deterministic, no extra dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = sample().to_bytes().unwrap();
    for _ in 0..20_000 {
        let mut t = base.clone();
        match next() % 3 {
            0 => t.truncate((next() as usize) % (t.len() + 1)),
            1 => t.extend((0..next() % 40).map(|_| next() as u8)),
            _ => {}
        }
        for _ in 0..=next() % 4 {
            if !t.is_empty() {
                let i = (next() as usize) % t.len();
                t[i] = next() as u8;
            }
        }
        if t.len() >= 10 && next() % 4 != 0 {
            reseal(&mut t);
        }
        if let Ok(viot) = Viot::parse(&t) {
            let again = viot.to_bytes().unwrap();
            assert_eq!(again[..9], t[..9]);
            assert_eq!(again[36..], t[36..]);
        }
    }
}

/// Writes a sample table to `$VIOT_OUT` for tests/viot_iasl.sh (which runs it with
/// `--ignored`): a generator, not a check, so it is not part of a normal test run.
#[test]
#[ignore = "writes $VIOT_OUT for tests/viot_iasl.sh"]
fn write_table_to_viot_out_for_iasl() {
    let path = std::env::var_os("VIOT_OUT").expect("VIOT_OUT names the file to write");
    let bytes = sample().to_bytes().unwrap();
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}
