//! One session between two proxies: the keys a Noise handshake produced,
//! the send counter and the receive replay window. The data path uses a
//! session through `&self` from any thread: the counter is atomic, the
//! window sits behind a lock only the receiving thread takes.

use crate::replay::ReplayWindow;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bytes an AEAD tag adds.
pub const TAG_LEN: usize = 16;

/// A session refuses to send this many messages: the rekey (at
/// [`crate::Timers::rekey_after_messages`]) has long replaced it by then,
/// and a nonce is never reused.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 16);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("authentication failed")]
    Forged,
    #[error("counter already seen or too old")]
    Replayed,
}

impl OpenError {
    pub fn label(self) -> &'static str {
        match self {
            OpenError::Forged => "bad_tag",
            OpenError::Replayed => "replayed",
        }
    }
}

pub struct Session {
    peer: u32,
    local_index: u32,
    remote_index: u32,
    send: LessSafeKey,
    recv: LessSafeKey,
    next_counter: AtomicU64,
    replay: Mutex<ReplayWindow>,
    /// The initiator may send at once; the responder waits until the
    /// initiator has shown it holds the keys (its first packet), so a lost
    /// handshake response never leaves the responder sending into a
    /// session the initiator does not have.
    confirmed: AtomicBool,
    created: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("sent", &self.sent())
            .field("confirmed", &self.is_confirmed())
            .finish()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(raw: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("32-byte AES-256 key"))
}

impl Session {
    /// A session from a finished handshake's keys.
    pub(crate) fn new(
        peer: u32,
        local_index: u32,
        remote_index: u32,
        send: &[u8; 32],
        recv: &[u8; 32],
        initiator: bool,
        created: Duration,
    ) -> Self {
        Session {
            peer,
            local_index,
            remote_index,
            send: key(send),
            recv: key(recv),
            next_counter: AtomicU64::new(0),
            replay: Mutex::new(ReplayWindow::default()),
            confirmed: AtomicBool::new(initiator),
            created,
        }
    }

    /// The proxy at the other end.
    pub fn peer(&self) -> u32 {
        self.peer
    }
    /// The index the peer puts in packets for us.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }
    /// The index we put in packets for the peer.
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }
    pub fn created(&self) -> Duration {
        self.created
    }
    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.next_counter.load(Ordering::Relaxed)
    }
    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Reserves the counter of the next message, or `None` once the
    /// session has sent all it may.
    #[inline]
    pub fn next_counter(&self) -> Option<u64> {
        let c = self.next_counter.fetch_add(1, Ordering::Relaxed);
        (c < REJECT_AFTER_MESSAGES).then_some(c)
    }

    /// Encrypts `data` in place; returns the tag.
    #[inline]
    pub fn seal(&self, counter: u64, aad: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), data)
            .expect("AES-GCM input within its limits");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    /// A tag that authenticates `data`, left in the clear (see `mac`).
    #[inline]
    pub fn tag(&self, counter: u64, data: &[u8]) -> [u8; TAG_LEN] {
        crate::mac::tag(&self.send, nonce(counter), data)
    }

    /// Authenticates and decrypts `data` (ciphertext then tag) in place,
    /// then records the counter. On success the plaintext is
    /// `data[..data.len() - TAG_LEN]`. A replayed counter is refused before
    /// any crypto is spent on it.
    #[inline]
    pub fn open(&self, counter: u64, aad: &[u8], data: &mut [u8]) -> Result<(), OpenError> {
        // One lock per packet, held across the check: only the receiving
        // thread takes it, so holding it costs no one a wait.
        let mut window = self.window();
        if !window.may_accept(counter) {
            return Err(OpenError::Replayed);
        }
        self.recv
            .open_in_place(nonce(counter), Aad::from(aad), data)
            .map_err(|_| OpenError::Forged)?;
        if !window.accept(counter) {
            return Err(OpenError::Replayed);
        }
        drop(window);
        // The peer used these keys: it has them, so we may send with them.
        if !self.confirmed.load(Ordering::Relaxed) {
            self.confirmed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks a tag made by [`Session::tag`] over `data`, then records the
    /// counter.
    #[inline]
    pub fn verify(&self, counter: u64, data: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), OpenError> {
        let mut window = self.window();
        if !window.may_accept(counter) {
            return Err(OpenError::Replayed);
        }
        if !crate::mac::verify(&self.recv, nonce(counter), data, tag) {
            return Err(OpenError::Forged);
        }
        if !window.accept(counter) {
            return Err(OpenError::Replayed);
        }
        drop(window);
        if !self.confirmed.load(Ordering::Relaxed) {
            self.confirmed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Marks the session usable for sending (the peer proved it has it).
    pub(crate) fn confirm(&self) {
        self.confirmed.store(true, Ordering::Relaxed);
    }

    fn window(&self) -> std::sync::MutexGuard<'_, ReplayWindow> {
        // A poisoned lock only means another thread panicked mid-update of
        // a bitmap; the bitmap is still a valid (conservative) window.
        self.replay.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        (
            Session::new(2, 10, 20, &k1, &k2, true, Duration::ZERO),
            Session::new(1, 20, 10, &k2, &k1, false, Duration::ZERO),
        )
    }

    #[test]
    fn sealed_data_opens_once_and_only_unaltered() {
        let (a, b) = pair();
        let mut msg = b"attack at dawn".to_vec();
        let c = a.next_counter().unwrap();
        let tag = a.seal(c, b"hdr", &mut msg);
        assert_ne!(&msg[..], b"attack at dawn");
        msg.extend_from_slice(&tag);

        let mut altered = msg.clone();
        altered[0] ^= 1;
        assert_eq!(b.open(c, b"hdr", &mut altered), Err(OpenError::Forged));
        let mut wrong_aad = msg.clone();
        assert_eq!(b.open(c, b"hdx", &mut wrong_aad), Err(OpenError::Forged));
        assert!(!b.is_confirmed());

        let mut ok = msg.clone();
        b.open(c, b"hdr", &mut ok).unwrap();
        assert_eq!(&ok[..ok.len() - TAG_LEN], b"attack at dawn");
        assert!(b.is_confirmed(), "the initiator's first packet confirms");
        let mut again = msg.clone();
        assert_eq!(b.open(c, b"hdr", &mut again), Err(OpenError::Replayed));
    }

    #[test]
    fn tags_authenticate_without_encrypting() {
        let (a, b) = pair();
        let c = a.next_counter().unwrap();
        let t = a.tag(c, b"whole datagram");
        assert_eq!(b.verify(c, b"whole datagrae", &t), Err(OpenError::Forged));
        b.verify(c, b"whole datagram", &t).unwrap();
        assert_eq!(b.verify(c, b"whole datagram", &t), Err(OpenError::Replayed));
    }
}
