use super::*;

#[test]
fn layout_reserves_the_top_of_ram() {
    let l = Layout::new(64 << 20, 256).unwrap();
    assert_eq!(l.usable_end % PAGE, 0);
    assert!(l.usable_end < 64 << 20);
    assert_eq!(l.rings[0].desc, l.usable_end);
    assert!(l.rings[1].desc >= l.rings[0].end());
    assert!(l.slots[0] >= l.rings[1].end());
    assert!(l.slots[1] >= l.slots[0] + 256 * REQ_SLOT);
    assert!(l.slots[1] + 256 * EVT_SLOT <= 64 << 20);
    assert!(Layout::new(1 << 20, 256).is_err());
    assert!(Layout::new(64 << 20, 100).is_err());
}

/// Talks to a daemon already serving at `$VHOST_USER_IOMMU_SOCKET` (soft backend, endpoints
/// 0..=15): `cargo run -- --socket-path /tmp/x.sock`, then
/// `VHOST_USER_IOMMU_SOCKET=/tmp/x.sock cargo test --lib driver -- --ignored`.
#[test]
#[ignore = "needs a running daemon"]
fn smoke_against_a_running_daemon() {
    let path = std::env::var("VHOST_USER_IOMMU_SOCKET").unwrap_or("/tmp/x.sock".into());
    for event_idx in [false, true] {
        let mut vm = TestVm::connect(
            Path::new(&path),
            VmOptions {
                event_idx,
                ..Default::default()
            },
        )
        .unwrap();
        let c = vm.config().unwrap();
        assert!(c.probe_size > 0);
        let (s, props) = vm.probe(1).unwrap();
        assert_eq!(s, Status::Ok);
        assert_eq!(props.len(), c.probe_size as usize);
        crate::protocol::decode_probe_properties(&props).unwrap();
        let attach = Request::attach(1, 1);
        assert_eq!(vm.request(&attach).unwrap(), Status::Ok);
        let map = Request::map(1, 0x1000, 0x1fff, 0x1000, 3);
        assert_eq!(vm.request(&map).unwrap(), Status::Ok);
        let unmap = Request::unmap(1, 0x1000, 0x1fff);
        assert_eq!(vm.request(&unmap).unwrap(), Status::Ok);
        vm.disconnect();
    }
}

/// Everything else against a running daemon (see `smoke_against_a_running_daemon`):
/// batches past the u16 index wrap, abuse chains, resets, memory hot-plug, bypass.
#[test]
#[ignore = "needs a running daemon"]
fn workout_against_a_running_daemon() {
    use crate::ids::DomainId;
    let path = std::env::var("VHOST_USER_IOMMU_SOCKET").unwrap_or("/tmp/x.sock".into());
    let mut vm = TestVm::connect(
        Path::new(&path),
        VmOptions {
            event_idx: true,
            queue_size: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let map = |i: u64| Request::map(1, i << 12, (i << 12) | 0xfff, 0x10_0000, 3);
    let unmap = |i: u64| Request::unmap(1, i << 12, (i << 12) | 0xfff);
    assert_eq!(vm.request(&Request::attach(1, 2)).unwrap(), Status::Ok);
    // 32 maps + 32 unmaps per round, 1100 rounds: 70_400 chains, past 65_535.
    for _ in 0..1100 {
        let mut reqs: Vec<Request> = (1..=32).map(map).collect();
        reqs.extend((1..=32).map(unmap));
        let st = vm.batch(&reqs).unwrap();
        assert!(st.iter().all(|&s| s == Status::Ok), "{st:?}");
    }
    assert!(vm.request_queue().avail_idx() < 10_000, "wrapped");
    assert_eq!(vm.free_descriptors(), 128);
    // An unmapped range is no error; an unknown domain's UNMAP is NOENT.
    let mut u = unmap(1);
    if let Request::Unmap { domain, .. } = &mut u {
        *domain = DomainId(77);
    }
    assert_eq!(vm.request(&u).unwrap(), Status::NoEnt);

    // Abuse: a chain pointing outside RAM, an empty indirect table, a writable-only chain.
    let end = vm.ram().size();
    let (req, n) = Request::attach(1, 3).encode();
    vm.ram().write(0x2000, &req[..n]).unwrap();
    let heads = [
        vm.push_chain(
            &[Desc::readable(end + 0x1000, 20), Desc::writable(0x3000, 4)],
            false,
        )
        .unwrap(),
        vm.push_chain(&[], true).unwrap(),
        vm.push_chain(&[Desc::writable(0x3000, 4)], false).unwrap(),
        vm.push_chain(
            &[Desc::readable(0x2000, n as u32), Desc::writable(0x3000, 4)],
            true,
        )
        .unwrap(),
    ];
    vm.kick().unwrap();
    let used = vm.wait_used(4, Duration::from_secs(5)).unwrap();
    eprintln!("abuse chains {heads:?} -> {used:?}");
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    assert_eq!(used[3].1, 4, "the indirect ATTACH is answered");
    let mut tail = [0u8; 4];
    vm.ram().read(0x3000, &mut tail).unwrap();
    eprintln!("tail of the indirect ATTACH: {tail:?}");

    assert_eq!(vm.probe(3).unwrap().0, Status::Ok);
    vm.write_bypass(1).unwrap();
    assert_eq!(vm.config().unwrap().bypass, 1);
    vm.write_bypass(0).unwrap();
    assert_eq!(vm.config().unwrap().bypass, 0);

    vm.reset_rings().unwrap();
    eprintln!("vring bases at reset: {:?}", vm.last_vring_bases());
    assert_eq!(vm.request(&Request::attach(1, 2)).unwrap(), Status::Ok);
    vm.reset_device().unwrap();
    vm.reset_rings().unwrap();
    assert_eq!(vm.request(&Request::attach(1, 2)).unwrap(), Status::Ok);

    vm.add_region(1 << 32, 2 << 20).unwrap();
    let mut m = map(0x100);
    if let Request::Map(crate::protocol::MapRequest { phys_start, .. }) = &mut m {
        *phys_start = crate::ids::Gpa(1 << 32);
    }
    assert_eq!(vm.request(&m).unwrap(), Status::Ok);
    vm.remove_region(1 << 32).unwrap();
    assert!(vm.remove_region(1 << 32).is_err());
    assert!(vm.events().unwrap().is_empty());
    vm.disconnect();
}
