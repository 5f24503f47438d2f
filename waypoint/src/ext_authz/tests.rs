use std::time::Duration;

use ::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use identity::Identity;
use mesh::ext_authz::{BodySettings, HeaderMatch};
use prost::Message;

use super::*;

const MESH: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: http
      envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000}
    - name: grpc
      envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}
    - name: tracer
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
    - name: broken
      envoyExtAuthzHttp: {service: x, port: 0}
";

fn custom(name: &str, provider: &str, paths: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: [\"{paths}\"]}}}}]}}]\n")
}

/// The checks a request to `path` needs under `policies`.
fn needs(policies: &str, path: &str) -> Vec<String> {
    let state = mesh::standalone::parse(&format!("{MESH}{policies}"), "cluster.local").unwrap();
    let src = Identity::new("cluster.local", "ns", "client");
    let headers = HeaderMap::new();
    let conn = Connection {
        src_identity: Some(&src),
        src_ip: "10.0.0.1".parse().unwrap(),
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 80,
        request: Some(mesh::authz::HttpRequest {
            method: "GET",
            path,
            host: "echo",
            headers: &headers,
            auth: None,
        }),
    };
    let policies = crate::plan::targeted_for(("ns", "wp"), &state, None);
    needed(policies, &state.extension_providers, &conn)
        .into_iter()
        .map(|n| match n {
            Need::Check(name, Ask::Http(_)) => format!("http:{name}"),
            Need::Check(name, Ask::Grpc(_)) => format!("grpc:{name}"),
            Need::Refuse(why) => format!("refuse:{why}"),
        })
        .collect()
}

#[test]
fn which_providers_a_request_needs() {
    let two = format!(
        "{}{}{}",
        custom("a", "http", "/admin*"),
        custom("b", "grpc", "/admin/x"),
        custom("c", "http", "/*")
    );
    // (policies, path, needs)
    let table: Vec<(String, &str, Vec<&str>)> = vec![
        (
            custom("a", "http", "/admin*"),
            "/admin/1",
            vec!["http:http"],
        ),
        (custom("a", "http", "/admin*"), "/public", vec![]),
        (custom("a", "grpc", "/admin*"), "/admin", vec!["grpc:grpc"]),
        // Each provider once, in policy order.
        (two.clone(), "/admin/x", vec!["http:http", "grpc:grpc"]),
        (two, "/other", vec!["http:http"]),
    ];
    for (policies, path, want) in table {
        assert_eq!(needs(&policies, path), want, "{path}\n{policies}");
    }
    // A provider missing or not an authorizer: refused, naming it.
    for (provider, words) in [
        (
            "nope",
            "\"nope\" is not among meshConfig's extensionProviders",
        ),
        ("tracer", "type zipkin"),
        ("broken", "envoyExtAuthzHttp.port"),
    ] {
        let got = needs(&custom("a", provider, "/*"), "/x");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("refuse:CUSTOM policy ns/a") && got[0].contains(words),
            "{got:?}"
        );
    }
    // A dry-run CUSTOM policy asks nobody.
    let dry = custom("a", "http", "/*").replace(
        "metadata: {name: a, namespace: ns}",
        "metadata: {name: a, namespace: ns, annotations: {istio.io/dry-run: \"true\"}}",
    );
    assert!(needs(&dry, "/x").is_empty());
}

fn http_provider() -> HttpAuthorizer {
    HttpAuthorizer {
        authorizer: Authorizer {
            namespace: None,
            host: "ext-authz.foo.svc.cluster.local".into(),
            port: 8000,
            timeout: Duration::from_secs(1),
            fail_open: false,
            status_on_error: 403,
            body: None,
        },
        path_prefix: "/check".into(),
        include_headers: vec![HeaderMatch::Exact("x-ext-authz".into())],
        additional_headers: vec![("x-added".into(), "fixed".into())],
        to_upstream_on_allow: vec![HeaderMatch::Prefix("x-ext-authz-".into())],
        to_downstream_on_deny: vec![],
        to_downstream_on_allow: vec![HeaderMatch::Exact("x-allow".into())],
    }
}

fn client_request() -> ::http::request::Parts {
    Request::post("/api/items?id=3")
        .header("host", "echo.ns:80")
        .header("authorization", "Bearer t")
        .header("x-ext-authz", "allow")
        .header("x-added", "from-client")
        .header("x-other", "not sent")
        .header("content-length", "5")
        .header("connection", "keep-alive")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn input<'a>(
    parts: &'a ::http::request::Parts,
    src: &'a Identity,
    body: Option<(Bytes, bool)>,
) -> Input<'a> {
    Input {
        parts,
        authority: "echo.ns:80",
        src,
        peer: "10.0.0.1:4000".parse().unwrap(),
        target: "10.96.0.10:80".parse().unwrap(),
        request_id: "rid",
        body,
    }
}

