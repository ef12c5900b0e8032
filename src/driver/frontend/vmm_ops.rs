//! What a VMM does to the device besides requests: the ring lifecycle around a reset or a VM
//! pause, and memory-table changes (including a VMM that overstates its memory file).

use super::*;

impl TestVm {
    /// Stops both rings like QEMU on a device reset (GET_VRING_BASE for 0 and 1), then sets them
    /// up again from index 0 (SET_FEATURES again, fresh zeroed rings at the same addresses).
    /// Chains in flight are forgotten.
    pub fn reset_rings(&mut self) -> Result<(), DriverError> {
        let mut bases = [0u32; 2];
        for q in [REQUEST_QUEUE, EVENT_QUEUE] {
            // No SET_VRING_ENABLE 0 first: after RESET_DEVICE the features are un-acked and a
            // daemon refuses it (and drops the connection).
            bases[q] = self
                .frontend
                .get_vring_base(q)
                .map_err(DriverError::vhost("GET_VRING_BASE"))?;
        }
        self.last_bases = Some(bases);
        self.frontend
            .set_features(self.features)
            .map_err(DriverError::vhost("SET_FEATURES"))?;
        self.setup_queues()
    }

    /// Stops both rings and starts them again where they stopped, like QEMU around a VM pause
    /// (`vhost_dev_stop`: SET_VRING_ENABLE 0 and GET_VRING_BASE; `vhost_dev_start`: SET_FEATURES
    /// and SET_VRING_* with the bases GET_VRING_BASE returned). The ring memory and every chain
    /// in it are kept; the bases are returned.
    pub fn pause_and_resume(&mut self) -> Result<[u32; 2], DriverError> {
        let mut bases = [0u32; 2];
        for q in [REQUEST_QUEUE, EVENT_QUEUE] {
            self.frontend
                .set_vring_enable(q, false)
                .map_err(DriverError::vhost("SET_VRING_ENABLE"))?;
            bases[q] = self
                .frontend
                .get_vring_base(q)
                .map_err(DriverError::vhost("GET_VRING_BASE"))?;
        }
        self.frontend
            .set_features(self.features)
            .map_err(DriverError::vhost("SET_FEATURES"))?;
        let queues = std::mem::take(&mut self.queues);
        let announced = [REQUEST_QUEUE, EVENT_QUEUE]
            .into_iter()
            .try_for_each(|q| self.announce_queue(q, &queues[q], bases[q] as u16));
        self.queues = queues;
        announced?;
        Ok(bases)
    }

    /// VHOST_USER_RESET_DEVICE (error if the protocol feature was not negotiated). The rings
    /// are stopped by it; [`TestVm::reset_rings`] sets them up again.
    pub fn reset_device(&mut self) -> Result<(), DriverError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            return Err(DriverError::NotNegotiated(
                "VHOST_USER_PROTOCOL_F_RESET_DEVICE",
            ));
        }
        self.frontend
            .reset_device()
            .map_err(DriverError::vhost("RESET_DEVICE"))
    }

    /// ADD_MEM_REG of an extra memfd region at `gpa` (CONFIGURE_MEM_SLOTS).
    pub fn add_region(&mut self, gpa: u64, size: u64) -> Result<(), DriverError> {
        self.add_region_claiming(Claim {
            gpa,
            file_size: size,
            memory_size: size,
            mmap_offset: 0,
        })
    }

    /// ADD_MEM_REG of the region `claim` describes, which may be more than its file holds: a
    /// VMM describing more memory than it has. Kept like [`TestVm::add_region`]'s region if the
    /// daemon accepts it.
    pub fn add_region_claiming(&mut self, claim: Claim) -> Result<(), DriverError> {
        self.need_mem_slots()?;
        let (r, info) = claim.region()?;
        self.frontend
            .add_mem_region(&info)
            .map_err(DriverError::vhost("ADD_MEM_REG"))?;
        self.regions.push(r);
        Ok(())
    }

    /// SET_MEM_TABLE with guest RAM and, like [`TestVm::add_region_claiming`], the region
    /// `claim` describes.
    pub fn set_mem_table_claiming(&mut self, claim: Claim) -> Result<(), DriverError> {
        let (r, info) = claim.region()?;
        self.frontend
            .set_mem_table(&[region_info(&self.ram), info])
            .map_err(DriverError::vhost("SET_MEM_TABLE"))?;
        self.regions.push(r);
        Ok(())
    }

    /// REM_MEM_REG of the extra region starting at `gpa`.
    pub fn remove_region(&mut self, gpa: u64) -> Result<(), DriverError> {
        self.need_mem_slots()?;
        let i = self
            .regions
            .iter()
            .position(|r| r.base() == gpa)
            .ok_or(DriverError::NoSuchRegion(gpa))?;
        self.frontend
            .remove_mem_region(&region_info(&self.regions[i]))
            .map_err(DriverError::vhost("REM_MEM_REG"))?;
        self.regions.remove(i);
        Ok(())
    }

    /// An extra region added with [`TestVm::add_region`], by its first GPA.
    pub fn region(&self, gpa: u64) -> Option<&GuestRam> {
        self.regions.iter().find(|r| r.base() == gpa)
    }

    fn need_mem_slots(&self) -> Result<(), DriverError> {
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            Ok(())
        } else {
            Err(DriverError::NotNegotiated(
                "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
            ))
        }
    }
}

fn region_info(r: &GuestRam) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.base(),
        memory_size: r.size(),
        userspace_addr: r.host_addr(),
        mmap_offset: 0,
        mmap_handle: r.fd(),
    }
}

/// A memory region as a VMM describes it: a fresh memfd of `file_size` bytes at `gpa`, of which
/// the description claims `memory_size` bytes at `mmap_offset` (more than the file holds, where
/// the VMM overstates it).
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    pub gpa: u64,
    pub file_size: u64,
    pub memory_size: u64,
    pub mmap_offset: u64,
}

impl Claim {
    /// The memfd and the description sent for it.
    fn region(self) -> Result<(GuestRam, VhostUserMemoryRegionInfo), DriverError> {
        let r = GuestRam::new_at(self.gpa, self.file_size)
            .map_err(DriverError::io("creating memory region"))?;
        let info = VhostUserMemoryRegionInfo {
            memory_size: self.memory_size,
            mmap_offset: self.mmap_offset,
            ..region_info(&r)
        };
        Ok((r, info))
    }
}
