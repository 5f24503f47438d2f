use std::net::IpAddr;

use identity::Identity;
use mesh::authz::{evaluate, Connection, Decision};
use mesh::{standalone, MtlsMode, TunnelProtocol};

const EXAMPLE: &str = include_str!("../../examples/mesh.yaml");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn example_translates_to_model() {
    let m = standalone::parse(EXAMPLE, "cluster.local").unwrap();
    assert_eq!(m.workloads.len(), 7);
    assert_eq!(m.waypoints.len(), 1);
    assert_eq!(m.http_routes.len(), 1);
    assert_eq!(m.waypoint_policies.len(), 1);
    let client = m.workload_by_ip(ip("10.244.1.10")).unwrap();
    assert_eq!(
        client.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(&*client.node, "node1");
    assert_eq!(client.protocol, TunnelProtocol::Hbone);
    let svc = m.service_by_vip(ip("10.96.0.10")).unwrap();
    assert_eq!(svc.hostname, "echo.demo.svc.cluster.local");
    let mut eps: Vec<_> = m
        .endpoints_for(svc, 80)
        .into_iter()
        .map(|(w, p)| (w.name.clone(), p))
        .collect();
    eps.sort();
    assert_eq!(
        eps,
        vec![("echo-1".to_string(), 8080), ("echo-2".to_string(), 8080)]
    );
    assert!(
        m.endpoints_for(svc, 81).is_empty(),
        "unknown service port has no endpoints"
    );
    assert_eq!(m.mtls_mode(client, 80), MtlsMode::Strict);
}

#[test]
fn policy_admits_only_principal() {
    let m = standalone::parse(EXAMPLE, "cluster.local").unwrap();
    let echo = m.workload_by_name("demo", "echo-1").unwrap();
    let client = Identity::new("cluster.local", "demo", "client");
    let intruder = Identity::new("cluster.local", "demo", "intruder");
    let conn = |id| Connection {
        src_identity: id,
        src_ip: ip("10.244.1.10"),
        dst_ip: echo.ip,
        dst_port: 8080,
        request: None,
    };
    assert_eq!(
        evaluate(m.policies.iter().map(|p| &**p), echo, &conn(Some(&client))),
        Decision::Allow
    );
    assert!(matches!(
        evaluate(
            m.policies.iter().map(|p| &**p),
            echo,
            &conn(Some(&intruder))
        ),
        Decision::Deny(_)
    ));
    assert!(matches!(
        evaluate(m.policies.iter().map(|p| &**p), echo, &conn(None)),
        Decision::Deny(_)
    ));
    // The client itself is selected by no policy: open.
    let c = m.workload_by_name("demo", "client").unwrap();
    assert_eq!(
        evaluate(m.policies.iter().map(|p| &**p), c, &conn(Some(&intruder))),
        Decision::Allow
    );
}

const BASE: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: ns, labels: {app: a}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n";

fn with(extra: &str) -> Result<mesh::MeshState, mesh::ConfigError> {
    standalone::parse(&format!("{BASE}---\n{extra}"), "cluster.local")
}

fn deny_policy(body: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n{body}")
}

#[test]
fn deny_before_allow_and_not_forms() {
    let doc = format!(
        "{}\n---\n{}",
        deny_policy("  action: DENY\n  rules:\n  - from:\n    - source: {notNamespaces: [ns]}\n  - to:\n    - operation: {ports: [\"22\"]}"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: ns}\nspec:\n  rules:\n  - {}"
    );
    let m = with(&doc).unwrap();
    let w = m.workload_by_name("ns", "a").unwrap();
    let same = Identity::new("cluster.local", "ns", "x");
    let other = Identity::new("cluster.local", "other", "x");
    let c = |id, port| Connection {
        src_identity: id,
        src_ip: ip("10.0.0.2"),
        dst_ip: w.ip,
        dst_port: port,
        request: None,
    };
    let ev = |c: &Connection| evaluate(m.policies.iter().map(|p| &**p), w, c);
    assert_eq!(ev(&c(Some(&same), 80)), Decision::Allow);
    assert!(
        matches!(ev(&c(Some(&other), 80)), Decision::Deny(_)),
        "notNamespaces DENY"
    );
    assert!(
        matches!(ev(&c(Some(&same), 22)), Decision::Deny(_)),
        "port DENY beats ALLOW-all"
    );
    assert!(
        matches!(ev(&c(None, 80)), Decision::Deny(_)),
        "no identity is not in namespace ns"
    );
}

#[test]
fn ip_blocks_and_l7_fail_closed() {
    let m = with(&deny_policy("  rules:\n  - from:\n    - source: {ipBlocks: [10.1.0.0/16]}\n  - to:\n    - operation: {methods: [GET]}")).unwrap();
    let w = m.workload_by_name("ns", "a").unwrap();
    let c = |src: &str| Connection {
        src_identity: None,
        src_ip: ip(src),
        dst_ip: w.ip,
        dst_port: 80,
        request: None,
    };
    let ev = |c: &Connection| evaluate(m.policies.iter().map(|p| &**p), w, c);
    assert_eq!(ev(&c("10.1.2.3")), Decision::Allow);
    // The L7-only ALLOW rule must not open the door to everyone.
    assert!(matches!(ev(&c("10.2.0.1")), Decision::Deny(_)));
}

#[test]
fn errors_name_object_and_field() {
    let cases: &[(&str, &str)] = &[
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: ns}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n", "Pod ns/b: status.podIP: 10.0.0.1 is already used by Pod ns/a"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: ns}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.300}\n", "Pod ns/b: status.podIP"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: ns}\nstatus: {podIP: 10.0.0.2}\n", "Pod ns/b: spec: missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: ns}\nspec: {}\nstatus: {podIP: 10.0.0.2}\n", "Pod ns/b: spec: missing field `nodeName`"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n", "Service ns/s: spec.clusterIP: 10.0.0.1 is already used by Pod ns/a"),
        ("apiVersion: v1\nkind: Endpoints\nmetadata: {name: c, namespace: ns}\n", "Endpoints ns/c: kind: unsupported kind Endpoints"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: ns}\n", "ConfigMap ns/c: metadata: only the ConfigMap istio-system/istio (meshConfig) is read"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata: {mesh: \"a: [b\"}\n", "ConfigMap istio-system/istio: data.mesh: YAML:"),
        ("kind: Pod\nmetadata: {name: x}\n", "document 2: apiVersion: missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: ns}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.9}\n", "Pod ns/a: metadata.name: defined twice"),
        ("a: [b\n", "document 2: YAML"),
    ];
    for (doc, want) in cases {
        let e = with(doc).unwrap_err().to_string();
        assert!(e.starts_with(want), "got {e:?}, want prefix {want:?}");
    }
    // Security objects are never refused: tests/fail_closed.rs.
}

