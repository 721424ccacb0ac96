//! Just enough IPv4/IPv6/ICMPv4 to carry packets through the overlay: checked
//! views of IPv4, IPv6 and ICMPv4 headers, the IP-in-IP outer header with its
//! checked inner packet, and the ICMP "fragmentation needed" a forwarder
//! returns when a packet does not fit the path.

use crate::error::need;
use crate::{Error, Result};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;
/// Bytes an IPv4 IP-in-IP agent leg adds to a packet.
pub const IPIP_OVERHEAD: usize = IPV4_HEADER_LEN;
/// Bytes a UDP/IPv4 leg adds to its payload.
pub const UDP_OVERHEAD: usize = IPV4_HEADER_LEN + UDP_HEADER_LEN;

/// An IP protocol number. Open: numbers PON does not name still round-trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    Icmp,
    Ipip,
    Tcp,
    Udp,
    Ipv6,
    Icmpv6,
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(v: u8) -> Self {
        match v {
            1 => IpProtocol::Icmp,
            4 => IpProtocol::Ipip,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            41 => IpProtocol::Ipv6,
            58 => IpProtocol::Icmpv6,
            other => IpProtocol::Unknown(other),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(p: IpProtocol) -> u8 {
        match p {
            IpProtocol::Icmp => 1,
            IpProtocol::Ipip => 4,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Ipv6 => 41,
            IpProtocol::Icmpv6 => 58,
            IpProtocol::Unknown(other) => other,
        }
    }
}

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

#[inline]
fn be16(b: &[u8], r: core::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

/// A length field `total` must cover the header (`min`) and fit the `have`
/// bytes received.
#[inline]
fn total_fits(total: usize, min: usize, have: usize) -> Result<()> {
    if total < min || total > have {
        return Err(Error::BadTotalLength { total, have });
    }
    Ok(())
}

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet; after `new_checked` no accessor can panic.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// A view without checks, for writing a header into a buffer of at
    /// least [`IPV4_HEADER_LEN`] bytes.
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Validates version, header length and total length against the buffer.
    /// Bytes after `total_len` (link padding) are tolerated and ignored.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Ipv4Packet { buffer };
        let b = p.buffer.as_ref();
        need(b.len(), IPV4_HEADER_LEN)?;
        if p.version() != 4 {
            return Err(Error::NotIp(p.version()));
        }
        let ihl = b[field::VER_IHL] & 0x0f;
        if ihl < 5 {
            return Err(Error::BadHeaderLength(ihl));
        }
        need(b.len(), p.header_len())?;
        total_fits(p.total_len(), p.header_len(), b.len())?;
        Ok(p)
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn version(&self) -> u8 {
        self.b()[field::VER_IHL] >> 4
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }
    pub fn dscp_ecn(&self) -> u8 {
        self.b()[field::DSCP_ECN]
    }
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.b(), field::LENGTH))
    }
    pub fn ident(&self) -> u16 {
        be16(self.b(), field::IDENT)
    }
    fn flags_frag(&self) -> u16 {
        be16(self.b(), field::FLG_OFF)
    }
    pub fn dont_fragment(&self) -> bool {
        self.flags_frag() & FLAG_DF != 0
    }
    pub fn more_fragments(&self) -> bool {
        self.flags_frag() & FLAG_MF != 0
    }
    /// Fragment offset in units of 8 bytes.
    pub fn frag_offset(&self) -> u16 {
        self.flags_frag() & FRAG_OFFSET_MASK
    }
    /// True for any fragment but the first (ICMP errors are only sent about first fragments).
    pub fn is_later_fragment(&self) -> bool {
        self.frag_offset() != 0
    }
    pub fn is_fragment(&self) -> bool {
        self.frag_offset() != 0 || self.more_fragments()
    }
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }
    pub fn protocol(&self) -> IpProtocol {
        IpProtocol::from(self.b()[field::PROTOCOL])
    }
    pub fn checksum(&self) -> u16 {
        be16(self.b(), field::CHECKSUM)
    }
    pub fn src(&self) -> Ipv4Addr {
        let a: [u8; 4] = self.b()[field::SRC_ADDR].try_into().unwrap_or_default();
        Ipv4Addr::from(a)
    }
    pub fn dst(&self) -> Ipv4Addr {
        let a: [u8; 4] = self.b()[field::DST_ADDR].try_into().unwrap_or_default();
        Ipv4Addr::from(a)
    }
    pub fn verify_checksum(&self) -> bool {
        checksum(&self.b()[..self.header_len()]) == 0
    }
    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }
    /// The packet up to its total length (without link padding).
    pub fn as_bytes(&self) -> &[u8] {
        &self.b()[..self.total_len()]
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Sets version 4 and the header length (a multiple of 4, 20..=60).
    pub fn set_version_and_header_len(&mut self, header_len: usize) {
        self.m()[field::VER_IHL] = 0x40 | (header_len / 4) as u8;
    }
    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.m()[field::DSCP_ECN] = v;
    }
    pub fn set_total_len(&mut self, v: u16) {
        self.m()[field::LENGTH].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_ident(&mut self, v: u16) {
        self.m()[field::IDENT].copy_from_slice(&v.to_be_bytes());
    }
    /// Sets the flags and fragment offset together (a whole packet: DF or not).
    pub fn set_flags_frag(&mut self, dont_fragment: bool, more_fragments: bool, offset: u16) {
        let v = if dont_fragment { FLAG_DF } else { 0 }
            | if more_fragments { FLAG_MF } else { 0 }
            | (offset & FRAG_OFFSET_MASK);
        self.m()[field::FLG_OFF].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_ttl(&mut self, v: u8) {
        self.m()[field::TTL] = v;
    }
    pub fn set_protocol(&mut self, v: IpProtocol) {
        self.m()[field::PROTOCOL] = v.into();
    }
    pub fn set_checksum(&mut self, v: u16) {
        self.m()[field::CHECKSUM].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_src(&mut self, a: Ipv4Addr) {
        self.m()[field::SRC_ADDR].copy_from_slice(&a.octets());
    }
    pub fn set_dst(&mut self, a: Ipv4Addr) {
        self.m()[field::DST_ADDR].copy_from_slice(&a.octets());
    }
    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum(&self.b()[..self.header_len()]);
        self.set_checksum(c);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (s, e) = (self.header_len(), self.total_len());
        &mut self.m()[s..e]
    }
}

/// The fields PON sets when it writes an IPv4 header (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: IpProtocol,
    pub ttl: u8,
    pub dont_fragment: bool,
    pub payload_len: usize,
}

