//! Fault reports on the event queue (§5.13.6.7).

use super::*;
use crate::ids::EndpointId;

/// Fault reasons (§5.13.6.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultReason {
    Unknown = 0,
    Domain = 1,
    Mapping = 2,
}

pub const FAULT_F_READ: u32 = 1;
pub const FAULT_F_WRITE: u32 = 2;
pub const FAULT_F_ADDRESS: u32 = 0x100;

/// A fault report for the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    pub reason: FaultReason,
    pub flags: u32,
    pub endpoint: EndpointId,
    pub address: Option<u64>,
}

impl FaultEvent {
    pub fn to_bytes(&self) -> [u8; FAULT_SIZE] {
        use vm_memory::ByteValued;
        let flags = (self.flags & (FAULT_F_READ | FAULT_F_WRITE))
            | if self.address.is_some() {
                FAULT_F_ADDRESS
            } else {
                0
            };
        let w = wire::Fault {
            reason: self.reason as u8,
            flags: flags.into(),
            endpoint: self.endpoint.0.into(),
            address: self.address.unwrap_or(0).into(),
            ..Default::default()
        };
        let mut b = [0u8; FAULT_SIZE];
        b.copy_from_slice(w.as_slice());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<FaultEvent> {
        if b.len() < FAULT_SIZE {
            return None;
        }
        let w: wire::Fault = wire::read(b);
        let flags = u32::from(w.flags);
        Some(FaultEvent {
            reason: match w.reason {
                1 => FaultReason::Domain,
                2 => FaultReason::Mapping,
                _ => FaultReason::Unknown,
            },
            flags: flags & (FAULT_F_READ | FAULT_F_WRITE),
            endpoint: EndpointId(w.endpoint.into()),
            address: (flags & FAULT_F_ADDRESS != 0).then(|| w.address.into()),
        })
    }
}
