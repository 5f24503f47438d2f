//! One CONNECT stream from a ztunnel: sniff the protocol, then serve HTTP
//! (HTTP/1.1 or HTTP/2, so gRPC too) request by request, or pass other bytes
//! through at L4.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use identity::{Identity, SecretManager};
use mesh::authz::{self, Connection, Decision, HttpRequest};
use mesh::live::LiveConns;
use mesh::routes::WaypointRef;
use mesh::{MeshState, MeshStore, Service, Workload};
use tokio::sync::watch;

use crate::binding;
use crate::body::Counted;
use crate::error::local;
use crate::lb::Backends;
use crate::plan::{self, Action};
use crate::replay::Replay;
use crate::send::{self, Outgoing, Sent, UpgradeKind, Upgrading};
use crate::telemetry::{self, flag};
use crate::upstream::{Body, Upstreams};

/// How long protocol sniffing waits for the client's first bytes.
const SNIFF_WAIT: Duration = Duration::from_millis(200);

pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub store: Arc<MeshStore>,
    pub certs: Arc<SecretManager>,
    pub identity: Identity,
    pub upstreams: Upstreams,
    pub backends: Backends,
    pub drain: watch::Receiver<bool>,
    /// HTTP/1 request headers must arrive within this (hyper's own default
    /// only applies with a timer, which it does not have by default).
    pub header_timeout: Duration,
    /// L4 streams passed through, re-judged on every config change.
    pub live: Arc<LiveConns<L4Stream>>,
    /// Upgraded HTTP/1.1 connections (WebSocket...), tunnelled bytes after
    /// their first request: re-judged like L4 streams, by that request.
    pub upgraded: Arc<LiveConns<UpgradedStream>>,
    /// A request body up to this many bytes is kept so that a retry or a
    /// mirror can send it again; a larger one streams once.
    pub replay_buffer: usize,
    /// Key sets for RequestAuthentication rules (fetched `jwksUri`s).
    pub jwks: Arc<crate::jwt::Jwks>,
    /// This waypoint's own pod (POD_NAME), whose locality the endpoints
    /// are chosen by; None: no preference.
    pub pod: Option<String>,
}

/// What an L4 stream was admitted on.
#[derive(Clone)]
pub struct L4Stream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
}

