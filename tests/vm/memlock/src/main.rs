//! memlock: RLIMIT_MEMLOCK exhaustion is reported clearly and recovers (issue 7), inside the
//! test VM (tests/vm/run.sh).
//!
//! The program drops CAP_IPC_LOCK from its effective, permitted and inheritable sets (with it
//! iommufd charges nothing: `iopt_alloc_pages` picks `IOPT_PAGES_ACCOUNT_NONE` when
//! `capable(CAP_IPC_LOCK)`) before any thread exists, so every daemon thread runs without it, and
//! keeps RLIMIT_MEMLOCK's hard limit unlimited while moving the soft limit (raising a soft limit
//! up to the hard one needs no capability). It then starts the real daemon in this process
//! (`server::serve` on a unix socket, inline mode) with the iommufd backend over both edu VFIO
//! cdevs and, once per map strategy (COPY, MAP_FILE, MAP).
//!
//! COPY stages all guest RAM at the memory table (`staged_round`):
//!
//! 1. soft limit 16 MiB, `TestVm` (64 MiB guest RAM) connects: the memory table cannot be pinned,
//!    the VMM's SET_MEM_TABLE is refused, the daemon logs the limit and what is needed, keeps
//!    serving, and nothing stays pinned (`pinned_bytes()`, `VmPin` of /proc/self/status);
//! 2. soft limit 72 MiB (guest RAM + 8 MiB): the same daemon accepts the next connection;
//! 3. a 16 MiB MAP is copied from staging and charges nothing;
//! 4. soft limit 256 MiB: an edu DMA round trip through the mapping lands at the right GPA; the
//!    disconnect leaves nothing pinned.
//!
//! MAP_FILE and MAP stage on demand (`on_demand_round`): under the 16 MiB limit the 64 MiB guest
//! connects pinning nothing; an 8 MiB MAP fits, a further 16 MiB MAP gets S_NOMEM with the limit
//! and the need named; a bypass ATTACH (it needs all guest RAM staged) gets S_NOMEM naming the
//! identity IOAS and leaves the endpoint blocked; at 256 MiB the same connection maps the 16 MiB
//! and DMA goes through; the disconnect leaves nothing pinned.
//!
//! Output: `PASS: name` / `FAIL: name: why` per check; exit status 1 if any failed.

use std::fs;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vhost_user_iommu::backend::Attachment;
use vhost_user_iommu::backend::iommufd::{IommufdBackend, MapStrategy};
use vhost_user_iommu::driver::TestVm;
use vhost_user_iommu::ids::EndpointId;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{ATTACH_F_BYPASS, Status};

use guest_kit::daemon::*;
use guest_kit::edu::*;

const MIB: u64 = 1 << 20;
/// The TestVm's guest RAM (its default), at GPA 0.
const RAM: u64 = 64 * MIB;
/// Soft RLIMIT_MEMLOCK below what guest RAM needs.
const LOW: u64 = 16 * MIB;
/// Guest RAM fits, a 16 MiB direct MAP on top does not.
const MID: u64 = RAM + 8 * MIB;
/// Everything fits.
const HIGH: u64 = 256 * MIB;
/// The big mapping: 16 MiB of guest RAM at GPA 16 MiB, at an IOVA above guest RAM (an identity
/// leak cannot land there) and below edu's 28-bit DMA mask.
const BIG: u64 = 16 * MIB;
const GPA_BIG: u64 = 16 * MIB;
const IOVA_BIG: u64 = 0x0900_0000;
/// A MAP that fits under `LOW` when nothing is staged: 8 MiB at GPA 32 MiB, IOVA 128 MiB.
const SMALL: u64 = 8 * MIB;
const GPA_SMALL: u64 = 32 * MIB;
const IOVA_SMALL: u64 = 0x0800_0000;

