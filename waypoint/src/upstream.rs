//! HTTP to an endpoint: to a mesh endpoint each connection is an HBONE
//! CONNECT stream to its ztunnel (15008), carrying HTTP/1.1 (kept alive and
//! reused) or HTTP/2 (one multiplexed connection per endpoint); the HBONE
//! layer pools and multiplexes the TLS connections underneath. An endpoint
//! outside the mesh (a ServiceEntry's) gets plain TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use identity::{Identity, SecretManager};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies both ways: a client's streaming request body may fail with its
/// own error, so the error is boxed rather than hyper's.
pub type Body = BoxBody<Bytes, BoxError>;

use crate::error::ProxyError;
use crate::origin_tls::Origination;

/// How long reaching an endpoint may take (TCP, and TLS when originated):
/// Envoy's default cluster `connectTimeout`, which Istio keeps.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Pooled connections are per endpoint, protocol and, for originated TLS,
/// the settings and server name (a connection made under other settings is
/// not reused).
type Key = (
    SocketAddr,
    bool,
    Option<(mesh::upstream_tls::UpstreamTls, String)>,
);

fn key(dst: SocketAddr, h2: bool, tls: Option<&Origination>) -> Key {
    (
        dst,
        h2,
        tls.map(|o| (o.tls.clone(), o.server_name().to_string())),
    )
}

/// A connection to an endpoint, whichever way it was made.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
pub type Conn = Box<dyn Io>;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

pub struct Upstreams {
    pool: Arc<hbone::Pool>,
    certs: Arc<SecretManager>,
    identity: Identity,
    /// Idle HTTP/1.1 connections and the HTTP/2 connection, per endpoint.
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
}

