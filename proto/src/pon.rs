//! The PON header, carried over UDP between proxies, in front of the inner IP
//! packet (data) or a probe body (probe, probe reply).
//!
//! ```text
//!  0       1       2       3       4       5       6       7
//! +-------+-------+-------+-------+-------+-------+-------+-------+
//! |version| kind  | flags |hop lim|hop cnt|hop idx|   reserved    |
//! +-------+-------+-------+-------+-------+-------+-------+-------+
//! |            flow id            |        source proxy id        |
//! +-------------------------------+-------------------------------+
//! |  hop 0 proxy id  |  hop 1 ... (hop count x 4 bytes)            |
//! +---------------------------------------------------------------+
//! |  authentication tag (16 bytes, present when flags & AUTH)     |
//! +---------------------------------------------------------------+
//! |  payload                                                      |
//! ```
//!
//! `hops` is the source route after the ingress proxy; `hop index` names the
//! hop that must receive the packet now, so the last hop is the egress proxy.
//! `hop limit` is decremented at every forwarder and stops loops that a
//! forged or stale route could build.

use crate::error::need;
use crate::ip::InnerPacket;
use crate::{Error, Result};

pub const VERSION: u8 = 1;
/// Bytes before the hop list.
pub const FIXED_HEADER_LEN: usize = 16;
/// Most hops a source route may carry: the egress proxy and up to seven relays.
pub const MAX_HOPS: usize = 8;
pub const AUTH_TAG_LEN: usize = 16;
/// The longest header this version can produce.
pub const MAX_HEADER_LEN: usize = FIXED_HEADER_LEN + 4 * MAX_HOPS + AUTH_TAG_LEN;
/// Hop limit ingress forwarders start with unless configured otherwise.
pub const DEFAULT_HOP_LIMIT: u8 = 16;

pub mod flags {
    /// An authentication tag follows the hop list.
    pub const AUTH: u8 = 0x01;
    /// Flags this version understands; others are ignored and cleared on emit.
    pub const KNOWN: u8 = AUTH;
}

/// Length of a header with `hops` hops and optionally an authentication tag.
pub const fn header_len(hops: usize, auth: bool) -> usize {
    FIXED_HEADER_LEN + 4 * hops + if auth { AUTH_TAG_LEN } else { 0 }
}

/// Bytes the proxy legs add to an inner packet (outer IPv4 + UDP + PON
/// header) for a route of `hops` hops, with room kept for an authentication
/// tag. Agents size their TUN MTU from this.
pub const fn proxy_leg_overhead(hops: usize) -> usize {
    crate::ip::UDP_OVERHEAD + header_len(hops, true)
}

/// What a PON packet carries. Closed: a kind this version does not know is
/// an error ([`Error::UnknownKind`]), never mistaken for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Data,
    Probe,
    ProbeReply,
}

impl TryFrom<u8> for Kind {
    type Error = Error;
    #[inline]
    fn try_from(v: u8) -> Result<Self> {
        match v {
            1 => Ok(Kind::Data),
            2 => Ok(Kind::Probe),
            3 => Ok(Kind::ProbeReply),
            other => Err(Error::UnknownKind(other)),
        }
    }
}

impl From<Kind> for u8 {
    fn from(k: Kind) -> u8 {
        match k {
            Kind::Data => 1,
            Kind::Probe => 2,
            Kind::ProbeReply => 3,
        }
    }
}

mod field {
    use core::ops::Range;
    pub const VERSION: usize = 0;
    pub const KIND: usize = 1;
    pub const FLAGS: usize = 2;
    pub const HOP_LIMIT: usize = 3;
    pub const HOP_COUNT: usize = 4;
    pub const HOP_INDEX: usize = 5;
    pub const RESERVED: Range<usize> = 6..8;
    pub const FLOW: Range<usize> = 8..12;
    pub const SOURCE: Range<usize> = 12..16;
    /// Hop `i` of the source route.
    pub const fn hop(i: usize) -> Range<usize> {
        super::FIXED_HEADER_LEN + 4 * i..super::FIXED_HEADER_LEN + 4 * (i + 1)
    }
    /// The authentication tag after `hops` hops.
    pub const fn auth_tag(hops: usize) -> Range<usize> {
        hop(hops).start..hop(hops).start + super::AUTH_TAG_LEN
    }
}