/// `CAP_IPC_LOCK` (include/uapi/linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes CAP_IPC_LOCK from this thread's effective, permitted and inheritable sets (threads
/// created afterwards inherit that). Returns the effective set (low word) after.
fn drop_ipc_lock() -> Result<u32> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two data structs, both ours and large enough.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    let bit = !(1u32 << CAP_IPC_LOCK);
    data[0].effective &= bit;
    data[0].permitted &= bit;
    data[0].inheritable &= bit;
    // SAFETY: capset reads the header and the two data structs we pass.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    let eff = status_field("CapEff:")?;
    let eff = u64::from_str_radix(eff.trim(), 16).map_err(|e| format!("CapEff {eff:?}: {e}"))?;
    if eff & (1 << CAP_IPC_LOCK) != 0 {
        return Err(format!("CapEff {eff:#x} still has CAP_IPC_LOCK"));
    }
    Ok(eff as u32)
}

fn status_field(name: &str) -> Result<String> {
    let s =
        fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("no {name} line in /proc/self/status"))
}

/// `VmPin` of /proc/self/status in bytes: iommufd adds every page it pins to the pinning mm's
/// `pinned_vm` whatever the accounting mode, so this is the kernel's own count.
fn vm_pin() -> Result<u64> {
    let v = status_field("VmPin:")?;
    v.trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .map(|k| k * 1024)
        .map_err(|e| format!("VmPin {v:?}: {e}"))
}

