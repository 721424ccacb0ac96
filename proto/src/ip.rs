//! Just enough IPv4/IPv6 to carry packets through the overlay: a checked
//! view of an IPv4 header, the IP-in-IP outer header, the inner packet's
//! addresses, and the ICMP "fragmentation needed" a forwarder returns when a
//! packet does not fit the path.

use crate::error::need;
use crate::{Error, Result};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
/// Bytes an IPv4 IP-in-IP agent leg adds to a packet.
pub const IPIP_OVERHEAD: usize = IPV4_HEADER_LEN;
/// Bytes a UDP/IPv4 leg adds to its payload.
pub const UDP_OVERHEAD: usize = IPV4_HEADER_LEN + UDP_HEADER_LEN;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// Internet checksum (RFC 1071) over `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A checked view of an IPv4 packet.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Validates version, header length and total length against the buffer.
    /// Bytes after `total_len` (link padding) are tolerated and ignored.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need(b.len(), IPV4_HEADER_LEN)?;
        let version = b[0] >> 4;
        if version != 4 {
            return Err(Error::NotIp(version));
        }
        let ihl = b[0] & 0x0f;
        let header_len = usize::from(ihl) * 4;
        if ihl < 5 {
            return Err(Error::BadHeaderLength(ihl));
        }
        need(b.len(), header_len)?;
        let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if total < header_len || total > b.len() {
            return Err(Error::BadTotalLength {
                total,
                have: b.len(),
            });
        }
        Ok(Ipv4Packet { buffer })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[0] & 0x0f) * 4
    }
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.b()[2], self.b()[3]]))
    }
    fn flags_frag(&self) -> u16 {
        u16::from_be_bytes([self.b()[6], self.b()[7]])
    }
    pub fn dont_fragment(&self) -> bool {
        self.flags_frag() & FLAG_DF != 0
    }
    /// True for any fragment but the first (ICMP errors are only sent about first fragments).
    pub fn is_later_fragment(&self) -> bool {
        self.flags_frag() & FRAG_OFFSET_MASK != 0
    }
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & (FRAG_OFFSET_MASK | FLAG_MF) != 0
    }
    pub fn ttl(&self) -> u8 {
        self.b()[8]
    }
    pub fn protocol(&self) -> u8 {
        self.b()[9]
    }
    pub fn src(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    pub fn verify_checksum(&self) -> bool {
        checksum(&self.b()[..self.header_len()]) == 0
    }
    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// The fields PON sets when it writes an IPv4 header (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub dont_fragment: bool,
    pub payload_len: usize,
}

impl Ipv4Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Result<Self> {
        if !p.verify_checksum() {
            return Err(Error::BadChecksum);
        }
        Ok(Ipv4Repr {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            ttl: p.ttl(),
            dont_fragment: p.dont_fragment(),
            payload_len: p.total_len() - p.header_len(),
        })
    }

    /// Writes a 20-byte header with a valid checksum into `out[..20]`.
    pub fn emit(&self, out: &mut [u8]) -> Result<()> {
        let total = IPV4_HEADER_LEN + self.payload_len;
        if total > usize::from(u16::MAX) {
            return Err(Error::BadTotalLength {
                total,
                have: usize::from(u16::MAX),
            });
        }
        if out.len() < IPV4_HEADER_LEN {
            return Err(Error::BufferTooSmall {
                needed: IPV4_HEADER_LEN,
                have: out.len(),
            });
        }
        let h = &mut out[..IPV4_HEADER_LEN];
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        // Identification 0: the kernel picks one for raw sends; PON never fragments.
        h[4..6].copy_from_slice(&[0, 0]);
        let flags = if self.dont_fragment { FLAG_DF } else { 0 };
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.protocol;
        h[10..12].copy_from_slice(&[0, 0]);
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

/// Parses an IP-in-IP packet as a raw socket returns it: the outer IPv4
/// header (checked, protocol 4) and the inner packet (checked to be IP).
pub fn parse_ipip(buf: &[u8]) -> Result<(Ipv4Repr, &[u8])> {
    let outer = Ipv4Packet::new_checked(buf)?;
    let repr = Ipv4Repr::parse(&outer)?;
    if repr.protocol != IPPROTO_IPIP {
        return Err(Error::NotIpInIp(repr.protocol));
    }
    if outer.is_fragment() {
        // The kernel reassembles before raw delivery; a fragment here is forged.
        return Err(Error::BadTotalLength {
            total: outer.total_len(),
            have: buf.len(),
        });
    }
    let header_len = outer.header_len();
    let total = outer.total_len();
    let inner = &buf[header_len..total];
    InnerPacket::new_checked(inner)?;
    Ok((repr, inner))
}

/// The addresses of an IPv4 or IPv6 packet carried through the overlay.
#[derive(Debug, Clone, Copy)]
pub struct InnerPacket<'a> {
    buf: &'a [u8],
}

