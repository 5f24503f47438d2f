//! What to do with a request, decided from its head and the mesh config
//! alone: L7 policy, the route, a redirect, faults, the backend and its
//! endpoints, the mirror. No I/O and no clock; the dice are passed in, so
//! tests drive it with tables.

use mesh::secret::TlsSecret;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use identity::Identity;
use mesh::authz::{self, Connection, Decision, HttpRequest};
use mesh::routes::{Abort, Backend, HeaderOps, Rewrite, RouteRule, TrafficPolicy};
use mesh::{MeshState, Service, Workload};

use crate::error::{local, ProxyError};
use crate::upstream::Body;

/// Random choices, injectable: percentages in [0, 100) and indexes.
pub trait Dice {
    fn percent(&mut self) -> f64;
    fn below(&mut self, n: u64) -> u64;
}

pub struct Random;

impl Dice for Random {
    fn percent(&mut self) -> f64 {
        rand::random::<f64>() * 100.0
    }
    fn below(&mut self, n: u64) -> u64 {
        rand::random_range(0..n)
    }
}

/// Who asks and where to, fixed for the CONNECT stream.
pub struct Caller<'a> {
    pub src: &'a Identity,
    pub peer: SocketAddr,
    pub target: SocketAddr,
    /// The waypoint's Gateway, for the policies attached to it.
    pub waypoint: (&'a str, &'a str),
    /// The request's verified JWT, if it carried one.
    pub auth: Option<&'a authz::RequestAuth>,
}

/// A route backend made concrete: its endpoints (subset applied), traffic
/// policy and upstream protocol.
pub struct Target {
    /// The backend's host (the server name originated TLS falls back to).
    pub host: String,
    pub eps: Vec<(Arc<Workload>, u16)>,
    /// A DNS ServiceEntry: (name, port) to resolve when sending, instead
    /// of `eps` (resolving is I/O, not planning).
    pub dns: Vec<(String, u16)>,
    pub policy: TrafficPolicy,
    /// The Secret the policy's TLS names (`credentialName`), as it is in
    /// this state.
    pub secret: Option<TlsSecret>,
    pub h2: bool,
    /// The backend service's locality preference (None: any endpoint).
    pub load_balancing: Option<mesh::locality::LoadBalancing>,
}

pub struct Forward<'a> {
    pub rule: Cow<'a, RouteRule>,
    /// The backend's host and subset (load-balancer and outlier state key).
    pub host: String,
    pub subset: Option<String>,
    pub target: Target,
    /// Where a copy goes, when the mirror's dice said so.
    pub mirror: Option<Target>,
}

pub enum Action<'a> {
    /// Answered here: a redirect, an injected abort.
    Respond(Response<Body>, &'static str),
    Forward(Box<Forward<'a>>),
}

pub struct Plan<'a> {
    /// `kind ns/name` of the route taken, for the log.
    pub route: Option<String>,
    /// An injected delay, served before the action.
    pub delay: Option<Duration>,
    pub action: Result<Action<'a>, ProxyError>,
}

impl Plan<'_> {
    fn fail(route: Option<String>, e: ProxyError) -> Self {
        Plan {
            route,
            delay: None,
            action: Err(e),
        }
    }
}

/// Policies attached to this waypoint (Gateway or GatewayClass) or to the
/// destination service.
pub fn policies_for<'a>(
    waypoint: (&'a str, &'a str),
    state: &'a MeshState,
    svc: Option<&'a Service>,
) -> impl Iterator<Item = &'a authz::AuthorizationPolicy> {
    targeted_for(waypoint, state, svc).map(|tp| &tp.policy)
}

/// `policies_for` with their targets and provider (CUSTOM policies need
/// the provider they name).
pub fn targeted_for<'a>(
    waypoint: (&'a str, &'a str),
    state: &'a MeshState,
    svc: Option<&'a Service>,
) -> impl Iterator<Item = &'a authz::TargetedPolicy> {
    let (wp_ns, wp_name) = waypoint;
    let (namespaces, svc) = attachment(wp_ns, state, svc);
    namespaces
        .into_iter()
        .flat_map(|ns| state.waypoint_policies.get(ns))
        .filter(move |tp| tp.applies(wp_ns, wp_name, svc))
}

