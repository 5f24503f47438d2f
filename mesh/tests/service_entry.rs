//! ServiceEntries with addresses become services: ztunnel routes their VIP
//! (to a waypoint or to the STATIC endpoints) and a waypoint serves them.

use std::net::IpAddr;

use mesh::{standalone, TunnelProtocol};

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: egress, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: egress, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: taken, namespace: plain}
spec: {clusterIP: 240.0.0.99, ports: [{port: 80}]}
";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn with(extra: &str) -> Result<mesh::MeshState, mesh::ConfigError> {
    standalone::parse(&format!("{BASE}---\n{extra}"), "cluster.local")
}

#[test]
fn an_entry_with_addresses_is_a_service_on_its_vip() {
    let m = with("apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com, api2.example.com]
  addresses: [240.0.0.1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}, {number: 81, name: grpc, protocol: GRPC}]
  endpoints:
  - {address: 192.0.2.1, labels: {v: one}}
  - {address: 192.0.2.2, ports: {http: 9090}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: plain}
spec:
  hosts: [db.example.com]
  addresses: [240.0.0.2]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 192.0.2.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: own, namespace: egress, labels: {istio.io/use-waypoint: none}}
spec: {hosts: [own.example.com], addresses: [240.0.0.3], resolution: DNS, ports: [{number: 443, name: https, protocol: HTTPS}]}
")
    .unwrap();
    let api = m.service_by_vip(ip("240.0.0.1")).unwrap();
    // The first host holds the VIP; every host is a service of its own.
    assert_eq!(api.hostname, "api.example.com");
    assert_eq!(
        m.service_by_host("api2.example.com").unwrap().vips,
        [ip("240.0.0.1")]
    );
    // Bound by its namespace's label to the waypoint.
    let wp = m.service_waypoint(api).unwrap();
    assert_eq!((wp.namespace.as_str(), wp.name.as_str()), ("egress", "wp"));
    // Endpoints outside the mesh, on the port each declares.
    let mut eps: Vec<_> = m
        .endpoints_for(api, 80)
        .into_iter()
        .map(|(w, p)| (w.ip, p, w.protocol, w.labels.get("v").cloned()))
        .collect();
    eps.sort_by_key(|e| e.0);
    assert_eq!(
        eps,
        [
            (
                ip("192.0.2.1"),
                8080,
                TunnelProtocol::None,
                Some("one".into())
            ),
            (ip("192.0.2.2"), 9090, TunnelProtocol::None, None),
        ]
    );
    assert_eq!(m.endpoints_for(api, 81).len(), 2);
    // The declared protocol is in the port name the waypoint reads.
    assert!(api
        .ports
        .iter()
        .any(|p| p.port == 81 && p.name.as_deref() == Some("grpc")));
    // An endpoint address is not a workload address: never a pod's shadow.
    assert!(m.workload_by_ip(ip("192.0.2.1")).is_none());

    // No waypoint label anywhere: ztunnel sends it to its endpoints.
    let db = m.service_by_vip(ip("240.0.0.2")).unwrap();
    assert_eq!(m.service_waypoint(db), None);
    assert_eq!(
        m.endpoints_for(db, 5432)
            .iter()
            .map(|(w, p)| (w.ip, *p))
            .collect::<Vec<_>>(),
        [(ip("192.0.2.3"), 5432)]
    );
    // Its own label wins over its namespace's; a DNS entry's endpoint is
    // its host, for the proxy to resolve (no address of ours).
    let own = m.service_by_vip(ip("240.0.0.3")).unwrap();
    assert_eq!(m.service_waypoint(own), None);
    let eps = m.endpoints_for(own, 443);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].0.hostname.as_deref(), Some("own.example.com"));
    assert_eq!(eps[0].1, 443);
    assert_eq!(
        m.addresses_of_host("own.example.com"),
        Some(vec![ip("240.0.0.3")])
    );
}

#[test]
fn entry_errors_name_their_field() {
    for (spec, field, what) in [
        (
            "{hosts: [a.b], addresses: [240.0.0.99]}",
            "spec.addresses",
            "already used",
        ),
        (
            "{hosts: [a.b], ports: [{number: 80, name: x}, {number: 81, name: x}]}",
            "spec.ports[1].name",
            "used twice",
        ),
        (
            "{hosts: [a.b], resolution: STATIC, ports: [{number: 80, name: x}], endpoints: [{address: 192.0.2.1, ports: {y: 1}}]}",
            "spec.endpoints[0].ports.y",
            "names no port",
        ),
        (
            "{hosts: [a.b], location: NEARBY}",
            "spec.location",
            "unknown variant",
        ),
    ] {
        let e = with(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: e, namespace: plain}}\nspec: {spec}\n"
        ))
        .unwrap_err();
        assert!(e.field.starts_with(field), "{spec}: {e}");
        assert!(e.to_string().contains(what), "{spec}: {e}");
    }
}

