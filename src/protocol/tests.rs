use super::*;
use crate::ids::Iova;

#[test]
fn request_sizes_match_the_spec_structs() {
    assert_eq!(ATTACH_SIZE, 20);
    assert_eq!(DETACH_SIZE, 20);
    assert_eq!(MAP_SIZE, 36);
    assert_eq!(UNMAP_SIZE, 28);
    assert_eq!(PROBE_SIZE, 72);
    assert_eq!(RESV_MEM_PROPERTY_SIZE, 24);
}

#[test]
fn every_request_round_trips_through_encode_and_decode() {
    let reqs = [
        Request::Attach {
            domain: DomainId(7),
            endpoint: EndpointId(0x10),
            flags: ATTACH_F_BYPASS,
            reserved: [0, 1, 2, 3],
        },
        Request::Detach {
            domain: DomainId(u32::MAX),
            endpoint: EndpointId(3),
        },
        Request::map(2, 0x1000, 0x1fff, 0xdead_0000, MAP_F_READ | MAP_F_WRITE),
        Request::Unmap {
            domain: DomainId(2),
            virt_start: Iova(0),
            virt_end: Iova(u64::MAX),
            reserved: [9, 0, 0, 0],
        },
        Request::Probe {
            endpoint: EndpointId(0xffff_fffe),
        },
    ];
    for r in reqs {
        let (b, n) = r.encode();
        assert_eq!(n, r.kind().readable_size());
        assert_eq!(Request::decode(&b[..n]), Ok(r));
    }
}

#[test]
fn map_fields_sit_at_the_spec_offsets() {
    let mut b = [0u8; MAP_SIZE];
    b[0] = 3;
    b[1] = 0xff; // head.reserved is ignored
    b[4..8].copy_from_slice(&5u32.to_le_bytes());
    b[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    b[16..24].copy_from_slice(&0x2fffu64.to_le_bytes());
    b[24..32].copy_from_slice(&0x8000u64.to_le_bytes());
    b[32..36].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        Request::decode(&b),
        Ok(Request::map(5, 0x1000, 0x2fff, 0x8000, 3))
    );
}

#[test]
fn decode_rejects_short_and_unknown_requests_without_panicking() {
    assert_eq!(Request::decode(&[]), Err(DecodeError::NoHead { len: 0 }));
    assert_eq!(
        Request::decode(&[3, 0]),
        Err(DecodeError::NoHead { len: 2 })
    );
    assert_eq!(
        Request::decode(&[0, 0, 0, 0]),
        Err(DecodeError::UnknownType(0))
    );
    assert_eq!(
        Request::decode(&[6, 0, 0, 0]),
        Err(DecodeError::UnknownType(6))
    );
    for t in RequestType::ALL {
        let need = t.readable_size();
        let mut b = vec![0u8; need];
        b[0] = t as u8;
        for n in HEAD_SIZE..need {
            assert_eq!(
                Request::decode(&b[..n]),
                Err(DecodeError::TooShort {
                    kind: t,
                    need,
                    got: n
                })
            );
        }
        assert!(Request::decode(&b).is_ok());
    }
}

#[test]
fn config_layout_is_40_little_endian_bytes() {
    let c = Config {
        page_size_mask: 0xffff_ffff_ffff_f000,
        input_start: 1,
        input_end: 0xffff_ffff_ffff,
        domain_start: 2,
        domain_end: 0xffff,
        probe_size: 512,
        bypass: 1,
    };
    let b = c.to_bytes();
    assert_eq!(&b[0..8], &0xffff_ffff_ffff_f000u64.to_le_bytes());
    assert_eq!(&b[32..36], &512u32.to_le_bytes());
    assert_eq!(b[Config::BYPASS_OFFSET], 1);
    assert_eq!(&b[37..40], &[0, 0, 0]);
    assert_eq!(Config::from_bytes(&b), Some(c));
    assert_eq!(Config::from_bytes(&b[..39]), None);
}

#[test]
fn probe_properties_are_packed_and_zero_filled() {
    let props = [
        ResvMem {
            kind: ResvKind::Msi,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        },
        ResvMem {
            kind: ResvKind::Reserved,
            start: 0,
            end: 0xfff,
        },
    ];
    let mut out = [0xaau8; 64];
    encode_probe_properties(&props, &mut out).unwrap();
    assert_eq!(&out[0..4], &[1, 0, 20, 0]);
    assert_eq!(out[4], 1);
    assert_eq!(&out[24..28], &[1, 0, 20, 0]);
    assert!(out[48..].iter().all(|&b| b == 0));
    assert_eq!(decode_probe_properties(&out).unwrap(), props);
}

#[test]
fn probe_properties_that_do_not_fit_are_rejected_with_inval_and_nothing_written() {
    let props = [ResvMem {
        kind: ResvKind::Msi,
        start: 0,
        end: 1,
    }; 3];
    let mut out = [0xaau8; 70];
    assert_eq!(
        encode_probe_properties(&props, &mut out),
        Err(Status::Inval)
    );
    assert!(out.iter().all(|&b| b == 0xaa));
}

#[test]
fn fault_event_round_trips_and_sets_address_flag() {
    let f = FaultEvent {
        reason: FaultReason::Mapping,
        flags: FAULT_F_WRITE,
        endpoint: EndpointId(4),
        address: Some(0x1234_5000),
    };
    let b = f.to_bytes();
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 0x102);
    assert_eq!(FaultEvent::from_bytes(&b), Some(f));
}

#[test]
fn status_codes_have_spec_values() {
    for (i, s) in Status::ALL.iter().enumerate() {
        assert_eq!(*s as usize, i);
        assert_eq!(Status::from_u8(i as u8), Some(*s));
    }
    assert_eq!(Status::from_u8(9), None);
}

#[test]
fn request_types_have_spec_values_and_names() {
    let names: Vec<(u8, &str)> = RequestType::ALL
        .iter()
        .map(|t| (*t as u8, t.name()))
        .collect();
    assert_eq!(
        names,
        [
            (1, "attach"),
            (2, "detach"),
            (3, "map"),
            (4, "unmap"),
            (5, "probe")
        ]
    );
    for t in RequestType::ALL {
        assert_eq!(RequestType::from_u8(t as u8), Some(t));
    }
    assert_eq!(RequestType::from_u8(0), None);
    assert_eq!(RequestType::from_u8(6), None);
}
