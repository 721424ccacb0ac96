//! The CU's certificate authority: `pon-cu init` makes the CA, the CU's
//! certificate, the admin credential and a first join token; at run time
//! the CA signs a client certificate for each agent that enrols.

use crate::registry::Issuer;
use crate::trust::{hex, Enrolment, KeyId};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0} already exists (pass --force to replace the CA, certificates and keys)")]
    Exists(String),
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The admin credential `ponctl` presents; no agent holds it.
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// The first join token (its secret; the store keeps its hash).
    pub token: PathBuf,
    pub store: PathBuf,
}

impl InitFiles {
    pub fn in_dir(dir: &Path) -> Self {
        InitFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            cert: dir.join("cu.pem"),
            key: dir.join("cu.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
            token: dir.join("token"),
            store: dir.join("registry.redb"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |err| PkiError::Io {
        path: path.display().to_string(),
        err,
    }
}

fn write(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), PkiError> {
    if path.exists() && !force {
        return Err(PkiError::Exists(path.display().to_string()));
    }
    if secret && path.exists() {
        // `mode` applies only when creating: a replaced secret gets a new
        // file, never an old one's looser mode.
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(path)
        .map_err(io_err(path))?
        .write_all(text.as_bytes())
        .map_err(io_err(path))
}

/// A fresh random token: 32 bytes from the kernel, hex.
pub fn new_token() -> Result<String, PkiError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io_err(Path::new("/dev/urandom")))?;
    Ok(hex(&b))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "PON CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// A server certificate for `name` and `ips` signed by the CA (whose cert
/// and key `files` names), written to `cert` and `key`: a proxy's PMon
/// listener presents it.
pub fn server_cert(
    files: &InitFiles,
    name: &str,
    ips: &[IpAddr],
    cert: &Path,
    key: &Path,
    force: bool,
) -> Result<(), PkiError> {
    let ca = Ca::load(&files.ca_cert, &files.ca_key)?;
    let (c, k) = server_params(name, ips)?;
    let signed = c.signed_by(&k, &ca.cert, &ca.key)?;
    write(cert, &signed.pem(), false, force)?;
    write(key, &k.serialize_pem(), true, force)
}

/// A server certificate's fields and a fresh key.
fn server_params(name: &str, ips: &[IpAddr]) -> Result<(CertificateParams, KeyPair), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok((p, key))
}

/// Creates the CA, the CU certificate (for `name` and `ips`) and the admin
/// credential. The first token is the caller's (it goes into the store).
pub fn init(files: &InitFiles, name: &str, ips: &[IpAddr], force: bool) -> Result<(), PkiError> {
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;

    let (cu, key) = server_params(name, ips)?;
    let cert = cu.signed_by(&key, &ca_cert, &ca_key)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "PON administrator");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &ca_cert, &ca_key)?;

    write(&files.ca_cert, &ca_cert.pem(), false, force)?;
    write(&files.ca_key, &ca_key.serialize_pem(), true, force)?;
    write(&files.cert, &cert.pem(), false, force)?;
    write(&files.key, &key.serialize_pem(), true, force)?;
    write(&files.admin_cert, &admin_cert.pem(), true, force)?;
    write(&files.admin_key, &admin_key.serialize_pem(), true, force)?;
    Ok(())
}

/// Writes a token secret to `path` (mode 0600).
pub fn write_token(path: &Path, token: &str, force: bool) -> Result<(), PkiError> {
    write(path, &format!("{token}\n"), true, force)
}

/// The key id of a certificate (DER): the hash of its public key bits.
pub fn key_of_certificate(der: &[u8]) -> Result<KeyId, String> {
    crate::trust::presented(der).map(|p| p.key)
}

/// The key ids of the certificates in a PEM file (the admin credential).
pub fn keys_of_pem_file(path: &Path) -> Result<Vec<KeyId>, PkiError> {
    let bad = |why: String| PkiError::Bad {
        path: path.display().to_string(),
        why,
    };
    let certs = crate::tls::load_certs(path, "certificate").map_err(|e| bad(e.to_string()))?;
    certs
        .iter()
        .map(|c| key_of_certificate(c).map_err(bad))
        .collect()
}

