//! vhost-user framing on the VMM's socket: the message header, the request codes the device
//! answers, reading one whole message (with the fds passed along) and writing replies.
//!
//! The message bodies are the `vhost` crate's types; the framing is ours so that everything
//! negotiated on a connection lives in [`super::Connection`], where a handover can read it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vm_memory::ByteValued;

use crate::peek::Peeked;
use crate::scm;

/// vhost-user request codes (front-end to back-end) this device knows.
pub(super) mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// The name of a request code (for the trace).
pub(super) fn name(request: u32) -> &'static str {
    use code::*;
    match request {
        GET_FEATURES => "GET_FEATURES",
        SET_FEATURES => "SET_FEATURES",
        SET_OWNER => "SET_OWNER",
        RESET_OWNER => "RESET_OWNER",
        SET_MEM_TABLE => "SET_MEM_TABLE",
        SET_VRING_NUM => "SET_VRING_NUM",
        SET_VRING_ADDR => "SET_VRING_ADDR",
        SET_VRING_BASE => "SET_VRING_BASE",
        GET_VRING_BASE => "GET_VRING_BASE",
        SET_VRING_KICK => "SET_VRING_KICK",
        SET_VRING_CALL => "SET_VRING_CALL",
        SET_VRING_ERR => "SET_VRING_ERR",
        GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
        SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
        GET_QUEUE_NUM => "GET_QUEUE_NUM",
        SET_VRING_ENABLE => "SET_VRING_ENABLE",
        GET_CONFIG => "GET_CONFIG",
        SET_CONFIG => "SET_CONFIG",
        RESET_DEVICE => "RESET_DEVICE",
        GET_MAX_MEM_SLOTS => "GET_MAX_MEM_SLOTS",
        ADD_MEM_REG => "ADD_MEM_REG",
        REM_MEM_REG => "REM_MEM_REG",
        _ => "unsupported",
    }
}

/// Header flags: protocol version 1, reply, reply wanted (REPLY_ACK).
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// The largest payload accepted (the vhost-user reference's message buffer).
pub(super) const MAX_PAYLOAD: usize = 0x1000;

/// The header of every vhost-user message.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

// SAFETY: three u32s, packed: no padding, every bit pattern valid.
unsafe impl ByteValued for Header {}

/// One message from the VMM.
pub(super) struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The payload as exactly one `T`, nothing more or less.
    pub fn body<T: ByteValued>(&self) -> io::Result<T> {
        if self.payload.len() != std::mem::size_of::<T>() {
            return Err(invalid(format!(
                "request {}: payload of {} bytes, expected {}",
                { self.header.request },
                self.payload.len(),
                std::mem::size_of::<T>()
            )));
        }
        Ok(T::from_slice(&self.payload)
            .copied()
            .unwrap_or_else(|| unreachable!("the length was checked")))
    }

    pub fn wants_reply(&self) -> bool {
        self.header.flags & NEED_REPLY != 0
    }
}

pub(super) fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads exactly `buf.len()` bytes, collecting fds; Ok(false) if the stream ended before the
/// first byte and `at_start`.
fn read_full(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_start: bool,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let (n, truncated) = scm::recv_some(sock.as_fd(), &mut buf[got..], fds)?;
        if truncated {
            return Err(invalid(
                "more file descriptors than any message carries".into(),
            ));
        }
        if n == 0 {
            if at_start && got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the VMM closed the socket mid-message",
            ));
        }
        got += n;
    }
    Ok(true)
}

