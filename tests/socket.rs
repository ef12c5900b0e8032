//! Socket tier: the real daemon over a real vhost-user socket, driven by the guest-driver
//! simulator playing both VMM and guest driver.

mod common;

use common::{Daemon, ENDPOINTS, Options, RW, TIMEOUT, all_ok, in_each_mode};
use vhost_user_iommu::backend::fault::Op;
use vhost_user_iommu::backend::soft::Fault;
use vhost_user_iommu::domains::Limits;
use vhost_user_iommu::driver::{Claim, Desc, VmOptions};
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{
    MAP_F_MMIO, MAP_F_READ, REQUEST_QUEUE, Request, RequestType, ResvKind, Status,
    decode_probe_properties, features,
};

use Request as R;

/// A 1024-entry request queue: room for batches of up to 512 requests.
fn big_queue() -> VmOptions {
    VmOptions {
        queue_size: 1024,
        ..VmOptions::default()
    }
}

#[test]
fn config_space_advertises_granule_ranges_probe_size_and_bypass() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    let c = vm.config().unwrap();
    assert_eq!(c.page_size_mask & c.page_size_mask.wrapping_neg(), 0x1000);
    assert_eq!((c.input_start, c.input_end), (0, u64::MAX));
    assert_eq!((c.domain_start, c.domain_end), (0, u32::MAX));
    assert_eq!(c.probe_size, 512);
    assert_eq!(c.bypass, 0);
    let b = Daemon::start(Options {
        boot_bypass: true,
        ..Options::default()
    });
    assert_eq!(b.connect().config().unwrap().bypass, 1);
}

#[test]
fn the_whole_request_cycle_programs_translation() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    let (st, props) = vm.probe(1).unwrap();
    assert_eq!(st, Status::Ok);
    let resv = decode_probe_properties(&props).unwrap();
    assert!(
        resv.iter()
            .any(|r| r.kind == ResvKind::Msi && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff)
    );
    assert_eq!(vm.request(&R::attach(2, 1)).unwrap(), Status::Ok);
    assert_eq!(
        vm.request(&R::map(2, 0x10_0000, 0x10_ffff, 0x20_0000, RW))
            .unwrap(),
        Status::Ok
    );
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x10_0123, true),
        Ok(0x20_0123)
    );
    let (domains, endpoints) = d.state();
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0].mappings.len(), 1);
    assert_eq!(
        endpoints.iter().find(|e| e.id == 1).unwrap().domain,
        Some(2)
    );
    assert_eq!(vm.request(&R::unmap(2, 0, u64::MAX)).unwrap(), Status::Ok);
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x10_0123, true),
        Err(Fault::Unmapped)
    );
    assert_eq!(vm.request(&R::detach(2, 1)).unwrap(), Status::Ok);
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x10_0123, true),
        Err(Fault::Blocked)
    );
    assert!(d.state().0.is_empty());
}

/// Every status a spec rule assigns, as seen through the socket. Each case runs on a device
/// where endpoint 1 is attached to paging domain 2 holding 0x10000..=0x1ffff, and endpoint 2 to
/// bypass domain 9.
#[test]
fn every_spec_rule_yields_its_status_over_the_socket() {
    let ram = 64u64 << 20;
    // One case a line: what, the request, the status the spec gives it.
    macro_rules! cases {
        ($($what:literal: $req:expr => $status:ident;)*) => {
            vec![$(($what, $req, Status::$status)),*]
        };
    }
    let cases: Vec<(&str, Request, Status)> = cases! {
        "attach ok": R::attach(3, 3) => Ok;
        "attach reserved": R::attach_raw(3, 3, 0, [1, 0, 0, 0]) => Inval;
        "attach unknown flag": R::attach_raw(3, 3, 2, [0; 4]) => Inval;
        "attach unknown endpoint": R::attach(3, 99) => NoEnt;
        "attach bypass flag to paging domain": R::attach_bypass(2, 3) => Inval;
        "attach paging to bypass domain": R::attach(9, 3) => Inval;
        "attach shares a domain": R::attach(2, 3) => Ok;
        "attach again to same domain": R::attach(2, 1) => Ok;
        "detach ok": R::detach(2, 1) => Ok;
        "detach unknown endpoint": R::detach(2, 99) => NoEnt;
        "detach wrong domain": R::detach(9, 1) => Inval;
        "detach unattached endpoint": R::detach(2, 3) => Inval;
        "map ok": R::map(2, 0x40000, 0x4ffff, 0x40000, RW) => Ok;
        "map unknown flag": R::map(2, 0x40000, 0x4ffff, 0, 8) => Inval;
        "map no domain": R::map(7, 0x40000, 0x4ffff, 0, RW) => NoEnt;
        "map bypass domain": R::map(9, 0x40000, 0x4ffff, 0, RW) => Inval;
        "map mmio": R::map(2, 0x40000, 0x4ffff, 0, RW | MAP_F_MMIO) => Unsupp;
        "map misaligned start": R::map(2, 0x40001, 0x4ffff, 0, RW) => Range;
        "map misaligned end": R::map(2, 0x40000, 0x4fffe, 0, RW) => Range;
        "map misaligned phys": R::map(2, 0x40000, 0x4ffff, 0x10, RW) => Range;
        "map overlap": R::map(2, 0x18000, 0x27fff, 0, RW) => Inval;
        "map msi window": R::map(2, 0xfee0_0000, 0xfee0_ffff, 0, RW) => Inval;
        "map outside guest ram": R::map(2, 0x40000, 0x4ffff, ram, RW) => Fault;
        "map read-only ok": R::map(2, 0x40000, 0x4ffff, 0, MAP_F_READ) => Ok;
        "unmap ok": R::unmap(2, 0x10000, 0x1ffff) => Ok;
        "unmap split": R::unmap(2, 0x10000, 0x17fff) => Range;
        "unmap over holes": R::unmap(2, 0, 0xfffff) => Ok;
        "unmap over nothing": R::unmap(2, 0x90000, 0x9ffff) => Ok;
        "unmap no domain": R::unmap(7, 0, 0xfff) => NoEnt;
        "unmap bypass domain": R::unmap(9, 0, 0xfff) => Inval;
    };
    let d = Daemon::start(Options::default());
    for (what, req, want) in cases {
        let mut vm = d.connect();
        let setup = [
            R::attach(2, 1),
            R::attach_bypass(9, 2),
            R::map(2, 0x10000, 0x1ffff, 0x10000, RW),
        ];
        all_ok(&mut vm, &setup, &format!("{what}: setup"));
        assert_eq!(vm.request(&req).unwrap(), want, "{what}");
        vm.disconnect();
        d.wait_until("teardown", |d| d.backend_mappings() == 0);
    }
}