#[test]
fn http_check_request_is_envoys() {
    let parts = client_request();
    let src = Identity::new("cluster.local", "ns", "client");
    let p = http_provider();
    let r = http::request(&p, &input(&parts, &src, None), false);
    assert_eq!(r.method(), "POST");
    assert_eq!(r.uri(), "/check/api/items?id=3");
    let h = r.headers();
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(h["host"], "echo.ns:80");
    assert_eq!(h["authorization"], "Bearer t");
    assert_eq!(h["x-ext-authz"], "allow");
    // The provider's fixed header wins over the client's.
    assert_eq!(h["x-added"], "fixed");
    assert_eq!(h["content-length"], "0");
    for absent in ["x-other", "connection"] {
        assert!(!names.contains(&absent), "{absent} sent: {names:?}");
    }
    // With the body asked for: its bytes and their length, and whether it
    // was cut when partial bodies are allowed.
    let mut p = http_provider();
    p.authorizer.body = Some(BodySettings {
        max_request_bytes: 3,
        allow_partial: true,
        pack_as_bytes: false,
    });
    let r = http::request(
        &p,
        &input(&parts, &src, Some((Bytes::from_static(b"abc"), false))),
        false,
    );
    assert_eq!(r.headers()["content-length"], "3");
    assert_eq!(r.headers()["x-envoy-auth-partial-body"], "true");
    // Over HTTP/2 the authority travels in the URI.
    let r = http::request(&http_provider(), &input(&parts, &src, None), true);
    assert_eq!(r.uri(), "http://echo.ns:80/check/api/items?id=3");
    assert!(!r.headers().contains_key("host"));
}

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in list {
        h.append(
            ::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

fn names(ops: &[HeaderOp]) -> Vec<String> {
    ops.iter()
        .map(|o| match o {
            HeaderOp::Set(k, v) => format!("set {k}={}", v.to_str().unwrap()),
            HeaderOp::Append(k, v) => format!("append {k}={}", v.to_str().unwrap()),
            HeaderOp::AddIfAbsent(k, v) => format!("add-if-absent {k}={}", v.to_str().unwrap()),
            HeaderOp::OverwriteIfExists(k, v) => format!("overwrite {k}={}", v.to_str().unwrap()),
            HeaderOp::Remove(k) => format!("remove {k}"),
        })
        .collect()
}

#[test]
fn http_answers() {
    let p = http_provider();
    let answer = headers(&[
        ("x-ext-authz-check-result", "allowed"),
        ("x-allow", "yes"),
        ("x-other", "o"),
        ("content-length", "0"),
    ]);
    let Verdict::Allow {
        upstream,
        downstream,
    } = http::verdict(&p, StatusCode::OK, &answer, Bytes::new())
    else {
        panic!("200 allows")
    };
    assert_eq!(names(&upstream), ["set x-ext-authz-check-result=allowed"]);
    assert_eq!(names(&downstream), ["set x-allow=yes"]);
    // Without the lists nothing is copied.
    let mut bare = http_provider();
    bare.to_upstream_on_allow.clear();
    bare.to_downstream_on_allow.clear();
    let Verdict::Allow {
        upstream,
        downstream,
    } = http::verdict(&bare, StatusCode::OK, &answer, Bytes::new())
    else {
        panic!()
    };
    assert!(upstream.is_empty() && downstream.is_empty());
    // 5xx is a failed check; other statuses are the client's answer.
    assert!(matches!(
        http::verdict(&p, StatusCode::SERVICE_UNAVAILABLE, &answer, Bytes::new()),
        Verdict::Failed(_)
    ));
    let deny = headers(&[
        ("x-ext-authz-check-result", "denied"),
        ("host", "authz"),
        ("www-authenticate", "Basic"),
        ("transfer-encoding", "chunked"),
    ]);
    let Verdict::Deny(r) = http::verdict(
        &p,
        StatusCode::UNAUTHORIZED,
        &deny,
        Bytes::from_static(b"no"),
    ) else {
        panic!("401 denies")
    };
    assert_eq!(r.status(), 401);
    let mut got: Vec<_> = r.headers().keys().map(|k| k.to_string()).collect();
    got.sort();
    assert_eq!(got, ["www-authenticate", "x-ext-authz-check-result"]);
    // A list keeps only its headers, and those a client needs.
    let mut listed = http_provider();
    listed.to_downstream_on_deny = vec![HeaderMatch::Exact("x-nothing".into())];
    let Verdict::Deny(r) = http::verdict(&listed, StatusCode::FORBIDDEN, &deny, Bytes::new())
    else {
        panic!()
    };
    let got: Vec<_> = r.headers().keys().map(|k| k.to_string()).collect();
    assert_eq!(got, ["www-authenticate"]);
}

fn option(key: &str, value: &str, append: Option<bool>, action: i32) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: append.map(|value| pb::BoolValue { value }),
        append_action: action,
    }
}

fn grpc_answer(resp: &pb::CheckResponse) -> Verdict {
    let body = grpc::frame(resp);
    grpc::verdict(
        StatusCode::OK,
        &HeaderMap::new(),
        &body,
        Some(&headers(&[("grpc-status", "0")])),
    )
}

