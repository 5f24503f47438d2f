use super::*;

fn config_map(mesh: &str) -> Value {
    let mut v: Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata: {}",
    )
    .unwrap();
    v["data"]["mesh"] = Value::String(mesh.into());
    v
}

/// The providers of a meshConfig text, and the fields reported.
fn read(mesh: &str) -> (Providers, Vec<String>) {
    let mut out = Vec::new();
    let p = mesh_config("ConfigMap istio-system/istio", config_map(mesh), &mut out).unwrap();
    (
        p,
        out.into_iter()
            .map(|r| format!("{}: {}", r.field, r.reason))
            .collect(),
    )
}

fn one(provider: &str) -> (Provider, Vec<String>) {
    let (mut p, r) = read(&format!("extensionProviders:\n- name: p\n  {provider}\n"));
    (p.remove("p").expect("provider kept by name"), r)
}

fn http_ok(spec: &str) -> HttpAuthorizer {
    match one(&format!("envoyExtAuthzHttp: {spec}")) {
        (Provider::Http(h), r) if r.is_empty() => h,
        other => panic!("{spec}: {other:?}"),
    }
}

#[test]
fn http_provider_fields() {
    let h = http_ok(
        "{service: foo/ext-authz.foo.svc.cluster.local, port: 8000, timeout: 0.25s, \
         pathPrefix: /check, failOpen: true, statusOnError: \"503\", clearRouteCache: true, \
         includeRequestHeadersInCheck: [X-Ext-Authz, \"x-b3-*\", \"*-token\"], \
         includeAdditionalHeadersInCheck: {X-Added: v1}, \
         includeRequestBodyInCheck: {maxRequestBytes: 100, allowPartialMessage: true, packAsBytes: true}, \
         headersToUpstreamOnAllow: [x-ext-authz-check-result], \
         headersToDownstreamOnDeny: [\"x-ext-authz-*\"], headersToDownstreamOnAllow: [x-allow]}",
    );
    let a = &h.authorizer;
    assert_eq!(a.namespace.as_deref(), Some("foo"));
    assert_eq!(a.host, "ext-authz.foo.svc.cluster.local");
    assert_eq!(a.port, 8000);
    assert_eq!(a.timeout, Duration::from_millis(250));
    assert!(a.fail_open);
    assert_eq!(a.status_on_error, 503);
    assert_eq!(
        a.body,
        Some(BodySettings {
            max_request_bytes: 100,
            allow_partial: true,
            pack_as_bytes: true
        })
    );
    assert_eq!(h.path_prefix, "/check");
    assert_eq!(
        h.include_headers,
        vec![
            HeaderMatch::Exact("x-ext-authz".into()),
            HeaderMatch::Prefix("x-b3-".into()),
            HeaderMatch::Suffix("-token".into()),
        ]
    );
    assert_eq!(h.additional_headers, vec![("x-added".into(), "v1".into())]);
    assert_eq!(
        h.to_upstream_on_allow,
        vec![HeaderMatch::Exact("x-ext-authz-check-result".into())]
    );
    assert_eq!(
        h.to_downstream_on_deny,
        vec![HeaderMatch::Prefix("x-ext-authz-".into())]
    );
    assert_eq!(
        h.to_downstream_on_allow,
        vec![HeaderMatch::Exact("x-allow".into())]
    );
}

#[test]
fn defaults_are_istios() {
    let h = http_ok("{service: a.b.svc.cluster.local, port: 80}");
    let a = &h.authorizer;
    assert_eq!(a.namespace, None);
    assert_eq!(a.timeout, DEFAULT_TIMEOUT);
    assert!(!a.fail_open);
    assert_eq!(a.status_on_error, 403);
    assert_eq!(a.body, None);
    assert_eq!(h.path_prefix, "");
    assert!(h.include_headers.is_empty() && h.to_downstream_on_deny.is_empty());
    // The deprecated list counts only without the new one.
    let h = http_ok("{service: a, port: 80, includeHeadersInCheck: [x-old]}");
    assert_eq!(h.include_headers, vec![HeaderMatch::Exact("x-old".into())]);
    let h = http_ok(
        "{service: a, port: 80, includeHeadersInCheck: [x-old], includeRequestHeadersInCheck: [x-new]}",
    );
    assert_eq!(h.include_headers, vec![HeaderMatch::Exact("x-new".into())]);
}

