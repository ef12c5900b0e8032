//! The virtio-iommu wire format (virtio spec §5.13), byte-exact and little-endian.
//!
//! This module owns the layouts of the configuration space, the requests and their tails, PROBE
//! properties and fault events, and converts between bytes and typed values. It is pure: no I/O,
//! no guest-memory access, no allocation on the decode path. Decoding never trusts a length: every
//! read is bounds-checked against the bytes actually supplied. It must never interpret a request
//! (that is `domains`' job): it only says what the bytes are.

use crate::ids::{DomainId, EndpointId, Gpa, Iova};

/// Virtio device ID of an IOMMU device (§5.13.1).
pub const DEVICE_ID: u32 = 23;

/// Feature bits (§5.13.3).
pub mod features {
    pub const INPUT_RANGE: u64 = 1 << 0;
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// Legacy bypass; new devices should not offer it (§5.13.3.2).
    pub const BYPASS: u64 = 1 << 3;
    pub const PROBE: u64 = 1 << 4;
    pub const MMIO: u64 = 1 << 5;
    pub const BYPASS_CONFIG: u64 = 1 << 6;
}

/// Index of the request virtqueue.
pub const REQUEST_QUEUE: usize = 0;
/// Index of the event virtqueue.
pub const EVENT_QUEUE: usize = 1;

/// `ATTACH_F_BYPASS`: the domain is an identity (bypass) domain.
pub const ATTACH_F_BYPASS: u32 = 1;
/// MAP flags.
pub const MAP_F_READ: u32 = 1;
pub const MAP_F_WRITE: u32 = 2;
pub const MAP_F_MMIO: u32 = 4;

/// A MAP request's flags, exactly as the guest wrote them (unknown bits included: the domain
/// model rejects those).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MapFlags(pub u32);

impl MapFlags {
    pub const READ: MapFlags = MapFlags(MAP_F_READ);
    pub const WRITE: MapFlags = MapFlags(MAP_F_WRITE);
    pub const MMIO: MapFlags = MapFlags(MAP_F_MMIO);
    pub const RW: MapFlags = MapFlags(MAP_F_READ | MAP_F_WRITE);

    pub fn read(self) -> bool {
        self.0 & MAP_F_READ != 0
    }

    pub fn write(self) -> bool {
        self.0 & MAP_F_WRITE != 0
    }

    pub fn mmio(self) -> bool {
        self.0 & MAP_F_MMIO != 0
    }

    /// The bits the spec does not define (§5.13.6.4).
    pub fn unknown(self) -> u32 {
        self.0 & !(MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO)
    }
}

/// Size of `struct virtio_iommu_req_head` and of `struct virtio_iommu_req_tail`.
pub const HEAD_SIZE: usize = 4;
pub const TAIL_SIZE: usize = 4;
/// Device-readable sizes (head included) of each request type.
pub const ATTACH_SIZE: usize = HEAD_SIZE + 16;
pub const DETACH_SIZE: usize = HEAD_SIZE + 16;
pub const MAP_SIZE: usize = HEAD_SIZE + 32;
pub const UNMAP_SIZE: usize = HEAD_SIZE + 24;
pub const PROBE_SIZE: usize = HEAD_SIZE + 68;
/// The largest device-readable part any request has: what the parser copies out of the guest.
pub const MAX_REQUEST_SIZE: usize = PROBE_SIZE;
/// Size of the configuration space.
pub const CONFIG_SIZE: usize = 40;
/// Size of a fault report on the event queue.
pub const FAULT_SIZE: usize = 24;
/// Size of a RESV_MEM property, header included.
pub const RESV_MEM_PROPERTY_SIZE: usize = 4 + 20;
/// Property type of RESV_MEM.
pub const PROBE_T_RESV_MEM: u16 = 1;