#[test]
fn probe_of_unknown_endpoint_is_noent_and_a_short_buffer_is_inval() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    assert_eq!(vm.probe(99).unwrap().0, Status::NoEnt);
    let (req, n) = Request::Probe {
        endpoint: EndpointId(1),
    }
    .encode();
    let head = vm.push(&req[..n], 64).unwrap();
    vm.kick().unwrap();
    let used = vm.wait_used(1, TIMEOUT).unwrap();
    assert_eq!(used[0], (head, 64));
    let w = vm.writable_bytes(head);
    assert_eq!(w[60], Status::Inval as u8, "tail in the last four bytes");
    assert!(
        w[..60]
            .iter()
            .all(|&b| b == vhost_user_iommu::driver::POISON),
        "no property written"
    );
}

#[test]
fn a_batch_of_many_requests_in_one_kick_completes_every_request() {
    for (mode, d) in in_each_mode() {
        let mut vm = d.connect_with(big_queue());
        assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
        let reqs: Vec<Request> = (0..200u64)
            .map(|i| R::map(1, i << 12, (i << 12) + 0xfff, i << 12, RW))
            .collect();
        all_ok(&mut vm, &reqs, &format!("{mode:?}"));
        assert_eq!(d.backend_mappings(), 200);
        assert_eq!(
            vm.batch(&[R::unmap(1, 0, u64::MAX)]).unwrap(),
            vec![Status::Ok]
        );
        assert_eq!(d.backend_mappings(), 0);
    }
}

#[test]
fn two_domains_in_flight_at_once_keep_per_domain_order() {
    let d = Daemon::start(Options {
        mode: Mode::Pipeline(2),
        ..Options::default()
    });
    let mut vm = d.connect_with(big_queue());
    all_ok(
        &mut vm,
        &[R::attach(1, 1), R::attach(2, 2)],
        "attach both endpoints",
    );
    // Interleave both domains; within each domain, map then unmap then map again the same
    // IOVA: only in-order execution makes all of them succeed.
    let mut reqs = Vec::new();
    for i in 0..80u64 {
        for dom in [1, 2] {
            let iova = i << 12;
            reqs.push(R::map(dom, iova, iova + 0xfff, iova, RW));
            reqs.push(R::unmap(dom, iova, iova + 0xfff));
            reqs.push(R::map(dom, iova, iova + 0xfff, 0x100000 + iova, RW));
        }
    }
    all_ok(&mut vm, &reqs, "interleaved MAP, UNMAP, MAP");
    assert_eq!(d.soft.translate(EndpointId(1), 0x5000, false), Ok(0x105000));
    assert_eq!(d.soft.translate(EndpointId(2), 0x5000, false), Ok(0x105000));
    // An endpoint moving between domains owned by different executors is ordered against both.
    let mv = vec![
        R::map(1, 0x80_0000, 0x80_0fff, 0x1000, RW),
        R::attach(2, 1),
        R::map(2, 0x90_0000, 0x90_0fff, 0x2000, RW),
    ];
    all_ok(
        &mut vm,
        &mv,
        "a MAP, a move to a domain on the other executor, a MAP there",
    );
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x90_0000, false),
        Ok(0x2000)
    );
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x80_0000, false),
        Err(Fault::Unmapped)
    );
    assert!(
        d.state().0.iter().all(|dom| dom.id == 2),
        "domain 1 destroyed with its last endpoint"
    );
}

