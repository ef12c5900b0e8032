//! The vfio-user device front: each assigned PCI device is served to the VMM over its own
//! unix socket with the standard vfio-user protocol (nutanix/libvfio-user
//! `docs/vfio-user.rst`, version 0.0), so stock QEMU uses it with
//! `-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"…"}}'`
//! (the dotted `socket.type=unix,…` form is refused by QEMU 11.1's `-device`).
//!
//! The daemon owns the device: it opened the VFIO cdev and bound it to its iommufd. To the
//! VMM it proxies what a VMM needs to run the device: device/region/IRQ info, config-space
//! and trapped BAR accesses (REGION_READ/WRITE, pread/pwrite on the device fd), interrupts
//! (SET_IRQS forwarded to `VFIO_DEVICE_SET_IRQS` with the VMM's eventfds, so interrupts go
//! from the kernel straight to the VMM/KVM) and reset. Mappable BARs are handed over as the
//! VFIO device fd itself with the kernel's region offsets and sparse-mmap areas, so MMIO
//! never crosses the socket; MSIX_MAPPABLE is withheld, so the VMM emulates the MSI-X table.
//!
//! **DMA is not the VMM's to set up.** The VMM's DMA_MAP/DMA_UNMAP describe guest RAM (GPA
//! → its memfd and offset); the server checks each fd-backed map against guest RAM (the
//! vhost-user memory table, through a [`DmaCheck`]) and records it, but never maps anything
//! for the device. What the device may reach is decided only by the guest, through its
//! virtio-iommu ATTACH/MAP requests (identity over guest RAM in bypass), which the daemon
//! turns into iommufd mappings. Maps without an fd (ROM ranges, QEMU's peer-to-peer maps of
//! BARs) are accepted and recorded for the same reason: they map nothing. The fd-backed ones
//! also tell what guest RAM is before the memory table arrives, for identity translation under
//! boot bypass ([`crate::boot_ram`]). DMA_READ/DMA_WRITE
//! (server → client) are never sent.
//!
//! **What the device fd gives the VMM.** The fd handed over for BAR mmap is the daemon's own
//! VFIO device file, bound to the daemon's iommufd. Its holder can issue the device's ioctls,
//! among them `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to any IOAS or HWPT id of that iommufd (the
//! identity IOAS included), and reset the device: so a VMM can make the device reach what the
//! guest did not map. It cannot reach beyond this VM: the iommufd is this daemon's, one per
//! VM, and its IOASes map only this VM's guest RAM (which the VMM maps itself anyway); it holds
//! no iommufd fd, so it cannot map anything new. The guest's IOMMU protects the guest against
//! its devices, not against its own VMM. A re-pointed device stays so until the guest next
//! attaches or detaches it, or the VMM disconnects (the device is then blocked).
//!
//! Layout: [`protocol`] (pure encode/decode with size checks), [`device`] (the
//! [`AssignedDevice`] trait and [`VfioCdevDevice`] over the VFIO cdev), [`server`] (the
//! socket loop; [`spawn_device_server`] starts one thread per endpoint).

pub mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod protocol;
pub mod server;

pub use device::{AssignedDevice, Errno, VfioCdevDevice};
pub use protocol::{DeviceInfo, IrqInfo, IrqSet, RegionCap, RegionInfo, SparseArea};
pub use server::{
    ConnectionState, DeviceServer, DeviceSlot, DmaCheck, DmaMaps, DmaRegion, HandedOverServer,
    KeepHook, ServerEnd, StopSignal, bind_socket, serve_device, spawn_device_server,
};
