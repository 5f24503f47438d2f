//! One CONNECT stream from a ztunnel: sniff the protocol, then serve HTTP
//! (HTTP/1.1 or HTTP/2, so gRPC too) request by request, or pass other bytes
//! through at L4.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use identity::{Identity, SecretManager};
use mesh::authz::{self, Connection, Decision, HttpRequest};
use mesh::live::LiveConns;
use mesh::routes::WaypointRef;
use mesh::routes::{Abort, HeaderOps, RetryOn, RetryPolicy, Rewrite, RouteRule, TrafficPolicy};
use mesh::{MeshState, MeshStore, Service, Workload};
use tokio::sync::watch;

use crate::binding;
use crate::body::Counted;
use crate::lb::{Backends, HashInput, Outcome};
use crate::telemetry::{self, flag};
use crate::upstream::{Body, UpstreamError, Upstreams};

/// How long protocol sniffing waits for the client's first bytes.
const SNIFF_WAIT: Duration = Duration::from_millis(200);
/// Requests bodies are buffered (so a retry can resend them) up to this.
const MAX_BUFFERED_BODY: usize = 8 << 20;

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
}

/// What an L4 stream was admitted on.
#[derive(Clone)]
pub struct L4Stream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
}

impl Waypoint {
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
        let l4: Vec<_> = policies_for(self, state, svc.map(|s| &**s))
            .map(|p| p.l4_only())
            .collect();
        match authz::evaluate_selected(&l4, &conn) {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
        }
    }

    /// Re-judges live L4 streams whenever the mesh config changes.
    pub fn watch_live(self: &Arc<Self>) {
        let wp = self.clone();
        self.live.clone().watch(
            self.store.clone(),
            "waypoint",
            self.drain.clone(),
            move |state, s: &L4Stream| wp.admit_l4(state, s),
        );
    }
}

/// Who is asking and what they asked for, fixed for the stream.
struct Stream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
}

fn local(code: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static response")
}

pub async fn stream(wp: Arc<Waypoint>, src: Arc<Identity>, peer: SocketAddr, inb: hbone::Inbound) {
    let target = inb.authority;
    {
        let state = wp.store.load();
        if let Err(e) = binding::check(&state, &wp.me(), target) {
            refuse_unbound(&state, &src, peer, target, &e);
            return inb.refuse(StatusCode::FORBIDDEN);
        }
    }
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
    let s = Arc::new(Stream { src, peer, target });
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
        let _ = server.serve_connection(TokioIo::new(io), svc).await;
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
    state: &MeshState,
    src: &Identity,
    peer: SocketAddr,
    target: SocketAddr,
    e: &binding::Unbound,
) {
    tracing::warn!(source = %src, %peer, %target, reason = %e, "CONNECT refused: destination not bound to this waypoint");
    let authority = target.to_string();
    telemetry::record(&telemetry::Record {
        src_identity: src,
        src_workload: state.workload_by_ip(peer.ip()).map(|w| &**w),
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
    let Ok(cert) = wp.certs.fetch(&wp.identity).await else {
        return;
    };
    let hbone_addr = SocketAddr::new(ep.ip, hbone::HBONE_PORT);
    let key = hbone::PoolKey {
        source: "waypoint-l4".into(),
        dst_identity: ep.identity(),
        dst: hbone_addr,
    };
    let dial = move || async move { tokio::net::TcpStream::connect(hbone_addr).await };
    let dst = SocketAddr::new(ep.ip, port);
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

/// Policies attached to this waypoint (Gateway or GatewayClass) or to the
/// destination service.
fn policies_for<'a>(
    wp: &'a Waypoint,
    state: &'a MeshState,
    svc: Option<&'a Service>,
) -> impl Iterator<Item = &'a authz::AuthorizationPolicy> {
    // A policy targets objects of its own namespace (or, from the root
    // namespace, every waypoint): only those namespaces' policies can apply.
    let svc_ns = svc.map(|s| s.namespace.as_str());
    let mut namespaces = vec![wp.namespace.as_str(), mesh::ROOT_NAMESPACE];
    namespaces.extend(svc_ns);
    namespaces.sort_unstable();
    namespaces.dedup();
    let svc = svc.map(|s| (s.namespace.as_str(), s.name.as_str()));
    namespaces
        .into_iter()
        .flat_map(|ns| state.waypoint_policies.get(ns))
        .filter(move |tp| tp.applies(&wp.namespace, &wp.name, svc))
        .map(|tp| &tp.policy)
}

fn apply_headers(h: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            h.append(k, v);
        }
    }
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

