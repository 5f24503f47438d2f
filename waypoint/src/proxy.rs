//! One CONNECT stream from a ztunnel: sniff the protocol, then serve HTTP
//! (HTTP/1.1 or HTTP/2, so gRPC too) request by request, or pass other bytes
//! through at L4.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use identity::{Identity, SecretManager};
use mesh::live::LiveConns;
use mesh::routes::WaypointRef;
use mesh::{MeshStore, Workload};
use tokio::sync::watch;

use crate::binding;
use crate::body::Counted;
use crate::error::local;
use crate::l4::L4Stream;
use crate::lb::Backends;
use crate::plan::{self, Action};
use crate::replay::Replay;
use crate::send::{self, Outgoing, Sent, Upgrading};
use crate::telemetry::{self, flag};
use crate::tunnel::{upgrade_kind, UpgradedStream};
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

impl Waypoint {
    pub(crate) fn gateway(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }

    pub(crate) fn me(&self) -> WaypointRef {
        WaypointRef {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
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
pub(crate) struct Stream {
    pub(crate) src: Arc<Identity>,
    pub(crate) peer: SocketAddr,
    pub(crate) target: SocketAddr,
    /// For telemetry: from the state, else the CONNECT's baggage.
    pub(crate) src_workload: Option<Arc<Workload>>,
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
        crate::l4::l4(&wp, &s, io).await;
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
        .unwrap_or_else(crate::trace::request_id);
    let tp = crate::trace::traceparent(&parts.headers);
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
