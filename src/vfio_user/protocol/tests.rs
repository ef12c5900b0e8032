use super::*;

#[test]
fn header_roundtrip() {
    let h = Header {
        msg_id: 7,
        command: CMD_DMA_MAP,
        message_size: 48,
        flags: FLAG_NO_REPLY,
        error_no: 0,
    };
    assert_eq!(Header::decode(&h.encode()), h);
}

#[test]
fn error_reply_never_carries_errno_zero() {
    let h = Header::decode(&error_reply(1, 2, 0));
    assert_eq!(h.flags, FLAG_TYPE_REPLY | FLAG_ERROR);
    assert_eq!(h.error_no, libc::EIO as u32);
}

#[test]
fn cap_chain_roundtrip() {
    let caps = vec![
        RegionCap::sparse_mmap(&[SparseArea::new(0, 0x1000), SparseArea::new(0x2000, 0x2000)]),
        RegionCap {
            id: VFIO_REGION_INFO_CAP_TYPE,
            version: 1,
            body: vec![1, 0, 0, 0, 2, 0, 0, 0],
        },
    ];
    let mut buf = vec![0u8; REGION_INFO_SIZE];
    buf.extend_from_slice(&encode_cap_chain(REGION_INFO_SIZE, &caps));
    let back = parse_cap_chain(&buf, REGION_INFO_SIZE as u32).unwrap();
    assert_eq!(back, caps);
    assert_eq!(back[0].sparse_areas().unwrap().len(), 2);
}

#[test]
fn cap_chain_rejects_loops_and_overruns() {
    let mut buf = vec![0u8; REGION_INFO_SIZE + 8];
    // next points back at itself.
    buf[REGION_INFO_SIZE + 4..REGION_INFO_SIZE + 8]
        .copy_from_slice(&(REGION_INFO_SIZE as u32).to_ne_bytes());
    assert!(parse_cap_chain(&buf, REGION_INFO_SIZE as u32).is_err());
    assert!(parse_cap_chain(&buf, 1000).is_err());
    assert!(parse_cap_chain(&buf, 4).is_err());
}

#[test]
fn region_info_short_answer_has_no_caps_flag() {
    let info = RegionInfo {
        flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
        size: 0x4000,
        offset: 1 << 40,
        caps: vec![RegionCap::sparse_mmap(&[SparseArea::new(0, 0x4000)])],
    };
    let (short, full) = encode_region_info(0, &info, 32);
    assert!(!full);
    assert_eq!(short.len(), 32);
    // header 8 + nr_areas/reserved 8 + one area 16.
    assert_eq!(u32_at(&short, 0), 32 + 32);
    assert_eq!(u32_at(&short, 4) & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert!(!encode_region_info(0, &info, 63).1);
    let (long, full) = encode_region_info(0, &info, 64);
    assert!(full);
    assert_eq!(long.len(), 64);
    assert_ne!(u32_at(&long, 4) & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(u32_at(&long, 12), 32);
}

#[test]
fn irq_set_checks() {
    let mut p = vec![0u8; 20];
    p[4..8].copy_from_slice(&(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER).to_ne_bytes());
    p[16..20].copy_from_slice(&3u32.to_ne_bytes());
    assert!(decode_irq_set(&p).is_err());
    p.extend_from_slice(&[1, 0, 1]);
    assert_eq!(decode_irq_set(&p).unwrap().data, &[1, 0, 1]);
    p[4..8].copy_from_slice(&(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_NONE).to_ne_bytes());
    assert!(decode_irq_set(&p).is_err());
}

#[test]
fn dma_map_checks() {
    let mut p = vec![0u8; 32];
    p[0..4].copy_from_slice(&32u32.to_ne_bytes());
    p[4..8].copy_from_slice(&DMA_FLAG_READ.to_ne_bytes());
    p[16..24].copy_from_slice(&0x1000u64.to_ne_bytes());
    assert!(decode_dma_map(&p).is_err(), "size 0");
    p[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
    assert!(decode_dma_map(&p).is_ok());
    p[24..32].copy_from_slice(&0x800u64.to_ne_bytes());
    assert!(decode_dma_map(&p).is_err(), "unaligned");
    assert!(decode_dma_map(&p[..31]).is_err());
}

#[test]
fn write_multi_size_must_match() {
    let mut p = 2u64.to_ne_bytes().to_vec();
    p.extend_from_slice(&[0u8; 24]);
    assert!(decode_write_multi(&p).is_err());
    p.extend_from_slice(&[0u8; 24]);
    // count 0 is refused.
    assert!(decode_write_multi(&p).is_err());
    p[8 + 12] = 4;
    p[8 + 24 + 12] = 8;
    assert_eq!(decode_write_multi(&p).unwrap().len(), 2);
}

#[test]
fn version_parsing() {
    let mut p = vec![0, 0, 0, 0];
    assert_eq!(decode_version(&p).unwrap().capabilities, None);
    p.extend_from_slice(br#"{"capabilities":{"write_multiple":true}}"#);
    p.push(0);
    let v = decode_version(&p).unwrap();
    assert!(client_offers_write_multiple(&v));
    let bad = [0, 0, 0, 0, b'{', 0];
    assert!(decode_version(&bad).is_err());
    let r = encode_version_reply(false);
    assert_eq!(*r.last().unwrap(), 0);
    let json: serde_json::Value = serde_json::from_slice(&r[4..r.len() - 1]).unwrap();
    assert_eq!(json["capabilities"]["max_msg_fds"], 16);
    assert!(json["capabilities"].get("write_multiple").is_none());
}

#[test]
fn the_wire_structs_have_the_protocols_sizes() {
    use std::mem::size_of;
    assert_eq!(size_of::<Header>(), HEADER_SIZE);
    assert_eq!(size_of::<VersionHead>(), 4);
    assert_eq!(size_of::<DmaMap>(), 32);
    assert_eq!(size_of::<DmaUnmap>(), 24);
    assert_eq!(size_of::<InfoWire>(), 16);
    assert_eq!(size_of::<IrqSetHead>(), IRQ_SET_SIZE);
    assert_eq!(size_of::<RegionAccess>(), 16);
    assert_eq!(size_of::<SmallWrite>(), 24);
    // Field order as the protocol document writes it: a header's bytes, field by field.
    let h = Header {
        msg_id: 0x0201,
        command: 0x0403,
        message_size: 0x0807_0605,
        flags: 0x0c0b_0a09,
        error_no: 0x100f_0e0d,
    };
    let b = h.encode();
    assert_eq!(b, std::array::from_fn::<u8, 16, _>(|i| (i + 1) as u8));
    assert_eq!(Header::decode(&b), h);
    // Reads take any alignment and refuse short input.
    let mut buf = [0u8; 33];
    buf[1..33].copy_from_slice(
        DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0,
            address: 0x1000,
            size: 0x1000,
        }
        .as_slice(),
    );
    assert_eq!(read::<DmaMap>(&buf[1..]).unwrap().address, 0x1000);
    assert!(read::<DmaMap>(&buf[1..32]).is_none());
}