/// Soft RLIMIT_MEMLOCK = `soft`, hard unlimited (the first call raises the hard limit, which
/// needs CAP_SYS_RESOURCE; later ones leave it and need nothing).
fn set_memlock(soft: u64) -> Result<()> {
    let rl = libc::rlimit {
        rlim_cur: soft,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        return Err(format!(
            "setrlimit(RLIMIT_MEMLOCK, {soft}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mib(b: u64) -> String {
    if b.is_multiple_of(MIB) {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} bytes")
    }
}

/// The daemon's error text must name the limit, its current value and what is needed.
fn expect_hint(line: &str, limit: u64, needed: u64) -> Result<()> {
    for want in [
        "RLIMIT_MEMLOCK".to_string(),
        format!("now {limit} bytes"),
        format!("must be at least {needed} bytes"),
    ] {
        if !line.contains(&want) {
            return Err(format!("{want:?} missing from {line:?}"));
        }
    }
    Ok(())
}

/// Waits until the connection that was current when `before` was read from `d.devices()` is
/// torn down; the daemon must still be serving.
fn wait_torn_down(d: &Daemon, before: usize) -> Result<()> {
    d.wait_closed(before, Duration::from_secs(10))?;
    d.alive()
}

/// What the backend and the kernel say is pinned must both be `want` bytes.
fn expect_pinned(b: &IommufdBackend, want: u64, when: &str) -> Result<String> {
    let (backend, kernel) = (b.pinned_bytes(), vm_pin()?);
    if backend != want || kernel != want {
        return Err(format!(
            "{when}: pinned_bytes {} and VmPin {}, expected {} for both",
            mib(backend),
            mib(kernel),
            mib(want)
        ));
    }
    Ok(format!("pinned_bytes = VmPin = {}", mib(want)))
}

/// COPY, which stages all guest RAM at the memory table: refusal, recovery, a free COPY,
/// recovery and DMA.
fn staged_round(rep: &mut Report, d: &Daemon, edu: &Edu, s: MapStrategy, seed: u8) -> Result<()> {
    let b = &*d.backend;
    let n = s.name();
    b.set_map_strategy(Some(s));
    set_memlock(LOW)?;

    // 1. The memory table cannot be pinned.
    let mark = log_mark();
    let before = d.devices();
    let refused = rep.check(
        &format!(
            "{n}: under RLIMIT_MEMLOCK {} the {} memory table is refused, the daemon names the limit and the need",
            mib(LOW),
            mib(RAM)
        ),
        (|| {
            let vmm = match d.connect() {
                Ok(vm) => {
                    vm.disconnect();
                    return Err(format!(
                        "the connection was accepted under RLIMIT_MEMLOCK {} (pinned_bytes {}, VmPin {})",
                        mib(LOW),
                        mib(b.pinned_bytes()),
                        mib(vm_pin().unwrap_or(u64::MAX))
                    ));
                }
                Err(e) => e,
            };
            if !vmm.contains("SET_MEM_TABLE") {
                return Err(format!("the VMM failed elsewhere: {vmm}"));
            }
            let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
            expect_hint(&line, LOW, RAM)?;
            wait_torn_down(d, before)?;
            Ok(format!("VMM: {vmm}; daemon: {line}"))
        })(),
    );
    rep.check(
        &format!(
            "{n}: nothing stays pinned after the refused memory table, the daemon keeps serving"
        ),
        (|| {
            if refused {
                wait_torn_down(d, before)?;
            }
            if !b.domain_ids().is_empty() {
                return Err(format!("paging IOASes left: {:?}", b.domain_ids()));
            }
            expect_pinned(b, 0, "after the refusal")
        })(),
    );

    // 2. Recovery: a higher limit, the same daemon, a new connection.
    set_memlock(MID)?;
    let mut vm = match d.connect() {
        Ok(vm) => vm,
        Err(e) => {
            rep.check(
                &format!(
                    "{n}: after raising RLIMIT_MEMLOCK to {} the same daemon accepts the connection",
                    mib(MID)
                ),
                Err(e),
            );
            return Ok(());
        }
    };
    let accepted = rep.check(
        &format!(
            "{n}: after raising RLIMIT_MEMLOCK to {} the same daemon accepts the connection",
            mib(MID)
        ),
        (|| {
            d.alive()?;
            attach(&mut vm, 1, 1, 0)?;
            expect_pinned(b, RAM, "connected")
        })(),
    );

    // 3. A MAP beyond what the limit leaves.
    if accepted {
        let copies = b.copy_count();
        let mark = log_mark();
        let mapped = if s == MapStrategy::Copy {
            rep.check(
                &format!(
                    "{n}: a {} MAP beyond what RLIMIT_MEMLOCK {} leaves is copied from staging and charges nothing",
                    mib(BIG),
                    mib(MID)
                ),
                (|| {
                    ok(
                        map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG, RW)?,
                        "MAP 16 MiB",
                    )?;
                    if b.copy_count() != copies + 1 {
                        return Err(format!(
                            "{} COPYs, expected {}",
                            b.copy_count(),
                            copies + 1
                        ));
                    }
                    expect_pinned(b, RAM, "after the MAP")
                })(),
            )
        } else {
            rep.check(
                &format!(
                    "{n}: a {} MAP beyond RLIMIT_MEMLOCK {} gets S_NOMEM, the daemon names the limit and the need, nothing more is pinned",
                    mib(BIG),
                    mib(MID)
                ),
                (|| {
                    let st = map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG, RW)?;
                    if st != Status::NoMem {
                        return Err(format!("MAP 16 MiB: status {}, expected NOMEM", st.name()));
                    }
                    let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
                    expect_hint(&line, MID, RAM + BIG)?;
                    d.alive()?;
                    let pin = expect_pinned(b, RAM, "after the refused MAP")?;
                    Ok(format!("{pin}; daemon: {line}"))
                })(),
            );
            false
        };

        // 4. Recovery: raise the limit; the same connection maps, DMA goes through.
        set_memlock(HIGH)?;
        let (map_again, want) = if s == MapStrategy::Copy {
            let copied = if mapped {
                Ok(false)
            } else {
                Err("the COPY MAP above failed".to_string())
            };
            (copied, RAM)
        } else {
            // The refused MAP left nothing mapped: the same range maps now.
            (Ok(true), RAM + BIG)
        };
        recovery_check(rep, &mut vm, b, edu, n, seed, map_again, want);
    }

    let before = d.devices();
    vm.disconnect();
    disconnect_check(rep, d, n, before);
    Ok(())
}

