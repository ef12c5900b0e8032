//! Crash restart: the daemon keeps, in systemd's file descriptor store, everything a restarted
//! daemon needs to go on serving the same VMM connection as if nothing happened, and the
//! restarted daemon takes it back (see `journal` for the on-memfd format, `deploy::fdstore` for
//! the store).
//!
//! What is kept, and when:
//! - the fds: the journal (`journal`), the vhost-user listening socket (`listener`), the VMM's
//!   connection (`vmm`) and the fds its state names (memory regions, ring eventfds: `c<N>-<i>`,
//!   stored again under fresh names whenever a message changes them);
//! - a checkpoint (the connection's negotiated state with those names, the device state, where
//!   the request ring stood, the counters), written by the device state's owner whenever a
//!   vhost-user message or another event changed the state, and when the records run out;
//! - a record per request answered since, written before its answer is published, with the
//!   state change it made.
//!
//! - the side state (the journal's side slots): the iommufd backend's kernel objects (the
//!   iommufd, each VFIO device and its request eventfd) and each vfio-user server (listener,
//!   client, DMA maps), their fds stored under names that say which object they are
//!   (`iommufd`, `dev<ep>.<dev_id>`, `ul<ep>`, `uc<ep>.<inode>`, ...), written by whichever thread
//!   changed them; an ATTACH's record carries the IOAS of its domain, so that a domain made
//!   after the checkpoint is taken over, not made again.
//!
//! The restarted daemon rebuilds the checkpoint's state, replays the records' changes, and
//! resumes the rings at the checkpoint's position: each request the guest queued since is then
//! popped again and either skipped (its answer is in the used ring already), answered from its
//! record (done, answer not yet published), or executed (it never reached the state). So every
//! request is answered exactly once and its change made exactly once; the guest sees a pause.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::deploy::fdstore::FdStore;
use crate::journal::{Journal, JournalError, Record};
use crate::protocol::Request;
use crate::upgrade::{LiveConnection, UpgradeState};
use crate::vhost::{ConnectionState, DeviceState};

mod side;

pub use side::Side;
use side::{SideSources, renumber};

/// The version of [`Checkpoint`] this binary writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Store names of the daemon's own fds.
pub const JOURNAL: &str = "journal";
pub const LISTENER: &str = "listener";
pub const VMM: &str = "vmm";

/// Records left when the owner writes a checkpoint instead of serving more: enough for every
/// request that can be in flight.
pub const LOW_WATER: usize = 2 * crate::pipeline::QUEUE_CAPACITY;

/// A connection's negotiated state with its fds by their names in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptConnection {
    pub state: ConnectionState,
    pub fds: Vec<String>,
}

/// A request a restarted daemon answers without executing it: its change is in the state
/// already. `published`: its answer is in the used ring too, so it is only skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub avail: u16,
    pub len: u32,
    pub status: u8,
    pub published: bool,
}

/// What a restarted daemon starts from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The VMM connection (None: no VMM connected).
    pub connection: Option<KeptConnection>,
    pub device: DeviceState,
    /// The request ring's next avail and next used index, nothing in flight.
    pub request_ring: Option<(u16, u16)>,
    /// Answers a previous restart had not published yet.
    pub answers: Vec<Answer>,
    /// The metrics' counters (`Metrics::export`).
    pub counters: Vec<u64>,
}

/// A keeper as one binary hands it to the next at an upgrade.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeeperHandover {
    pub journal_fd: i32,
    pub names: Vec<String>,
    pub next_name: u64,
    /// The names of the side state's fds among `names`.
    #[serde(default)]
    pub side_names: Vec<String>,
}

impl Checkpoint {
    /// No VMM connected, no state.
    pub fn idle() -> Checkpoint {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            connection: None,
            device: DeviceState {
                bypass: false,
                domains: Vec::new(),
                endpoints: Vec::new(),
            },
            request_ring: None,
            answers: Vec::new(),
            counters: Vec::new(),
        }
    }
}

