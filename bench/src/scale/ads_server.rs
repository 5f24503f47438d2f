//! The load-generating xDS server: a delta-ADS gRPC endpoint (the server
//! side xds generates from the same discovery.proto its client uses) that
//! hands each client stream to the bench, which then pushes exactly the
//! responses it wants to measure and reads the client's ACKs.
//!
//! The real client only speaks TLS 1.3 to a server it verifies by name, so
//! the server presents a certificate for `istiod.istio-system.svc` issued by
//! a root made with the identity crate's built-in CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::PrivatePkcs8KeyDer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use crate::sys::mono_ns;

/// The name istiod's certificate carries and the client checks.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// A root from the built-in CA in `dir` (its `root-cert.pem` is what the
/// client trusts) and a TLS 1.3 acceptor presenting a certificate for
/// [`SERVER_NAME`] signed by it. The built-in CA itself only signs SPIFFE
/// workload CSRs, so the server leaf is signed here with its root key.
fn server_tls(dir: &Path) -> anyhow::Result<(PathBuf, tokio_rustls::TlsAcceptor)> {
    let ca = identity::BuiltinCa::load_or_create(dir, "cluster.local")?;
    let root_key = std::fs::read_to_string(dir.join("root-key.pem")).context("root key")?;
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(ca.root_pem(), rcgen::KeyPair::from_pem(&root_key)?)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((
        dir.join("root-cert.pem"),
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
    ))
}

/// One client's delta-ADS stream, as the bench drives it.
pub struct Session {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    nonce: u64,
    version: u64,
}

/// A change to push: bodies to add or replace, names to remove.
#[derive(Default)]
pub struct Delta {
    pub upsert: Vec<(String, Vec<u8>)>,
    pub remove: Vec<String>,
}

struct Ads {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        // A small queue: the bench pushes one response and waits for its
        // ACK, so more room would only hide back-pressure.
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            requests: req.into_inner(),
            responses: tx,
            nonce: 0,
            version: 0,
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("the bench is not accepting streams"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub struct Server {
    pub address: String,
    pub root_cert: PathBuf,
    sessions: mpsc::Receiver<Session>,
}

impl Server {
    /// Listens on an ephemeral loopback port and serves until the process
    /// exits. TLS and HTTP/2 are set up by hand (tokio-rustls, hyper) rather
    /// than with tonic's server builder, which needs tonic's `router`
    /// feature (axum) that nothing else in the workspace builds.
    pub async fn start(dir: &Path) -> anyhow::Result<Server> {
        let (root_cert, tls) = server_tls(dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let (tx, sessions) = mpsc::channel(1);
        let svc = AggregatedDiscoveryServiceServer::new(Ads { sessions: tx })
            // The client accepts 64 MiB; a 50k-pod initial push is ~15 MB.
            .max_encoding_message_size(64 << 20);
        tokio::spawn(async move {
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::error!(error = %e, "bench xDS server: accept");
                        return;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (tls, svc) = (tls.clone(), svc.clone());
                tokio::spawn(async move {
                    let stream = match tls.accept(tcp).await {
                        Ok(s) => s,
                        Err(e) => return tracing::warn!(error = %e, "bench xDS server: TLS"),
                    };
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "bench xDS server: connection ended");
                    }
                });
            }
        });
        Ok(Server {
            address,
            root_cert,
            sessions,
        })
    }

    /// The next client stream, once it has subscribed to `types` (one
    /// request each, as the client opens every stream).
    pub async fn accept(&mut self, types: &[&str]) -> anyhow::Result<Session> {
        let mut s = tokio::time::timeout(Duration::from_secs(60), self.sessions.recv())
            .await
            .context("no xDS client connected within 60 s")?
            .context("server gone")?;
        for want in types {
            let req = s.next_request().await?;
            if req.type_url != *want || !req.response_nonce.is_empty() {
                bail!(
                    "expected a subscription to {want}, got type {} nonce {:?}",
                    req.type_url,
                    req.response_nonce
                );
            }
        }
        Ok(s)
    }
}

impl Session {
    async fn next_request(&mut self) -> anyhow::Result<DeltaDiscoveryRequest> {
        // Generous: only a wedged client takes this long; it keeps a broken
        // run from hanging, it is not a measurement.
        match tokio::time::timeout(Duration::from_secs(300), self.requests.message()).await {
            Err(_) => bail!("no request from the xDS client within 300 s"),
            Ok(Err(e)) => bail!("xDS client stream: {e}"),
            Ok(Ok(None)) => bail!("xDS client closed its stream"),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }

    /// Sends one delta response; returns its nonce, the monotonic time just
    /// before it was handed to the gRPC stream (encoding, transport and the
    /// client's work all come after) and its encoded size.
    pub async fn push(
        &mut self,
        type_url: &str,
        delta: Delta,
    ) -> anyhow::Result<(String, u64, usize)> {
        self.nonce += 1;
        self.version += 1;
        let version = self.version.to_string();
        let resources = delta
            .upsert
            .into_iter()
            .map(|(name, value)| Resource {
                version: version.clone(),
                name,
                aliases: Vec::new(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_string(),
                    value,
                }),
            })
            .collect();
        let nonce = format!("n{}", self.nonce);
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            removed_resources: delta.remove,
        };
        let bytes = prost::Message::encoded_len(&resp);
        let sent = mono_ns();
        self.responses
            .send(Ok(resp))
            .await
            .map_err(|_| anyhow::anyhow!("xDS client stream closed"))?;
        Ok((nonce, sent, bytes))
    }

    /// Waits for the ACK of `nonce`; a NACK is an error naming what the
    /// client refused (the generated mesh must be accepted whole).
    pub async fn ack(&mut self, nonce: &str) -> anyhow::Result<()> {
        loop {
            let req = self.next_request().await?;
            if req.response_nonce != nonce {
                tracing::warn!(got = %req.response_nonce, want = %nonce, "out-of-order xDS request");
                continue;
            }
            if let Some(e) = req.error_detail {
                bail!("client NACKed {nonce}: {}", e.message);
            }
            return Ok(());
        }
    }
}
