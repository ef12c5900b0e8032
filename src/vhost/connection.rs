//! One VMM connection's vhost-user conversation: the protocol state (ownership, negotiated
//! features, the memory table as the VMM sent it, the two rings' setup) and the vring thread.
//!
//! The `vhost` crate frames and checks the messages; this type answers them. Everything the
//! device state depends on (the memory table, `bypass`, resets, ring stops) goes to the device's
//! owner, the vring thread; this type keeps only what the protocol needs, and holds it where a
//! handover can read it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as ProtocolError, GpuBackend, Result as ProtocolResult,
    VhostUserBackendReqHandlerMut,
};
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::vring_thread::VringThread;
use super::*;

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU uses a few; the kernel's vhost has 509).
const MAX_MEM_SLOTS: u64 = 509;

/// Where one memory region lies in the VMM's address space (ring addresses arrive as VMM
/// virtual addresses).
#[derive(Clone, Copy, Debug)]
struct VmmRegion {
    user_addr: u64,
    gpa: u64,
    size: u64,
}

/// The vhost-user state of one connection.
pub struct Connection {
    device: IommuDevice,
    /// The regions of the memory table in force, in the VMM's address space.
    regions: Vec<VmmRegion>,
    /// The mapped regions of that table (each holds its file).
    table: Vec<Arc<GuestRegionMmap>>,
    vrings: [VringRwLock; 2],
    thread: VringThread,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
}

fn internal(e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Connection {
    /// A new connection for `device` (fresh for each connection): creates its rings and starts
    /// its vring thread.
    pub fn new(device: IommuDevice) -> io::Result<Self> {
        let mem = device.memory();
        let ring = || {
            VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16)
                .map_err(|e| io::Error::other(format!("cannot create a vring: {e}")))
        };
        let vrings = [ring()?, ring()?];
        let thread = VringThread::start(device.clone(), vrings.clone())?;
        Ok(Connection {
            device,
            regions: Vec::new(),
            table: Vec::new(),
            vrings,
            thread,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
        })
    }

    /// The connection is over: the vring thread ends (the device state has no owner thread
    /// afterwards; the caller tears it down).
    pub fn close(self) {
        let Connection { thread, .. } = self;
        thread.stop();
    }

    fn vring(&self, index: u32) -> ProtocolResult<&VringRwLock> {
        self.vrings
            .get(index as usize)
            .ok_or(ProtocolError::InvalidParam)
    }

    /// Serves the ring's kicks only while it is started (kick fd and ready) and enabled.
    fn update_watch(&self, index: usize) -> ProtocolResult<()> {
        let vring = &self.vrings[index];
        let g = vring.get_ref();
        let Some(kick) = g.get_kick() else {
            return Ok(());
        };
        let on = g.get_queue().ready() && g.is_enabled();
        self.thread
            .watch_kick(kick.as_raw_fd(), index, on)
            .map_err(ProtocolError::ReqHandlerError)
    }

    /// A ring starts once it has its kick fd (vhost-user: "started" rings).
    fn start_if_ready(&self, index: usize) -> ProtocolResult<()> {
        let vring = &self.vrings[index];
        let starts = {
            let g = vring.get_ref();
            !g.get_queue().ready() && g.get_kick().is_some()
        };
        if starts {
            vring.set_queue_ready(true);
        }
        self.update_watch(index)
    }

    fn to_gpa(&self, vmm_addr: u64) -> ProtocolResult<u64> {
        self.regions
            .iter()
            .find(|r| vmm_addr >= r.user_addr && vmm_addr - r.user_addr < r.size)
            .map(|r| vmm_addr - r.user_addr + r.gpa)
            .ok_or(ProtocolError::InvalidParam)
    }

    /// Hands a new table to the device; kept only if the device accepted it.
    fn install(
        &mut self,
        regions: Vec<VmmRegion>,
        table: Vec<Arc<GuestRegionMmap>>,
    ) -> ProtocolResult<()> {
        let mem = GuestMemoryMmap::from_arc_regions(table.clone()).map_err(internal)?;
        self.device
            .set_memory_table(mem)
            .map_err(ProtocolError::ReqHandlerError)?;
        self.regions = regions;
        self.table = table;
        Ok(())
    }
}

