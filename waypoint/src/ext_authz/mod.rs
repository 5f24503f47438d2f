//! CUSTOM AuthorizationPolicies: before DENY and ALLOW (Istio's order), a
//! request a CUSTOM policy matches is sent to the external authorizer its
//! `provider.name` names among meshConfig's extension providers — Envoy's
//! ext_authz HTTP service or its gRPC `Authorization/Check` — which allows
//! it (with headers for the upstream and the client) or answers the client
//! itself. A check that fails or times out answers `statusOnError` (403)
//! unless the provider is `failOpen`. A provider that is not there or not
//! usable denies (fail closed).
//!
//! The authorizer is reached as any upstream is: its service's endpoints
//! through the mesh model, over HBONE when it is in the mesh.

mod grpc;
mod http;

pub use grpc::verdict as grpc_verdict;

#[allow(clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.auth.v3.rs"));
}

use std::net::SocketAddr;
use std::sync::Arc;

use ::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use mesh::authz::{Action, Connection, TargetedPolicy};
use mesh::ext_authz::{Authorizer, HttpAuthorizer, Provider, Providers};
use mesh::routes::Backend;
use mesh::{MeshState, Service};

use crate::error::{ExtAuthzError, ProxyError};
use crate::proxy::Waypoint;
use crate::send::{ReqBody, Sent};
use crate::telemetry::flag;
use crate::upstream::Body;

/// What the CUSTOM policies want for one request, in policy order, one
/// entry per provider.
#[derive(Debug, PartialEq)]
pub enum Need<'a> {
    Check(&'a str, Ask<'a>),
    /// A matching policy names a provider that cannot be asked.
    Refuse(String),
}

/// An authorizer to ask, by the API it speaks.
#[derive(Debug, PartialEq, Clone, Copy)]
pub enum Ask<'a> {
    Http(&'a HttpAuthorizer),
    Grpc(&'a Authorizer),
}

impl Ask<'_> {
    fn authorizer(&self) -> &Authorizer {
        match self {
            Ask::Http(h) => &h.authorizer,
            Ask::Grpc(a) => a,
        }
    }
}

/// The checks a request needs (pure): each provider named by a CUSTOM
/// policy whose rules match. Dry-run policies are logged only.
pub fn needed<'a>(
    policies: impl IntoIterator<Item = &'a TargetedPolicy>,
    providers: &'a Providers,
    conn: &Connection,
) -> Vec<Need<'a>> {
    let mut out: Vec<Need> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for tp in policies {
        let p = &tp.policy;
        if p.action != Action::Custom || !p.matches(conn) {
            continue;
        }
        let name = tp.provider.as_deref().unwrap_or("");
        if p.dry_run {
            tracing::info!(policy = %p.key(), provider = name, "dry-run CUSTOM policy matched");
            continue;
        }
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        out.push(match providers.get_key_value(name) {
            Some((n, Provider::Unusable(why))) => Need::Refuse(format!(
                "CUSTOM policy {}: provider {n:?} cannot be used: {why}",
                p.key()
            )),
            Some((n, Provider::Http(h))) => Need::Check(n, Ask::Http(h)),
            Some((n, Provider::Grpc(a))) => Need::Check(n, Ask::Grpc(a)),
            None => Need::Refuse(format!(
                "CUSTOM policy {}: provider {name:?} is not among meshConfig's extensionProviders",
                p.key()
            )),
        });
    }
    out
}