#[test]
fn descriptor_abuse_is_answered_without_harm() {
    for (mode, d) in in_each_mode() {
        let mut vm = d.connect();
        let scratch = vm.usable_ram_end() - 0x10000;
        let (att, n) = R::attach(1, 1).encode();
        vm.ram().write(scratch, &att[..n]).unwrap();
        let r = |len: u32| Desc {
            addr: scratch,
            len,
            write: false,
        };
        let w = |off: u64, len: u32| Desc {
            addr: scratch + 0x1000 + off,
            len,
            write: true,
        };
        let ram_size = vm.ram().size();
        let unused: Vec<(&str, Vec<Desc>)> = vec![
            ("no writable part", vec![r(n as u32)]),
            ("tail too short", vec![r(n as u32), w(0, 3)]),
            ("readable after writable", vec![w(0, 4), r(n as u32)]),
            (
                "readable outside guest ram",
                vec![
                    Desc {
                        addr: ram_size,
                        len: 20,
                        write: false,
                    },
                    w(0, 4),
                ],
            ),
            (
                "writable outside guest ram",
                vec![
                    r(n as u32),
                    Desc {
                        addr: ram_size - 2,
                        len: 4,
                        write: true,
                    },
                ],
            ),
            (
                "length wraps the address space",
                vec![
                    r(n as u32),
                    Desc {
                        addr: u64::MAX - 1,
                        len: u32::MAX,
                        write: true,
                    },
                ],
            ),
            ("too many writable descriptors", {
                let mut v = vec![r(n as u32)];
                v.extend((0..17).map(|i| w(i, 1)));
                v
            }),
        ];
        for (what, descs) in &unused {
            for indirect in [false, true] {
                vm.ram().write(scratch + 0x1000, &[0xee; 32]).unwrap();
                let head = vm.push_chain(descs, indirect).unwrap();
                vm.kick().unwrap();
                let used = vm.wait_used(1, TIMEOUT).unwrap();
                assert_eq!(used, vec![(head, 0)], "{mode:?} {what} indirect={indirect}");
                let mut b = [0u8; 4];
                vm.ram().read(scratch + 0x1000, &mut b).unwrap();
                if *what != "readable after writable" {
                    assert_eq!(b, [0xee; 4], "{what}: buffer must stay unwritten");
                }
            }
        }
        assert!(
            d.state().0.is_empty(),
            "{mode:?}: no abusive chain attached anything"
        );
        // Unknown type: used length 0 and the tail untouched.
        vm.ram().write(scratch, &[0x42, 0, 0, 0]).unwrap();
        vm.ram().write(scratch + 0x1000, &[0xee; 4]).unwrap();
        let head = vm.push_chain(&[r(20), w(0, 4)], false).unwrap();
        vm.kick().unwrap();
        assert_eq!(vm.wait_used(1, TIMEOUT).unwrap(), vec![(head, 0)]);
        let mut b = [0u8; 4];
        vm.ram().read(scratch + 0x1000, &mut b).unwrap();
        assert_eq!(b, [0xee; 4]);
        // A request shorter than its type: INVAL in the tail.
        vm.ram().write(scratch, &att[..n]).unwrap();
        let head = vm.push_chain(&[r(12), w(0, 4)], false).unwrap();
        vm.kick().unwrap();
        assert_eq!(vm.wait_used(1, TIMEOUT).unwrap(), vec![(head, 4)]);
        vm.ram().read(scratch + 0x1000, &mut b).unwrap();
        assert_eq!(b[0], Status::Inval as u8);
        // Legitimate but unusual layouts work: the request split over descriptors of 1, 0, 7 and
        // 12 bytes, the tail over two, through an indirect table.
        let split = vec![
            Desc {
                addr: scratch,
                len: 1,
                write: false,
            },
            Desc {
                addr: scratch + 1,
                len: 0,
                write: false,
            },
            Desc {
                addr: scratch + 1,
                len: 7,
                write: false,
            },
            Desc {
                addr: scratch + 8,
                len: 12,
                write: false,
            },
            w(0, 1),
            w(100, 3),
        ];
        for indirect in [false, true] {
            vm.ram().write(scratch + 0x1000, &[0xee; 4]).unwrap();
            vm.ram().write(scratch + 0x1000 + 100, &[0xee; 4]).unwrap();
            let head = vm.push_chain(&split, indirect).unwrap();
            vm.kick().unwrap();
            assert_eq!(
                vm.wait_used(1, TIMEOUT).unwrap(),
                vec![(head, 4)],
                "split indirect={indirect}"
            );
            let (mut a, mut c) = ([0u8; 1], [0u8; 3]);
            vm.ram().read(scratch + 0x1000, &mut a).unwrap();
            vm.ram().read(scratch + 0x1000 + 100, &mut c).unwrap();
            assert_eq!((a, c), ([Status::Ok as u8], [0, 0, 0]));
        }
        // And the device still serves ordinary requests.
        assert_eq!(
            vm.request(&R::map(1, 0x1000, 0x1fff, 0x1000, RW)).unwrap(),
            Status::Ok
        );
        assert!(
            d.metrics
                .malformed
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 14
        );
    }
}

