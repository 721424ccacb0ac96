//! Keys of the site LAN: between a proxy and each agent of its site (TA,
//! RA), and between the processes of a split proxy (its local link), from the two static X25519 keys the CU vouches for (or a static
//! configuration names, as WireGuard peers are named). No handshake: the
//! LAN is one hop, both ends know each other's static key, and a restart
//! must not wait for a round trip.
//!
//! - the pair's secret is the X25519 Diffie-Hellman of the two static keys
//!   (x25519-dalek; a non-contributory result is refused);
//! - each datagram's key is HKDF-SHA256 (ring) of that secret, bound to the
//!   channel (uplink TA → forwarder, downlink forwarder → RA, steering
//!   proxy → TA), both public keys and the sender's epoch, so each
//!   direction and each run of a sender has its own AES-256-GCM key and a
//!   counter restarting at 0 after a restart never reuses a nonce;
//! - the receiver keeps the newest epoch that authenticated and a replay
//!   window (`ReplayWindow`) over its counters; an older epoch is refused.
//!
//! The datagram layout is `pon_proto::lan`.

use crate::replay::ReplayWindow;
use pon_proto::lan::{self, Repr, HEADER_LEN, TAG_LEN};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Which leg of the site LAN a key protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// TA → forwarder.
    Uplink,
    /// Forwarder → RA.
    Downlink,
    /// Proxy → TA steering messages.
    Steering,
    /// A split proxy's local link, from the lower part (forwarder before
    /// monitor before router: the `for_proxy` side) to the higher one.
    LocalDown,
    /// A split proxy's local link, from the higher part to the lower one.
    LocalUp,
}

impl Channel {
    fn label(self) -> &'static [u8] {
        match self {
            Channel::Uplink => b"pon-lan-v1 uplink",
            Channel::Downlink => b"pon-lan-v1 downlink",
            Channel::Steering => b"pon-lan-v1 steering",
            Channel::LocalDown => b"pon-local-v1 down",
            Channel::LocalUp => b"pon-local-v1 up",
        }
    }
}

/// Why a LAN datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LanError {
    #[error("malformed: {0}")]
    Malformed(pon_proto::Error),
    #[error("tag does not authenticate")]
    BadTag,
    #[error("counter already seen or too old")]
    Replayed,
    #[error("epoch older than the sender's current one")]
    StaleEpoch,
}

impl LanError {
    /// The `reason` label of its drop counter.
    pub fn label(self) -> &'static str {
        match self {
            LanError::Malformed(_) => "malformed",
            LanError::BadTag => "bad_tag",
            LanError::Replayed => "replayed",
            LanError::StaleEpoch => "stale_epoch",
        }
    }
}

/// The X25519 public key of a static secret.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

/// The secret a proxy and one of its agents share.
#[derive(Clone)]
pub struct PairKey {
    shared: [u8; 32],
    proxy: [u8; 32],
    agent: [u8; 32],
}

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKey").finish_non_exhaustive()
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl PairKey {
    /// The proxy's side: its secret and the agent's public key. `None` if
    /// the agent's key is a low-order point (no shared secret).
    pub fn for_proxy(secret: &[u8; 32], agent: &[u8; 32]) -> Option<Self> {
        Self::new(secret, public_key(secret), *agent, true)
    }

    /// An agent's side: its secret and its proxy's public key.
    pub fn for_agent(secret: &[u8; 32], proxy: &[u8; 32]) -> Option<Self> {
        Self::new(secret, *proxy, public_key(secret), false)
    }

    fn new(secret: &[u8; 32], proxy: [u8; 32], agent: [u8; 32], is_proxy: bool) -> Option<Self> {
        let theirs = if is_proxy { agent } else { proxy };
        let s = x25519_dalek::StaticSecret::from(*secret)
            .diffie_hellman(&x25519_dalek::PublicKey::from(theirs));
        if !s.was_contributory() {
            return None;
        }
        Some(PairKey {
            shared: s.to_bytes(),
            proxy,
            agent,
        })
    }

    /// The peer's public key as this side sees it (the agent's for a proxy).
    pub fn agent_key(&self) -> &[u8; 32] {
        &self.agent
    }

    fn key(&self, channel: Channel, epoch: u64) -> LessSafeKey {
        let epoch = epoch.to_be_bytes();
        let info = [
            channel.label(),
            &self.proxy[..],
            &self.agent[..],
            &epoch[..],
        ];
        let mut raw = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"pon site lan")
            .extract(&self.shared)
            .expand(&info, Len(32))
            .and_then(|okm| okm.fill(&mut raw))
            .expect("32 bytes are within HKDF-SHA256's output limit");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).expect("32-byte AES-256 key"))
    }

    /// The sending end of `channel` for this run (`epoch`).
    pub fn sender(&self, channel: Channel, epoch: u64, encrypt: bool) -> LanSender {
        LanSender {
            epoch,
            encrypt,
            key: self.key(channel, epoch),
            next: AtomicU64::new(0),
        }
    }

    /// The receiving end of `channel`.
    pub fn receiver(&self, channel: Channel) -> LanReceiver {
        LanReceiver {
            pair: self.clone(),
            channel,
            state: Mutex::new(None),
        }
    }
}

