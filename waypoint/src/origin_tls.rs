//! TLS the waypoint originates to an endpoint outside the mesh, per the
//! DestinationRule's `trafficPolicy.tls`: rustls, the roots from
//! `caCertificates` (else the system bundle), the server name from `sni`
//! (else the destination's host) verified against the certificate (or, when
//! the rule lists `subjectAltNames`, any one of those), a client
//! certificate for MUTUAL. Files are read (off the runtime's
//! threads) for each new connection, so rotated files apply to the next one.

use std::path::Path;
use std::sync::Arc;

use mesh::secret::TlsSecret;
use mesh::upstream_tls::UpstreamTls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

/// Where roots come from when the rule names none (Debian's bundle).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum OriginTlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("server name {0:?}")]
    Name(String),
    #[error("tls config: {0}")]
    Config(#[from] rustls::Error),
    #[error("certificate verifier: {0}")]
    Verifier(String),
    #[error("tls handshake with {server}: {why}")]
    Handshake { server: String, why: std::io::Error },
}

/// TLS as the rule says, for a connection to `host` (the fallback SNI).
pub struct Origination<'a> {
    pub tls: &'a UpstreamTls,
    pub host: &'a str,
    /// The `credentialName` Secret, when the rule names one.
    pub secret: Option<&'a TlsSecret>,
}

impl Origination<'_> {
    pub fn server_name(&self) -> &str {
        self.tls.sni.as_deref().unwrap_or(self.host)
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, OriginTlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| OriginTlsError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, OriginTlsError> {
    let bad = |why: String| OriginTlsError::File {
        path: path.display().to_string(),
        why,
    };
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate".into()));
    }
    Ok(certs)
}

/// How errors name a part of the rule's Secret (in place of a file path).
fn secret_part(o: &Origination<'_>, part: &str) -> std::path::PathBuf {
    match &o.tls.credential {
        Some((ns, name)) => format!("Secret {ns}/{name} {part}").into(),
        None => part.into(),
    }
}

async fn config(o: &Origination<'_>, h2: bool) -> Result<ClientConfig, OriginTlsError> {
    let t = o.tls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        // The Secret's ca.crt, else the rule's file, else the system's.
        let (path, pem) = match o.secret.and_then(|s| s.ca.clone()) {
            Some(ca) => (secret_part(o, "ca.crt"), ca.to_vec()),
            None => {
                let path = t
                    .ca_certificates
                    .as_deref()
                    .unwrap_or(Path::new(SYSTEM_BUNDLE));
                (path.to_path_buf(), read(path).await?)
            }
        };
        let path = path.as_path();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certs(path, &pem)?);
        if added == 0 {
            return Err(OriginTlsError::File {
                path: path.display().to_string(),
                why: "no usable CA certificate".into(),
            });
        }
        if t.subject_alt_names.is_empty() {
            builder.with_root_certificates(roots)
        } else {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| OriginTlsError::Verifier(e.to_string()))?;
            let names = t
                .subject_alt_names
                .iter()
                .map(|n| {
                    ServerName::try_from(n.clone()).map_err(|_| OriginTlsError::Name(n.clone()))
                })
                .collect::<Result<_, _>>()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyOfNames { inner, names }))
        }
    };
    let client = match (&t.client_cert, o.secret) {
        (Some((cert, key)), _) => Some((
            certs(cert, &read(cert).await?)?,
            key.to_path_buf(),
            read(key).await?,
        )),
        (None, Some(s)) if t.mutual => {
            let missing = |part: &str| OriginTlsError::File {
                path: secret_part(o, part).display().to_string(),
                why: "missing: MUTUAL needs it".into(),
            };
            let chain = s.cert_chain.as_deref().ok_or_else(|| missing("tls.crt"))?;
            let key = s.key.as_deref().ok_or_else(|| missing("tls.key"))?;
            Some((
                certs(&secret_part(o, "tls.crt"), chain)?,
                secret_part(o, "tls.key"),
                key.to_vec(),
            ))
        }
        (None, _) => None,
    };
    let mut cfg = match client {
        Some((chain, key, pem)) => {
            let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &pem[..])
                .ok()
                .flatten()
                .ok_or_else(|| OriginTlsError::File {
                    path: key.display().to_string(),
                    why: "no PEM private key".into(),
                })?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(cfg)
}

/// The TLS handshake over `tcp`.
pub async fn connect(
    o: &Origination<'_>,
    h2: bool,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, OriginTlsError> {
    let name = o.server_name().to_string();
    let server =
        ServerName::try_from(name.clone()).map_err(|_| OriginTlsError::Name(name.clone()))?;
    let cfg = config(o, h2).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(server, tcp)
        .await
        .map_err(|why| OriginTlsError::Handshake { server: name, why })
}

/// `subjectAltNames`: the chain is verified as for any server, and the
/// certificate must name one of the listed names, whatever server name was
/// sent (Envoy's `match_typed_subject_alt_names`).
#[derive(Debug)]
struct AnyOfNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames to match".into());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify: true`: any certificate is taken, signatures still
/// have to be well formed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
