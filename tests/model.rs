//! Thousands of random requests over the socket, each status checked against the spec model in
//! `vhost_user_iommu::testing` (written from §5.13.6 alone, no code shared with the daemon's
//! domain model), and the final translation checked against the model's mappings.

mod common;

use common::Daemon;
use vhost_user_iommu::driver::VmOptions;
use vhost_user_iommu::pipeline::Mode;
use vhost_user_iommu::protocol::{Request, Status};
use vhost_user_iommu::testing::{Model, RAM, Rng, random_request};

fn run(mode: Mode, seed: u64, count: usize) {
    let d = Daemon::in_mode(mode);
    let mut vm = d.connect_with(VmOptions {
        ram_size: RAM,
        ..VmOptions::default()
    });
    assert!(vm.usable_ram_end() <= RAM);
    let mut model = Model::default();
    let mut rng = Rng(seed);
    let mut done = 0;
    while done < count {
        let n = 1 + rng.below(12) as usize;
        let reqs: Vec<Request> = (0..n).map(|_| random_request(&mut rng)).collect();
        let want: Vec<Status> = reqs.iter().map(|r| model.apply(r)).collect();
        let got = vm.batch(&reqs).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i],
                want[i],
                "{mode:?} seed {seed}: request #{} {:?}",
                done + i,
                reqs[i]
            );
        }
        done += n;
    }
    // Translation agrees with the model everywhere the test could have mapped.
    assert_eq!(
        model.translation_differences(&d.soft),
        Vec::<String>::new(),
        "{mode:?} seed {seed}"
    );
    let (domains, _) = d.state();
    assert_eq!(
        domains.iter().map(|d| d.id).collect::<Vec<_>>(),
        model.domain_ids()
    );
}

#[test]
fn random_requests_inline_agree_with_the_spec_model() {
    for seed in [1, 2, 3] {
        run(Mode::Inline, seed, 3000);
    }
}

#[test]
fn random_requests_on_two_executors_agree_with_the_spec_model() {
    for seed in [11, 12, 13] {
        run(Mode::Pipeline(2), seed, 3000);
    }
}
