//! Certificate authorities. `CertificateAuthority` is the seam where the Istio
//! CA gRPC client (CSR in, PEM chain out) replaces the built-in CA.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::spiffe::Identity;
use crate::tls::spiffe_uri_of;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA root {path}: {reason}")]
    BadRoot { path: PathBuf, reason: String },
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("CSR asks for {asked}, caller is entitled to {allowed}")]
    IdentityMismatch { asked: String, allowed: String },
    #[error("signing: {0}")]
    Signing(String),
    #[error("CA unavailable: {0}")]
    Unavailable(String),
}

pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, CaError>> + Send + 'a>>;

/// Signs workload certificates. Returns the PEM chain, leaf first, root last,
/// exactly as Istio's `IstioCertificateResponse.cert_chain` carries it.
pub trait CertificateAuthority: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a Identity,
        validity: Duration,
    ) -> SignFuture<'a>;
}

/// A self-contained CA for standalone mode: its root lives in a state directory
/// (created on first start) or is loaded from files the operator provides.
pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";

impl BuiltinCa {
    /// Loads the root from `dir`, creating it first if the directory has none.
    /// Several ztunnels may share one directory; a lock file keeps them from
    /// each minting a different root.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| CaError::Io {
                path: lock_path.clone(),
                source: e.into(),
            },
        )?;
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if !cert_path.exists() {
            let (cert_pem, key_pem) = new_root(trust_domain)?;
            write_file(&key_path, &key_pem, 0o600).map_err(io(&key_path))?;
            write_file(&cert_path, &cert_pem, 0o644).map_err(io(&cert_path))?;
            tracing::info!(dir = %dir.display(), "created a new mesh root CA");
        }
        Self::from_files(&cert_path, &key_path)
    }

    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let bad = |path: &Path, reason: String| CaError::BadRoot {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key_path, e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(cert_path, e.to_string()))?;
        Ok(BuiltinCa {
            issuer,
            root_pem: cert_pem,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn sign_now(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        let want = identity.to_string();
        if asked != [want.clone()] {
            return Err(CaError::IdentityMismatch {
                asked: asked.join(","),
                allowed: want,
            });
        }
        let now = OffsetDateTime::now_utc();
        let p = &mut csr.params;
        // A little backdating tolerates clock skew between nodes.
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now
            + time::Duration::try_from(validity).map_err(|e| CaError::Signing(e.to_string()))?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(rand_serial().into());
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        // Guard against ourselves: the leaf must carry exactly the identity asked.
        let got = spiffe_uri_of(leaf.der()).map_err(|e| CaError::Signing(e.to_string()))?;
        if got != want {
            return Err(CaError::IdentityMismatch {
                asked: got,
                allowed: want,
            });
        }
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

impl CertificateAuthority for BuiltinCa {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a Identity,
        validity: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move { self.sign_now(csr_pem, identity, validity) })
    }
}

fn rand_serial() -> Vec<u8> {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // a positive integer
    b.to_vec()
}

fn new_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Signing(e.to_string()))?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    p.distinguished_name
        .push(DnType::CommonName, "ambient mesh root CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    let cert = p
        .self_signed(&key)
        .map_err(|e| CaError::Signing(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_file(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