#[test]
fn grpc_provider_fields() {
    let (p, r) = one(
        "envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000, timeout: 2s, \
         failOpen: true, statusOnError: \"500\", includeRequestBodyInCheck: {maxRequestBytes: 8}}",
    );
    assert!(r.is_empty(), "{r:?}");
    let Provider::Grpc(a) = p else {
        panic!("{p:?}")
    };
    assert_eq!(
        (a.host.as_str(), a.port),
        ("ext-authz.foo.svc.cluster.local", 9000)
    );
    assert_eq!(a.timeout, Duration::from_secs(2));
    assert!(a.fail_open);
    assert_eq!(a.status_on_error, 500);
    assert_eq!(
        a.body.map(|b| (b.max_request_bytes, b.allow_partial)),
        Some((8, false))
    );
}

#[test]
fn bad_providers_are_unusable_and_reported_by_field() {
    let base = "data.mesh.extensionProviders[0]";
    let http = format!("{base}.envoyExtAuthzHttp");
    // (provider, field reported)
    let table: &[(&str, String)] = &[
        ("envoyExtAuthzHttp: {port: 80}", http.clone()),
        ("envoyExtAuthzHttp: {service: a}", http.clone()),
        ("envoyExtAuthzHttp: {service: a, port: 0}", format!("{http}.port")),
        ("envoyExtAuthzHttp: {service: a, port: 70000}", format!("{http}.port")),
        ("envoyExtAuthzHttp: {service: /a, port: 80}", format!("{http}.service")),
        ("envoyExtAuthzHttp: {service: a/b/c, port: 80}", format!("{http}.service")),
        ("envoyExtAuthzHttp: {service: a, port: 80, timeout: 10}", format!("{http}.timeout")),
        ("envoyExtAuthzHttp: {service: a, port: 80, timeout: 1m}", format!("{http}.timeout")),
        ("envoyExtAuthzHttp: {service: a, port: 80, timeout: 0s}", format!("{http}.timeout")),
        ("envoyExtAuthzHttp: {service: a, port: 80, statusOnError: \"299\"}", format!("{http}.statusOnError")),
        ("envoyExtAuthzHttp: {service: a, port: 80, statusOnError: nope}", format!("{http}.statusOnError")),
        ("envoyExtAuthzHttp: {service: a, port: 80, pathPrefix: check}", format!("{http}.pathPrefix")),
        ("envoyExtAuthzHttp: {service: a, port: 80, pathPrefix: \"/a b\"}", format!("{http}.pathPrefix")),
        ("envoyExtAuthzHttp: {service: a, port: 80, includeRequestHeadersInCheck: [x, \"*\"]}", format!("{http}.includeRequestHeadersInCheck[1]")),
        ("envoyExtAuthzHttp: {service: a, port: 80, headersToUpstreamOnAllow: [\"*\"]}", format!("{http}.headersToUpstreamOnAllow[0]")),
        ("envoyExtAuthzHttp: {service: a, port: 80, headersToDownstreamOnDeny: [\"*\"]}", format!("{http}.headersToDownstreamOnDeny[0]")),
        ("envoyExtAuthzHttp: {service: a, port: 80, headersToDownstreamOnAllow: [\"\"]}", format!("{http}.headersToDownstreamOnAllow[0]")),
        ("envoyExtAuthzHttp: {service: a, port: 80, includeAdditionalHeadersInCheck: {\"bad header\": v}}", format!("{http}.includeAdditionalHeadersInCheck.bad header")),
        ("envoyExtAuthzHttp: {service: a, port: 80, includeRequestBodyInCheck: {maxRequestBytes: 0}}", format!("{http}.includeRequestBodyInCheck.maxRequestBytes")),
        ("envoyExtAuthzHttp: {service: a, port: 80, includeRequestBodyInCheck: {maxBytes: 5}}", format!("{http}.includeRequestBodyInCheck.maxBytes")),
        ("envoyExtAuthzHttp: {service: a, port: 80, failOpen: maybe}", format!("{http}.failOpen")),
        ("envoyExtAuthzHttp: {service: a, port: 80, newField: 1}", format!("{http}.newField")),
        ("envoyExtAuthzGrpc: {service: a, port: 80, pathPrefix: /x}", format!("{base}.envoyExtAuthzGrpc.pathPrefix")),
        ("envoyExtAuthzGrpc: {service: a, port: 80, statusOnError: \"600\"}", format!("{base}.envoyExtAuthzGrpc.statusOnError")),
        ("envoyExtAuthzGrpc: {service: a, port: 80}\n  envoyExtAuthzHttp: {service: a, port: 80}", base.to_string()),
    ];
    for (provider, field) in table {
        let (p, r) = one(provider);
        assert!(matches!(p, Provider::Unusable(_)), "{provider}: {p:?}");
        assert_eq!(r.len(), 1, "{provider}: {r:?}");
        assert!(r[0].starts_with(&format!("{field}: ")), "{provider}: {r:?}");
        assert!(r[0].contains("(provider \"p\")"), "{r:?}");
    }
}

