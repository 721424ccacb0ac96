//! An agent's identity: its own key pairs, made on first start and kept in
//! its state directory, and the certificate the CU signed for it.
//!
//! ```text
//! STATE_DIR/            0700
//!   tls.key             0600  ECDSA P-256, PKCS#8 PEM: mutual TLS to the CU
//!   noise.key           0600  X25519 static secret, base64: the data plane's Noise handshakes
//!   cert.pem            0600  the CU's certificate for tls.key (after enrolment)
//! ```
//!
//! A key file that others can read is refused rather than used: whoever
//! read it can be this agent. Keys are made with maintained crates only
//! (rcgen over ring for the TLS key, x25519-dalek for the Noise key, ring's
//! system random for its bytes).

use pon_proto::control::PublicKey;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use x25519_dalek::StaticSecret;

pub const TLS_KEY: &str = "tls.key";
pub const NOISE_KEY: &str = "noise.key";
pub const CERTIFICATE: &str = "cert.pem";

/// Where a daemon keeps its identity unless its configuration says otherwise.
pub fn default_state_dir(daemon: &str) -> PathBuf {
    Path::new("/var/lib/pon").join(daemon)
}

/// The configured state directory, or `daemon`'s default.
pub fn state_dir_or_default(configured: Option<&Path>, daemon: &str) -> PathBuf {
    configured.map_or_else(|| default_state_dir(daemon), Path::to_path_buf)
}

/// `dir` as written in `config_file`: relative to the file's directory.
pub fn relative_to(dir: PathBuf, config_file: &Path) -> PathBuf {
    config_file.parent().unwrap_or(Path::new(".")).join(dir)
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error(
        "{path} is readable or writable by others (mode {mode:o}): refusing to use a key \
         others may have read; if it may have leaked, remove the state directory to make new \
         keys (and enrol again), else `chmod 600 {path}`"
    )]
    Exposed { path: String, mode: u32 },
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
    #[error("making a key: {0}")]
    Generate(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |err| IdentityError::Io {
        path: path.display().to_string(),
        err,
    }
}

