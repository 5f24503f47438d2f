//! Security objects we cannot translate as written are reported by name and
//! field, and never allow more than they say: an unevaluable field makes an
//! ALLOW rule match nothing and a DENY rule deny more; an unknown action is
//! a DENY; an unreadable PeerAuthentication is STRICT. One case per class of
//! unsupported field, each checked by decisions, not by shape.

use std::net::IpAddr;

use identity::Identity;
use mesh::authz::{evaluate, evaluate_selected, Connection, Decision, HttpRequest};
use mesh::{standalone, MeshState, MtlsMode};

const BASE: &str = "apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns, labels: {app: b}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
";

fn load(policy: &str) -> MeshState {
    standalone::parse(&format!("{BASE}---\n{policy}"), "cluster.local")
        .unwrap_or_else(|e| panic!("a security object must never refuse the config: {e}\n{policy}"))
}

fn policy(action: &str, extra: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  action: {action}\n{extra}")
}

fn waypoint_policy(action: &str, extra: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]\n  action: {action}\n{extra}")
}

/// A connection to pod `a` (or `b`) from `sa` at `src`, to `port`.
struct Probe {
    sa: &'static str,
    src: &'static str,
    port: u16,
    pod: &'static str,
}

const CLIENT: Probe = Probe {
    sa: "client",
    src: "10.1.0.5",
    port: 80,
    pod: "a",
};

fn ztunnel_allows(m: &MeshState, p: &Probe) -> bool {
    let id = Identity::new("cluster.local", "ns", p.sa);
    let w = m.workload_by_name("ns", p.pod).unwrap();
    let c = Connection {
        src_identity: Some(&id),
        src_ip: p.src.parse::<IpAddr>().unwrap(),
        dst_ip: w.ip,
        dst_port: p.port,
        request: None,
    };
    evaluate(m.policies.iter().map(|p| &**p), w, &c) == Decision::Allow
}

fn waypoint_allows(m: &MeshState, wp: (&str, &str), path: &str) -> bool {
    waypoint_allows_jwt(m, wp, path, None)
}

fn waypoint_allows_jwt(
    m: &MeshState,
    wp: (&str, &str),
    path: &str,
    auth: Option<&mesh::authz::RequestAuth>,
) -> bool {
    let id = Identity::new("cluster.local", "ns", "client");
    let headers = http::HeaderMap::new();
    let c = Connection {
        src_identity: Some(&id),
        src_ip: "10.1.0.5".parse().unwrap(),
        dst_ip: "10.0.0.1".parse().unwrap(),
        dst_port: 80,
        request: Some(HttpRequest {
            method: "GET",
            path,
            host: "a.ns.svc.cluster.local",
            headers: &headers,
            auth,
        }),
    };
    let applied = m
        .waypoint_policies
        .iter()
        .filter(|tp| tp.applies(wp.0, wp.1, None))
        .map(|tp| &tp.policy);
    evaluate_selected(applied, &c) == Decision::Allow
}

/// The finding for `p` names the object and starts with `field`.
fn reported(m: &MeshState, field: &str) -> bool {
    m.rejected.iter().any(|r| {
        (r.kind.as_str(), r.namespace.as_str(), r.name.as_str())
            == ("AuthorizationPolicy", "ns", "p")
            && r.field.starts_with(field)
    })
}

const OTHER: Probe = Probe {
    sa: "other",
    ..CLIENT
};
const PORT_81: Probe = Probe { port: 81, ..CLIENT };
const FAR: Probe = Probe {
    src: "192.168.1.1",
    ..CLIENT
};
const POD_B: Probe = Probe { pod: "b", ..CLIENT };

/// (what, policy, reported field, probes allowed, probes denied)
type ZtunnelCase = (&'static str, String, &'static str, Vec<Probe>, Vec<Probe>);

