//! The vfio-user servers' pages of the journal: each server marks the message in hand there
//! and keeps a copy of its reply before sending it, so that a daemon restarted after a kill
//! answers a message the dead one had answered (or was answering) exactly once.
//!
//! ```text
//!   8 MiB + 4 KiB × i   page i: endpoint + 1 (0: free), mark, reply length, reply bytes
//! ```
//!
//! A page belongs to one endpoint (found again by its tag, so that two binaries of the same
//! configuration use the same page); it is written by that endpoint's server thread alone,
//! through a mapping of its own, without a lock.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Journal, JournalError, io_err, map_shared};

const BASE: u64 = 8 << 20;
const PAGE: usize = 4096;
/// How many servers' pages the journal has.
pub const PAGES: usize = 256;
const TAG: usize = 0;
const MARK: usize = 8;
const LEN: usize = 16;
const BYTES: usize = 24;
/// The largest reply a page keeps a copy of.
pub const REPLY_MAX: usize = PAGE - BYTES;
/// The length word of a reply too large to keep (or carrying an fd).
const NOT_KEPT: u64 = u64::MAX;

/// What a server's page held when the journal was opened: the mark of the message in hand
/// (its digest and state bits; 0: none) and the copy of its reply, if one was kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub mark: u64,
    pub reply: Option<Vec<u8>>,
}

fn page_at(i: usize) -> u64 {
    BASE + (i * PAGE) as u64
}

impl Journal {
    fn page_word(&self, i: usize, at: usize) -> Result<u64, JournalError> {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, page_at(i) + at as u64)
            .map_err(io_err("reading a reply page"))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Every tagged page's message in hand, by endpoint.
    pub(super) fn in_flight(&self) -> Result<BTreeMap<u32, InFlight>, JournalError> {
        let mut found = BTreeMap::new();
        for i in 0..PAGES {
            let tag = self.page_word(i, TAG)?;
            if tag == 0 {
                continue;
            }
            let mark = self.page_word(i, MARK)?;
            let len = self.page_word(i, LEN)?;
            let reply = if mark != 0 && len as usize <= REPLY_MAX {
                let mut r = vec![0u8; len as usize];
                self.file
                    .read_exact_at(&mut r, page_at(i) + BYTES as u64)
                    .map_err(io_err("reading a kept reply"))?;
                Some(r)
            } else {
                None
            };
            found.insert((tag - 1) as u32, InFlight { mark, reply });
        }
        Ok(found)
    }

    /// The page of `endpoint`'s server (the one tagged with it, else a free one), emptied.
    pub fn reply_log(&self, endpoint: u32) -> Result<ReplyLog, JournalError> {
        let tag = u64::from(endpoint) + 1;
        let mut free = None;
        let mut page = None;
        for i in 0..PAGES {
            match self.page_word(i, TAG)? {
                t if t == tag => {
                    page = Some(i);
                    break;
                }
                0 if free.is_none() => free = Some(i),
                _ => {}
            }
        }
        let i = page.or(free).ok_or(JournalError::NoReplyPage(PAGES))?;
        // One page of the journal's file, which is longer; the ReplyLog unmaps it when dropped.
        let map = map_shared(&self.file, PAGE, page_at(i), "mmap of a reply page")?;
        let log = ReplyLog { map };
        log.word(MARK).store(0, Ordering::Release);
        log.word(TAG).store(tag, Ordering::Release);
        Ok(log)
    }
}

/// One server's page of the journal (see the module).
pub struct ReplyLog {
    map: *mut u8,
}

// SAFETY: the page is owned by the ReplyLog; it is not Sync, so one thread at a time writes
// through it.
unsafe impl Send for ReplyLog {}

impl ReplyLog {
    fn word(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(8) && at + 8 <= BYTES);
        // SAFETY: an 8-aligned offset inside the page-aligned mapping, which lives as long as
        // `self`; the words are only accessed atomically.
        unsafe { &*self.map.add(at).cast::<AtomicU64>() }
    }

    /// The message in hand is `mark` (0: none).
    pub fn mark(&self, mark: u64) {
        self.word(MARK).store(mark, Ordering::Release);
    }

    /// The message in hand is `mark`, and `reply` is what it is answered with (None: the reply
    /// cannot be kept, e.g. it passes an fd): written before the mark.
    pub fn replying(&self, mark: u64, reply: Option<&[u8]>) {
        let len = match reply {
            Some(r) if r.len() <= REPLY_MAX => {
                // SAFETY: `BYTES + r.len() <= PAGE`: inside the mapping, which only this
                // ReplyLog (not Sync: one thread) writes; nothing reads these bytes here.
                unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), self.map.add(BYTES), r.len()) };
                r.len() as u64
            }
            _ => NOT_KEPT,
        };
        self.word(LEN).store(len, Ordering::Release);
        self.mark(mark);
    }
}

impl Drop for ReplyLog {
    fn drop(&mut self) {
        // SAFETY: `map` is the one-page mapping made in `Journal::reply_log`.
        unsafe { libc::munmap(self.map.cast(), PAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(j: &Journal) -> BTreeMap<u32, InFlight> {
        let (_, got) = Journal::open(j.fd().try_clone_to_owned().unwrap()).unwrap();
        got.in_flight
    }

    #[test]
    fn a_servers_mark_and_reply_reach_the_next_daemon_under_its_endpoint() {
        let mut j = Journal::create().unwrap();
        j.checkpoint(b"c").unwrap();
        let a = j.reply_log(7).unwrap();
        let b = j.reply_log(3).unwrap();
        assert_eq!(reopen(&j).len(), 2, "both pages tagged, nothing in hand");
        assert!(
            reopen(&j)
                .values()
                .all(|f| f.mark == 0 && f.reply.is_none())
        );
        a.replying(0x1234_5670 | 1, Some(b"the reply"));
        b.mark(0x99 << 2 | 2);
        let got = reopen(&j);
        assert_eq!(
            got[&7],
            InFlight {
                mark: 0x1234_5670 | 1,
                reply: Some(b"the reply".to_vec())
            }
        );
        assert_eq!(got[&3].mark, 0x99 << 2 | 2);
        // A reply too large to keep is marked as not kept.
        a.replying(8, Some(&vec![1u8; REPLY_MAX + 1]));
        assert_eq!(reopen(&j)[&7].reply, None);
        a.replying(8, Some(&vec![2u8; REPLY_MAX]));
        assert_eq!(reopen(&j)[&7].reply.as_ref().map(Vec::len), Some(REPLY_MAX));
        // The same endpoint gets its page again (emptied), another one a free page.
        drop(a);
        let _a2 = j.reply_log(7).unwrap();
        assert_eq!(reopen(&j)[&7], InFlight::default());
        let _c = j.reply_log(1 << 20).unwrap();
        assert_eq!(reopen(&j).len(), 3);
    }

    #[test]
    fn every_page_taken_is_a_clear_error() {
        let j = Journal::create().unwrap();
        let logs: Vec<ReplyLog> = (0..PAGES as u32).map(|e| j.reply_log(e).unwrap()).collect();
        assert!(matches!(
            j.reply_log(PAGES as u32),
            Err(JournalError::NoReplyPage(PAGES))
        ));
        assert!(j.reply_log(5).is_ok(), "a tagged endpoint finds its page");
        drop(logs);
    }
}
