//! The VM tiers' guest kit, shared by their guest programs: edu's registers and BAR access
//! ([`mmio`], std and libc only), PASS/FAIL/INFO/SKIP reporting ([`report`]), the checks' DMA layout ([`layout`]), device nodes and limits ([`sys`]), and with the
//! `daemon` feature edu discovery and DMA through the iommufd backend (`edu`) and the
//! real daemon in the program's own process (`daemon`).

pub mod layout;
pub mod mmio;
pub mod report;
pub mod sys;

#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod edu;
