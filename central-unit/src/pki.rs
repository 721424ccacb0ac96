//! `pon-cu init`: a CA, the CU's certificate signed by it, and a join token.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
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
    #[error("{0} already exists (pass --force to replace the CA, certificate and token)")]
    Exists(String),
}

pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub token: PathBuf,
}

impl InitFiles {
    pub fn in_dir(dir: &Path) -> Self {
        InitFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            cert: dir.join("cu.pem"),
            key: dir.join("cu.key"),
            token: dir.join("token"),
        }
    }
}

fn write(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), PkiError> {
    let io = |err| PkiError::Io {
        path: path.display().to_string(),
        err,
    };
    if path.exists() && !force {
        return Err(PkiError::Exists(path.display().to_string()));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(path)
        .map_err(io)?
        .write_all(text.as_bytes())
        .map_err(io)
}

/// A fresh random token: 32 bytes from the kernel, hex.
pub fn new_token() -> Result<String, PkiError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|err| PkiError::Io {
            path: "/dev/urandom".into(),
            err,
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Creates the CA, the CU certificate (for `name` and `ips`) and the token.
pub fn init(files: &InitFiles, name: &str, ips: &[IpAddr], force: bool) -> Result<(), PkiError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "PON CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut cu = CertificateParams::new(vec![name.to_string()])?;
    cu.distinguished_name.push(DnType::CommonName, name);
    cu.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let cert = cu.signed_by(&key, &ca_cert, &ca_key)?;

    write(&files.ca_cert, &ca_cert.pem(), false, force)?;
    write(&files.ca_key, &ca_key.serialize_pem(), true, force)?;
    write(&files.cert, &cert.pem(), false, force)?;
    write(&files.key, &key.serialize_pem(), true, force)?;
    write(&files.token, &(new_token()? + "\n"), true, force)?;
    Ok(())
}
