//! Dual-stack objects through the standalone translator (the Kubernetes
//! source feeds the same one): a pod is found by each of its addresses, a
//! Service by each VIP, v6 `ipBlocks` match v6 sources only, and bad family
//! fields are refused naming the field.

use std::net::IpAddr;

use mesh::authz::{evaluate, Connection, Decision};
use mesh::standalone;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const DUAL: &str = "apiVersion: v1
kind: Namespace
metadata: {name: ns, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: six, namespace: ns, labels: {app: a}}
spec: {nodeName: n1}
status: {podIPs: [{ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec:
  clusterIPs: [10.96.0.1, 'fd00:96::1']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  selector: {app: a}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: ns}
spec:
  clusterIP: None
  ipFamilies: [IPv4, IPv6]
  selector: {app: a}
  ports: [{port: 80}]
";

#[test]
fn pods_and_services_by_every_address() {
    let m = standalone::parse(DUAL, "cluster.local").unwrap();
    let a = m.workload_by_name("ns", "a").unwrap();
    assert_eq!(
        (a.ip, a.extra_ips.as_slice()),
        (ip("10.0.0.1"), &[ip("fd00::1")][..])
    );
    assert!(std::ptr::eq(
        &**m.workload_by_ip(ip("fd00::1")).unwrap(),
        &**a
    ));
    assert!(std::ptr::eq(
        &**m.workload_by_ip(ip("10.0.0.1")).unwrap(),
        &**a
    ));
    assert_eq!(a.address_like(ip("fd00:96::1")), ip("fd00::1"));
    assert_eq!(a.address_like(ip("10.96.0.1")), ip("10.0.0.1"));
    // An IPv6-only pod: its v6 address is its primary, a v4 VIP still
    // reaches it at that address (there is no other).
    let six = m.workload_by_ip(ip("fd00::2")).unwrap();
    assert_eq!(six.name, "six");
    assert_eq!(six.address_like(ip("10.96.0.1")), ip("fd00::2"));

    let svc = m.service_by_vip(ip("fd00:96::1")).unwrap();
    assert_eq!(svc.vips, [ip("10.96.0.1"), ip("fd00:96::1")]);
    assert!(std::ptr::eq(
        &**m.service_by_vip(ip("10.96.0.1")).unwrap(),
        &**svc
    ));
    assert_eq!(m.endpoints_for(svc, 80).len(), 2);
    // DNS answers both families of VIPs; a headless service its pods'
    // addresses of both families.
    let host = "a.ns.svc.cluster.local";
    assert_eq!(m.addresses_of_host(host).unwrap(), svc.vips);
    let mut headless = m
        .addresses_of_host("headless.ns.svc.cluster.local")
        .unwrap();
    headless.sort();
    assert_eq!(headless, [ip("10.0.0.1"), ip("fd00::1"), ip("fd00::2")]);
}

/// The file is refused whole when two pods claim one address, a v6 one
/// as much as a v4 one, naming the field that claims it.
#[test]
fn two_pods_on_one_v6_address_are_refused() {
    let doc = format!(
        "{DUAL}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: z, namespace: ns}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.0.0.9, podIPs: [{{ip: 10.0.0.9}}, {{ip: 'fd00::1'}}]}}\n"
    );
    let e = standalone::parse(&doc, "cluster.local").unwrap_err();
    assert_eq!(
        (e.object.as_str(), e.field.as_str()),
        ("Pod ns/z", "status.podIPs")
    );
    assert!(
        e.message.contains("fd00::1") && e.message.contains("Pod ns/a"),
        "{e}"
    );
}

#[test]
fn v6_ip_blocks_match_v6_sources_only() {
    let doc = format!(
        "{DUAL}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{ipBlocks: ['fd00:1::/32', 10.9.0.0/16]}}\n"
    );
    let m = standalone::parse(&doc, "cluster.local").unwrap();
    let w = m.workload_by_name("ns", "a").unwrap();
    let ev = |src: &str, dst: &str| {
        let c = Connection {
            src_identity: None,
            src_ip: ip(src),
            dst_ip: ip(dst),
            dst_port: 80,
            request: None,
        };
        evaluate(m.policies.iter().map(|p| &**p), w, &c)
    };
    assert!(matches!(ev("fd00:1:2::3", "fd00::1"), Decision::Deny(_)));
    assert!(matches!(ev("10.9.1.1", "10.0.0.1"), Decision::Deny(_)));
    assert_eq!(ev("fd00:2::3", "fd00::1"), Decision::Allow);
    assert_eq!(ev("10.8.1.1", "10.0.0.1"), Decision::Allow);
    // A v4 address written as v4-mapped v6 is not in the v6 block.
    assert_eq!(ev("::ffff:10.8.1.1", "fd00::1"), Decision::Allow);
}

#[test]
fn bad_family_fields_are_refused_by_name() {
    let cases = [
        (
            "status: {podIP: 10.0.0.5, podIPs: [{ip: 'fd00::5'}, {ip: 10.0.0.5}]}",
            "status.podIPs",
        ),
        (
            "status: {podIPs: [{ip: 10.0.0.5}, {ip: 10.0.0.6}]}",
            "status.podIPs",
        ),
    ];
    for (status, field) in cases {
        let doc = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ns}}\nspec: {{nodeName: n1}}\n{status}\n");
        let e = standalone::parse(&doc, "cluster.local").unwrap_err();
        assert_eq!(e.field, field, "{status}: {e}");
        assert_eq!(e.object, "Pod ns/p", "{status}: {e}");
    }
    let svc = |spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec:\n  ports: [{{port: 80}}]\n{spec}\n")
    };
    for (spec, field) in [
        (
            "  clusterIP: 10.96.0.1\n  ipFamilyPolicy: RequireDualStack",
            "spec.ipFamilyPolicy",
        ),
        (
            "  clusterIPs: [10.96.0.1, 'fd00:96::1']\n  ipFamilies: [IPv6, IPv4]",
            "spec.ipFamilies",
        ),
        (
            "  clusterIP: 10.96.0.2\n  clusterIPs: [10.96.0.1]",
            "spec.clusterIPs",
        ),
    ] {
        let e = standalone::parse(&svc(spec), "cluster.local").unwrap_err();
        assert_eq!(e.field, field, "{spec}: {e}");
    }
}

/// A headless Service of one family answers with its pods' addresses of
/// that family only.
#[test]
fn a_single_family_headless_service_answers_its_family() {
    let doc = format!(
        "{DUAL}---\napiVersion: v1\nkind: Service\nmetadata: {{name: hl6, namespace: ns}}\nspec:\n  clusterIP: None\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  selector: {{app: a}}\n  ports: [{{port: 80}}]\n"
    );
    let m = standalone::parse(&doc, "cluster.local").unwrap();
    let mut got = m.addresses_of_host("hl6.ns.svc.cluster.local").unwrap();
    got.sort();
    assert_eq!(got, [ip("fd00::1"), ip("fd00::2")]);
}