fn map_region(
    gpa: u64,
    size: u64,
    user_addr: u64,
    offset: u64,
    file: File,
) -> ProtocolResult<(VmmRegion, Arc<GuestRegionMmap>)> {
    let size_usize = usize::try_from(size).map_err(|_| ProtocolError::InvalidParam)?;
    let mapping = MmapRegion::from_file(FileOffset::new(file, offset), size_usize)
        .map_err(|e| internal(format!("cannot map a memory region: {e}")))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(|| {
        internal(format!(
            "memory region at {gpa:#x} of {size:#x} bytes wraps around"
        ))
    })?;
    Ok((
        VmmRegion {
            user_addr,
            gpa,
            size,
        },
        Arc::new(region),
    ))
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> ProtocolResult<()> {
        if self.owned {
            return Err(ProtocolError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtocolResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> ProtocolResult<()> {
        for (i, v) in self.vrings.iter().enumerate() {
            v.set_enabled(false);
            self.update_watch(i)?;
        }
        self.acked_features = 0;
        self.device.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> ProtocolResult<u64> {
        Ok(IommuDevice::features())
    }

    fn set_features(&mut self, features: u64) -> ProtocolResult<()> {
        if features & !IommuDevice::features() != 0 {
            return Err(ProtocolError::InvalidParam);
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES the rings are enabled at once; with it they
        // keep their state until SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (i, v) in self.vrings.iter().enumerate() {
                v.set_enabled(true);
                self.update_watch(i)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.device.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(ProtocolError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut table = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let (vmm, mapped) = map_region(
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                file,
            )?;
            regions.push(vmm);
            table.push(mapped);
        }
        self.install(regions, table)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtocolResult<()> {
        let vring = self.vring(index)?;
        if num == 0 || num as usize > MAX_QUEUE_SIZE {
            return Err(ProtocolError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtocolResult<()> {
        let vring = self.vring(index)?;
        let (desc, avail, used) = (
            self.to_gpa(descriptor)?,
            self.to_gpa(available)?,
            self.to_gpa(used)?,
        );
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| ProtocolError::InvalidParam)?;
        // The used index continues from what the ring holds (SET_VRING_BASE carries only the
        // avail index for split rings): 0 after a driver reset, where it stopped on a resume.
        let next_used = vring
            .queue_used_idx()
            .map_err(|_| ProtocolError::InvalidParam)?;
        vring.set_queue_next_used(next_used);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtocolResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtocolResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // The ring stops here (vhost-user: GET_VRING_BASE stops a started ring).
        vring.set_queue_ready(false);
        self.update_watch(index as usize)?;
        if index as usize == REQUEST_QUEUE {
            self.device
                .stop_ring()
                .map_err(ProtocolError::ReqHandlerError)?;
        }
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        let vring = self.vring(u32::from(index))?.clone();
        // The old kick stops being watched before it is closed.
        if let Some(old) = vring.get_ref().get_kick() {
            self.thread
                .watch_kick(old.as_raw_fd(), usize::from(index), false)
                .map_err(ProtocolError::ReqHandlerError)?;
        }
        vring.set_kick(fd);
        self.start_if_ready(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        self.vring(u32::from(index))?.set_call(fd);
        self.start_if_ready(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> ProtocolResult<VhostUserProtocolFeatures> {
        Ok(IommuDevice::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> ProtocolResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtocolResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtocolResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ProtocolError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> ProtocolResult<Vec<u8>> {
        Ok(self.device.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> ProtocolResult<()> {
        self.device
            .set_config(offset, buf)
            .map_err(ProtocolError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // The device never sends the VMM a request (no BACKEND_REQ feature is offered).
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtocolResult<File> {
        Err(ProtocolError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> ProtocolResult<(VhostUserInflight, File)> {
        Err(ProtocolError::InvalidOperation(
            "INFLIGHT_SHMFD is not offered",
        ))
    }

    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation(
            "INFLIGHT_SHMFD is not offered",
        ))
    }

    fn get_max_mem_slots(&mut self) -> ProtocolResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(ProtocolError::InvalidOperation("postcopy is not supported"));
        }
        if self.table.len() as u64 >= MAX_MEM_SLOTS {
            return Err(ProtocolError::InvalidParam);
        }
        let (vmm, mapped) = map_region(
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
            fd,
        )?;
        let mut regions = self.regions.clone();
        let mut table = self.table.clone();
        regions.push(vmm);
        table.push(mapped);
        self.install(regions, table)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> ProtocolResult<()> {
        let at = self
            .regions
            .iter()
            .position(|r| r.gpa == region.guest_phys_addr && r.size == region.memory_size)
            .ok_or(ProtocolError::InvalidParam)?;
        let mut regions = self.regions.clone();
        let mut table = self.table.clone();
        regions.remove(at);
        table.remove(at);
        self.install(regions, table)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> ProtocolResult<Option<File>> {
        Err(ProtocolError::InvalidOperation(
            "DEVICE_STATE is not offered",
        ))
    }

    fn check_device_state(&mut self) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation(
            "DEVICE_STATE is not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> ProtocolResult<VhostUserShMemConfig> {
        Err(ProtocolError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtocolResult<()> {
        Err(ProtocolError::InvalidOperation("LOG_SHMFD is not offered"))
    }
}