fn bad(path: &Path, why: impl ToString) -> IdentityError {
    IdentityError::Bad {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

pub struct Identity {
    dir: PathBuf,
    tls_key: rcgen::KeyPair,
    noise: StaticSecret,
    noise_public: PublicKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("noise_public", &self.noise_public)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity kept in `dir`, making the directory (0700) and
    /// any missing key (0600) first. A new key invalidates a certificate
    /// issued for the old ones: it is removed, so the agent enrols again.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let (tls_pem, new_tls) = read_or_make(&dir.join(TLS_KEY), || {
            rcgen::KeyPair::generate()
                .map(|k| k.serialize_pem())
                .map_err(|e| IdentityError::Generate(e.to_string()))
        })?;
        let tls_key = rcgen::KeyPair::from_pem(&tls_pem).map_err(|e| bad(&dir.join(TLS_KEY), e))?;
        let (noise_text, new_noise) = read_or_make(&dir.join(NOISE_KEY), || {
            let mut b = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| IdentityError::Generate("no system randomness".into()))?;
            Ok(PublicKey(b).to_string() + "\n")
        })?;
        // The secret is 32 bytes in the same base64 as public keys.
        let noise_bytes: PublicKey = noise_text
            .parse()
            .map_err(|_| bad(&dir.join(NOISE_KEY), "not 32 bytes of base64"))?;
        let noise = StaticSecret::from(noise_bytes.0);
        let noise_public = PublicKey(x25519_dalek::PublicKey::from(&noise).to_bytes());
        let id = Identity {
            dir: dir.to_path_buf(),
            tls_key,
            noise,
            noise_public,
        };
        if new_tls || new_noise {
            let cert = id.certificate_path();
            if cert.exists() {
                tracing::warn!(path = %cert.display(), "new keys: removing the certificate issued for the old ones");
                fs::remove_file(&cert).map_err(io(&cert))?;
            }
        }
        Ok(id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The static X25519 secret for the data plane's Noise handshakes.
    pub fn noise_secret(&self) -> [u8; 32] {
        self.noise.to_bytes()
    }

    pub fn noise_public(&self) -> PublicKey {
        self.noise_public
    }

    /// The TLS private key, PKCS#8 DER.
    pub fn tls_key_der(&self) -> Vec<u8> {
        self.tls_key.serialize_der()
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.dir.join(CERTIFICATE)
    }

    /// The CU's certificate for this identity (PEM), once enrolled.
    pub fn certificate(&self) -> Result<Option<String>, IdentityError> {
        let path = self.certificate_path();
        match fs::read_to_string(&path) {
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keeps the certificate enrolment earned (written whole, then renamed
    /// into place, so a crash never leaves half a certificate).
    pub fn save_certificate(&self, pem: &str) -> Result<(), IdentityError> {
        let path = self.certificate_path();
        let tmp = self.dir.join(format!(".{CERTIFICATE}.tmp"));
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, pem)?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// A PKCS#10 request (DER) for the TLS key, signed by it: the CU
    /// certifies only keys their holder signed for. The CU sets the
    /// certificate's names itself; these are for an operator reading it.
    pub fn certificate_request(&self, cloud: &str, name: &str) -> Result<Vec<u8>, IdentityError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{cloud}/{name}"));
        params
            .serialize_request(&self.tls_key)
            .map(|csr| csr.der().to_vec())
            .map_err(|e| IdentityError::Generate(e.to_string()))
    }
}

/// The content of a secret file, made with `make` if absent; true if made.
fn read_or_make(
    path: &Path,
    make: impl FnOnce() -> Result<String, IdentityError>,
) -> Result<(String, bool), IdentityError> {
    if let Some(text) = read_secret(path)? {
        return Ok((text, false));
    }
    let text = make()?;
    match write_new(path, &text) {
        Ok(()) => Ok((text, true)),
        // Another process made it meanwhile: use theirs.
        Err(IdentityError::Io { err, .. }) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = read_secret(path)?.ok_or_else(|| bad(path, "vanished while being read"))?;
            Ok((text, false))
        }
        Err(e) => Err(e),
    }
}

/// The content of a secret file (None if absent), refused if others may
/// read or write it.
fn read_secret(path: &Path) -> Result<Option<String>, IdentityError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let mode = f.metadata().map_err(io(path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    std::io::read_to_string(f).map(Some).map_err(io(path))
}

/// Writes a new file readable by its owner only; fails if it exists.
fn write_new(path: &Path, text: &str) -> Result<(), IdentityError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pon-identity-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn made_once_then_loaded_the_same() {
        let d = tmp("same").join("nested");
        let a = Identity::load_or_create(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(TLS_KEY)), 0o600);
        assert_eq!(mode(&d.join(NOISE_KEY)), 0o600);
        let b = Identity::load_or_create(&d).unwrap();
        assert_eq!(a.noise_public(), b.noise_public());
        assert_eq!(a.noise_secret(), b.noise_secret());
        assert_eq!(a.tls_key_der(), b.tls_key_der());
        // The public key is the secret's, by X25519.
        let derived = x25519_dalek::x25519(a.noise_secret(), x25519_dalek::X25519_BASEPOINT_BYTES);
        assert_eq!(derived, a.noise_public().0);
        // Two agents never share keys.
        let other = Identity::load_or_create(&tmp("other")).unwrap();
        assert_ne!(other.noise_public(), a.noise_public());
        assert_ne!(other.tls_key_der(), a.tls_key_der());
        assert!(!format!("{a:?}").contains(&PublicKey(a.noise_secret()).to_string()));
        let _ = fs::remove_dir_all(d.parent().unwrap());
        let _ = fs::remove_dir_all(tmp("other"));
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let d = tmp("exposed");
        Identity::load_or_create(&d).unwrap();
        for f in [TLS_KEY, NOISE_KEY] {
            let p = d.join(f);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            let e = Identity::load_or_create(&d).unwrap_err().to_string();
            assert!(
                e.contains(f) && e.contains("644") && e.contains("chmod 600"),
                "{e}"
            );
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
        Identity::load_or_create(&d).unwrap();
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_certificate_is_kept_until_a_key_changes() {
        let d = tmp("cert");
        let id = Identity::load_or_create(&d).unwrap();
        assert_eq!(id.certificate().unwrap(), None);
        id.save_certificate("PEM\n").unwrap();
        assert_eq!(mode(&id.certificate_path()), 0o600);
        let id = Identity::load_or_create(&d).unwrap();
        assert_eq!(id.certificate().unwrap().as_deref(), Some("PEM\n"));
        fs::remove_file(d.join(NOISE_KEY)).unwrap();
        let id = Identity::load_or_create(&d).unwrap();
        assert_eq!(id.certificate().unwrap(), None, "issued for the old key");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_key_files_are_named() {
        let d = tmp("garbage");
        fs::create_dir_all(&d).unwrap();
        write_new(&d.join(NOISE_KEY), "short\n").unwrap();
        let e = Identity::load_or_create(&d).unwrap_err().to_string();
        assert!(e.contains(NOISE_KEY), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
