//! The demo guest (`--demo`): the simulated VMM and guest driver of the test kit connect to the
//! daemon's own socket and keep sending requests, and a line a second says what was served, so
//! that a first run shows the daemon working without a VM.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::driver::{TestVm, VmOptions};
use crate::protocol::{Request, Status};
use crate::testing::{Rng, random_request};

/// Connects to `socket` and drives the daemon until it goes away (then returns quietly).
pub fn run(socket: &Path) {
    let mut vm = None;
    for _ in 0..100 {
        match TestVm::connect(socket, VmOptions::default()) {
            Ok(v) => {
                vm = Some(v);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let Some(mut vm) = vm else {
        eprintln!("demo guest: cannot connect to {}", socket.display());
        return;
    };
    eprintln!(
        "demo guest: connected to {} as a VMM would; one line a second",
        socket.display()
    );
    let mut rng = Rng(0x5eed);
    let mut counts = [0u64; 9];
    let mut since = Instant::now();
    let mut total = 0u64;
    loop {
        // Mostly what a guest driver does (map and unmap pages of an attached domain), and a
        // few random requests, some of which the spec refuses.
        let mut batch = vec![Request::attach(1, 1)];
        for i in 0..6u64 {
            let iova = (total % 4096 + i) << 12;
            batch.push(Request::map(
                1,
                iova,
                iova + 0xfff,
                0x10_0000 + (i << 12),
                3,
            ));
            batch.push(Request::unmap(1, iova, iova + 0xfff));
        }
        batch.extend((0..3).map(|_| random_request(&mut rng)));
        // A guest's pace, not a benchmark's: the demo must not take a core.
        std::thread::sleep(Duration::from_millis(1));
        let Ok(statuses) = vm.batch(&batch) else {
            eprintln!("demo guest: the daemon closed the connection");
            return;
        };
        for s in statuses {
            counts[s as usize] += 1;
        }
        total += batch.len() as u64;
        let dt = since.elapsed();
        if dt >= Duration::from_secs(1) {
            let n: u64 = counts.iter().sum();
            let failed: Vec<String> = Status::ALL[1..]
                .iter()
                .filter(|s| counts[**s as usize] > 0)
                .map(|s| format!("{} {}", s.name(), counts[*s as usize]))
                .collect();
            eprintln!(
                "demo guest: {:.0} requests/s answered, ok {}, refused by the spec rules: {} ({} in all)",
                n as f64 / dt.as_secs_f64(),
                counts[Status::Ok as usize],
                if failed.is_empty() {
                    "none".to_string()
                } else {
                    failed.join(", ")
                },
                total
            );
            counts = [0; 9];
            since = Instant::now();
        }
    }
}
