//! Config scale: how the mesh state copes with cluster-sized meshes, through
//! the WDS source (`xds::Resources`, as istiod's pushes arrive) and through
//! the standalone file (`mesh::standalone::parse`). Meshes of N pods: 100 per
//! namespace, one Service per 5 pods, one AuthorizationPolicy per 10 pods.
//!
//! Measures, in process CPU time: a full load; one changed workload (upsert
//! plus publishing a new state); RSS after load and after churn. Prints a
//! table, and JSON with `--json`.
//!
//!     cargo run --release -p bench --bin scale-bench -- 1000 10000 50000

use std::time::Duration;

use prost::Message;
use xds::pb::istio::security as sec;
use xds::pb::istio::workload as wl;
use xds::wds::{Resources, ADDRESS_TYPE, AUTHORIZATION_TYPE};

fn cpu() -> Duration {
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(ru.user_time()) + tv(ru.system_time())
}

fn rss_mb() -> f64 {
    testbed::proc_status_kb(std::process::id(), "VmRSS").unwrap_or(0) as f64 / 1024.0
}

fn ip(i: usize) -> Vec<u8> {
    vec![10, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8]
}

fn workload(i: usize, generation: u32) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", i / 100);
    let svc = format!("{ns}/svc-{}.{ns}.svc.cluster.local", i / 5);
    let w = wl::Workload {
        uid: format!("cluster1//v1/Pod/{ns}/pod-{i}"),
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
    let name = format!("cluster1//v1/Pod/{ns}/pod-{i}");
    let body = wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec();
    (name, body)
}

fn service(j: usize) -> (String, Vec<u8>) {
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

fn policy(k: usize) -> (String, Vec<u8>) {
    let ns = format!("ns-{}", k * 10 / 100);
    let p = sec::Authorization {
        name: format!("policy-{k}"),
        namespace: ns.clone(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        groups: vec![sec::Group {
            rules: vec![sec::Rules {
                matches: vec![sec::Match {
                    namespaces: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(ns.clone())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    (format!("{ns}/policy-{k}"), p.encode_to_vec())
}

/// CPU per admission decision (index lookup + evaluation) for a pod whose
/// namespace holds `n` selector policies (none selecting it) and one that
/// does: what each new connection pays for policy.
fn decision_ns(n: usize) -> f64 {
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

struct Row {
    pods: usize,
    load_ms: f64,
    rss_load: f64,
    change_ms: f64,
    rss_churn: f64,
    churn: usize,
    file_parse_ms: f64,
}

fn measure(n: usize) -> Row {
    let mut res = Resources::default();
    let t = cpu();
    for i in 0..n {
        let (name, body) = workload(i, 1);
        res.upsert(ADDRESS_TYPE, &name, "1", &body).unwrap();
    }
    for j in 0..n / 5 {
        let (name, body) = service(j);
        res.upsert(ADDRESS_TYPE, &name, "1", &body).unwrap();
    }
    for k in 0..n / 10 {
        let (name, body) = policy(k);
        res.upsert(AUTHORIZATION_TYPE, &name, "1", &body).unwrap();
    }
    let store = mesh::MeshStore::new(res.build(), "bench");
    let load_ms = (cpu() - t).as_secs_f64() * 1e3;
    let rss_load = rss_mb();

    // One changed workload, as one delta push: upsert, then publish.
    let rounds = 10;
    let t = cpu();
    for r in 0..rounds {
        let (name, body) = workload(r * 7 % n, 2 + r as u32);
        res.upsert(ADDRESS_TYPE, &name, "2", &body).unwrap();
        store.replace(res.build());
    }
    let change_ms = (cpu() - t).as_secs_f64() * 1e3 / rounds as f64;

    // Churn: each event one changed pod, published (fewer at 50k: each
    // event costs a whole build today).
    let churn = if n > 20_000 { 100 } else { 1000 };
    for e in 0..churn {
        let (name, body) = workload(e * 13 % n, 100 + e as u32);
        res.upsert(ADDRESS_TYPE, &name, "3", &body).unwrap();
        store.replace(res.build());
    }
    let rss_churn = rss_mb();
    drop(store);
    drop(res);

    // The standalone file of the same size: one change re-parses it whole.
    let yaml = standalone_yaml(n);
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

fn standalone_yaml(n: usize) -> String {
    use std::fmt::Write;
    let mut y = String::new();
    for ns in 0..n.div_ceil(100) {
        let _ = write!(y, "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n");
    }
    for i in 0..n {
        let [_, b, c, d] = [0, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8];
        let _ = write!(y, "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}}}}}\nspec: {{serviceAccountName: sa-{}, nodeName: node-{}}}\nstatus: {{podIP: 10.{b}.{c}.{d}}}\n", i / 100, i / 5, i / 10, i % 50);
    }
    for j in 0..n / 5 {
        let _ = write!(y, "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{j}, namespace: ns-{}}}\nspec: {{clusterIP: 172.{}.{}.{}, selector: {{app: app-{j}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n", j * 5 / 100, 16 + (j >> 16), (j >> 8) & 255, j & 255);
    }
    for k in 0..n / 10 {
        let _ = write!(y, "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{k}, namespace: ns-{}}}\nspec:\n  selector: {{matchLabels: {{app: app-{}}}}}\n  rules: [{{from: [{{source: {{namespaces: [ns-{}]}}}}]}}]\n", k * 10 / 100, k * 2, k * 10 / 100);
    }
    y
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let mut rows = Vec::new();
    println!("| pods | WDS full load (CPU ms) | RSS after load (MB) | one changed pod, upsert + publish (CPU ms) | RSS after churn (MB) | churn events | file parse, whole (CPU ms) |");
    println!("|---|---|---|---|---|---|---|");
    for n in sizes {
        // Each size in a fresh process would be cleaner for RSS; sizes run
        // in increasing order, so the allocator's high-water mark from a
        // smaller run is below the next one's.
        let r = measure(n);
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.1} | {} | {:.0} |",
            r.pods, r.load_ms, r.rss_load, r.change_ms, r.rss_churn, r.churn, r.file_parse_ms
        );
        rows.push(serde_json::json!({
            "pods": r.pods, "wds_load_cpu_ms": r.load_ms, "rss_after_load_mb": r.rss_load,
            "one_change_cpu_ms": r.change_ms, "rss_after_churn_mb": r.rss_churn,
            "churn_events": r.churn, "file_parse_cpu_ms": r.file_parse_ms,
        }));
    }
    let (empty, busy) = (decision_ns(0), decision_ns(1_500));
    println!();
    println!("| admission decision (CPU ns) | empty namespace | 1,500 policies in the namespace |");
    println!("|---|---|---|");
    println!("| per new connection | {empty:.0} | {busy:.0} |");
    if json {
        rows.push(
            serde_json::json!({"decision_ns_empty": empty, "decision_ns_1500_policies": busy}),
        );
        println!("{}", serde_json::to_string_pretty(&rows).unwrap());
    }
}