#[test]
fn ztunnel_policies_fail_closed_per_field_class() {
    // (what, policy, reported field, probes that must be allowed, probes that must be denied)
    let cases: Vec<ZtunnelCase> = vec![
        ("DENY + requestPrincipals: denies what the rest matches",
            policy("DENY", "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client], requestPrincipals: [\"*\"]}}]}]"),
            "spec.rules[0].from[0].source.requestPrincipals", vec![OTHER], vec![CLIENT]),
        ("ALLOW + requestPrincipals: matches nothing",
            policy("ALLOW", "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client], requestPrincipals: [\"*\"]}}]}]"),
            "spec.rules[0].from[0].source.requestPrincipals", vec![POD_B], vec![CLIENT, OTHER]),
        ("DENY notRequestPrincipals alone: denies everything selected",
            policy("DENY", "  rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]"),
            "spec.rules[0].from[0].source.notRequestPrincipals", vec![POD_B], vec![CLIENT, OTHER, PORT_81]),
        ("ALLOW with an unknown source field",
            policy("ALLOW", "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client], serviceAccountz: [x]}}]}]"),
            "spec.rules[0].from[0].source.serviceAccountz", vec![POD_B], vec![CLIENT]),
        ("DENY with an unknown rule field",
            policy("DENY", "  rules: [{to: [{operation: {ports: [\"80\"]}}], fancy: true}]"),
            "spec.rules[0].fancy", vec![PORT_81], vec![CLIENT, OTHER]),
        ("DENY with an unknown operation field",
            policy("DENY", "  rules: [{to: [{operation: {ports: [\"80\"], sni: [x]}}]}]"),
            "spec.rules[0].to[0].operation.sni", vec![PORT_81], vec![CLIENT]),
        ("DENY with an unsupported condition",
            policy("DENY", "  rules: [{to: [{operation: {ports: [\"80\"]}}], when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]"),
            "spec.rules[0].when[0].key", vec![PORT_81], vec![CLIENT, OTHER]),
        ("ALLOW with an unsupported condition",
            policy("ALLOW", "  rules: [{when: [{key: connection.sni, values: [x]}]}]"),
            "spec.rules[0].when[0].key", vec![POD_B], vec![CLIENT, OTHER]),
        ("ALLOW with a bad ipBlock: the rule matches nothing",
            policy("ALLOW", "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 300.0.0.0/8]}}]}]"),
            "spec.rules[0].from[0].source.ipBlocks[1]", vec![POD_B], vec![CLIENT]),
        ("DENY with a bad ipBlock: the whole field is dropped",
            policy("DENY", "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 300.0.0.0/8]}}]}]"),
            "spec.rules[0].from[0].source.ipBlocks[1]", vec![POD_B], vec![CLIENT, FAR]),
        ("DENY with a bad port",
            policy("DENY", "  rules: [{to: [{operation: {ports: [http]}}]}]"),
            "spec.rules[0].to[0].operation.ports[0]", vec![POD_B], vec![CLIENT, PORT_81]),
        ("DENY with a bad condition value",
            policy("DENY", "  rules: [{when: [{key: destination.port, values: [eighty]}]}]"),
            "spec.rules[0].when[0].key", vec![POD_B], vec![CLIENT, PORT_81]),
        ("CUSTOM with a selector: ztunnel does not enforce it, as Istio's does not",
            policy("CUSTOM", "  provider: {name: ext-authz}\n  rules: [{to: [{operation: {ports: [\"80\"]}}]}]"),
            "spec.action", vec![PORT_81, POD_B, CLIENT], vec![]),
        ("CUSTOM without a provider name: a DENY of what its rules match",
            policy("CUSTOM", "  provider: {}\n  rules: [{to: [{operation: {ports: [\"80\"]}}]}]"),
            "spec.provider.name", vec![PORT_81, POD_B], vec![CLIENT]),
        ("an unknown action is a DENY",
            policy("LOG", "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client]}}]}]"),
            "spec.action", vec![OTHER], vec![CLIENT]),
        ("ALLOW with a provider: treated as DENY",
            policy("ALLOW", "  provider: {name: x}\n  rules: [{}]"),
            "spec.provider", vec![POD_B], vec![CLIENT, OTHER]),
        ("DENY with an unknown spec field: denies all it selects",
            policy("DENY", "  rules: [{to: [{operation: {ports: [\"9\"]}}]}]\n  evaluation: lenient"),
            "spec.evaluation", vec![POD_B], vec![CLIENT, PORT_81]),
        ("ALLOW with an unknown spec field: allows nothing",
            policy("ALLOW", "  rules: [{}]\n  evaluation: lenient"),
            "spec.evaluation", vec![POD_B], vec![CLIENT]),
        ("DENY we cannot read at all",
            policy("DENY", "  rules: everything"),
            "spec.rules", vec![POD_B], vec![CLIENT, OTHER]),
        ("ALLOW we cannot read at all",
            policy("ALLOW", "  rules: [{from: {source: 1}}]"),
            "spec.rules[0].from", vec![POD_B], vec![CLIENT]),
        ("a selector we cannot read widens to the namespace",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  selector: {matchExpressions: [{key: app, operator: In, values: [a]}]}\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"80\"]}}]}]".to_string(),
            "spec.selector.matchExpressions", vec![PORT_81], vec![CLIENT, POD_B]),
        ("request attributes in an ALLOW at ztunnel",
            policy("ALLOW", "  rules: [{to: [{operation: {methods: [GET]}}]}]"),
            "spec.rules[0]", vec![POD_B], vec![CLIENT]),
    ];
    for (what, doc, field, allowed, denied) in &cases {
        let m = load(doc);
        assert!(
            reported(&m, field),
            "{what}: no finding at {field}: {:#?}",
            m.rejected
        );
        // The rest of the config still applies.
        assert_eq!(m.workloads.len(), 2, "{what}");
        for p in allowed {
            assert!(
                ztunnel_allows(&m, p),
                "{what}: {}:{} -> {} should pass",
                p.sa,
                p.port,
                p.pod
            );
        }
        for p in denied {
            assert!(
                !ztunnel_allows(&m, p),
                "{what}: {}:{} -> {} should be denied",
                p.sa,
                p.port,
                p.pod
            );
        }
    }
}