fn retryable(p: &RetryPolicy, r: &Result<u16, &UpstreamError>) -> bool {
    p.retry_on.iter().any(|on| match (on, r) {
        (RetryOn::FiveXx, Ok(c)) => *c >= 500,
        (RetryOn::GatewayError, Ok(c)) => matches!(c, 502..=504),
        (RetryOn::RetriableStatusCodes, Ok(c)) => p.codes.contains(c),
        (RetryOn::FiveXx | RetryOn::GatewayError, Err(_)) => true,
        (RetryOn::ConnectFailure, Err(UpstreamError::Connect(_))) => true,
        (RetryOn::Reset | RetryOn::RefusedStream, Err(UpstreamError::Reset(_))) => true,
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

struct Outcome2 {
    resp: Response<Body>,
    flags: &'static str,
    upstream: Option<SocketAddr>,
    dst_workload: Option<Arc<Workload>>,
    attempts: u32,
}

impl Outcome2 {
    fn local(code: StatusCode, body: &'static str, flags: &'static str) -> Self {
        Outcome2 {
            resp: local(code, body),
            flags,
            upstream: None,
            dst_workload: None,
            attempts: 0,
        }
    }
}

async fn handle(wp: &Arc<Waypoint>, s: &Stream, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let protocol = if parts.version == http::Version::HTTP_2 {
        if parts
            .headers
            .get("content-type")
            .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
        {
            "grpc"
        } else {
            "http"
        }
    } else {
        "http"
    };
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
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());

    let state = wp.store.load();
    // A binding can end while an HTTP/2 connection lives: each request is
    // checked again, like its policy.
    if let Err(e) = binding::check(&state, &wp.me(), s.target) {
        refuse_unbound(&state, &s.src, s.peer, s.target, &e);
        return local(
            StatusCode::FORBIDDEN,
            "destination not bound to this waypoint\n",
        );
    }
    let service = state.service_by_vip(s.target.ip()).cloned();
    let src_workload = state.workload_by_ip(s.peer.ip()).cloned();
    let buffered = Limited::new(body, MAX_BUFFERED_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes());
    let (out, req_bytes, route_name) = match buffered {
        Err(_) => (
            Outcome2::local(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or broken\n",
                flag::NONE,
            ),
            0,
            None,
        ),
        Ok(body) => {
            let n = body.len() as u64;
            let (o, r) = route_and_send(
                wp,
                s,
                &state,
                service.as_deref(),
                &mut parts,
                body,
                &authority,
            )
            .await;
            (o, n, r)
        }
    };
    let Outcome2 {
        mut resp,
        flags,
        upstream,
        dst_workload,
        attempts,
    } = out;
    if let Ok(v) = HeaderValue::try_from(request_id.as_str()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let code = resp.status().as_u16();
    // Metrics and the access log once the response body has gone out.
    let src = s.src.clone();
    let (svc, dst_w, src_w) = (service.clone(), dst_workload.clone(), src_workload.clone());
    let done = move |sent: u64| {
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
            request_bytes: req_bytes,
            response_bytes: sent,
            upstream,
            request_id: &request_id,
            route: route_name.as_deref(),
            attempts,
        })
    };
    let (rparts, rbody) = resp.into_parts();
    Response::from_parts(rparts, Counted::new(rbody, done).boxed())
}

/// A route backend made concrete: its endpoints (subset applied), traffic
/// policy and upstream protocol.
struct Target {
    eps: Vec<(Arc<Workload>, u16)>,
    policy: TrafficPolicy,
    h2: bool,
}

type Unresolved = (StatusCode, &'static str, &'static str, String);

fn resolve(
    state: &MeshState,
    backend: &mesh::routes::Backend,
    dst_host: &str,
    dst_port: u16,
) -> Result<Target, Unresolved> {
    let nc = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "route backend does not resolve\n",
            flag::NO_CLUSTER,
            why,
        )
    };
    let bsvc = state
        .service_by_host(&backend.host)
        .ok_or_else(|| nc(format!("service {} does not exist", backend.host)))?;
    let dr = state.destination_rules.get(&backend.host).next();
    let (labels, policy) = match (&backend.subset, dr) {
        (None, dr) => (None, dr.map(|d| d.policy.clone()).unwrap_or_default()),
        (Some(name), dr) => {
            let d = dr.ok_or_else(|| {
                nc(format!(
                    "subset {name}: no DestinationRule for {}",
                    backend.host
                ))
            })?;
            let sub = d.subsets.iter().find(|x| &x.name == name).ok_or_else(|| {
                nc(format!(
                    "subset {name} is not defined by DestinationRule {}/{}",
                    d.namespace, d.name
                ))
            })?;
            (
                Some(&sub.labels),
                sub.policy.clone().unwrap_or_else(|| d.policy.clone()),
            )
        }
    };
    let port = backend
        .port
        .or_else(|| (bsvc.hostname == dst_host).then_some(dst_port))
        .or_else(|| bsvc.ports.first().map(|p| p.port))
        .unwrap_or(dst_port);
    let eps: Vec<_> = state
        .endpoints_for(bsvc, port)
        .into_iter()
        .filter(|(w, _)| labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .collect();
    if eps.is_empty() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            flag::NO_HEALTHY,
            format!("{} has no endpoint for port {port}", backend.host),
        ));
    }
    // The backend port's declared protocol decides HTTP/2 upstream, as in Istio.
    let h2 = bsvc
        .ports
        .iter()
        .find(|p| p.port == port)
        .and_then(|p| p.name.as_deref())
        .is_some_and(|n| n.starts_with("grpc") || n.starts_with("http2") || n.starts_with("h2c"));
    Ok(Target { eps, policy, h2 })
}