impl Ipv4Repr {
    /// The outer header of an IP-in-IP packet (the agent legs) carrying
    /// `payload_len` bytes, as every PON component writes it: TTL 64, DF
    /// clear. One place, so the TA, the forwarder and the tests agree.
    pub fn ipip(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Self {
        Ipv4Repr {
            src,
            dst,
            protocol: IpProtocol::Ipip,
            ttl: 64,
            dont_fragment: false,
            payload_len,
        }
    }

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
        let mut p = Ipv4Packet::new_unchecked(&mut out[..IPV4_HEADER_LEN]);
        p.set_version_and_header_len(IPV4_HEADER_LEN);
        p.set_dscp_ecn(0);
        p.set_total_len(total as u16);
        // Identification 0: the kernel picks one for raw sends; PON never fragments.
        p.set_ident(0);
        p.set_flags_frag(self.dont_fragment, false, 0);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src(self.src);
        p.set_dst(self.dst);
        p.fill_checksum();
        Ok(())
    }
}

mod field6 {
    use core::ops::Range;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const SRC_ADDR: Range<usize> = 8..24;
    pub const DST_ADDR: Range<usize> = 24..40;
}

/// A view of an IPv6 packet's fixed header (extension headers are payload).
#[derive(Debug, Clone, Copy)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Validates the version and that the payload length fits the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Ipv6Packet { buffer };
        let b = p.buffer.as_ref();
        need(b.len(), IPV6_HEADER_LEN)?;
        if b[0] >> 4 != 6 {
            return Err(Error::NotIp(b[0] >> 4));
        }
        let total = IPV6_HEADER_LEN + usize::from(p.payload_len());
        total_fits(total, IPV6_HEADER_LEN, b.len())?;
        Ok(p)
    }
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn payload_len(&self) -> u16 {
        be16(self.b(), field6::PAYLOAD_LEN)
    }
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(self.b()[field6::NEXT_HEADER])
    }
    pub fn src(&self) -> Ipv6Addr {
        let a: [u8; 16] = self.b()[field6::SRC_ADDR].try_into().unwrap_or_default();
        Ipv6Addr::from(a)
    }
    pub fn dst(&self) -> Ipv6Addr {
        let a: [u8; 16] = self.b()[field6::DST_ADDR].try_into().unwrap_or_default();
        Ipv6Addr::from(a)
    }
    /// What follows the fixed header (extension headers included), up to
    /// the payload length the checks accepted.
    pub fn payload(&self) -> &[u8] {
        let end = IPV6_HEADER_LEN + usize::from(self.payload_len());
        self.b().get(IPV6_HEADER_LEN..end).unwrap_or_default()
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// A checked IPv4 or IPv6 packet carried through the overlay.
#[derive(Debug, Clone, Copy)]
pub enum InnerPacket<T: AsRef<[u8]>> {
    V4(Ipv4Packet<T>),
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> InnerPacket<T> {
    /// Accepts an IPv4 or IPv6 packet whose length fields fit the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), 1)?;
        match buffer.as_ref()[0] >> 4 {
            4 => Ipv4Packet::new_checked(buffer).map(InnerPacket::V4),
            6 => Ipv6Packet::new_checked(buffer).map(InnerPacket::V6),
            v => Err(Error::NotIp(v)),
        }
    }

    /// A view of a buffer that `new_checked` already accepted (e.g. the
    /// payload of a checked outer packet), without checking it again. On
    /// other buffers the accessors may panic.
    pub fn new_unchecked(buffer: T) -> Self {
        if buffer.as_ref().first().map(|b| b >> 4) == Some(4) {
            InnerPacket::V4(Ipv4Packet::new_unchecked(buffer))
        } else {
            InnerPacket::V6(Ipv6Packet { buffer })
        }
    }

    /// The IPv4 view, if this is IPv4 (already checked: no second validation).
    pub fn as_ipv4(&self) -> Option<&Ipv4Packet<T>> {
        match self {
            InnerPacket::V4(p) => Some(p),
            InnerPacket::V6(_) => None,
        }
    }
    pub fn src(&self) -> IpAddr {
        match self {
            InnerPacket::V4(p) => IpAddr::V4(p.src()),
            InnerPacket::V6(p) => IpAddr::V6(p.src()),
        }
    }
    pub fn dst(&self) -> IpAddr {
        match self {
            InnerPacket::V4(p) => IpAddr::V4(p.dst()),
            InnerPacket::V6(p) => IpAddr::V6(p.dst()),
        }
    }
    /// True when the sender forbids fragmentation (always true for IPv6).
    pub fn dont_fragment(&self) -> bool {
        match self {
            InnerPacket::V4(p) => p.dont_fragment(),
            InnerPacket::V6(_) => true,
        }
    }
    /// The whole buffer the packet was checked in (link padding included).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            InnerPacket::V4(p) => p.b(),
            InnerPacket::V6(p) => p.b(),
        }
    }
    /// The addresses and protocol of the packet, the bytes a flow is keyed
    /// on (IPv4: protocol, checksum, addresses; IPv6: next header, hop
    /// limit, addresses).
    pub fn flow_key(&self) -> &[u8] {
        match self {
            InnerPacket::V4(p) => &p.b()[field::PROTOCOL..field::DST_ADDR.end],
            InnerPacket::V6(p) => &p.b()[field6::NEXT_HEADER..field6::DST_ADDR.end],
        }
    }
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