/// Seals datagrams of one channel and run; usable from any thread.
pub struct LanSender {
    epoch: u64,
    encrypt: bool,
    key: LessSafeKey,
    next: AtomicU64,
}

impl LanSender {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `buf[HEADER_LEN..HEADER_LEN + len]` holds the payload and
    /// `buf` has `TAG_LEN` bytes after it: writes the header in front and
    /// the tag after (encrypting the payload if so configured). Returns the
    /// datagram's length, or `None` if `buf` is too short or the counter
    /// is spent.
    #[inline]
    pub fn seal(&self, buf: &mut [u8], len: usize) -> Option<usize> {
        let end = HEADER_LEN.checked_add(len)?;
        let total = end.checked_add(TAG_LEN)?;
        if buf.len() < total {
            return None;
        }
        let counter = self.next.fetch_add(1, Ordering::Relaxed);
        if counter == u64::MAX {
            return None;
        }
        Repr {
            encrypted: self.encrypt,
            epoch: self.epoch,
            counter,
        }
        .emit(buf)
        .ok()?;
        let tag: [u8; TAG_LEN] = if self.encrypt {
            let (head, rest) = buf.split_at_mut(HEADER_LEN);
            self.key
                .seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), &mut rest[..len])
                .ok()?
                .as_ref()
                .try_into()
                .ok()?
        } else {
            crate::mac::tag(&self.key, nonce(counter), &buf[..end])
        };
        buf[end..total].copy_from_slice(&tag);
        Some(total)
    }
}

/// Checks datagrams of one channel from one peer.
pub struct LanReceiver {
    pair: PairKey,
    channel: Channel,
    /// The newest epoch that authenticated, its key and its window.
    state: Mutex<Option<(u64, LessSafeKey, ReplayWindow)>>,
}

