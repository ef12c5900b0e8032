//! The vring thread: one per connection, the device state's owner (see `mailbox`). It waits on
//! one epoll set for the rings' kicks, the executors' completions, its own rewake eventfd and
//! the mailbox, and hands each to the device.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::*;

/// Event token of the exit eventfd: the connection is over.
const EXIT_EVENT: u64 = 2;

/// The running vring thread of one connection.
pub(super) struct VringThread {
    epoll: Arc<Epoll>,
    exit: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl VringThread {
    /// Starts the thread over `vrings` (request queue, event queue) with the device's events in
    /// its epoll set; from now on it owns the device state.
    pub(super) fn start(device: IommuDevice, vrings: [VringRwLock; 2]) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(exit.as_raw_fd(), EXIT_EVENT)?;
        for (fd, token) in device.event_fds() {
            add(fd, u64::from(token))?;
        }
        device.owner_started();
        let thread_epoll = epoll.clone();
        let owner = device.clone();
        let handle = std::thread::Builder::new()
            .name("vring".into())
            .spawn(move || run(&thread_epoll, &owner, &vrings));
        match handle {
            Ok(h) => Ok(VringThread {
                epoll,
                exit,
                handle: Some(h),
            }),
            Err(e) => {
                device.owner_stopped();
                Err(e)
            }
        }
    }

    /// Watches (or stops watching) a ring's kick eventfd; `queue` is its index.
    pub(super) fn watch_kick(&self, fd: RawFd, queue: usize, on: bool) -> io::Result<()> {
        let event = EpollEvent::new(EventSet::IN, queue as u64);
        if on {
            match self.epoll.ctl(ControlOperation::Add, fd, event) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                r => r,
            }
        } else {
            match self.epoll.ctl(ControlOperation::Delete, fd, event) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                r => r,
            }
        }
    }

    /// Ends the thread and waits for it; the device state has no owner thread afterwards.
    pub(super) fn stop(mut self) {
        self.join();
    }

    /// As [`VringThread::stop`], keeping the (finished) object.
    pub(super) fn join(&mut self) {
        let Some(h) = self.handle.take() else { return };
        if let Err(e) = self.exit.write(1) {
            log::error!("cannot stop the vring thread: {e}");
        }
        if h.join().is_err() {
            log::error!("the vring thread panicked");
        }
    }
}

impl Drop for VringThread {
    fn drop(&mut self) {
        self.join();
    }
}

/// The thread's loop: until the exit event, or until handling an event fails (logged; the
/// device state then passes back to the posters).
fn run(epoll: &Epoll, device: &IommuDevice, vrings: &[VringRwLock; 2]) {
    let watch = OwnerWatch(device);
    let mut events = vec![EpollEvent::default(); 16];
    'wait: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vring thread: epoll_wait: {e}");
                break;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == EXIT_EVENT {
                break 'wait;
            }
            if let Some(vring) = vrings.get(token as usize) {
                // Consume the kick; a disabled ring is not served.
                match vring.read_kick() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        log::error!("vring thread: cannot read the kick of queue {token}: {e}");
                        break 'wait;
                    }
                }
            }
            if let Err(e) = device.handle(token as u16, vrings) {
                log::error!("vring thread: {e}; requests are no longer served");
                break 'wait;
            }
        }
    }
    device.owner_stopped();
    drop(watch);
}