/// An IP-in-IP packet as a raw socket returns it: an outer IPv4 header
/// (checksum verified, protocol 4, not a fragment) whose payload is a
/// checked [`InnerPacket`].
#[derive(Debug, Clone, Copy)]
pub struct IpipPacket<T: AsRef<[u8]>> {
    outer: Ipv4Packet<T>,
}

impl<T: AsRef<[u8]>> IpipPacket<T> {
    pub fn new_checked(buffer: T) -> Result<Self> {
        let outer = Ipv4Packet::new_checked(buffer)?;
        if !outer.verify_checksum() {
            return Err(Error::BadChecksum);
        }
        if outer.protocol() != IpProtocol::Ipip {
            return Err(Error::NotIpInIp(outer.protocol().into()));
        }
        if outer.is_fragment() {
            // The kernel reassembles before raw delivery; a fragment here is forged.
            return Err(Error::Fragment {
                offset: outer.frag_offset(),
                more: outer.more_fragments(),
            });
        }
        InnerPacket::new_checked(outer.payload())?;
        Ok(IpipPacket { outer })
    }
    pub fn outer(&self) -> &Ipv4Packet<T> {
        &self.outer
    }
    /// The inner packet, validated by `new_checked`: it is rebuilt without
    /// a second check.
    pub fn inner(&self) -> InnerPacket<&[u8]> {
        InnerPacket::new_unchecked(self.outer.payload())
    }
    pub fn into_inner(self) -> T {
        self.outer.into_inner()
    }
}