#[test]
fn device_reset_detaches_everything_and_keeps_bypass() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    vm.write_bypass(1).unwrap();
    all_ok(
        &mut vm,
        &[R::attach(1, 1), R::map(1, 0, 0xfff, 0, RW)],
        "attach and map",
    );
    vm.reset_device().unwrap();
    assert!(d.state().0.is_empty());
    assert_eq!(d.backend_mappings(), 0);
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x3000, false),
        Ok(0x3000),
        "bypass kept"
    );
    assert_eq!(vm.config().unwrap().bypass, 1);
}

#[test]
fn restarting_onto_fresh_rings_after_a_stop_is_a_device_reset() {
    let d = Daemon::start(Options {
        mode: Mode::Pipeline(2),
        ..Options::default()
    });
    let mut vm = d.connect();
    all_ok(
        &mut vm,
        &[R::attach(1, 1), R::map(1, 0, 0xfff, 0, RW)],
        "attach and map",
    );
    vm.reset_rings().unwrap();
    assert_eq!(vm.request(&R::attach(5, 2)).unwrap(), Status::Ok);
    let (domains, endpoints) = d.state();
    assert_eq!(domains.iter().map(|d| d.id).collect::<Vec<_>>(), vec![5]);
    assert_eq!(endpoints.iter().find(|e| e.id == 1).unwrap().domain, None);
    assert_eq!(
        d.soft.translate(EndpointId(1), 0, false),
        Err(Fault::Blocked)
    );
}

/// Sends cheap requests until exactly 65,536 went through the request ring since it was set up:
/// its free-running avail index is 0 again.
fn wrap_the_request_ring(vm: &mut vhost_user_iommu::driver::TestVm, sent: usize) {
    let filler = vec![R::attach(1, 1); 512];
    let mut sent = sent;
    while sent < 1 << 16 {
        let n = ((1 << 16) - sent).min(filler.len());
        let statuses = vm.batch(&filler[..n]).unwrap();
        assert!(statuses.iter().all(|s| *s == Status::Ok), "{statuses:?}");
        sent += n;
    }
    assert_eq!(vm.request_queue().avail_idx(), 0);
}

#[test]
fn pausing_and_resuming_the_rings_keeps_every_domain_even_when_the_avail_index_wrapped_to_zero() {
    for (mode, d) in in_each_mode() {
        let mut vm = d.connect_with(big_queue());
        all_ok(
            &mut vm,
            &[R::attach(1, 1), R::map(1, 0, 0xfff, 0, RW)],
            &format!("{mode:?}: attach and map"),
        );
        wrap_the_request_ring(&mut vm, 2);
        let bases = vm.pause_and_resume().unwrap();
        assert_eq!(bases[REQUEST_QUEUE], 0, "{mode:?}");
        assert_eq!(
            vm.request(&R::map(1, 0x1000, 0x1fff, 0x1000, RW)).unwrap(),
            Status::Ok,
            "{mode:?}: the domain is still there after the resume"
        );
        let (domains, endpoints) = d.state();
        assert_eq!(domains.len(), 1, "{mode:?}");
        assert_eq!(domains[0].mappings.len(), 2, "{mode:?}");
        assert_eq!(
            endpoints.iter().find(|e| e.id == 1).unwrap().domain,
            Some(1),
            "{mode:?}"
        );
        assert_eq!(d.soft.translate(EndpointId(1), 0x10, false), Ok(0x10));
    }
}

#[test]
fn restarting_onto_fresh_rings_after_the_avail_index_wrapped_to_zero_is_still_a_device_reset() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect_with(big_queue());
    all_ok(
        &mut vm,
        &[R::attach(1, 1), R::map(1, 0, 0xfff, 0, RW)],
        "attach and map",
    );
    wrap_the_request_ring(&mut vm, 2);
    // The same ring memory, zeroed and set up again from index 0: what a rebooted guest whose
    // driver allocated its ring at the same address looks like.
    vm.reset_rings().unwrap();
    assert_eq!(vm.last_vring_bases().unwrap()[REQUEST_QUEUE], 0);
    assert_eq!(vm.request(&R::attach(5, 2)).unwrap(), Status::Ok);
    let (domains, endpoints) = d.state();
    assert_eq!(domains.iter().map(|d| d.id).collect::<Vec<_>>(), vec![5]);
    assert_eq!(endpoints.iter().find(|e| e.id == 1).unwrap().domain, None);
    assert_eq!(
        d.soft.translate(EndpointId(1), 0, false),
        Err(Fault::Blocked)
    );
}

