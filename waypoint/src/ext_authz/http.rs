//! Envoy's ext_authz HTTP service, as its client: the check request is the
//! client's request head (same method, `pathPrefix` + the original path)
//! with only the allowed headers and no body unless the provider asks for
//! it; 200 allows, 5xx is a failed check, anything else is the answer the
//! client gets.

use std::sync::Arc;

use ::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use mesh::ext_authz::{any_matches, HttpAuthorizer};
use mesh::MeshState;

use super::{answer, call, HeaderOp, Input, Verdict};
use crate::proxy::Waypoint;
use crate::upstream::Body;

/// Sent whatever the provider lists (Envoy's defaults; method and path
/// travel as the request's own).
const ALWAYS: [&str; 2] = ["host", "authorization"];

/// Headers of the authorizer's denial the client always gets once the
/// provider lists any (Envoy's), besides the listed ones.
const ALWAYS_ON_DENY: [&str; 2] = ["www-authenticate", "location"];

/// Hop-by-hop and framing headers: this hop's, never copied across.
fn framing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "content-length"
    )
}

/// The check request (pure): method, `pathPrefix` + path and query, the
/// headers Envoy sends, the body when asked for.
pub(super) fn request(p: &HttpAuthorizer, input: &Input, h2: bool) -> Request<Body> {
    let parts = input.parts;
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path = format!("{}{pq}", p.path_prefix);
    let uri = if h2 {
        format!("http://{}{path}", input.authority)
    } else {
        path
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &parts.headers {
        let wanted = ALWAYS.contains(&k.as_str()) || any_matches(&p.include_headers, k.as_str());
        if wanted && !framing(k) && !(h2 && k == "host") {
            headers.append(k, v.clone());
        }
    }
    if !h2 {
        if let Ok(v) = HeaderValue::try_from(input.authority) {
            headers.insert(::http::header::HOST, v);
        }
    }
    for (k, v) in &p.additional_headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
            headers.insert(k, v);
        }
    }
    let body = match &input.body {
        Some((bytes, whole)) => {
            if p.authorizer.body.is_some_and(|b| b.allow_partial) {
                let partial = if *whole { "false" } else { "true" };
                headers.insert(
                    "x-envoy-auth-partial-body",
                    HeaderValue::from_static(partial),
                );
            }
            bytes.clone()
        }
        None => Bytes::new(),
    };
    headers.insert(::http::header::CONTENT_LENGTH, body.len().into());
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if h2 {
            ::http::Version::HTTP_2
        } else {
            ::http::Version::HTTP_11
        })
        .body(
            http_body_util::Full::new(body)
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("check request from valid parts");
    *req.headers_mut() = headers;
    req
}

/// What the authorizer's answer means (pure).
pub(super) fn verdict(
    p: &HttpAuthorizer,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Verdict {
    let pick = |list: &[mesh::ext_authz::HeaderMatch]| -> Vec<HeaderOp> {
        headers
            .iter()
            .filter(|(k, _)| !framing(k) && any_matches(list, k.as_str()))
            .map(|(k, v)| HeaderOp::Set(k.clone(), v.clone()))
            .collect()
    };
    if status == StatusCode::OK {
        return Verdict::Allow {
            upstream: pick(&p.to_upstream_on_allow),
            downstream: pick(&p.to_downstream_on_allow),
        };
    }
    if status.is_server_error() {
        return Verdict::Failed(format!("the authorizer answered {status}"));
    }
    // Its headers to the client: all but Host (and this hop's), or the
    // listed ones and those a client needs to act on the denial.
    let to_client: Vec<HeaderOp> = headers
        .iter()
        .filter(|(k, _)| !framing(k) && *k != ::http::header::HOST)
        .filter(|(k, _)| {
            p.to_downstream_on_deny.is_empty()
                || ALWAYS_ON_DENY.contains(&k.as_str())
                || any_matches(&p.to_downstream_on_deny, k.as_str())
        })
        .map(|(k, v)| HeaderOp::Append(k.clone(), v.clone()))
        .collect();
    Verdict::Deny(answer(status, to_client, body))
}

pub(super) async fn check(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    p: &HttpAuthorizer,
    input: &Input<'_>,
) -> Verdict {
    match call(wp, state, &p.authorizer, |h2| request(p, input, h2), false).await {
        Ok((parts, body, _)) => verdict(p, parts.status, &parts.headers, body),
        Err(why) => Verdict::Failed(why),
    }
}
