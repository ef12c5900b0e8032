//! vhost-user-iommu: a virtio-iommu device (virtio device 23) served over vhost-user, turning the
//! guest driver's ATTACH/DETACH/MAP/UNMAP/PROBE requests into host translation (iommufd, or a
//! software table on hosts without an IOMMU).
//!
//! The request path, top to bottom: [`vhost`] pops a chain and copies the request out once;
//! [`protocol`] decodes it; [`pipeline`] routes it to the executor owning its domain;
//! [`domains`] validates it against the spec and the shadow state and calls a
//! [`backend::DmaBackend`]; the tail goes back through [`vhost`].
//!
//! The `test-utils` feature adds the test kit: `driver` (a simulated VMM and guest driver),
//! `bench` (the in-process daemon and the `bench` command), `backend::fault` (fault
//! injection) and `testing`.

pub mod assembly;
pub mod backend;
#[cfg(any(test, feature = "test-utils"))]
pub mod bench;
pub mod boot_ram;
pub mod config;
pub mod control;
pub mod deploy;
pub mod domains;
#[cfg(any(test, feature = "test-utils"))]
pub mod driver;
pub mod exporter;
pub mod guest_ram;
pub mod heap;
pub mod hotplug;
pub mod ids;
pub mod irq_watch;
pub mod journal;
pub mod listen;
pub mod log_limit;
pub mod metrics;
pub mod peek;
pub mod peer;
pub mod pipeline;
pub mod protocol;
pub mod recovery;
mod scm;
pub mod server;
pub mod sigbus;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod trace;
pub mod upgrade;
pub mod vfio;
pub mod vfio_user;
pub mod vhost;
pub mod viot;