impl<'a> InnerPacket<'a> {
    /// Accepts an IPv4 or IPv6 packet whose length fields fit the buffer.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self> {
        need(buf.len(), 1)?;
        match buf[0] >> 4 {
            4 => {
                Ipv4Packet::new_checked(buf)?;
            }
            6 => {
                need(buf.len(), IPV6_HEADER_LEN)?;
                let payload = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
                if IPV6_HEADER_LEN + payload > buf.len() {
                    return Err(Error::BadTotalLength {
                        total: IPV6_HEADER_LEN + payload,
                        have: buf.len(),
                    });
                }
            }
            v => return Err(Error::NotIp(v)),
        }
        Ok(InnerPacket { buf })
    }

    pub fn is_ipv4(&self) -> bool {
        self.buf[0] >> 4 == 4
    }
    pub fn as_ipv4(&self) -> Option<Ipv4Packet<&'a [u8]>> {
        self.is_ipv4().then(|| Ipv4Packet::new_unchecked(self.buf))
    }
    pub fn src(&self) -> IpAddr {
        if self.is_ipv4() {
            IpAddr::V4(Ipv4Packet::new_unchecked(self.buf).src())
        } else {
            IpAddr::V6(v6_at(self.buf, 8))
        }
    }
    pub fn dst(&self) -> IpAddr {
        if self.is_ipv4() {
            IpAddr::V4(Ipv4Packet::new_unchecked(self.buf).dst())
        } else {
            IpAddr::V6(v6_at(self.buf, 24))
        }
    }
    /// True when the sender forbids fragmentation (always true for IPv6).
    pub fn dont_fragment(&self) -> bool {
        match self.as_ipv4() {
            Some(p) => p.dont_fragment(),
            None => true,
        }
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// Bytes of ICMP error message: type, code, checksum, unused, next-hop MTU.
const ICMP_HEADER_LEN: usize = 8;
/// RFC 792: an ICMP error quotes the IP header and the first 8 payload bytes.
const ICMP_QUOTE_PAYLOAD: usize = 8;
/// Largest ICMP "fragmentation needed" this module emits.
pub const FRAG_NEEDED_MAX_LEN: usize = IPV4_HEADER_LEN + ICMP_HEADER_LEN + 60 + ICMP_QUOTE_PAYLOAD;

/// Whether an ICMP error may be sent about `p` (RFC 1122 3.2.2): not about
/// later fragments, and not about ICMP errors.
pub fn icmp_error_allowed<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> bool {
    if p.is_later_fragment() {
        return false;
    }
    if p.protocol() == IPPROTO_ICMP {
        // Only echo request/reply (8/0) and other queries may trigger errors.
        return match p.payload().first() {
            Some(t) => matches!(t, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18),
            None => false,
        };
    }
    true
}

/// Writes an ICMP "destination unreachable, fragmentation needed" (type 3,
/// code 4, RFC 1191) about `original` into `out`, from `from` to the
/// original sender, advertising `mtu`. Returns the packet length.
pub fn emit_frag_needed<T: AsRef<[u8]>>(
    original: &Ipv4Packet<T>,
    mtu: u16,
    from: Ipv4Addr,
    out: &mut [u8],
) -> Result<usize> {
    let quote_len = (original.header_len() + ICMP_QUOTE_PAYLOAD).min(original.total_len());
    let icmp_len = ICMP_HEADER_LEN + quote_len;
    let total = IPV4_HEADER_LEN + icmp_len;
    if out.len() < total {
        return Err(Error::BufferTooSmall {
            needed: total,
            have: out.len(),
        });
    }
    Ipv4Repr {
        src: from,
        dst: original.src(),
        protocol: IPPROTO_ICMP,
        ttl: 64,
        dont_fragment: false,
        payload_len: icmp_len,
    }
    .emit(out)?;
    let icmp = &mut out[IPV4_HEADER_LEN..total];
    icmp[0] = 3;
    icmp[1] = 4;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..6].copy_from_slice(&[0, 0]);
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HEADER_LEN..].copy_from_slice(&original.buffer.as_ref()[..quote_len]);
    let c = checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload_len: usize, df: bool) -> Vec<u8> {
        let mut v = vec![0u8; IPV4_HEADER_LEN + payload_len];
        Ipv4Repr {
            src: Ipv4Addr::new(198, 18, 1, 11),
            dst: Ipv4Addr::new(198, 18, 2, 11),
            protocol: 17,
            ttl: 64,
            dont_fragment: df,
            payload_len,
        }
        .emit(&mut v)
        .unwrap();
        v
    }

    #[test]
    fn ipv4_round_trip_and_checksum() {
        let v = sample(12, true);
        let p = Ipv4Packet::new_checked(&v[..]).unwrap();
        assert!(p.verify_checksum());
        let r = Ipv4Repr::parse(&p).unwrap();
        assert_eq!(r.payload_len, 12);
        assert!(r.dont_fragment);
        assert_eq!(r.dst, Ipv4Addr::new(198, 18, 2, 11));
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut v = sample(4, false);
        assert!(matches!(
            Ipv4Packet::new_checked(&v[..10]),
            Err(Error::Truncated { .. })
        ));
        v[3] = 200; // total length beyond buffer
        assert!(matches!(
            Ipv4Packet::new_checked(&v[..]),
            Err(Error::BadTotalLength { .. })
        ));
        v[0] = 0x44; // IHL 4
        assert_eq!(
            Ipv4Packet::new_checked(&v[..]).unwrap_err(),
            Error::BadHeaderLength(4)
        );
        v[0] = 0x55;
        assert_eq!(
            Ipv4Packet::new_checked(&v[..]).unwrap_err(),
            Error::NotIp(5)
        );
    }

    #[test]
    fn ipip_parse_checks_protocol_and_inner() {
        let inner = sample(8, false);
        let mut outer = vec![0u8; IPV4_HEADER_LEN + inner.len()];
        let mut repr = Ipv4Repr {
            src: Ipv4Addr::new(198, 18, 1, 11),
            dst: Ipv4Addr::new(198, 18, 1, 1),
            protocol: IPPROTO_IPIP,
            ttl: 64,
            dont_fragment: false,
            payload_len: inner.len(),
        };
        repr.emit(&mut outer).unwrap();
        outer[IPV4_HEADER_LEN..].copy_from_slice(&inner);
        let (r, got) = parse_ipip(&outer).unwrap();
        assert_eq!(r.src, repr.src);
        assert_eq!(got, &inner[..]);
        repr.protocol = 17;
        repr.emit(&mut outer).unwrap();
        assert_eq!(parse_ipip(&outer).unwrap_err(), Error::NotIpInIp(17));
        repr.protocol = IPPROTO_IPIP;
        repr.emit(&mut outer).unwrap();
        outer[IPV4_HEADER_LEN] = 0x75; // inner version 7
        assert_eq!(parse_ipip(&outer).unwrap_err(), Error::NotIp(7));
    }

    #[test]
    fn inner_ipv6_addresses() {
        let mut v = vec![0u8; 48];
        v[0] = 0x60;
        v[5] = 8;
        v[8 + 15] = 1;
        v[24 + 15] = 2;
        let p = InnerPacket::new_checked(&v).unwrap();
        assert_eq!(p.src(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst(), "::2".parse::<IpAddr>().unwrap());
        assert!(p.dont_fragment());
        v[5] = 9;
        assert!(InnerPacket::new_checked(&v).is_err());
    }

    #[test]
    fn frag_needed_quotes_header_and_8_bytes() {
        let orig = sample(1400, true);
        let p = Ipv4Packet::new_checked(&orig[..]).unwrap();
        assert!(icmp_error_allowed(&p));
        let mut out = [0u8; FRAG_NEEDED_MAX_LEN];
        let n = emit_frag_needed(&p, 1400, Ipv4Addr::new(198, 18, 1, 1), &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 20 + 8);
        let icmp = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.dst(), p.src());
        assert_eq!(icmp.protocol(), IPPROTO_ICMP);
        let body = icmp.payload();
        assert_eq!(checksum(body), 0);
        assert_eq!((body[0], body[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([body[6], body[7]]), 1400);
        assert_eq!(&body[8..], &orig[..28]);
        // Never an error about an ICMP error.
        let err = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(!icmp_error_allowed(&err));
    }
}
