//! The PON header, carried over UDP between proxies, in front of a sealed
//! payload: the inner IP packet (data), a probe body (probe, probe reply),
//! a traffic report, nothing (keepalive), or a Noise handshake message.
//!
//! ```text
//!  0       1       2       3       4       5       6       7
//! +-------+-------+-------+-------+-------+-------+-------+-------+
//! |version| kind  | flags |hop lim|hop cnt|hop idx|   reserved    |
//! +-------+-------+-------+-------+-------+-------+-------+-------+
//! |            flow id            |        source proxy id        |
//! +-------------------------------+-------------------------------+
//! |  hop 0 proxy id  |  hop 1 ... (hop count x 4 bytes)            |
//! +-------------------------------+-------------------------------+
//! |  seal index   |          seal counter (64 bits)               |
//! +-------------------------------+-------------------------------+
//! |  link index   |          link counter (64 bits)               |  only when hop count > 1
//! +---------------------------------------------------------------+
//! |  payload (encrypted unless a handshake message)               |
//! +---------------------------------------------------------------+
//! |  seal tag (16 bytes; not on handshake messages)               |
//! |  link tag (16 bytes; only when hop count > 1)                 |
//! +---------------------------------------------------------------+
//! ```
//!
//! `hops` is the source route after the ingress proxy (the `source`);
//! `hop index` names the hop that must receive the packet now, so the last
//! hop is the egress proxy. `hop limit` is decremented at every forwarder
//! and stops loops that a stale route could build.
//!
//! Two layers protect a packet (see the `pon-tunnel` crate). The **seal**
//! is end to end, between the source and the last hop: the payload is
//! encrypted and the header's fixed fields are authenticated under the
//! session whose receiver index and counter are in the seal fields, so a
//! relay carries what it can neither read nor alter. The **link** layer
//! exists only on relayed routes: each leg's sender authenticates the whole
//! datagram with the session it shares with the next hop (link fields and
//! link tag), so every proxy drops what does not come from a neighbour
//! before doing any work. On a direct route the two are the same pair of
//! proxies and the seal alone does both jobs.

use crate::error::need;
use crate::{Error, Result};

pub const VERSION: u8 = 2;
/// Bytes before the hop list.
pub const FIXED_HEADER_LEN: usize = 16;
/// Most hops a source route may carry: the egress proxy and up to seven relays.
pub const MAX_HOPS: usize = 8;
/// Bytes of an AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a session index and counter.
pub const SESSION_FIELDS_LEN: usize = 12;
/// The longest header this version can produce.
pub const MAX_HEADER_LEN: usize = header_len(MAX_HOPS);
/// The longest trailer (seal and link tags).
pub const MAX_TRAILER_LEN: usize = 2 * TAG_LEN;
/// The longest additional data a seal authenticates (see [`Packet::seal_aad`]).
pub const MAX_SEAL_AAD_LEN: usize = FIXED_HEADER_LEN + 4 * MAX_HOPS + SESSION_FIELDS_LEN;
/// Hop limit ingress forwarders start with unless configured otherwise.
pub const DEFAULT_HOP_LIMIT: u8 = 16;

pub mod flags {
    /// Flags this version understands; others are ignored and cleared on emit.
    pub const KNOWN: u8 = 0;
}

/// Whether a route of `hops` hops carries the link layer.
#[inline]
pub const fn has_link(hops: usize) -> bool {
    hops > 1
}

/// Length of the header of a route of `hops` hops.
#[inline]
pub const fn header_len(hops: usize) -> usize {
    FIXED_HEADER_LEN
        + 4 * hops
        + SESSION_FIELDS_LEN
        + if has_link(hops) {
            SESSION_FIELDS_LEN
        } else {
            0
        }
}

/// Length of the tags after the payload.
#[inline]
pub const fn trailer_len(kind: Kind, hops: usize) -> usize {
    (if kind.is_sealed() { TAG_LEN } else { 0 }) + if has_link(hops) { TAG_LEN } else { 0 }
}

/// Bytes the proxy legs add to an inner packet (outer IPv4 + UDP + PON
/// header + tags) for a route of `hops` hops. Agents size their TUN MTU
/// from this.
pub const fn proxy_leg_overhead(hops: usize) -> usize {
    crate::ip::UDP_OVERHEAD + header_len(hops) + trailer_len(Kind::Data, hops)
}