#[test]
fn peer_authentication_precedence() {
    let doc = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n\
apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: ns}\nspec: {mtls: {mode: UNSET}}\n---\n\
apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: wl, namespace: ns}\nspec: {selector: {matchLabels: {app: a}}, mtls: {mode: UNSET}, portLevelMtls: {9000: {mode: PERMISSIVE}}}";
    let m = with(doc).unwrap();
    let w = m.workload_by_name("ns", "a").unwrap();
    assert_eq!(
        m.mtls_mode(w, 80),
        MtlsMode::Strict,
        "UNSET inherits mesh-wide STRICT"
    );
    assert_eq!(
        m.mtls_mode(w, 9000),
        MtlsMode::Permissive,
        "port level wins"
    );
    let open = with("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns}").unwrap();
    assert_eq!(
        open.mtls_mode(open.workload_by_name("ns", "a").unwrap(), 80),
        MtlsMode::Permissive
    );
    assert_eq!(
        open.workload_by_name("ns", "a").unwrap().protocol,
        TunnelProtocol::None,
        "unlabelled namespace is not in the mesh"
    );
}

#[test]
fn service_entries_and_hosts_the_mesh_answers_for() {
    let se = |spec: &str| {
        standalone::parse(&format!(
            "{EXAMPLE}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: demo}}\nspec: {spec}\n"
        ), "cluster.local")
    };
    let m =
        se("{hosts: [Api.Example.COM., db.internal], addresses: [240.0.0.5/32], resolution: DNS}")
            .unwrap();
    assert_eq!(
        m.addresses_of_host("api.example.com"),
        Some(vec![ip("240.0.0.5")])
    );
    assert_eq!(
        m.addresses_of_host("db.internal"),
        Some(vec![ip("240.0.0.5")])
    );
    assert_eq!(
        m.addresses_of_host("echo.demo.svc.cluster.local"),
        Some(vec![ip("10.96.0.10")])
    );
    assert_eq!(m.addresses_of_host("nope.example.com"), None);
    // STATIC without addresses: the endpoints. DNS without: not ours to answer.
    let m =
        se("{hosts: [s.example], resolution: STATIC, endpoints: [{address: 192.0.2.7}]}").unwrap();
    assert_eq!(
        m.addresses_of_host("s.example"),
        Some(vec![ip("192.0.2.7")])
    );
    let m = se("{hosts: [d.example], resolution: DNS, endpoints: [{address: origin.example}]}")
        .unwrap();
    assert_eq!(m.addresses_of_host("d.example"), None);

    for (spec, field, what) in [
        ("{hosts: []}", "spec.hosts", "empty"),
        ("{hosts: [a..b]}", "spec.hosts[0]", "not a DNS name"),
        (
            "{hosts: [a.b], addresses: [10.0.0.0/8]}",
            "spec.addresses[0]",
            "ranges are not supported",
        ),
        (
            "{hosts: [a.b], resolution: STATIC, endpoints: [{address: x.y}]}",
            "spec.endpoints[0].address",
            "STATIC",
        ),
        (
            "{hosts: [a.b], resolution: MAYBE}",
            "spec.resolution",
            "unknown variant",
        ),
    ] {
        let e = se(spec).unwrap_err();
        assert_eq!(e.object, "ServiceEntry demo/ext", "{spec}");
        assert_eq!(e.field, field, "{spec}: {e}");
        assert!(e.message.contains(what), "{spec}: {e}");
    }
}

