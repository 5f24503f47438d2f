//! Envoy's ext_authz gRPC API, as its client: one unary
//! `envoy.service.auth.v3.Authorization/Check` over the waypoint's HTTP/2
//! upstream. `status.code` 0 allows with the OK response's header changes;
//! any other code denies with the denied response (403 by default); a call
//! that fails (transport, non-zero `grpc-status`, unreadable message) is a
//! failed check.

use std::collections::HashMap;
use std::sync::Arc;

use ::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use mesh::ext_authz::Authorizer;
use mesh::MeshState;
use prost::Message;

use super::pb;
use super::{answer, call, HeaderOp, Input, Verdict};
use crate::proxy::Waypoint;
use crate::upstream::Body;

const PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

fn peer(addr: std::net::SocketAddr, principal: String) -> pb::attribute_context::Peer {
    pb::attribute_context::Peer {
        address: Some(pb::Address {
            socket_address: Some(pb::SocketAddress {
                address: addr.ip().to_string(),
                port_value: u32::from(addr.port()),
            }),
        }),
        service: String::new(),
        principal,
    }
}

/// The CheckRequest (pure): who asks and the request, its headers keyed
/// lowercase with the pseudo-headers as Envoy keys them, several values of
/// one header joined by commas.
pub(super) fn check_request(a: &Authorizer, input: &Input, local: String) -> pb::CheckRequest {
    let parts = input.parts;
    let mut headers: HashMap<String, String> = HashMap::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        headers
            .entry(k.as_str().to_string())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    headers.insert(":authority".into(), input.authority.to_string());
    headers.insert(":method".into(), parts.method.to_string());
    headers.insert(":path".into(), path.clone());
    headers.remove("host");
    let size = parts
        .headers
        .get(::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(-1);
    let (body, raw_body) = match &input.body {
        Some((b, _)) if a.body.is_some_and(|s| s.pack_as_bytes) => (String::new(), b.to_vec()),
        Some((b, _)) => (String::from_utf8_lossy(b).into_owned(), Vec::new()),
        None => (String::new(), Vec::new()),
    };
    if let (Some(s), Some((_, whole))) = (a.body, &input.body) {
        if s.allow_partial {
            let partial = if *whole { "false" } else { "true" };
            headers.insert("x-envoy-auth-partial-body".into(), partial.into());
        }
    }
    let protocol = match parts.version {
        ::http::Version::HTTP_2 => "HTTP/2",
        ::http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(input.peer, input.src.to_string())),
            destination: Some(peer(input.target, local)),
            request: Some(pb::attribute_context::Request {
                http: Some(pb::attribute_context::HttpRequest {
                    id: input.request_id.to_string(),
                    method: parts.method.to_string(),
                    headers,
                    path,
                    host: input.authority.to_string(),
                    scheme: "http".into(),
                    // Envoy leaves it empty: the query is in `path`.
                    query: String::new(),
                    size,
                    protocol: protocol.into(),
                    body,
                    raw_body,
                }),
            }),
        }),
    }
}

/// One gRPC message: uncompressed flag, length, bytes.
pub(super) fn frame(m: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + m.encoded_len());
    b.put_u8(0);
    b.put_u32(m.encoded_len() as u32);
    m.encode(&mut b).expect("a BytesMut grows");
    b.freeze()
}

fn request(a: &Authorizer, msg: Bytes) -> Request<Body> {
    Request::builder()
        .method(::http::Method::POST)
        .uri(format!("http://{}:{}{PATH}", a.host, a.port))
        .version(::http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{}m", a.timeout.as_millis().max(1)))
        .body(
            http_body_util::Full::new(msg)
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static request")
}

/// The headers of a HeaderValueOption list as operations, with Envoy's
/// meaning of `append` (when set) or `append_action`.
fn ops(options: &[pb::HeaderValueOption]) -> Vec<HeaderOp> {
    use pb::header_value_option::HeaderAppendAction as A;
    options
        .iter()
        .filter_map(|o| {
            let h = o.header.as_ref()?;
            let k = HeaderName::try_from(h.key.as_str()).ok()?;
            let v = if h.value.is_empty() && !h.raw_value.is_empty() {
                HeaderValue::from_bytes(&h.raw_value).ok()?
            } else {
                HeaderValue::try_from(h.value.as_str()).ok()?
            };
            Some(
                match (o.append.as_ref().map(|b| b.value), o.append_action()) {
                    (Some(true), _) => HeaderOp::Append(k, v),
                    (Some(false), _) => HeaderOp::Set(k, v),
                    (None, A::AppendIfExistsOrAdd) => HeaderOp::Append(k, v),
                    (None, A::AddIfAbsent) => HeaderOp::AddIfAbsent(k, v),
                    (None, A::OverwriteIfExistsOrAdd) => HeaderOp::Set(k, v),
                    (None, A::OverwriteIfExists) => HeaderOp::OverwriteIfExists(k, v),
                },
            )
        })
        .collect()
}

/// What a Check answer means (pure): the response head and trailers of
/// the call, and its one message (bytes from the authorizer: fuzzed).
pub fn verdict(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> Verdict {
    if status != StatusCode::OK {
        return Verdict::Failed(format!("Check answered HTTP {status}"));
    }
    let grpc = trailers
        .and_then(crate::grpc::status)
        .or_else(|| crate::grpc::status(headers));
    match grpc {
        Some(0) => {}
        Some(code) => return Verdict::Failed(format!("Check failed with grpc-status {code}")),
        None => return Verdict::Failed("Check answered without a grpc-status".into()),
    }
    let msg = match body {
        [0, l0, l1, l2, l3, rest @ ..]
            if u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize == rest.len() =>
        {
            rest
        }
        _ => return Verdict::Failed("Check answered no single uncompressed message".into()),
    };
    let resp = match pb::CheckResponse::decode(msg) {
        Ok(r) => r,
        Err(e) => return Verdict::Failed(format!("Check answer does not decode: {e}")),
    };
    use pb::check_response::HttpResponse;
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let (mut upstream, mut downstream) = (Vec::new(), Vec::new());
        if let Some(HttpResponse::OkResponse(ok)) = &resp.http_response {
            upstream = ops(&ok.headers);
            upstream.extend(
                ok.headers_to_remove
                    .iter()
                    .filter(|h| !h.starts_with(':') && !h.eq_ignore_ascii_case("host"))
                    .filter_map(|h| HeaderName::try_from(h.as_str()).ok())
                    .map(HeaderOp::Remove),
            );
            downstream = ops(&ok.response_headers_to_add);
        }
        return Verdict::Allow {
            upstream,
            downstream,
        };
    }
    let denied = match resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d,
        _ => pb::DeniedHttpResponse::default(),
    };
    let status = denied
        .status
        .and_then(|s| u16::try_from(s.code).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|c| c.as_u16() >= 200)
        .unwrap_or(StatusCode::FORBIDDEN);
    Verdict::Deny(answer(
        status,
        ops(&denied.headers),
        Bytes::from(denied.body),
    ))
}

pub(super) async fn check(
    wp: &Arc<Waypoint>,
    state: &MeshState,
    a: &Authorizer,
    input: &Input<'_>,
) -> Verdict {
    let msg = frame(&check_request(a, input, wp.identity.to_string()));
    match call(wp, state, a, |_| request(a, msg), true).await {
        Ok((parts, body, trailers)) => {
            verdict(parts.status, &parts.headers, &body, trailers.as_ref())
        }
        Err(why) => Verdict::Failed(why),
    }
}
