//! A device for tests and fuzzing of the vfio-user server (test kit): a memfd-backed BAR 0 of
//! 16 KiB that can be mmapped, a 256-byte config space, five IRQ indexes and a reset, with
//! counters of what the server did to it.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{AssignedDevice, Errno};
use super::protocol::{
    DeviceInfo, IrqInfo, IrqSet, RegionInfo, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

const BAR0_SIZE: u64 = 0x4000;
const CONFIG_SIZE: u64 = 256;
const NUM_IRQS: u32 = 5;

/// What the server did to the device.
#[derive(Debug, Default)]
pub struct FakeCounters {
    pub resets: AtomicU64,
    pub set_irqs: AtomicU64,
    /// IRQ indexes with eventfds set right now (bit per index).
    pub irqs_armed: Mutex<u32>,
}

pub struct FakeDevice {
    bar0: File,
    config: Mutex<[u8; CONFIG_SIZE as usize]>,
    counters: Arc<FakeCounters>,
}

impl FakeDevice {
    pub fn new() -> (FakeDevice, Arc<FakeCounters>) {
        let bar0 = crate::testing::unlinked_file(BAR0_SIZE);
        let counters = Arc::new(FakeCounters::default());
        let mut config = [0u8; CONFIG_SIZE as usize];
        config[..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        let dev = FakeDevice {
            bar0,
            config: Mutex::new(config),
            counters: counters.clone(),
        };
        (dev, counters)
    }

    fn region(&self, index: u32) -> Result<(u64, bool), Errno> {
        match index {
            0 => Ok((BAR0_SIZE, false)),
            VFIO_PCI_CONFIG_REGION_INDEX => Ok((CONFIG_SIZE, true)),
            _ => Err(Errno::new(libc::EINVAL, "no such region")),
        }
    }

    fn check(&self, index: u32, offset: u64, len: usize) -> Result<bool, Errno> {
        let (size, config) = self.region(index)?;
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(Errno::new(libc::EINVAL, "access past the region"));
        }
        Ok(config)
    }
}

impl AssignedDevice for FakeDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, Errno> {
        if index >= 9 {
            return Err(Errno::new(libc::EINVAL, "no such region"));
        }
        Ok(match self.region(index) {
            Ok((size, config)) => RegionInfo {
                flags: VFIO_REGION_INFO_FLAG_READ
                    | VFIO_REGION_INFO_FLAG_WRITE
                    | if config {
                        0
                    } else {
                        VFIO_REGION_INFO_FLAG_MMAP
                    },
                size,
                offset: u64::from(index) << 40,
                caps: Vec::new(),
            },
            Err(_) => RegionInfo {
                offset: u64::from(index) << 40,
                ..Default::default()
            },
        })
    }

    fn region_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.bar0.as_fd())
    }

    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if self.check(index, offset, buf.len())? {
            let c = self.config.lock().unwrap_or_else(|p| p.into_inner());
            buf.copy_from_slice(&c[offset as usize..offset as usize + buf.len()]);
            return Ok(());
        }
        self.bar0
            .read_exact_at(buf, offset)
            .map_err(|e| Errno::from_io(&e, "BAR 0 read"))
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if self.check(index, offset, data.len())? {
            let mut c = self.config.lock().unwrap_or_else(|p| p.into_inner());
            c[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            return Ok(());
        }
        self.bar0
            .write_all_at(data, offset)
            .map_err(|e| Errno::from_io(&e, "BAR 0 write"))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, Errno> {
        if index >= NUM_IRQS {
            return Err(Errno::new(libc::EINVAL, "no such IRQ index"));
        }
        Ok(IrqInfo {
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: if index == 2 { 8 } else { 1 },
        })
    }

    fn set_irqs(&self, set: &IrqSet<'_>, fds: &[RawFd]) -> Result<(), Errno> {
        let IrqSet { index, count, .. } = *set;
        if index >= NUM_IRQS {
            return Err(Errno::new(libc::EINVAL, "no such IRQ index"));
        }
        self.counters.set_irqs.fetch_add(1, Ordering::Relaxed);
        let mut armed = self
            .counters
            .irqs_armed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if count > 0 && fds.iter().any(|&fd| fd >= 0) {
            *armed |= 1 << index;
        } else {
            *armed &= !(1 << index);
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), Errno> {
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