#[test]
fn grpc_answers() {
    use pb::check_response::HttpResponse;
    let ok = pb::CheckResponse {
        status: Some(pb::Status {
            code: 0,
            message: String::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(pb::OkHttpResponse {
            headers: vec![
                option("x-a", "1", None, 0),
                option("x-b", "2", Some(false), 0),
                option("x-c", "3", Some(true), 2),
                option("x-d", "4", None, 1),
                option("x-e", "5", None, 2),
                option("x-f", "6", None, 3),
            ],
            headers_to_remove: vec!["x-gone".into(), ":path".into(), "host".into()],
            response_headers_to_add: vec![option("x-to-client", "7", None, 2)],
        })),
    };
    let Verdict::Allow {
        upstream,
        downstream,
    } = grpc_answer(&ok)
    else {
        panic!("code 0 allows")
    };
    assert_eq!(
        names(&upstream),
        [
            "append x-a=1",
            "set x-b=2",
            "append x-c=3",
            "add-if-absent x-d=4",
            "set x-e=5",
            "overwrite x-f=6",
            "remove x-gone",
        ]
    );
    assert_eq!(names(&downstream), ["set x-to-client=7"]);
    // A denial: its status, headers and body; 403 when it names none.
    let denied = |status: Option<i32>| pb::CheckResponse {
        status: Some(pb::Status {
            code: 7,
            message: String::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
            status: status.map(|code| pb::HttpStatus { code }),
            headers: vec![option("x-ext-authz-check-result", "denied", None, 0)],
            body: "denied by ext_authz".into(),
        })),
    };
    let Verdict::Deny(r) = grpc_answer(&denied(Some(401))) else {
        panic!()
    };
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-ext-authz-check-result"], "denied");
    let Verdict::Deny(r) = grpc_answer(&denied(None)) else {
        panic!()
    };
    assert_eq!(r.status(), 403);
    let bare = pb::CheckResponse {
        status: Some(pb::Status {
            code: 16,
            message: String::new(),
        }),
        http_response: None,
    };
    let Verdict::Deny(r) = grpc_answer(&bare) else {
        panic!()
    };
    assert_eq!(r.status(), 403);
    // Failures: the call's own status, a missing or broken message.
    let body = grpc::frame(&ok);
    let fail = |status: u16, trailers: &[(&str, &str)], body: &[u8]| {
        matches!(
            grpc::verdict(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                body,
                Some(&headers(trailers))
            ),
            Verdict::Failed(_)
        )
    };
    assert!(fail(200, &[("grpc-status", "14")], &body));
    assert!(fail(200, &[], &body));
    assert!(fail(503, &[("grpc-status", "0")], &body));
    assert!(fail(200, &[("grpc-status", "0")], &body[..body.len() - 1]));
    assert!(fail(
        200,
        &[("grpc-status", "0")],
        &[0, 0, 0, 0, 2, 0xff, 0xff]
    ));
}

#[test]
fn grpc_check_request_carries_the_request() {
    let parts = client_request();
    let src = Identity::new("cluster.local", "ns", "client");
    let a = http_provider().authorizer;
    let r = grpc::check_request(
        &a,
        &input(&parts, &src, None),
        "spiffe://cluster.local/ns/ns/sa/wp".into(),
    );
    // What a server decodes from it (Istio's sample reads the headers map).
    let back = pb::CheckRequest::decode(grpc::frame(&r).slice(5..)).unwrap();
    let attrs = back.attributes.unwrap();
    assert_eq!(
        attrs.source.unwrap().principal,
        "spiffe://cluster.local/ns/ns/sa/client"
    );
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(
        (http.method.as_str(), http.path.as_str(), http.host.as_str()),
        ("POST", "/api/items?id=3", "echo.ns:80")
    );
    assert_eq!(http.headers["x-ext-authz"], "allow");
    assert_eq!(http.headers[":authority"], "echo.ns:80");
    assert_eq!(http.headers[":path"], "/api/items?id=3");
    assert_eq!(http.size, 5);
    assert_eq!(http.id, "rid");
}

#[test]
fn header_ops_apply() {
    let mut h = headers(&[("a", "1"), ("b", "1")]);
    let n = |s: &'static str| ::http::HeaderName::from_static(s);
    let v = |s: &'static str| ::http::HeaderValue::from_static(s);
    for op in [
        HeaderOp::Append(n("a"), v("2")),
        HeaderOp::Set(n("b"), v("2")),
        HeaderOp::AddIfAbsent(n("a"), v("3")),
        HeaderOp::AddIfAbsent(n("c"), v("1")),
        HeaderOp::OverwriteIfExists(n("d"), v("1")),
        HeaderOp::OverwriteIfExists(n("c"), v("2")),
        HeaderOp::Remove(n("e")),
    ] {
        op.apply(&mut h);
    }
    let all = |k: &str| {
        h.get_all(k)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("a"), ["1", "2"]);
    assert_eq!(all("b"), ["2"]);
    assert_eq!(all("c"), ["2"]);
    assert!(!h.contains_key("d"));
}