/// What an upgraded connection was admitted on: its opening request, as
/// the L7 policy saw it (before any rewrite).
pub struct UpgradedStream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
    method: http::Method,
    path: String,
    host: String,
    headers: HeaderMap,
    /// Its verified JWT: the connection keeps the principal it opened with.
    auth: Option<authz::RequestAuth>,
    /// The CUSTOM providers its opening request was checked by: a provider
    /// a later config asks it about closes it (that check never ran).
    asked: Vec<String>,
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
    pub(crate) fn gateway(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }

    fn me(&self) -> WaypointRef {
        WaypointRef {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// L4 admission, pure: the destination is bound here and the policies,
    /// enforced as ztunnel would without requests, allow it. The same for a
    /// new stream and for a live one when the config changes.
    fn admit_l4(&self, state: &MeshState, s: &L4Stream) -> Result<(), String> {
        binding::check(state, &self.me(), s.target).map_err(|e| e.to_string())?;
        let svc = state.service_by_vip(s.target.ip());
        let conn = Connection {
            src_identity: Some(&s.src),
            src_ip: s.peer.ip(),
            dst_ip: s.target.ip(),
            dst_port: s.target.port(),
            request: None,
        };
        // No request to send an authorizer: a CUSTOM policy denies the
        // streams its rules match (fail closed).
        let l4: Vec<_> = plan::policies_for(self.gateway(), state, svc.map(|s| &**s))
            .map(|p| {
                let mut p = p.l4_only();
                if p.action == authz::Action::Custom {
                    p.action = authz::Action::Deny;
                }
                p
            })
            .collect();
        match authz::evaluate_selected(&l4, &conn) {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
        }
    }

    /// The opening request of an upgraded connection judged again: bound
    /// here and allowed by the L7 policies, as a new request would be.
    fn admit_upgraded(&self, state: &MeshState, u: &UpgradedStream) -> Result<(), String> {
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
    fn custom_asks(&self, state: &MeshState, u: &UpgradedStream) -> Result<Vec<String>, String> {
        let svc = state.service_by_vip(u.target.ip());
        let policies = plan::targeted_for(self.gateway(), state, svc.map(|s| &**s));
        crate::ext_authz::askable(policies, state, &u.connection())
    }

    /// Re-judges live L4 streams and upgraded connections whenever the mesh
    /// config changes.
    pub fn watch_live(self: &Arc<Self>) {
        let wp = self.clone();
        self.live.clone().watch(
            self.store.clone(),
            "waypoint",
            self.drain.clone(),
            move |state, s: &L4Stream| wp.admit_l4(state, s),
        );
        let wp = self.clone();
        self.upgraded.clone().watch(
            self.store.clone(),
            "waypoint",
            self.drain.clone(),
            move |state, u: &UpgradedStream| wp.admit_upgraded(state, u),
        );
    }
}

/// Who is asking and what they asked for, fixed for the stream.
struct Stream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
    /// For telemetry: from the state, else the CONNECT's baggage.
    src_workload: Option<Arc<Workload>>,
}

pub async fn stream(wp: Arc<Waypoint>, src: Arc<Identity>, peer: SocketAddr, inb: hbone::Inbound) {
    let target = inb.authority;
    let src_workload = {
        let state = wp.store.load();
        let src_workload = crate::peer::source(&state, peer.ip(), &src, &inb.headers);
        if let Err(e) = binding::check(&state, &wp.me(), target) {
            refuse_unbound(&src, src_workload.as_deref(), peer, target, &e);
            return inb.refuse(StatusCode::FORBIDDEN);
        }
        src_workload
    };
    let (send, recv) = match inb.accept() {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "stream gone before accept"),
    };
    let mut io = hbone::StreamIo::new(send, recv);
    // A port declared TCP is never sniffed (server-first protocols would
    // wait forever); otherwise a client silent for a moment is not HTTP.
    let declared_tcp = {
        let state = wp.store.load();
        state
            .service_by_vip(target.ip())
            .and_then(|svc| svc.ports.iter().find(|p| p.port == target.port()))
            .and_then(|p| p.name.as_deref())
            .is_some_and(|n| n == "tcp" || n.starts_with("tcp-"))
    };
    let http = !declared_tcp
        && match tokio::time::timeout(SNIFF_WAIT, io.peek()).await {
            Ok(Ok(first)) => is_http(first),
            Ok(Err(_)) => return,
            Err(_) => false,
        };
    let s = Arc::new(Stream {
        src,
        peer,
        target,
        src_workload,
    });
    if http {
        let header_timeout = wp.header_timeout;
        let svc = hyper::service::service_fn(move |req| {
            let (wp, s) = (wp.clone(), s.clone());
            async move { Ok::<_, Infallible>(handle(&wp, &s, req).await) }
        });
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        // RFC 8441: HTTP/2 clients may open WebSockets (extended CONNECT).
        server.http2().enable_connect_protocol();
        let _ = server
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await;
    } else {
        l4(&wp, &s, io).await;
    }
}

pub fn is_http(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
    ];
    first.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| first.starts_with(m))
}

/// A CONNECT to a destination not bound here: logged with who asked, and
/// counted and access-logged as a 403 with the "no route" flag.
fn refuse_unbound(
    src: &Identity,
    src_workload: Option<&Workload>,
    peer: SocketAddr,
    target: SocketAddr,
    e: &binding::Unbound,
) {
    tracing::warn!(source = %src, %peer, %target, reason = %e, "CONNECT refused: destination not bound to this waypoint");
    let authority = target.to_string();
    telemetry::record(&telemetry::Record {
        src_identity: src,
        src_workload,
        service: None,
        dst_workload: None,
        protocol: "tcp",
        method: "CONNECT",
        path: "",
        authority: &authority,
        code: StatusCode::FORBIDDEN.as_u16(),
        flags: flag::NO_ROUTE.to_string(),
        duration: Duration::ZERO,
        request_bytes: 0,
        response_bytes: 0,
        upstream: None,
        request_id: "",
        route: None,
        attempts: 0,
        grpc_status: None,
        not_retried: None,
        downstream: Some(peer),
        user_agent: None,
        forwarded_for: None,
        details: None,
    });
}

