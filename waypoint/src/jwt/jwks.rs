//! Key sets for RequestAuthentication rules: inline ones parsed once,
//! `jwksUri` ones fetched by the waypoint itself over HTTPS (istiod would
//! fetch and inline them for Envoy; this waypoint has no istiod in between).
//!
//! A fetch runs on its own task, never under a lock; requests wait for it
//! (up to the rule's `timeout`) only when they have no usable key. Keys are
//! refreshed after `refresh`, and fetched again early when a token names a
//! `kid` the set lacks (a rotation), at most once per `min_refetch` per
//! URI so unknown kids cannot make the waypoint hammer the provider. A
//! fetch that fails keeps the last good keys; with none, tokens of that
//! issuer are rejected (fail closed), never accepted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::watch;

use crate::error::JwtReject;

/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub struct Jwks {
    tls: Arc<ClientConfig>,
    refresh: Duration,
    min_refetch: Duration,
    remote: Mutex<HashMap<String, Arc<Remote>>>,
    inline: Mutex<HashMap<String, Arc<JwkSet>>>,
}

struct Remote {
    uri: String,
    state: Mutex<RemoteState>,
    /// Bumped when a fetch ends, whatever its outcome.
    done: watch::Sender<u64>,
}

#[derive(Default)]
struct RemoteState {
    keys: Option<(Arc<JwkSet>, Instant)>,
    fetching: bool,
    last_attempt: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("CA bundle {path}: {why}")]
    Ca { path: String, why: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl Jwks {
    /// `ca`: PEM roots trusted for `jwksUri` servers besides the system's
    /// (an operator's private CA).
    pub fn new(
        ca: Option<&Path>,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Self, JwksError> {
        let mut roots = RootCertStore::empty();
        let mut add = |path: &Path, required: bool| -> Result<(), JwksError> {
            let err = |why: String| JwksError::Ca {
                path: path.display().to_string(),
                why,
            };
            let pem = match std::fs::read(path) {
                Ok(p) => p,
                Err(_) if !required => return Ok(()),
                Err(e) => return Err(err(e.to_string())),
            };
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| err(e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if required && added == 0 {
                return Err(err("no usable CA certificate".into()));
            }
            Ok(())
        };
        add(Path::new(SYSTEM_BUNDLE), false)?;
        if let Some(ca) = ca {
            add(ca, true)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Jwks {
            tls: Arc::new(cfg),
            refresh,
            min_refetch,
            remote: Mutex::default(),
            inline: Mutex::default(),
        })
    }

    /// An inline JWKS, parsed once per distinct text.
    pub fn inline(&self, text: &str) -> Result<Arc<JwkSet>, JwtReject> {
        if let Some(k) = self.inline.lock().unwrap().get(text) {
            return Ok(k.clone());
        }
        let keys: JwkSet = serde_json::from_str(text).map_err(|e| {
            tracing::warn!(error = %e, "inline JWKS does not parse: its tokens are rejected");
            JwtReject::NoKey
        })?;
        let keys = Arc::new(keys);
        let mut inline = self.inline.lock().unwrap();
        // Bounded: past this many distinct texts (config churn) the memo
        // starts over.
        if inline.len() > 256 {
            inline.clear();
        }
        inline.insert(text.to_string(), keys.clone());
        Ok(keys)
    }

    /// The keys of `uri`, fetching them first when there are none, they
    /// are stale, or they lack `kid`.
    pub async fn remote(
        &self,
        uri: &str,
        kid: Option<&str>,
        timeout: Duration,
    ) -> Result<Arc<JwkSet>, JwtReject> {
        let entry = {
            let mut m = self.remote.lock().unwrap();
            m.entry(uri.to_string())
                .or_insert_with(|| {
                    Arc::new(Remote {
                        uri: uri.to_string(),
                        state: Mutex::default(),
                        done: watch::Sender::new(0),
                    })
                })
                .clone()
        };
        // Subscribed before the state is read: a fetch ending in between
        // is not missed.
        let mut done = entry.done.subscribe();
        let now = Instant::now();
        let wait = {
            let mut st = entry.state.lock().unwrap();
            let usable = st
                .keys
                .as_ref()
                .is_some_and(|(k, _)| super::verify::has_key(k, kid));
            let stale = st
                .keys
                .as_ref()
                .is_some_and(|(_, at)| now.duration_since(*at) >= self.refresh);
            let recent = st
                .last_attempt
                .is_some_and(|t| now.duration_since(t) < self.min_refetch);
            if !st.fetching && (stale || (!usable && !recent)) {
                st.fetching = true;
                st.last_attempt = Some(now);
                tokio::spawn(fetch_into(entry.clone(), self.tls.clone(), timeout));
            }
            !usable && st.fetching
        };
        if wait {
            let _ = tokio::time::timeout(timeout, done.changed()).await;
        }
        let st = entry.state.lock().unwrap();
        st.keys
            .as_ref()
            .map(|(k, _)| k.clone())
            .ok_or(JwtReject::JwksFetch)
    }
}

async fn fetch_into(entry: Arc<Remote>, tls: Arc<ClientConfig>, timeout: Duration) {
    let r = match tokio::time::timeout(timeout, fetch(&entry.uri, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    {
        let mut st = entry.state.lock().unwrap();
        st.fetching = false;
        match r {
            Ok(keys) => {
                tracing::info!(uri = %entry.uri, keys = keys.keys.len(), "JWKS fetched");
                st.keys = Some((Arc::new(keys), Instant::now()));
            }
            Err(why) => {
                tracing::warn!(uri = %entry.uri, error = %why, kept_old_keys = st.keys.is_some(), "JWKS fetch failed");
                metrics::counter!("istio_waypoint_jwks_fetch_failures_total").increment(1);
            }
        }
    }
    entry.done.send_modify(|g| *g += 1);
}

/// One HTTPS GET of the key set.
async fn fetch(uri: &str, tls: Arc<ClientConfig>) -> Result<JwkSet, String> {
    let u: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
    let host = u.host().ok_or("no host")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("server name: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let path = u.path_and_query().map_or("/", |p| p.as_str());
    let authority = u.authority().map_or(host.as_str(), |a| a.as_str());
    let req = http::Request::get(path)
        .header("host", authority)
        .header("accept", "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
}
