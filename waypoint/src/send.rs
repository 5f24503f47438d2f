//! Sending a planned request: endpoint choice per attempt (a DNS entry's
//! names resolved first), retries (while the body can be replayed), per-try
//! and overall timeouts, the mirror, and upgrades handed to `tunnel`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::upgrade::OnUpgrade;
use mesh::live::Admitted;
use mesh::routes::{RetryOn, RetryPolicy};
use mesh::Workload;
use tokio::sync::oneshot;

use crate::error::ProxyError;
use crate::lb::{HashInput, Outcome};
use crate::origin_tls::Origination;
use crate::plan::{Forward, Target};
use crate::proxy::Waypoint;
use crate::replay::{NotReplayable, Replay};
use crate::telemetry::flag;
use crate::tunnel::UpgradedStream;
use crate::upstream::{self, Body};

pub type ReqBody = Replay<Incoming>;

/// What the client gets, and what the telemetry says about it.
pub struct Sent {
    pub resp: Response<Body>,
    pub flags: &'static str,
    pub upstream: Option<SocketAddr>,
    pub dst_workload: Option<Arc<Workload>>,
    pub attempts: u32,
    /// A retry was wanted but the body could not be sent again.
    pub not_retried: Option<NotReplayable>,
    /// For an upgraded connection: its bytes (client to upstream, back),
    /// known when the tunnel closes; the telemetry waits for them.
    pub tunnel: Option<oneshot::Receiver<(u64, u64)>>,
    /// Envoy's `response_code_details` for an answer policy made here (a
    /// JWT rejection, an RBAC or external authorizer's denial).
    pub details: Option<&'static str>,
}

impl Sent {
    pub fn local(e: &ProxyError, grpc: bool) -> Self {
        Sent {
            details: e.details(),
            ..Sent::answer(e.response(grpc), e.flag())
        }
    }

    /// Answered here, without an upstream.
    pub fn answer(resp: Response<Body>, flags: &'static str) -> Self {
        Sent {
            resp,
            flags,
            upstream: None,
            dst_workload: None,
            attempts: 0,
            not_retried: None,
            tunnel: None,
            details: None,
        }
    }
}

/// The request as the client sent it (after the plan's rewrites), and how
/// it is to be sent.
pub struct Outgoing<'a> {
    pub parts: &'a http::request::Parts,
    pub body: &'a Arc<ReqBody>,
    pub grpc: bool,
    /// The client's side of an upgrade, when it asked for one.
    pub upgrade: Option<Upgrading>,
    pub peer: SocketAddr,
    /// The address the client's CONNECT named (VIP or pod): endpoints are
    /// dialed in its family.
    pub target: IpAddr,
}

/// How the client asked to leave HTTP for a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeKind {
    /// HTTP/1.1 `Upgrade:` (WebSocket and others), passed on as it is.
    Http1,
    /// HTTP/2 extended CONNECT (RFC 8441) naming this protocol: sent on as
    /// an HTTP/1.1 upgrade, its 101 answered to the client as a 200.
    Connect(String),
}

pub struct Upgrading {
    pub kind: UpgradeKind,
    pub client: OnUpgrade,
    /// Registered for re-judging on policy changes.
    pub live: Admitted<UpgradedStream>,
}

/// Whether a response the upstream sent is covered by the policy. A gRPC
/// condition looks only at the response headers, as Envoy's does: a
/// trailers-only answer carries its status there, while a status in the
/// trailers comes after the body has reached the client, too late to retry.
fn response_retryable(p: &RetryPolicy, code: u16, headers: &HeaderMap) -> bool {
    let grpc = crate::grpc::status(headers);
    p.retry_on.iter().any(|on| match on {
        RetryOn::FiveXx => code >= 500,
        RetryOn::GatewayError => matches!(code, 502..=504),
        RetryOn::RetriableStatusCodes => p.codes.contains(&code),
        RetryOn::Grpc(want) => grpc == Some(*want),
        _ => false,
    })
}

/// Istio's default when a route says nothing: two retries on connection
/// failures and 503.
fn default_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on: vec![
            RetryOn::ConnectFailure,
            RetryOn::RefusedStream,
            RetryOn::RetriableStatusCodes,
        ],
        codes: vec![503],
        backoff: Duration::from_millis(25),
    }
}

/// Hop-by-hop headers stay on this hop; an upgrade keeps its own two, and
/// an HTTP/2 upstream gets `te: trailers` (gRPC needs it).
fn forwarded(k: &http::HeaderName, v: &http::HeaderValue, h2: bool, upgrade: bool) -> bool {
    match k.as_str() {
        "keep-alive" | "proxy-connection" | "transfer-encoding" => false,
        "connection" | "upgrade" => upgrade,
        "te" => h2 && v.as_bytes().eq_ignore_ascii_case(b"trailers"),
        "host" => !h2,
        _ => true,
    }
}