#[test]
fn disconnect_tears_down_and_the_next_connection_starts_clean() {
    for (mode, d) in in_each_mode() {
        for round in 0..3 {
            let mut vm = d.connect();
            assert_eq!(
                vm.config().unwrap().bypass,
                0,
                "bypass restored on reconnect"
            );
            let reqs = [
                R::attach(1, 1),
                R::attach_bypass(2, 2),
                R::map(1, 0, 0xfff, 0, RW),
            ];
            all_ok(&mut vm, &reqs, &format!("{mode:?} round {round}"));
            vm.write_bypass(1).unwrap();
            vm.disconnect();
            d.wait_until("teardown", |d| {
                d.backend_mappings() == 0
                    && ENDPOINTS
                        .iter()
                        .all(|&e| d.soft.translate(EndpointId(e), 0, false) == Err(Fault::Blocked))
            });
        }
    }
}

#[test]
fn writing_bypass_moves_unattached_endpoints_to_identity_and_back() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    assert_eq!(
        d.soft.translate(EndpointId(3), 0x5000, true),
        Err(Fault::Blocked)
    );
    vm.write_bypass(1).unwrap();
    assert_eq!(vm.config().unwrap().bypass, 1);
    assert_eq!(d.soft.translate(EndpointId(3), 0x5000, true), Ok(0x5000));
    assert_eq!(vm.request(&R::attach(1, 3)).unwrap(), Status::Ok);
    assert_eq!(
        d.soft.translate(EndpointId(3), 0x5000, true),
        Err(Fault::Unmapped)
    );
    vm.write_bypass(0).unwrap();
    assert_eq!(
        d.soft.translate(EndpointId(4), 0x5000, true),
        Err(Fault::Blocked)
    );
}

#[test]
fn memory_regions_added_and_removed_at_runtime_govern_what_may_be_mapped() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    let extra = 1u64 << 32;
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    assert_eq!(
        vm.request(&R::map(1, 0, 0xfff, extra, RW)).unwrap(),
        Status::Fault
    );
    vm.add_region(extra, 2 << 20).unwrap();
    assert_eq!(
        vm.request(&R::map(1, 0, 0xfff, extra, RW)).unwrap(),
        Status::Ok
    );
    assert_eq!(
        vm.request(&R::map(1, 0x1000, 0x1fff, 0x1000, RW)).unwrap(),
        Status::Ok
    );
    vm.remove_region(extra).unwrap();
    assert_eq!(
        d.soft.translate(EndpointId(1), 0, false),
        Err(Fault::Unmapped),
        "torn down"
    );
    assert_eq!(
        d.soft.translate(EndpointId(1), 0x1000, false),
        Ok(0x1000),
        "kept"
    );
    assert_eq!(d.state().0[0].mappings.len(), 1);
}

#[test]
fn a_memory_region_beyond_the_end_of_its_file_is_refused_and_the_daemon_serves_on() {
    let d = Daemon::start(Options::default());
    let extra = 1u64 << 32;
    const MIB: u64 = 1 << 20;
    // (file size, claimed size, offset in the file): each claims bytes the file does not have,
    // whose pages would raise SIGBUS in the daemon when touched.
    let lies = [
        (MIB, 2 * MIB, 0),
        (2 * MIB, 2 * MIB, 4096),
        (2 * MIB, MIB, 2 * MIB),
    ];
    let claim = |(file_size, memory_size, mmap_offset)| Claim {
        gpa: extra,
        file_size,
        memory_size,
        mmap_offset,
    };
    for (i, &lie) in lies.iter().enumerate() {
        let mut vm = d.connect();
        assert!(
            vm.add_region_claiming(claim(lie)).is_err(),
            "ADD_MEM_REG {i} accepted"
        );
        drop(vm);
        let mut vm = d.connect();
        assert!(
            vm.set_mem_table_claiming(claim(lie)).is_err(),
            "SET_MEM_TABLE {i} accepted"
        );
        drop(vm);
    }
    // Still serving, and an honest region still goes through.
    let mut vm = d.connect();
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    vm.add_region_claiming(claim((2 * MIB, MIB, MIB))).unwrap();
    assert_eq!(
        vm.request(&R::map(1, 0, 0xfff, extra, RW)).unwrap(),
        Status::Ok
    );
}

#[test]
fn a_memory_table_change_waits_for_the_requests_in_flight() {
    let d = Daemon::start(Options {
        mode: Mode::Pipeline(2),
        ..Options::default()
    });
    let mut vm = d.connect_with(big_queue());
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    d.faults
        .delay(Op::Map, std::time::Duration::from_millis(30));
    let n = 8u64;
    let heads: Vec<u16> = (0..n)
        .map(|i| {
            let (bytes, len) = R::map(1, i << 12, (i << 12) | 0xfff, i << 12, RW).encode();
            vm.push(&bytes[..len], 4).unwrap()
        })
        .collect();
    vm.kick().unwrap();
    d.wait_until("a MAP is running", |d| d.faults.mapping() > 0);
    // Now the executor works through the maps; the new region must wait for all of them.
    vm.add_region(1 << 32, 2 << 20).unwrap();
    let used = vm.wait_used(heads.len(), TIMEOUT).unwrap();
    assert_eq!(used.len(), heads.len());
    for (head, _) in used {
        assert_eq!(vm.writable_bytes(head)[0], Status::Ok as u8, "chain {head}");
    }
    assert_eq!(
        d.faults.set_ram_while_mapping(),
        0,
        "the backend's set_ram ran while a MAP was in flight"
    );
    assert_eq!(d.state().0[0].mappings.len(), n as usize);
}