#[test]
fn supported_policies_report_nothing() {
    for doc in [
        policy("ALLOW", "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client], ipBlocks: [10.1.0.0/16]}}], to: [{operation: {ports: [\"80\"]}}], when: [{key: source.namespace, values: [ns]}]}]"),
        policy("DENY", "  rules: [{from: [{source: {notNamespaces: [ns]}}]}]"),
        policy("AUDIT", "  rules: [{}]"),
        waypoint_policy("ALLOW", "  rules: [{to: [{operation: {paths: [/ok]}}], when: [{key: \"request.headers[x-a]\", values: [b]}]}]"),
        // A CUSTOM policy whose provider meshConfig defines.
        format!("{}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    extensionProviders: [{{name: ext-authz, envoyExtAuthzHttp: {{service: a.b.svc.cluster.local, port: 80}}}}]\n",
            waypoint_policy("CUSTOM", "  provider: {name: ext-authz}\n  rules: [{to: [{operation: {paths: [/admin]}}]}]")),
    ] {
        let m = load(&doc);
        assert!(m.rejected.is_empty(), "{doc}: {:#?}", m.rejected);
    }
    // Istio's dry-run annotation: evaluated and logged, never enforced.
    let m = load(&policy("DENY", "  rules: [{}]").replace(
        "metadata: {name: p, namespace: ns}",
        "metadata: {name: p, namespace: ns, annotations: {istio.io/dry-run: \"true\"}}",
    ));
    assert!(m.policies[0].dry_run && ztunnel_allows(&m, &CLIENT));
    // And they still decide as written.
    let m = load(&policy(
        "ALLOW",
        "  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client]}}]}]",
    ));
    assert!(ztunnel_allows(&m, &CLIENT) && !ztunnel_allows(&m, &OTHER));
}

