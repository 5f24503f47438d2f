//! Per-identity leaf certificates for the workloads a ztunnel serves: fetched
//! from the CA on first use, renewed at half life in the background. Renewal
//! swaps the TLS configs for new handshakes only; live connections keep theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::ca::{CaError, CertificateAuthority};
use crate::spiffe::Identity;
use crate::tls::{self, spiffe_uri_of, TlsError};

#[derive(Debug, thiserror::Error, Clone)]
pub enum CertError {
    #[error("no certificate for {identity}: {reason}")]
    Unavailable { identity: String, reason: String },
    #[error("certificate for {0} expired and could not be renewed")]
    Expired(String),
}

pub struct WorkloadCert {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    pub chain_pem: Vec<String>,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl WorkloadCert {
    pub fn is_valid_at(&self, t: SystemTime) -> bool {
        self.not_before <= t && t < self.not_after
    }

    /// Half of the life left: CA-side backdating of `not_before` must not
    /// pull renewal forward.
    fn renew_in(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            / 2
    }
}

#[derive(Clone)]
enum State {
    Pending,
    Ready(Arc<WorkloadCert>),
    Failed(String),
}

struct Entry {
    rx: watch::Receiver<State>,
    refs: usize,
    task: tokio::task::AbortHandle,
}

pub struct SecretManager {
    ca: Arc<dyn CertificateAuthority>,
    ttl: Duration,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, ttl: Duration) -> Arc<Self> {
        Arc::new(SecretManager {
            ca,
            ttl,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Starts keeping a certificate for `id` (reference counted: one per local
    /// workload using it). Must be called inside a tokio runtime.
    pub fn retain(&self, id: &Identity) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(e) = entries.get_mut(id) {
            e.refs += 1;
            return;
        }
        let (tx, rx) = watch::channel(State::Pending);
        let task =
            tokio::spawn(refresh_loop(self.ca.clone(), id.clone(), self.ttl, tx)).abort_handle();
        entries.insert(id.clone(), Entry { rx, refs: 1, task });
    }

    pub fn release(&self, id: &Identity) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(e) = entries.get_mut(id) {
            e.refs -= 1;
            if e.refs == 0 {
                e.task.abort();
                entries.remove(id);
            }
        }
    }

    /// The current certificate for `id`, waiting for the first issuance.
    /// Never hands out an expired certificate: mTLS fails closed.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let rx = self.entries.lock().unwrap().get(id).map(|e| e.rx.clone());
        let Some(mut rx) = rx else {
            return Err(CertError::Unavailable {
                identity: id.to_string(),
                reason: "not a local workload".into(),
            });
        };
        let state = rx
            .wait_for(|s| !matches!(s, State::Pending))
            .await
            .map(|s| s.clone())
            .unwrap_or(State::Failed("certificate manager stopped".into()));
        match state {
            State::Ready(c) if c.is_valid_at(SystemTime::now()) => Ok(c),
            State::Ready(_) => Err(CertError::Expired(id.to_string())),
            State::Failed(reason) => Err(CertError::Unavailable {
                identity: id.to_string(),
                reason,
            }),
            State::Pending => unreachable!(),
        }
    }

    /// Every certificate held now, for the admin config dump.
    pub fn snapshot(&self) -> Vec<Result<Arc<WorkloadCert>, (Identity, String)>> {
        let entries = self.entries.lock().unwrap();
        let mut out: Vec<_> = entries
            .iter()
            .map(|(id, e)| match &*e.rx.borrow() {
                State::Ready(c) => Ok(c.clone()),
                State::Pending => Err((id.clone(), "pending".to_string())),
                State::Failed(r) => Err((id.clone(), r.clone())),
            })
            .collect();
        out.sort_by_key(|r| match r {
            Ok(c) => c.identity.clone(),
            Err((id, _)) => id.clone(),
        });
        out
    }
}

impl Drop for SecretManager {
    fn drop(&mut self) {
        for e in self.entries.get_mut().unwrap().values() {
            e.task.abort();
        }
    }
}

async fn refresh_loop(
    ca: Arc<dyn CertificateAuthority>,
    id: Identity,
    ttl: Duration,
    tx: watch::Sender<State>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match issue(&*ca, &id, ttl).await {
            Ok(cert) => {
                backoff = Duration::from_millis(200);
                let wait = cert.renew_in();
                tracing::info!(identity = %id, serial = %cert.serial, expires_in_s = cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "workload certificate issued");
                tx.send_replace(State::Ready(Arc::new(cert)));
                tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
            }
            Err(e) => {
                let still_valid =
                    matches!(&*tx.borrow(), State::Ready(c) if c.is_valid_at(SystemTime::now()));
                tracing::warn!(identity = %id, error = %e, still_valid, retry_in_ms = backoff.as_millis() as u64, "certificate request failed");
                if !still_valid {
                    tx.send_replace(State::Failed(e.to_string()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Other(String),
}

async fn issue(
    ca: &dyn CertificateAuthority,
    id: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert, IssueError> {
    let other = |e: &dyn std::fmt::Display| IssueError::Other(e.to_string());
    let key = KeyPair::generate().map_err(|e| other(&e))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string().try_into().map_err(|e| other(&e))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| other(&e))?
        .pem()
        .map_err(|e| other(&e))?;
    let chain_pem = ca.sign(&csr, id, ttl).await?;
    let mut ders = Vec::new();
    for pem in &chain_pem {
        for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
            ders.push(c.map_err(|e| other(&e))?);
        }
    }
    let (leaf, root) = match (ders.first(), ders.last()) {
        (Some(l), Some(r)) if ders.len() >= 2 => (l.clone(), r.clone()),
        _ => {
            return Err(IssueError::Other(format!(
                "CA returned a chain of {} certificates, want leaf..root",
                ders.len()
            )))
        }
    };
    // A leaf for another identity than the one asked is an error.
    let got = spiffe_uri_of(&leaf)?;
    if got != id.to_string() {
        return Err(IssueError::Other(format!(
            "CA issued {got}, asked for {id}"
        )));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| other(&e))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let not_before = to_system(parsed.validity().not_before);
    let not_after = to_system(parsed.validity().not_after);
    let serial = parsed.raw_serial_as_string();
    let mut roots = RootCertStore::empty();
    roots.add(root).map_err(|e| other(&e))?;
    let roots = Arc::new(roots);
    let presented: Vec<CertificateDer<'static>> = ders[..ders.len() - 1].to_vec();
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| other(&e))?;
    let server = tls::server_config(presented.clone(), key_der.clone_key(), roots.clone())?;
    let client = tls::client_config(presented, key_der, roots)?;
    Ok(WorkloadCert {
        identity: id.clone(),
        not_before,
        not_after,
        serial,
        chain_pem,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BuiltinCa;

    fn ca(dir: &std::path::Path) -> Arc<dyn CertificateAuthority> {
        Arc::new(BuiltinCa::load_or_create(dir, "cluster.local").unwrap())
    }

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("identity-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn issues_leaf_for_identity_and_reuses_root() {
        let dir = tmpdir("issue");
        let m = SecretManager::new(ca(&dir), Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "default", "client");
        m.retain(&id);
        let c = m.fetch(&id).await.unwrap();
        assert_eq!(c.identity, id);
        assert_eq!(
            spiffe_uri_of(
                &rustls_pemfile::certs(&mut c.chain_pem[0].as_bytes())
                    .next()
                    .unwrap()
                    .unwrap()
            )
            .unwrap(),
            id.to_string()
        );
        let life = c.not_after.duration_since(c.not_before).unwrap();
        assert!(
            life >= Duration::from_secs(3600) && life <= Duration::from_secs(3700),
            "{life:?}"
        );
        // Reloading the same state dir yields the same root.
        let root1 = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
        let again = BuiltinCa::load_or_create(&dir, "cluster.local").unwrap();
        assert_eq!(again.root_pem(), root1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn renews_at_half_life() {
        let dir = tmpdir("renew");
        let m = SecretManager::new(ca(&dir), Duration::from_secs(4));
        let id = Identity::new("cluster.local", "ns", "sa");
        m.retain(&id);
        let first = m.fetch(&id).await.unwrap();
        // Renewal at half of the 4 s life: by 2.5 s a new cert is in force.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = m.fetch(&id).await.unwrap();
        assert_ne!(first.serial, second.serial);
        m.release(&id);
        assert!(
            m.fetch(&id).await.is_err(),
            "released identity must not be served"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn ca_refuses_csr_for_other_identity() {
        let dir = tmpdir("mismatch");
        let ca = ca(&dir);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/a/sa/evil".try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca
            .sign(
                &csr,
                &Identity::new("cluster.local", "a", "good"),
                Duration::from_secs(60),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