#[test]
fn other_provider_kinds_are_unusable_silently() {
    let (p, r) = one("zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}");
    assert!(r.is_empty(), "{r:?}");
    let Provider::Unusable(why) = p else {
        panic!("{p:?}")
    };
    assert!(why.contains("zipkin"), "{why}");
}

#[test]
fn names_missing_or_twice() {
    let (p, r) = read(
        "defaultConfig: {discoveryAddress: istiod:15012}\nextensionProviders:\n\
         - envoyExtAuthzHttp: {service: a, port: 80}\n\
         - {name: x, envoyExtAuthzHttp: {service: first, port: 80}}\n\
         - {name: x, envoyExtAuthzGrpc: {service: second, port: 80}}\n",
    );
    assert_eq!(p.len(), 1);
    let Provider::Http(h) = &p["x"] else {
        panic!("{p:?}")
    };
    assert_eq!(h.authorizer.host, "first");
    assert_eq!(
        r,
        vec![
            "data.mesh.extensionProviders[0].name: missing".to_string(),
            "data.mesh.extensionProviders[2].name: provider \"x\" is defined twice".to_string(),
        ]
    );
}

#[test]
fn config_map_shapes() {
    let mut out = Vec::new();
    // No mesh key, an empty one: no providers.
    let mut v = config_map("");
    assert!(mesh_config("o", v.clone(), &mut out).unwrap().is_empty());
    v["data"] = serde_yaml::from_str("{other: x}").unwrap();
    assert!(mesh_config("o", v, &mut out).unwrap().is_empty());
    assert!(out.is_empty());
    // Not YAML, or extensionProviders not a list: refused naming the field.
    let e = mesh_config("o", config_map("a: [b"), &mut out).unwrap_err();
    assert_eq!(e.field, "data.mesh");
    let e = mesh_config("o", config_map("extensionProviders: {a: b}"), &mut out).unwrap_err();
    assert_eq!(e.field, "data.mesh.extensionProviders");
}

#[test]
fn header_patterns_ignore_case() {
    let m = |s: &str| HeaderMatch::parse(s).unwrap();
    assert!(m("X-Ext-Authz").matches("x-ext-authz"));
    assert!(!m("x-ext-authz").matches("x-ext-authz-2"));
    assert!(m("X-B3-*").matches("x-b3-traceid"));
    assert!(!m("x-b3-*").matches("x-b"));
    assert!(m("*-Token").matches("x-token"));
    assert!(!m("*-token").matches("token"));
}
