//! Connect/disconnect cycles leak nothing: fds, threads, memory. Its own test binary, with one
//! test: it counts the whole process's fds and threads, which tests running in parallel beside it
//! would change.
//! `LIFECYCLE_CYCLES=10000 cargo test --release --test leaks -- --nocapture` runs the long
//! version and prints the measured growth.

mod common;

use common::{Daemon, RW, in_each_mode};
use vhost_user_iommu::driver::VmOptions;
use vhost_user_iommu::protocol::{Request, Status};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Fds, threads and RSS of this process once the daemon is idle again: the last connection torn
/// down and the serve loop waiting for the next VMM with the next connection's device (and its
/// threads) made. Counting any earlier races the serve loop, which makes those threads right
/// after the teardown.
fn idle(d: &Daemon) -> (usize, usize, u64) {
    d.wait_until("teardown", |d| d.backend_mappings() == 0);
    // Thread creation and exit are asynchronous, and slow on a loaded machine: the count is
    // taken once it held still for 200 ms.
    let deadline = std::time::Instant::now() + 3 * common::TIMEOUT;
    let mut last = (count("/proc/self/task"), std::time::Instant::now());
    loop {
        std::thread::sleep(std::time::Duration::from_millis(10));
        let now = count("/proc/self/task");
        if now != last.0 {
            last = (now, std::time::Instant::now());
        } else if last.1.elapsed() >= std::time::Duration::from_millis(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the thread count never settled: {:?}",
            thread_names()
        );
    }
    (count("/proc/self/fd"), count("/proc/self/task"), rss_kib())
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .map(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4
}

/// MAP of page `i` at IOVA = GPA.
fn map(d: u32, i: u64) -> Request {
    Request::map(d, i << 12, (i << 12) + 0xfff, i << 12, RW)
}

fn cycle(d: &Daemon, i: usize) {
    let mut vm = d.connect_with(VmOptions {
        ram_size: 8 << 20,
        queue_size: 64,
        ..VmOptions::default()
    });
    let reqs = [
        Request::attach(1, 1),
        Request::attach(2, 2),
        map(1, i as u64 % 64),
        map(2, 1),
    ];
    assert_eq!(vm.batch(&reqs).unwrap(), vec![Status::Ok; 4]);
    vm.disconnect();
}

#[test]
fn connect_disconnect_cycles_leak_no_fds_threads_or_memory() {
    let cycles: usize = std::env::var("LIFECYCLE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for (mode, d) in in_each_mode() {
        // Warm up allocator pools and lazily created state before the baseline.
        for i in 0..20 {
            cycle(&d, i);
        }
        let (fds, threads, rss) = idle(&d);
        for i in 0..cycles {
            cycle(&d, i);
        }
        let (fds2, threads2, rss2) = idle(&d);
        println!(
            "{mode:?}: {cycles} cycles: fds {fds} -> {fds2}, threads {threads} -> {threads2}, RSS {rss} KiB -> {rss2} KiB"
        );
        if fds2 > fds || threads2 > threads {
            println!("threads: {:?}", thread_names());
            for e in std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .take(60)
            {
                println!("{:?} -> {:?}", e.path(), std::fs::read_link(e.path()));
            }
        }
        assert!(fds2 <= fds, "{mode:?}: fds grew from {fds} to {fds2}");
        assert!(
            threads2 <= threads,
            "{mode:?}: threads grew from {threads} to {threads2}"
        );
        assert!(
            rss2 < rss + 16 * 1024,
            "{mode:?}: RSS grew from {rss} KiB to {rss2} KiB"
        );
    }
}
