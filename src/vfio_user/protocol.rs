//! vfio-user wire format: message header, command payloads and replies, encoded and decoded
//! with explicit size checks. Pure: no I/O, no file descriptors (the server attaches those).
//!
//! All integers are in host byte order (the protocol's rule for AF_UNIX peers). The fixed
//! parts of messages are `#[repr(C)]` structs read and written whole as bytes
//! ([`vm_memory::ByteValued`], as the rust-vmm devices do), one definition for both directions;
//! they mirror the VFIO ioctl structs of `<linux/vfio.h>` and the protocol document's layouts
//! (the size tests below pin them).

use vm_memory::ByteValued;

use super::device::Errno;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

mod region_info;
pub use region_info::*;

// Commands.
pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DMA_READ: u16 = 11;
pub const CMD_DMA_WRITE: u16 = 12;
pub const CMD_DEVICE_RESET: u16 = 13;
pub const CMD_REGION_WRITE_MULTI: u16 = 15;
pub const CMD_DEVICE_FEATURE: u16 = 16;
pub const CMD_MIG_DATA_READ: u16 = 17;
pub const CMD_MIG_DATA_WRITE: u16 = 18;

/// The command's name as the protocol specification writes it (for logs and the trace).
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        CMD_DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        CMD_DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DMA_READ => "DMA_READ",
        CMD_DMA_WRITE => "DMA_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        CMD_REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        CMD_DEVICE_FEATURE => "DEVICE_FEATURE",
        CMD_MIG_DATA_READ => "MIG_DATA_READ",
        CMD_MIG_DATA_WRITE => "MIG_DATA_WRITE",
        _ => "UNKNOWN",
    }
}

// Header flags.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_TYPE_COMMAND: u32 = 0;
pub const FLAG_TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

