//! RequestAuthentication at the waypoint, before L7 policy, as Envoy's
//! jwt_authn filter runs before RBAC in Istio's waypoints:
//!
//! - the RequestAuthentications attached (by `targetRefs`) to this waypoint
//!   or to the destination service apply;
//! - every token found at a location one of their rules names must verify
//!   with a rule of its issuer that looks there, else 401 (a token of an
//!   issuer none names is rejected too). Istio's `requires_any` would let a
//!   request with one good and one bad token through; we reject it, which
//!   only ever allows less;
//! - no token at all passes, with no request principal: AuthorizationPolicy
//!   decides (`requestPrincipals: ["*"]` requires one);
//! - after success the first token's rule writes its outputs
//!   (`outputPayloadToHeader`, `outputClaimToHeaders`) and each token is
//!   removed (its header, or its query parameter; a cookie stays) unless its
//!   rule has `forwardOriginalToken`. Output headers the client sent are
//!   always dropped, so none can be forged.

pub mod jwks;
pub mod verify;

use http::request::Parts;
use http::{HeaderName, HeaderValue};
use mesh::authz::RequestAuth;
use mesh::request_authn::{JwtRule, KeySource, Location, RequestAuthentication};
use mesh::{MeshState, Service};
use serde_json::Value;

use crate::error::JwtReject;
pub use jwks::Jwks;

/// The RequestAuthentications for traffic through `waypoint` to `svc`.
pub fn applying<'a>(
    waypoint: (&'a str, &'a str),
    state: &'a MeshState,
    svc: Option<&'a Service>,
) -> Vec<&'a RequestAuthentication> {
    let (namespaces, dst) = crate::plan::attachment(waypoint.0, state, svc);
    namespaces
        .into_iter()
        .flat_map(|ns| state.request_authentications.get(ns))
        .filter(|ra| ra.applies(waypoint.0, waypoint.1, dst))
        .collect()
}

/// A rule to check tokens with; an unreadable object stands for a rule
/// that looks where Istio's defaults look and accepts nothing.
enum Checker<'a> {
    Rule(&'a JwtRule),
    Unreadable,
}

impl Checker<'_> {
    fn locations(&self) -> Vec<Location<'_>> {
        match self {
            Checker::Rule(r) => r.locations(),
            Checker::Unreadable => vec![
                Location::Header {
                    name: "authorization",
                    prefix: "Bearer ",
                },
                Location::Param("access_token"),
            ],
        }
    }
}

/// A token and where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found<'a> {
    pub token: String,
    pub at: Location<'a>,
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Every token the request has at `at`: all of them are verified, so a
/// second, forged one next to a good one is never forwarded unchecked.
pub fn extract(parts: &Parts, at: &Location<'_>) -> Vec<String> {
    match at {
        Location::Header { name, prefix } => parts
            .headers
            .get_all(*name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix(prefix))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        Location::Param(p) => parts
            .uri
            .query()
            .into_iter()
            .flat_map(query_pairs)
            .filter(|(k, v)| k == p && !v.is_empty())
            .map(|(_, v)| v.to_string())
            .collect(),
        Location::Cookie(c) => parts
            .headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .filter(|(k, v)| k == c && !v.is_empty())
            .map(|(_, v)| v.to_string())
            .collect(),
    }
}

/// Takes the token out of the request (not a cookie: the header carries
/// others).
fn strip(parts: &mut Parts, at: &Location<'_>) {
    match at {
        Location::Header { name, .. } => {
            parts.headers.remove(*name);
        }
        Location::Param(p) => {
            let Some(q) = parts.uri.query() else { return };
            let kept: Vec<_> = q
                .split('&')
                .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != *p)
                .collect();
            let pq = if kept.is_empty() {
                parts.uri.path().to_string()
            } else {
                format!("{}?{}", parts.uri.path(), kept.join("&"))
            };
            let mut u = http::uri::Parts::from(parts.uri.clone());
            if let Ok(pq) = pq.parse() {
                u.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(u) {
                    parts.uri = uri;
                }
            }
        }
        Location::Cookie(_) => {}
    }
}

