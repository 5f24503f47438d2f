//! The gRPC channel to istiod: TLS 1.3 only, istiod's certificate verified
//! against the root the operator gives us under the name istiod serves
//! (we may dial it by IP), and the projected service-account token as a
//! bearer credential on every call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use crate::XdsError;

#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `host:port` of istiod's secure gRPC port (15012).
    pub address: String,
    /// The DNS name in istiod's certificate (`istiod.istio-system.svc`).
    pub server_name: String,
    /// PEM roots istiod's certificate chains to.
    pub root_cert: PathBuf,
    /// Service-account token file; re-read on every call, as kubelet rotates it.
    pub token: Option<PathBuf>,
    /// Sent as `clusterid` so a multi-cluster istiod knows which API server to
    /// validate the token with.
    pub cluster_id: String,
}

impl ControlPlane {
    pub fn channel(&self) -> Result<Channel, XdsError> {
        let pem = std::fs::read(&self.root_cert)
            .map_err(|e| XdsError::Config(format!("{}: {e}", self.root_cert.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c =
                c.map_err(|e| XdsError::Config(format!("{}: {e}", self.root_cert.display())))?;
            roots
                .add(c)
                .map_err(|e| XdsError::Config(format!("{}: {e}", self.root_cert.display())))?;
        }
        if roots.is_empty() {
            return Err(XdsError::Config(format!(
                "{}: no PEM certificates",
                self.root_cert.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| XdsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| XdsError::Config(format!("server name {}: {e}", self.server_name)))?;
        let address = self.address.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (tls, name, address) = (tls.clone(), name.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(address.as_str()).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI only names the authority for HTTP/2; the connector dials.
        let uri = format!("http://{}", self.address);
        let ep = Endpoint::from_shared(uri)
            .map_err(|e| XdsError::Config(format!("address {}: {e}", self.address)))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(ep.connect_with_connector_lazy(connector))
    }

    /// Adds the bearer token and cluster id to a request.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), XdsError> {
        let md = req.metadata_mut();
        md.insert(
            "clusterid",
            self.cluster_id
                .parse()
                .map_err(|_| XdsError::Config(format!("cluster id {:?}", self.cluster_id)))?,
        );
        if let Some(path) = &self.token {
            let token = std::fs::read_to_string(path)
                .map_err(|e| XdsError::Token(format!("{}: {e}", path.display())))?;
            let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                XdsError::Token(format!("{}: not a valid header value", path.display()))
            })?;
            md.insert("authorization", value);
        }
        Ok(())
    }
}