/// An ICMPv4 message type. Open: unnamed types still round-trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv4Message {
    EchoReply,
    DstUnreachable,
    Redirect,
    EchoRequest,
    TimeExceeded,
    ParamProblem,
    Timestamp,
    TimestampReply,
    InfoRequest,
    InfoReply,
    AddressMaskRequest,
    AddressMaskReply,
    Unknown(u8),
}

impl From<u8> for Icmpv4Message {
    fn from(v: u8) -> Self {
        match v {
            0 => Icmpv4Message::EchoReply,
            3 => Icmpv4Message::DstUnreachable,
            5 => Icmpv4Message::Redirect,
            8 => Icmpv4Message::EchoRequest,
            11 => Icmpv4Message::TimeExceeded,
            12 => Icmpv4Message::ParamProblem,
            13 => Icmpv4Message::Timestamp,
            14 => Icmpv4Message::TimestampReply,
            15 => Icmpv4Message::InfoRequest,
            16 => Icmpv4Message::InfoReply,
            17 => Icmpv4Message::AddressMaskRequest,
            18 => Icmpv4Message::AddressMaskReply,
            other => Icmpv4Message::Unknown(other),
        }
    }
}

impl From<Icmpv4Message> for u8 {
    fn from(m: Icmpv4Message) -> u8 {
        match m {
            Icmpv4Message::EchoReply => 0,
            Icmpv4Message::DstUnreachable => 3,
            Icmpv4Message::Redirect => 5,
            Icmpv4Message::EchoRequest => 8,
            Icmpv4Message::TimeExceeded => 11,
            Icmpv4Message::ParamProblem => 12,
            Icmpv4Message::Timestamp => 13,
            Icmpv4Message::TimestampReply => 14,
            Icmpv4Message::InfoRequest => 15,
            Icmpv4Message::InfoReply => 16,
            Icmpv4Message::AddressMaskRequest => 17,
            Icmpv4Message::AddressMaskReply => 18,
            Icmpv4Message::Unknown(other) => other,
        }
    }
}

impl Icmpv4Message {
    /// Queries and their replies, the only ICMP messages an error may be
    /// sent about (RFC 1122 3.2.2: never an error about an error).
    pub fn is_query(self) -> bool {
        matches!(
            self,
            Icmpv4Message::EchoReply
                | Icmpv4Message::EchoRequest
                | Icmpv4Message::Timestamp
                | Icmpv4Message::TimestampReply
                | Icmpv4Message::InfoRequest
                | Icmpv4Message::InfoReply
                | Icmpv4Message::AddressMaskRequest
                | Icmpv4Message::AddressMaskReply
        )
    }
}

