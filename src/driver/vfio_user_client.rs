//! A vfio-user client (the VMM's side) written from the protocol document
//! (nutanix/libvfio-user `docs/vfio-user.rst`, version 0.0), with its own encoding of every
//! message: it shares no code with the daemon's server (`crate::vfio_user`), so a test of one
//! against the other is a test of both against the document. The socket tier
//! (tests/vfio_user.rs) and the VM tier's vfio-user-edu use it. Errors come back as values: an
//! error reply's errno, or a broken transport or malformed reply. It counts the messages it
//! sends, so a check can show that an access needed none.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use viommu_uapi::vfio;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub type Result<T> = std::result::Result<T, String>;

// ---- constants: the message commands, header flags and DMA flags of the protocol document ----
pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const GET_REGION_INFO: u16 = 5;
pub const GET_REGION_IO_FDS: u16 = 6;
pub const GET_IRQ_INFO: u16 = 7;
pub const SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const RESET: u16 = 13;
pub const WRITE_MULTI: u16 = 15;

/// Message types and flags of the header.
pub const T_REPLY: u32 = 1;
pub const F_NO_REPLY: u32 = 1 << 4;
pub const F_ERROR: u32 = 1 << 5;

// What vfio-user carries unchanged from <linux/vfio.h>: region flags and capabilities, IRQ
// info flags, SET_IRQS data types and actions, IRQ indexes of a PCI device (the maintained
// bindings' values).
pub const REG_READ: u32 = vfio::VFIO_REGION_INFO_FLAG_READ;
pub const REG_WRITE: u32 = vfio::VFIO_REGION_INFO_FLAG_WRITE;
pub const REG_MMAP: u32 = vfio::VFIO_REGION_INFO_FLAG_MMAP;
pub const REG_CAPS: u32 = vfio::VFIO_REGION_INFO_FLAG_CAPS;
pub const CAP_SPARSE: u16 = vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
pub const CAP_MSIX_MAPPABLE: u16 = vfio::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16;
pub const IRQ_EVENTFD: u32 = vfio::VFIO_IRQ_INFO_EVENTFD;
pub const IRQ_MASKABLE: u32 = vfio::VFIO_IRQ_INFO_MASKABLE;
pub const IRQ_AUTOMASKED: u32 = vfio::VFIO_IRQ_INFO_AUTOMASKED;
pub const IRQ_NORESIZE: u32 = vfio::VFIO_IRQ_INFO_NORESIZE;
pub const SET_DATA_NONE: u32 = vfio::VFIO_IRQ_SET_DATA_NONE;
pub const SET_DATA_BOOL: u32 = vfio::VFIO_IRQ_SET_DATA_BOOL;
pub const SET_DATA_EVENTFD: u32 = vfio::VFIO_IRQ_SET_DATA_EVENTFD;
pub const SET_ACTION_TRIGGER: u32 = vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
pub const INTX: u32 = vfio::VFIO_PCI_INTX_IRQ_INDEX;
pub const MSIX: u32 = vfio::VFIO_PCI_MSIX_IRQ_INDEX;
pub const REQ: u32 = vfio::VFIO_PCI_REQ_IRQ_INDEX;

/// DMA region flags (vfio-user's own).
pub const DMA_READ: u32 = 1;
pub const DMA_WRITE: u32 = 2;

/// An error reply's errno, or a failure of the transport / a malformed reply.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    Errno(u32),
    Broken(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Errno(e) => write!(
                f,
                "error reply: errno {e} ({})",
                std::io::Error::from_raw_os_error(*e as i32)
            ),
            CallError::Broken(s) => write!(f, "{s}"),
        }
    }
}

impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.to_string()
    }
}

pub type Res<T> = std::result::Result<T, CallError>;

fn broken<T>(s: impl Into<String>) -> Res<T> {
    Err(CallError::Broken(s.into()))
}