#[test]
fn dns_entries_name_what_the_proxy_resolves() {
    let m = with("apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: named, namespace: plain}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.5]
  resolution: DNS
  ports: [{number: 443, name: https, protocol: TLS, targetPort: 8443}, {number: 80, name: http}]
  endpoints: [{address: a.origin.example.}, {address: B.origin.example, ports: {https: 9443}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bare, namespace: plain}
spec: {hosts: [bare.example.com, bare2.example.com], addresses: [240.0.0.6], resolution: DNS, ports: [{number: 80, name: http}]}
")
    .unwrap();
    // What the proxy connects to: (name to resolve, port).
    let t = |m: &mesh::MeshState, host: &str, port: u16| -> Vec<(String, u16)> {
        let svc = m.service_by_host(host).unwrap();
        let mut v: Vec<_> = m
            .endpoints_for(svc, port)
            .into_iter()
            .map(|(w, p)| {
                assert!(w.ip.is_unspecified() && w.protocol == TunnelProtocol::None);
                (w.hostname.as_deref().unwrap().to_string(), p)
            })
            .collect();
        v.sort();
        v
    };
    let o = |v: &[(&str, u16)]| {
        v.iter()
            .map(|(h, p)| (h.to_string(), *p))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        t(&m, "api.example.com", 443),
        o(&[("a.origin.example", 8443), ("b.origin.example", 9443)])
    );
    assert_eq!(
        t(&m, "api.example.com", 80),
        o(&[("a.origin.example", 80), ("b.origin.example", 80)])
    );
    assert!(t(&m, "api.example.com", 81).is_empty());
    // No endpoints: each host is its own name.
    assert_eq!(
        t(&m, "bare.example.com", 80),
        o(&[("bare.example.com", 80)])
    );
    assert_eq!(
        t(&m, "bare2.example.com", 80),
        o(&[("bare2.example.com", 80)])
    );
    // Hostname workloads are found by uid only, never by an address.
    assert!(m.workload_by_ip(ip("0.0.0.0")).is_none());
    assert!(m.addresses_of_host("api.example.com").unwrap() == vec![ip("240.0.0.5")]);
    // Not a DNS entry: nothing to resolve.
    let s = with("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, namespace: plain}\nspec: {hosts: [s.example.com], addresses: [240.0.0.7], resolution: STATIC, ports: [{number: 80, name: http}]}")
        .unwrap();
    assert!(!s.workloads.values().any(|w| w.hostname.is_some()));
}

/// Objects arriving one at a time (the Kubernetes source): a Service that
/// takes an entry's address later pushes the entry out, reported, and the
/// entry comes back when the Service goes; a namespace label arriving later
/// binds the entry to the waypoint.
#[test]
fn entries_follow_claims_and_namespace_labels_incrementally() {
    use mesh::objects::{Objects, Translated};
    let t = |yaml: &str| -> Translated {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        standalone::translate(v, "test").unwrap().unwrap()
    };
    let mut o = Objects::new("cluster.local");
    o.upsert(t("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns}"));
    o.upsert(t("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec: {hosts: [e.example.com], addresses: [240.0.0.1], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 192.0.2.1}]}"));
    let m = o.publish();
    let svc = m.service_by_vip(ip("240.0.0.1")).unwrap();
    assert_eq!(svc.hostname, "e.example.com");
    assert_eq!(m.service_waypoint(svc), None);
    assert_eq!(m.endpoints_for(svc, 80).len(), 1);

    let taker = t("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {clusterIP: 240.0.0.1, ports: [{port: 80}]}");
    let key = taker.key.clone();
    o.upsert(taker);
    let m = o.publish();
    assert_eq!(
        m.service_by_vip(ip("240.0.0.1")).unwrap().hostname,
        "s.ns.svc.cluster.local"
    );
    assert!(m.service_by_host("e.example.com").is_none());
    assert!(m
        .rejected
        .iter()
        .any(|r| r.kind == "ServiceEntry" && r.field == "spec.addresses"));
    // No endpoint workload of the entry is left behind.
    assert!(!m.workloads.keys().any(|k| k.contains("ServiceEntry")));

    o.remove(&key);
    o.upsert(t("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns, labels: {istio.io/use-waypoint: wp}}"));
    let m = o.publish();
    let svc = m.service_by_vip(ip("240.0.0.1")).unwrap();
    assert_eq!(svc.hostname, "e.example.com");
    assert_eq!(m.service_waypoint(svc).unwrap().name, "wp");
    assert!(m.rejected.is_empty(), "{:?}", m.rejected);
}

#[test]
fn a_policy_naming_a_service_entry_applies_to_that_entry_only() {
    use mesh::authz::Destination;
    let m = with(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: api}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
",
    )
    .unwrap();
    assert!(m.rejected.is_empty(), "{:?}", m.rejected);
    let tp = m.waypoint_policies.iter().next().unwrap();
    let dst = |namespace, name, entry| {
        Some(Destination {
            namespace,
            name,
            entry,
        })
    };
    assert!(tp.applies("egress", "wp", dst("egress", "api", true)));
    // A Service of that name, another entry, another namespace: not named.
    assert!(!tp.applies("egress", "wp", dst("egress", "api", false)));
    assert!(!tp.applies("egress", "wp", dst("egress", "db", true)));
    assert!(!tp.applies("egress", "wp", dst("plain", "api", true)));
    assert!(!tp.applies("egress", "wp", None));
}
