//! The commands of one connection: each decoded, checked and carried out on the device or
//! the DMA map registry.

use super::*;

/// A DMA map's fd, duplicated, and which file it is (`st_dev`, `st_ino`).
fn map_file(fd: &OwnedFd) -> Result<(std::fs::File, (u64, u64)), Errno> {
    let f = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| Errno::from_io(&e, "dup of the DMA map fd"))?,
    );
    let md = f
        .metadata()
        .map_err(|e| Errno::from_io(&e, "fstat of the DMA map fd"))?;
    Ok((f, (md.dev(), md.ino())))
}

impl<'a> Connection<'a> {
    pub(super) fn dispatch(&mut self, m: &Msg) -> Result<Reply<'a>, Errno> {
        let h = &m.hdr;
        let p = &m.payload[..];
        if m.fds_truncated {
            return Err(err(
                libc::EINVAL,
                format!("more than {MAX_MSG_FDS} file descriptors"),
            ));
        }
        let takes_fds = match h.command {
            CMD_DMA_MAP => 1,
            CMD_DEVICE_SET_IRQS => MAX_MSG_FDS,
            _ => 0,
        };
        if m.fds.len() > takes_fds {
            return Err(err(
                libc::EINVAL,
                format!(
                    "command {} came with {} file descriptors",
                    h.command,
                    m.fds.len()
                ),
            ));
        }
        if !self.negotiated && h.command != CMD_VERSION {
            return Err(err(libc::EINVAL, "VERSION must come first"));
        }
        match h.command {
            CMD_VERSION => self.version(p),
            CMD_DMA_MAP => self.dma_map(p, m.fds.first()),
            CMD_DMA_UNMAP => self.dma_unmap(p),
            CMD_DEVICE_GET_INFO => {
                decode_device_info_req(p)?;
                Ok(Reply::data(encode_device_info(&self.dev.info())))
            }
            CMD_DEVICE_GET_REGION_INFO => self.region_info(p),
            CMD_DEVICE_GET_REGION_IO_FDS => {
                Err(err(libc::ENOTSUP, "GET_REGION_IO_FDS is not supported"))
            }
            CMD_DEVICE_GET_IRQ_INFO => {
                let index = decode_irq_info_req(p)?;
                self.check_irq_index(index)?;
                let info = self.dev.irq_info(index)?;
                Ok(Reply::data(encode_irq_info(index, &info)))
            }
            CMD_DEVICE_SET_IRQS => self.set_irqs(p, &m.fds),
            CMD_REGION_READ => {
                let a = decode_region_read(p)?;
                self.check_region_index(a.region)?;
                let mut data = vec![0u8; a.count as usize];
                self.dev.read(a.region, a.offset, &mut data)?;
                Ok(Reply::data(encode_region_access(&a, &data)))
            }
            CMD_REGION_WRITE => {
                let (a, data) = decode_region_write(p)?;
                self.check_region_index(a.region)?;
                self.gate_bus_master(a.region, a.offset, data);
                self.dev.write(a.region, a.offset, data)?;
                Ok(Reply::data(encode_region_access(&a, &[])))
            }
            CMD_REGION_WRITE_MULTI => {
                let writes = decode_write_multi(p)?;
                for w in &writes {
                    self.check_region_index(w.region)?;
                    self.gate_bus_master(w.region, w.offset, w.bytes());
                    self.dev.write(w.region, w.offset, w.bytes())?;
                }
                Ok(Reply::data((writes.len() as u64).to_ne_bytes().to_vec()))
            }
            CMD_DEVICE_RESET => {
                self.dev.reset()?;
                Ok(Reply::empty())
            }
            CMD_DMA_READ | CMD_DMA_WRITE => Err(err(
                libc::EINVAL,
                "DMA_READ/DMA_WRITE are server-to-client commands",
            )),
            // What the kernel answers for a feature it does not have.
            CMD_DEVICE_FEATURE => Err(err(libc::ENOTTY, "device features are not supported")),
            CMD_MIG_DATA_READ | CMD_MIG_DATA_WRITE => {
                Err(err(libc::ENOTSUP, "migration is not supported"))
            }
            c => Err(err(libc::ENOSYS, format!("unknown command {c}"))),
        }
    }

    fn version(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        if self.negotiated {
            return Err(err(libc::EINVAL, "VERSION already negotiated"));
        }
        let v = decode_version(p)?;
        if v.major != 0 {
            return Err(err(
                libc::ENOTSUP,
                format!("protocol version {}.{} (we speak 0.0)", v.major, v.minor),
            ));
        }
        self.negotiated = true;
        debug!(
            "vfio-user {}: client version {}.{} capabilities {:?}",
            self.name, v.major, v.minor, v.capabilities
        );
        // QEMU receives the reply into its request's buffer: ours (about 120 bytes of JSON)
        // must stay smaller than what it offers (about 200).
        Ok(Reply::data(encode_version_reply(
            client_offers_write_multiple(&v),
        )))
    }

    fn dma_map(&mut self, p: &[u8], fd: Option<&OwnedFd>) -> Result<Reply<'a>, Errno> {
        let m = decode_dma_map(p)?;
        let end = m.address + m.size;
        if self.after_crash && self.already_mapped(&m, fd) {
            info!(
                "crash restart: vfio-user {}: DMA map {:#x}+{:#x} was made before the crash",
                self.name, m.address, m.size
            );
            return Ok(Reply::empty());
        }
        if self.maps.len() >= MAX_DMA_MAPS {
            return Err(err(
                libc::ENOSPC,
                format!("more than {MAX_DMA_MAPS} DMA maps"),
            ));
        }
        if let Some((_, prev)) = self.maps.lock().range(..end).next_back()
            && prev.address + prev.size > m.address
        {
            return Err(err(
                libc::EEXIST,
                format!(
                    "DMA map {:#x}+{:#x} overlaps {:#x}+{:#x}",
                    m.address, m.size, prev.address, prev.size
                ),
            ));
        }
        // Only this thread changes the maps, so nothing new can overlap meanwhile; the check
        // runs without the lock held.
        let (file_id, file) = match fd {
            Some(fd) => {
                if !(self.dma_check)(m.address, m.size) {
                    return Err(err(
                        libc::EFAULT,
                        format!(
                            "DMA map {:#x}+{:#x} is not inside guest RAM",
                            m.address, m.size
                        ),
                    ));
                }
                let (f, id) = map_file(fd)?;
                (Some(id), Some(Arc::new(f)))
            }
            None => (None, None),
        };
        debug!(
            "vfio-user {}: DMA map {:#x}+{:#x} flags {:#x} offset {:#x} fd {}",
            self.name,
            m.address,
            m.size,
            m.flags,
            m.offset,
            fd.is_some()
        );
        self.maps.lock().insert(
            m.address,
            DmaRegion {
                address: m.address,
                size: m.size,
                flags: m.flags,
                offset: m.offset,
                file_id,
                file,
            },
        );
        self.maps_changed();
        Ok(Reply::empty())
    }

    /// Whether the maps hold exactly the map `m` asks for, from the same file.
    fn already_mapped(&self, m: &DmaMap, fd: Option<&OwnedFd>) -> bool {
        let file_id = fd.and_then(|fd| map_file(fd).ok()).map(|(_, id)| id);
        self.maps.lock().get(&m.address).is_some_and(|r| {
            (r.size, r.flags, r.offset, r.file_id) == (m.size, m.flags, m.offset, file_id)
        })
    }

    fn dma_unmap(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        let u = decode_dma_unmap(p)?;
        {
            let mut maps = self.maps.lock();
            if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
                maps.clear();
            } else {
                match maps.get(&u.address) {
                    Some(r) if r.size == u.size => {
                        maps.remove(&u.address);
                    }
                    None if self.after_crash => {
                        info!(
                            "crash restart: vfio-user {}: DMA unmap {:#x}+{:#x} was made before the crash",
                            self.name, u.address, u.size
                        );
                    }
                    _ => {
                        return Err(err(
                            libc::ENOENT,
                            format!("no DMA map is exactly {:#x}+{:#x}", u.address, u.size),
                        ));
                    }
                }
            }
        }
        self.maps_changed();
        Ok(Reply::data(encode_dma_unmap_reply(&u)))
    }

    /// Before a write of `data` at `offset` of region `region` reaches the device: if it turns
    /// bus mastering on, the `before_bus_master` hook runs first.
    fn gate_bus_master(&self, region: u32, offset: u64, data: &[u8]) {
        if let Some(f) = &self.before_bus_master
            && region == VFIO_PCI_CONFIG_REGION_INDEX
            && sets_bus_master(offset, data)
        {
            f();
        }
    }

    fn check_region_index(&self, index: u32) -> Result<(), Errno> {
        if index >= self.dev.info().num_regions {
            return Err(err(libc::EINVAL, format!("no region {index}")));
        }
        Ok(())
    }

    fn check_irq_index(&self, index: u32) -> Result<(), Errno> {
        if index == VFIO_PCI_REQ_IRQ_INDEX {
            return Err(err(
                libc::EPERM,
                format!("IRQ index {index} (REQ) is the daemon's hot-unplug watcher's"),
            ));
        }
        if !CLIENT_IRQ_INDEXES.contains(&index) || index >= self.dev.info().num_irqs {
            return Err(err(libc::EINVAL, format!("no IRQ index {index}")));
        }
        Ok(())
    }

    fn region_info(&mut self, p: &[u8]) -> Result<Reply<'a>, Errno> {
        let req = decode_region_info_req(p)?;
        self.check_region_index(req.index)?;
        let mut info = self.dev.region_info(req.index)?;
        // Without MSIX_MAPPABLE the VMM keeps the MSI-X table out of its mmap and emulates it.
        info.caps
            .retain(|c| c.id != VFIO_REGION_INFO_CAP_MSIX_MAPPABLE);
        let fd = self.dev.region_fd();
        let mmap = info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && fd.is_some() && info.size > 0;
        if mmap {
            if info.cap(VFIO_REGION_INFO_CAP_SPARSE_MMAP).is_none() {
                info.caps.push(RegionCap::sparse_mmap(&[SparseArea {
                    offset: 0,
                    size: info.size,
                }]));
            }
        } else {
            info.flags &= !VFIO_REGION_INFO_FLAG_MMAP;
            info.caps
                .retain(|c| c.id != VFIO_REGION_INFO_CAP_SPARSE_MMAP);
        }
        let argsz = req.argsz.min(MAX_REGION_INFO_SIZE as u32);
        let (payload, full) = encode_region_info(req.index, &info, argsz);
        Ok(Reply {
            payload,
            fd: if full && mmap { fd } else { None },
        })
    }

    fn set_irqs(&mut self, p: &[u8], fds: &[OwnedFd]) -> Result<Reply<'a>, Errno> {
        let s = decode_irq_set(p)?;
        self.check_irq_index(s.index)?;
        let raw: Vec<RawFd> = if s.data_type() == VFIO_IRQ_SET_DATA_EVENTFD {
            if fds.is_empty() {
                // Vectors without an eventfd (de-assign): -1 for each.
                vec![-1; s.count as usize]
            } else if fds.len() == s.count as usize {
                fds.iter().map(|f| f.as_raw_fd()).collect()
            } else {
                return Err(err(
                    libc::EINVAL,
                    format!("{} eventfds for {} vectors", fds.len(), s.count),
                ));
            }
        } else {
            if !fds.is_empty() {
                return Err(err(libc::EINVAL, "file descriptors without DATA_EVENTFD"));
            }
            Vec::new()
        };
        self.dev.set_irqs(&s, &raw)?;
        self.irqs_set |= 1 << s.index;
        self.watch_irqs(&s, &raw);
        // Our copies of the eventfds close when the message drops; the device holds its own.
        Ok(Reply::empty())
    }
}