/// One header change the authorizer asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderOp {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    AddIfAbsent(HeaderName, HeaderValue),
    OverwriteIfExists(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl HeaderOp {
    pub fn apply(&self, h: &mut HeaderMap) {
        match self {
            HeaderOp::Set(k, v) => {
                h.insert(k.clone(), v.clone());
            }
            HeaderOp::Append(k, v) => {
                h.append(k.clone(), v.clone());
            }
            HeaderOp::AddIfAbsent(k, v) => {
                if !h.contains_key(k) {
                    h.insert(k.clone(), v.clone());
                }
            }
            HeaderOp::OverwriteIfExists(k, v) => {
                if h.contains_key(k) {
                    h.insert(k.clone(), v.clone());
                }
            }
            HeaderOp::Remove(k) => {
                h.remove(k);
            }
        }
    }
}

/// What one authorizer answered.
pub enum Verdict {
    Allow {
        /// Onto the request sent upstream.
        upstream: Vec<HeaderOp>,
        /// Onto the response the client gets.
        downstream: Vec<HeaderOp>,
    },
    /// The authorizer's own answer, for the client.
    Deny(Response<Body>),
    /// No usable answer: unreachable, timed out, 5xx, unreadable.
    Failed(String),
}

/// What a check sends, besides the request head.
pub struct Input<'a> {
    pub parts: &'a ::http::request::Parts,
    pub authority: &'a str,
    pub src: &'a identity::Identity,
    pub peer: SocketAddr,
    pub target: SocketAddr,
    pub request_id: &'a str,
    /// The body as the provider asked for it: its first bytes, and
    /// whether that is all of it.
    pub body: Option<(Bytes, bool)>,
}

/// The headers to add to the client's response once the request went
/// through.
#[derive(Default)]
pub struct OnAllow(Vec<HeaderOp>);

impl OnAllow {
    pub fn apply(&self, h: &mut HeaderMap) {
        for op in &self.0 {
            op.apply(h);
        }
    }
}

/// Who asks, fixed for the request.
pub struct Asker<'a> {
    pub src: &'a identity::Identity,
    pub peer: SocketAddr,
    pub target: SocketAddr,
    pub authority: &'a str,
    pub request_id: &'a str,
    /// A gRPC client gets its denial as trailers-only.
    pub grpc: bool,
    /// The request's verified JWT: CUSTOM rules may match on it.
    pub auth: Option<&'a mesh::authz::RequestAuth>,
}

/// Runs the checks CUSTOM policies ask for. Ok: go on (the upstream
/// headers applied to `parts`), with headers for the client's response;
/// Err: the answer the client gets.
pub async fn authorize(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    service: Option<&Service>,
    parts: &mut ::http::request::Parts,
    body: &Arc<ReqBody>,
    who: &Asker<'_>,
) -> Result<OnAllow, Sent> {
    let needs = {
        let conn = Connection {
            src_identity: Some(who.src),
            src_ip: who.peer.ip(),
            dst_ip: who.target.ip(),
            dst_port: who.target.port(),
            request: Some(mesh::authz::HttpRequest {
                method: parts.method.as_str(),
                path: parts.uri.path(),
                host: who.authority,
                headers: &parts.headers,
                auth: who.auth,
            }),
        };
        let policies = crate::plan::targeted_for(wp.gateway(), state, service);
        needed(policies, &state.extension_providers, &conn)
    };
    // Most requests meet no CUSTOM policy. The checks' future holds the
    // authorizer clients' state, kilobytes that every request would carry
    // (and move) if it were inline here; boxed, only a checked one does.
    let on_allow = if needs.is_empty() {
        OnAllow::default()
    } else {
        Box::pin(ask_all(wp, state, parts, body, who, needs)).await?
    };
    // The upstream attempts read the body next: they need all of it.
    if body.replayable().is_err() {
        return Err(Sent::local(
            &ProxyError::ExtAuthz(ExtAuthzError::BodyTooLarge),
            who.grpc,
        ));
    }
    Ok(on_allow)
}

