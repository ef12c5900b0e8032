//! A hostile VMM on the vhost-user socket: arbitrary sequences of vhost-user messages with
//! arbitrary values (config writes anywhere, memory regions added, removed and claiming more of
//! their file than it has, ring stops and restarts, device resets) mixed with guest requests,
//! against the real daemon. After every input the daemon has torn the connection down (no
//! mapping left in the backend) and serves a new VMM.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::bench::daemon::{LocalDaemon, LocalOptions};
use vhost_user_iommu::driver::{Claim, TestVm, VmOptions};
use vhost_user_iommu::protocol::{Request, Status};
use vhost_user_iommu::testing::{Rng, random_request};

fn daemon() -> &'static LocalDaemon {
    static D: OnceLock<LocalDaemon> = OnceLock::new();
    D.get_or_init(|| LocalDaemon::start(LocalOptions::default()).expect("daemon"))
}

fn options() -> VmOptions {
    VmOptions {
        ram_size: 8 << 20,
        queue_size: 64,
        request_timeout: Duration::from_secs(2),
        ..VmOptions::default()
    }
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut v = [0u8; 8];
    for (k, x) in v.iter_mut().enumerate() {
        *x = b.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(v)
}

fuzz_target!(|data: &[u8]| {
    let d = daemon();
    let Ok(mut vm) = TestVm::connect(d.socket(), options()) else {
        panic!("the daemon does not accept a VMM");
    };
    let mut rng = Rng(u64_at(data, 0) | 1);
    // Each step: [op, 8 bytes of arguments].
    for step in data.chunks(9) {
        let (op, a) = (step[0], u64_at(step, 1));
        let gpa = (a & 0xf) << 24; // 0, 16 MiB, … (some overlap guest RAM at 0)
        let size = ((a >> 4) & 0x3) + 1 << 20; // 1 to 4 MiB
        let r = match op % 10 {
            0 | 1 => vm.request(&random_request(&mut rng)).map(drop),
            2 => vm
                .batch(
                    &(0..(a % 16) + 1)
                        .map(|_| random_request(&mut rng))
                        .collect::<Vec<_>>(),
                )
                .map(drop),
            3 => {
                let off = (a >> 8) as u32 % 48;
                let len = (a as usize % 8) + 1;
                vm.write_config(off, &a.to_le_bytes()[..len])
            }
            4 => vm.add_region(gpa, size),
            5 => {
                // More memory than the file holds, or an offset past its end.
                vm.add_region_claiming(Claim {
                    gpa,
                    file_size: (a >> 8) % (4 << 20),
                    memory_size: size,
                    mmap_offset: (a >> 32) & 0x3f_f000,
                })
            }
            6 => vm.remove_region(gpa),
            7 => vm.pause_and_resume().map(drop),
            8 => vm.reset_rings(),
            _ => vm.reset_device().and_then(|()| vm.reset_rings()),
        };
        if r.is_err() {
            break; // refused, or the daemon ended the connection: both are its right
        }
    }
    vm.disconnect();
    // The connection is torn down: nothing stays mapped for it.
    assert!(
        d.wait_unmapped(Duration::from_secs(10)),
        "mappings left after the VMM left"
    );
    // And the daemon serves the next VMM.
    let mut next = TestVm::connect(d.socket(), options()).expect("the daemon serves a new VMM");
    assert_eq!(next.request(&Request::attach(1, 1)).unwrap(), Status::Ok);
    next.disconnect();
});