/// A zero-copy view of a PON packet. After `new_checked` every accessor is
/// infallible; the kind is decoded once there and kept, so no accessor has
/// to guess at an unknown one.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
    kind: Kind,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Validates version, kind, hop count, hop index and lengths; for data
    /// packets also that the payload is an IPv4 or IPv6 packet.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        need(b.len(), FIXED_HEADER_LEN)?;
        if b[field::VERSION] != VERSION {
            return Err(Error::BadVersion(b[field::VERSION]));
        }
        let kind = Kind::try_from(b[field::KIND])?;
        let count = b[field::HOP_COUNT];
        if count == 0 || usize::from(count) > MAX_HOPS {
            return Err(Error::BadHopCount(count));
        }
        let index = b[field::HOP_INDEX];
        if index >= count {
            return Err(Error::HopIndexOutOfRange { index, count });
        }
        let p = Packet { buffer, kind };
        need(p.b().len(), p.header_len())?;
        if kind == Kind::Data {
            InnerPacket::new_checked(p.payload())?;
        }
        Ok(p)
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn version(&self) -> u8 {
        self.b()[field::VERSION]
    }
    #[inline]
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }
    pub fn has_auth_tag(&self) -> bool {
        self.flags() & flags::AUTH != 0
    }
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.b()[field::HOP_LIMIT]
    }
    #[inline]
    pub fn hop_count(&self) -> usize {
        usize::from(self.b()[field::HOP_COUNT])
    }
    #[inline]
    pub fn hop_index(&self) -> usize {
        usize::from(self.b()[field::HOP_INDEX])
    }
    pub fn flow_id(&self) -> u32 {
        be32(self.b(), field::FLOW)
    }
    pub fn source(&self) -> u32 {
        be32(self.b(), field::SOURCE)
    }
    /// Proxy id of hop `i`; `i` must be below `hop_count()`.
    #[inline]
    pub fn hop(&self, i: usize) -> u32 {
        debug_assert!(i < self.hop_count());
        be32(self.b(), field::hop(i))
    }
    /// The hop that must handle the packet now.
    #[inline]
    pub fn current_hop(&self) -> u32 {
        self.hop(self.hop_index())
    }
    /// The hop after the current one, or `None` at the egress proxy.
    #[inline]
    pub fn next_hop(&self) -> Option<u32> {
        let next = self.hop_index() + 1;
        (next < self.hop_count()).then(|| self.hop(next))
    }
    /// Whether a proxy appears twice in the source route: such a route
    /// loops (`[P, Q, P, Q, ...]` makes each proxy send the packet again
    /// and again) and no proxy ever builds one.
    pub fn has_repeated_hop(&self) -> bool {
        let n = self.hop_count();
        (1..n).any(|i| (0..i).any(|j| self.hop(i) == self.hop(j)))
    }

    /// The whole source route.
    pub fn hops(&self) -> Hops {
        let mut hops = Hops {
            ids: [0; MAX_HOPS],
            len: self.hop_count() as u8,
        };
        for (i, slot) in hops.ids[..self.hop_count()].iter_mut().enumerate() {
            *slot = self.hop(i);
        }
        hops
    }
    #[inline]
    pub fn header_len(&self) -> usize {
        header_len(self.hop_count(), self.has_auth_tag())
    }
    pub fn auth_tag(&self) -> Option<&[u8]> {
        self.has_auth_tag()
            .then(|| &self.b()[field::auth_tag(self.hop_count())])
    }
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..]
    }
    /// The inner packet of a data packet, checked by `new_checked` (so not
    /// checked again here); `None` for probes.
    #[inline]
    pub fn inner(&self) -> Option<InnerPacket<&[u8]>> {
        if self.kind != Kind::Data {
            return None;
        }
        Some(InnerPacket::new_unchecked(self.payload()))
    }
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    #[inline]
    fn m(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Moves the packet on to the next hop: advances the hop index and
    /// spends one unit of hop limit. Returns the next hop's id, or `None`
    /// (packet unchanged) when this is the last hop or the limit is spent.
    #[inline]
    pub fn advance(&mut self) -> Option<u32> {
        let next = self.next_hop()?;
        let limit = self.hop_limit();
        if limit <= 1 {
            return None;
        }
        let index = self.hop_index() as u8;
        self.set_hop_index(index + 1);
        self.set_hop_limit(limit - 1);
        Some(next)
    }
    pub fn set_kind(&mut self, k: Kind) {
        self.kind = k;
        self.m()[field::KIND] = k.into();
    }
    #[inline]
    pub fn set_hop_limit(&mut self, v: u8) {
        self.m()[field::HOP_LIMIT] = v;
    }
    /// The hop index must stay below the hop count.
    #[inline]
    pub fn set_hop_index(&mut self, v: u8) {
        debug_assert!(usize::from(v) < self.hop_count());
        self.m()[field::HOP_INDEX] = v;
    }
    pub fn set_flow_id(&mut self, v: u32) {
        self.m()[field::FLOW].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_source(&mut self, v: u32) {
        self.m()[field::SOURCE].copy_from_slice(&v.to_be_bytes());
    }
    /// Rewrites hop `i` (below `hop_count()`).
    pub fn set_hop(&mut self, i: usize, id: u32) {
        debug_assert!(i < self.hop_count());
        self.m()[field::hop(i)].copy_from_slice(&id.to_be_bytes());
    }
    pub fn auth_tag_mut(&mut self) -> Option<&mut [u8]> {
        if !self.has_auth_tag() {
            return None;
        }
        let r = field::auth_tag(self.hop_count());
        Some(&mut self.m()[r])
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.m()[start..]
    }
}

/// Callers pass ranges inside a checked header; inlined because it sits
/// on every forwarded packet's path.
#[inline]
fn be32(b: &[u8], r: core::ops::Range<usize>) -> u32 {
    u32::from_be_bytes([b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3]])
}

