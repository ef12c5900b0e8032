//! The memory table as the VMM sends it (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG): each
//! region mapped from its file, the table handed to the device, kept only if accepted.

use super::*;

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU uses a few; the kernel's vhost has 509).
pub(super) const MAX_MEM_SLOTS: u64 = 509;

impl Connection {
    pub(super) fn to_gpa(&self, vmm_addr: u64) -> io::Result<u64> {
        self.regions
            .iter()
            .find(|r| vmm_addr >= r.user_addr && vmm_addr - r.user_addr < r.size)
            .map(|r| vmm_addr - r.user_addr + r.gpa)
            .ok_or_else(|| invalid(format!("ring address {vmm_addr:#x} is in no memory region")))
    }

    /// Hands a new table to the device; kept only if the device accepted it.
    fn install(
        &mut self,
        regions: Vec<VmmRegion>,
        table: Vec<Arc<GuestRegionMmap>>,
    ) -> io::Result<()> {
        self.device.set_memory_table(guest_memory(&table)?)?;
        self.regions = regions;
        self.watched = watch(&table);
        self.table = table;
        Ok(())
    }

    pub(super) fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        fds: Vec<OwnedFd>,
    ) -> io::Result<()> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut table = Vec::with_capacity(ctx.len());
        for (r, fd) in ctx.iter().zip(fds) {
            let (vmm, mapped) = map_region(r, fd)?;
            regions.push(vmm);
            table.push(mapped);
        }
        self.install(regions, table)
    }

    pub(super) fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fd: OwnedFd,
    ) -> io::Result<()> {
        let (gpa, size, user_addr) = (r.guest_phys_addr, r.memory_size, r.user_addr);
        if self
            .regions
            .iter()
            .any(|v| (v.gpa, v.size, v.user_addr) == (gpa, size, user_addr))
        {
            // The same region again: a message a killed daemon handled but had not taken out of
            // the socket (see `wire::peek`). Already in force.
            log::debug!("ADD_MEM_REG of the region at {gpa:#x} in force: nothing to do");
            return Ok(());
        }
        if self.table.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid("every memory slot is taken".into()));
        }
        let region = VhostUserMemoryRegion::new(
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
        );
        let (vmm, mapped) = map_region(&region, fd)?;
        let mut regions = self.regions.clone();
        let mut table = self.table.clone();
        regions.push(vmm);
        table.push(mapped);
        self.install(regions, table)
    }

    pub(super) fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> io::Result<()> {
        let (gpa, size) = (r.guest_phys_addr, r.memory_size);
        let Some(at) = self
            .regions
            .iter()
            .position(|v| v.gpa == gpa && v.size == size)
        else {
            // Gone already: a message a killed daemon handled but had not taken out of the
            // socket (see `wire::peek`), or a VMM removing what it never added. Nothing to do.
            log::debug!("REM_MEM_REG of no region ({gpa:#x}, {size:#x} bytes): nothing to do");
            return Ok(());
        };
        let mut regions = self.regions.clone();
        let mut table = self.table.clone();
        regions.remove(at);
        table.remove(at);
        self.install(regions, table)
    }
}

/// Guards each mapping of `table` against the SIGBUS of a truncated file.
pub(super) fn watch(table: &[Arc<GuestRegionMmap>]) -> Vec<crate::sigbus::Watched> {
    use vm_memory::GuestMemoryRegion;
    table
        .iter()
        .map(|r| crate::sigbus::watch(r.as_ptr() as usize, r.len() as usize))
        .collect()
}

/// The guest memory of a table's mapped regions (refused if they overlap).
pub(in crate::vhost) fn guest_memory(
    table: &[Arc<GuestRegionMmap>],
) -> io::Result<GuestMemoryMmap> {
    GuestMemoryMmap::from_arc_regions(table.to_vec())
        .map_err(|e| invalid(format!("memory table: {e}")))
}

pub(in crate::vhost) fn map_region(
    r: &VhostUserMemoryRegion,
    fd: OwnedFd,
) -> io::Result<(VmmRegion, Arc<GuestRegionMmap>)> {
    let (gpa, size) = (r.guest_phys_addr, r.memory_size);
    let len = usize::try_from(size).map_err(|_| invalid(format!("region of {size:#x} bytes")))?;
    let mapping = MmapRegion::from_file(FileOffset::new(File::from(fd), r.mmap_offset), len)
        .map_err(|e| invalid(format!("cannot map the memory region at {gpa:#x}: {e}")))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(|| {
        invalid(format!(
            "memory region at {gpa:#x} of {size:#x} bytes wraps around"
        ))
    })?;
    let vmm = VmmRegion {
        user_addr: r.user_addr,
        gpa,
        size,
    };
    Ok((vmm, Arc::new(region)))
}