#[test]
fn waypoint_policies_fail_closed() {
    let wp = ("ns", "wp");
    // (what, policy, reported field, path allowed, path denied)
    let cases: Vec<(&str, String, &str, Option<&str>, &str)> = vec![
        ("CUSTOM at the waypoint without a provider denies what its rules match",
            waypoint_policy("CUSTOM", "  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]"),
            "spec.provider.name", Some("/public"), "/admin/x"),
        ("ALLOW with a JWT claim path we cannot read allows nothing",
            waypoint_policy("ALLOW", "  rules: [{when: [{key: \"request.auth.claims[groups\", values: [admin]}]}]"),
            "spec.rules[0].when[0].key", None, "/public"),
        ("a target kind we do not know covers every waypoint in the namespace",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  targetRefs: [{kind: WorkloadEntry, group: networking.istio.io, name: ext}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]".to_string(),
            "spec.targetRefs[0]", Some("/public"), "/admin"),
    ];
    for (what, doc, field, allowed, denied) in &cases {
        let m = load(doc);
        assert!(
            reported(&m, field),
            "{what}: no finding at {field}: {:#?}",
            m.rejected
        );
        if let Some(path) = allowed {
            assert!(waypoint_allows(&m, wp, path), "{what}: {path} should pass");
        }
        assert!(
            !waypoint_allows(&m, wp, denied),
            "{what}: {denied} should be denied"
        );
        // Other waypoints are not this policy's business (same namespace
        // aside, for an unknown target kind).
        assert!(
            waypoint_allows(&m, ("other", "wp2"), denied),
            "{what}: leaked to another namespace"
        );
    }
    // GatewayClass targets from the root namespace cover every waypoint.
    let m = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: istio-system}\nspec:\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]");
    assert!(m.rejected.is_empty(), "{:#?}", m.rejected);
    assert!(!waypoint_allows(&m, wp, "/admin") && !waypoint_allows(&m, ("other", "wp2"), "/admin"));
    assert!(waypoint_allows(&m, wp, "/public"));
}

#[test]
fn peer_authentications_we_cannot_read_are_strict() {
    let pa = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: ns}}\nspec: {spec}")
    };
    for (spec, field, a_port_80, b_port_80) in [
        ("{mtls: {mode: STRIKT}}", "spec.mtls.mode", MtlsMode::Strict, MtlsMode::Strict),
        ("{mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: DISABLE}}}", "spec.portLevelMtls.8080", MtlsMode::Strict, MtlsMode::Strict),
        ("{selector: {matchLabels: {app: a}}, mtls: {mode: PERMISSIVE, extra: 1}}", "spec.mtls.extra", MtlsMode::Strict, MtlsMode::Permissive),
        ("{selector: {matchLabels: {app: a}}, mtls: {mode: DISABLE}, portLevelMtls: {http: {mode: DISABLE}}}", "spec.portLevelMtls.http", MtlsMode::Strict, MtlsMode::Permissive),
        ("{selector: {matchLabels: {app: a}}, mtls: {mode: DISABLE}, portLevelMtls: {9000: {mode: 7}}}", "spec.portLevelMtls.9000", MtlsMode::Strict, MtlsMode::Permissive),
        ("{selector: {matchLabels: {app: a}, matchExpressions: []}, mtls: {mode: DISABLE}}", "spec.selector.matchExpressions", MtlsMode::Strict, MtlsMode::Strict),
        ("{mtls: {mode: DISABLE}, future: yes}", "spec.future", MtlsMode::Strict, MtlsMode::Strict),
        ("{mtls: DISABLE}", "spec.mtls", MtlsMode::Strict, MtlsMode::Strict),
    ] {
        let m = load(&pa(spec));
        assert!(
            m.rejected.iter().any(|r| r.kind == "PeerAuthentication" && r.name == "pa" && r.field.starts_with(field)),
            "{spec}: no finding at {field}: {:#?}", m.rejected
        );
        let mode = |pod| m.mtls_mode(m.workload_by_name("ns", pod).unwrap(), 80);
        assert_eq!((mode("a"), mode("b")), (a_port_80, b_port_80), "{spec}");
    }
    // A readable one is taken as written.
    let m = load(&pa("{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}, portLevelMtls: {9000: {mode: PERMISSIVE}}}"));
    assert!(m.rejected.is_empty());
    let a = m.workload_by_name("ns", "a").unwrap();
    assert_eq!(
        (m.mtls_mode(a, 80), m.mtls_mode(a, 9000)),
        (MtlsMode::Strict, MtlsMode::Permissive)
    );
}