/// Where objects attached by `targetRefs` to this waypoint or to `svc` can
/// be: an object targets its own namespace (or, from the root namespace,
/// every waypoint), so only those namespaces'; and `svc` as a target.
pub fn attachment<'a>(
    wp_ns: &'a str,
    state: &'a MeshState,
    svc: Option<&'a Service>,
) -> (Vec<&'a str>, Option<authz::Destination<'a>>) {
    let svc_ns = svc.map(|s| s.namespace.as_str());
    let mut namespaces = vec![wp_ns, mesh::ROOT_NAMESPACE];
    namespaces.extend(svc_ns);
    namespaces.sort_unstable();
    namespaces.dedup();
    let svc = svc.map(|s| authz::Destination {
        namespace: &s.namespace,
        name: &s.name,
        entry: state.service_entries.iter().any(|se| {
            se.namespace == s.namespace && se.name == s.name && se.hosts.contains(&s.hostname)
        }),
    });
    (namespaces, svc)
}

/// Plans one request. `parts` gets the route's rewrites and request header
/// operations.
pub fn plan<'a>(
    c: &Caller,
    state: &'a MeshState,
    service: Option<&'a Service>,
    parts: &mut http::request::Parts,
    authority: &str,
    dice: &mut dyn Dice,
) -> Plan<'a> {
    let conn = Connection {
        src_identity: Some(c.src),
        src_ip: c.peer.ip(),
        dst_ip: c.target.ip(),
        dst_port: c.target.port(),
        request: Some(HttpRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: authority,
            headers: &parts.headers,
            auth: c.auth,
        }),
    };
    if let Decision::Deny(why) =
        authz::evaluate_selected(policies_for(c.waypoint, state, service), &conn)
    {
        tracing::info!(source = %c.src, path = parts.uri.path(), why, "request denied by L7 policy");
        return Plan::fail(None, ProxyError::Denied(why));
    }
    // Pod-addressed traffic has no service routes: straight to that pod.
    let Some(svc) = service else {
        let Some(w) = state.workload_by_ip(c.target.ip()).cloned() else {
            return Plan::fail(None, ProxyError::NoDestination);
        };
        let target = Target {
            host: String::new(),
            eps: vec![(w, c.target.port())],
            dns: Vec::new(),
            policy: TrafficPolicy::default(),
            secret: None,
            h2: parts.version == http::Version::HTTP_2,
            load_balancing: None,
        };
        return Plan {
            route: None,
            delay: None,
            action: Ok(Action::Forward(Box::new(Forward {
                rule: Cow::Owned(RouteRule::default()),
                host: "pod".into(),
                subset: None,
                target,
                mirror: None,
            }))),
        };
    };
    let Some(chosen) = crate::route::choose(state, &svc.hostname, c.target.port(), parts) else {
        return Plan::fail(None, ProxyError::NoRoute);
    };
    let route = chosen.route.clone();
    let rule = chosen.rule;
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
        return Plan {
            route,
            delay: None,
            action: Ok(Action::Respond(r, crate::telemetry::flag::NONE)),
        };
    }
    let mut delay = None;
    if let Some(f) = &rule.fault {
        if let Some((d, pct)) = f.delay {
            if dice.percent() < pct {
                delay = Some(d);
            }
        }
        if let Some((a, pct)) = &f.abort {
            if dice.percent() < *pct {
                let resp = match a {
                    Abort::Http(code) => local(
                        StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        "fault filter abort",
                    ),
                    Abort::Grpc(code) => crate::grpc::trailers_only(*code, "fault filter abort"),
                };
                return Plan {
                    route,
                    delay,
                    action: Ok(Action::Respond(resp, crate::telemetry::flag::ABORT)),
                };
            }
        }
    }
    let Some(backend) = pick_backend(&rule.backends, dice) else {
        tracing::error!(route = ?route, "route has no backend with weight > 0");
        return Plan::fail(route, ProxyError::NoBackend);
    };
    let target = match resolve(state, backend, &svc.hostname, c.target.port()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(route = ?route, backend = backend.host, subset = ?backend.subset, error = %e, "route reference does not resolve");
            return Plan {
                route,
                delay,
                action: Err(e),
            };
        }
    };
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
    let mirror = rule.mirror.as_ref().and_then(|(mb, pct)| {
        if dice.percent() >= *pct {
            return None;
        }
        resolve(state, mb, &svc.hostname, c.target.port())
            .inspect_err(
                |e| tracing::warn!(mirror = mb.host, error = %e, "mirror target does not resolve"),
            )
            .ok()
    });
    let (host, subset) = (backend.host.clone(), backend.subset.clone());
    Plan {
        route,
        delay,
        action: Ok(Action::Forward(Box::new(Forward {
            rule,
            host,
            subset,
            target,
            mirror,
        }))),
    }
}