/// On the local link a route travels as a sequence of ids; decoding checks
/// it as `Hops::new` does (one to `MAX_HOPS` hops).
impl serde::Serialize for Hops {
    fn serialize<S: serde::Serializer>(&self, s: S) -> core::result::Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Hops {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> core::result::Result<Self, D::Error> {
        let ids: Vec<u32> = Vec::deserialize(d)?;
        Hops::new(&ids).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "a route has 1 to {MAX_HOPS} hops, not {}",
                ids.len()
            ))
        })
    }
}

/// A source route: up to `MAX_HOPS` proxy ids, stored inline so that routes
/// can be copied on the hot path without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hops {
    ids: [u32; MAX_HOPS],
    len: u8,
}

impl Hops {
    /// A route of the given hops; `None` if empty or longer than `MAX_HOPS`.
    pub fn new(ids: &[u32]) -> Option<Self> {
        if ids.is_empty() || ids.len() > MAX_HOPS {
            return None;
        }
        let mut h = Hops {
            ids: [0; MAX_HOPS],
            len: ids.len() as u8,
        };
        h.ids[..ids.len()].copy_from_slice(ids);
        Some(h)
    }
    pub fn as_slice(&self) -> &[u32] {
        &self.ids[..usize::from(self.len)]
    }
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The egress proxy: the route's last hop.
    pub fn last(&self) -> u32 {
        self.ids[usize::from(self.len) - 1]
    }
}

impl core::fmt::Debug for Hops {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// The owned form of a PON header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub kind: Kind,
    /// Whether room for an authentication tag is reserved (zeroed on emit).
    pub auth: bool,
    pub hop_limit: u8,
    pub hop_index: u8,
    pub flow_id: u32,
    pub source: u32,
    pub hops: Hops,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Self> {
        Ok(Repr {
            kind: p.kind(),
            auth: p.has_auth_tag(),
            hop_limit: p.hop_limit(),
            hop_index: p.hop_index() as u8,
            flow_id: p.flow_id(),
            source: p.source(),
            hops: p.hops(),
        })
    }

    #[inline]
    pub fn header_len(&self) -> usize {
        header_len(self.hops.len(), self.auth)
    }