#[test]
fn backend_failures_reach_the_guest_as_statuses_and_roll_back() {
    let d = Daemon::start(Options::default());
    let mut vm = d.connect();
    d.faults.fail(Op::CreateDomain, 0, 1, libc::ENOMEM);
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::NoMem);
    assert!(d.state().0.is_empty());
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    d.faults.fail(Op::Map, 0, 1, libc::EFAULT);
    assert_eq!(
        vm.request(&R::map(1, 0, 0xfff, 0, RW)).unwrap(),
        Status::Fault
    );
    assert_eq!(d.backend_mappings(), 0);
    assert!(d.state().0[0].mappings.is_empty());
}

#[test]
fn resource_caps_answer_nomem_and_leave_other_domains_working() {
    let d = Daemon::start(Options {
        mode: Mode::Pipeline(2),
        limits: Limits {
            max_domains: 3,
            max_mappings_per_domain: 50,
            max_mappings_total: 80,
        },
        ..Options::default()
    });
    let mut vm = d.connect();
    all_ok(
        &mut vm,
        &[R::attach(1, 1), R::attach(2, 2)],
        "attach both endpoints",
    );
    let flood: Vec<Request> = (0..60u64)
        .map(|i| R::map(1, i << 12, (i << 12) + 0xfff, 0, RW))
        .collect();
    let st = vm.batch(&flood).unwrap();
    assert_eq!(st.iter().filter(|&&s| s == Status::Ok).count(), 50);
    assert!(st[50..].iter().all(|&s| s == Status::NoMem));
    assert_eq!(vm.request(&R::map(2, 0, 0xfff, 0, RW)).unwrap(), Status::Ok);
    assert_eq!(vm.request(&R::attach(3, 3)).unwrap(), Status::Ok);
    assert_eq!(vm.request(&R::attach(4, 4)).unwrap(), Status::NoMem);
}

#[test]
fn the_device_offers_the_features_the_linux_driver_needs() {
    let d = Daemon::start(Options::default());
    let vm = d.connect();
    let f = vm.device_features();
    for (name, bit) in [
        ("MAP_UNMAP", features::MAP_UNMAP),
        ("PROBE", features::PROBE),
        ("BYPASS_CONFIG", features::BYPASS_CONFIG),
        ("INPUT_RANGE", features::INPUT_RANGE),
        ("DOMAIN_RANGE", features::DOMAIN_RANGE),
        ("VERSION_1", 1 << 32),
    ] {
        assert_ne!(f & bit, 0, "{name} missing");
    }
    assert_eq!(
        f & features::BYPASS,
        0,
        "legacy BYPASS must not be offered with BYPASS_CONFIG"
    );
    assert_eq!(f & features::MMIO, 0, "MMIO mappings are not implemented");
}

