//! Where the VM tier's checks put DMA buffers and paging mappings when they drive the daemon with
//! the crate's `TestVm` (its 64 MiB of guest RAM at GPA 0): one layout for every guest program.

/// DMA buffers in the TestVm's guest RAM.
pub const GPA_A: u64 = 0x10_0000;
pub const GPA_B: u64 = 0x20_0000;
pub const GPA_C: u64 = 0x30_0000;
/// IOVAs of paging mappings: above guest RAM (so an identity leak cannot land at them) and below
/// edu's 28-bit DMA mask.
pub const IOVA_X: u64 = 0x0800_0000;
pub const IOVA_Y: u64 = 0x0810_0000;
pub const IOVA_Z: u64 = 0x0820_0000;
pub const IOVA_W: u64 = 0x0830_0000;
/// What the checks fill a page with that a DMA must (not) overwrite.
pub const SENTINEL: u8 = 0xee;