#[derive(Debug, Clone, Copy)]
pub struct Hdr {
    pub id: u16,
    pub cmd: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

/// A message header: `size` is the whole message's, header included.
pub fn hdr_bytes(id: u16, cmd: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&id.to_ne_bytes());
    b.extend_from_slice(&cmd.to_ne_bytes());
    b.extend_from_slice(&size.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes(b[o..o + 2].try_into().unwrap())
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().unwrap())
}

/// A little builder for payloads.
#[derive(Default)]
pub struct P(pub Vec<u8>);
impl P {
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// One region's info as the reply describes it.
#[derive(Debug)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    pub offset: u64,
    /// SPARSE_MMAP areas (offset, size), relative to the region.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Capability ids in chain order.
    pub cap_ids: Vec<u16>,
    /// The fd that came with the full answer.
    pub fd: Option<OwnedFd>,
}

pub struct Client {
    sock: UnixStream,
    next_id: u16,
    /// Messages sent on this connection.
    pub sent: u64,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let sock =
            UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        sock.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        Ok(Client::over(sock, 1))
    }

    /// A client over an already connected socket, numbering its messages from `first_id`.
    pub fn over(sock: UnixStream, first_id: u16) -> Client {
        Client {
            sock,
            next_id: first_id,
            sent: 0,
        }
    }

    /// The id the next message gets.
    pub fn next_id(&self) -> u16 {
        self.next_id
    }

    /// Takes the next message id (for a message built by hand and sent with
    /// [`Client::send_raw`]).
    pub fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// The connection (to poll it, or to write past the protocol).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends `bytes` as they are, with `fds`.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) -> Res<()> {
        let n = self
            .sock
            .send_with_fds(&[bytes], fds)
            .map_err(|e| CallError::Broken(format!("send: {e}")))?;
        if n != bytes.len() {
            return broken(format!("short send: {n} of {}", bytes.len()));
        }
        self.sent += 1;
        Ok(())
    }

    /// Sends command `cmd` with the next message id, which it returns.
    pub fn send(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd], flags: u32) -> Res<u16> {
        let id = self.take_id();
        let mut m = hdr_bytes(id, cmd, (16 + payload.len()) as u32, flags);
        m.extend_from_slice(payload);
        self.send_raw(&m, fds)?;
        Ok(id)
    }

    /// Receives one message, whatever it is.
    pub fn recv(&mut self) -> Res<(Hdr, Vec<u8>, Vec<OwnedFd>)> {
        let mut h = [0u8; 16];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        }];
        // SAFETY: the iovec covers `h`, which may receive arbitrary bytes.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| CallError::Broken(format!("recv: {e}")))?;
        // SAFETY: recv_with_fds handed us `nfds` fresh fds to own.
        let fds: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return broken("the server closed the connection");
        }
        if n < 16 {
            self.sock
                .read_exact(&mut h[n..])
                .map_err(|e| CallError::Broken(format!("recv header: {e}")))?;
        }
        let hdr = Hdr {
            id: le16(&h, 0),
            cmd: le16(&h, 2),
            size: le32(&h, 4),
            flags: le32(&h, 8),
            error: le32(&h, 12),
        };
        if hdr.size < 16 || hdr.size >= 2 << 20 {
            return broken(format!("reply size {}", hdr.size));
        }
        let mut body = vec![0u8; hdr.size as usize - 16];
        self.sock
            .read_exact(&mut body)
            .map_err(|e| CallError::Broken(format!("recv body: {e}")))?;
        Ok((hdr, body, fds))
    }

    /// Receives the reply to `id`/`cmd`: Ok(payload, fds) or Err(errno).
    pub fn reply(&mut self, id: u16, cmd: u16) -> Res<(Vec<u8>, Vec<OwnedFd>)> {
        let (h, body, fds) = self.recv()?;
        if h.flags & 0xf != T_REPLY || (h.id, h.cmd) != (id, cmd) {
            return broken(format!("expected the reply to {id}/{cmd}, got {h:?}"));
        }
        if h.flags & F_ERROR != 0 {
            if h.error == 0 {
                return broken("an error reply without an errno");
            }
            if !body.is_empty() || !fds.is_empty() {
                return broken("an error reply with a payload or fds");
            }
            return Err(CallError::Errno(h.error));
        }
        Ok((body, fds))
    }

    pub fn call(
        &mut self,
        cmd: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Res<(Vec<u8>, Vec<OwnedFd>)> {
        let id = self.send(cmd, payload, fds, 0)?;
        self.reply(id, cmd)
    }

    /// After a daemon restart: a DEVICE_GET_INFO whose reply is waited for past at most one
    /// stale reply, a second answer to the message before the kill (a restarted daemon gives
    /// it when the client read the first and went quiet for 100 ms: docs/deploying.md). Returns
    /// how many stale replies came first.
    pub fn sync(&mut self) -> Res<usize> {
        let p = P::default().u32(16).u32(0).u32(0).u32(0);
        let id = self.send(GET_INFO, &p.0, &[], 0)?;
        let mut stale = 0;
        loop {
            let (h, _, _) = self.recv()?;
            if h.flags & 0xf == T_REPLY && (h.id, h.cmd) == (id, GET_INFO) {
                return Ok(stale);
            }
            stale += 1;
            if stale > 1 || h.id.wrapping_add(1) != id {
                return broken(format!(
                    "waiting for the reply to {id}/{GET_INFO}, got {h:?}"
                ));
            }
        }
    }

    /// VERSION 0.0 with `json` as our capabilities; returns the server's (major, minor,
    /// capabilities).
    pub fn version(&mut self, json: &str) -> Res<(u16, u16, serde_json::Value)> {
        let p = P::default()
            .bytes(&0u16.to_ne_bytes())
            .bytes(&0u16.to_ne_bytes())
            .bytes(json.as_bytes())
            .bytes(&[0]);
        let (body, _) = self.call(VERSION, &p.0, &[])?;
        if body.len() < 5 || *body.last().unwrap() != 0 {
            return broken(format!(
                "VERSION reply of {} bytes, not NUL-terminated",
                body.len()
            ));
        }
        let caps = serde_json::from_slice(&body[4..body.len() - 1])
            .map_err(|e| CallError::Broken(format!("VERSION capabilities: {e}")))?;
        Ok((le16(&body, 0), le16(&body, 2), caps))
    }

    /// DEVICE_GET_INFO: (argsz, flags, num_regions, num_irqs).
    pub fn info(&mut self) -> Res<(u32, u32, u32, u32)> {
        let p = P::default().u32(16).u32(0).u32(0).u32(0);
        let (b, _) = self.call(GET_INFO, &p.0, &[])?;
        if b.len() != 16 {
            return broken(format!("DEVICE_GET_INFO reply of {} bytes", b.len()));
        }
        Ok((le32(&b, 0), le32(&b, 4), le32(&b, 8), le32(&b, 12)))
    }

    /// One DEVICE_GET_REGION_INFO with `argsz`: the reply as it came.
    pub fn region_info_raw(&mut self, index: u32, argsz: u32) -> Res<(Vec<u8>, Vec<OwnedFd>)> {
        let p = P::default()
            .u32(argsz)
            .u32(0)
            .u32(index)
            .u32(0)
            .u64(0)
            .u64(0);
        self.call(GET_REGION_INFO, &p.0, &[])
    }

    /// DEVICE_GET_REGION_INFO the way a VMM asks: bare argsz first, then the size it was told.
    pub fn region_info(&mut self, index: u32) -> Res<RegionInfo> {
        let (first, mut fds) = self.region_info_raw(index, 32)?;
        if first.len() < 32 {
            return broken(format!("region info reply of {} bytes", first.len()));
        }
        let needed = le32(&first, 0);
        let reply = if needed as usize <= first.len() {
            first
        } else {
            if !fds.is_empty() {
                return broken("an fd came with the bare answer");
            }
            let (full, f) = self.region_info_raw(index, needed)?;
            if full.len() != needed as usize {
                return broken(format!(
                    "full region info {} bytes, told {needed}",
                    full.len()
                ));
            }
            fds = f;
            full
        };
        if fds.len() > 1 {
            return broken(format!("{} fds with one region info", fds.len()));
        }
        let flags = le32(&reply, 4);
        let mut sparse = None;
        let mut cap_ids = Vec::new();
        if flags & REG_CAPS != 0 {
            let mut off = le32(&reply, 12) as usize;
            while off != 0 {
                if off < 32 || off + 8 > reply.len() {
                    return broken(format!("capability at {off} outside the reply"));
                }
                let id = le16(&reply, off);
                cap_ids.push(id);
                if id == CAP_SPARSE {
                    let n = le32(&reply, off + 8) as usize;
                    if off + 16 + 16 * n > reply.len() {
                        return broken("sparse mmap areas outside the reply");
                    }
                    sparse = Some(
                        (0..n)
                            .map(|i| {
                                (
                                    le64(&reply, off + 16 + 16 * i),
                                    le64(&reply, off + 24 + 16 * i),
                                )
                            })
                            .collect(),
                    );
                }
                let next = le32(&reply, off + 4) as usize;
                if next != 0 && next <= off {
                    return broken("capability chain goes backwards");
                }
                off = next;
            }
        }
        Ok(RegionInfo {
            flags,
            size: le64(&reply, 16),
            offset: le64(&reply, 24),
            sparse,
            cap_ids,
            fd: fds.pop(),
        })
    }

    /// DEVICE_GET_IRQ_INFO: (flags, count).
    pub fn irq_info(&mut self, index: u32) -> Res<(u32, u32)> {
        let p = P::default().u32(16).u32(0).u32(index).u32(0);
        let (b, _) = self.call(GET_IRQ_INFO, &p.0, &[])?;
        if b.len() != 16 || le32(&b, 8) != index {
            return broken("malformed IRQ info reply");
        }
        Ok((le32(&b, 4), le32(&b, 12)))
    }

    pub fn read(&mut self, region: u32, offset: u64, count: u32) -> Res<Vec<u8>> {
        let p = P::default().u64(offset).u32(region).u32(count);
        let (body, _) = self.call(REGION_READ, &p.0, &[])?;
        if body.len() != 16 + count as usize
            || le64(&body, 0) != offset
            || le32(&body, 8) != region
            || le32(&body, 12) != count
        {
            return broken("REGION_READ reply does not echo the request");
        }
        Ok(body[16..].to_vec())
    }

    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Res<()> {
        let p = P::default()
            .u64(offset)
            .u32(region)
            .u32(data.len() as u32)
            .bytes(data);
        let (body, _) = self.call(REGION_WRITE, &p.0, &[])?;
        if body.len() != 16 || le32(&body, 12) != data.len() as u32 {
            return broken("REGION_WRITE reply does not echo the request");
        }
        Ok(())
    }

    /// SET_IRQS with `fds` (DATA_EVENTFD) or `data` (DATA_BOOL) for the vectors.
    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
        data: &[u8],
    ) -> Res<()> {
        let p = P::default()
            .u32(20 + data.len() as u32)
            .u32(flags)
            .u32(index)
            .u32(start)
            .u32(count)
            .bytes(data);
        self.call(SET_IRQS, &p.0, fds).map(drop)
    }

    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<RawFd>,
    ) -> Res<()> {
        let p = P::default()
            .u32(32)
            .u32(flags)
            .u64(offset)
            .u64(address)
            .u64(size);
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.call(DMA_MAP, &p.0, &fds).map(|_| ())
    }

    /// DMA_UNMAP: the reply's payload (the request echoed).
    pub fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Res<Vec<u8>> {
        let p = P::default().u32(24).u32(flags).u64(address).u64(size);
        self.call(DMA_UNMAP, &p.0, &[]).map(|(body, _)| body)
    }

    /// True once the server has closed the connection (reads EOF).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.sock.read(&mut b), Ok(0))
    }

    pub fn reset(&mut self) -> Res<()> {
        self.call(RESET, &[], &[]).map(|_| ())
    }
}