#[test]
fn waypoint_policies_read_the_verified_jwt() {
    let wp = ("ns", "wp");
    let auth = |sub: &str, claims: serde_json::Value| mesh::authz::RequestAuth {
        principal: format!("https://idp/{sub}"),
        claims: claims.as_object().unwrap().clone(),
    };
    let alice = auth(
        "alice",
        serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": ["web", "api"], "azp": "cli", "groups": ["dev", "ops"], "org": {"team": {"name": "core"}}, "level": "gold"}),
    );
    let bob = auth(
        "bob",
        serde_json::json!({"iss": "https://idp", "sub": "bob", "aud": "web", "groups": "sales", "org": {"team": {"name": "edge"}}}),
    );
    // (policy rules, no token, alice, bob): allowed?
    let cases = [
        ("ALLOW", "[{from: [{source: {requestPrincipals: [\"*\"]}}]}]", false, true, true),
        ("ALLOW", "[{from: [{source: {requestPrincipals: [https://idp/alice]}}]}]", false, true, false),
        ("ALLOW", "[{from: [{source: {requestPrincipals: [\"https://idp/*\"], notRequestPrincipals: [https://idp/bob]}}]}]", false, true, false),
        ("DENY", "[{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]", false, true, true),
        ("ALLOW", "[{when: [{key: \"request.auth.claims[groups]\", values: [ops]}]}]", false, true, false),
        ("ALLOW", "[{when: [{key: \"request.auth.claims[groups]\", values: [sales]}]}]", false, false, true),
        ("DENY", "[{when: [{key: \"request.auth.claims[groups]\", notValues: [ops]}]}]", false, true, false),
        ("ALLOW", "[{when: [{key: \"request.auth.claims[org][team][name]\", values: [core]}]}]", false, true, false),
        ("ALLOW", "[{when: [{key: \"request.auth.claims[level]\", values: [\"go*\"]}]}]", false, true, false),
        ("ALLOW", "[{when: [{key: request.auth.principal, values: [https://idp/bob]}]}]", false, false, true),
        ("ALLOW", "[{when: [{key: request.auth.audiences, values: [api]}]}]", false, true, false),
        ("ALLOW", "[{when: [{key: request.auth.presenter, values: [cli]}]}]", false, true, false),
    ];
    for (action, rules, none, a, b) in cases {
        let m = load(&waypoint_policy(action, &format!("  rules: {rules}")));
        assert!(m.rejected.is_empty(), "{rules}: {:#?}", m.rejected);
        assert_eq!(
            waypoint_allows_jwt(&m, wp, "/", None),
            none,
            "{action} {rules}: no token"
        );
        assert_eq!(
            waypoint_allows_jwt(&m, wp, "/", Some(&alice)),
            a,
            "{action} {rules}: alice"
        );
        assert_eq!(
            waypoint_allows_jwt(&m, wp, "/", Some(&bob)),
            b,
            "{action} {rules}: bob"
        );
    }
}

#[test]
fn custom_policies_without_a_usable_provider_are_reported() {
    let mesh = |providers: &str| {
        format!("\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    extensionProviders: {providers}\n")
    };
    let custom = waypoint_policy("CUSTOM", "  provider: {name: ext}\n  rules: [{}]");
    // (meshConfig, reason reported at spec.provider.name; None: nothing)
    for (config, want) in [
        (
            String::new(),
            Some("is not among meshConfig's extensionProviders"),
        ),
        (
            mesh("[{name: other, envoyExtAuthzHttp: {service: a, port: 80}}]"),
            Some("is not among"),
        ),
        (
            mesh("[{name: ext, zipkin: {service: z, port: 9411}}]"),
            Some("cannot be used"),
        ),
        (
            mesh("[{name: ext, envoyExtAuthzGrpc: {service: a, port: 0}}]"),
            Some("cannot be used"),
        ),
        (
            mesh("[{name: ext, envoyExtAuthzGrpc: {service: a, port: 9000}}]"),
            None,
        ),
    ] {
        let m = load(&format!("{custom}{config}"));
        let found: Vec<_> = m
            .rejected
            .iter()
            .filter(|r| r.kind == "AuthorizationPolicy" && r.field == "spec.provider.name")
            .collect();
        match want {
            Some(words) => assert!(
                found.len() == 1 && found[0].reason.contains(words),
                "{config}: {found:#?}"
            ),
            None => assert!(found.is_empty(), "{config}: {found:#?}"),
        }
    }
}