#[test]
fn nodes_readiness_and_load_balancing() {
    use mesh::locality::{HealthPolicy, LoadBalancing, Mode};
    let yaml = |extra: &str| {
        format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: a}}
---
apiVersion: v1
kind: Node
metadata: {{name: node1, labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: za, topology.istio.io/subzone: s1}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: up, namespace: a, labels: {{app: s}}}}
spec: {{nodeName: node1}}
status: {{podIP: 10.0.0.1, conditions: [{{type: Ready, status: \"True\"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: down, namespace: a, labels: {{app: s}}}}
spec: {{nodeName: node2}}
status: {{podIP: 10.0.0.2, conditions: [{{type: Ready, status: \"False\"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: s, namespace: a}}
spec:
  clusterIP: 10.96.0.1
  selector: {{app: s}}
  ports: [{{port: 80}}]
{extra}"
        )
    };
    let m = standalone::parse(&yaml(""), "cluster.local").unwrap();
    let up = m.workload_by_ip(ip("10.0.0.1")).unwrap();
    let l = up.locality.as_ref().unwrap();
    assert_eq!(
        (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
        ("r1", "za", "s1")
    );
    // node2 has no Node object: nothing known of where it runs.
    let down = m.workload_by_ip(ip("10.0.0.2")).unwrap();
    assert!(down.locality.is_none());
    assert!(up.healthy && !down.healthy);
    // Unready pods stay workloads but are no endpoints...
    let svc = m.service_by_vip(ip("10.96.0.1")).unwrap();
    assert_eq!(m.endpoints_for(svc, 80).len(), 1);
    assert!(svc.load_balancing.is_none());
    // ...unless the service publishes them.
    let m = standalone::parse(
        &yaml("  publishNotReadyAddresses: true\n  trafficDistribution: PreferSameNode\n"),
        "cluster.local",
    )
    .unwrap();
    let svc = m.service_by_vip(ip("10.96.0.1")).unwrap();
    assert_eq!(m.endpoints_for(svc, 80).len(), 2);
    let lb = svc.load_balancing.as_ref().unwrap();
    assert_eq!(
        lb.routing_preferences,
        LoadBalancing::prefer_same_node().routing_preferences
    );
    assert_eq!(
        (lb.mode, lb.health_policy),
        (Mode::Failover, HealthPolicy::AllowAll)
    );
    let m = standalone::parse(&yaml("  internalTrafficPolicy: Local\n"), "cluster.local").unwrap();
    let svc = m.service_by_vip(ip("10.96.0.1")).unwrap();
    assert_eq!(svc.load_balancing, Some(LoadBalancing::node_local()));
    // A policy Kubernetes does not have is refused by field.
    let e =
        standalone::parse(&yaml("  internalTrafficPolicy: Nearby\n"), "cluster.local").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service a/s: spec.internalTrafficPolicy: \"Nearby\": must be Cluster or Local"
    );
    // Node objects are cluster-scoped and named as such in errors.
    let e = standalone::parse(
        "apiVersion: v1\nkind: Node\nmetadata: {labels: {a: b}}\n",
        "cluster.local",
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "Node : metadata.name: missing");
}

#[test]
fn services_inherit_their_namespaces_traffic_distribution() {
    use mesh::locality::LoadBalancing;
    let yaml = |ns: &str, svc: &str| {
        format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: a{ns}}}
---
apiVersion: v1
kind: Service
metadata: {{name: s, namespace: a{svc}}}
spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}
"
        )
    };
    let ann = |v: &str| format!(", annotations: {{networking.istio.io/traffic-distribution: {v}}}");
    let mut src = mesh::FileSource::new(std::path::Path::new(""), "cluster.local");
    let lb = |m: &mesh::MeshState| {
        m.service_by_vip(ip("10.96.0.1"))
            .unwrap()
            .load_balancing
            .clone()
    };
    assert_eq!(lb(&src.apply(&yaml("", "")).unwrap()), None);
    // Annotating the namespace re-derives its services...
    let m = src.apply(&yaml(&ann("PreferSameNode"), "")).unwrap();
    assert_eq!(lb(&m), Some(LoadBalancing::prefer_same_node()));
    // ...the service's own annotation wins...
    let m = src
        .apply(&yaml(&ann("PreferSameNode"), &ann("PreferClose")))
        .unwrap();
    assert_eq!(lb(&m), Some(LoadBalancing::prefer_same_zone()));
    // ...and taking the namespace's away takes it from the service.
    assert_eq!(lb(&src.apply(&yaml("", "")).unwrap()), None);
}