/// Sends a copy of the request to the mirror backend and forgets it: its
/// answer, or failure, never reaches the client. The authority gets
/// `-shadow`, as Envoy marks mirrored requests.
fn mirror(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    mb: &mesh::routes::Backend,
    dst_host: &str,
    dst_port: u16,
    parts: &http::request::Parts,
    body: Bytes,
) {
    let target = match resolve(state, mb, dst_host, dst_port) {
        Ok(t) => t,
        Err((_, _, _, why)) => {
            return tracing::warn!(mirror = mb.host, why, "mirror target does not resolve")
        }
    };
    let (ep, port) = target.eps[rand::random_range(0..target.eps.len())].clone();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let shadow = format!("{}-shadow", host.split(':').next().unwrap_or(host));
    let uri = if target.h2 {
        format!("http://{shadow}{pq}")
    } else {
        pq
    };
    let mut b = Request::builder().method(parts.method.clone()).uri(uri);
    for (k, v) in &parts.headers {
        if !matches!(
            k.as_str(),
            "host" | "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "te"
        ) {
            b = b.header(k, v);
        }
    }
    if !target.h2 {
        b = b.header("host", shadow.as_str());
    }
    let Ok(req) = b.body(Full::new(body).map_err(|e| match e {}).boxed()) else {
        return;
    };
    let wp = wp.clone();
    tokio::spawn(async move {
        match wp.upstreams.send(&ep, port, req, target.h2).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => {
                tracing::debug!(endpoint = %SocketAddr::new(ep.ip, port), error = %e, "mirrored request failed")
            }
        }
    });
}