/// A `#[repr(u8)]` enum of codes the spec numbers, with `ALL` (in code order), `from_u8` and
/// the lower-case `name` the logs, metrics and trace use: one table per set of codes.
macro_rules! spec_codes {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $code:literal => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($variant = $code,)+
        }

        impl $name {
            pub const ALL: [$name; [$($code),+].len()] = [$($name::$variant),+];

            pub fn from_u8(v: u8) -> Option<Self> {
                Self::ALL.into_iter().find(|c| *c as u8 == v)
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}

spec_codes! {
    /// Request types (§5.13.6).
    RequestType {
        Attach = 1 => "attach",
        Detach = 2 => "detach",
        Map = 3 => "map",
        Unmap = 4 => "unmap",
        Probe = 5 => "probe",
    }
}

impl RequestType {
    /// Device-readable size, head included.
    pub fn readable_size(self) -> usize {
        match self {
            Self::Attach => ATTACH_SIZE,
            Self::Detach => DETACH_SIZE,
            Self::Map => MAP_SIZE,
            Self::Unmap => UNMAP_SIZE,
            Self::Probe => PROBE_SIZE,
        }
    }
}

spec_codes! {
    /// Request status codes (§5.13.6).
    Status {
        Ok = 0 => "ok",
        IoErr = 1 => "ioerr",
        Unsupp = 2 => "unsupp",
        DevErr = 3 => "deverr",
        Inval = 4 => "inval",
        Range = 5 => "range",
        NoEnt = 6 => "noent",
        Fault = 7 => "fault",
        NoMem = 8 => "nomem",
    }
}

/// A decoded request. Fields are exactly what the guest wrote; nothing is validated here except
/// that enough bytes were supplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: DomainId,
        endpoint: EndpointId,
        flags: u32,
        reserved: [u8; 4],
    },
    Detach {
        domain: DomainId,
        endpoint: EndpointId,
    },
    Map(MapRequest),
    Unmap {
        domain: DomainId,
        virt_start: Iova,
        virt_end: Iova,
        reserved: [u8; 4],
    },
    Probe {
        endpoint: EndpointId,
    },
}

/// A MAP request (§5.13.6.4): IOVAs `[virt_start, virt_end]` of `domain` to the guest-physical
/// range starting at `phys_start`, with `flags` (MAP_F_*). As the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub domain: DomainId,
    pub virt_start: Iova,
    pub virt_end: Iova,
    pub phys_start: Gpa,
    pub flags: MapFlags,
}

/// Why the device-readable part of a chain is not a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request of {len} bytes is too short for a head")]
    NoHead { len: usize },
    #[error("unknown request type {0}")]
    UnknownType(u8),
    #[error("{} request of {got} bytes, needs {need}", kind.name())]
    TooShort {
        kind: RequestType,
        need: usize,
        got: usize,
    },
}

impl Request {
    /// ATTACH of `endpoint` to paging domain `domain` (no flags).
    pub fn attach(domain: u32, endpoint: u32) -> Request {
        Request::attach_raw(domain, endpoint, 0, [0; 4])
    }

    /// ATTACH of `endpoint` to bypass domain `domain` (ATTACH_F_BYPASS).
    pub fn attach_bypass(domain: u32, endpoint: u32) -> Request {
        Request::attach_raw(domain, endpoint, ATTACH_F_BYPASS, [0; 4])
    }

    /// ATTACH with the given `flags` and `reserved` bytes as they stand (for requests that break
    /// the spec's rules on purpose).
    pub fn attach_raw(domain: u32, endpoint: u32, flags: u32, reserved: [u8; 4]) -> Request {
        Request::Attach {
            domain: DomainId(domain),
            endpoint: EndpointId(endpoint),
            flags,
            reserved,
        }
    }

    pub fn detach(domain: u32, endpoint: u32) -> Request {
        Request::Detach {
            domain: DomainId(domain),
            endpoint: EndpointId(endpoint),
        }
    }

    /// MAP of IOVAs `[start, end]` to GPA `phys` with `flags` (MAP_F_*).
    pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Request {
        Request::Map(MapRequest {
            domain: DomainId(domain),
            virt_start: Iova(start),
            virt_end: Iova(end),
            phys_start: Gpa(phys),
            flags: MapFlags(flags),
        })
    }

    /// UNMAP of IOVAs `[start, end]`.
    pub fn unmap(domain: u32, start: u64, end: u64) -> Request {
        Request::Unmap {
            domain: DomainId(domain),
            virt_start: Iova(start),
            virt_end: Iova(end),
            reserved: [0; 4],
        }
    }

    /// Peeks at the request type in a device-readable buffer.
    pub fn peek_type(readable: &[u8]) -> Result<RequestType, DecodeError> {
        let t = *readable.first().ok_or(DecodeError::NoHead {
            len: readable.len(),
        })?;
        if readable.len() < HEAD_SIZE {
            return Err(DecodeError::NoHead {
                len: readable.len(),
            });
        }
        RequestType::from_u8(t).ok_or(DecodeError::UnknownType(t))
    }

