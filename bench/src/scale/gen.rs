//! The generated meshes: N pods, 100 per namespace, one Service per 5 pods,
//! one AuthorizationPolicy per 10 pods, as WDS resources (name + encoded
//! protobuf body, what istiod puts in a delta response) and as the
//! equivalent standalone file.
//!
//! Counts round up (`div_ceil`) so that a tiny mesh (4 pods) still has the
//! Service and the policy its pods refer to; for multiples of 10 that is
//! the same as N/5 and N/10.

use prost::Message;
use xds::pb::istio::security as sec;
use xds::pb::istio::workload as wl;

pub fn services(n: usize) -> usize {
    n.div_ceil(5)
}

pub fn policies(n: usize) -> usize {
    n.div_ceil(10)
}

fn ip(i: usize) -> Vec<u8> {
    vec![10, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8]
}

/// The WDS resource name of pod `i` (what a removal names).
pub fn workload_name(i: usize) -> String {
    let ns = format!("ns-{}", i / 100);
    format!("cluster1//v1/Pod/{ns}/pod-{i}")
}

/// Pod `i`; `generation` changes its canonical revision, so a new
/// generation is an update of the same pod.
pub fn workload(i: usize, generation: u32) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", i / 100);
    let svc = format!("{ns}/svc-{}.{ns}.svc.cluster.local", i / 5);
    let w = wl::Workload {
        uid: workload_name(i),
        name: format!("pod-{i}"),
        namespace: ns.clone(),
        addresses: vec![ip(i)],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: format!("sa-{}", i / 10),
        node: format!("node-{}", i % 50),
        canonical_name: format!("app-{}", i / 5),
        canonical_revision: format!("v{generation}"),
        workload_name: format!("app-{}", i / 5),
        services: [(
            svc,
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        authorization_policies: vec![format!("{ns}/policy-{}", i / 10)],
        ..Default::default()
    };
    let body = wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec();
    (workload_name(i), body)
}

pub fn service(j: usize) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", j * 5 / 100);
    let host = format!("svc-{j}.{ns}.svc.cluster.local");
    let s = wl::Service {
        name: format!("svc-{j}"),
        namespace: ns.clone(),
        hostname: host.clone(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: vec![172, 16 + (j >> 16) as u8, (j >> 8) as u8, j as u8],
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let body = wl::Address {
        r#type: Some(wl::address::Type::Service(s)),
    }
    .encode_to_vec();
    (format!("{ns}/{host}"), body)
}

/// Policy `k`: ALLOW from its own namespace. A `generation` above 0 also
/// allows one more namespace, so it is a real change of the rules.
pub fn policy(k: usize, generation: u32) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", k * 10 / 100);
    let exact = |v: String| sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(v)),
    };
    let mut namespaces = vec![exact(ns.clone())];
    if generation > 0 {
        namespaces.push(exact(format!("extra-{generation}")));
    }
    let p = sec::Authorization {
        name: format!("policy-{k}"),
        namespace: ns.clone(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        groups: vec![sec::Group {
            rules: vec![sec::Rules {
                matches: vec![sec::Match {
                    namespaces,
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    (format!("{ns}/policy-{k}"), p.encode_to_vec())
}

/// The same mesh as a standalone file.
pub fn standalone_yaml(n: usize) -> String {
    use std::fmt::Write;
    let mut y = String::new();
    for ns in 0..n.div_ceil(100) {
        let _ = write!(y, "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n");
    }
    for i in 0..n {
        let [_, b, c, d] = [0, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8];
        let _ = write!(y, "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}}}}}\nspec: {{serviceAccountName: sa-{}, nodeName: node-{}}}\nstatus: {{podIP: 10.{b}.{c}.{d}}}\n", i / 100, i / 5, i / 10, i % 50);
    }
    for j in 0..services(n) {
        let _ = write!(y, "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{j}, namespace: ns-{}}}\nspec: {{clusterIP: 172.{}.{}.{}, selector: {{app: app-{j}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n", j * 5 / 100, 16 + (j >> 16), (j >> 8) & 255, j & 255);
    }
    for k in 0..policies(n) {
        let _ = write!(y, "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{k}, namespace: ns-{}}}\nspec:\n  selector: {{matchLabels: {{app: app-{}}}}}\n  rules: [{{from: [{{source: {{namespaces: [ns-{}]}}}}]}}]\n", k * 10 / 100, k * 2, k * 10 / 100);
    }
    y
}