impl LanReceiver {
    /// Authenticates (and, if encrypted, decrypts) the datagram `buf` in
    /// place; returns the payload's range. Replays and older epochs are
    /// refused before any crypto is spent on them.
    #[inline]
    pub fn open(&self, buf: &mut [u8]) -> Result<Range<usize>, LanError> {
        let p = lan::Packet::new_checked(&*buf).map_err(LanError::Malformed)?;
        let (epoch, counter, encrypted, payload) =
            (p.epoch(), p.counter(), p.encrypted(), p.payload_range());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh;
        let key = match &*state {
            Some((e, key, window)) if *e == epoch => {
                if !window.may_accept(counter) {
                    return Err(LanError::Replayed);
                }
                key
            }
            Some((e, _, _)) if *e > epoch => return Err(LanError::StaleEpoch),
            _ => {
                fresh = self.pair.key(self.channel, epoch);
                &fresh
            }
        };
        let ok = if encrypted {
            let (head, rest) = buf.split_at_mut(HEADER_LEN);
            key.open_in_place(nonce(counter), Aad::from(&head[..]), rest)
                .is_ok()
        } else {
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&buf[payload.end..]);
            crate::mac::verify(key, nonce(counter), &buf[..payload.end], &tag)
        };
        if !ok {
            return Err(LanError::BadTag);
        }
        let new_epoch = !matches!(&*state, Some((e, _, _)) if *e == epoch);
        if new_epoch {
            let key = self.pair.key(self.channel, epoch);
            *state = Some((epoch, key, ReplayWindow::default()));
        }
        let window = &mut state.as_mut().expect("set above").2;
        if !window.accept(counter) {
            return Err(LanError::Replayed);
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> (PairKey, PairKey) {
        let (p, a) = ([7u8; 32], [9u8; 32]);
        (
            PairKey::for_proxy(&p, &public_key(&a)).unwrap(),
            PairKey::for_agent(&a, &public_key(&p)).unwrap(),
        )
    }

    fn datagram(s: &LanSender, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
        b[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        assert_eq!(s.seal(&mut b, payload.len()), Some(b.len()));
        b
    }

    #[test]
    fn each_end_derives_the_same_keys_per_channel_and_direction() {
        let (proxy, agent) = pairs();
        for encrypt in [false, true] {
            let tx = agent.sender(Channel::Uplink, 5, encrypt);
            let rx = proxy.receiver(Channel::Uplink);
            let mut d = datagram(&tx, b"hello");
            assert_eq!(&d[HEADER_LEN..HEADER_LEN + 5] == b"hello", !encrypt);
            let mut opened = d.clone();
            let r = rx.open(&mut opened).unwrap();
            assert_eq!(&opened[r], b"hello");
            assert_eq!(rx.open(&mut d.clone()), Err(LanError::Replayed));
            // Another channel's receiver refuses it.
            let mut d2 = datagram(&tx, b"x");
            assert_eq!(
                proxy.receiver(Channel::Downlink).open(&mut d2.clone()),
                Err(LanError::BadTag)
            );
            d[HEADER_LEN] ^= 1;
            d[12..20].copy_from_slice(&9u64.to_be_bytes());
            assert_eq!(rx.open(&mut d), Err(LanError::BadTag));
            d2[1] ^= lan::ENCRYPTED;
            assert_eq!(
                rx.open(&mut d2),
                Err(LanError::BadTag),
                "the flag is authenticated"
            );
        }
    }

    #[test]
    fn a_new_epoch_replaces_the_old_which_is_then_refused() {
        let (proxy, agent) = pairs();
        let rx = proxy.receiver(Channel::Uplink);
        let old = agent.sender(Channel::Uplink, 1, false);
        let late = datagram(&old, b"a");
        rx.open(&mut datagram(&old, b"b")).unwrap();
        let new = agent.sender(Channel::Uplink, 2, false);
        rx.open(&mut datagram(&new, b"c")).unwrap();
        assert_eq!(rx.open(&mut late.clone()), Err(LanError::StaleEpoch));
        // A forged newer epoch changes nothing.
        let mut forged = datagram(&new, b"d");
        forged[4..12].copy_from_slice(&3u64.to_be_bytes());
        assert_eq!(rx.open(&mut forged), Err(LanError::BadTag));
        rx.open(&mut datagram(&new, b"e")).unwrap();
        // A stranger's key does not authenticate.
        let stranger = PairKey::for_agent(&[3u8; 32], &public_key(&[7u8; 32])).unwrap();
        let s = stranger.sender(Channel::Uplink, 9, false);
        assert_eq!(rx.open(&mut datagram(&s, b"f")), Err(LanError::BadTag));
        assert!(matches!(
            rx.open(&mut [1u8; 10]),
            Err(LanError::Malformed(_))
        ));
    }

    #[test]
    fn low_order_keys_are_refused() {
        assert!(PairKey::for_proxy(&[7u8; 32], &[0u8; 32]).is_none());
    }
}