/// A round's recovery, RLIMIT_MEMLOCK raised: the same connection maps the 16 MiB range
/// (`map_again`: whether it still has to; an error if it should be mapped and is not), `want`
/// bytes are pinned after, and an edu DMA round trip goes through the mapping.
#[allow(clippy::too_many_arguments)]
fn recovery_check(
    rep: &mut Report,
    vm: &mut TestVm,
    b: &IommufdBackend,
    edu: &Edu,
    n: &str,
    seed: u8,
    map_again: Result<bool>,
    want: u64,
) {
    rep.check(
        &format!(
            "{n}: after raising RLIMIT_MEMLOCK to {} the same connection maps {} and edu DMA goes through",
            mib(HIGH),
            mib(BIG)
        ),
        (|| {
            if map_again? {
                ok(
                    map_status(vm, 1, IOVA_BIG, GPA_BIG, BIG, RW)?,
                    "MAP 16 MiB again",
                )?;
            }
            let pin = expect_pinned(b, want, "after the MAP")?;
            round_trip(vm, edu, IOVA_BIG, GPA_BIG, &pattern(seed))?;
            Ok(format!("{pin}; {} round trip through IOVA {IOVA_BIG:#x}", edu.name))
        })(),
    );
}

/// The disconnect of a round's connection (devices counted `before` it) leaves no IOAS and
/// nothing pinned.
fn disconnect_check(rep: &mut Report, d: &Daemon, n: &str, before: usize) {
    let b = &*d.backend;
    rep.check(
        &format!("{n}: the disconnect leaves nothing pinned"),
        (|| {
            wait_torn_down(d, before)?;
            if !b.domain_ids().is_empty() {
                return Err(format!("paging IOASes left: {:?}", b.domain_ids()));
            }
            expect_pinned(b, 0, "after the disconnect")
        })(),
    );
}

/// MAP_FILE or MAP, with guest RAM staged on demand: the memory table pins nothing, so it is
/// accepted under a limit below guest RAM; a MAP beyond what the limit leaves gets S_NOMEM;
/// a bypass ATTACH, which needs all guest RAM staged, is refused and leaves the endpoint
/// blocked; a higher limit lets the same connection map, and DMA goes through.
fn on_demand_round(
    rep: &mut Report,
    d: &Daemon,
    edu: &Edu,
    s: MapStrategy,
    seed: u8,
) -> Result<()> {
    let b = &*d.backend;
    let n = s.name();
    b.set_map_strategy(Some(s));
    set_memlock(LOW)?;
    let mut vm = match d.connect() {
        Ok(vm) => vm,
        Err(e) => {
            rep.check(
                &format!(
                    "{n}: staged on demand, the {} memory table is accepted under RLIMIT_MEMLOCK {}",
                    mib(RAM),
                    mib(LOW)
                ),
                Err(e),
            );
            return Ok(());
        }
    };
    let before = d.devices();
    let go = rep.check(
        &format!(
            "{n}: staged on demand, the {} memory table is accepted under RLIMIT_MEMLOCK {} and pins nothing",
            mib(RAM),
            mib(LOW)
        ),
        (|| {
            d.alive()?;
            attach(&mut vm, 1, 1, 0)?;
            expect_pinned(b, 0, "connected")
        })(),
    );
    if go {
        let mark = log_mark();
        rep.check(
            &format!(
                "{n}: a {} MAP fits, a further {} MAP gets S_NOMEM, the daemon names the limit and the need",
                mib(SMALL),
                mib(BIG)
            ),
            (|| {
                ok(
                    map_status(&mut vm, 1, IOVA_SMALL, GPA_SMALL, SMALL, RW)?,
                    "MAP 8 MiB",
                )?;
                expect_pinned(b, SMALL, "after the 8 MiB MAP")?;
                let st = map_status(&mut vm, 1, IOVA_BIG, GPA_BIG, BIG, RW)?;
                if st != Status::NoMem {
                    return Err(format!("MAP 16 MiB: status {}, expected NOMEM", st.name()));
                }
                let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
                expect_hint(&line, LOW, SMALL + BIG)?;
                let pin = expect_pinned(b, SMALL, "after the refused MAP")?;
                Ok(format!("{pin}; daemon: {line}"))
            })(),
        );
        let mark = log_mark();
        rep.check(
            &format!(
                "{n}: a bypass ATTACH, which needs all {} of guest RAM staged, is refused under RLIMIT_MEMLOCK {}; the endpoint stays blocked, nothing more is pinned",
                mib(RAM),
                mib(LOW)
            ),
            (|| {
                let st = attach_status(&mut vm, 2, 2, ATTACH_F_BYPASS)?;
                if st == Status::Ok {
                    return Err("the bypass ATTACH succeeded".into());
                }
                let line = wait_log(mark, "RLIMIT_MEMLOCK", Duration::from_secs(10))?;
                if !line.contains("identity IOAS") {
                    return Err(format!("the limit line does not name the identity IOAS: {line}"));
                }
                if b.attachment(EndpointId(2)) != Some(Attachment::Blocked) {
                    return Err(format!("endpoint 2 is {:?}", b.attachment(EndpointId(2))));
                }
                d.alive()?;
                let pin = expect_pinned(b, SMALL, "after the refused ATTACH")?;
                Ok(format!("status {}; {pin}; daemon: {line}", st.name()))
            })(),
        );
        set_memlock(HIGH)?;
        recovery_check(rep, &mut vm, b, edu, n, seed, Ok(true), SMALL + BIG);
    }
    vm.disconnect();
    disconnect_check(rep, d, n, before);
    Ok(())
}

