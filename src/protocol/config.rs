//! The device configuration space (§5.13.4).

use super::*;

/// The device configuration space (§5.13.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub page_size_mask: u64,
    pub input_start: u64,
    pub input_end: u64,
    pub domain_start: u32,
    pub domain_end: u32,
    pub probe_size: u32,
    pub bypass: u8,
}

impl Config {
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        use vm_memory::ByteValued;
        let w = wire::Config {
            page_size_mask: self.page_size_mask.into(),
            input_start: self.input_start.into(),
            input_end: self.input_end.into(),
            domain_start: self.domain_start.into(),
            domain_end: self.domain_end.into(),
            probe_size: self.probe_size.into(),
            bypass: self.bypass,
            reserved: [0; 3],
        };
        let mut b = [0u8; CONFIG_SIZE];
        b.copy_from_slice(w.as_slice());
        b
    }

    /// Decodes a configuration space; `None` if `b` is not exactly 40 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Config> {
        if b.len() != CONFIG_SIZE {
            return None;
        }
        let w: wire::Config = wire::read(b);
        Some(Config {
            page_size_mask: w.page_size_mask.into(),
            input_start: w.input_start.into(),
            input_end: w.input_end.into(),
            domain_start: w.domain_start.into(),
            domain_end: w.domain_end.into(),
            probe_size: w.probe_size.into(),
            bypass: w.bypass,
        })
    }

    /// Byte offset of the `bypass` field: the only driver-writable byte.
    pub const BYPASS_OFFSET: usize = std::mem::offset_of!(wire::Config, bypass);
}