/// The daemon's side of the store and the journal.
pub struct Keeper {
    store: FdStore,
    /// Every name this daemon has in the store.
    names: Mutex<std::collections::BTreeSet<String>>,
    journal: Mutex<Journal>,
    /// For fresh fd names.
    next_name: AtomicU64,
    /// Records left before the next checkpoint (read on the request path without the lock).
    room: AtomicU64,
    /// The digest of the vhost-user message the previous daemon answered and did not take out
    /// of the socket (0: none), until the first message is looked at.
    redelivered: AtomicU64,
    /// What the previous daemon's vfio-user servers had in hand (a crash restart), by
    /// endpoint, until each server takes its own.
    in_flight: Mutex<BTreeMap<u32, crate::journal::InFlight>>,
    side: Mutex<SideSources>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("room", &self.room.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Keeper {
    /// Keeps a new `journal` in `store`: from now on what this daemon writes there reaches
    /// the next.
    pub fn start(store: FdStore, journal: Journal) -> io::Result<Keeper> {
        store.store(JOURNAL, &[journal.fd()])?;
        Ok(Keeper::with(
            store,
            journal,
            [JOURNAL.to_string()].into(),
            0,
        ))
    }

    /// Goes on with a journal and fds the store holds already under `names`.
    fn with(
        store: FdStore,
        journal: Journal,
        names: std::collections::BTreeSet<String>,
        next_name: u64,
    ) -> Keeper {
        Keeper {
            store,
            names: Mutex::new(names),
            journal: Mutex::new(journal),
            next_name: AtomicU64::new(next_name),
            room: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            in_flight: Mutex::new(BTreeMap::new()),
            side: Mutex::new(SideSources::default()),
        }
    }

    /// What the next binary needs to go on with this keeper (see `upgrade`).
    pub fn hand_over(&self) -> KeeperHandover {
        KeeperHandover {
            journal_fd: lock(&self.journal).fd().as_raw_fd(),
            names: lock(&self.names).iter().cloned().collect(),
            next_name: self.next_name.load(Ordering::Relaxed),
            side_names: lock(&self.side).stored.iter().cloned().collect(),
        }
    }

    /// Goes on with the keeper a previous binary handed over.
    ///
    /// # Safety
    /// `h.journal_fd` must be open and handed to this process alone.
    pub unsafe fn adopt(store: FdStore, h: KeeperHandover) -> Result<Keeper, JournalError> {
        // SAFETY: the caller guarantees the fd is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(h.journal_fd) };
        let (journal, _) = Journal::open(fd)?;
        let k = Keeper::with(store, journal, h.names.into_iter().collect(), h.next_name);
        lock(&k.side).stored = h.side_names.into_iter().collect();
        Ok(k)
    }

    /// Stores `fd` under `name` (a name of the daemon's own: listener, vmm).
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.store.store(name, &[fd])?;
        lock(&self.names).insert(name.to_string());
        Ok(())
    }

    /// Stores each of `fds` under a fresh name; returns the names.
    pub fn store_fresh(&self, fds: &[BorrowedFd<'_>]) -> io::Result<Vec<String>> {
        let mut names = Vec::with_capacity(fds.len());
        for fd in fds {
            let name = format!("c{}", self.next_name.fetch_add(1, Ordering::Relaxed));
            if let Err(e) = self.store(&name, *fd) {
                self.forget(&names);
                return Err(e);
            }
            names.push(name);
        }
        Ok(names)
    }

    /// Closes what the store holds under `names`.
    pub fn forget(&self, names: &[String]) {
        let mut mine = lock(&self.names);
        for n in names {
            mine.remove(n);
            if let Err(e) = self.store.remove(n) {
                warn!("cannot remove {n} from the fd store: {e}");
            }
        }
    }

    /// Empties the store of everything this daemon put there (a clean stop: nothing is to be
    /// taken back).
    pub fn forget_everything(&self) {
        lock(&self.side).stored.clear();
        let names: Vec<String> = lock(&self.names).iter().cloned().collect();
        self.forget(&names);
    }

    /// The mark of the vhost-user message in hand (its digest and whether its reply is going
    /// out or it is answered; 0: taken out of the socket): see `Journal::mark_answered`.
    pub fn answered(&self, digest: u64) {
        lock(&self.journal).mark_answered(digest);
    }

    /// The mark the previous daemon left for the message it answered (or was answering) and
    /// had not taken out of the socket (0: none); given once, for the first message after a
    /// restart.
    pub fn redelivered(&self) -> u64 {
        self.redelivered.swap(0, Ordering::AcqRel)
    }

    /// The journal page where `endpoint`'s vfio-user server marks each message in hand (see
    /// `journal::ReplyLog`); None, logged, if the journal has no page left for it.
    pub fn reply_log(&self, endpoint: u32) -> Option<crate::journal::ReplyLog> {
        lock(&self.journal)
            .reply_log(endpoint)
            .inspect_err(|e| {
                log::error!(
                    "endpoint {endpoint}: {e}: a crash while its vfio-user server handles a \
                     message may lose or repeat the answer"
                );
            })
            .ok()
    }

    /// What the previous daemon's server of `endpoint` had in hand when it died (a crash
    /// restart only); given once.
    pub fn in_flight_of(&self, endpoint: u32) -> Option<crate::journal::InFlight> {
        lock(&self.in_flight).remove(&endpoint)
    }

    /// Makes `c` the state a restarted daemon starts from.
    pub fn checkpoint(&self, c: &Checkpoint) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(c).unwrap_or_else(|e| unreachable!("plain data: {e}"));
        let mut j = lock(&self.journal);
        j.checkpoint(&bytes)?;
        self.room.store(j.room() as u64, Ordering::Release);
        drop(j);
        // Where the devices are attached changes with the state: the side state follows.
        if lock(&self.side).iommufd.is_some()
            && let Err(e) = self.write_side()
        {
            log::error!("{e}: a crash now would lose the devices' attachments");
        }
        Ok(())
    }

    /// Whether the records run low: the owner writes a checkpoint before serving more.
    pub fn low(&self) -> bool {
        self.room.load(Ordering::Acquire) < LOW_WATER as u64
    }

    /// Records an answered request; false if it did not fit (the owner checkpoints before the
    /// records run out, so this is a bug, logged by the caller).
    pub fn record(&self, r: &Record) -> bool {
        let mut r = *r;
        if let Some(Request::Attach { domain, .. }) = r.effect {
            r.hw = self.host_id_of(domain);
        }
        let mut j = lock(&self.journal);
        let done = j.append(&r);
        self.room.store(j.room() as u64, Ordering::Release);
        done
    }
}

/// The name number after every `c<N>` name in `names`.
fn next_name_after<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
    names
        .filter_map(|n| n.strip_prefix('c')?.parse::<u64>().ok())
        .max()
        .map_or(0, |n| n + 1)
}

