//! The dispatcher without a virtqueue: per-domain order on the executors, ATTACH and DETACH as
//! full barriers, endpoints moving between shards, and every mode answering as the spec model
//! (`crate::testing`) says, checked against the software backend's translation.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::backend::soft::SoftBackend;
use crate::domains::{Limits, status_of};
use crate::guest_ram::RamRegion;
use crate::ids::GpaRange;
use crate::protocol::{MAP_F_READ, MAP_F_WRITE, Status};
use crate::testing::{ENDPOINTS, Model, PAGE, RAM, Rng, random_request};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

struct Fx {
    d: Dispatcher,
    soft: Arc<SoftBackend>,
    probe: Vec<u8>,
    next: u64,
}

/// A dispatcher in `mode` over the software backend, with [`ENDPOINTS`] and [`RAM`] of guest
/// RAM at GPA 0: the set-up the spec model assumes.
fn fx(mode: Mode) -> Fx {
    let eps: Vec<EndpointId> = ENDPOINTS.iter().map(|&e| EndpointId(e)).collect();
    let soft = Arc::new(SoftBackend::new(&eps, false));
    let ram = Arc::new(
        GuestRam::new(vec![RamRegion {
            gpa: GpaRange::with_len(0, RAM).unwrap(),
            host_addr: 0x7000_0000_0000,
            backing: None,
        }])
        .unwrap(),
    );
    soft.set_ram(&ram).unwrap();
    let rules = Rules::for_host(&soft.constraints(), (0, u32::MAX), Limits::default(), 512);
    let backend: Arc<dyn DmaBackend> = soft.clone();
    Fx {
        d: Dispatcher::new(mode, rules, backend, &eps, false, ram).unwrap(),
        soft,
        probe: vec![0; 512],
        next: 0,
    }
}

impl Fx {
    /// Submits `req` under the next token: `(token, Some(status))` when it finished at once.
    fn submit(&mut self, req: Request) -> (u64, Option<Status>) {
        self.next += 1;
        let token = self.next;
        match self.d.submit(req, token, &mut self.probe) {
            Submitted::Done(o) => (token, Some(status_of(&o))),
            Submitted::Queued => (token, None),
        }
    }

    /// A request that finishes at once (ATTACH, DETACH, PROBE, and everything inline).
    fn now(&mut self, req: Request) -> Status {
        let (token, s) = self.submit(req);
        s.unwrap_or_else(|| panic!("request {token} was queued"))
    }

    /// What the executors completed so far, oldest first, without waiting.
    fn taken(&mut self) -> Vec<(u64, Status)> {
        self.d
            .completed()
            .map(|(t, o)| (t, status_of(&o)))
            .collect()
    }

    /// Waits for everything in flight, then [`Fx::taken`].
    fn finish(&mut self) -> Vec<(u64, Status)> {
        self.d.wait_idle();
        self.taken()
    }
}

#[test]
fn map_and_unmap_of_one_domain_execute_in_the_order_they_were_submitted() {
    for n in [1, 2, 3] {
        let mut f = fx(Mode::Pipeline(n));
        for e in 1..=4 {
            assert_eq!(f.now(Request::attach(e, e)), Status::Ok);
        }
        // Per domain: map, unmap, map again the same IOVA elsewhere. Out of order, the second
        // MAP would overlap the first (INVAL) or the UNMAP would remove the second.
        let mut domain_of = BTreeMap::new();
        for i in 0..60u64 {
            let iova = i * PAGE;
            for dom in 1..=4u32 {
                let second = 0x20_0000 * u64::from(dom) + iova;
                for req in [
                    Request::map(dom, iova, iova + PAGE - 1, iova, RW),
                    Request::unmap(dom, iova, iova + PAGE - 1),
                    Request::map(dom, iova, iova + PAGE - 1, second, RW),
                ] {
                    let (token, now) = f.submit(req);
                    assert_eq!(now, None, "{n} executors: MAP/UNMAP go to an executor");
                    domain_of.insert(token, dom);
                }
            }
        }
        let done = f.finish();
        assert_eq!(
            done.len(),
            domain_of.len(),
            "{n} executors: every one completes"
        );
        let failed: Vec<_> = done.iter().filter(|&&(_, s)| s != Status::Ok).collect();
        assert!(failed.is_empty(), "{n} executors: {failed:?}");
        for dom in 1..=4 {
            let tokens: Vec<u64> = done
                .iter()
                .map(|&(t, _)| t)
                .filter(|t| domain_of[t] == dom)
                .collect();
            assert!(
                tokens.windows(2).all(|w| w[0] < w[1]),
                "{n} executors: domain {dom} completed out of order: {tokens:?}"
            );
        }
        for e in 1..=4u32 {
            assert_eq!(
                f.soft.translate(EndpointId(e), 59 * PAGE + 0x10, true),
                Ok(0x20_0000 * u64::from(e) + 59 * PAGE + 0x10),
                "{n} executors: endpoint {e} through the last MAP"
            );
        }
    }
}