fn build(
    parts: &http::request::Parts,
    h2: bool,
    kind: Option<&UpgradeKind>,
    body: Body,
) -> Request<Body> {
    let upgrade = kind == Some(&UpgradeKind::Http1);
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get("host").and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    // HTTP/2 wants the authority in the URI; HTTP/1.1 the origin form and Host.
    let uri = if h2 {
        format!("http://{authority}{pq}")
    } else {
        pq.to_string()
    };
    let method = match kind {
        Some(UpgradeKind::Connect(_)) => http::Method::GET,
        _ => parts.method.clone(),
    };
    let mut b = Request::builder().method(method).uri(uri).version(if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    });
    if !h2 && !parts.headers.contains_key("host") {
        b = b.header("host", authority);
    }
    for (k, v) in &parts.headers {
        if forwarded(k, v, h2, upgrade) {
            b = b.header(k, v);
        }
    }
    if let Some(UpgradeKind::Connect(proto)) = kind {
        b = b
            .header("connection", "upgrade")
            .header("upgrade", proto.as_str());
        // RFC 8441 drops the key (the stream itself is proof enough); the
        // HTTP/1.1 server still wants one.
        if proto.eq_ignore_ascii_case("websocket")
            && !parts.headers.contains_key("sec-websocket-key")
        {
            use base64::Engine;
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            b = b.header("sec-websocket-key", key);
        }
    }
    b.body(body).expect("request from valid parts")
}