/// What a PON packet carries. Closed: a kind this version does not know is
/// an error ([`Error::UnknownKind`]), never mistaken for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Data,
    Probe,
    ProbeReply,
    /// The first message of a Noise handshake.
    HandshakeInit,
    /// Its answer.
    HandshakeResponse,
    /// A sealed empty payload: the handshake's initiator shows it holds
    /// the new keys.
    Keepalive,
    /// A traffic report (`crate::report`): the egress tells the ingress
    /// what data it received from it.
    Report,
}

impl Kind {
    /// Whether the payload is sealed end to end. Handshake messages are
    /// protected by the Noise handshake itself.
    #[inline]
    pub const fn is_sealed(self) -> bool {
        !matches!(self, Kind::HandshakeInit | Kind::HandshakeResponse)
    }
}

impl TryFrom<u8> for Kind {
    type Error = Error;
    #[inline]
    fn try_from(v: u8) -> Result<Self> {
        match v {
            1 => Ok(Kind::Data),
            2 => Ok(Kind::Probe),
            3 => Ok(Kind::ProbeReply),
            4 => Ok(Kind::HandshakeInit),
            5 => Ok(Kind::HandshakeResponse),
            6 => Ok(Kind::Keepalive),
            7 => Ok(Kind::Report),
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
            Kind::HandshakeInit => 4,
            Kind::HandshakeResponse => 5,
            Kind::Keepalive => 6,
            Kind::Report => 7,
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
    /// The seal's session index after `hops` hops; its counter follows.
    pub const fn seal_index(hops: usize) -> Range<usize> {
        hop(hops).start..hop(hops).start + 4
    }
    pub const fn seal_counter(hops: usize) -> Range<usize> {
        seal_index(hops).end..seal_index(hops).end + 8
    }
    pub const fn link_index(hops: usize) -> Range<usize> {
        seal_counter(hops).end..seal_counter(hops).end + 4
    }
    pub const fn link_counter(hops: usize) -> Range<usize> {
        link_index(hops).end..link_index(hops).end + 8
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
    /// Validates version, kind, hop count, hop index and that header and
    /// trailer fit. The payload is not looked at: it is ciphertext until
    /// the seal is opened.
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
        need(p.b().len(), p.header_len() + p.trailer_len())?;
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
    #[inline]
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
    /// The proxy that sent the packet on its current leg: the source, or
    /// the hop before the current one.
    #[inline]
    pub fn previous_hop(&self) -> u32 {
        match self.hop_index() {
            0 => self.source(),
            i => self.hop(i - 1),
        }
    }
    /// The hop after the current one, or `None` at the egress proxy.
    #[inline]
    pub fn next_hop(&self) -> Option<u32> {
        let next = self.hop_index() + 1;
        (next < self.hop_count()).then(|| self.hop(next))
    }
    /// The proxy the seal is for: the last hop.
    #[inline]
    pub fn egress(&self) -> u32 {
        self.hop(self.hop_count() - 1)
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
        header_len(self.hop_count())
    }
    #[inline]
    pub fn trailer_len(&self) -> usize {
        trailer_len(self.kind, self.hop_count())
    }
    /// Whether this packet carries the link layer (its route is relayed).
    #[inline]
    pub fn has_link(&self) -> bool {
        has_link(self.hop_count())
    }
    #[inline]
    pub fn seal_index(&self) -> u32 {
        be32(self.b(), field::seal_index(self.hop_count()))
    }
    #[inline]
    pub fn seal_counter(&self) -> u64 {
        be64(self.b(), field::seal_counter(self.hop_count()))
    }
    /// The link fields, when the route is relayed.
    #[inline]
    pub fn link(&self) -> Option<(u32, u64)> {
        let n = self.hop_count();
        self.has_link().then(|| {
            (
                be32(self.b(), field::link_index(n)),
                be64(self.b(), field::link_counter(n)),
            )
        })
    }
    /// The bytes the link tag authenticates (all before it) and the tag.
    #[inline]
    pub fn link_tagged(&self) -> Option<(&[u8], &[u8; TAG_LEN])> {
        if !self.has_link() {
            return None;
        }
        let (body, tag) = self.b().split_at(self.b().len() - TAG_LEN);
        Some((body, tag.try_into().ok()?))
    }
    /// The header's fields a seal authenticates: all but the hop limit and
    /// hop index (relays change them) and the link fields (each leg's own),
    /// copied into `out` with those two bytes zeroed.
    #[inline]
    pub fn seal_aad<'o>(&self, out: &'o mut [u8; MAX_SEAL_AAD_LEN]) -> &'o [u8] {
        let len = field::seal_counter(self.hop_count()).end;
        out[..len].copy_from_slice(&self.b()[..len]);
        out[field::HOP_LIMIT] = 0;
        out[field::HOP_INDEX] = 0;
        &out[..len]
    }
    /// The payload between header and trailer (ciphertext while sealed).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let end = self.b().len() - self.trailer_len();
        &self.b()[self.header_len()..end]
    }
    /// The range of the sealed payload and its seal tag, which
    /// [`Packet::payload`] excludes.
    #[inline]
    pub fn sealed_range(&self) -> core::ops::Range<usize> {
        let link = if self.has_link() { TAG_LEN } else { 0 };
        self.header_len()..self.b().len() - link
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
    #[inline]
    pub fn set_seal(&mut self, index: u32, counter: u64) {
        let n = self.hop_count();
        self.m()[field::seal_index(n)].copy_from_slice(&index.to_be_bytes());
        self.m()[field::seal_counter(n)].copy_from_slice(&counter.to_be_bytes());
    }
    /// Sets the link fields; ignored on a direct route, which has none.
    #[inline]
    pub fn set_link(&mut self, index: u32, counter: u64) {
        let n = self.hop_count();
        if has_link(n) {
            self.m()[field::link_index(n)].copy_from_slice(&index.to_be_bytes());
            self.m()[field::link_counter(n)].copy_from_slice(&counter.to_be_bytes());
        }
    }
    /// The bytes a link tag covers and the tag's slot, for writing it.
    #[inline]
    pub fn link_tag_mut(&mut self) -> Option<(&[u8], &mut [u8])> {
        if !self.has_link() {
            return None;
        }
        let len = self.b().len();
        let (body, tag) = self.m().split_at_mut(len - TAG_LEN);
        Some((&*body, tag))
    }
    /// The sealed payload with its seal tag, for opening or sealing in place.
    #[inline]
    pub fn sealed_mut(&mut self) -> &mut [u8] {
        let r = self.sealed_range();
        &mut self.m()[r]
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let end = self.b().len() - self.trailer_len();
        &mut self.m()[start..end]
    }
}

/// Callers pass ranges inside a checked header; inlined because it sits
/// on every forwarded packet's path.
#[inline]
fn be32(b: &[u8], r: core::ops::Range<usize>) -> u32 {
    u32::from_be_bytes([b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3]])
}