/// Asks each provider `needs` names, in order; the first denial (or failed
/// check without `failOpen`) answers the request.
async fn ask_all(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    parts: &mut ::http::request::Parts,
    body: &Arc<ReqBody>,
    who: &Asker<'_>,
    needs: Vec<Need<'_>>,
) -> Result<OnAllow, Sent> {
    let Asker {
        src,
        peer,
        target,
        authority,
        request_id,
        grpc,
        auth: _,
    } = *who;
    let mut on_allow = OnAllow::default();
    for need in needs {
        let (name, ask) = match need {
            Need::Refuse(why) => {
                tracing::info!(source = %src, path = parts.uri.path(), why, "request denied: CUSTOM policy cannot be checked");
                return Err(Sent::local(&ProxyError::Denied(why), grpc));
            }
            Need::Check(n, ask) => (n, ask),
        };
        let authorizer = ask.authorizer();
        // A provider whose service the mesh does not have is a bad
        // provider (istiod refuses it and denies), not a failed check that
        // `failOpen` would let through.
        if let Err(why) = known_service(state, authorizer) {
            let why = format!("provider {name:?}: {why}");
            tracing::info!(source = %src, path = parts.uri.path(), why, "request denied: CUSTOM provider's service unknown");
            return Err(Sent::local(&ProxyError::Denied(why), grpc));
        }
        let body_part = match authorizer.body {
            None => None,
            Some(b) => {
                match read_body(body, b.max_request_bytes as usize).await {
                    Ok((bytes, whole)) if whole || b.allow_partial => Some((bytes, whole)),
                    Ok(_) | Err(()) => {
                        tracing::info!(provider = name, "request body over the authorizer's maxRequestBytes (or the replay buffer)");
                        return Err(Sent::local(
                            &ProxyError::ExtAuthz(ExtAuthzError::BodyTooLarge),
                            grpc,
                        ));
                    }
                }
            }
        };
        let input = Input {
            parts,
            authority,
            src,
            peer,
            target,
            request_id,
            body: body_part,
        };
        let call = async {
            match ask {
                Ask::Http(h) => http::check(wp, state, h, &input).await,
                Ask::Grpc(a) => grpc::check(wp, state, a, &input).await,
            }
        };
        let verdict = tokio::time::timeout(authorizer.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Verdict::Failed(format!("no answer within {:?}", authorizer.timeout))
            });
        match verdict {
            Verdict::Allow {
                upstream,
                downstream,
            } => {
                for op in &upstream {
                    op.apply(&mut parts.headers);
                }
                on_allow.0.extend(downstream);
            }
            Verdict::Deny(resp) => {
                tracing::info!(source = %src, path = parts.uri.path(), provider = name, status = resp.status().as_u16(), "request denied by the external authorizer");
                let resp = if grpc { to_grpc(resp) } else { resp };
                return Err(Sent {
                    details: Some("ext_authz_denied"),
                    ..Sent::answer(resp, flag::EXT_AUTHZ)
                });
            }
            Verdict::Failed(why) if authorizer.fail_open => {
                tracing::info!(
                    provider = name,
                    why,
                    "external authorization failed; allowed (failOpen)"
                );
            }
            Verdict::Failed(why) => {
                tracing::info!(source = %src, path = parts.uri.path(), provider = name, why, "external authorization failed; denied");
                return Err(Sent::local(&failed(authorizer, why), grpc));
            }
        }
    }
    Ok(on_allow)
}

fn failed(a: &Authorizer, why: String) -> ProxyError {
    ProxyError::ExtAuthz(ExtAuthzError::Failed {
        status: a.status_on_error,
        why,
    })
}

/// Reads the request body through a throwaway attempt (the replay buffer
/// keeps it for the upstream): its first `max` bytes, and whether that is
/// all of it. Err when the body broke or outgrew the replay buffer.
async fn read_body(body: &Arc<ReqBody>, max: usize) -> Result<(Bytes, bool), ()> {
    let mut attempt = body.attempt().map_err(|_| ())?;
    let mut buf = bytes::BytesMut::new();
    while buf.len() <= max {
        match attempt.frame().await {
            None => return Ok((buf.freeze(), true)),
            Some(Err(_)) => return Err(()),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    buf.extend_from_slice(d);
                }
            }
        }
        if body.replayable().is_err() {
            return Err(());
        }
    }
    buf.truncate(max);
    Ok((buf.freeze(), false))
}

