use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Method, Request, StatusCode};
use identity::Identity;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::Error;

/// One pooled connection carries tunnels for one (source, destination
/// identity, destination address), as upstream pools them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The local workload the tunnels are for (its uid): its netns and cert.
    pub source: String,
    pub dst_identity: Identity,
    pub dst: SocketAddr,
}

struct Conn {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Conn>>>,
    gates: Mutex<HashMap<PoolKey, Arc<DialGate>>>,
}

/// One dial at a time per key: callers that find no room wait for the dial
/// in flight and use its connection instead of each opening their own (a
/// burst used to open several). A failed dial is shared with those who
/// waited on it, so a dead peer costs them one timeout, not one each.
#[derive(Default)]
struct DialGate {
    turn: tokio::sync::Mutex<()>,
    /// When the last dial through this gate failed, and why.
    failed: Mutex<Option<(Instant, String)>>,
}

async fn open(
    send: SendRequest<Bytes>,
    authority: &str,
    headers: HeaderMap,
) -> Result<(SendStream<Bytes>, RecvStream), Error> {
    let mut send = send.ready().await?;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())?;
    *req.headers_mut() = headers;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = resp.await?;
    if resp.status() != StatusCode::OK {
        return Err(Error::Refused {
            authority: authority.to_string(),
            status: resp.status(),
        });
    }
    Ok((stream, resp.into_body()))
}

type Handshaken = (
    SendRequest<Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<tokio::io::BufReader<TcpStream>>, Bytes>,
);

