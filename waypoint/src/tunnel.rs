//! Upgraded connections (WebSocket and other HTTP/1.1 upgrades, RFC 8441
//! extended CONNECT): which requests ask for one, what the connection was
//! admitted on and how a config change judges it again, and, once the
//! upstream said yes, bytes both ways, counted, until either side closes or
//! a policy change refuses it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use identity::Identity;
use mesh::authz::{self, Connection, Decision, HttpRequest};
use mesh::live::Admitted;
use mesh::MeshState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::binding;
use crate::plan;
use crate::proxy::Waypoint;
use crate::send::UpgradeKind;

/// What an upgraded connection was admitted on: its opening request, as
/// the L7 policy saw it (before any rewrite).
pub struct UpgradedStream {
    pub(crate) src: Arc<Identity>,
    pub(crate) peer: SocketAddr,
    pub(crate) target: SocketAddr,
    pub(crate) method: http::Method,
    pub(crate) path: String,
    pub(crate) host: String,
    pub(crate) headers: HeaderMap,
    /// Its verified JWT: the connection keeps the principal it opened with.
    pub(crate) auth: Option<authz::RequestAuth>,
    /// The CUSTOM providers its opening request was checked by: a provider
    /// a later config asks it about closes it (that check never ran).
    pub(crate) asked: Vec<String>,
}

impl UpgradedStream {
    fn connection(&self) -> Connection<'_> {
        Connection {
            src_identity: Some(&self.src),
            src_ip: self.peer.ip(),
            dst_ip: self.target.ip(),
            dst_port: self.target.port(),
            request: Some(HttpRequest {
                method: self.method.as_str(),
                path: &self.path,
                host: &self.host,
                headers: &self.headers,
                auth: self.auth.as_ref(),
            }),
        }
    }
}

impl Waypoint {
    /// The opening request of an upgraded connection judged again: bound
    /// here and allowed by the L7 policies, as a new request would be.
    pub(crate) fn admit_upgraded(
        &self,
        state: &MeshState,
        u: &UpgradedStream,
    ) -> Result<(), String> {
        binding::check(state, &self.me(), u.target).map_err(|e| e.to_string())?;
        let svc = state.service_by_vip(u.target.ip());
        let conn = u.connection();
        let asked = self.custom_asks(state, u)?;
        if let Some(p) = asked.iter().find(|p| !u.asked.contains(p)) {
            return Err(format!(
                "a CUSTOM policy now asks provider {p:?}, which this connection was not checked by"
            ));
        }
        match authz::evaluate_selected(
            plan::policies_for(self.gateway(), state, svc.map(|s| &**s)),
            &conn,
        ) {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
        }
    }

    /// The CUSTOM providers `u`'s opening request is to be checked by under
    /// `state`.
    pub(crate) fn custom_asks(
        &self,
        state: &MeshState,
        u: &UpgradedStream,
    ) -> Result<Vec<String>, String> {
        let svc = state.service_by_vip(u.target.ip());
        let policies = plan::targeted_for(self.gateway(), state, svc.map(|s| &**s));
        crate::ext_authz::askable(policies, state, &u.connection())
    }
}

/// Whether the request asks to become a byte stream, and how.
pub(crate) fn upgrade_kind(parts: &http::request::Parts) -> Option<UpgradeKind> {
    if parts.version == http::Version::HTTP_2 && parts.method == http::Method::CONNECT {
        let p = parts.extensions.get::<hyper::ext::Protocol>()?;
        return Some(UpgradeKind::Connect(p.as_str().to_string()));
    }
    is_upgrade(parts).then_some(UpgradeKind::Http1)
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and others).
/// `h2c` is not one: tunnelled, the HTTP/2 requests after it would pass
/// unseen by routes and policy, so it stays on this hop (dropped) and the
/// request is served as HTTP/1.1.
fn is_upgrade(parts: &http::request::Parts) -> bool {
    let Some(up) = parts.headers.get("upgrade").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    parts.version == http::Version::HTTP_11
        && !up.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))
        && parts
            .headers
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn which_requests_are_upgrades() {
        let up = |version, headers: &[(&str, &str)]| {
            let mut b = Request::get("/").version(version);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            is_upgrade(&b.body(()).unwrap().into_parts().0)
        };
        let v11 = http::Version::HTTP_11;
        let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
        assert!(up(v11, &ws));
        assert!(up(
            v11,
            &[("connection", "keep-alive, upgrade"), ("upgrade", "foo/2")]
        ));
        // No Connection: upgrade, or HTTP/1.0 or HTTP/2: not an upgrade.
        assert!(!up(v11, &[("upgrade", "websocket")]));
        assert!(!up(http::Version::HTTP_10, &ws));
        assert!(!up(http::Version::HTTP_2, &ws));
        // RFC 8441: an HTTP/2 CONNECT naming a protocol; a plain one is not.
        let connect = |proto: Option<&'static str>| {
            let mut b = Request::connect("http://h/chat").version(http::Version::HTTP_2);
            if let Some(p) = proto {
                b = b.extension(hyper::ext::Protocol::from_static(p));
            }
            upgrade_kind(&b.body(()).unwrap().into_parts().0)
        };
        assert_eq!(
            connect(Some("websocket")),
            Some(UpgradeKind::Connect("websocket".into()))
        );
        assert_eq!(connect(None), None);
        // h2c would hide the requests after it from policy: served as 1.1.
        assert!(!up(
            v11,
            &[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c")
            ]
        ));
    }
}