/// What the restarted daemon does with the records besides the state: the changes to replay
/// and the answers to give when the requests are popped again.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The changes made since the checkpoint, in the order they were made, each with the
    /// host object its record names (`Record::hw`).
    pub effects: Vec<(Request, u32)>,
    /// The checkpoint's request-ring position (next avail, next used).
    pub request_ring: Option<(u16, u16)>,
    /// The records and the checkpoint's carried answers, for [`answers`] once the guest's used
    /// index is known.
    pub records: Vec<Record>,
    pub carried: Vec<Answer>,
}

/// The answers for requests popped again from `ring.0` on: each record's (published when its
/// used index is below `guest_used`, counting from the checkpoint's `ring.1`), and each carried
/// answer no record took care of.
pub fn answers(
    records: &[Record],
    carried: &[Answer],
    ring: (u16, u16),
    guest_used: u16,
) -> BTreeMap<u16, Answer> {
    let published_span = guest_used.wrapping_sub(ring.1);
    let mut out: BTreeMap<u16, Answer> = carried.iter().map(|a| (a.avail, *a)).collect();
    for r in records {
        out.insert(
            r.avail,
            Answer {
                avail: r.avail,
                len: r.len,
                status: r.status,
                published: r.used.wrapping_sub(ring.1) < published_span,
            },
        );
    }
    out
}

/// A previous daemon's kept state, as this one starts.
pub struct Kept {
    /// The state in the upgrade format, its fds given up to raw numbers this process owns.
    pub state: UpgradeState,
    pub recovery: Recovery,
    pub keeper: Keeper,
}