pub async fn send(wp: &Arc<Waypoint>, fwd: &Forward<'_>, mut out: Outgoing<'_>) -> Sent {
    if let Some(m) = &fwd.mirror {
        mirror(wp, m, out.target, out.parts, out.body);
    }
    let rule = &fwd.rule;
    let target = &fwd.target;
    let backend = wp
        .backends
        .get(&fwd.host, fwd.subset.as_deref(), &target.policy);
    let Some(_permit) = backend.admit() else {
        return Sent::local(&ProxyError::Overflow, out.grpc);
    };
    let retries = rule.retries.clone().unwrap_or_else(default_retries);
    let headers = &out.parts.headers;
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let cookie = |n: &str| {
        headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|c| c.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == n).then(|| v.to_string())
            })
    };
    let hash = HashInput {
        header: &header,
        cookie: &cookie,
        source_ip: out.peer.ip(),
    };
    let kind = out.upgrade.as_ref().map(|u| u.kind.clone());
    let upgrade = kind.is_some();
    // An upgrade needs HTTP/1.1 upstream whatever the port says.
    let h2 = target.h2 && !upgrade;
    // A DNS entry's endpoints are what its names resolve to now.
    let resolved;
    let eps = if target.dns.is_empty() {
        &target.eps
    } else {
        match crate::dns::resolve(&target.dns).await {
            Ok(r) => {
                resolved = r;
                &resolved
            }
            Err(e) => {
                tracing::info!(host = fwd.host, error = %e, "destination did not resolve");
                return Sent::local(&e, out.grpc);
            }
        }
    };
    // Closer endpoints first, by where this waypoint runs; STRICT with none
    // close enough is no upstream at all.
    let me = wp
        .pod
        .as_deref()
        .and_then(|p| wp.store.load().workload_by_name(&wp.namespace, p).cloned());
    let near = me.as_deref().zip(target.load_balancing.as_ref());
    if let Some((src, lb)) = near {
        if mesh::locality::tiers(Some(src), Some(lb), eps.iter().map(|(w, _)| &**w)).is_empty() {
            let why = format!("{} has no endpoint close enough (STRICT)", target.host);
            return Sent::local(&ProxyError::NoHealthy(why), out.grpc);
        }
    }
    let attempts_max = 1 + retries.attempts;
    let origin = target.policy.tls.as_ref().map(|tls| Origination {
        tls,
        host: &target.host,
        secret: target.secret.as_ref(),
    });
    let mut tunnel_up = None;
    let attempt_all = async {
        let mut last: Option<Sent> = None;
        for attempt in 1..=attempts_max {
            let body = match out.body.attempt() {
                Ok(b) => b,
                Err(why) => {
                    let mut l = last.expect("the first attempt always has the body");
                    l.not_retried = Some(why);
                    return l;
                }
            };
            let (ep, port, _lease) = backend.pick(eps, &target.policy, &hash, near);
            // An extended CONNECT's body is the tunnel, not the request's.
            let body = match &kind {
                Some(UpgradeKind::Connect(_)) => {
                    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
                }
                _ => body.boxed(),
            };
            let req = build(out.parts, h2, kind.as_ref(), body);
            let dst = upstream::at(&ep, out.target, port);
            let upstream = Some(dst);
            let send = async {
                if upgrade {
                    // Boxed: its dial's state would otherwise ride in every
                    // request's future (see `Upstreams::send`).
                    let (mut resp, guard) =
                        Box::pin(wp.upstreams.send_upgrade(&ep, dst, req, origin.as_ref())).await?;
                    let on = hyper::upgrade::on(&mut resp);
                    tunnel_up = Some((on, guard));
                    Ok(resp)
                } else {
                    wp.upstreams.send(&ep, dst, req, h2, origin.as_ref()).await
                }
            };
            let result = match retries.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send)
                    .await
                    .unwrap_or(Err(ProxyError::PerTryTimeout)),
                None => send.await,
            };
            let outcome = match &result {
                Ok(r) if r.status().as_u16() >= 500 => Outcome::Status(r.status().as_u16()),
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            };
            backend.record(ep.ip, outcome, target.policy.outlier.as_ref(), eps.len());
            let again = attempt < attempts_max
                && match &result {
                    Ok(r) => response_retryable(&retries, r.status().as_u16(), r.headers()),
                    Err(e) => retries.retry_on.iter().any(|on| e.retryable_by(on)),
                };
            let sent = match result {
                Ok(resp) => Sent {
                    resp: resp.map(|b| b.map_err(Into::into).boxed()),
                    flags: flag::NONE,
                    upstream,
                    dst_workload: Some(ep.clone()),
                    attempts: attempt,
                    not_retried: None,
                    tunnel: None,
                    details: None,
                },
                Err(e) => {
                    tracing::debug!(endpoint = %dst, error = %e, attempt, "upstream attempt failed");
                    Sent {
                        upstream,
                        dst_workload: Some(ep.clone()),
                        attempts: attempt,
                        ..Sent::local(&e, out.grpc)
                    }
                }
            };
            if !again {
                return sent;
            }
            if let Err(why) = out.body.replayable() {
                tracing::info!(
                    attempt,
                    reason = why.reason(),
                    "request not retried: its body cannot be sent again"
                );
                return Sent {
                    not_retried: Some(why),
                    ..sent
                };
            }
            last = Some(sent);
            tokio::time::sleep(retries.backoff * attempt).await;
        }
        last.expect("at least one attempt")
    };
    // The route's timeout bounds the wait for the response head counted
    // from the end of the request body, as Envoy counts it (a long upload
    // is not a slow server); the client's gRPC deadline counts from the
    // request's start, as the client set it. An upgraded tunnel is bound by
    // neither once it is up.
    let grpc_deadline = out.grpc.then(|| crate::grpc::timeout(headers)).flatten();
    let mut sent = match (rule.timeout, grpc_deadline) {
        (None, None) => attempt_all.await,
        (route, grpc) => {
            let body = out.body.clone();
            let after_body = async move {
                match route {
                    Some(t) => {
                        body.read_to_end().await;
                        tokio::time::sleep(t).await
                    }
                    None => std::future::pending().await,
                }
            };
            let client_deadline = async move {
                match grpc {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                s = attempt_all => s,
                () = after_body => Sent::local(&ProxyError::Timeout, out.grpc),
                () = client_deadline => Sent::local(&ProxyError::Timeout, out.grpc),
            }
        }
    };
    if let (Some(u), Some((up, guard))) = (out.upgrade.take(), tunnel_up) {
        if sent.resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let UpgradeKind::Connect(_) = u.kind {
                // The HTTP/2 client gets its stream as a 200; the HTTP/1.1
                // handshake headers were for this hop.
                *sent.resp.status_mut() = StatusCode::OK;
                let h = sent.resp.headers_mut();
                for name in ["connection", "upgrade", "sec-websocket-accept"] {
                    h.remove(name);
                }
            }
            let (tx, rx) = oneshot::channel();
            sent.tunnel = Some(rx);
            tokio::spawn(async move {
                let bytes = crate::tunnel::tunnel(u.client, up, guard, u.live, out.peer).await;
                let _ = tx.send(bytes);
            });
        }
    }
    sent
}