/// Code of "destination unreachable: fragmentation needed and DF set".
pub const ICMP_CODE_FRAG_NEEDED: u8 = 4;

mod icmp_field {
    use core::ops::Range;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Range<usize> = 2..4;
    /// Unused in "fragmentation needed" (RFC 1191); identifier in echo.
    pub const UNUSED: Range<usize> = 4..6;
    /// Next-hop MTU in "fragmentation needed"; sequence number in echo.
    pub const MTU: Range<usize> = 6..8;
    pub const DATA: usize = 8;
}

/// Bytes of an ICMPv4 header: type, code, checksum and 4 type-specific bytes.
pub const ICMP_HEADER_LEN: usize = icmp_field::DATA;

/// A view of an ICMPv4 message (the IPv4 payload).
#[derive(Debug, Clone, Copy)]
pub struct Icmpv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Icmpv4Packet { buffer }
    }
    /// Validates that the fixed header fits.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), ICMP_HEADER_LEN)?;
        Ok(Icmpv4Packet { buffer })
    }
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn msg_type(&self) -> Icmpv4Message {
        Icmpv4Message::from(self.b()[icmp_field::TYPE])
    }
    pub fn msg_code(&self) -> u8 {
        self.b()[icmp_field::CODE]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.b(), icmp_field::CHECKSUM)
    }
    /// The next-hop MTU of a "fragmentation needed".
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.b(), icmp_field::MTU)
    }
    /// What follows the header (for errors: the quoted packet).
    pub fn data(&self) -> &[u8] {
        &self.b()[icmp_field::DATA..]
    }
    /// The checksum covers the whole message.
    pub fn verify_checksum(&self) -> bool {
        checksum(self.b()) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    pub fn set_msg_type(&mut self, v: Icmpv4Message) {
        self.buffer.as_mut()[icmp_field::TYPE] = v.into();
    }
    pub fn set_msg_code(&mut self, v: u8) {
        self.buffer.as_mut()[icmp_field::CODE] = v;
    }
    pub fn set_checksum(&mut self, v: u16) {
        self.buffer.as_mut()[icmp_field::CHECKSUM].copy_from_slice(&v.to_be_bytes());
    }
    /// Sets the "fragmentation needed" rest-of-header: unused zero, then the MTU.
    pub fn set_next_hop_mtu(&mut self, mtu: u16) {
        let b = self.buffer.as_mut();
        b[icmp_field::UNUSED].fill(0);
        b[icmp_field::MTU].copy_from_slice(&mtu.to_be_bytes());
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[icmp_field::DATA..]
    }
    /// Computes and stores the checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum(self.b());
        self.set_checksum(c);
    }
}

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
    if p.protocol() == IpProtocol::Icmp {
        // A truncated ICMP message is not a query: no error about it.
        return Icmpv4Packet::new_checked(p.payload()).is_ok_and(|m| m.msg_type().is_query());
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
        protocol: IpProtocol::Icmp,
        ttl: 64,
        dont_fragment: false,
        payload_len: icmp_len,
    }
    .emit(out)?;
    let mut icmp = Icmpv4Packet::new_unchecked(&mut out[IPV4_HEADER_LEN..total]);
    icmp.set_msg_type(Icmpv4Message::DstUnreachable);
    icmp.set_msg_code(ICMP_CODE_FRAG_NEEDED);
    icmp.set_next_hop_mtu(mtu);
    icmp.data_mut().copy_from_slice(&original.b()[..quote_len]);
    icmp.fill_checksum();
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
            protocol: IpProtocol::Udp,
            ttl: 64,
            dont_fragment: df,
            payload_len,
        }
        .emit(&mut v)
        .unwrap();
        v
    }

    fn ipip(inner: &[u8]) -> Vec<u8> {
        let mut outer = vec![0u8; IPV4_HEADER_LEN + inner.len()];
        Ipv4Repr::ipip(
            Ipv4Addr::new(198, 18, 1, 11),
            Ipv4Addr::new(198, 18, 1, 1),
            inner.len(),
        )
        .emit(&mut outer)
        .unwrap();
        outer[IPV4_HEADER_LEN..].copy_from_slice(inner);
        outer
    }

    #[test]
    fn protocol_numbers_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(IpProtocol::from(v)), v);
            assert_eq!(u8::from(Icmpv4Message::from(v)), v);
        }
        assert_eq!(IpProtocol::from(4), IpProtocol::Ipip);
        assert_eq!(IpProtocol::from(99), IpProtocol::Unknown(99));
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
    fn setters_then_fill_checksum() {
        let mut v = sample(4, false);
        let mut p = Ipv4Packet::new_checked(&mut v[..]).unwrap();
        p.set_ttl(3);
        p.set_dst(Ipv4Addr::new(10, 0, 0, 1));
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!((p.ttl(), p.dst()), (3, Ipv4Addr::new(10, 0, 0, 1)));
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
    fn ipip_parse_checks_protocol_fragments_and_inner() {
        let inner = sample(8, false);
        let outer = ipip(&inner);
        let p = IpipPacket::new_checked(&outer[..]).unwrap();
        assert_eq!(p.outer().src(), Ipv4Addr::new(198, 18, 1, 11));
        assert_eq!(p.inner().as_bytes(), &inner[..]);
        assert_eq!(
            p.inner().as_ipv4().unwrap().dst(),
            Ipv4Addr::new(198, 18, 2, 11)
        );

        let mut udp = outer.clone();
        let mut o = Ipv4Packet::new_unchecked(&mut udp[..]);
        o.set_protocol(IpProtocol::Udp);
        o.fill_checksum();
        assert_eq!(
            IpipPacket::new_checked(&udp[..]).unwrap_err(),
            Error::NotIpInIp(17)
        );

        let mut frag = outer.clone();
        let mut o = Ipv4Packet::new_unchecked(&mut frag[..]);
        o.set_flags_frag(false, true, 0);
        o.fill_checksum();
        assert_eq!(
            IpipPacket::new_checked(&frag[..]).unwrap_err(),
            Error::Fragment {
                offset: 0,
                more: true
            }
        );

        let mut bad = outer.clone();
        bad[IPV4_HEADER_LEN] = 0x75; // inner version 7
        assert_eq!(
            IpipPacket::new_checked(&bad[..]).unwrap_err(),
            Error::NotIp(7)
        );

        let mut sum = outer;
        sum[8] ^= 1; // TTL changed, checksum not
        assert_eq!(
            IpipPacket::new_checked(&sum[..]).unwrap_err(),
            Error::BadChecksum
        );
    }

    #[test]
    fn inner_ipv6_addresses() {
        let mut v = [0u8; 48];
        v[0] = 0x60;
        v[5] = 8;
        v[8 + 15] = 1;
        v[24 + 15] = 2;
        let p = InnerPacket::new_checked(&v[..]).unwrap();
        assert_eq!(p.src(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst(), "::2".parse::<IpAddr>().unwrap());
        assert!(p.dont_fragment());
        assert!(p.as_ipv4().is_none());
        v[5] = 9;
        assert!(InnerPacket::new_checked(&v[..]).is_err());
    }

    #[test]
    fn frag_needed_quotes_header_and_8_bytes() {
        let orig = sample(1400, true);
        let p = Ipv4Packet::new_checked(&orig[..]).unwrap();
        assert!(icmp_error_allowed(&p));
        let mut out = [0u8; FRAG_NEEDED_MAX_LEN];
        let n = emit_frag_needed(&p, 1400, Ipv4Addr::new(198, 18, 1, 1), &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 20 + 8);
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.dst(), p.src());
        assert_eq!(ip.protocol(), IpProtocol::Icmp);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), ICMP_CODE_FRAG_NEEDED);
        assert_eq!(icmp.next_hop_mtu(), 1400);
        assert_eq!(icmp.data(), &orig[..28]);
        // Never an error about an ICMP error.
        assert!(!icmp_error_allowed(&ip));
    }
}