#[test]
fn back_to_back_requests_are_found_by_polling_and_a_quiet_guest_is_woken_by_its_kick() {
    use std::sync::atomic::Ordering::Relaxed;
    let d = Daemon::start(Options {
        poll: std::time::Duration::from_millis(200),
        ..Options::default()
    });
    let mut vm = d.connect();
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    // Each answer opens a window; a request that misses it but comes within the 200 ms ceiling
    // widens it, so a guest sending back to back is soon served without a kick or a wake-up.
    for i in 0..64u64 {
        let r = R::map(1, i << 12, (i << 12) + 0xfff, i << 12, RW);
        assert_eq!(vm.request(&r).unwrap(), Status::Ok);
    }
    let hits = d.metrics.poll_hits.load(Relaxed);
    assert!(
        hits > 0,
        "no request of 64 back to back was found by polling"
    );
    // A guest quiet for longer than the ceiling: the window runs out, the vring thread sleeps
    // and the next request comes through a kick.
    let woken = d.metrics.wakeups.load(Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(vm.request(&R::unmap(1, 0, u64::MAX)).unwrap(), Status::Ok);
    assert!(
        d.metrics.wakeups.load(Relaxed) > woken,
        "the request after a quiet spell did not count as a wake-up"
    );
    assert_eq!(d.backend_mappings(), 0);
    let text = d.metrics.render();
    assert!(text.contains("viommu_poll_hits_total ") && text.contains("viommu_wakeups_total "));
}

#[test]
fn a_device_interrupt_makes_the_sleeping_daemon_poll_for_the_guests_next_request() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    use vhost_user_iommu::irq_watch::IrqWatch;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
    let ms = std::time::Duration::from_millis;
    let watch = std::sync::Arc::new(IrqWatch::new().unwrap());
    let d = Daemon::start(Options {
        poll: ms(200),
        irq_watch: Some(watch.clone()),
        ..Options::default()
    });
    // Without EVENT_IDX the driver sees when the device polls (VRING_USED_F_NO_NOTIFY).
    let mut vm = d.connect_with(VmOptions {
        event_idx: false,
        ..VmOptions::default()
    });
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    // Requests that take 2 ms each: the polling ceiling (128 service times) reaches the 200 ms
    // cap, as on a slow machine, so that this thread's own delays cannot outlast a window.
    d.faults.delay(Op::Map, ms(2));
    for i in 0..32u64 {
        let r = R::map(1, i << 12, (i << 12) + 0xfff, i << 12, RW);
        assert_eq!(vm.request(&r).unwrap(), Status::Ok);
    }
    d.faults.clear();
    // The VMM gave the device (endpoint 1's, served over vfio-user) an MSI-X eventfd.
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    watch.set("endpoint 1", 2, 0, &[irq.as_raw_fd()]).unwrap();
    // A quiet guest: past the polling window the daemon sleeps, and a request needs a kick.
    let quiet = ms(500);
    std::thread::sleep(quiet);
    assert!(!vm.device_polls().unwrap());
    let woken = d.metrics.wakeups.load(Relaxed);
    assert_eq!(vm.request(&R::unmap(1, 0, 0xfff)).unwrap(), Status::Ok);
    assert_eq!(d.metrics.wakeups.load(Relaxed), woken + 1);
    // Quiet again; then the device interrupts and the guest's driver answers with a request
    // (an UNMAP in its handler): the daemon is polling by then, so no kick and no wake-up.
    std::thread::sleep(quiet);
    assert!(!vm.device_polls().unwrap());
    let (woken, hits) = (
        d.metrics.wakeups.load(Relaxed),
        d.metrics.irq_poll_hits.load(Relaxed),
    );
    irq.write(1).unwrap();
    d.wait_until("the daemon polls after the interrupt", |_| {
        vm.device_polls().unwrap()
    });
    let (bytes, n) = R::unmap(1, 0x1000, 0x1fff).encode();
    vm.push(&bytes[..n], 4).unwrap();
    assert!(!vm.kick_if_needed().unwrap(), "a kick was asked for");
    assert_eq!(vm.wait_used(1, TIMEOUT).unwrap().len(), 1);
    assert_eq!(d.metrics.irq_poll_hits.load(Relaxed), hits + 1);
    assert_eq!(d.metrics.wakeups.load(Relaxed), woken);
    // The interrupt is still the VMM's to read: the daemon only watched it.
    assert_eq!(irq.read().unwrap(), 1);
    assert!(
        d.metrics
            .render()
            .contains("viommu_irq_poll_hits_total 1\n")
    );
    // A second device whose interrupts the guest never answers (a NIC's receive interrupts):
    // polling after them soon stops, while polling after the first device's goes on.
    let nic = EventFd::new(EFD_NONBLOCK).unwrap();
    watch.set("endpoint 2", 2, 0, &[nic.as_raw_fd()]).unwrap();
    for _ in 0..40 {
        nic.write(1).unwrap();
        std::thread::sleep(ms(30));
    }
    d.wait_until("the polling after the NIC's interrupts ends", |_| {
        !vm.device_polls().unwrap()
    });
    let (wakes, polls) = (
        d.metrics.irq_wakes.load(Relaxed),
        d.metrics.irq_polls.load(Relaxed),
    );
    nic.write(1).unwrap();
    d.wait_until("the NIC's interrupt reaches the daemon", |d| {
        d.metrics.irq_wakes.load(Relaxed) > wakes
    });
    std::thread::sleep(ms(20));
    assert!(
        !vm.device_polls().unwrap(),
        "unanswered interrupts still start polls"
    );
    assert_eq!(
        d.metrics.irq_polls.load(Relaxed),
        polls,
        "a paused window polled"
    );
    irq.write(1).unwrap();
    d.wait_until(
        "the daemon polls after the first device's interrupt",
        |_| vm.device_polls().unwrap(),
    );
    let (bytes, n) = R::unmap(1, 0x2000, 0x2fff).encode();
    vm.push(&bytes[..n], 4).unwrap();
    assert!(!vm.kick_if_needed().unwrap(), "a kick was asked for");
    assert_eq!(vm.wait_used(1, TIMEOUT).unwrap().len(), 1);
    assert_eq!(d.metrics.irq_poll_hits.load(Relaxed), hits + 2);
}

#[test]
fn a_call_eventfd_that_would_block_does_not_wedge_the_device() {
    // The VMM hands over a blocking call eventfd at its maximum count and asks for an interrupt
    // per answer: a blocking write to it would never return, with the device's thread holding
    // the session. Every request must still be answered, and the daemon must still stop.
    let d = Daemon::start(Options::default());
    let mut vm = d.connect_with(VmOptions {
        saturated_call: true,
        ..VmOptions::default()
    });
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
    for i in 0..8u64 {
        let r = R::map(1, i << 12, (i << 12) + 0xfff, i << 12, RW);
        assert_eq!(vm.request(&r).unwrap(), Status::Ok, "request {i}");
    }
    assert_eq!(d.backend_mappings(), 8);
}