    /// Writes the header into `out[..self.header_len()]`, leaving the payload
    /// bytes after it untouched.
    pub fn emit(&self, out: &mut [u8]) -> Result<()> {
        let len = self.header_len();
        if out.len() < len {
            return Err(Error::BufferTooSmall {
                needed: len,
                have: out.len(),
            });
        }
        if usize::from(self.hop_index) >= self.hops.len() {
            return Err(Error::HopIndexOutOfRange {
                index: self.hop_index,
                count: self.hops.len() as u8,
            });
        }
        // The count and flags go first: the other setters find the hop
        // list and the tag through them.
        out[field::VERSION] = VERSION;
        out[field::FLAGS] = if self.auth { flags::AUTH } else { 0 };
        out[field::HOP_COUNT] = self.hops.len() as u8;
        out[field::RESERVED].fill(0);
        let mut p = Packet {
            buffer: out,
            kind: self.kind,
        };
        p.set_kind(self.kind);
        p.set_hop_limit(self.hop_limit);
        p.set_hop_index(self.hop_index);
        p.set_flow_id(self.flow_id);
        p.set_source(self.source);
        for (i, id) in self.hops.as_slice().iter().enumerate() {
            p.set_hop(i, *id);
        }
        if let Some(tag) = p.auth_tag_mut() {
            tag.fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ip::{Ipv4Repr, IPV4_HEADER_LEN};
    use core::net::Ipv4Addr;

    fn data_packet(hops: &[u32], index: u8, auth: bool) -> Vec<u8> {
        let repr = Repr {
            kind: Kind::Data,
            auth,
            hop_limit: 4,
            hop_index: index,
            flow_id: 7,
            source: 1,
            hops: Hops::new(hops).unwrap(),
        };
        let inner_len = IPV4_HEADER_LEN + 4;
        let mut v = vec![0u8; repr.header_len() + inner_len];
        repr.emit(&mut v).unwrap();
        Ipv4Repr {
            src: Ipv4Addr::new(198, 18, 1, 11),
            dst: Ipv4Addr::new(198, 18, 2, 11),
            protocol: crate::ip::IpProtocol::Udp,
            ttl: 64,
            dont_fragment: false,
            payload_len: 4,
        }
        .emit(&mut v[repr.header_len()..])
        .unwrap();
        v
    }

    #[test]
    fn parse_emit_round_trip() {
        let v = data_packet(&[3, 2], 0, true);
        let p = Packet::new_checked(&v[..]).unwrap();
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.hops.as_slice(), &[3, 2]);
        assert_eq!(p.current_hop(), 3);
        assert_eq!(p.next_hop(), Some(2));
        assert_eq!(p.auth_tag().unwrap(), &[0u8; 16]);
        assert_eq!(p.payload().len(), 24);
    }

    #[test]
    fn advance_moves_to_next_hop_and_spends_limit() {
        let mut v = data_packet(&[3, 2], 0, false);
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        assert_eq!(p.advance(), Some(2));
        assert_eq!(p.hop_index(), 1);
        assert_eq!(p.hop_limit(), 3);
        assert_eq!(p.advance(), None, "egress has no next hop");
    }

    #[test]
    fn hop_limit_stops_loops() {
        let mut v = data_packet(&[1, 2, 1, 2, 1, 2, 1, 2], 0, false);
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        let mut moves = 0;
        while p.advance().is_some() {
            moves += 1;
        }
        assert_eq!(moves, 3, "hop limit 4 allows three forwards");
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = data_packet(&[2], 0, false);
        // One byte of a good packet changed, and what the parser says of it.
        for (at, byte, err) in [
            (0, 9, Error::BadVersion(9)),
            (1, 42, Error::UnknownKind(42)),
            (4, 0, Error::BadHopCount(0)),
            (4, 9, Error::BadHopCount(9)),
            (5, 1, Error::HopIndexOutOfRange { index: 1, count: 1 }),
            (20, 0x35, Error::NotIp(3)), // inner version 3
        ] {
            let mut v = good.clone();
            v[at] = byte;
            assert_eq!(Packet::new_checked(&v[..]).unwrap_err(), err, "byte {at}");
        }
        let mut v = good.clone();
        v[4] = 8; // hop list runs past the end
        assert!(matches!(
            Packet::new_checked(&v[..20]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Packet::new_checked(&good[..10]),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn probe_payload_need_not_be_ip() {
        let repr = Repr {
            kind: Kind::Probe,
            auth: false,
            hop_limit: 1,
            hop_index: 0,
            flow_id: 0,
            source: 1,
            hops: Hops::new(&[2]).unwrap(),
        };
        let mut v = vec![0xffu8; repr.header_len() + 5];
        repr.emit(&mut v).unwrap();
        assert_eq!(Packet::new_checked(&v[..]).unwrap().kind(), Kind::Probe);
    }

    #[test]
    fn overhead_accounts_for_tag_room() {
        assert_eq!(proxy_leg_overhead(1), 28 + 16 + 4 + 16);
        assert_eq!(MAX_HEADER_LEN, 64);
    }
}