/// Weighted choice; None when every weight is zero or there are none.
fn pick_backend<'b>(backends: &'b [Backend], dice: &mut dyn Dice) -> Option<&'b Backend> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut x = dice.below(total);
    backends.iter().find(|b| {
        if x < b.weight as u64 {
            true
        } else {
            x -= b.weight as u64;
            false
        }
    })
}

pub fn resolve(
    state: &MeshState,
    backend: &Backend,
    dst_host: &str,
    dst_port: u16,
) -> Result<Target, ProxyError> {
    let nc = ProxyError::Unresolved;
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
    // A DNS entry's endpoints are hostname workloads (they carry no
    // labels: no subset selects them), resolved when sending.
    let (dns, eps): (Vec<_>, Vec<_>) = state
        .endpoints_for(bsvc, port)
        .into_iter()
        .filter(|(w, _)| labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .partition(|(w, _)| w.hostname.is_some());
    // One that speaks HBONE is left out rather than sent plain TCP (the
    // waypoint resolves names only for plain-TCP endpoints).
    let (dns, hbone_named): (Vec<_>, Vec<_>) = dns
        .into_iter()
        .partition(|(w, _)| w.protocol != mesh::TunnelProtocol::Hbone);
    let dns: Vec<_> = dns
        .into_iter()
        .filter_map(|(w, p)| Some((w.hostname.as_deref()?.to_string(), p)))
        .collect();
    if eps.is_empty() && dns.is_empty() {
        let why = if hbone_named.is_empty() {
            format!("{} has no endpoint for port {port}", backend.host)
        } else {
            format!(
                "{} has only HBONE endpoints named by hostname for port {port}, which the waypoint does not reach (never as plain TCP)",
                backend.host
            )
        };
        return Err(ProxyError::NoHealthy(why));
    }
    // The backend port's declared protocol decides HTTP/2 upstream, as in Istio.
    let h2 = bsvc
        .ports
        .iter()
        .find(|p| p.port == port)
        .and_then(|p| p.name.as_deref())
        .is_some_and(|n| n.starts_with("grpc") || n.starts_with("http2") || n.starts_with("h2c"));
    // A Secret that is not there fails the request, never sends it with
    // other credentials (or none).
    let secret = match policy.tls.as_ref().and_then(|t| t.credential.as_ref()) {
        Some((ns, name)) => Some(
            state
                .secrets
                .get(&(ns.clone(), name.clone()))
                .cloned()
                .ok_or_else(|| {
                    ProxyError::Unresolved(format!(
                        "credentialName {ns}/{name}: no such Secret (Secrets are read from the \
                     standalone file only)"
                    ))
                })?,
        ),
        None => None,
    };
    Ok(Target {
        host: backend.host.clone(),
        eps,
        dns,
        policy,
        secret,
        h2,
        load_balancing: bsvc.load_balancing.clone(),
    })
}

pub fn apply_headers(h: &mut HeaderMap, ops: &HeaderOps) {
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

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