/// Sends a copy of the request to the mirror backend and forgets it: its
/// answer, or failure, never reaches the client. The copy waits for the
/// body to have been read by the main request and goes only if it fit in
/// the replay buffer. The authority gets `-shadow`, as Envoy marks
/// mirrored requests.
fn mirror(
    wp: &Arc<Waypoint>,
    target: &Target,
    like: IpAddr,
    parts: &http::request::Parts,
    body: &Arc<ReqBody>,
) {
    if target.eps.is_empty() {
        // A DNS entry's names are resolved for the main request only.
        return tracing::debug!(
            host = target.host,
            "mirror skipped: its endpoints are DNS names"
        );
    }
    let (ep, port) = target.eps[rand::random_range(0..target.eps.len())].clone();
    let dst = upstream::at(&ep, like, port);
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let shadow = format!("{}-shadow", host.split(':').next().unwrap_or(host));
    let mut head = parts.clone_head();
    // The shadow authority must win over the one in an HTTP/2 URI.
    if let Some(pq) = parts
        .uri
        .path_and_query()
        .and_then(|p| p.as_str().parse().ok())
    {
        head.uri = pq;
    }
    head.headers.remove("host");
    if let Ok(v) = shadow.parse() {
        head.headers.insert("host", v);
    }
    let h2 = target.h2;
    let tls = target.policy.tls.clone();
    let secret = target.secret.clone();
    let tls_host = target.host.clone();
    let wp = wp.clone();
    let whole = Replay::whole(Arc::downgrade(body));
    tokio::spawn(async move {
        let Some(w) = whole.await else {
            return tracing::debug!(
                "mirror skipped: the request body did not fit the replay buffer"
            );
        };
        let mut frames: Vec<Result<Frame<Bytes>, crate::upstream::BoxError>> = (!w.data.is_empty())
            .then(|| Ok(Frame::data(w.data)))
            .into_iter()
            .collect();
        frames.extend(w.trailers.map(|t| Ok(Frame::trailers(t))));
        let body = if frames.is_empty() {
            Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
        } else {
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        };
        let req = build(&head.into_parts(), h2, None, body);
        let origin = tls.as_ref().map(|tls| Origination {
            tls,
            host: &tls_host,
            secret: secret.as_ref(),
        });
        match wp.upstreams.send(&ep, dst, req, h2, origin.as_ref()).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => {
                tracing::debug!(endpoint = %dst, error = %e, "mirrored request failed")
            }
        }
    });
}

/// A request head that can be sent again (Parts is not Clone: extensions).
trait CloneHead {
    fn clone_head(&self) -> Head;
}

pub struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Head {
    fn into_parts(self) -> http::request::Parts {
        let (mut p, ()) = Request::new(()).into_parts();
        p.method = self.method;
        p.uri = self.uri;
        p.version = self.version;
        p.headers = self.headers;
        p
    }
}

impl CloneHead for http::request::Parts {
    fn clone_head(&self) -> Head {
        Head {
            method: self.method.clone(),
            uri: self.uri.clone(),
            version: self.version,
            headers: self.headers.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_retried_by_status_and_grpc_status() {
        let policy = |on: Vec<RetryOn>, codes: Vec<u16>| RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            retry_on: on,
            codes,
            backoff: Duration::ZERO,
        };
        let unavailable = policy(vec![RetryOn::Grpc(14)], vec![]);
        let both = policy(
            vec![RetryOn::Grpc(4), RetryOn::RetriableStatusCodes],
            vec![503],
        );
        // (policy, HTTP status, grpc-status header, retried)
        let table = [
            (&unavailable, 200, Some("14"), true),
            (&unavailable, 200, Some(" 14 "), true),
            (&unavailable, 200, Some("4"), false),
            (&unavailable, 200, Some("0"), false),
            (&unavailable, 200, None, false),
            (&unavailable, 503, None, false),
            (&both, 200, Some("4"), true),
            (&both, 503, None, true),
            (&both, 200, Some("14"), false),
        ];
        for (p, code, grpc, want) in table {
            let mut h = HeaderMap::new();
            if let Some(g) = grpc {
                h.insert("grpc-status", g.parse().unwrap());
            }
            assert_eq!(
                response_retryable(p, code, &h),
                want,
                "{:?} {code} {grpc:?}",
                p.retry_on
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_by_upstream_protocol() {
        // (header, value, h2 upstream, upgrade, forwarded)
        let table = [
            ("te", "trailers", true, false, true),
            ("te", "trailers", false, false, false),
            ("te", "gzip", true, false, false),
            ("connection", "keep-alive", false, false, false),
            ("connection", "Upgrade", false, true, true),
            ("upgrade", "websocket", false, true, true),
            ("upgrade", "h2c", false, false, false),
            ("transfer-encoding", "chunked", false, false, false),
            ("keep-alive", "5", false, false, false),
            ("host", "echo", false, false, true),
            ("host", "echo", true, false, false),
            ("content-type", "application/grpc", true, false, true),
        ];
        for (k, v, h2, up, want) in table {
            let (k, v) = (
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
            assert_eq!(
                forwarded(&k, &v, h2, up),
                want,
                "{k}: {v:?} h2={h2} upgrade={up}"
            );
        }
    }
}