/// Takes back what a previous daemon of this unit kept, from the fds the service manager
/// passed (`passed`, by name). None when there is no journal among them (a first start).
/// Fds nobody needs any more are removed from the store.
pub fn take_back(store: FdStore, passed: Vec<(String, OwnedFd)>) -> Result<Option<Kept>, String> {
    let mut by_name: BTreeMap<String, OwnedFd> = BTreeMap::new();
    for (name, fd) in passed {
        if by_name.insert(name.clone(), fd).is_some() {
            warn!("the fd store holds {name} twice: using the last");
        }
    }
    let Some(jfd) = by_name.remove(JOURNAL) else {
        return Ok(None);
    };
    let (journal, found) = Journal::open(jfd).map_err(|e| e.to_string())?;
    let c: Checkpoint = serde_json::from_slice(&found.checkpoint)
        .map_err(|e| format!("crash journal: checkpoint: {e}"))?;
    if c.version != CHECKPOINT_VERSION {
        return Err(format!(
            "crash journal: checkpoint version {} (this binary reads {CHECKPOINT_VERSION})",
            c.version
        ));
    }
    let next = next_name_after(by_name.keys().map(String::as_str));
    let mut side: Side = match &found.side {
        Some(bytes) => {
            serde_json::from_slice(bytes).map_err(|e| format!("crash journal: side state: {e}"))?
        }
        None => Side::default(),
    };
    let mut side_names = std::collections::BTreeSet::new();
    {
        let Side {
            iommufd,
            vfio_user,
            names: by_number,
        } = &mut side;
        // An fd the description names twice (DMA maps sharing one) comes back once: each
        // further place gets a duplicate of its own (each owns and closes its fd).
        let mut renumbered: BTreeMap<i32, i32> = BTreeMap::new();
        renumber(iommufd.as_mut(), vfio_user, &mut |old| {
            if let Some(&new) = renumbered.get(&old) {
                // SAFETY: `new` is open (taken back above); the duplicate is checked.
                let dup = unsafe { libc::fcntl(new, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(format!(
                        "crash journal: cannot duplicate fd {new}: {}",
                        io::Error::last_os_error()
                    ));
                }
                return Ok(dup);
            }
            let name = by_number
                .get(&old)
                .ok_or_else(|| format!("crash journal: side state fd {old} has no name"))?;
            let fd = by_name
                .remove(name)
                .ok_or_else(|| format!("crash journal: {name} is not in the fd store"))?;
            side_names.insert(name.clone());
            let new = fd.into_raw_fd();
            renumbered.insert(old, new);
            Ok(new)
        })?;
    }
    let mut names: std::collections::BTreeSet<String> =
        [JOURNAL, LISTENER].map(String::from).into();
    if let Some(k) = &c.connection {
        names.insert(VMM.to_string());
        names.extend(k.fds.iter().cloned());
    }
    names.extend(side_names.iter().cloned());
    let keeper = Keeper::with(store, journal, names, next);
    keeper.redelivered.store(found.answered, Ordering::Release);
    *lock(&keeper.in_flight) = found.in_flight;
    {
        let mut kept = lock(&keeper.side);
        kept.stored = side_names;
        kept.vfio_user = side
            .vfio_user
            .iter()
            .map(|u| (u.endpoint, u.clone()))
            .collect();
    }
    let listener = by_name
        .remove(LISTENER)
        .ok_or("crash journal: the fd store holds no listening socket")?;
    let mut connection = None;
    if let Some(k) = &c.connection {
        let vmm = by_name
            .remove(VMM)
            .ok_or("crash journal: a VMM was connected but its socket is not in the fd store")?;
        let mut fds = Vec::with_capacity(k.fds.len());
        for n in &k.fds {
            let fd = by_name
                .remove(n)
                .ok_or_else(|| format!("crash journal: fd {n} is not in the fd store"))?;
            fds.push(fd.into_raw_fd());
        }
        connection = Some(LiveConnection {
            socket_fd: vmm.into_raw_fd(),
            state: k.state.clone(),
            fds,
            device: c.device.clone(),
            kept: Some(k.fds.clone()),
        });
    }
    // What no state names is of an older generation (or of a connection that ended): close it.
    let stale: Vec<String> = by_name.keys().cloned().collect();
    keeper.forget(&stale);
    drop(by_name);
    let effects = found
        .records
        .iter()
        .filter_map(|r| Some((r.effect?, r.hw)))
        .collect();
    info!(
        "crash journal: {} request(s) answered since the last checkpoint, {} fd(s) dropped",
        found.records.len(),
        stale.len()
    );
    let state = UpgradeState::new(
        listener.into_raw_fd(),
        connection,
        c.counters,
        side.iommufd,
        side.vfio_user,
    );
    Ok(Some(Kept {
        state,
        recovery: Recovery {
            effects,
            request_ring: c.request_ring,
            records: found.records,
            carried: c.answers,
        },
        keeper,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::{DmaMap, VfioUserConnection, VfioUserServer};
    use std::os::fd::RawFd;

    fn rec(avail: u16, used: u16) -> Record {
        Record {
            avail,
            used,
            head: 0,
            len: 4,
            status: 0,
            effect: None,
            hw: 0,
        }
    }

    #[test]
    fn a_record_is_published_exactly_when_the_guest_can_see_its_used_entry() {
        // Checkpoint at avail 10, used 10; answered out of order: 11 (used 10), 10 (used 11),
        // 12 (used 12); the guest's used index says two were published.
        let a = answers(&[rec(11, 10), rec(10, 11), rec(12, 12)], &[], (10, 10), 12);
        assert!(a[&11].published && a[&10].published);
        assert!(!a[&12].published);
        assert_eq!(a.len(), 3);
        // Across the 16-bit wrap of both indexes.
        let a = answers(
            &[rec(65535, 65534), rec(0, 65535), rec(1, 0)],
            &[],
            (65535, 65534),
            0,
        );
        assert!(a[&65535].published && a[&0].published && !a[&1].published);
    }

    #[test]
    fn carried_answers_stay_until_a_record_takes_care_of_them() {
        let carried = [
            Answer {
                avail: 3,
                len: 4,
                status: 0,
                published: false,
            },
            Answer {
                avail: 4,
                len: 0,
                status: 0,
                published: false,
            },
        ];
        let a = answers(&[rec(3, 7)], &carried, (3, 7), 8);
        assert!(a[&3].published, "republished since");
        assert!(!a[&4].published, "still to answer");
    }

    /// A keeper whose store is a fake service manager, with the vhost-user listener kept and
    /// a checkpoint written, and the objects of one vfio-user server (endpoint 1): its listener,
    /// a client socket and a memfd for DMA maps.
    struct SideFixture {
        /// Removed first when the fixture goes.
        _dir: crate::testing::TempDir,
        systemd: crate::testing::service_manager::ServiceManager,
        keeper: Keeper,
        _vhost: std::os::unix::net::UnixListener,
        listener: std::os::unix::net::UnixListener,
        client: std::os::unix::net::UnixStream,
        _peer: std::os::unix::net::UnixStream,
        ram: std::fs::File,
    }

    impl SideFixture {
        fn new() -> SideFixture {
            use std::os::fd::AsFd;
            use std::os::unix::net::{UnixListener, UnixStream};
            let dir = tempfile_dir();
            let systemd =
                crate::testing::service_manager::ServiceManager::start(&dir.join("notify"))
                    .unwrap();
            let keeper = Keeper::start(
                FdStore::connect(systemd.notify_socket().as_os_str()).unwrap(),
                Journal::create().unwrap(),
            )
            .unwrap();
            let vhost = UnixListener::bind(dir.join("vm.sock")).unwrap();
            keeper.store(LISTENER, vhost.as_fd()).unwrap();
            keeper.checkpoint(&Checkpoint::idle()).unwrap();
            let listener = UnixListener::bind(dir.join("ep1.sock")).unwrap();
            let (client, peer) = UnixStream::pair().unwrap();
            SideFixture {
                _dir: dir,
                systemd,
                keeper,
                _vhost: vhost,
                listener,
                client,
                _peer: peer,
                ram: crate::journal::memfd(c"ram").unwrap(),
            }
        }

        /// The server with its client connected and `maps`.
        fn server(&self, maps: Vec<DmaMap>) -> VfioUserServer {
            VfioUserServer {
                endpoint: 1,
                listener_fd: self.listener.as_raw_fd(),
                connection: Some(VfioUserConnection {
                    socket_fd: self.client.as_raw_fd(),
                    state: Default::default(),
                    maps,
                }),
            }
        }

        /// A map of a page of the memfd.
        fn map(&self, address: u64, size: u64, offset: u64) -> DmaMap {
            DmaMap {
                address,
                size,
                flags: 3,
                offset,
                file_id: None,
                fd: Some(self.ram.as_raw_fd()),
            }
        }

        /// What a restarted daemon takes back from the store as it is now.
        fn take_back(self) -> (Kept, Self) {
            self.systemd.sync().unwrap();
            let passed = self.systemd.passed().unwrap();
            let store = FdStore::connect(self.systemd.notify_socket().as_os_str()).unwrap();
            let kept = take_back(store, passed)
                .unwrap_or_else(|e| panic!("{e}: the store holds {:?}", self.systemd.names()))
                .unwrap();
            (kept, self)
        }
    }

    #[test]
    fn the_side_state_comes_back_with_the_same_objects_and_drops_what_it_no_longer_names() {
        use super::side::inode;
        let f = SideFixture::new();
        let map = f.map(0x1000, 0x2000, 0);
        f.keeper
            .keep_vfio_user(1, Some(f.server(vec![map.clone()])));
        f.keeper.keep_vfio_user(1, Some(f.server(vec![map])));
        f.systemd.sync().unwrap();
        let names = f.systemd.names();
        assert_eq!(
            names.len(),
            5,
            "journal, both listeners, client, map once each: {names:?}"
        );
        // The client leaves: its socket and its map's fd leave the store, the listener stays.
        f.keeper.keep_vfio_user(1, Some(f.server(Vec::new())));
        f.keeper.keep_vfio_user(
            1,
            Some(VfioUserServer {
                connection: None,
                ..f.server(Vec::new())
            }),
        );
        f.keeper.keep_vfio_user(1, Some(f.server(vec![])));
        f.systemd.sync().unwrap();
        let names = f.systemd.names();
        assert_eq!(
            names.len(),
            4,
            "journal, both listeners, the new client: {names:?}"
        );
        let (kept, f) = f.take_back();
        let u = &kept.state.vfio_user;
        assert_eq!(u.len(), 1);
        assert_eq!(inode(u[0].listener_fd), inode(f.listener.as_raw_fd()));
        let c = u[0].connection.as_ref().unwrap();
        assert_eq!(inode(c.socket_fd), inode(f.client.as_raw_fd()));
        assert_ne!(
            c.socket_fd,
            f.client.as_raw_fd(),
            "a duplicate the store passed back"
        );
        // SAFETY: the fds take_back handed over, closed once here.
        unsafe {
            drop(OwnedFd::from_raw_fd(u[0].listener_fd));
            drop(OwnedFd::from_raw_fd(c.socket_fd));
            drop(OwnedFd::from_raw_fd(kept.state.listener_fd));
        }
    }

    /// Two DMA maps of a vfio-user client share one fd (a map split by a partial unmap keeps
    /// its file for both halves): a restarted daemon gets an fd for each (the end-to-end tier's
    /// crash restart found the second one "not in the fd store").
    #[test]
    fn two_maps_sharing_one_fd_come_back_with_one_fd_each() {
        use super::side::inode;
        let f = SideFixture::new();
        let maps = vec![f.map(0, 0x1000, 0), f.map(0x2000, 0x1000, 0x2000)];
        f.keeper.keep_vfio_user(1, Some(f.server(maps)));
        let (kept, f) = f.take_back();
        let c = kept.state.vfio_user[0].connection.as_ref().unwrap();
        let fds: Vec<RawFd> = c.maps.iter().filter_map(|m| m.fd).collect();
        assert_eq!(fds.len(), 2);
        assert_ne!(
            fds[0], fds[1],
            "one fd each (each map owns and closes its own)"
        );
        assert!(fds.iter().all(|&fd| inode(fd) == inode(f.ram.as_raw_fd())));
    }

    fn tempfile_dir() -> crate::testing::TempDir {
        crate::testing::TempDir::named("recovery")
    }

    #[test]
    fn fresh_names_continue_after_the_kept_ones() {
        assert_eq!(
            next_name_after(["journal", "c3", "c12", "vmm", "cx"].into_iter()),
            13
        );
        assert_eq!(next_name_after(["journal"].into_iter()), 0);
    }
}