// VFIO constants reused by the protocol: <linux/vfio.h>'s, from the maintained bindings.
/// `VFIO_DEVICE_FLAGS_CAPS` is the kernel's device-info capability chain: not carried by
/// vfio-user's 16-byte struct.
pub use viommu_uapi::vfio::{
    VFIO_DEVICE_FLAGS_CAPS, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
/// Capability ids are 16-bit in the capability header.
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 =
    viommu_uapi::vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = viommu_uapi::vfio::VFIO_REGION_INFO_CAP_TYPE as u16;
pub const VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: u16 =
    viommu_uapi::vfio::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16;
/// The host's request to have the device back (unbind, unplug): the daemon's own hot-unplug
/// watcher (`src/hotplug.rs`) owns this index, never a vfio-user client.
pub use viommu_uapi::vfio::VFIO_PCI_REQ_IRQ_INDEX;
/// The IRQ indexes a client may query and set: INTx, MSI, MSI-X and ERR.
pub const CLIENT_IRQ_INDEXES: std::ops::RangeInclusive<u32> =
    VFIO_PCI_INTX_IRQ_INDEX..=VFIO_PCI_ERR_IRQ_INDEX;
pub const DMA_FLAG_READ: u32 = 1 << 0;
pub const DMA_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`: needs dirty tracking, which is not offered.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// `VFIO_DMA_UNMAP_FLAG_ALL`: QEMU sends it (address 0, size 0) to drop every map.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// Limits this server advertises and enforces.
pub const MAX_MSG_FDS: usize = crate::scm::MAX_FDS;
pub const MAX_DATA_XFER_SIZE: usize = 1 << 20;
pub const PGSIZES: u64 = 4096;
pub const MAX_DMA_MAPS: usize = 65535;
/// No message may be larger: a data transfer of `MAX_DATA_XFER_SIZE` plus its headers, with
/// room to spare. A header that asks for more is refused before anything is allocated.
pub const MAX_MSG_SIZE: usize = HEADER_SIZE + 64 + MAX_DATA_XFER_SIZE;
/// Most vectors one SET_IRQS may name (the MSI-X table maximum); bounds `count` when no data
/// follows it.
pub const MAX_IRQ_VECTORS: u32 = 2048;
/// Largest region-info reply (info struct plus capability chain) we build or accept from the
/// kernel.
pub const MAX_REGION_INFO_SIZE: usize = 64 * 1024;
/// Most writes one REGION_WRITE_MULTI may carry (QEMU sends at most 200).
pub const MAX_WRITE_MULTI: u64 = 1024;

/// Size of `struct vfio_region_info`.
pub const REGION_INFO_SIZE: usize = 32;
/// Size of `struct vfio_irq_set` without its data.
pub const IRQ_SET_SIZE: usize = 20;

fn einval(context: &'static str) -> Errno {
    Errno::new(libc::EINVAL, context)
}

/// The wire struct at the front of `p` (any alignment); `None` when `p` is shorter.
pub(crate) fn read<T: ByteValued + Default>(p: &[u8]) -> Option<T> {
    let mut t = T::default();
    let n = std::mem::size_of::<T>();
    t.as_mut_slice().copy_from_slice(p.get(..n)?);
    Some(t)
}

/// `t`'s bytes followed by `tail`.
fn bytes_of<T: ByteValued>(t: &T, tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of::<T>() + tail.len());
    out.extend_from_slice(t.as_slice());
    out.extend_from_slice(tail);
    out
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The 16-byte header every message starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    /// Size of the whole message, header included.
    pub message_size: u32,
    pub flags: u32,
    pub error_no: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        read(b).expect("HEADER_SIZE bytes")
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        self.as_slice().try_into().expect("HEADER_SIZE bytes")
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
}

/// A reply to `req` carrying `payload`.
pub fn reply(req: &Header, payload: &[u8]) -> Vec<u8> {
    let size = HEADER_SIZE + payload.len();
    let h = Header {
        msg_id: req.msg_id,
        command: req.command,
        message_size: u32::try_from(size).expect("replies are bounded by MAX_MSG_SIZE"),
        flags: FLAG_TYPE_REPLY,
        error_no: 0,
    };
    bytes_of(&h, payload)
}

/// An error reply: header only, the error flag and a non-zero errno (a client such as QEMU
/// takes errno 0 for success, so 0 is sent as EIO).
pub fn error_reply(msg_id: u16, command: u16, errno: i32) -> [u8; HEADER_SIZE] {
    let errno = if errno <= 0 { libc::EIO } else { errno };
    Header {
        msg_id,
        command,
        message_size: HEADER_SIZE as u32,
        flags: FLAG_TYPE_REPLY | FLAG_ERROR,
        error_no: errno as u32,
    }
    .encode()
}

// ---------------------------------------------------------------------------------------------
// VERSION

/// A VERSION request: the client's version and its capabilities (JSON object, if any).
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub capabilities: Option<serde_json::Value>,
}

pub fn decode_version(p: &[u8]) -> Result<Version, Errno> {
    if p.len() < 4 {
        return Err(einval("VERSION payload shorter than 4 bytes"));
    }
    let data = &p[4..];
    // The JSON string is NUL-terminated; tolerate a missing NUL and trailing NULs.
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    let text = &data[..end];
    let capabilities = if text.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: serde_json::Value =
            serde_json::from_slice(text).map_err(|_| einval("VERSION data is not valid JSON"))?;
        if !v.is_object() {
            return Err(einval("VERSION data is not a JSON object"));
        }
        Some(v)
    };
    let head: VersionHead = read(p).expect("checked: 4 bytes");
    Ok(Version {
        major: head.major,
        minor: head.minor,
        capabilities,
    })
}

/// Whether the client's capabilities offer `write_multiple: true`.
pub fn client_offers_write_multiple(v: &Version) -> bool {
    v.capabilities
        .as_ref()
        .and_then(|c| c.get("capabilities"))
        .and_then(|c| c.get("write_multiple"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// The server's VERSION reply payload: version 0.0 and our capabilities, NUL-terminated.
/// No migration, no twin socket.
pub fn encode_version_reply(write_multiple: bool) -> Vec<u8> {
    let mut caps = serde_json::json!({
        "max_msg_fds": MAX_MSG_FDS,
        "max_data_xfer_size": MAX_DATA_XFER_SIZE,
        "pgsizes": PGSIZES,
        "max_dma_maps": MAX_DMA_MAPS,
    });
    if write_multiple {
        caps["write_multiple"] = serde_json::Value::Bool(true);
    }
    let mut json = serde_json::json!({ "capabilities": caps }).to_string();
    json.push('\0');
    bytes_of(&VersionHead::default(), json.as_bytes())
}

/// The fixed part of a VERSION message (then the capabilities, a NUL-terminated JSON string).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct VersionHead {
    major: u16,
    minor: u16,
}

// ---------------------------------------------------------------------------------------------
// DMA_MAP / DMA_UNMAP

/// A DMA_MAP request (`struct vfio_user_dma_map`, 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset of the range in the passed fd (0 without one).
    pub offset: u64,
    /// Guest-physical (DMA) address.
    pub address: u64,
    pub size: u64,
}

pub fn decode_dma_map(p: &[u8]) -> Result<DmaMap, Errno> {
    let m: DmaMap = read(p).ok_or(einval("DMA_MAP payload shorter than 32 bytes"))?;
    if m.argsz < 32 {
        return Err(einval("DMA_MAP argsz smaller than the struct"));
    }
    if m.flags & !(DMA_FLAG_READ | DMA_FLAG_WRITE) != 0 {
        return Err(einval("DMA_MAP has unknown flags"));
    }
    if m.size == 0 || m.address.checked_add(m.size).is_none() {
        return Err(einval("DMA_MAP range is empty or wraps"));
    }
    if !(m.address | m.size).is_multiple_of(PGSIZES) {
        return Err(einval("DMA_MAP range is not page aligned"));
    }
    Ok(m)
}

/// A DMA_UNMAP request (`struct vfio_user_dma_unmap`, 24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

pub fn decode_dma_unmap(p: &[u8]) -> Result<DmaUnmap, Errno> {
    let u: DmaUnmap = read(p).ok_or(einval("DMA_UNMAP payload shorter than 24 bytes"))?;
    if u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
        return Err(Errno::new(
            libc::ENOTSUP,
            "DMA_UNMAP dirty bitmaps are not supported",
        ));
    }
    if u.flags & !DMA_UNMAP_FLAG_ALL != 0 {
        return Err(einval("DMA_UNMAP has unknown flags"));
    }
    if u.flags & DMA_UNMAP_FLAG_ALL != 0 && (u.address != 0 || u.size != 0) {
        return Err(einval("DMA_UNMAP of all maps names a range"));
    }
    Ok(u)
}

/// The DMA_UNMAP reply echoes the request's entry.
pub fn encode_dma_unmap_reply(u: &DmaUnmap) -> Vec<u8> {
    let echo = DmaUnmap {
        argsz: std::mem::size_of::<DmaUnmap>() as u32,
        ..*u
    };
    bytes_of(&echo, &[])
}

/// The fixed part of the `VFIO_DEVICE_GET_INFO` / `VFIO_DEVICE_GET_IRQ_INFO` structs: `argsz`,
/// `flags`, then two fields (regions and IRQs; or index and count).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InfoWire {
    argsz: u32,
    flags: u32,
    a: u32,
    b: u32,
}

// ---------------------------------------------------------------------------------------------
// DEVICE_GET_INFO

/// What `VFIO_DEVICE_GET_INFO` says about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// Checks a DEVICE_GET_INFO request (argsz must leave room for the 16-byte reply).
pub fn decode_device_info_req(p: &[u8]) -> Result<(), Errno> {
    let req: InfoWire = read(p).ok_or(einval("DEVICE_GET_INFO payload shorter than 16 bytes"))?;
    if req.argsz < 16 {
        return Err(einval("DEVICE_GET_INFO argsz smaller than the reply"));
    }
    Ok(())
}

pub fn encode_device_info(info: &DeviceInfo) -> Vec<u8> {
    let w = InfoWire {
        argsz: 16,
        flags: info.flags & !VFIO_DEVICE_FLAGS_CAPS,
        a: info.num_regions,
        b: info.num_irqs,
    };
    bytes_of(&w, &[])
}

// ---------------------------------------------------------------------------------------------
// DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS

/// What `VFIO_DEVICE_GET_IRQ_INFO` says about an IRQ index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IrqInfo {
    pub flags: u32,
    pub count: u32,
}

/// A DEVICE_GET_IRQ_INFO request; returns the IRQ index.
pub fn decode_irq_info_req(p: &[u8]) -> Result<u32, Errno> {
    let req: InfoWire =
        read(p).ok_or(einval("DEVICE_GET_IRQ_INFO payload shorter than 16 bytes"))?;
    if req.argsz < 16 {
        return Err(einval("DEVICE_GET_IRQ_INFO argsz smaller than the reply"));
    }
    Ok(req.a)
}

pub fn encode_irq_info(index: u32, info: &IrqInfo) -> Vec<u8> {
    let w = InfoWire {
        argsz: 16,
        flags: info.flags,
        a: index,
        b: info.count,
    };
    bytes_of(&w, &[])
}

/// The fixed part of `struct vfio_irq_set` (then `data`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct IrqSetHead {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
}

/// A DEVICE_SET_IRQS request. `data` is the bool array for DATA_BOOL, empty otherwise
/// (eventfds travel as SCM_RIGHTS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IrqSet<'a> {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub data: &'a [u8],
}

impl IrqSet<'_> {
    pub fn data_type(&self) -> u32 {
        self.flags & VFIO_IRQ_SET_DATA_TYPE_MASK
    }
}

pub fn decode_irq_set(p: &[u8]) -> Result<IrqSet<'_>, Errno> {
    let head: IrqSetHead =
        read(p).ok_or(einval("DEVICE_SET_IRQS payload shorter than 20 bytes"))?;
    let flags = head.flags;
    let s = IrqSet {
        flags,
        index: head.index,
        start: head.start,
        count: head.count,
        data: &[],
    };
    if flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 {
        return Err(einval("DEVICE_SET_IRQS has unknown flags"));
    }
    let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
    let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
    if data.count_ones() != 1 || action.count_ones() != 1 {
        return Err(einval(
            "DEVICE_SET_IRQS needs exactly one data type and one action",
        ));
    }
    if s.count > MAX_IRQ_VECTORS || s.start.checked_add(s.count).is_none() {
        return Err(einval("DEVICE_SET_IRQS names too many vectors"));
    }
    if data == VFIO_IRQ_SET_DATA_BOOL {
        let end = IRQ_SET_SIZE + s.count as usize;
        if p.len() < end {
            return Err(einval("DEVICE_SET_IRQS bool data shorter than count"));
        }
        return Ok(IrqSet {
            data: &p[IRQ_SET_SIZE..end],
            ..s
        });
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// REGION_READ / REGION_WRITE / REGION_WRITE_MULTI

/// The common head of REGION_READ/REGION_WRITE requests and replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

fn decode_region_access(p: &[u8], what: &'static str) -> Result<RegionAccess, Errno> {
    let a: RegionAccess = read(p).ok_or(einval(what))?;
    if a.count as usize > MAX_DATA_XFER_SIZE {
        return Err(Errno::new(
            libc::E2BIG,
            "region access larger than max_data_xfer_size",
        ));
    }
    if a.offset.checked_add(u64::from(a.count)).is_none() {
        return Err(einval("region access wraps"));
    }
    Ok(a)
}

pub fn decode_region_read(p: &[u8]) -> Result<RegionAccess, Errno> {
    decode_region_access(p, "REGION_READ payload shorter than 16 bytes")
}

/// A REGION_WRITE request and its data (exactly `count` bytes must follow).
pub fn decode_region_write(p: &[u8]) -> Result<(RegionAccess, &[u8]), Errno> {
    let a = decode_region_access(p, "REGION_WRITE payload shorter than 16 bytes")?;
    let data = &p[16..];
    if data.len() != a.count as usize {
        return Err(einval("REGION_WRITE data length differs from count"));
    }
    Ok((a, data))
}

pub fn encode_region_access(a: &RegionAccess, data: &[u8]) -> Vec<u8> {
    bytes_of(a, data)
}

/// One write of a REGION_WRITE_MULTI (at most 8 bytes), 24 bytes on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SmallWrite {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; 8],
}

impl SmallWrite {
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.count as usize]
    }
}

/// A REGION_WRITE_MULTI request: `wr_cnt` then exactly that many 24-byte writes.
pub fn decode_write_multi(p: &[u8]) -> Result<Vec<SmallWrite>, Errno> {
    if p.len() < 8 {
        return Err(einval("REGION_WRITE_MULTI payload shorter than 8 bytes"));
    }
    let n: u64 = read(p).expect("checked: 8 bytes");
    let size = std::mem::size_of::<SmallWrite>();
    if n > MAX_WRITE_MULTI || p.len() != 8 + size * n as usize {
        return Err(einval("REGION_WRITE_MULTI size differs from wr_cnt"));
    }
    p[8..]
        .chunks_exact(size)
        .map(|e| {
            let w: SmallWrite = read(e).expect("a whole chunk");
            if w.count == 0 || w.count > 8 {
                return Err(einval("REGION_WRITE_MULTI write of 0 or more than 8 bytes"));
            }
            Ok(w)
        })
        .collect()
}

// SAFETY (each impl below): `#[repr(C)]` structs of plain integers (and a byte array) whose
// fields leave no padding (the size tests pin every layout): any bit pattern is a valid value
// and every byte is initialised.
unsafe impl ByteValued for Header {}
// SAFETY: see above.
unsafe impl ByteValued for VersionHead {}
// SAFETY: see above.
unsafe impl ByteValued for DmaMap {}
// SAFETY: see above.
unsafe impl ByteValued for DmaUnmap {}
// SAFETY: see above.
unsafe impl ByteValued for InfoWire {}
// SAFETY: see above.
unsafe impl ByteValued for IrqSetHead {}
// SAFETY: see above.
unsafe impl ByteValued for RegionAccess {}
// SAFETY: see above.
unsafe impl ByteValued for SmallWrite {}

#[cfg(test)]
mod tests;
