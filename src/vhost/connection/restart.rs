//! What a restarted daemon needs of the connection (see `recovery`): its state and fds kept
//! after each message that changed them, and the journal's mark of the message in hand, so
//! that one a killed daemon answered is not answered twice.

use super::*;

/// The journal's mark for the message in hand (its digest with these bits, see
/// `Keeper::answered`): its reply is going out; it is answered.
const REPLYING: u64 = 1;
pub(super) const ANSWERED: u64 = 2;

impl Connection {
    /// Whether `msg` (`len` bytes, first in the socket) is the message a killed daemon
    /// answered and had not taken out yet: the journal's mark says it was answered, or that
    /// its reply was going out and the kernel says it went (the first message after a restart
    /// only).
    pub(super) fn answered_before_crash(
        &self,
        sock: &UnixStream,
        msg: &Message,
        digest: u64,
        len: usize,
    ) -> io::Result<bool> {
        let Some(k) = self.device.keeper() else {
            return Ok(false);
        };
        let answered = match k.redelivered() {
            m if m == digest | ANSWERED => true,
            m if m == digest | REPLYING => wire::reply_went_out(sock, len)?,
            _ => false,
        };
        if answered {
            log::info!(
                "crash restart: {} was answered before the crash: taken out",
                wire::name(msg.header.request)
            );
        }
        Ok(answered)
    }

    /// Marks the message in hand in the journal (see `Keeper::answered`).
    pub(super) fn mark(&self, mark: u64) {
        if let Some(k) = self.device.keeper() {
            k.answered(mark);
        }
    }

    /// The message being handled is about to be answered.
    pub(super) fn replying(&self) {
        self.mark(self.answering | REPLYING);
    }

    /// Keeps the connection for a restarted daemon if message `request` changed it (see
    /// `recovery`): its fds again under fresh names if the message may have changed them.
    pub(super) fn keep(&mut self, request: u32) {
        let Some(k) = self.device.keeper().cloned() else {
            return;
        };
        let old = self.kept.take();
        let mut new_fds = old.is_none()
            || matches!(
                request,
                code::SET_MEM_TABLE
                    | code::ADD_MEM_REG
                    | code::REM_MEM_REG
                    | code::SET_VRING_KICK
                    | code::SET_VRING_CALL
                    | code::SET_VRING_ERR
            );
        let mut names: Vec<String> = Vec::new();
        if !new_fds {
            // The same fds as kept (same count, same order): the same names.
            let mut n = 0;
            let same = self.describe(|_| {
                n += 1;
                Ok(n - 1)
            });
            match (same, &old) {
                (Ok(_), Some(o)) if o.fds.len() == n => names = o.fds.clone(),
                _ => new_fds = true,
            }
        }
        let described = if new_fds {
            self.describe(|fd| {
                names.extend(k.store_fresh(&[fd])?);
                Ok(names.len() - 1)
            })
        } else {
            let mut n = 0;
            self.describe(|_| {
                n += 1;
                Ok(n - 1)
            })
        };
        let state = match described {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot keep the connection for a restart: {e}");
                if new_fds {
                    k.forget(&names);
                }
                self.kept = old;
                return;
            }
        };
        // The rings' positions are the owner's to keep (in its checkpoint), not a change here.
        let positions = |s: &ConnectionState| {
            let mut s = s.clone();
            s.rings
                .iter_mut()
                .for_each(|r| (r.next_avail, r.next_used) = (0, 0));
            s
        };
        if !new_fds
            && let Some(o) = &old
            && positions(&o.state) == positions(&state)
        {
            self.kept = old;
            return;
        }
        let kept = crate::recovery::KeptConnection { state, fds: names };
        self.device.keep(Some(kept.clone()));
        if new_fds && let Some(o) = old {
            k.forget(&o.fds);
        }
        self.kept = Some(kept);
    }
}
