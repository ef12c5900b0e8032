//! The crash journal: what a daemon restarted after SIGKILL or a panic needs to go on exactly
//! where the dead one stopped, kept in a memfd that outlives the process in systemd's file
//! descriptor store (see `recovery`).
//!
//! ```text
//!   0        header: magic, version, the active checkpoint slot and its generation
//!   4 KiB    records: one per request answered since that checkpoint, 64 bytes each
//!   8 MiB    reply pages: one per vfio-user server (see `reply_log`)
//!  16 MiB    side slot 0           (the kernel objects and device servers: see below)
//!  32 MiB    side slot 1
//!   1 GiB    checkpoint slot 0     (JSON written with pwrite; the file is sparse)
//!   2 GiB    checkpoint slot 1
//! ```
//!
//! The side slots hold what other threads than the device state's owner change (the iommufd
//! backend's devices, the vfio-user connections): written whole the same way, with their own
//! generation word, so that writing them never touches the checkpoint or its records. A
//! journal written before side slots existed reads as having none.
//!
//! A checkpoint is written whole into the inactive slot, then one 64-bit store makes it the
//! active one with the next generation, which also empties the record area: a record counts
//! only if its commit word, stored last, holds the active generation. A process killed at any
//! instruction therefore leaves either the old checkpoint with its records or the new one with
//! none, and a record either whole or absent. Nothing here is read by the running daemon; the
//! next one reads it with [`Journal::open`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::protocol::Request;

mod reply_log;
pub use reply_log::{InFlight, REPLY_MAX, ReplyLog};

const MAGIC: u64 = u64::from_le_bytes(*b"VUIOMMUJ");
/// The layout version this binary writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 4096;
const RECORD: usize = 64;
/// Records between two checkpoints: when they are used up, the owner writes a checkpoint.
pub const RECORDS: usize = 16384;
const MAPPED: usize = HEADER + RECORDS * RECORD;
const SLOT_BASE: u64 = 1 << 30;
/// The largest checkpoint a slot holds.
pub const SLOT_MAX: u64 = SLOT_BASE;
const SIDE_BASE: u64 = 16 << 20;
/// The largest side state a side slot holds.
pub const SIDE_MAX: u64 = SIDE_BASE;

