//! The waypoint's configuration kinds: translation and named errors.

use std::time::Duration;

use mesh::routes::{parse_duration, Abort, LoadBalancer, RetryOn, RouteApi, StrMatch, WaypointFor};
use mesh::standalone;

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: app}
spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.2, selector: {app: a}, ports: [{port: 80}]}
";

fn with(extra: &str) -> Result<mesh::MeshState, mesh::ConfigError> {
    standalone::parse(&format!("{BASE}---\n{extra}"), "cluster.local")
}

#[test]
fn durations_are_go_style() {
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert!(parse_duration("5 parsecs")
        .unwrap_err()
        .contains("unknown unit"));
    assert!(parse_duration("").is_err());
}

#[test]
fn waypoint_labels_and_gateway() {
    let m = with("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}], addresses: [{type: Hostname, value: wp.app.svc.cluster.local}]}").unwrap();
    assert_eq!(m.waypoints[0].for_traffic, WaypointFor::All);
    let svc = |name: &str| {
        m.services
            .values()
            .find(|s| s.name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(svc("a").waypoint.as_ref().unwrap().name, "wp");
    assert!(
        svc("b").waypoint.is_none(),
        "use-waypoint: none opts a service out"
    );
    let w = m.workload_by_name("app", "a").unwrap();
    assert!(m.workload_waypoint(w).is_some());
    // Another class is not a waypoint; a broken one is a named error.
    let m = with("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: app}\nspec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}").unwrap();
    assert!(m.waypoints.is_empty());
    let e = with("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: app}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: m, port: 15008, protocol: HBONE}], addresses: [{type: IPAddress, value: 1.2.3.4}]}").unwrap_err();
    assert_eq!(
        (e.object.as_str(), e.field.as_str()),
        ("Gateway app/wp", "spec.addresses")
    );
}

#[test]
fn httproute_and_virtualservice_translate() {
    let m = with("apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: app}
spec:
  parentRefs: [{group: \"\", kind: Service, name: a}]
  rules:
  - matches: [{path: {type: Exact, value: /x}, method: POST, headers: [{name: X-Env, value: prod}], queryParams: [{name: q, type: RegularExpression, value: \"v[0-9]+\"}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: \"1\"}], remove: [x-b]}}]
    backendRefs: [{name: b, port: 80, weight: 3}]
    timeouts: {request: 2s}
    retry: {attempts: 3, codes: [502, 503]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: app}
spec:
  hosts: [b]
  http:
  - match: [{uri: {regex: \"/api/.*\"}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}}
    retries: {attempts: 2, perTryTimeout: 500ms, retryOn: \"gateway-error,reset,429\"}
    route: [{destination: {host: a.app.svc.cluster.local, subset: v1}, weight: 80}, {destination: {host: a, subset: v2}, weight: 20}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d, namespace: app}
spec:
  host: a
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}, connectionPool: {tcp: {maxConnections: 10}, http: {http2MaxRequests: 5}}, outlierDetection: {consecutiveGatewayErrors: 3}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
").unwrap();
    let hr = m
        .http_routes
        .iter()
        .find(|r| r.api == RouteApi::HttpRoute)
        .unwrap();
    assert_eq!(hr.hosts, ["a.app.svc.cluster.local"]);
    let rule = &hr.rules[0];
    let mt = &rule.matches[0];
    assert!(matches!(&mt.path, Some(StrMatch::Exact(p)) if p == "/x"));
    assert_eq!(mt.method.as_deref(), Some("POST"));
    assert_eq!(mt.headers[0].0, "x-env");
    assert!(
        mt.query[0].1.matches("v12") && !mt.query[0].1.matches("xv12"),
        "regexes are anchored"
    );
    assert_eq!(
        rule.request_headers.set,
        [("x-a".to_string(), "1".to_string())]
    );
    assert_eq!(
        (rule.backends[0].host.as_str(), rule.backends[0].weight),
        ("b.app.svc.cluster.local", 3)
    );
    assert_eq!(rule.timeout, Some(Duration::from_secs(2)));
    assert_eq!(rule.retries.as_ref().unwrap().codes, [502, 503]);

    let vs = m
        .http_routes
        .iter()
        .find(|r| r.api == RouteApi::VirtualService)
        .unwrap();
    assert_eq!(vs.hosts, ["b.app.svc.cluster.local"]);
    let rule = &vs.rules[0];
    assert!(matches!(rule.fault.as_ref().unwrap().abort, Some((Abort::Grpc(14), p)) if p == 10.0));
    let rt = rule.retries.as_ref().unwrap();
    assert_eq!(
        rt.retry_on,
        [
            RetryOn::GatewayError,
            RetryOn::Reset,
            RetryOn::RetriableStatusCodes
        ]
    );
    assert_eq!(
        (rt.codes.as_slice(), rt.per_try_timeout),
        (&[429u16][..], Some(Duration::from_millis(500)))
    );
    assert_eq!(
        rule.backends
            .iter()
            .map(|b| (b.subset.as_deref().unwrap(), b.weight))
            .collect::<Vec<_>>(),
        [("v1", 80), ("v2", 20)]
    );

    let dr = &m.destination_rules[0];
    assert_eq!(dr.host, "a.app.svc.cluster.local");
    assert!(matches!(&dr.policy.lb, LoadBalancer::HashHeader(h) if h == "x-user"));
    assert_eq!(
        (
            dr.policy.pool.max_connections,
            dr.policy.pool.http2_max_requests
        ),
        (Some(10), Some(5))
    );
    assert_eq!(
        dr.policy.outlier.as_ref().unwrap().consecutive_gateway,
        Some(3)
    );
}

#[test]
fn route_errors_name_object_and_field() {
    for (doc, object, field, what) in [
        ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec: {parentRefs: [{name: gw}]}", "HTTPRoute app/r", "spec.parentRefs[0]", "attach to a Service"),
        ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec: {parentRefs: [{kind: Service, name: a}], rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]}", "HTTPRoute app/r", "spec.rules[0].matches[0].path", "bad regex"),
        ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: app}\nspec: {parentRefs: [{kind: Service, name: a}], rules: [{filters: [{type: ExtensionRef}]}]}", "HTTPRoute app/r", "spec.rules[0].filters[0].type", "not supported"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: app}\nspec: {hosts: [a], http: [{timeout: soon, route: [{destination: {host: a}}]}]}", "VirtualService app/v", "spec.http[0].timeout", "not a duration"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: app}\nspec: {hosts: [a], http: [{retries: {attempts: 1, retryOn: sometimes}, route: [{destination: {host: a}}]}]}", "VirtualService app/v", "spec.http[0].retries.retryOn", "sometimes"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: app}\nspec: {hosts: [a], http: [{corsPolicy: {}, route: [{destination: {host: a}}]}]}", "VirtualService app/v", "spec.http[0]", "corsPolicy"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: app}\nspec: {host: a, trafficPolicy: {loadBalancer: {simple: FASTEST}}}", "DestinationRule app/d", "spec.trafficPolicy.loadBalancer", "FASTEST"),
    ] {
        let e = with(doc).unwrap_err();
        assert_eq!(e.object, object, "{doc}");
        assert!(e.field.starts_with(field), "{doc}: {e}");
        assert!(e.to_string().contains(what), "{doc}: {e}");
    }
}

#[test]
fn l7_policy_keeps_request_attributes_for_the_waypoint_only() {
    let m = with("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: app}\nspec: {targetRefs: [{kind: Service, name: a}], action: DENY, rules: [{to: [{operation: {methods: [DELETE], paths: [/admin*]}}], when: [{key: \"request.headers[x-debug]\", values: [\"1\"]}]}]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: l4, namespace: app}\nspec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE], ports: [\"80\"]}}]}]}").unwrap();
    assert_eq!(m.waypoint_policies.len(), 1);
    let wp = &m.waypoint_policies[0].policy;
    assert!(!wp.rules[0].clauses[0].matches[0].l7.is_empty());
    assert_eq!(wp.rules[0].clauses[1].matches[0].l7.headers[0].0, "x-debug");
    // ztunnel's copy of an L7 DENY drops the request attributes (denies more).
    let zt = m.policies.iter().find(|p| p.name == "l4").unwrap();
    assert!(zt.rules[0].clauses[0].matches[0].l7.is_empty());
    assert_eq!(zt.rules[0].clauses[0].matches[0].destination_ports, [80]);
}

#[test]
fn grpcroute_and_mirrors_translate() {
    let m = with("apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: app}
spec:
  parentRefs: [{kind: Service, name: a}]
  rules:
  - matches: [{method: {service: shop.Cart, method: Add}}, {method: {service: shop.Admin}}, {method: {method: Ping}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b, port: 80}, percent: 25}}]
    backendRefs: [{name: b, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: app}
spec:
  hosts: [b]
  http: [{route: [{destination: {host: b}}], mirror: {host: a, subset: canary}, mirrorPercentage: {value: 5}}]
").unwrap();
    let g = m.http_routes.iter().find(|r| r.name == "g").unwrap();
    let paths: Vec<bool> = [
        "/shop.Cart/Add",
        "/shop.Cart/Remove",
        "/shop.Admin/Wipe",
        "/x.Y/Ping",
    ]
    .iter()
    .map(|p| {
        g.rules[0]
            .matches
            .iter()
            .any(|mt| mt.path.as_ref().unwrap().matches(p))
    })
    .collect();
    assert_eq!(paths, [true, false, true, true]);
    let (mb, pct) = g.rules[0].mirror.as_ref().unwrap();
    assert_eq!((mb.host.as_str(), *pct), ("b.app.svc.cluster.local", 25.0));
    let v = m.http_routes.iter().find(|r| r.name == "v").unwrap();
    let (mb, pct) = v.rules[0].mirror.as_ref().unwrap();
    assert_eq!(
        (mb.host.as_str(), mb.subset.as_deref(), *pct),
        ("a.app.svc.cluster.local", Some("canary"), 5.0)
    );
    let e = with("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: app}\nspec: {parentRefs: [{kind: Service, name: a}], rules: [{matches: [{method: {type: Exact}}]}]}").unwrap_err();
    assert_eq!(
        (e.object.as_str(), e.field.as_str()),
        ("GRPCRoute app/g", "spec.rules[0].matches[0].method")
    );
}

#[test]
fn retry_on_maps_grpc_conditions_to_their_status() {
    // (retryOn, conditions, codes): gRPC names become the grpc-status
    // Envoy retries on; HTTP names and numbers are kept beside them.
    let table: &[(&str, &[RetryOn], &[u16])] = &[
        ("unavailable", &[RetryOn::Grpc(14)], &[]),
        ("cancelled", &[RetryOn::Grpc(1)], &[]),
        ("deadline-exceeded", &[RetryOn::Grpc(4)], &[]),
        ("resource-exhausted", &[RetryOn::Grpc(8)], &[]),
        ("internal", &[RetryOn::Grpc(13)], &[]),
        (
            "unavailable, 5xx,503",
            &[
                RetryOn::Grpc(14),
                RetryOn::FiveXx,
                RetryOn::RetriableStatusCodes,
            ],
            &[503],
        ),
    ];
    for (on, want, codes) in table {
        let m = with(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: app}}\nspec: {{hosts: [a], http: [{{retries: {{attempts: 1, retryOn: \"{on}\"}}, route: [{{destination: {{host: a}}}}]}}]}}"
        ))
        .unwrap();
        let rt = m.http_routes[0].rules[0].retries.clone().unwrap();
        assert_eq!(rt.retry_on, *want, "{on}");
        assert_eq!(rt.codes, *codes, "{on}");
    }
}

#[test]
fn destination_rule_tls_origination_or_a_named_refusal() {
    use mesh::upstream_tls::UpstreamTls;
    let dr = |tls: &str| {
        with(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: app}}\nspec: {{host: api.example.com, trafficPolicy: {{tls: {tls}}}}}"
        ))
    };
    let tls = |t: &str| dr(t).unwrap().destination_rules[0].policy.tls.clone();
    assert_eq!(tls("{mode: ISTIO_MUTUAL}"), None);
    assert_eq!(tls("{mode: DISABLE}"), None);
    assert_eq!(
        tls("{mode: SIMPLE, sni: api.example.com, caCertificates: /etc/ca.pem}"),
        Some(UpstreamTls {
            sni: Some("api.example.com".into()),
            ca_certificates: Some("/etc/ca.pem".into()),
            client_cert: None,
            insecure_skip_verify: false,
            credential: None,
            mutual: false,
            subject_alt_names: Vec::new(),
        })
    );
    assert_eq!(
        tls("{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, insecureSkipVerify: true}"),
        Some(UpstreamTls {
            sni: None,
            ca_certificates: None,
            client_cert: Some(("/c.pem".into(), "/k.pem".into())),
            insecure_skip_verify: true,
            credential: None,
            mutual: true,
            subject_alt_names: Vec::new(),
        })
    );
    assert_eq!(
        tls("{mode: SIMPLE, subjectAltNames: [A.example.com., 192.0.2.1]}")
            .unwrap()
            .subject_alt_names,
        ["a.example.com", "192.0.2.1"]
    );
    // credentialName: the Secret of that name in the rule's namespace.
    let t = tls("{mode: MUTUAL, credentialName: api-cert}").unwrap();
    assert_eq!(t.credential, Some(("app".into(), "api-cert".into())));
    assert!(t.mutual && t.client_cert.is_none());
    assert!(
        !tls("{mode: SIMPLE, insecureSkipVerify: false}")
            .unwrap()
            .insecure_skip_verify
    );
    for (t, field, what) in [
        ("{mode: SOMETIMES}", "mode", "unknown mode"),
        (
            "{mode: SIMPLE, credentialName: secret, caCertificates: /ca.pem}",
            "credentialName",
            "either credentialName or",
        ),
        (
            "{mode: MUTUAL, credentialName: \"\"}",
            "credentialName",
            "empty",
        ),
        (
            "{mode: SIMPLE, subjectAltNames: [a.example, \"spiffe://td/ns/a/sa/b\"]}",
            "subjectAltNames[1]",
            "only DNS names and IP addresses",
        ),
        ("{mode: SIMPLE, caCrl: /crl.pem}", "caCrl", "not supported"),
        (
            "{mode: MUTUAL, privateKey: /k.pem}",
            "clientCertificate",
            "required",
        ),
        (
            "{mode: MUTUAL, clientCertificate: /c.pem}",
            "privateKey",
            "required",
        ),
        (
            "{mode: SIMPLE, privateKey: /k.pem}",
            "privateKey",
            "only used by mode MUTUAL",
        ),
        (
            "{mode: SIMPLE, sni: \"bad name\"}",
            "sni",
            "not a server name",
        ),
        (
            "{mode: SIMPLE, maxProtocolVersion: TLSV1_3}",
            "",
            "unknown field",
        ),
    ] {
        let e = dr(t).unwrap_err();
        assert!(
            e.field
                .starts_with(&format!("spec.trafficPolicy.tls.{field}"))
                || (field.is_empty() && e.field.starts_with("spec.trafficPolicy.tls")),
            "{t}: {e}"
        );
        assert!(e.to_string().contains(what), "{t}: {e}");
    }
}

/// Gateway API for ServiceEntries, as Istio reads it: a route whose parent
/// is a ServiceEntry is for that entry's hosts (all of them, following the
/// entry as it changes); a `Hostname` backend names an entry's host.
#[test]
fn httproutes_bind_to_service_entries_and_name_their_hosts() {
    const ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: app}
spec: {hosts: [api.example.com, api2.example.com], addresses: [240.0.0.1], resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP}]}
";
    let route = |parent: &str, backend: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: app}}\nspec:\n  parentRefs: [{parent}]\n  rules: [{{backendRefs: [{backend}]}}]\n")
    };
    let se_parent = "{kind: ServiceEntry, group: networking.istio.io, name: api}";
    let hostname = "{kind: Hostname, group: networking.istio.io, name: API.example.com., port: 80}";
    // (parent, backend, the hosts the route is found under, its backend host)
    let table: [(&str, &str, &[&str], &str); 4] = [
        (
            se_parent,
            hostname,
            &["api.example.com", "api2.example.com"],
            "api.example.com",
        ),
        (
            se_parent,
            "{name: a, port: 80}",
            &["api.example.com", "api2.example.com"],
            "a.app.svc.cluster.local",
        ),
        (
            "{kind: Service, name: a}",
            hostname,
            &["a.app.svc.cluster.local"],
            "api.example.com",
        ),
        // A ServiceEntry in another namespace, named with its namespace.
        (
            "{kind: ServiceEntry, group: networking.istio.io, name: api, namespace: other}",
            hostname,
            &[],
            "api.example.com",
        ),
    ];
    for (parent, backend, hosts, to) in table {
        let m = with(&format!("{ENTRY}---\n{}", route(parent, backend))).unwrap();
        for h in [
            "api.example.com",
            "api2.example.com",
            "a.app.svc.cluster.local",
        ] {
            let found: Vec<_> = m.http_routes.get(h).collect();
            assert_eq!(
                found.len(),
                usize::from(hosts.contains(&h)),
                "{parent} under {h}"
            );
            if let Some(r) = found.first() {
                assert_eq!(r.rules[0].backends[0].host, to, "{backend}");
            }
        }
    }
    // The route follows the entry: without it, it is for no host (and not
    // an error: the entry may come later).
    let m = with(&route(se_parent, hostname)).unwrap();
    assert!(m.http_routes.get("api.example.com").next().is_none());

    for (parent, backend, field, what) in [
        (
            "{kind: ServiceEntry, name: api}",
            hostname,
            "spec.parentRefs[0]",
            "ServiceEntry (group \"\")",
        ),
        (
            se_parent,
            "{kind: Hostname, name: api.example.com}",
            "spec.rules[0].backendRefs[0]",
            "backend kind Hostname",
        ),
        (
            se_parent,
            "{kind: Hostname, group: networking.istio.io, name: api.example.com, namespace: app}",
            "spec.rules[0].backendRefs[0].namespace",
            "no namespace",
        ),
        (
            se_parent,
            "{kind: Hostname, group: networking.istio.io, name: \"a..b\"}",
            "spec.rules[0].backendRefs[0].name",
            "not a DNS name",
        ),
        (
            se_parent,
            "{kind: ServiceImport, group: multicluster.x-k8s.io, name: a}",
            "spec.rules[0].backendRefs[0]",
            "ServiceImport",
        ),
    ] {
        let e = with(&format!("{ENTRY}---\n{}", route(parent, backend))).unwrap_err();
        assert_eq!(e.field, field, "{parent} {backend}: {e}");
        assert!(e.to_string().contains(what), "{parent} {backend}: {e}");
    }
}

/// TLS Secrets in the standalone file: their PEM parts for credentialName,
/// nothing of them in a dump, and what is not a TLS Secret refused by field.
#[test]
fn tls_secrets_are_kept_out_of_the_dump() {
    let secret = |body: &str| {
        with(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: api-cert, namespace: app}}\n{body}"
        ))
    };
    // "PEM-CERT" and "PEM-KEY", base64.
    let m = secret("type: kubernetes.io/tls\ndata: {tls.crt: UEVNLUNFUlQ=, tls.key: UEVNLUtFWQ==}\nstringData: {ca.crt: PEM-CA}").unwrap();
    let s = &m.secrets[&("app".to_string(), "api-cert".to_string())];
    assert_eq!(s.cert_chain.as_deref(), Some(&b"PEM-CERT"[..]));
    assert_eq!(s.key.as_deref(), Some(&b"PEM-KEY"[..]));
    assert_eq!(s.ca.as_deref(), Some(&b"PEM-CA"[..]));
    let dump = serde_json::to_string(&m).unwrap();
    assert!(
        !dump.contains("UEVNLUtFWQ") && !dump.contains("PEM-KEY"),
        "{dump}"
    );
    assert!(!format!("{s:?}").contains("PEM-KEY"));
    for (body, field, what) in [
        (
            "type: kubernetes.io/dockerconfigjson",
            "type",
            "only kubernetes.io/tls",
        ),
        ("data: {password: eA==}", "data.password", "unknown key"),
        ("data: {tls.crt: \"!!\"}", "data.tls.crt", "not base64"),
        // A misspelt field would otherwise leave an empty Secret behind.
        (
            "stringdata: {ca.crt: PEM-CA}",
            "stringdata",
            "not a Secret's shape",
        ),
        ("data: {}", "data", "empty"),
    ] {
        let e = secret(body).unwrap_err();
        assert_eq!(e.field, field, "{body}: {e}");
        assert!(e.to_string().contains(what), "{body}: {e}");
    }
    // A value where a map belongs is not quoted back (it may be a key).
    let e = secret("data: \"-----BEGIN PRIVATE KEY----- SECRETBYTES\"").unwrap_err();
    assert_eq!(e.field, "data", "{e}");
    assert!(!e.to_string().contains("SECRETBYTES"), "{e}");
}
