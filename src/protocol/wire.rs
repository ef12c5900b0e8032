//! The request layouts of virtio spec §5.13.6, the RESV_MEM property, the fault event and the
//! config space (§5.13.4) as byte structs (little-endian fields, no
//! padding), so that decoding and encoding name fields instead of offsets. Each struct is the
//! device-readable part of a request, head included; the tail is written separately.

use vm_memory::ByteValued;
use vm_memory::endian::{Le16, Le32, Le64};

use super::{
    ATTACH_SIZE, CONFIG_SIZE, DETACH_SIZE, FAULT_SIZE, HEAD_SIZE, MAP_SIZE, PROBE_SIZE,
    RESV_MEM_PROPERTY_SIZE, UNMAP_SIZE,
};

/// `struct virtio_iommu_req_head`.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Head {
    pub(super) kind: u8,
    pub(super) reserved: [u8; 3],
}

/// `struct virtio_iommu_req_attach` (without its tail).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Attach {
    pub(super) head: Head,
    pub(super) domain: Le32,
    pub(super) endpoint: Le32,
    pub(super) flags: Le32,
    pub(super) reserved: [u8; 4],
}

/// `struct virtio_iommu_req_detach` (without its tail).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Detach {
    pub(super) head: Head,
    pub(super) domain: Le32,
    pub(super) endpoint: Le32,
    pub(super) reserved: [u8; 8],
}

/// `struct virtio_iommu_req_map` (without its tail).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Map {
    pub(super) head: Head,
    pub(super) domain: Le32,
    pub(super) virt_start: Le64,
    pub(super) virt_end: Le64,
    pub(super) phys_start: Le64,
    pub(super) flags: Le32,
}

/// `struct virtio_iommu_req_unmap` (without its tail).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Unmap {
    pub(super) head: Head,
    pub(super) domain: Le32,
    pub(super) virt_start: Le64,
    pub(super) virt_end: Le64,
    pub(super) reserved: [u8; 4],
}

/// `struct virtio_iommu_req_probe` up to its properties (written into the device-writable part).
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub(super) struct Probe {
    pub(super) head: Head,
    pub(super) endpoint: Le32,
    pub(super) reserved: [u8; 64],
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            head: Head::default(),
            endpoint: Le32::default(),
            reserved: [0; 64],
        }
    }
}

/// `struct virtio_iommu_config` (§5.13.4).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Config {
    pub(super) page_size_mask: Le64,
    pub(super) input_start: Le64,
    pub(super) input_end: Le64,
    pub(super) domain_start: Le32,
    pub(super) domain_end: Le32,
    pub(super) probe_size: Le32,
    pub(super) bypass: u8,
    pub(super) reserved: [u8; 3],
}

/// `struct virtio_iommu_probe_resv_mem` with its property header (§5.13.6.6.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct ResvMemProperty {
    pub(super) kind: Le16,
    pub(super) length: Le16,
    pub(super) subtype: u8,
    pub(super) reserved: [u8; 3],
    pub(super) start: Le64,
    pub(super) end: Le64,
}

/// `struct virtio_iommu_fault` (§5.13.6.7).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(super) struct Fault {
    pub(super) reason: u8,
    pub(super) reserved: [u8; 3],
    pub(super) flags: Le32,
    pub(super) endpoint: Le32,
    pub(super) reserved2: [u8; 4],
    pub(super) address: Le64,
}

// SAFETY: each struct is `#[repr(C, packed)]` over integers, little-endian wrappers and byte
// arrays: no padding, no pointers, every bit pattern valid.
unsafe impl ByteValued for Head {}
// SAFETY: as above.
unsafe impl ByteValued for Attach {}
// SAFETY: as above.
unsafe impl ByteValued for Detach {}
// SAFETY: as above.
unsafe impl ByteValued for Map {}
// SAFETY: as above.
unsafe impl ByteValued for Unmap {}
// SAFETY: as above.
unsafe impl ByteValued for Probe {}
// SAFETY: as above.
unsafe impl ByteValued for Config {}
// SAFETY: as above.
unsafe impl ByteValued for ResvMemProperty {}
// SAFETY: as above.
unsafe impl ByteValued for Fault {}

const _: () = {
    assert!(size_of::<Head>() == HEAD_SIZE);
    assert!(size_of::<Attach>() == ATTACH_SIZE);
    assert!(size_of::<Detach>() == DETACH_SIZE);
    assert!(size_of::<Map>() == MAP_SIZE);
    assert!(size_of::<Unmap>() == UNMAP_SIZE);
    assert!(size_of::<Probe>() == PROBE_SIZE);
    assert!(size_of::<Config>() == CONFIG_SIZE);
    assert!(std::mem::offset_of!(Config, bypass) == 36);
    assert!(size_of::<ResvMemProperty>() == RESV_MEM_PROPERTY_SIZE);
    assert!(size_of::<Fault>() == FAULT_SIZE);
};

/// Reads a `T` from the start of `b` (at least `size_of::<T>()` bytes, checked by the caller).
pub(super) fn read<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(&b[..size_of::<T>()]);
    v
}
