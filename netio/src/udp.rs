//! Batched UDP for the data plane: `recvmmsg` with UDP GRO on receive (one
//! system call returns many datagrams, and the kernel coalesces a flow's
//! datagrams into one buffer), and UDP GSO on send (one system call and one
//! trip through the stack for up to 64 datagrams to the same peer). The
//! mechanics (control messages, fallbacks when a kernel or device lacks
//! GSO) come from `quinn-udp`.

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Datagrams per `recvmmsg` (quinn-udp's batch size on Linux).
pub const RECV_BATCH: usize = 32;
/// Bytes one GRO-coalesced receive can hold: 64 segments of an MTU each
/// would exceed the 64 KiB an skb may carry, so 64 KiB is the bound.
pub const GRO_BUFFER: usize = 65536;
/// Largest payload one GSO send may carry (IPv4 total length minus headers).
const GSO_MAX_BYTES: usize = 65535 - 20 - 8;

pub struct UdpIo {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl UdpIo {
    /// Binds a non-blocking UDP socket with GRO enabled, large buffers, and
    /// DF clear on what it sends (see `crate::udp_socket`).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        crate::big_buffers(&s);
        s.bind(&SockAddr::from(addr))?;
        let sock: UdpSocket = s.into();
        let state = UdpSocketState::new((&sock).into())?;
        if addr.is_ipv4() {
            // quinn-udp asks for DF on everything; PON lets the kernel fragment
            // outer packets of inner packets that allow it.
            crate::set_pmtudisc_dont(&socket2::SockRef::from(&sock))?;
        }
        Ok(UdpIo { sock, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Most datagrams one GSO send may carry (1 where GSO is unavailable).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Blocks until `events` are ready, or `timeout_ms` (-1: forever) passes;
    /// returns whether they are.
    fn wait_for(&self, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        self.wait_for(events, -1).map(drop)
    }

    /// Receives a batch, blocking until at least one datagram is there.
    /// `meta[i].stride` is the size of the GRO segments in `bufs[i]`.
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        loop {
            match self.state.recv((&self.sock).into(), bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                other => return other,
            }
        }
    }

    /// Like `recv`, but returns 0 if nothing arrives within `timeout`.
    pub fn recv_within(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        timeout: std::time::Duration,
    ) -> io::Result<usize> {
        match self.state.recv((&self.sock).into(), bufs, meta) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
                if !self.wait_for(libc::POLLIN, ms)? {
                    return Ok(0);
                }
                match self.state.recv((&self.sock).into(), bufs, meta) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Sends `contents` to `dst`, as datagrams of `segment` bytes (GSO) when given.
    pub fn send(&self, dst: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: segment.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        loop {
            match self.state.try_send((&self.sock).into(), &t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                other => return other,
            }
        }
    }
}

/// A send that failed, and how many datagrams it lost: callers count
/// packets, not system calls, so a failed GSO send of 40 datagrams is 40.
#[derive(Debug)]
pub struct SendError {
    pub datagrams: u64,
    pub error: io::Error,
}

impl SendError {
    /// Folds two outcomes of one `push` into one: the losses add up, and the
    /// first error is the one reported.
    fn merge(a: Result<(), SendError>, b: Result<(), SendError>) -> Result<(), SendError> {
        match (a, b) {
            (Err(mut x), Err(y)) => {
                x.datagrams += y.datagrams;
                Err(x)
            }
            (Err(x), Ok(())) | (Ok(()), Err(x)) => Err(x),
            (Ok(()), Ok(())) => Ok(()),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} datagrams lost)", self.error, self.datagrams)
    }
}

impl std::error::Error for SendError {}

/// Gathers consecutive datagrams to the same destination into one GSO send.
/// GSO needs equal-sized segments (the last may be shorter) that each fit the
/// path MTU, so a datagram that breaks the run flushes it first. A failed
/// flush never costs the datagram that caused it.
pub struct GsoBatch {
    buf: Vec<u8>,
    dst: Option<SocketAddr>,
    segment: usize,
    count: usize,
    max_segment: usize,
    /// Datagrams the kernel took since the last `take_sent`; those it
    /// refused were reported by the `SendError` of the call that lost them.
    sent: u64,
}

impl GsoBatch {
    /// `max_segment`: the largest datagram that may be batched (the path MTU
    /// minus IP and UDP headers); larger ones are sent alone.
    pub fn new(max_segment: usize) -> Self {
        GsoBatch {
            buf: Vec::with_capacity(GSO_MAX_BYTES),
            dst: None,
            segment: 0,
            count: 0,
            max_segment,
            sent: 0,
        }
    }

    /// Queues `datagram` for `dst`, sending what it cannot join. An error
    /// counts every datagram lost, which may include earlier ones whose
    /// batch this push flushed.
    pub fn push(&mut self, io: &UdpIo, dst: SocketAddr, datagram: &[u8]) -> Result<(), SendError> {
        let len = datagram.len();
        if len > self.max_segment || len == 0 {
            let before = self.flush(io);
            let alone = io.send(dst, datagram, None);
            return SendError::merge(before, self.settle(1, alone));
        }
        let joins = self.dst == Some(dst)
            && len <= self.segment
            && self.count < io.max_gso_segments()
            && self.buf.len() + len <= GSO_MAX_BYTES;
        let mut result = Ok(());
        if !joins {
            result = self.flush(io);
            self.dst = Some(dst);
            self.segment = len;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        if len < self.segment {
            // A shorter datagram must be the last of its run.
            result = SendError::merge(result, self.flush(io));
        }
        result
    }

    pub fn flush(&mut self, io: &UdpIo) -> Result<(), SendError> {
        let result = match self.dst {
            Some(dst) if self.count > 0 => {
                let r = io.send(dst, &self.buf, Some(self.segment));
                self.settle(self.count as u64, r)
            }
            _ => Ok(()),
        };
        self.buf.clear();
        self.dst = None;
        self.count = 0;
        result
    }

    /// Books `n` datagrams as sent or failed by the outcome of their send.
    fn settle(&mut self, n: u64, r: io::Result<()>) -> Result<(), SendError> {
        match r {
            Ok(()) => {
                self.sent += n;
                Ok(())
            }
            Err(error) => Err(SendError {
                datagrams: n,
                error,
            }),
        }
    }

    /// Datagrams sent since the last call, for callers that add them to
    /// counters (each packet ends sent here, or lost in a `SendError`).
    pub fn take_sent(&mut self) -> u64 {
        std::mem::take(&mut self.sent)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Receive buffers and metadata for one thread, allocated once.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    pub meta: Vec<RecvMeta>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; GRO_BUFFER]).collect(),
            meta: vec![RecvMeta::default(); RECV_BATCH],
        }
    }
}

impl RecvBatch {
    /// Receives into the batch; returns how many messages arrived.
    pub fn recv(&mut self, io: &UdpIo) -> io::Result<usize> {
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] = {
            let mut it = self.bufs.iter_mut();
            std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RECV_BATCH buffers")))
        };
        io.recv(&mut slices, &mut self.meta)
    }

    /// Like `recv`, but returns 0 if nothing arrives within `timeout`.
    pub fn recv_within(&mut self, io: &UdpIo, timeout: std::time::Duration) -> io::Result<usize> {
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] = {
            let mut it = self.bufs.iter_mut();
            std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RECV_BATCH buffers")))
        };
        io.recv_within(&mut slices, &mut self.meta, timeout)
    }

    /// The datagrams of message `i`: GRO segments of `stride` bytes, the last
    /// possibly shorter. Yields `(source, bytes)`.
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let m = &self.meta[i];
        let stride = if m.stride == 0 {
            m.len.max(1)
        } else {
            m.stride
        };
        self.bufs[i][..m.len].chunks(stride)
    }

    /// The datagrams of message `i`, writable (for in-place decryption).
    pub fn datagrams_mut(&mut self, i: usize) -> impl Iterator<Item = &mut [u8]> {
        let (buf, len, stride) = self.message_mut(i);
        buf[..len].chunks_mut(stride)
    }

    /// Mutable access to message `i`'s buffer and its GRO layout, for
    /// in-place processing: `(buffer, len, stride)`.
    pub fn message_mut(&mut self, i: usize) -> (&mut [u8], usize, usize) {
        let m = &self.meta[i];
        let stride = if m.stride == 0 {
            m.len.max(1)
        } else {
            m.stride
        };
        (&mut self.bufs[i][..], m.len, stride)
    }

    pub fn source(&self, i: usize) -> SocketAddr {
        self.meta[i].addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_batch_round_trips_over_loopback() {
        let rx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dst = rx.local_addr().unwrap();
        let mut batch = GsoBatch::new(1400);
        // 10 equal datagrams, one shorter (closes the run), one oversized (alone).
        for i in 0..10u8 {
            batch.push(&tx, dst, &[i; 1000]).unwrap();
        }
        batch.push(&tx, dst, &[99; 10]).unwrap();
        batch.push(&tx, dst, &[7; 3000]).unwrap();
        batch.flush(&tx).unwrap();

        let mut rb = RecvBatch::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < 12 {
            let n = rb.recv(&rx).unwrap();
            for i in 0..n {
                assert_eq!(rb.source(i), tx.local_addr().unwrap());
                got.extend(rb.datagrams(i).map(|d| d.to_vec()));
            }
        }
        for (i, d) in got.iter().take(10).enumerate() {
            assert_eq!(d, &vec![i as u8; 1000]);
        }
        assert_eq!(got[10], vec![99; 10]);
        assert_eq!(got[11], vec![7; 3000]);
    }

    /// Broadcasting without SO_BROADCAST fails (EACCES) on every kernel, so
    /// no namespace or routing is needed to make a send fail.
    const FAILS: &str = "255.255.255.255:9";

    #[test]
    fn every_datagram_ends_sent_or_failed() {
        let rx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (ok, bad) = (rx.local_addr().unwrap(), FAILS.parse().unwrap());
        let mut batch = GsoBatch::new(1400);
        let mut reported = 0;
        // Runs broken by destination, by a shorter datagram and by an
        // oversized one, alternating between a working and a failing peer.
        let sizes = [100, 100, 50, 100, 3000, 100, 0, 100];
        for (i, &size) in sizes.iter().cycle().take(40).enumerate() {
            let dst = if (i / 3) % 2 == 0 { ok } else { bad };
            if let Err(e) = batch.push(&tx, dst, &vec![0; size]) {
                reported += e.datagrams;
            }
        }
        if let Err(e) = batch.flush(&tx) {
            reported += e.datagrams;
        }
        let sent = batch.take_sent();
        assert_eq!(sent + reported, 40, "every datagram sent or reported lost");
        assert!(sent > 0 && reported > 0, "{sent} sent, {reported} lost");
        assert_eq!(batch.take_sent(), 0, "taken, so counted once");
    }

    #[test]
    fn failed_flush_keeps_the_next_datagram() {
        let rx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut batch = GsoBatch::new(1400);
        for _ in 0..3 {
            batch.push(&tx, FAILS.parse().unwrap(), &[1; 100]).unwrap();
        }
        // Changing destination flushes the 3 queued datagrams, which fails;
        // the new one must still go out.
        let err = batch
            .push(&tx, rx.local_addr().unwrap(), &[2; 100])
            .unwrap_err();
        assert_eq!(err.datagrams, 3, "an error counts packets, not calls");
        batch.flush(&tx).unwrap();
        assert_eq!(batch.take_sent(), 1, "3 lost (in the error), 1 sent");
        let mut rb = RecvBatch::default();
        let n = rb
            .recv_within(&rx, std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(n, 1, "the datagram after the failed flush was dropped");
        assert_eq!(rb.datagrams(0).next().unwrap(), &[2; 100][..]);
    }
}