/// TCP, TLS (the server must prove `want`), then the HTTP/2 preface.
async fn handshake<D, F>(
    addr: SocketAddr,
    want: &Identity,
    tls: Arc<rustls::ClientConfig>,
    dial: D,
) -> Result<Handshaken, Error>
where
    D: FnOnce() -> F,
    F: Future<Output = std::io::Result<TcpStream>>,
{
    let tcp = dial()
        .await
        .map_err(|source| Error::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio_rustls::TlsConnector::from(tls)
        .connect(
            ServerName::IpAddress(addr.ip().into()),
            crate::read_buffered(tcp),
        )
        .await
        .map_err(|source| Error::Tls { addr, source })?;
    let got = identity::peer_identity(tls.get_ref().1)
        .map_err(|source| Error::PeerIdentity { addr, source })?;
    if &got != want {
        return Err(Error::WrongPeer {
            addr,
            got: got.to_string(),
            want: want.to_string(),
        });
    }
    crate::tune_tls(tls.get_mut().1);
    Ok(h2::client::Builder::new()
        .initial_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW)
        .max_frame_size(crate::MAX_FRAME)
        .max_send_buffer_size(crate::MAX_FRAME as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await?)
}

/// A held slot on a pooled connection: released when the tunnel ends.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

const IDLE_RELEASE: Duration = Duration::from_secs(300);

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Pool::default())
    }

    fn checkout(
        &self,
        key: &PoolKey,
    ) -> Option<(SendRequest<Bytes>, StreamGuard, Arc<AtomicBool>)> {
        let mut conns = self.conns.lock().unwrap();
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Relaxed));
        let c = list
            .iter()
            .find(|c| c.active.load(Ordering::Relaxed) < crate::MAX_STREAMS_PER_CONN)?;
        c.active.fetch_add(1, Ordering::Relaxed);
        Some((
            c.send.clone(),
            StreamGuard(c.active.clone()),
            c.closed.clone(),
        ))
    }

    /// Opens a CONNECT tunnel to `authority` over a pooled connection to
    /// `key.dst`, dialing (with `dial`) and handshaking a new one when none
    /// has room. The server must prove `key.dst_identity`.
    pub async fn connect<D, F>(
        self: &Arc<Self>,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
        authority: &str,
        headers: HeaderMap,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamGuard), Error>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        if let Some((send, guard, closed)) = self.checkout(&key) {
            match open(send, authority, headers.clone()).await {
                Ok((s, r)) => return Ok((s, r, guard)),
                // The peer answered: that is the answer.
                Err(e @ Error::Refused { .. }) => return Err(e),
                // A pooled connection can die unnoticed (the peer restarted):
                // retire it and dial once afresh rather than fail the caller.
                Err(e) => {
                    tracing::debug!(dst = %key.dst, error = %e, "pooled HBONE connection unusable; redialing");
                    closed.store(true, Ordering::Relaxed);
                }
            }
        }
        let (send, guard) = self.dial_once(&key, tls, dial).await?;
        let (s, r) = open(send, authority, headers).await?;
        Ok((s, r, guard))
    }

    /// A slot on a connection for `key`: one another caller dialed while we
    /// waited our turn, or one we dial now.
    async fn dial_once<D, F>(
        self: &Arc<Self>,
        key: &PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), Error>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let gate = self
            .gates
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let asked = Instant::now();
        let result = async {
            let _turn = gate.turn.lock().await;
            if let Some((at, reason)) = gate.failed.lock().unwrap().clone() {
                if at >= asked {
                    return Err(Error::DialFailed {
                        addr: key.dst,
                        reason,
                    });
                }
            }
            if let Some((send, guard, _)) = self.checkout(key) {
                return Ok((send, guard));
            }
            self.dial(key, tls, dial).await.inspect_err(|e| {
                *gate.failed.lock().unwrap() = Some((Instant::now(), e.to_string()));
            })
        }
        .await;
        // The map's reference and ours: nobody else waits on this gate.
        let mut gates = self.gates.lock().unwrap();
        if Arc::strong_count(&gate) == 2 {
            gates.remove(key);
        }
        result
    }

    async fn dial<D, F>(
        self: &Arc<Self>,
        key: &PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), Error>
    where
        D: FnOnce() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let addr = key.dst;
        let (send, mut conn) = tokio::time::timeout(
            crate::HANDSHAKE_TIMEOUT,
            handshake(addr, &key.dst_identity, tls, dial),
        )
        .await
        .map_err(|_| Error::HandshakeTimeout { addr })??;
        let active = Arc::new(AtomicUsize::new(1));
        let closed = Arc::new(AtomicBool::new(false));
        let (c, a) = (closed.clone(), active.clone());
        let keepalive = crate::keepalive::unanswered(conn.ping_pong());
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "HBONE connection ended");
                },
                // Dropping the connection fails its streams, so their
                // clients see the end instead of a hang.
                _ = keepalive => tracing::warn!(%addr, timeout = ?crate::KEEPALIVE_TIMEOUT, "HBONE peer stopped answering PINGs; connection dropped"),
            }
            c.store(true, Ordering::Relaxed);
        });
        self.conns
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(Conn {
                send: send.clone(),
                active: active.clone(),
                closed: closed.clone(),
            });
        self.spawn_idle_reaper(key.clone(), a, closed);
        Ok((send, StreamGuard(active)))
    }

    /// Drops a connection from the pool after it has carried nothing for
    /// IDLE_RELEASE; h2 then closes it once the last handle is gone.
    fn spawn_idle_reaper(
        self: &Arc<Self>,
        key: PoolKey,
        active: Arc<AtomicUsize>,
        closed: Arc<AtomicBool>,
    ) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut idle_for = Duration::ZERO;
            let tick = Duration::from_secs(5);
            while !closed.load(Ordering::Relaxed) {
                tokio::time::sleep(tick).await;
                idle_for = if active.load(Ordering::Relaxed) == 0 {
                    idle_for + tick
                } else {
                    Duration::ZERO
                };
                if idle_for >= IDLE_RELEASE {
                    closed.store(true, Ordering::Relaxed);
                }
            }
            if let Some(pool) = pool.upgrade() {
                let mut conns = pool.conns.lock().unwrap();
                if let Some(list) = conns.get_mut(&key) {
                    list.retain(|c| !Arc::ptr_eq(&c.closed, &closed));
                    if list.is_empty() {
                        conns.remove(&key);
                    }
                }
            }
        });
    }

    /// Pooled connections per destination, for the admin dump.
    pub fn stats(&self) -> Vec<(PoolKey, usize, usize)> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.len(),
                    v.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                )
            })
            .collect()
    }

    /// Closes every pooled connection (drain): new tunnels dial afresh.
    pub fn clear(&self) {
        self.conns.lock().unwrap().clear();
    }
}