fn main() -> ExitCode {
    let mut rep = Report::default();
    // Before any thread exists: capabilities are per thread and inherited at clone.
    let caps = (|| {
        set_memlock(LOW)?;
        let eff = drop_ipc_lock()?;
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        if rl.rlim_cur != LOW || rl.rlim_max != libc::RLIM_INFINITY {
            return Err(format!("RLIMIT_MEMLOCK is {rl:?}"));
        }
        Ok(format!(
            "CapEff {eff:#x}; soft {}, hard unlimited; VmPin {}",
            mib(LOW),
            mib(vm_pin()?)
        ))
    })();
    if !rep.check(
        "CAP_IPC_LOCK dropped, RLIMIT_MEMLOCK soft limit below guest RAM",
        caps,
    ) {
        return ExitCode::FAILURE;
    }
    record_log();

    let t0 = Instant::now();
    let setup = (|| {
        let (backend, edus) = backend_over_two_edus()?;
        let edu = Edu::open(&backend, EndpointId(1), format!("edu {}", edus[0].0))?;
        let note = format!(
            "endpoint 1 = {}, endpoint 2 = {}; staging HWPT {:?}; MAP_FILE {}; automatic strategy {}",
            edus[0].0,
            edus[1].0,
            backend.staging_hwpt(),
            backend.map_file_supported(),
            backend.auto_map_strategy().name()
        );
        if backend.staging_hwpt().is_none() {
            return Err(format!(
                "{note}: no staging HWPT, so set_ram pins nothing and these checks do not apply"
            ));
        }
        let d = Daemon::start("memlock", backend, Mode::Inline, false)?;
        Ok((d, edu, note))
    })();
    let (d, edu) = match setup {
        Ok((d, edu, note)) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs, without CAP_IPC_LOCK",
                Ok(note),
            );
            (d, edu)
        }
        Err(e) => {
            rep.check(
                "daemon with the iommufd backend over both edu cdevs, without CAP_IPC_LOCK",
                Err(e),
            );
            return ExitCode::FAILURE;
        }
    };
    let mut strategies = Vec::new();
    for s in [MapStrategy::Copy, MapStrategy::MapFile, MapStrategy::Map] {
        if s == MapStrategy::MapFile && !d.backend.map_file_supported() {
            println!(
                "INFO: no IOMMU_IOAS_MAP_FILE in this kernel: {} skipped",
                s.name()
            );
            continue;
        }
        if s == MapStrategy::Copy && d.backend.copy_works() == Some(false) {
            println!(
                "INFO: sub-range IOMMU_IOAS_COPY does not work here: {} skipped",
                s.name()
            );
            continue;
        }
        strategies.push(s);
    }
    for (i, s) in strategies.into_iter().enumerate() {
        let round = if s == MapStrategy::Copy {
            staged_round
        } else {
            on_demand_round
        };
        if let Err(e) = round(&mut rep, &d, &edu, s, i as u8 + 1) {
            rep.check(&format!("{}: round", s.name()), Err(e));
        }
    }
    drop(edu);
    drop(d);
    rep.finish("memlock", t0)
}
