//! The in-process rows: the mesh fed straight into `xds::wds::Resources`
//! (no gRPC, no protobuf framing, no second process), and the same mesh
//! parsed as a standalone file; and the per-connection admission decision.

use crate::gen;
use crate::sys::{cpu, rss_mb};
use xds::wds::{Resources, ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// CPU per admission decision (index lookup + evaluation) for a pod whose
/// namespace holds `n` selector policies (none selecting it) and one that
/// does: what each new connection pays for policy.
pub fn decision_ns(n: usize) -> f64 {
    let mut yaml = String::from("apiVersion: v1\nkind: Pod\nmetadata: {name: dst, namespace: busy, labels: {app: dst}}\nspec: {nodeName: n}\nstatus: {podIP: 10.9.0.1}\n");
    for k in 0..n {
        yaml.push_str(&format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{k}, namespace: busy}}\nspec:\n  selector: {{matchLabels: {{app: other-{k}}}}}\n  rules: [{{from: [{{source: {{namespaces: [x]}}}}]}}]\n"));
    }
    let state = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
    let w = state.workload_by_name("busy", "dst").unwrap().clone();
    let id = identity::Identity::new("cluster.local", "busy", "client");
    let c = mesh::authz::Connection {
        src_identity: Some(&id),
        src_ip: "10.9.0.2".parse().unwrap(),
        dst_ip: w.ip,
        dst_port: 80,
        request: None,
    };
    let rounds = 100_000;
    let t = cpu();
    for _ in 0..rounds {
        let d = mesh::authz::evaluate_selected(state.policies_selecting(&w), &c);
        std::hint::black_box(d);
    }
    (cpu() - t).as_secs_f64() * 1e9 / rounds as f64
}

pub struct Row {
    pub pods: usize,
    pub load_ms: f64,
    pub rss_load: f64,
    pub change_ms: f64,
    pub rss_churn: f64,
    pub churn: usize,
    pub file_parse_ms: f64,
}

pub fn measure(n: usize) -> Row {
    let mut res = Resources::default();
    let t = cpu();
    for i in 0..n {
        let (name, body) = gen::workload(i, 1);
        res.upsert(ADDRESS_TYPE, &name, "1", &body).unwrap();
    }
    for j in 0..gen::services(n) {
        let (name, body) = gen::service(j);
        res.upsert(ADDRESS_TYPE, &name, "1", &body).unwrap();
    }
    for k in 0..gen::policies(n) {
        let (name, body) = gen::policy(k, 0);
        res.upsert(AUTHORIZATION_TYPE, &name, "1", &body).unwrap();
    }
    let store = mesh::MeshStore::new(res.build(), "bench");
    let load_ms = (cpu() - t).as_secs_f64() * 1e3;
    let rss_load = rss_mb();

    // One changed workload, as one delta push: upsert, then publish.
    let rounds = 10;
    let t = cpu();
    for r in 0..rounds {
        let (name, body) = gen::workload(r * 7 % n, 2 + r as u32);
        res.upsert(ADDRESS_TYPE, &name, "2", &body).unwrap();
        store.replace(res.build());
    }
    let change_ms = (cpu() - t).as_secs_f64() * 1e3 / rounds as f64;

    // Churn: each event one changed pod, published. (It used to be 100
    // events at 50k, when each event cost a whole build.)
    let churn = 1000;
    for e in 0..churn {
        let (name, body) = gen::workload(e * 13 % n, 100 + e as u32);
        res.upsert(ADDRESS_TYPE, &name, "3", &body).unwrap();
        store.replace(res.build());
    }
    let rss_churn = rss_mb();
    drop(store);
    drop(res);

    // The standalone file of the same size: one change re-parses it whole.
    let yaml = gen::standalone_yaml(n);
    let t = cpu();
    let state = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
    let file_parse_ms = (cpu() - t).as_secs_f64() * 1e3;
    assert_eq!(state.workloads.len(), n);
    Row {
        pods: n,
        load_ms,
        rss_load,
        change_ms,
        rss_churn,
        churn,
        file_parse_ms,
    }
}
