//! The Noise KK handshake between two proxies, through `snow`: both know
//! each other's static key (the CU vouches for it, or the configuration
//! names it), and each handshake adds fresh ephemeral keys, so the session
//! keys have forward secrecy. Nothing here is hand-written crypto: snow
//! runs the pattern, and its raw split hands the two transport keys to
//! ring's AES-256-GCM (`Session`), which the data path uses in place.

use pon_proto::handshake::{INIT_NOISE_LEN, RESPONSE_NOISE_LEN};
use snow::{Builder, HandshakeState};

/// The pattern and primitives: KK (both static keys known in advance),
/// X25519, AES-256-GCM (hardware-accelerated on the machines PON runs on),
/// SHA-256.
pub const PATTERN: &str = "Noise_KK_25519_AESGCM_SHA256";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("the handshake message does not authenticate")]
    Forged,
    #[error("the key material is unusable")]
    BadKey,
}

pub struct Keys {
    /// This side's sending and receiving keys.
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

fn builder() -> Builder<'static> {
    Builder::new(PATTERN.parse().expect("a valid Noise pattern"))
}

/// A fresh X25519 key pair (private, public).
pub fn generate_keypair() -> ([u8; 32], [u8; 32]) {
    let kp = builder().generate_keypair().expect("system randomness");
    let mut private = [0u8; 32];
    let mut public = [0u8; 32];
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    (private, public)
}

/// The public key of a private one.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    // X25519: the public key is the private scalar times the base point;
    // snow does not expose that, so a throwaway handshake state would be
    // needed. curve25519-dalek (already under snow) does it directly.
    curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(*private).to_bytes()
}

/// Binds a handshake to the two proxy ids, initiator first, so a message
/// cannot be replayed as coming from another id with the same keys.
/// What both sides must agree on before the first message: the ids, and
/// the initiator's index (sent in clear in front of the Noise message, so
/// an altered copy fails to authenticate).
fn prologue(initiator: u32, responder: u32, index: u32) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[..12].copy_from_slice(b"PON tunnel 1");
    p[12..16].copy_from_slice(&initiator.to_be_bytes());
    p[16..20].copy_from_slice(&responder.to_be_bytes());
    p[20..].copy_from_slice(&index.to_be_bytes());
    p
}

fn state(
    private: &[u8; 32],
    remote: &[u8; 32],
    initiator: u32,
    responder: u32,
    index: u32,
    as_initiator: bool,
) -> Result<HandshakeState, HandshakeError> {
    let prologue = prologue(initiator, responder, index);
    let b = builder()
        .local_private_key(private)
        .and_then(|b| b.remote_public_key(remote))
        .and_then(|b| b.prologue(&prologue))
        .map_err(|_| HandshakeError::BadKey)?;
    if as_initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(|_| HandshakeError::BadKey)
}

/// An initiation in flight, waiting for its response.
pub struct Initiator(HandshakeState);

impl Initiator {
    /// Writes message 1 (carrying `timestamp`) into `out`.
    pub fn start(
        private: &[u8; 32],
        remote: &[u8; 32],
        me: u32,
        peer: u32,
        index: u32,
        timestamp: u64,
        out: &mut [u8; INIT_NOISE_LEN],
    ) -> Result<Self, HandshakeError> {
        let mut hs = state(private, remote, me, peer, index, true)?;
        hs.write_message(&timestamp.to_be_bytes(), out)
            .map_err(|_| HandshakeError::BadKey)?;
        Ok(Initiator(hs))
    }

    /// Reads message 2; on success the session keys.
    /// The keys, once the response authenticates and names
    /// `responder_index` (its clear copy) as the index it chose.
    pub fn finish(mut self, msg: &[u8], responder_index: u32) -> Result<Keys, HandshakeError> {
        let mut payload = [0u8; RESPONSE_NOISE_LEN];
        let n = self
            .0
            .read_message(msg, &mut payload)
            .map_err(|_| HandshakeError::Forged)?;
        if !self.0.is_handshake_finished() || payload[..n] != responder_index.to_be_bytes() {
            return Err(HandshakeError::Forged);
        }
        let (i_to_r, r_to_i) = self.0.dangerously_get_raw_split();
        Ok(Keys {
            send: i_to_r,
            recv: r_to_i,
        })
    }
}

/// Answers message 1: returns its timestamp and the session keys, and
/// writes message 2 into `out`.
#[allow(clippy::too_many_arguments)]
pub fn respond(
    private: &[u8; 32],
    remote: &[u8; 32],
    me: u32,
    peer: u32,
    init_index: u32,
    my_index: u32,
    msg: &[u8],
    out: &mut [u8; RESPONSE_NOISE_LEN],
) -> Result<(u64, Keys), HandshakeError> {
    let mut hs = state(private, remote, peer, me, init_index, false)?;
    let mut payload = [0u8; INIT_NOISE_LEN];
    let n = hs
        .read_message(msg, &mut payload)
        .map_err(|_| HandshakeError::Forged)?;
    let timestamp: [u8; 8] = payload[..n]
        .try_into()
        .map_err(|_| HandshakeError::Forged)?;
    hs.write_message(&my_index.to_be_bytes(), out)
        .map_err(|_| HandshakeError::BadKey)?;
    let (i_to_r, r_to_i) = hs.dangerously_get_raw_split();
    Ok((
        u64::from_be_bytes(timestamp),
        Keys {
            send: r_to_i,
            recv: i_to_r,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_mirrored_keys_and_strangers_fail() {
        let (a_priv, a_pub) = generate_keypair();
        let (b_priv, b_pub) = generate_keypair();
        assert_eq!(public_key(&a_priv), a_pub);
        let mut m1 = [0u8; INIT_NOISE_LEN];
        let i = Initiator::start(&a_priv, &b_pub, 1, 2, 7, 42, &mut m1).unwrap();
        let mut m2 = [0u8; RESPONSE_NOISE_LEN];
        let (ts, bk) = respond(&b_priv, &a_pub, 2, 1, 7, 9, &m1, &mut m2).unwrap();
        assert_eq!(ts, 42);
        let ak = i.finish(&m2, 9).unwrap();
        assert_eq!((ak.send, ak.recv), (bk.recv, bk.send));

        // A third key pair, or the right keys under other ids, fail.
        let (c_priv, _) = generate_keypair();
        assert!(respond(&c_priv, &a_pub, 2, 1, 7, 9, &m1, &mut m2).is_err());
        assert!(respond(&b_priv, &a_pub, 2, 3, 7, 9, &m1, &mut m2).is_err());
        let mut bad = m1;
        bad[40] ^= 1;
        assert!(respond(&b_priv, &a_pub, 2, 1, 7, 9, &bad, &mut m2).is_err());
    }
}
