use super::*;
use crate::backend::fault::{FaultyBackend, Injector, Op};
use crate::backend::soft::SoftBackend;

/// One endpoint (1), soft-backend rules, inline, no polling.
fn inline_settings() -> DeviceSettings {
    DeviceSettings {
        poll: std::time::Duration::ZERO,
        ..DeviceSettings::new(
            vec![EndpointId(1)],
            crate::bench::daemon::soft_rules(crate::domains::Limits::default()),
            Mode::Inline,
        )
    }
}

fn file_table(regions: &[(u64, u64, u64)]) -> GuestMemoryMmap {
    // (gpa, file size, mapped size)
    let regions = regions
        .iter()
        .map(|&(gpa, file_size, size)| {
            let file = crate::testing::unlinked_file(file_size);
            let m = vm_memory::MmapRegion::from_file(
                vm_memory::FileOffset::new(file, 0),
                size as usize,
            )
            .unwrap();
            vm_memory::GuestRegionMmap::new(m, vm_memory::GuestAddress(gpa)).unwrap()
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).unwrap()
}

#[test]
fn a_table_past_the_end_of_a_file_is_refused_and_the_accepted_one_stays() {
    let settings = inline_settings();
    let backend = Arc::new(SoftBackend::new(&[EndpointId(1)], false));
    let dev = IommuDevice::new(settings, backend, Arc::new(Metrics::default())).unwrap();
    dev.set_memory_table(file_table(&[(0, 0x10_0000, 0x10_0000)]))
        .unwrap();
    let err = dev
        .set_memory_table(file_table(&[(0, 0x10_0000, 0x20_0000)]))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("past the end"), "{err}");
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let now = dev.memory().memory();
    assert_eq!(now.num_regions(), 1);
    assert_eq!(
        now.iter().next().unwrap().len(),
        0x10_0000,
        "the rings still see the accepted table"
    );
    assert_eq!(dev.guest_ram().unwrap().regions()[0].gpa.end(), 0xf_ffff);
}

#[test]
fn a_refused_memory_table_keeps_the_backends_message() {
    let injector = Arc::new(Injector::default());
    let backend = Arc::new(FaultyBackend::new(
        SoftBackend::new(&[EndpointId(1)], false),
        injector.clone(),
    ));
    let settings = inline_settings();
    let dev = IommuDevice::new(settings, backend, Arc::new(Metrics::default())).unwrap();
    injector.fail(Op::SetRam, 0, 1, libc::ENOMEM);
    let err = dev.set_memory_table(GuestMemoryMmap::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    let text = err.to_string();
    assert!(
        text.contains("set_ram failed on injected: set ram"),
        "{text}"
    );
    assert!(text.contains("Cannot allocate memory"), "{text}");
    // Not applied: the next table goes through.
    assert!(dev.guest_ram().is_none());
    dev.set_memory_table(GuestMemoryMmap::new()).unwrap();
    assert!(dev.guest_ram().is_some());
}