/// Reads the next message; None when the VMM closed the connection between messages.
pub(super) fn receive(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = Header::default();
    let mut fds = Vec::new();
    if !read_full(sock, header.as_mut_slice(), &mut fds, true)? {
        return Ok(None);
    }
    check(&header)?;
    let mut payload = vec![0; header.size as usize];
    read_full(sock, &mut payload, &mut fds, false)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// A header the daemon can take: protocol version 1, a request, a payload it has room for.
fn check(header: &Header) -> io::Result<()> {
    let (request, flags, size) = (header.request, header.flags, header.size);
    if flags & VERSION_MASK != VERSION || flags & REPLY != 0 || flags & !0xf != 0 {
        return Err(invalid(format!(
            "request {request}: bad header flags {flags:#x}"
        )));
    }
    if size as usize > MAX_PAYLOAD {
        return Err(invalid(format!(
            "request {request}: payload of {size} bytes (at most {MAX_PAYLOAD})"
        )));
    }
    Ok(())
}

/// How long the rest of a message may take to arrive once its first byte is there.
const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The next message, left in the socket ([`consume`] takes it once it is answered): a daemon
/// killed while handling it leaves it there for the next one, which handles it again (the
/// messages a VMM sends are idempotent: the same table, ring address, feature set). With its
/// length in the socket. None when the VMM closed the connection between messages. A message
/// whose fds came apart from the rest of it cannot be seen whole without reading it: it is
/// read (consumed) instead, and its length is 0.
pub(super) fn peek(sock: &UnixStream) -> io::Result<Option<(Message, usize)>> {
    let header_len = std::mem::size_of::<Header>();
    let len = |bytes: &[u8]| -> io::Result<usize> {
        let mut header = Header::default();
        header.as_mut_slice().copy_from_slice(bytes);
        check(&header)?;
        Ok(header_len + header.size as usize)
    };
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    match crate::peek::peek_message(sock.as_fd(), header_len, &len, deadline, &|| false)? {
        Peeked::Closed => Ok(None),
        Peeked::Whole {
            truncated: true, ..
        } => Err(invalid(
            "more file descriptors than any message carries".into(),
        )),
        Peeked::Whole { mut bytes, fds, .. } => {
            let mut header = Header::default();
            header.as_mut_slice().copy_from_slice(&bytes[..header_len]);
            let t = bytes.len();
            bytes.drain(..header_len);
            Ok(Some((
                Message {
                    header,
                    payload: bytes,
                    fds,
                },
                t,
            )))
        }
        // Part of the message came with fds and the rest apart: read it the consuming way.
        Peeked::Apart => receive(sock).map(|m| m.map(|m| (m, 0))),
        Peeked::GaveUp => unreachable!("a vhost-user peek never gives up"),
    }
}

/// What identifies a message among those a VMM sends one after the other (see
/// [`crate::peek::digest`]).
pub(super) fn digest(m: &Message) -> u64 {
    crate::peek::digest(&[m.header.as_slice(), &m.payload])
}

/// Whether the reply sent last on `sock` went out (see [`crate::peek::reply_went_out`]).
pub(super) fn reply_went_out(sock: &UnixStream, len: usize) -> io::Result<bool> {
    crate::peek::reply_went_out(sock.as_fd(), len)
}

/// Takes the `len` bytes of an answered message out of the socket (the fds that come with them
/// again are closed).
pub(super) fn consume(sock: &UnixStream, len: usize) -> io::Result<()> {
    crate::peek::consume(sock.as_fd(), len)
}

/// Sends the reply to `to` with `body` as its payload.
pub(super) fn reply(sock: &UnixStream, to: &Header, body: &[u8]) -> io::Result<()> {
    let header = Header {
        request: to.request,
        flags: VERSION | REPLY,
        size: body.len() as u32,
    };
    let mut bytes = Vec::with_capacity(std::mem::size_of::<Header>() + body.len());
    bytes.extend_from_slice(header.as_slice());
    bytes.extend_from_slice(body);
    scm::send_all(sock.as_fd(), &bytes, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            request,
            flags,
            size: payload.len() as u32,
        };
        [h.as_slice(), payload].concat()
    }

    #[test]
    fn a_message_arriving_in_pieces_is_read_whole() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let bytes = message(
            code::SET_FEATURES,
            VERSION | NEED_REPLY,
            &7u64.to_le_bytes(),
        );
        let t = std::thread::spawn(move || {
            for piece in bytes.chunks(5) {
                a.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let m = receive(&b).unwrap().unwrap();
        t.join().unwrap();
        assert_eq!({ m.header.request }, code::SET_FEATURES);
        assert!(m.wants_reply());
        assert_eq!(m.body::<u64>().unwrap(), 7);
        assert!(
            m.body::<u32>().is_err(),
            "a body of another size is refused"
        );
    }

    #[test]
    fn a_peeked_message_stays_in_the_socket_until_consumed() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let first = message(code::SET_FEATURES, VERSION, &7u64.to_le_bytes());
        let second = message(code::GET_FEATURES, VERSION, &[]);
        // The first in pieces (peeked until whole), the second right behind it.
        let (f, s2) = (first.clone(), second.clone());
        let t = std::thread::spawn(move || {
            for piece in f.chunks(5) {
                a.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            a.write_all(&s2).unwrap();
            a
        });
        let (m, len) = peek(&b).unwrap().unwrap();
        assert_eq!(
            ({ m.header.request }, len),
            (code::SET_FEATURES, first.len())
        );
        assert_eq!(m.body::<u64>().unwrap(), 7);
        let _a = t.join().unwrap();
        // A daemon killed now leaves it there: the next peek sees the same message.
        let (again, _) = peek(&b).unwrap().unwrap();
        assert_eq!({ again.header.request }, code::SET_FEATURES);
        consume(&b, len).unwrap();
        let (next, len) = peek(&b).unwrap().unwrap();
        assert_eq!(
            ({ next.header.request }, len),
            (code::GET_FEATURES, second.len())
        );
    }

    #[test]
    fn a_peeked_message_brings_its_fds_each_time_and_consuming_closes_the_copies() {
        use std::os::fd::AsRawFd;
        let (a, b) = UnixStream::pair().unwrap();
        let ev = crate::journal::memfd(c"kick").unwrap();
        let bytes = message(code::SET_VRING_KICK, VERSION, &0u64.to_le_bytes());
        scm::send_all(a.as_fd(), &bytes, Some(ev.as_fd())).unwrap();
        let (m1, len) = peek(&b).unwrap().unwrap();
        let (m2, _) = peek(&b).unwrap().unwrap();
        assert_eq!((m1.fds.len(), m2.fds.len()), (1, 1));
        assert_ne!(
            m1.fds[0].as_raw_fd(),
            m2.fds[0].as_raw_fd(),
            "a copy per peek"
        );
        consume(&b, len).unwrap();
        drop(a);
        assert!(peek(&b).unwrap().is_none(), "nothing left, then the close");
    }

    #[test]
    fn a_peek_never_takes_the_next_messages_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let ev = crate::journal::memfd(c"kick").unwrap();
        let first = message(code::SET_VRING_NUM, VERSION, &[0; 8]);
        let second = message(code::SET_VRING_KICK, VERSION, &0u64.to_le_bytes());
        scm::send_all(a.as_fd(), &first, None).unwrap();
        scm::send_all(a.as_fd(), &second, Some(ev.as_fd())).unwrap();
        let (m, len) = peek(&b).unwrap().unwrap();
        assert_eq!(
            ({ m.header.request }, m.fds.len()),
            (code::SET_VRING_NUM, 0)
        );
        consume(&b, len).unwrap();
        let (m, _) = peek(&b).unwrap().unwrap();
        assert_eq!(
            ({ m.header.request }, m.fds.len()),
            (code::SET_VRING_KICK, 1)
        );
    }

    /// A socket whose peer sent 14 bytes of a 20-byte message and closed.
    fn closed_mid_message() -> UnixStream {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&message(1, VERSION, &[0; 8])[..14]).unwrap();
        b
    }

    #[test]
    fn a_close_mid_message_ends_a_peek_with_an_error() {
        let b = closed_mid_message();
        assert_eq!(
            peek(&b).err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn bad_headers_and_oversized_payloads_are_refused() {
        for (flags, size) in [(0u32, 0usize), (VERSION | REPLY, 0), (VERSION | 0x10, 0)] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&message(1, flags, &vec![0; size])).unwrap();
            assert!(receive(&b).is_err(), "flags {flags:#x}");
        }
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = Header {
            request: 1,
            flags: VERSION,
            size: MAX_PAYLOAD as u32 + 1,
        };
        a.write_all(h.as_slice()).unwrap();
        assert!(receive(&b).is_err());
    }

    #[test]
    fn a_close_between_messages_ends_cleanly_and_mid_message_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(receive(&b).unwrap().is_none());
        let b = closed_mid_message();
        assert_eq!(
            receive(&b).err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }
}