#[test]
fn attach_and_detach_wait_for_every_request_submitted_before_them() {
    let mut f = fx(Mode::Pipeline(2));
    assert_eq!(f.now(Request::attach(1, 1)), Status::Ok);
    let queued: Vec<u64> = (0..100u64)
        .map(|i| {
            let (token, now) = f.submit(Request::map(1, i * PAGE, i * PAGE + 0xfff, 0, RW));
            assert_eq!(now, None);
            token
        })
        .collect();
    assert_eq!(f.now(Request::attach(2, 2)), Status::Ok);
    // The barrier returned: nothing is in flight and every earlier completion is collected.
    assert_eq!(f.d.in_flight(), 0);
    let done = f.taken();
    assert_eq!(done.iter().map(|&(t, _)| t).collect::<Vec<_>>(), queued);
    assert!(done.iter().all(|&(_, s)| s == Status::Ok), "{done:?}");

    let (token, _) = f.submit(Request::unmap(1, 0, u64::MAX));
    assert_eq!(f.now(Request::detach(2, 2)), Status::Ok);
    assert_eq!(f.d.in_flight(), 0);
    assert_eq!(f.taken(), vec![(token, Status::Ok)]);
    // Domain 2 went with its endpoint; domain 1 stays, emptied by the UNMAP.
    let sizes = f.soft.domain_sizes();
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    assert_eq!(sizes[0].1, 0, "{sizes:?}");
}

#[test]
fn an_endpoint_moved_to_a_domain_on_another_executor_translates_through_it_at_once() {
    let mut f = fx(Mode::Pipeline(2));
    // Domain 1 lives on executor 1, domain 2 on executor 0.
    assert_eq!(f.now(Request::attach(1, 1)), Status::Ok);
    let (_, now) = f.submit(Request::map(1, 0x1000, 0x1fff, 0x5000, RW));
    assert_eq!(now, None);
    assert_eq!(f.now(Request::attach(2, 1)), Status::Ok);
    let (_, now) = f.submit(Request::map(2, 0x1000, 0x1fff, 0x9000, RW));
    assert_eq!(now, None);
    // Domain 1 lost its last endpoint with the move and is gone.
    let (_, now) = f.submit(Request::map(1, 0x3000, 0x3fff, 0x5000, RW));
    assert_eq!(now, None);
    let done: Vec<Status> = f.finish().into_iter().map(|(_, s)| s).collect();
    assert_eq!(done, vec![Status::Ok, Status::Ok, Status::NoEnt]);
    assert_eq!(f.soft.translate(EndpointId(1), 0x1010, false), Ok(0x9010));
    assert_eq!(f.soft.domain_sizes().len(), 1);
}

#[test]
fn every_mode_answers_random_requests_as_the_spec_model_does() {
    for mode in [Mode::Inline, Mode::Pipeline(1), Mode::Pipeline(3)] {
        for seed in [1, 2, 3] {
            let mut f = fx(mode);
            let mut model = Model::default();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
            let mut want = BTreeMap::new();
            let mut got = BTreeMap::new();
            for _ in 0..60 {
                // A batch as the vring thread submits one: then it waits for the executors.
                for _ in 0..1 + rng.below(40) {
                    let req = random_request(&mut rng);
                    let status = model.apply(&req);
                    let (token, now) = f.submit(req);
                    want.insert(token, (status, req));
                    if let Some(s) = now {
                        got.insert(token, s);
                    }
                }
                got.extend(f.finish());
            }
            assert_eq!(
                got.len(),
                want.len(),
                "{mode:?} seed {seed}: every request answered"
            );
            for (token, (status, req)) in &want {
                assert_eq!(
                    got[token], *status,
                    "{mode:?} seed {seed}: request {token} {req:?}"
                );
            }
            assert_eq!(
                model.translation_differences(&f.soft),
                Vec::<String>::new(),
                "{mode:?} seed {seed}"
            );
        }
    }
}
