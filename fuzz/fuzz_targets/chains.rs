//! Arbitrary descriptor chains through the real daemon over its socket: the daemon must answer
//! each one (used length 0, or a tail inside the writable part) and keep serving.
#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
use vhost_user_iommu::driver::{Desc, TestVm, VmOptions};
use vhost_user_iommu::ids::{DomainId, EndpointId};
use vhost_user_iommu::protocol::{Request, Status};

struct World {
    _daemon: LocalDaemon,
    vm: TestVm,
}

fn world() -> &'static Mutex<World> {
    static W: OnceLock<Mutex<World>> = OnceLock::new();
    W.get_or_init(|| {
        let daemon = LocalDaemon::start(LocalOptions::default()).expect("daemon");
        let vm = TestVm::connect(daemon.socket(), VmOptions::default()).expect("connect");
        Mutex::new(World {
            _daemon: daemon,
            vm,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut w = world().lock().unwrap();
    let vm = &mut w.vm;
    let scratch = vm.usable_ram_end() - 0x10000;
    let ram = vm.ram().size();
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // The first bytes of the input become request bytes in guest RAM.
    let n = rest.len().min(96);
    vm.ram().write(scratch, &rest[..n]).unwrap();
    let mut descs = Vec::new();
    for c in rest[n..].chunks_exact(4).take(20) {
        let addr = match c[0] % 6 {
            0 => scratch + u64::from(c[1]),
            1 => scratch + 0x1000 + u64::from(c[1]) * 8,
            2 => ram - u64::from(c[1]),
            3 => u64::MAX - u64::from(c[1]),
            _ => scratch + u64::from(c[1] % 64),
        };
        let len = match c[2] % 4 {
            0 => u32::from(c[3]),
            1 => 4,
            2 => u32::MAX - u32::from(c[3]),
            _ => u32::from(c[3]) * 16,
        };
        descs.push(Desc {
            addr,
            len,
            write: c[2] & 0x80 != 0,
        });
    }
    if descs.is_empty() {
        return;
    }
    let Ok(head) = vm.push_chain(&descs, flags & 1 != 0) else {
        return;
    };
    vm.kick().unwrap();
    let used = vm
        .wait_used(1, Duration::from_secs(5))
        .expect("the daemon answers every chain");
    assert_eq!(used[0].0, head);
    let writable: u64 = descs
        .iter()
        .filter(|d| d.write)
        .map(|d| u64::from(d.len))
        .sum();
    assert!(
        u64::from(used[0].1) <= writable,
        "used length beyond the writable part"
    );
    // Still serving.
    let probe = Request::Detach {
        domain: DomainId(1),
        endpoint: EndpointId(99),
    };
    assert_eq!(vm.request(&probe).unwrap(), Status::NoEnt);
});
