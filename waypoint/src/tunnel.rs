//! An upgraded connection (WebSocket and other HTTP/1.1 upgrades, RFC 8441
//! extended CONNECT) once the upstream said yes: bytes both ways, counted,
//! until either side closes or a policy change refuses it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use mesh::live::Admitted;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::UpgradedStream;

/// Bytes both ways between the upgraded client and upstream connections
/// until either side closes, or a policy change refuses the request that
/// opened it. Returns the bytes read from each side.
pub async fn tunnel(
    client: OnUpgrade,
    up: OnUpgrade,
    guard: Option<hbone::StreamGuard>,
    mut live: Admitted<UpgradedStream>,
    peer: SocketAddr,
) -> (u64, u64) {
    let (c, u) = tokio::join!(client, up);
    let mut bytes = (0, 0);
    match (c, u) {
        (Ok(c), Ok(u)) => {
            let mut c = ReadCount::new(TokioIo::new(c));
            let mut u = ReadCount::new(TokioIo::new(u));
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut u) => match r {
                    Ok((sent, received)) => {
                        tracing::debug!(%peer, sent, received, "upgraded connection closed")
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "upgraded connection broke"),
                },
                Ok(why) = &mut live.revoked => {
                    tracing::info!(%peer, reason = why, "upgraded connection closed by a policy change");
                }
            }
            bytes = (c.read, u.read);
        }
        (c, u) => tracing::info!(%peer, client = c.is_ok(), upstream = u.is_ok(), "upgrade failed"),
    }
    drop(guard);
    bytes
}

/// Counts the bytes read through it (whatever ends the copy, the counts
/// stay).
struct ReadCount<T> {
    inner: T,
    read: u64,
}

impl<T> ReadCount<T> {
    fn new(inner: T) -> Self {
        ReadCount { inner, read: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadCount<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadCount<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