// Header offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_ACTIVE: usize = 16;
const H_LEN: usize = 24;
const H_SIDE_ACTIVE: usize = 40;
const H_SIDE_LEN: usize = 48;
const H_ANSWERED: usize = 64;

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("crash journal: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("crash journal: not a journal (magic {0:#x})")]
    NotAJournal(u64),
    #[error("crash journal: layout version {0} (this binary reads version {VERSION})")]
    Version(u32),
    #[error("crash journal: no checkpoint was ever written")]
    Empty,
    #[error("crash journal: checkpoint of {0} bytes is larger than a slot ({SLOT_MAX} bytes)")]
    TooLarge(usize),
    #[error("crash journal: checkpoint slot {slot} says {len} bytes")]
    BadSlot { slot: u64, len: u64 },
    #[error("crash journal: side state of {0} bytes is larger than a side slot ({SIDE_MAX} bytes)")]
    SideTooLarge(usize),
    #[error("crash journal: all {0} reply pages are taken (one per vfio-user endpoint)")]
    NoReplyPage(usize),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> JournalError {
    move |source| JournalError::Io { what, source }
}

/// The slot a new checkpoint or side state goes to: the one `active` (slot in bit 0, its
/// generation above; 0: nothing written yet) does not name.
fn inactive_slot(active: u64) -> u64 {
    if active == 0 { 0 } else { 1 - (active & 1) }
}

/// A shared read-write mapping of `len` bytes of `file` from `offset` (which the file must
/// cover); the caller unmaps it.
fn map_shared(
    file: &File,
    len: usize,
    offset: u64,
    what: &'static str,
) -> Result<*mut u8, JournalError> {
    // SAFETY: a fresh shared mapping of a range of the file that the caller says exists; the
    // result is checked, and nothing else refers to the new address range.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io_err(what)(io::Error::last_os_error()));
    }
    Ok(map.cast())
}

/// A new, empty memfd (close-on-exec).
pub fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One answered request: where it was in the request ring, what the guest was told, and the
/// state change it made (a successful MAP, UNMAP, ATTACH or DETACH), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position in the avail ring (the avail index it was popped at).
    pub avail: u16,
    /// The used-ring index its answer takes.
    pub used: u16,
    /// The head descriptor.
    pub head: u16,
    /// The length put in the used element (0: returned unused, no tail written).
    pub len: u32,
    /// The status in the tail (meaningless when `len` is 0).
    pub status: u8,
    /// The request, when it changed the device state.
    pub effect: Option<Request>,
    /// The host object an ATTACH that created its domain made for it (an IOAS id; 0: none).
    pub hw: u32,
}

/// Bytes of a record after its commit word: avail, used, head (u16 each), status, whether an
/// effect follows, len (u32), then the request as the guest encodes it, then `hw`.
const EFFECT_AT: usize = 16;
const HW_AT: usize = 56;
const EFFECT_MAX: usize = HW_AT - EFFECT_AT;

impl Record {
    fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[4..6].copy_from_slice(&self.avail.to_le_bytes());
        b[6..8].copy_from_slice(&self.used.to_le_bytes());
        b[8..10].copy_from_slice(&self.head.to_le_bytes());
        b[10] = self.status;
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        if let Some(r) = self.effect {
            let (bytes, n) = r.encode();
            // MAP is the largest request with an effect: 36 bytes.
            debug_assert!(n <= EFFECT_MAX, "{r:?} does not fit a record");
            if n <= EFFECT_MAX {
                b[11] = 1;
                b[EFFECT_AT..EFFECT_AT + n].copy_from_slice(&bytes[..n]);
            }
        }
        b[HW_AT..HW_AT + 4].copy_from_slice(&self.hw.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let effect = match b[11] {
            0 => None,
            _ => Some(Request::decode(&b[EFFECT_AT..HW_AT]).ok()?),
        };
        Some(Record {
            avail: u16_at(4),
            used: u16_at(6),
            head: u16_at(8),
            status: b[10],
            len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            effect,
            hw: u32::from_le_bytes(b[HW_AT..HW_AT + 4].try_into().ok()?),
        })
    }
}

/// What a journal held: the last checkpoint and the records written after it.
#[derive(Debug)]
pub struct Recovered {
    pub checkpoint: Vec<u8>,
    pub records: Vec<Record>,
    /// The last side state written (None: never).
    pub side: Option<Vec<u8>>,
    /// The vhost-user message answered but not yet taken out of the socket (its digest; 0:
    /// none): see [`Journal::mark_answered`].
    pub answered: u64,
    /// Each vfio-user server's message in hand, by endpoint (see [`ReplyLog`]).
    pub in_flight: std::collections::BTreeMap<u32, InFlight>,
}

/// The journal as its writer holds it.
pub struct Journal {
    file: File,
    map: *mut u8,
    /// The active slot and generation (as in the header).
    active: u64,
    /// Records written since the active checkpoint.
    next: usize,
    /// The active side slot and its generation (as in the header).
    side: u64,
}

// SAFETY: the mapping is owned by the Journal and only written through `&mut self`.
unsafe impl Send for Journal {}

impl Journal {
    /// A new, empty journal in a fresh memfd.
    pub fn create() -> Result<Journal, JournalError> {
        let file = memfd(c"vhost-user-iommu-journal").map_err(io_err("memfd_create"))?;
        file.set_len(3 * SLOT_BASE).map_err(io_err("sizing"))?;
        let j = Journal::map(file, 0)?;
        j.put_u64(H_MAGIC, MAGIC);
        j.put_u64(H_VERSION, u64::from(VERSION));
        Ok(j)
    }

    /// Opens the journal a previous daemon left in `fd`: its last checkpoint and records, and
    /// the journal ready for this daemon's writes (the next checkpoint replaces them).
    pub fn open(fd: OwnedFd) -> Result<(Journal, Recovered), JournalError> {
        let file = File::from(fd);
        let len = file.metadata().map_err(io_err("fstat"))?.len();
        if len < 3 * SLOT_BASE {
            return Err(JournalError::NotAJournal(0));
        }
        let mut j = Journal::map(file, 0)?;
        let magic = j.u64_at(H_MAGIC);
        if magic != MAGIC {
            return Err(JournalError::NotAJournal(magic));
        }
        let version = j.u64_at(H_VERSION) as u32;
        if version != VERSION {
            return Err(JournalError::Version(version));
        }
        j.active = j.atomic_u64(H_ACTIVE).load(Ordering::Acquire);
        if j.active == 0 {
            return Err(JournalError::Empty);
        }
        let slot = j.active & 1;
        let len = j.u64_at(H_LEN + 8 * slot as usize);
        if len > SLOT_MAX {
            return Err(JournalError::BadSlot { slot, len });
        }
        let mut checkpoint = vec![0u8; len as usize];
        j.file
            .read_exact_at(&mut checkpoint, SLOT_BASE * (slot + 1))
            .map_err(io_err("reading the checkpoint"))?;
        j.side = j.atomic_u64(H_SIDE_ACTIVE).load(Ordering::Acquire);
        let side = match j.side {
            0 => None,
            active => {
                let slot = active & 1;
                let len = j.u64_at(H_SIDE_LEN + 8 * slot as usize);
                if len > SIDE_MAX {
                    return Err(JournalError::BadSlot {
                        slot: 2 + slot,
                        len,
                    });
                }
                let mut side = vec![0u8; len as usize];
                j.file
                    .read_exact_at(&mut side, SIDE_BASE * (slot + 1))
                    .map_err(io_err("reading the side state"))?;
                Some(side)
            }
        };
        let mut records = Vec::new();
        let generation = j.generation();
        while records.len() < RECORDS {
            let at = HEADER + records.len() * RECORD;
            if j.atomic_u32(at).load(Ordering::Acquire) != generation {
                break;
            }
            // SAFETY: `at..at + RECORD` is inside the mapping (records.len() < RECORDS).
            let bytes = unsafe { std::slice::from_raw_parts(j.map.add(at), RECORD) };
            match Record::decode(bytes) {
                Some(r) => records.push(r),
                None => break,
            }
        }
        j.next = records.len();
        let answered = j.u64_at(H_ANSWERED);
        let in_flight = j.in_flight()?;
        Ok((
            j,
            Recovered {
                checkpoint,
                records,
                side,
                answered,
                in_flight,
            },
        ))
    }

    fn map(file: File, active: u64) -> Result<Journal, JournalError> {
        let map = map_shared(&file, MAPPED, 0, "mmap")?;
        Ok(Journal {
            file,
            map,
            active,
            next: 0,
            side: 0,
        })
    }

    /// The memfd (to keep in the file descriptor store).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The generation of the active checkpoint, as records carry it (0: none yet).
    fn generation(&self) -> u32 {
        (self.active >> 1) as u32
    }

    /// Makes `checkpoint` the state a restarted daemon starts from, and empties the records.
    pub fn checkpoint(&mut self, checkpoint: &[u8]) -> Result<(), JournalError> {
        if checkpoint.len() as u64 > SLOT_MAX {
            return Err(JournalError::TooLarge(checkpoint.len()));
        }
        let slot = inactive_slot(self.active);
        let at = SLOT_BASE * (slot + 1);
        self.file
            .write_all_at(checkpoint, at)
            .map_err(io_err("writing a checkpoint"))?;
        // Give back what a larger checkpoint held in this slot before.
        let end = at + checkpoint.len() as u64;
        // SAFETY: FALLOC_FL_PUNCH_HOLE on our own memfd; failure only costs memory.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                end as libc::off_t,
                (at + SLOT_BASE - end) as libc::off_t,
            )
        };
        self.put_u64(H_LEN + 8 * slot as usize, checkpoint.len() as u64);
        let mut generation = u64::from(self.generation()) + 1;
        if generation > u64::from(u32::MAX) {
            generation = 1;
        }
        self.active = generation << 1 | slot;
        self.atomic_u64(H_ACTIVE)
            .store(self.active, Ordering::Release);
        self.next = 0;
        Ok(())
    }

    /// Makes `side` the side state a restarted daemon finds; the checkpoint and its records
    /// stay as they are.
    pub fn write_side(&mut self, side: &[u8]) -> Result<(), JournalError> {
        if side.len() as u64 > SIDE_MAX {
            return Err(JournalError::SideTooLarge(side.len()));
        }
        let slot = inactive_slot(self.side);
        self.file
            .write_all_at(side, SIDE_BASE * (slot + 1))
            .map_err(io_err("writing the side state"))?;
        self.put_u64(H_SIDE_LEN + 8 * slot as usize, side.len() as u64);
        self.side = ((self.side >> 1) + 1) << 1 | slot;
        self.atomic_u64(H_SIDE_ACTIVE)
            .store(self.side, Ordering::Release);
        Ok(())
    }

    /// The vhost-user message with digest `digest` is answered and about to be taken out of the
    /// socket (0: taken out): a restarted daemon that finds it still there takes it out without
    /// answering it again.
    pub fn mark_answered(&self, digest: u64) {
        self.put_u64(H_ANSWERED, digest);
    }

    /// How many more records fit before the next checkpoint (0 before the first one).
    pub fn room(&self) -> usize {
        if self.active == 0 {
            0
        } else {
            RECORDS - self.next
        }
    }

    /// Appends a record; false (and nothing written) when the record area is full or no
    /// checkpoint was written yet.
    pub fn append(&mut self, r: &Record) -> bool {
        if self.next >= RECORDS || self.active == 0 {
            return false;
        }
        let at = HEADER + self.next * RECORD;
        let bytes = r.encode();
        // SAFETY: `at..at + RECORD` is inside the mapping; the first 4 bytes (the commit word)
        // are left to the atomic store below.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes[4..].as_ptr(), self.map.add(at + 4), RECORD - 4)
        };
        self.atomic_u32(at)
            .store(self.generation(), Ordering::Release);
        self.next += 1;
        true
    }

    fn u64_at(&self, at: usize) -> u64 {
        self.atomic_u64(at).load(Ordering::Acquire)
    }

    fn put_u64(&self, at: usize, v: u64) {
        self.atomic_u64(at).store(v, Ordering::Release);
    }

    fn atomic_u64(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(8) && at + 8 <= HEADER);
        // SAFETY: `at` is an 8-aligned offset inside the page-aligned mapping, which lives as
        // long as `self`; the journal's words are only accessed atomically.
        unsafe { &*self.map.add(at).cast::<AtomicU64>() }
    }

    fn atomic_u32(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= MAPPED);
        // SAFETY: as in `atomic_u64`, for a 4-aligned offset.
        unsafe { &*self.map.add(at).cast::<AtomicU32>() }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: `map` is the mapping of MAPPED bytes made in `Journal::map`.
        unsafe { libc::munmap(self.map.cast(), MAPPED) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(j: &Journal) -> Result<(Journal, Recovered), JournalError> {
        Journal::open(j.fd().try_clone_to_owned().unwrap())
    }

    fn rec(avail: u16, effect: Option<Request>) -> Record {
        Record {
            avail,
            used: avail.wrapping_add(7),
            head: avail % 128,
            len: 4,
            status: 0,
            effect,
            hw: u32::from(avail) * 3,
        }
    }

    #[test]
    fn the_side_state_is_kept_apart_from_the_checkpoint_and_its_records() {
        let mut j = Journal::create().unwrap();
        j.checkpoint(b"c1").unwrap();
        assert!(j.append(&rec(1, Some(Request::attach(1, 2)))));
        assert_eq!(reopen(&j).unwrap().1.side, None, "none written yet");
        j.write_side(b"side one").unwrap();
        j.write_side(b"side two, longer").unwrap();
        assert!(j.append(&rec(2, None)));
        let (mut j2, got) = reopen(&j).unwrap();
        assert_eq!(got.checkpoint, b"c1");
        assert_eq!(
            got.records,
            vec![rec(1, Some(Request::attach(1, 2))), rec(2, None)]
        );
        assert_eq!(got.side.as_deref(), Some(&b"side two, longer"[..]));
        // The next daemon goes on writing the other slot, and a checkpoint leaves it alone.
        j2.write_side(b"three").unwrap();
        j2.checkpoint(b"c2").unwrap();
        let (_, got) = Journal::open(j2.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(got.side.as_deref(), Some(&b"three"[..]));
        assert!(got.records.is_empty());
    }

    #[test]
    fn a_new_journal_holds_nothing_until_the_first_checkpoint() {
        let mut j = Journal::create().unwrap();
        assert!(matches!(reopen(&j), Err(JournalError::Empty)));
        assert!(!j.append(&rec(0, None)), "no record before a checkpoint");
        j.checkpoint(b"{}").unwrap();
        let (_, r) = reopen(&j).unwrap();
        assert_eq!(r.checkpoint, b"{}");
        assert!(r.records.is_empty());
    }

    #[test]
    fn records_come_back_in_order_and_a_checkpoint_empties_them() {
        let mut j = Journal::create().unwrap();
        j.checkpoint(b"first").unwrap();
        let reqs = [
            Some(Request::map(3, 0x1000, 0x1fff, 0x8000, 3)),
            None,
            Some(Request::unmap(3, 0, u64::MAX)),
            Some(Request::attach(1, 9)),
            Some(Request::detach(1, 9)),
        ];
        for (i, r) in reqs.iter().enumerate() {
            assert!(j.append(&rec(65530u16.wrapping_add(i as u16), *r)));
        }
        let (_, got) = reopen(&j).unwrap();
        assert_eq!(got.checkpoint, b"first");
        let want: Vec<Record> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| rec(65530u16.wrapping_add(i as u16), *r))
            .collect();
        assert_eq!(got.records, want);
        // Records of the previous generation do not count.
        for checkpoint in [&b"second, longer than the first"[..], b"third"] {
            assert!(j.append(&rec(1, None)));
            j.checkpoint(checkpoint).unwrap();
            let (_, got) = reopen(&j).unwrap();
            assert_eq!(got.checkpoint, checkpoint);
            assert!(got.records.is_empty(), "{:?}", got.records);
        }
    }

    #[test]
    fn a_record_without_its_commit_word_is_not_there() {
        let mut j = Journal::create().unwrap();
        j.checkpoint(b"c").unwrap();
        assert!(j.append(&rec(1, None)));
        // A process killed between the record's bytes and its commit word.
        let at = HEADER + RECORD;
        let bytes = rec(2, None).encode();
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes[4..].as_ptr(), j.map.add(at + 4), RECORD - 4)
        };
        let (_, got) = reopen(&j).unwrap();
        assert_eq!(got.records, vec![rec(1, None)]);
    }

    #[test]
    fn the_record_area_fills_up_and_asks_for_a_checkpoint() {
        let mut j = Journal::create().unwrap();
        j.checkpoint(b"c").unwrap();
        for i in 0..RECORDS {
            assert!(j.append(&rec(i as u16, None)));
        }
        assert_eq!(j.room(), 0);
        assert!(!j.append(&rec(0, None)));
        let (j2, got) = reopen(&j).unwrap();
        assert_eq!(got.records.len(), RECORDS);
        assert_eq!(j2.room(), 0);
    }

    #[test]
    fn garbage_and_other_versions_are_refused() {
        let j = Journal::create().unwrap();
        j.put_u64(H_VERSION, 99);
        assert!(matches!(reopen(&j), Err(JournalError::Version(99))));
        j.put_u64(H_MAGIC, 1);
        assert!(matches!(reopen(&j), Err(JournalError::NotAJournal(1))));
        let small = memfd(c"small").unwrap();
        small.set_len(4096).unwrap();
        assert!(matches!(
            Journal::open(small.into()),
            Err(JournalError::NotAJournal(0))
        ));
    }
}