#[inline]
fn be64(b: &[u8], r: core::ops::Range<usize>) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[r]);
    u64::from_be_bytes(a)
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

/// The owned form of a PON header. The seal and link fields are the
/// crypto step's: `emit` zeroes them, and leaves the trailer to the caller
/// (a packet is `wire_len(payload)` bytes long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub kind: Kind,
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
            hop_limit: p.hop_limit(),
            hop_index: p.hop_index() as u8,
            flow_id: p.flow_id(),
            source: p.source(),
            hops: p.hops(),
        })
    }

    #[inline]
    pub fn header_len(&self) -> usize {
        header_len(self.hops.len())
    }

    #[inline]
    pub fn trailer_len(&self) -> usize {
        trailer_len(self.kind, self.hops.len())
    }

    /// Length of a whole packet with a payload of `payload` bytes.
    #[inline]
    pub fn wire_len(&self, payload: usize) -> usize {
        self.header_len() + payload + self.trailer_len()
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
        // The count goes first: the other setters find the hop list and
        // the session fields through it.
        out[field::VERSION] = VERSION;
        out[field::FLAGS] = 0;
        out[field::HOP_COUNT] = self.hops.len() as u8;
        out[field::RESERVED].fill(0);
        out[field::hop(self.hops.len()).start..len].fill(0);
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: Kind, hops: &[u32], index: u8, payload: usize) -> Vec<u8> {
        let repr = Repr {
            kind,
            hop_limit: 4,
            hop_index: index,
            flow_id: 7,
            source: 1,
            hops: Hops::new(hops).unwrap(),
        };
        let mut v = vec![0xaa; repr.wire_len(payload)];
        repr.emit(&mut v).unwrap();
        v
    }

    #[test]
    fn parse_emit_round_trip() {
        let mut v = packet(Kind::Data, &[3, 2], 0, 24);
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_seal(9, 1 << 40);
        p.set_link(11, 5);
        let r = Repr::parse(&p).unwrap();
        assert_eq!(r.hops.as_slice(), &[3, 2]);
        assert_eq!((p.current_hop(), p.previous_hop()), (3, 1));
        assert_eq!((p.next_hop(), p.egress()), (Some(2), 2));
        assert_eq!((p.seal_index(), p.seal_counter()), (9, 1 << 40));
        assert_eq!(p.link(), Some((11, 5)));
        assert_eq!(p.payload(), &[0xaa; 24]);
        assert_eq!(p.sealed_range().len(), 24 + TAG_LEN);
        assert_eq!(p.link_tagged().unwrap().0.len(), v.len() - TAG_LEN);
    }

    #[test]
    fn direct_routes_have_no_link_layer() {
        let v = packet(Kind::Data, &[2], 0, 10);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.link(), None);
        assert!(p.link_tagged().is_none());
        assert_eq!(v.len(), 16 + 4 + 12 + 10 + 16);
        let h = packet(Kind::HandshakeInit, &[2], 0, 10);
        assert_eq!(h.len(), 16 + 4 + 12 + 10, "no seal tag on handshakes");
    }

    #[test]
    fn the_seal_covers_fixed_fields_only() {
        let mut v = packet(Kind::Data, &[3, 2], 0, 4);
        let mut aad = [0u8; MAX_SEAL_AAD_LEN];
        let before = Packet::new_checked(&v[..])
            .unwrap()
            .seal_aad(&mut aad)
            .to_vec();
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.advance().unwrap();
        p.set_link(1, 2);
        assert_eq!(
            p.seal_aad(&mut aad),
            &before[..],
            "relays' changes are outside it"
        );
        p.set_flow_id(8);
        assert_ne!(p.seal_aad(&mut aad), &before[..]);
    }

    #[test]
    fn advance_moves_to_next_hop_and_spends_limit() {
        let mut v = packet(Kind::Data, &[3, 2], 0, 0);
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        assert_eq!(p.advance(), Some(2));
        assert_eq!(p.hop_index(), 1);
        assert_eq!(p.hop_limit(), 3);
        assert_eq!(p.previous_hop(), 3);
        assert_eq!(p.advance(), None, "egress has no next hop");
    }

    #[test]
    fn hop_limit_stops_loops() {
        let mut v = packet(Kind::Data, &[1, 2, 1, 2, 1, 2, 1, 2], 0, 0);
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        assert!(p.has_repeated_hop());
        let mut moves = 0;
        while p.advance().is_some() {
            moves += 1;
        }
        assert_eq!(moves, 3, "hop limit 4 allows three forwards");
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = packet(Kind::Data, &[2], 0, 0);
        // One byte of a good packet changed, and what the parser says of it.
        for (at, byte, err) in [
            (0, 9, Error::BadVersion(9)),
            (1, 42, Error::UnknownKind(42)),
            (4, 0, Error::BadHopCount(0)),
            (4, 9, Error::BadHopCount(9)),
            (5, 1, Error::HopIndexOutOfRange { index: 1, count: 1 }),
        ] {
            let mut v = good.clone();
            v[at] = byte;
            assert_eq!(Packet::new_checked(&v[..]).unwrap_err(), err, "byte {at}");
        }
        let mut v = good.clone();
        v[4] = 8; // hop list runs past the end
        assert!(matches!(
            Packet::new_checked(&v[..]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Packet::new_checked(&good[..good.len() - 1]),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn overhead_accounts_for_both_layers() {
        assert_eq!(proxy_leg_overhead(1), 28 + 16 + 4 + 12 + 16);
        assert_eq!(proxy_leg_overhead(2), 28 + 16 + 8 + 24 + 32);
        assert_eq!(MAX_HEADER_LEN, 16 + 32 + 24);
    }
}