/// The CA as the running CU uses it: signs agents' certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Ca, PkiError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io_err(p));
        let bad = |p: &Path, e: rcgen::Error| PkiError::Bad {
            path: p.display().to_string(),
            why: e.to_string(),
        };
        let key = KeyPair::from_pem(&read(key_pem)?).map_err(|e| bad(key_pem, e))?;
        // rcgen signs with an issuer it knows as a `Certificate`: rebuilt
        // from the CA's own fields and key, it names the same issuer.
        let params =
            CertificateParams::from_ca_cert_pem(&read(cert_pem)?).map_err(|e| bad(cert_pem, e))?;
        let cert = params.self_signed(&key).map_err(|e| bad(cert_pem, e))?;
        Ok(Ca { cert, key })
    }
}

/// The key of a certificate request whose signature checks out.
fn request(csr: &[u8]) -> Result<CertificateSigningRequestParams, String> {
    CertificateSigningRequestParams::from_der(&csr.to_vec().into())
        .map_err(|e| format!("not a certificate request signed by its key ({e})"))
}

impl Issuer for Ca {
    fn key_of(&self, csr: &[u8]) -> Result<KeyId, String> {
        Ok(KeyId::of_public_key(request(csr)?.public_key.der_bytes()))
    }

    fn issue(&self, csr: &[u8], e: &Enrolment) -> Result<String, String> {
        let req = request(csr)?;
        // The names are the CU's, never the request's: the certificate says
        // what was enrolled.
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{}/{}", e.cloud, e.name));
        params
            .distinguished_name
            .push(DnType::OrganizationName, e.cloud.clone());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, e.role.clone());
        let uri = crate::trust::noise_uri(&e.noise_key);
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(|e: rcgen::Error| e.to_string())?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let req = CertificateSigningRequestParams {
            params,
            public_key: req.public_key,
        };
        req.signed_by(&self.cert, &self.key)
            .map(|c| c.pem())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pon_proto::control::PublicKey;

    #[test]
    fn the_ca_certifies_only_keys_that_signed_their_request() {
        let dir = std::env::temp_dir().join(format!("pon-cu-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files = InitFiles::in_dir(&dir);
        init(&files, "pon-cu", &[], false).unwrap();
        assert!(matches!(
            init(&files, "pon-cu", &[], false),
            Err(PkiError::Exists(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        for secret in [&files.ca_key, &files.key, &files.admin_key] {
            let mode = std::fs::metadata(secret).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
        }
        let ca = Ca::load(&files.ca_cert, &files.ca_key).unwrap();

        let agent = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&agent)
            .unwrap()
            .der()
            .to_vec();
        let key = ca.key_of(&csr).unwrap();
        assert_eq!(key, KeyId::of_public_key(agent.public_key_raw()));
        let e = Enrolment {
            key,
            cloud: "paris".into(),
            name: "p".into(),
            role: "PROXY".into(),
            noise_key: PublicKey([1; 32]),
            enrolled_ms: 0,
            revoked: false,
        };
        let pem = ca.issue(&csr, &e).unwrap();
        let der = crate::tls::certs_from_pem(&pem).unwrap().remove(0);
        // The certificate is for the request's key, whatever else is in it.
        assert_eq!(key_of_certificate(&der).unwrap(), key);

        // A request altered after signing (another key swapped in) is refused.
        let other = KeyPair::generate().unwrap();
        let mut forged = csr.clone();
        let (a, b) = (agent.public_key_raw(), other.public_key_raw());
        let at = forged.windows(a.len()).position(|w| w == a).unwrap();
        forged[at..at + b.len()].copy_from_slice(b);
        assert!(ca.key_of(&forged).is_err());
        assert!(ca.issue(&forged, &e).is_err());
        assert!(ca.key_of(b"garbage").is_err());

        // The admin credential is a key of its own.
        let admin = keys_of_pem_file(&files.admin_cert).unwrap();
        assert_eq!(admin.len(), 1);
        assert_ne!(admin[0], key);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