    /// Decodes the device-readable part of a request. Bytes past the request's size are ignored;
    /// the head's reserved bytes are ignored as the spec requires.
    pub fn decode(readable: &[u8]) -> Result<Request, DecodeError> {
        let kind = Self::peek_type(readable)?;
        let need = kind.readable_size();
        if readable.len() < need {
            return Err(DecodeError::TooShort {
                kind,
                need,
                got: readable.len(),
            });
        }
        let b = &readable[..need];
        Ok(match kind {
            RequestType::Attach => {
                let w: wire::Attach = wire::read(b);
                Request::Attach {
                    domain: DomainId(w.domain.into()),
                    endpoint: EndpointId(w.endpoint.into()),
                    flags: w.flags.into(),
                    reserved: w.reserved,
                }
            }
            RequestType::Detach => {
                let w: wire::Detach = wire::read(b);
                Request::Detach {
                    domain: DomainId(w.domain.into()),
                    endpoint: EndpointId(w.endpoint.into()),
                }
            }
            RequestType::Map => {
                let w: wire::Map = wire::read(b);
                Request::Map(MapRequest {
                    domain: DomainId(w.domain.into()),
                    virt_start: Iova(w.virt_start.into()),
                    virt_end: Iova(w.virt_end.into()),
                    phys_start: Gpa(w.phys_start.into()),
                    flags: MapFlags(w.flags.into()),
                })
            }
            RequestType::Unmap => {
                let w: wire::Unmap = wire::read(b);
                Request::Unmap {
                    domain: DomainId(w.domain.into()),
                    virt_start: Iova(w.virt_start.into()),
                    virt_end: Iova(w.virt_end.into()),
                    reserved: w.reserved,
                }
            }
            RequestType::Probe => {
                let w: wire::Probe = wire::read(b);
                Request::Probe {
                    endpoint: EndpointId(w.endpoint.into()),
                }
            }
        })
    }

    pub fn kind(&self) -> RequestType {
        match self {
            Request::Attach { .. } => RequestType::Attach,
            Request::Detach { .. } => RequestType::Detach,
            Request::Map(_) => RequestType::Map,
            Request::Unmap { .. } => RequestType::Unmap,
            Request::Probe { .. } => RequestType::Probe,
        }
    }

    /// Encodes the device-readable part (the driver's side; used by the test driver and benches).
    /// Returns the buffer and the number of bytes used.
    pub fn encode(&self) -> ([u8; MAX_REQUEST_SIZE], usize) {
        use vm_memory::ByteValued;
        let kind = self.kind();
        let head = wire::Head {
            kind: kind as u8,
            reserved: [0; 3],
        };
        let mut out = [0u8; MAX_REQUEST_SIZE];
        let mut put = |bytes: &[u8]| out[..bytes.len()].copy_from_slice(bytes);
        match *self {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => put(wire::Attach {
                head,
                domain: domain.0.into(),
                endpoint: endpoint.0.into(),
                flags: flags.into(),
                reserved,
            }
            .as_slice()),
            Request::Detach { domain, endpoint } => put(wire::Detach {
                head,
                domain: domain.0.into(),
                endpoint: endpoint.0.into(),
                reserved: [0; 8],
            }
            .as_slice()),
            Request::Map(m) => put(wire::Map {
                head,
                domain: m.domain.0.into(),
                virt_start: m.virt_start.0.into(),
                virt_end: m.virt_end.0.into(),
                phys_start: m.phys_start.0.into(),
                flags: m.flags.0.into(),
            }
            .as_slice()),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
                reserved,
            } => put(wire::Unmap {
                head,
                domain: domain.0.into(),
                virt_start: virt_start.0.into(),
                virt_end: virt_end.0.into(),
                reserved,
            }
            .as_slice()),
            Request::Probe { endpoint } => put(wire::Probe {
                head,
                endpoint: endpoint.0.into(),
                ..Default::default()
            }
            .as_slice()),
        }
        (out, kind.readable_size())
    }
}

/// Encodes a request tail.
pub fn encode_tail(status: Status) -> [u8; TAIL_SIZE] {
    [status as u8, 0, 0, 0]
}

mod config;
mod fault;
mod probe;
#[cfg(test)]
mod tests;
mod wire;

pub use config::Config;
pub use fault::{FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FaultEvent, FaultReason};
pub use probe::{ResvKind, ResvMem, decode_probe_properties, encode_probe_properties};