#[test]
fn the_vring_thread_alone_changes_the_device_whatever_thread_the_event_comes_from() {
    for (mode, d) in in_each_mode() {
        d.faults.record_callers();
        let mut vm = d.connect();
        assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
        // Events from the vhost-user message thread: a config write, memory-table changes, a
        // ring stop and restart, a device reset and new rings.
        vm.write_bypass(1).unwrap();
        vm.add_region(1 << 32, 2 << 20).unwrap();
        vm.remove_region(1 << 32).unwrap();
        vm.pause_and_resume().unwrap();
        assert_eq!(vm.request(&R::attach(2, 2)).unwrap(), Status::Ok);
        vm.reset_device().unwrap();
        vm.reset_rings().unwrap();
        assert_eq!(vm.request(&R::attach(3, 3)).unwrap(), Status::Ok);
        // From another thread of the daemon: a device connection that closed.
        d.device().unwrap().endpoint_disconnected(EndpointId(3));
        assert_eq!(
            d.soft.translate(EndpointId(3), 0x5000, false),
            Ok(0x5000),
            "{mode:?}: detached into identity (bypass is 1)"
        );
        let calls = d.faults.take_callers();
        for op in [Op::Attach, Op::SetRam, Op::CreateDomain] {
            assert!(
                calls.iter().any(|(o, _)| *o == op),
                "{mode:?}: no {op:?} call seen: {calls:?}"
            );
        }
        // Domains are created and maps run on the executors in pipeline mode; everything else
        // (attachments, memory, bypass, reset) on the vring thread.
        let elsewhere: Vec<_> = calls
            .iter()
            .filter(|(op, t)| {
                t != "vring" && !(mode != Mode::Inline && matches!(op, Op::CreateDomain))
            })
            .collect();
        assert!(
            elsewhere.is_empty(),
            "{mode:?}: backend calls from other threads: {elsewhere:?}"
        );
    }
}

#[test]
fn a_connection_handed_over_while_requests_flow_goes_on_without_the_vmm_noticing() {
    for (mode, d) in in_each_mode() {
        let mut vm = d.connect();
        assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
        vm.write_bypass(1).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        const BATCHES: u64 = 200;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    d.hand_over_connection().unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
            });
            // Stops the handovers whether the batches pass or fail.
            struct Done<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _done = Done(&done);
            // 200 batches of 16 MAPs: every one answered once, with OK (a lost answer times
            // out; a second one would be a used entry nobody waits for, failing the next batch).
            for b in 0..BATCHES {
                let reqs: Vec<_> = (0..16)
                    .map(|i| {
                        let iova = (b * 16 + i) << 12;
                        R::map(1, iova, iova + 0xfff, 0x10_0000, RW)
                    })
                    .collect();
                let st = vm.batch(&reqs).unwrap();
                assert!(
                    st.iter().all(|s| *s == Status::Ok),
                    "{mode:?}: batch {b}: {st:?}"
                );
            }
        });
        let (handovers, longest_ns) = d.handovers();
        assert!(handovers >= 10, "{mode:?}: only {handovers} handovers");
        assert_eq!(d.backend_mappings(), (BATCHES * 16) as usize, "{mode:?}");
        let served = d.metrics.count(RequestType::Map, Status::Ok);
        assert_eq!(
            served,
            BATCHES * 16,
            "{mode:?}: each MAP served exactly once"
        );
        // The resumed connection still negotiates: config space, a ring stop and restart, a
        // device reset.
        assert_eq!(vm.config().unwrap().bypass, 1, "{mode:?}");
        vm.pause_and_resume().unwrap();
        assert_eq!(
            vm.request(&R::unmap(1, 0, u64::MAX)).unwrap(),
            Status::Ok,
            "{mode:?}"
        );
        assert_eq!(d.backend_mappings(), 0, "{mode:?}");
        vm.reset_device().unwrap();
        vm.reset_rings().unwrap();
        assert_eq!(vm.request(&R::attach(2, 2)).unwrap(), Status::Ok);
        eprintln!("{mode:?}: {handovers} handovers, longest pause {longest_ns} ns");
    }
}

#[test]
fn a_vmm_with_other_credentials_is_refused_before_a_byte_is_read() {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let d = Daemon::start(Options {
        vmm: vhost_user_iommu::peer::PeerPolicy {
            uid: Some(me.wrapping_add(1)),
            gid: None,
        },
        ..Options::default()
    });
    let refused = vhost_user_iommu::driver::TestVm::connect(d.socket(), VmOptions::default());
    assert!(refused.is_err(), "another uid got a connection");
    assert!(d.device().is_none_or(|dev| dev.guest_ram().is_none()));
    let d = Daemon::start(Options {
        vmm: vhost_user_iommu::peer::PeerPolicy {
            uid: Some(me),
            gid: None,
        },
        ..Options::default()
    });
    let mut vm = d.connect();
    assert_eq!(vm.request(&R::attach(1, 1)).unwrap(), Status::Ok);
}