impl Connection<'_> {
    /// Tells the interrupt watch what the client just set: the eventfds of triggered vectors,
    /// or an index disabled (`DATA_NONE` with no vector).
    fn watch_irqs(&self, s: &IrqSet<'_>, fds: &[RawFd]) {
        let Some(w) = self.irq_watch else { return };
        if s.flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return;
        }
        match s.data_type() {
            VFIO_IRQ_SET_DATA_EVENTFD => {
                if let Err(e) = w.set(self.name, s.index, s.start, fds) {
                    // Only a hint is lost: the device's interrupts reach the client all the same.
                    debug!(
                        "vfio-user {}: cannot watch IRQ index {}: {e}",
                        self.name, s.index
                    );
                }
            }
            VFIO_IRQ_SET_DATA_NONE if s.count == 0 => w.clear_index(self.name, s.index),
            _ => {}
        }
    }
}

/// Whether a config-space write of `data` at `offset` sets the command register's bus master
/// bit (it lies in the register's low byte).
fn sets_bus_master(offset: u64, data: &[u8]) -> bool {
    PCI_COMMAND
        .checked_sub(offset)
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| data.get(i))
        .is_some_and(|b| u16::from(*b) & PCI_COMMAND_MASTER != 0)
}

#[cfg(test)]
mod tests {
    use super::sets_bus_master;

    #[test]
    fn a_write_sets_bus_master_only_where_it_covers_the_bit() {
        // The command register alone, and as part of a dword from the device ID.
        assert!(sets_bus_master(4, &[0x04]));
        assert!(sets_bus_master(4, &[0x06, 0x00]));
        assert!(sets_bus_master(2, &[0x00, 0x00, 0x07, 0x01]));
        // Other bits of the register, its high byte, writes beside it.
        assert!(!sets_bus_master(4, &[0x03, 0xff]));
        assert!(!sets_bus_master(5, &[0xff]));
        assert!(!sets_bus_master(0, &[0xff; 4]));
        assert!(!sets_bus_master(6, &[0xff; 2]));
        // Offsets no arithmetic may wrap on.
        assert!(!sets_bus_master(u64::MAX, &[0xff; 8]));
        assert!(!sets_bus_master(u64::MAX - 2, &[0xff; 8]));
    }
}