impl Upstreams {
    pub fn new(certs: Arc<SecretManager>, identity: Identity) -> Self {
        Upstreams {
            pool: hbone::Pool::new(),
            certs,
            identity,
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn pool(&self) -> &hbone::Pool {
        &self.pool
    }

    /// A raw CONNECT stream (L4 passthrough) over the same pool.
    pub async fn pool_connect<D, F>(
        &self,
        key: hbone::PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
        dst: SocketAddr,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, hbone::StreamGuard), hbone::Error>
    where
        D: FnOnce() -> F,
        F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
    {
        self.pool
            .connect(key, tls, dial, &dst.to_string(), http::HeaderMap::new())
            .await
    }

    fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(key)?;
        // Closed connections go; busy HTTP/1.1 ones (a response body still
        // streaming) stay for later; the first ready one is taken.
        list.retain(|s| match s {
            Sender::H1(c) => !c.is_closed(),
            Sender::H2(c) => !c.is_closed(),
        });
        let i = list.iter().position(|s| match s {
            Sender::H1(c) => c.is_ready(),
            Sender::H2(c) => c.is_ready(),
        })?;
        match &list[i] {
            // Multiplexed: it stays available to others too.
            Sender::H2(c) => Some(Sender::H2(c.clone())),
            Sender::H1(_) => Some(list.swap_remove(i)),
        }
    }

    fn checkin(&self, key: Key, s: Sender) {
        if let Sender::H2(_) = s {
            return; // the pooled clone is already there
        }
        self.idle.lock().unwrap().entry(key).or_default().push(s);
    }

    /// A byte stream to `dst`: an HBONE stream for a mesh endpoint (the
    /// guard counts it), plain TCP for one outside the mesh, or TLS over it
    /// when `tls` says so (`h2` picks the ALPN).
    async fn tunnel(
        &self,
        ep: &mesh::Workload,
        dst: SocketAddr,
        tls: Option<&Origination<'_>>,
        h2: bool,
    ) -> Result<(TokioIo<Conn>, Option<hbone::StreamGuard>), ProxyError> {
        if ep.protocol == mesh::TunnelProtocol::None {
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(dst)
                    .await
                    .map_err(|e| ProxyError::Connect(format!("{dst}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let io: Conn = match tls {
                    Some(o) => Box::new(
                        crate::origin_tls::connect(o, h2, tcp)
                            .await
                            .map_err(|e| ProxyError::Connect(e.to_string()))?,
                    ),
                    None => Box::new(tcp),
                };
                Ok(io)
            };
            // Bounded on its own: the route timeout starts only once the
            // request body is read, which waits for this connection.
            let io = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    ProxyError::Connect(format!("{dst}: no connection within {CONNECT_TIMEOUT:?}"))
                })??;
            return Ok((TokioIo::new(io), None));
        }
        let cert = self
            .certs
            .fetch(&self.identity)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let hbone_addr = SocketAddr::new(ep.ip, hbone::HBONE_PORT);
        let key = hbone::PoolKey {
            source: "waypoint".into(),
            dst_identity: ep.identity(),
            dst: hbone_addr,
        };
        let dial = move || async move {
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(hbone_addr))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        };
        let (send, recv, guard) = self
            .pool
            .connect(
                key,
                cert.client.clone(),
                dial,
                &dst.to_string(),
                http::HeaderMap::new(),
            )
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        let io: Conn = Box::new(hbone::StreamIo::new(send, recv));
        Ok((TokioIo::new(io), Some(guard)))
    }

    async fn connect(
        &self,
        ep: &mesh::Workload,
        dst: SocketAddr,
        h2: bool,
        tls: Option<&Origination<'_>>,
    ) -> Result<Sender, ProxyError> {
        let (io, guard) = self.tunnel(ep, dst, tls, h2).await?;
        if h2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| ProxyError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(guard);
            });
            let s2 = s.clone();
            self.idle
                .lock()
                .unwrap()
                .entry(key(dst, true, tls))
                .or_default()
                .push(Sender::H2(s2));
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = http1::handshake(io)
                .await
                .map_err(|e| ProxyError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(guard);
            });
            Ok(Sender::H1(s))
        }
    }

    /// Sends `req` to `ep` (port `port`) and returns the response head; the
    /// connection goes back to the idle set for the next request. `tls`
    /// applies to an endpoint outside the mesh only: mesh endpoints are
    /// always reached over HBONE mTLS.
    pub async fn send(
        &self,
        ep: &mesh::Workload,
        port: u16,
        req: Request<Body>,
        h2: bool,
        tls: Option<&Origination<'_>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let dst = SocketAddr::new(ep.ip, port);
        let tls = tls.filter(|_| ep.protocol == mesh::TunnelProtocol::None);
        let key = key(dst, h2, tls);
        let mut sender = match self.checkout(&key) {
            Some(s) => s,
            None => self.connect(ep, dst, h2, tls).await?,
        };
        let resp = match &mut sender {
            Sender::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| ProxyError::Reset(e.to_string()))?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| ProxyError::Reset(e.to_string()))?;
                s.send_request(req).await
            }
        }
        .map_err(|e| ProxyError::Reset(e.to_string()))?;
        self.checkin(key, sender);
        Ok(resp)
    }

    /// Sends an HTTP/1.1 upgrade request on a connection of its own (it
    /// becomes the tunnel, so it is never pooled). The guard keeps the
    /// HBONE stream counted for as long as the caller holds it.
    pub async fn send_upgrade(
        &self,
        ep: &mesh::Workload,
        port: u16,
        req: Request<Body>,
        tls: Option<&Origination<'_>>,
    ) -> Result<(Response<Incoming>, Option<hbone::StreamGuard>), ProxyError> {
        let dst = SocketAddr::new(ep.ip, port);
        let tls = tls.filter(|_| ep.protocol == mesh::TunnelProtocol::None);
        let (io, guard) = self.tunnel(ep, dst, tls, false).await?;
        let (mut s, conn) = http1::handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            // Ends when the upgrade hands the connection over.
            let _ = conn.with_upgrades().await;
        });
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| ProxyError::Reset(e.to_string()))?;
        Ok((resp, guard))
    }
}
