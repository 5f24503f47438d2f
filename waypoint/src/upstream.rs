//! HTTP to an endpoint: to a mesh endpoint each connection is an HBONE
//! CONNECT stream to its ztunnel (15008), carrying HTTP/1.1 (kept alive and
//! reused) or HTTP/2 (one multiplexed connection per endpoint); the HBONE
//! layer pools and multiplexes the TLS connections underneath. An endpoint
//! outside the mesh (a ServiceEntry's) gets plain TCP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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

/// Where to reach `ep` on `port` for a request the client addressed to
/// `like` (a VIP or the pod's own address): in that family when the
/// endpoint has an address of it, so a v6 VIP reaches the v6 pod address
/// through the ztunnel's v6 listener; else at its primary address.
pub fn at(ep: &mesh::Workload, like: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ep.address_like(like), port)
}

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
        // The endpoint's ztunnel, in the family `dst` was chosen in (its
        // node listens on both); the CONNECT authority is `dst` itself.
        let hbone_addr = SocketAddr::new(dst.ip(), hbone::HBONE_PORT);
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

    /// Sends `req` to `ep` at `dst` (one of its addresses: `at` picks it)
    /// and returns the response head; the connection goes back to the idle
    /// set for the next request. `tls` applies to an endpoint outside the
    /// mesh only: mesh endpoints are always reached over HBONE mTLS.
    pub async fn send(
        &self,
        ep: &mesh::Workload,
        dst: SocketAddr,
        req: Request<Body>,
        h2: bool,
        tls: Option<&Origination<'_>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let tls = tls.filter(|_| ep.protocol == mesh::TunnelProtocol::None);
        let key = key(dst, h2, tls);
        let mut sender = match self.checkout(&key) {
            Some(s) => s,
            // Boxed: a dial's state (TLS, HBONE pool, handshakes) is
            // kilobytes; inline, every request's future would carry and
            // move it though most reuse a pooled connection.
            None => Box::pin(self.connect(ep, dst, h2, tls)).await?,
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
        dst: SocketAddr,
        req: Request<Body>,
        tls: Option<&Origination<'_>>,
    ) -> Result<(Response<Incoming>, Option<hbone::StreamGuard>), ProxyError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each pod's addresses in the order its status lists them (the first
    /// is the primary).
    #[test]
    fn endpoints_are_reached_in_the_family_the_client_addressed() {
        let pod = |n: &str, ips: &[&str]| {
            let list: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
            format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: a}}\nspec: {{nodeName: n}}\nstatus: {{podIP: '{}', podIPs: [{}]}}\n", ips[0], list.join(", "))
        };
        let yaml = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n".to_string(),
            pod("v4-first", &["10.0.0.1", "fd00::1"]),
            pod("v6-first", &["fd00::2", "10.0.0.2"]),
            pod("v4-only", &["10.0.0.3"]),
            pod("v6-only", &["fd00::4"]),
        ]
        .concat();
        let st = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let (v4, v6): (IpAddr, IpAddr) =
            ("10.96.0.1".parse().unwrap(), "fd00:96::1".parse().unwrap());
        let cases = [
            ("v4-first", v4, "10.0.0.1:8080"),
            ("v4-first", v6, "[fd00::1]:8080"),
            ("v6-first", v4, "10.0.0.2:8080"),
            ("v6-first", v6, "[fd00::2]:8080"),
            // No address of that family: the primary, as ztunnel does.
            ("v4-only", v6, "10.0.0.3:8080"),
            ("v6-only", v4, "[fd00::4]:8080"),
        ];
        for (name, like, want) in cases {
            let w = st.workload_by_name("a", name).unwrap();
            assert_eq!(at(w, like, 8080).to_string(), want, "{name} for {like}");
        }
    }
}
