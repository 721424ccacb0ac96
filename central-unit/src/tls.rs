//! QUIC + TLS 1.3 set-up for both ends. Agents trust only the CA that
//! `pon-cu init` made; the CU presents the certificate signed by it. Both
//! ends authenticate: an agent presents the client certificate the CA
//! signed at its enrolment (or none, to enrol), and the CU accepts only
//! client certificates of its own CA.

use pon_proto::control::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// QUIC application close codes, of the CU and of a proxy's PMon listener.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const BY_CU: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const TIMEOUT: u32 = 3;
    /// A relayed session's stream refused before its handshake: too many
    /// in progress (its agent backs off and comes back).
    pub const BUSY: u32 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {detail}")]
    Pem {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC set-up: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        detail,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The certificates in PEM text (an agent's certificate, as the CU sent it).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

fn roots(ca_pem: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca_pem, "CA certificate")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// What a client presents: its certificate chain and private key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ClientCert {
    /// A chain and a PKCS#8 key (DER), as an agent's identity keeps them.
    pub fn new(chain: Vec<CertificateDer<'static>>, pkcs8: Vec<u8>) -> Self {
        ClientCert {
            chain,
            key: PrivateKeyDer::Pkcs8(pkcs8.into()),
        }
    }

    /// From PEM files (`ponctl`'s admin credential).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
            what: "private key",
            path: key.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(ClientCert {
            chain: load_certs(cert, "certificate")?,
            key,
        })
    }
}

/// The TLS half of a client's set-up: trust exactly the CA in `ca_pem`;
/// present `cert` if given (an agent without one can only enrol). QUIC
/// wraps it; a relayed session runs it over its proxy's stream as it is.
pub fn client_tls(
    ca_pem: &Path,
    cert: Option<ClientCert>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut tls = match cert {
        Some(c) => builder.with_client_auth_cert(c.chain, c.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Client side, over QUIC: see [`client_tls`].
pub fn client_config(
    ca_pem: &Path,
    idle: Duration,
    cert: Option<ClientCert>,
) -> Result<quinn::ClientConfig, TlsError> {
    quic_client(client_tls(ca_pem, cert)?, idle)
}

/// Wraps a client's TLS set-up for QUIC.
pub fn quic_client(
    tls: rustls::ClientConfig,
    idle: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = transport(idle)?;
    transport
        .keep_alive_interval(Some(idle / 3))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// QUIC transport settings both ends share: a connection idle for `idle`
/// is closed.
fn transport(idle: Duration) -> Result<quinn::TransportConfig, TlsError> {
    let idle = quinn::IdleTimeout::try_from(idle).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        // Control traffic is small and rare: no batches of datagrams (each
        // connection would keep a transmit buffer sized for ten of them),
        // and no path MTU probing (its state and probes, per connection).
        .enable_segmentation_offload(false)
        .mtu_discovery_config(None);
    Ok(transport)
}

/// Server side: the CU's certificate chain and key; clients may present a
/// certificate of the CA in `ca_pem` (agents, the admin) or none (an agent
/// enrolling); a certificate of another CA fails the handshake.
pub fn server_config(
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
    idle: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(cert_pem, key_pem, ca_pem, idle, true)
}

/// Like [`server_config`], for a server only members of the overlay talk
/// to (a proxy's PMon listener): a client without a certificate of the CA
/// fails the handshake.
pub fn server_config_for_members(
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
    idle: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with(cert_pem, key_pem, ca_pem, idle, false)
}

/// The CU's TLS set-up for sessions its agents' proxies relay: the same
/// certificate and client verification as over QUIC (a certificate of the
/// CA, or none to enrol), run inside the relayed stream end to end, so the
/// proxy carrying it reads and forges nothing.
pub fn relay_server_config(
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut tls = server_tls(cert_pem, key_pem, ca_pem, true)?;
    // No resumption tickets: an agent reconnects rarely, and each ticket
    // is bytes on every relayed handshake of a storm.
    tls.send_tls13_tickets = 0;
    Ok(Arc::new(tls))
}

fn server_tls(
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
    anonymous: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(cert_pem, "CU certificate")?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| TlsError::Pem {
        what: "CU key",
        path: key_pem.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    );
    if anonymous {
        clients = clients.allow_unauthenticated();
    }
    let clients = clients
        .build()
        .map_err(|e| TlsError::Quic(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

fn server_config_with(
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
    idle: Duration,
    anonymous: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_tls(cert_pem, key_pem, ca_pem, anonymous)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = transport(idle)?;
    // One control stream per agent; what an agent may have in flight
    // towards the CU stays small, whatever it tries.
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((2 * pon_proto::control::MAX_AGENT_FRAME as u32).into())
        .receive_window((4 * pon_proto::control::MAX_AGENT_FRAME as u32).into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}
