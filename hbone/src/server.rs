use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

/// An HBONE connection after TLS: the stream `serve` takes.
pub type TlsConn = tokio_rustls::server::TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>;

/// Why an accepted TCP connection never became an HBONE peer.
#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("TLS handshake refused: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out after {:?}", crate::HANDSHAKE_TIMEOUT)]
    Timeout,
    #[error("peer has no usable SPIFFE identity: {0}")]
    Identity(identity::TlsError),
}

impl TerminateError {
    /// The `reason` label of the handshake-failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            TerminateError::Handshake(_) => "handshake",
            TerminateError::Timeout => "timeout",
            TerminateError::Identity(_) => "identity",
        }
    }
}

/// Terminates HBONE's mTLS on an accepted connection (within
/// `HANDSHAKE_TIMEOUT`): the TLS stream, and the peer's identity as its
/// verified certificate says, which is the only source of it.
pub async fn terminate(
    cfg: std::sync::Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
) -> Result<(TlsConn, identity::Identity), TerminateError> {
    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(crate::read_buffered(tcp));
    let mut tls = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, accept)
        .await
        .map_err(|_| TerminateError::Timeout)?
        .map_err(TerminateError::Handshake)?;
    let id = identity::peer_identity(tls.get_ref().1).map_err(TerminateError::Identity)?;
    crate::tune_tls(tls.get_mut().1);
    Ok((tls, id))
}

/// One CONNECT request received over HBONE, not yet answered.
pub struct Inbound {
    pub authority: SocketAddr,
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

/// Why a served HBONE connection ended other than by the peer closing it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("no HTTP/2 preface within {:?}", crate::HANDSHAKE_TIMEOUT)]
    HandshakeTimeout,
    #[error("peer stopped answering PINGs for {:?}", crate::KEEPALIVE_TIMEOUT)]
    Unresponsive,
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

impl Inbound {
    /// Answers 200: the tunnel is open.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), InboundError> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok((send, self.recv))
    }

    /// Answers with a refusal status (401/403 policy, 503 no upstream...).
    pub fn refuse(mut self, status: StatusCode) {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("static response");
        let _ = self.respond.send_response(resp, true);
    }
}

/// Serves CONNECT streams on one established (TLS) connection until the peer
/// closes it or `drain` fires; on drain the connection goes away gracefully
/// (GOAWAY) and live streams finish. Anything that is not a well-formed
/// CONNECT to `ip:port` is refused here, before the handler sees it.
pub async fn serve<IO, H, Fut>(
    io: IO,
    mut drain: tokio::sync::watch::Receiver<bool>,
    handler: H,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Inbound) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW)
        .max_frame_size(crate::MAX_FRAME)
        .max_send_buffer_size(crate::MAX_FRAME as usize)
        .max_concurrent_streams(crate::MAX_STREAMS_PER_CONN as u32)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout)??;
    let keepalive = crate::keepalive::unanswered(conn.ping_pong());
    tokio::pin!(keepalive);
    let mut draining = *drain.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            _ = &mut keepalive => return Err(ServeError::Unresponsive),
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (req, mut respond) = next?;
        let refuse = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
            let _ =
                respond.send_response(Response::builder().status(status).body(()).unwrap(), true);
        };
        if req.method() != Method::CONNECT {
            refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
            continue;
        }
        let authority = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(authority) = authority else {
            tracing::debug!(uri = %req.uri(), "CONNECT authority is not ip:port");
            refuse(&mut respond, StatusCode::BAD_REQUEST);
            continue;
        };
        let (parts, recv) = req.into_parts();
        tokio::spawn(handler(Inbound {
            authority,
            headers: parts.headers,
            respond,
            recv,
        }));
    }
}

/// Logs how a served connection ended: a peer that never spoke HTTP/2 or went
/// silent is worth an operator's attention, an ordinary close is not.
pub fn log_end(peer: SocketAddr, result: Result<(), ServeError>) {
    match result {
        Err(e @ (ServeError::HandshakeTimeout | ServeError::Unresponsive)) => {
            tracing::warn!(%peer, error = %e, "HBONE connection dropped")
        }
        Err(e) => tracing::debug!(%peer, error = %e, "HBONE connection ended with error"),
        Ok(()) => {}
    }
}