/// A claim as a header value: strings as they are, numbers and booleans
/// as JSON text; other shapes are not written.
fn claim_value(claims: &serde_json::Map<String, Value>, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

fn set_header(parts: &mut Parts, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        parts.headers.insert(n, v);
    }
}

/// Checks the request's tokens (see the module comment). Ok(None): no
/// RequestAuthentication applies, or the request carries no token.
pub async fn authenticate(
    jwks: &Jwks,
    applying: &[&RequestAuthentication],
    parts: &mut Parts,
) -> Result<Option<RequestAuth>, JwtReject> {
    let checkers: Vec<Checker> = applying
        .iter()
        .flat_map(|ra| {
            let unreadable = ra.unreadable.is_some().then_some(Checker::Unreadable);
            unreadable
                .into_iter()
                .chain(ra.rules.iter().map(Checker::Rule))
        })
        .collect();
    for c in &checkers {
        if let Checker::Rule(r) = c {
            let outputs = r.output_claim_to_headers.iter().map(|o| o.header.as_str());
            for h in outputs.chain(r.output_payload_to_header.as_deref()) {
                parts.headers.remove(h);
            }
        }
    }
    // Each distinct token, with the checkers that look where it was.
    let mut found: Vec<(Found, Vec<usize>)> = Vec::new();
    for (i, c) in checkers.iter().enumerate() {
        for at in c.locations() {
            for token in extract(parts, &at) {
                let f = Found {
                    token,
                    at: at.clone(),
                };
                match found.iter_mut().find(|(g, _)| *g == f) {
                    Some((_, by)) => by.push(i),
                    None => found.push((f, vec![i])),
                }
            }
        }
    }
    let mut first: Option<(RequestAuth, &JwtRule, String)> = None;
    let mut strip_at = Vec::new();
    for (f, by) in &found {
        let peeked = verify::peek(&f.token)?;
        // The issuer picks the rule; an unreadable object accepts nothing.
        if by
            .iter()
            .any(|i| matches!(checkers[*i], Checker::Unreadable))
        {
            return Err(JwtReject::Unusable);
        }
        let rules: Vec<&JwtRule> = by
            .iter()
            .filter_map(|i| match checkers[*i] {
                Checker::Rule(r) if r.issuer == peeked.issuer => Some(r),
                _ => None,
            })
            .collect();
        if rules.is_empty() {
            return Err(JwtReject::UnknownIssuer);
        }
        let mut outcome = Err(JwtReject::UnknownIssuer);
        for r in &rules {
            outcome = check(jwks, r, &f.token, peeked.kid.as_deref())
                .await
                .map(|c| (c, *r));
            if outcome.is_ok() {
                break;
            }
        }
        let (claims, rule) = outcome?;
        if !rule.forward_original_token {
            strip_at.push(f.at.clone());
        }
        if first.is_none() {
            let sub = claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let auth = RequestAuth {
                principal: format!("{}/{sub}", peeked.issuer),
                claims,
            };
            first = Some((auth, rule, f.token.clone()));
        }
    }
    let Some((auth, rule, token)) = first else {
        return Ok(None);
    };
    for at in &strip_at {
        strip(parts, at);
    }
    if let Some(h) = &rule.output_payload_to_header {
        if let Some(payload) = token.split('.').nth(1) {
            set_header(parts, h, payload);
        }
    }
    for o in &rule.output_claim_to_headers {
        if let Some(v) = claim_value(&auth.claims, &o.claim) {
            set_header(parts, &o.header, &v);
        }
    }
    Ok(Some(auth))
}

async fn check(
    jwks: &Jwks,
    rule: &JwtRule,
    token: &str,
    kid: Option<&str>,
) -> Result<serde_json::Map<String, Value>, JwtReject> {
    if rule.unusable.is_some() {
        return Err(JwtReject::Unusable);
    }
    let keys = match &rule.keys {
        KeySource::Inline(text) => jwks.inline(text)?,
        KeySource::Uri(uri) => jwks.remote(uri, kid, rule.timeout).await?,
        KeySource::None => return Err(JwtReject::Unusable),
    };
    verify::verify(token, rule, &keys)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
