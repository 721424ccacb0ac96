//! The data-path thread: reads packets from the TUN, asks the emulator what
//! to do, sleeps until the next packet is due, writes packets back.
//!
//! One thread and one `ppoll` on two descriptors (the TUN and an eventfd the
//! control thread pokes): no lock, channel or allocation per packet once the
//! buffer pool has grown to the number of packets in flight. `ppoll` takes a
//! nanosecond timeout and the thread's timer slack is set to 1 µs, so packets
//! leave within microseconds of when they are due (plain `poll` rounds up to
//! whole milliseconds, which alone would break a 1 ms accuracy goal).

use crate::control::{Controlled, Job};
use crate::emulator::{Arrival, Emit};
use crate::packet::{classify, restore_ttl};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tun_rs::SyncDevice;

/// Packets read per wake-up before the loop looks at timers and control
/// again, so a flood cannot starve either.
const READ_BATCH: usize = 64;

/// A packet in a reusable buffer.
#[derive(Debug)]
pub struct Packet {
    buf: Box<[u8]>,
    len: usize,
}

/// An eventfd the control thread uses to wake the data path.
pub struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Waker(self.0.try_clone()?))
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN)
        // still leaves the fd readable, which is all a wake-up needs.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Lets the kernel fire our timers late by at most 1 µs (default 50 µs).
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer argument.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if r != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot tighten timer slack");
    }
}

/// Runs the calling thread under SCHED_FIFO at `priority`.
///
/// The emulator stands in for netem, which runs in the kernel's softirq
/// context ahead of every process. As an ordinary process on a loaded
/// machine, its timer wake-ups were seen 4-8 ms late (a scheduler slice
/// behind compilers and tests), far beyond a 1 ms accuracy goal. A real-time
/// thread is woken at once; it sleeps whenever no packet is due, and the
/// kernel's real-time throttling still leaves others 5% of a CPU under a flood.
pub fn set_realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: libc::c_int::from(priority),
    };
    // SAFETY: pid 0 is the calling thread; param lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub struct DataPath {
    pub tun: SyncDevice,
    pub state: Controlled<Packet>,
    pub jobs: mpsc::Receiver<Job>,
    pub waker: Waker,
    /// Size of every buffer: the TUN MTU (no offloads: no larger packets).
    /// The TUN is non-blocking: `recv` says WouldBlock when it is empty.
    pub buf_len: usize,
    pool: Vec<Box<[u8]>>,
    /// The emulator's clock: it is fed the time since this start.
    start: Instant,
}

impl DataPath {
    pub fn new(
        tun: SyncDevice,
        state: Controlled<Packet>,
        jobs: mpsc::Receiver<Job>,
        waker: Waker,
        mtu: u16,
    ) -> io::Result<Self> {
        tun.set_nonblocking(true)?;
        Ok(DataPath {
            tun,
            state,
            jobs,
            waker,
            buf_len: usize::from(mtu),
            pool: Vec::new(),
            start: Instant::now(),
        })
    }

    /// Runs until a fatal error, in the calling thread (made real-time at
    /// `realtime` priority if given).
    pub fn run(&mut self, realtime: Option<u8>) -> io::Result<()> {
        tighten_timer_slack();
        if let Some(prio) = realtime {
            match set_realtime(prio) {
                Ok(()) => tracing::info!(priority = prio, "data path runs SCHED_FIFO"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot run real-time; timing may suffer under load")
                }
            }
        }
        let tun_fd = self.tun.as_raw_fd();
        let wake_fd = self.waker.0.as_raw_fd();
        loop {
            self.emit_due(self.start.elapsed());
            self.state
                .registry
                .set_in_flight(self.state.emu.in_flight());
            let timeout = self
                .state
                .emu
                .next_due()
                .map(|due| due.saturating_sub(self.start.elapsed()));
            let (tun_ready, wake_ready) = ppoll2(tun_fd, wake_fd, timeout)?;
            if tun_ready {
                self.read_batch();
            }
            if wake_ready {
                self.waker.drain();
                while let Ok((req, reply)) = self.jobs.try_recv() {
                    // The requester may have given up: nothing to do then.
                    let _ = reply.send(self.state.handle(req));
                }
            }
        }
    }

    fn read_batch(&mut self) {
        for _ in 0..READ_BATCH {
            let mut buf = self
                .pool
                .pop()
                .unwrap_or_else(|| vec![0u8; self.buf_len].into_boxed_slice());
            let len = match self.tun.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    self.pool.push(buf);
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        self.error(true, &e);
                    }
                    return;
                }
            };
            let now = self.start.elapsed();
            // Keep departures on time under a flood of arrivals.
            if self.state.emu.next_due().is_some_and(|d| d <= now) {
                self.emit_due(now);
            }
            self.arrive(now, Packet { buf, len });
        }
    }

    fn arrive(&mut self, now: Duration, mut p: Packet) {
        restore_ttl(&mut p.buf[..p.len]);
        let c = &self.state.registry.emu;
        let Some((from, to)) = classify(&self.state.sites, &p.buf[..p.len]) else {
            c.foreign_packets.inc();
            self.send(p);
            return;
        };
        if self.state.emu.link(from, to).is_none() {
            c.passthrough_packets.inc();
        }
        let len = p.len;
        match self.state.emu.arrive(now, from, to, len, p) {
            Arrival::Forward(p) => self.send(p),
            Arrival::Scheduled => {}
            Arrival::Dropped(p, _) => self.pool.push(p.buf),
        }
    }

    fn emit_due(&mut self, now: Duration) {
        while let Some(e) = self.state.emu.poll(now) {
            match e {
                Emit::Send(p) => self.send(p),
                Emit::Dropped(p, _) => self.pool.push(p.buf),
            }
        }
    }

    fn send(&mut self, p: Packet) {
        if let Err(e) = self.tun.send(&p.buf[..p.len]) {
            // EAGAIN here means the stack's backlog is full: a real drop,
            // counted like any other write error.
            self.error(false, &e);
        }
        self.pool.push(p.buf);
    }

    fn error(&self, rx: bool, e: &io::Error) {
        let c = &self.state.registry.emu;
        let counter = if rx { &c.rx_errors } else { &c.tx_errors };
        counter.inc();
        // Log the 1st, 2nd, 4th, 8th...: visible, but no log flood.
        if counter.get().is_power_of_two() {
            tracing::warn!(error = %e, rx, count = counter.get(), "TUN I/O error");
        }
    }
}

/// Waits for either descriptor to be readable, or `timeout` (None: forever).
fn ppoll2(a: RawFd, b: RawFd, timeout: Option<Duration>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds and ts live across the call; a null sigmask keeps the mask.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok((false, false))
        } else {
            Err(e)
        };
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}