/// Policy, routing, faults, balancing, retries: everything between the
/// request head and the upstream response.
async fn route_and_send(
    wp: &Arc<Waypoint>,
    s: &Stream,
    state: &Arc<MeshState>,
    service: Option<&Service>,
    parts: &mut http::request::Parts,
    body: Bytes,
    authority: &str,
) -> (Outcome2, Option<String>) {
    let conn = Connection {
        src_identity: Some(&s.src),
        src_ip: s.peer.ip(),
        dst_ip: s.target.ip(),
        dst_port: s.target.port(),
        request: Some(HttpRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: authority,
            headers: &parts.headers,
        }),
    };
    if let Decision::Deny(why) = authz::evaluate_selected(policies_for(wp, state, service), &conn) {
        tracing::info!(source = %s.src, path = parts.uri.path(), why, "request denied by L7 policy");
        return (
            Outcome2::local(StatusCode::FORBIDDEN, "RBAC: access denied", flag::RBAC),
            None,
        );
    }
    // Pod-addressed traffic has no service routes: straight to that pod.
    let Some(svc) = service else {
        let Some(w) = state.workload_by_ip(s.target.ip()).cloned() else {
            return (
                Outcome2::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no such destination\n",
                    flag::NO_CLUSTER,
                ),
                None,
            );
        };
        let rule = RouteRule::default();
        let eps = vec![(w, s.target.port())];
        let h2 = parts.version == http::Version::HTTP_2;
        return (
            send_with_retries(
                wp,
                s,
                &rule,
                "pod",
                None,
                &TrafficPolicy::default(),
                &eps,
                parts,
                body,
                h2,
            )
            .await,
            None,
        );
    };
    let Some(chosen) = crate::route::choose(state, &svc.hostname, s.target.port(), parts) else {
        return (
            Outcome2::local(StatusCode::NOT_FOUND, "no route matched\n", flag::NO_ROUTE),
            None,
        );
    };
    let route_name = chosen.route.clone();
    let rule = chosen.rule.as_ref();
    if let Some(rd) = &rule.redirect {
        let path = rd
            .path
            .clone()
            .unwrap_or_else(|| parts.uri.path().to_string());
        let host = rd
            .authority
            .clone()
            .unwrap_or_else(|| authority.to_string());
        let mut r = local(
            StatusCode::from_u16(rd.code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
            "",
        );
        if let Ok(v) = HeaderValue::try_from(format!("http://{host}{path}")) {
            r.headers_mut().insert("location", v);
        }
        return (
            Outcome2 {
                resp: r,
                flags: flag::NONE,
                upstream: None,
                dst_workload: None,
                attempts: 0,
            },
            route_name,
        );
    }
    let mut fault_flag = flag::NONE;
    if let Some(f) = &rule.fault {
        if let Some((d, pct)) = f.delay {
            if rand::random::<f64>() * 100.0 < pct {
                tokio::time::sleep(d).await;
                fault_flag = flag::DELAY;
            }
        }
        if let Some((a, pct)) = &f.abort {
            if rand::random::<f64>() * 100.0 < *pct {
                let resp = match a {
                    Abort::Http(c) => local(
                        StatusCode::from_u16(*c).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        "fault filter abort",
                    ),
                    Abort::Grpc(c) => Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .header("grpc-status", c.to_string())
                        .header("grpc-message", "fault filter abort")
                        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                        .expect("static response"),
                };
                return (
                    Outcome2 {
                        resp,
                        flags: flag::ABORT,
                        upstream: None,
                        dst_workload: None,
                        attempts: 0,
                    },
                    route_name,
                );
            }
        }
    }
    let Some(backend) = crate::route::pick_backend(&rule.backends) else {
        tracing::error!(route = ?route_name, "route has no backend with weight > 0");
        return (
            Outcome2::local(
                StatusCode::INTERNAL_SERVER_ERROR,
                "route has no backend\n",
                flag::NO_CLUSTER,
            ),
            route_name,
        );
    };
    let target = match resolve(state, backend, &svc.hostname, s.target.port()) {
        Ok(t) => t,
        Err((code, body, f, why)) => {
            tracing::error!(route = ?route_name, backend = backend.host, subset = ?backend.subset, why, "route reference does not resolve");
            return (Outcome2::local(code, body, f), route_name);
        }
    };
    // Request rewrites and header operations.
    apply_headers(&mut parts.headers, &rule.request_headers);
    if let Some(rw) = &rule.rewrite {
        let p = parts.uri.path();
        let new_path = match rw {
            Rewrite::Full(f) => f.clone(),
            Rewrite::Prefix(to) => match &chosen.matched_prefix {
                Some(pre) if p.starts_with(pre.as_str()) => format!("{to}{}", &p[pre.len()..]),
                _ => to.clone(),
            },
        };
        let pq = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(u) = pq.parse() {
            parts.uri = u;
        }
    }
    if let Some((mb, pct)) = &rule.mirror {
        if rand::random::<f64>() * 100.0 < *pct {
            mirror(
                wp,
                state,
                mb,
                &svc.hostname,
                s.target.port(),
                parts,
                body.clone(),
            );
        }
    }
    let mut out = send_with_retries(
        wp,
        s,
        rule,
        &backend.host,
        backend.subset.as_deref(),
        &target.policy,
        &target.eps,
        parts,
        body,
        target.h2,
    )
    .await;
    if out.flags == flag::NONE {
        out.flags = fault_flag;
    }
    apply_headers(out.resp.headers_mut(), &rule.response_headers);
    (out, route_name)
}

