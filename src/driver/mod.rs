//! A guest driver and VMM simulator for driving the real daemon over a real unix socket: tests,
//! benches and the `bench` command use it to play QEMU (the vhost-user frontend handshake,
//! memory table, vrings, config space, resets, memory hot-plug) and the Linux virtio-iommu
//! driver (split virtqueues in guest RAM, requests built with [`crate::protocol`], busy-polling
//! of the used ring). It also lets a test build arbitrary, malformed descriptor chains.
//!
//! Layout of guest RAM (one memfd at GPA 0): `[0, usable_ram_end)` is free for the test (DMA
//! buffers, MAP targets, abuse addresses); above it, 4 KiB aligned, lie the two rings and the
//! per-head request areas (readable bytes, writable bytes, indirect table) of both queues.

mod frontend;
mod memory;
pub mod vfio_user_client;
mod virtqueue;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use frontend::{Claim, INDIRECT_MAX, POISON, TestVm};
pub use memory::GuestRam;
pub use virtqueue::{FreeList, RawDesc, RingLayout, UsedElem, Virtqueue, need_event};

/// A descriptor the test wants in a chain (for abuse tests): any addr/len, device-writable or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn readable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable descriptor.
    pub fn writable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

/// How the simulated VM is set up.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Guest RAM size; default 64 MiB.
    pub ram_size: u64,
    /// Entries of each virtqueue (power of two); default 256.
    pub queue_size: u16,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` (an error if the device does not offer it).
    pub event_idx: bool,
    /// How long `connect` waits for the socket to appear / accept; default 5 s.
    pub connect_timeout: Duration,
    /// How long `request`/`batch`/`probe` wait for the device; default 5 s.
    pub request_timeout: Duration,
    /// Post a `FAULT_SIZE` buffer in every event-queue entry, as the Linux driver does;
    /// default true.
    pub fill_event_queue: bool,
    /// Play a VMM that tries to wedge the device: the request queue asks for an interrupt per
    /// answer, and its call fd is a *blocking* eventfd already at its maximum count, which a
    /// blocking write(2) would wait on forever; default false.
    pub saturated_call: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            ram_size: 64 << 20,
            queue_size: 256,
            event_idx: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            fill_event_queue: true,
            saturated_call: false,
        }
    }
}

/// What went wrong while driving the device.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vhost-user {op} failed: {source}")]
    Vhost {
        op: &'static str,
        source: vhost::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("the device does not offer {0}")]
    NotOffered(&'static str),
    #[error("{0} was not negotiated")]
    NotNegotiated(&'static str),
    #[error("the device has {0} queues, need 2")]
    TooFewQueues(u64),
    #[error("queue size {0} is not a power of two in 1..=32768")]
    QueueSize(u16),
    #[error("guest RAM of {ram:#x} bytes cannot hold the {reserved:#x}-byte ring area")]
    RamTooSmall { ram: u64, reserved: u64 },
    #[error("GPA range {gpa:#x}+{len:#x} is outside guest RAM [{base:#x}, +{size:#x})")]
    OutOfRam {
        gpa: u64,
        len: u64,
        base: u64,
        size: u64,
    },
    #[error("GPA {gpa:#x} is not {align}-byte aligned")]
    Misaligned { gpa: u64, align: u64 },
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
    #[error("chain needs {need} descriptors, {free} free")]
    NoFreeDescriptors { need: usize, free: usize },
    #[error("{what} of {len} bytes exceeds the {max}-byte per-request area")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("timed out waiting for {want} used entries, got {}", got.len())]
    Timeout { want: usize, got: Vec<(u16, u32)> },
    #[error("used entry {used_idx} names head {id}, which is not in flight")]
    BadUsedId { id: u32, used_idx: u16 },
    #[error("used.idx {used_idx} ran ahead: last used {last_used}, avail {avail_idx}")]
    UsedIndexRunaway {
        used_idx: u16,
        last_used: u16,
        avail_idx: u16,
    },
    #[error("used entry for head {head} not expected here (expected {expected:?})")]
    UnexpectedHead { head: u16, expected: Vec<u16> },
    #[error("request in head {head} came back with used length 0")]
    NoReply { head: u16 },
    #[error("request in head {head} came back with used length {len}, unknown status byte {byte}")]
    UnknownStatus { head: u16, len: u32, byte: u8 },
    #[error("GET_CONFIG returned {0} bytes, expected 40")]
    BadConfig(usize),
    #[error("no extra memory region at GPA {0:#x}")]
    NoSuchRegion(u64),
}

impl DriverError {
    pub(crate) fn vhost(op: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
        move |source| DriverError::Vhost { op, source }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> DriverError {
        move |source| DriverError::Io { what, source }
    }
}