/// Not HTTP: one endpoint, bytes both ways, L4 policy only.
async fn l4(wp: &Waypoint, s: &Stream, mut io: hbone::StreamIo) {
    let key = L4Stream {
        src: s.src.clone(),
        peer: s.peer,
        target: s.target,
    };
    // Registered before the decision: a change after `state` was loaded is
    // re-checked against this stream too.
    let mut live = wp.live.admit(key.clone());
    let state = wp.store.load();
    let Some((_, eps)) = endpoints_for_target(&state, s.target) else {
        return;
    };
    if let Err(why) = wp.admit_l4(&state, &key) {
        return tracing::info!(source = %s.src, target = %s.target, why, "L4 stream denied at the waypoint");
    }
    if eps.is_empty() {
        return;
    }
    let (ep, port) = eps[rand::random_range(0..eps.len())].clone();
    drop(state);
    let dst = crate::upstream::at(&ep, s.target.ip(), port);
    // An endpoint outside the mesh (a ServiceEntry's) is plain TCP.
    if ep.protocol == mesh::TunnelProtocol::None {
        match tokio::net::TcpStream::connect(dst).await {
            Ok(mut up) => {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut io, &mut up) => {}
                    Ok(why) = &mut live.revoked => {
                        tracing::info!(source = %s.src, target = %s.target, reason = why, "live L4 stream closed by a policy change");
                    }
                }
            }
            Err(e) => tracing::info!(%dst, error = %e, "L4 upstream failed"),
        }
        return;
    }
    let Ok(cert) = wp.certs.fetch(&wp.identity).await else {
        return;
    };
    let hbone_addr = SocketAddr::new(dst.ip(), hbone::HBONE_PORT);
    let key = hbone::PoolKey {
        source: "waypoint-l4".into(),
        dst_identity: ep.identity(),
        dst: hbone_addr,
    };
    let dial = move || async move { tokio::net::TcpStream::connect(hbone_addr).await };
    match wp
        .upstreams
        .pool_connect(key, cert.client.clone(), dial, dst)
        .await
    {
        Ok((send, recv, _guard)) => {
            let mut up = hbone::StreamIo::new(send, recv);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut io, &mut up) => {}
                Ok(why) = &mut live.revoked => {
                    tracing::info!(source = %s.src, target = %s.target, reason = why, "live L4 stream closed by a policy change");
                }
            }
        }
        Err(e) => tracing::info!(%dst, error = %e, "L4 upstream failed"),
    }
}

/// The service the CONNECT named (by VIP) and its endpoints on that port, or
/// the one workload it named.
/// The service (if the target was a VIP) and its (endpoint, port) pairs.
type TargetEndpoints = (Option<Arc<Service>>, Vec<(Arc<Workload>, u16)>);

fn endpoints_for_target(state: &MeshState, target: SocketAddr) -> Option<TargetEndpoints> {
    if let Some(svc) = state.service_by_vip(target.ip()) {
        return Some((Some(svc.clone()), state.endpoints_for(svc, target.port())));
    }
    state
        .workload_by_ip(target.ip())
        .map(|w| (None, vec![(w.clone(), target.port())]))
}

