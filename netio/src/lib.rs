//! Socket plumbing shared by the forwarder and the agents. Only set-up lives
//! here; the per-packet calls are plain `send_to`/`recv` on these sockets.

pub mod udp;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

/// Socket buffers sized for bursts of full-size packets at line rate.
const SOCKET_BUFFER: usize = 4 << 20;

pub(crate) fn big_buffers(s: &Socket) {
    // The *FORCE variants pass net.core.[rw]mem_max (whose default, 208 KiB,
    // overflows in a burst) when we hold CAP_NET_ADMIN; otherwise fall back
    // to the capped request.
    use std::os::fd::AsRawFd;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            force,
            SOCKET_BUFFER as libc::c_int,
        )
        .is_err()
        {
            let _ = setsockopt_int(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                plain,
                SOCKET_BUFFER as libc::c_int,
            );
        }
    }
}

fn setsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid fd; the option value points to a c_int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A raw IPv4 socket of `protocol`, its buffers sized for bursts.
fn raw_socket(protocol: libc::c_int) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(protocol)))?;
    big_buffers(&s);
    Ok(s)
}

/// Receives every IPv4 IP-in-IP (protocol 4) packet addressed to this host,
/// outer header included. Owning one also keeps the kernel from answering
/// protocol 4 with "protocol unreachable" (no ipip module is needed).
pub struct IpipReceiver(Socket);

impl IpipReceiver {
    pub fn open() -> io::Result<Self> {
        raw_socket(libc::IPPROTO_IPIP).map(IpipReceiver)
    }
    /// Blocks for the next packet; returns its length (outer header included).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
    /// The next packet if one is queued, without blocking.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        use std::os::fd::AsRawFd;
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        }
    }
}

/// Sends complete IPv4 packets whose header the caller wrote (IPPROTO_RAW
/// implies IP_HDRINCL). Never receives, so it costs nothing to keep open.
pub struct RawSender(Socket);

impl RawSender {
    pub fn open() -> io::Result<Self> {
        raw_socket(libc::IPPROTO_RAW).map(RawSender)
    }
    pub fn send_to(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
        self.0
            .send_to(packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))
    }
}

/// A UDP socket for overlay and agent legs. Outer fragmentation is left to
/// the kernel (DF clear): PON enforces the path MTU itself on inner packets
/// that carry DF and lets others through fragmented, as a router would.
pub fn udp_socket(bind: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    big_buffers(&s);
    if bind.is_ipv4() {
        set_pmtudisc_dont(&s)?;
    }
    s.bind(&SockAddr::from(bind))?;
    Ok(s.into())
}

pub(crate) fn set_pmtudisc_dont(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    setsockopt_int(
        s.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )
}

/// Writes a sysctl under /proc/sys, e.g. `("net/ipv4/conf/pon0/rp_filter", "2")`.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value}: {e}")))
}