/// The authorizer's denial put to a gRPC client: trailers-only with the
/// gRPC code for its status, as Envoy's local replies to gRPC are.
fn to_grpc(resp: Response<Body>) -> Response<Body> {
    let (parts, _) = resp.into_parts();
    let mut r = crate::grpc::trailers_only(
        crate::grpc::status_for_http(parts.status),
        "external authorization denied the request",
    );
    for (k, v) in &parts.headers {
        if k != "content-type" && k != "content-length" {
            r.headers_mut().append(k, v.clone());
        }
    }
    r
}

/// The authorizer's endpoints on its port, as a route backend resolves.
/// The provider's service is one the mesh has (in its namespace, when the
/// provider names one).
/// The providers CUSTOM policies would ask about this request now; Err: one
/// cannot be asked (a live upgraded connection is then closed, as a new
/// request would be denied).
pub(crate) fn askable<'a>(
    policies: impl IntoIterator<Item = &'a TargetedPolicy>,
    state: &'a MeshState,
    conn: &Connection,
) -> Result<Vec<String>, String> {
    needed(policies, &state.extension_providers, conn)
        .into_iter()
        .map(|n| match n {
            Need::Refuse(why) => Err(why),
            Need::Check(name, ask) => known_service(state, ask.authorizer())
                .map(|()| name.to_string())
                .map_err(|why| format!("provider {name:?}: {why}")),
        })
        .collect()
}

fn known_service(state: &MeshState, a: &Authorizer) -> Result<(), String> {
    let svc = state
        .service_by_host(&a.host)
        .ok_or_else(|| format!("service {} does not exist", a.host))?;
    match &a.namespace {
        Some(ns) if &svc.namespace != ns => {
            Err(format!("service {} is not in namespace {ns}", a.host))
        }
        _ => Ok(()),
    }
}

fn target(state: &MeshState, a: &Authorizer) -> Result<crate::plan::Target, String> {
    let backend = Backend {
        host: a.host.clone(),
        port: Some(a.port),
        subset: None,
        weight: 1,
    };
    crate::plan::resolve(state, &backend, &a.host, a.port).map_err(|e| e.to_string())
}

/// Sends one request to the authorizer: an endpoint of its service, over
/// HBONE when it is in the mesh. The answer whole (bounded), or why not.
async fn call(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    a: &Authorizer,
    req: impl FnOnce(bool) -> ::http::Request<Body>,
    force_h2: bool,
) -> Result<(::http::response::Parts, Bytes, Option<HeaderMap>), String> {
    let t = target(state, a)?;
    let eps = if t.dns.is_empty() {
        t.eps.clone()
    } else {
        crate::dns::resolve(&t.dns)
            .await
            .map_err(|e| e.to_string())?
    };
    let (ep, port) = eps
        .get(rand::random_range(0..eps.len().max(1)))
        .cloned()
        .ok_or_else(|| format!("{} has no endpoint", a.host))?;
    let h2 = force_h2 || t.h2;
    let origin = t
        .policy
        .tls
        .as_ref()
        .map(|tls| crate::origin_tls::Origination {
            tls,
            host: &t.host,
            secret: t.secret.as_ref(),
        });
    // The authorizer is not the request's destination: no family to
    // follow, so its primary address.
    let resp = wp
        .upstreams
        .send(
            &ep,
            std::net::SocketAddr::new(ep.ip, port),
            req(h2),
            h2,
            origin.as_ref(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    // An authorizer's answer is small; a huge one is a failure, not memory.
    let collected = http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok((parts, collected.to_bytes(), trailers))
}

const MAX_ANSWER: usize = 1 << 20;

/// A response to the client from status, headers and body.
fn answer(status: StatusCode, headers: Vec<HeaderOp>, body: Bytes) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Full::new(body)
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    for op in &headers {
        op.apply(r.headers_mut());
    }
    r
}

#[cfg(test)]
mod tests;