fn hex_id() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Continues a valid W3C traceparent with a new span, or starts a trace.
fn traceparent(h: &HeaderMap) -> String {
    let span: u64 = rand::random::<u64>() | 1;
    let parent = h
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let p: Vec<&str> = v.split('-').collect();
            (p.len() == 4
                && p[1].len() == 32
                && p[1].chars().all(|c| c.is_ascii_hexdigit())
                && p[1] != "0".repeat(32))
            .then(|| (p[1].to_string(), p[3].to_string()))
        });
    match parent {
        Some((trace, flags)) => format!("00-{trace}-{span:016x}-{flags}"),
        None => format!("00-{:032x}-{span:016x}-01", rand::random::<u128>() | 1),
    }
}

/// Whether the request asks to become a byte stream, and how.
fn upgrade_kind(parts: &http::request::Parts) -> Option<UpgradeKind> {
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

async fn handle(wp: &Arc<Waypoint>, s: &Stream, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let grpc = parts.version == http::Version::HTTP_2 && crate::grpc::is_grpc(&parts.headers);
    let protocol = if grpc { "grpc" } else { "http" };
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(hex_id);
    let tp = traceparent(&parts.headers);
    if let Ok(v) = HeaderValue::try_from(request_id.as_str()) {
        parts.headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::try_from(tp.as_str()) {
        parts.headers.insert("traceparent", v);
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let method = parts.method.to_string();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (user_agent, forwarded_for) = (header("user-agent"), header("x-forwarded-for"));
    let peer = s.peer;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());

    let state = wp.store.load();
    // A binding can end while an HTTP/2 connection lives: each request is
    // checked again, like its policy.
    if let Err(e) = binding::check(&state, &wp.me(), s.target) {
        refuse_unbound(&s.src, s.src_workload.as_deref(), s.peer, s.target, &e);
        return local(
            StatusCode::FORBIDDEN,
            "destination not bound to this waypoint\n",
        );
    }
    let service = state.service_by_vip(s.target.ip()).cloned();
    // RequestAuthentication first, as Envoy's jwt_authn runs before RBAC.
    let applying = crate::jwt::applying(wp.gateway(), &state, service.as_deref());
    let auth = if applying.is_empty() {
        Ok(None)
    } else {
        crate::jwt::authenticate(&wp.jwks, &applying, &mut parts).await
    };
    let (auth, rejected) = match auth {
        Ok(a) => (a, None),
        Err(r) => {
            tracing::info!(source = %s.src, path = parts.uri.path(), reason = %r, "request rejected: its JWT does not verify");
            (None, Some(r))
        }
    };
    let src_workload = s.src_workload.clone();
    let upgrade =
        upgrade_kind(&parts).and_then(|k| Some((k, parts.extensions.remove::<OnUpgrade>()?)));
    // Registered before the decision (as L4 streams are): a change after
    // `state` was loaded is re-checked against this connection too.
    let live = upgrade.as_ref().map(|_| {
        let mut u = UpgradedStream {
            src: s.src.clone(),
            peer: s.peer,
            target: s.target,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            host: authority.clone(),
            headers: parts.headers.clone(),
            auth: auth.clone(),
            asked: Vec::new(),
        };
        // What `authorize` below asks, from the same state (a provider that
        // cannot be asked denies the request there).
        u.asked = wp.custom_asks(&state, &u).unwrap_or_default();
        wp.upgraded.admit(u)
    });
    let body = Replay::new(body, wp.replay_buffer);
    // A token that does not verify is answered before any policy; then
    // CUSTOM policies, then DENY and ALLOW (in the plan), as Istio orders
    // them.
    let authorized = match rejected {
        Some(r) => Err(unauthenticated(r, grpc, &authority, parts.uri.path())),
        None => {
            let asker = crate::ext_authz::Asker {
                src: &s.src,
                peer: s.peer,
                target: s.target,
                authority: &authority,
                request_id: &request_id,
                grpc,
                auth: auth.as_ref(),
            };
            crate::ext_authz::authorize(wp, &state, service.as_deref(), &mut parts, &body, &asker)
                .await
        }
    };
    let (route_name, sent) = match authorized {
        Err(answered) => (None, answered),
        Ok(on_allow) => {
            let caller = plan::Caller {
                src: &s.src,
                auth: auth.as_ref(),
                peer: s.peer,
                target: s.target,
                waypoint: wp.gateway(),
            };
            let planned = plan::plan(
                &caller,
                &state,
                service.as_deref(),
                &mut parts,
                &authority,
                &mut plan::Random,
            );
            if let Some(d) = planned.delay {
                tokio::time::sleep(d).await;
            }
            let mut sent = match planned.action {
                Err(e) => Sent::local(&e, grpc),
                Ok(Action::Respond(resp, flags)) => Sent::answer(resp, flags),
                Ok(Action::Forward(fwd)) => {
                    let out = Outgoing {
                        parts: &parts,
                        body: &body,
                        grpc,
                        upgrade: upgrade.zip(live).map(|((kind, client), live)| Upgrading {
                            kind,
                            client,
                            live,
                        }),
                        peer: s.peer,
                        target: s.target.ip(),
                    };
                    let mut sent = send::send(wp, &fwd, out).await;
                    if sent.flags == flag::NONE && planned.delay.is_some() {
                        sent.flags = flag::DELAY;
                    }
                    plan::apply_headers(sent.resp.headers_mut(), &fwd.rule.response_headers);
                    sent
                }
            };
            on_allow.apply(sent.resp.headers_mut());
            (planned.route, sent)
        }
    };
    let Sent {
        mut resp,
        flags,
        upstream,
        dst_workload,
        attempts,
        not_retried,
        tunnel,
        details,
    } = sent;
    if let Ok(v) = HeaderValue::try_from(request_id.as_str()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let code = resp.status().as_u16();
    // A trailers-only gRPC response carries its status in the headers.
    let head_grpc = grpc.then(|| crate::grpc::status(resp.headers())).flatten();
    // Metrics and the access log once the response body has gone out.
    let src = s.src.clone();
    let (svc, dst_w, src_w) = (service.clone(), dst_workload.clone(), src_workload.clone());
    let done = move |request_bytes: u64, sent: u64, trailer_grpc: Option<u32>| {
        telemetry::record(&telemetry::Record {
            src_identity: &src,
            src_workload: src_w.as_deref(),
            service: svc.as_deref(),
            dst_workload: dst_w.as_deref(),
            protocol,
            method: &method,
            path: &path,
            authority: &authority,
            code,
            flags: flags.to_string(),
            duration: start.elapsed(),
            request_bytes,
            response_bytes: sent,
            upstream,
            request_id: &request_id,
            route: route_name.as_deref(),
            attempts,
            grpc_status: if grpc {
                trailer_grpc.or(head_grpc)
            } else {
                None
            },
            not_retried: not_retried.map(|n| n.reason()),
            downstream: Some(peer),
            user_agent: user_agent.as_deref(),
            forwarded_for: forwarded_for.as_deref(),
            details,
        })
    };
    // An upgraded connection is logged when it closes, with its bytes and
    // its whole duration, as Envoy logs one.
    if let Some(tunnel) = tunnel {
        tokio::spawn(async move {
            let (up, down) = tunnel.await.unwrap_or_default();
            done(up, down, None);
        });
        return resp;
    }
    let (rparts, rbody) = resp.into_parts();
    let counted = Counted::new(rbody, move |sent, grpc| done(body.bytes_read(), sent, grpc));
    Response::from_parts(rparts, counted.boxed())
}

/// The 401 for a token that does not verify, with the `www-authenticate`
/// challenge Envoy's jwt_authn answers with.
fn unauthenticated(r: crate::error::JwtReject, grpc: bool, authority: &str, path: &str) -> Sent {
    let mut sent = Sent::local(&crate::error::ProxyError::Unauthenticated(r), grpc);
    let realm = format!("Bearer realm=\"http://{authority}{path}\", error=\"invalid_token\"");
    if let Ok(v) = HeaderValue::try_from(realm) {
        sent.resp.headers_mut().insert("www-authenticate", v);
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

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
