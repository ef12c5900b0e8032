//! Crash restart at start (see the library's `recovery`): which keeper of the daemon's state
//! this process uses, and what it took back.

use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::Listener;

use vhost_user_iommu::assembly::Backend;
use vhost_user_iommu::deploy::fdstore::{self, FdStore};
use vhost_user_iommu::recovery::{self, Keeper};
use vhost_user_iommu::upgrade::UpgradeState;

/// The keeper of this daemon's state for a restart after a crash: the one taken back after a
/// crash, the one an upgrade handed over, or a new one when the service manager keeps fds.
/// With the iommufd backend it keeps the kernel objects too. None without a service manager's
/// store.
pub(crate) fn keep_for_restart(
    taken_back: Option<Keeper>,
    resumed: &mut Option<UpgradeState>,
    store: Option<FdStore>,
    backend: &Backend,
    listener: &Listener,
) -> Result<Option<Arc<Keeper>>, String> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let handed = resumed.as_mut().and_then(|r| r.keeper.take());
    let keeper = match (taken_back, handed, store) {
        (Some(k), _, _) => k,
        // SAFETY: the previous binary handed the journal over to this process alone.
        (None, Some(h), Some(s)) => unsafe { Keeper::adopt(s, h) }
            .map_err(|e| format!("cannot go on with the crash journal: {e}"))?,
        (None, None, Some(s)) => {
            let journal = vhost_user_iommu::journal::Journal::create()
                .map_err(|e| format!("cannot create the crash journal: {e}"))?;
            let k = Keeper::start(s, journal)
                .map_err(|e| format!("cannot keep the crash journal: {e}"))?;
            // SAFETY: the listener owns the fd for the duration of the borrow.
            let l = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
            k.store(recovery::LISTENER, l)
                .map_err(|e| format!("cannot keep the listening socket: {e}"))?;
            k.checkpoint(&recovery::Checkpoint::idle())
                .map_err(|e| e.to_string())?;
            k
        }
        (None, _, None) => return Ok(None),
    };
    if let Some(r) = resumed.as_ref() {
        // An upgrade's servers, under the numbers this process has them.
        keeper.seed_vfio_user(&r.vfio_user);
    }
    if let Some(b) = &backend.iommufd {
        keeper.keep_iommufd(b.clone())?;
        info!("crash restart: the iommufd backend's kernel objects are kept in the fd store");
    }
    Ok(Some(Arc::new(keeper)))
}

/// What the service manager kept for this unit when a previous daemon died (see `recovery`):
/// its store (None: not run by one), and the state taken back from the fds it passed (None: a
/// first start, or an upgrade: `upgrading`, whose state comes from the previous binary). A
/// socket unit's listener, which `--fd` (`listen_fd`) names, is left alone.
pub(crate) fn take_back_kept(
    listen_fd: Option<i32>,
    upgrading: bool,
) -> Result<(Option<FdStore>, Option<recovery::Kept>), String> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let mut passed =
        fdstore::take_listen_fds().map_err(|e| format!("cannot take the passed fds: {e}"))?;
    if let Some(n) = listen_fd
        && let Some(i) = passed.iter().position(|(_, fd)| fd.as_raw_fd() == n)
    {
        // Left open, unowned here: the listener setup takes it by its number.
        let _ = passed.remove(i).1.into_raw_fd();
    }
    let store =
        FdStore::from_env().map_err(|e| format!("cannot reach the service manager: {e}"))?;
    if upgrading || passed.is_empty() {
        return Ok((store, None));
    }
    let Some(s) = &store else {
        warn!(
            "{} fd(s) passed without a notify socket: closed",
            passed.len()
        );
        return Ok((None, None));
    };
    let s = s
        .try_clone()
        .map_err(|e| format!("cannot reach the service manager: {e}"))?;
    let kept = recovery::take_back(s, passed)
        .map_err(|e| format!("cannot take back the kept state: {e}"))?;
    Ok((store, kept))
}

/// What crash restart has at start: the service manager's store (None: no crash restart), and
/// after a crash what the previous daemon kept.
pub(crate) struct Restart {
    pub(crate) store: Option<FdStore>,
    pub(crate) recovery: Option<recovery::Recovery>,
    pub(crate) keeper: Option<Keeper>,
}