#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    wp: &Arc<Waypoint>,
    s: &Stream,
    rule: &RouteRule,
    host: &str,
    subset: Option<&str>,
    policy: &TrafficPolicy,
    eps: &[(Arc<Workload>, u16)],
    parts: &http::request::Parts,
    body: Bytes,
    h2: bool,
) -> Outcome2 {
    let backend = wp.backends.get(host, subset, policy);
    let Some(_permit) = backend.admit() else {
        return Outcome2::local(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            flag::OVERFLOW,
        );
    };
    let retries = rule.retries.clone().unwrap_or_else(default_retries);
    let headers = &parts.headers;
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
        source_ip: s.peer.ip(),
    };
    let attempts_max = 1 + retries.attempts;
    let attempt_all = async {
        let mut last: Option<Outcome2> = None;
        for attempt in 1..=attempts_max {
            let (ep, port, _lease) = backend.pick(eps, policy, &hash);
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let authority = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| header("host"))
                .unwrap_or_default();
            // HTTP/2 wants the authority in the URI; HTTP/1.1 the origin form and Host.
            let uri = if h2 {
                format!("http://{authority}{pq}")
            } else {
                pq.to_string()
            };
            let mut b = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(if h2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                });
            if !h2 && !headers.contains_key("host") {
                b = b.header("host", authority.as_str());
            }
            for (k, v) in headers {
                // Hop-by-hop headers stay on this hop.
                let hop = matches!(
                    k.as_str(),
                    "connection"
                        | "keep-alive"
                        | "proxy-connection"
                        | "transfer-encoding"
                        | "upgrade"
                        | "te"
                );
                if !(hop || (h2 && k == "host")) {
                    b = b.header(k, v);
                }
            }
            let req = b
                .body(Full::new(body.clone()).map_err(|e| match e {}).boxed())
                .expect("request from valid parts");
            let send = wp.upstreams.send(&ep, port, req, h2);
            let result = match retries.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send)
                    .await
                    .unwrap_or_else(|_| Err(UpstreamError::Reset("per-try timeout".into()))),
                None => send.await,
            };
            let upstream = Some(SocketAddr::new(ep.ip, port));
            let status = result.as_ref().map(|r| r.status().as_u16());
            let outcome = match &status {
                Ok(c) if *c >= 500 => Outcome::Status(*c),
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            };
            let od = policy.outlier.as_ref();
            backend.record(ep.ip, outcome, od, eps.len());
            let again = attempt < attempts_max
                && retryable(
                    &retries,
                    &status
                        .as_ref()
                        .map(|c| *c)
                        .map_err(|_| result.as_ref().err().unwrap()),
                );
            let out = match result {
                Ok(resp) => Outcome2 {
                    resp: resp.map(|b| b.boxed()),
                    flags: flag::NONE,
                    upstream,
                    dst_workload: Some(ep.clone()),
                    attempts: attempt,
                },
                Err(e) => {
                    tracing::debug!(endpoint = %SocketAddr::new(ep.ip, port), error = %e, attempt, "upstream attempt failed");
                    let (f, text) = match e {
                        UpstreamError::Connect(_) => (flag::CONNECT_FAILURE, "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
                        UpstreamError::Reset(_) => (flag::RESET, "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
                    };
                    Outcome2 {
                        resp: local(StatusCode::SERVICE_UNAVAILABLE, text),
                        flags: f,
                        upstream,
                        dst_workload: Some(ep.clone()),
                        attempts: attempt,
                    }
                }
            };
            if !again {
                return out;
            }
            last = Some(out);
            tokio::time::sleep(retries.backoff * attempt).await;
        }
        last.expect("at least one attempt")
    };
    match rule.timeout {
        Some(t) => tokio::time::timeout(t, attempt_all)
            .await
            .unwrap_or_else(|_| {
                Outcome2::local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    flag::TIMEOUT,
                )
            }),
        None => attempt_all.await,
    }
}
