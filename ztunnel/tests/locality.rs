//! End-to-end locality: three nodes in two zones (node1, node2 in zone a;
//! node3 in zone b), real ztunnels reading one standalone file. A client on
//! node1 reaches services whose endpoints run on every node; where each
//! connection lands is told by a whoami server.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

/// The mesh; `unready` pods carry `Ready: False`.
fn yaml(unready: &[&str]) -> String {
    let node = |name: &str, zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: {zone}}}}}\n---\n"
        )
    };
    let pod = |name: &str, app: &str, node: &str, ip: &str| {
        let ready = if unready.contains(&name) {
            "False"
        } else {
            "True"
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {{app: {app}}}}}\n\
             spec: {{serviceAccountName: {app}, nodeName: {node}}}\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n---\n"
        )
    };
    let service = |name: &str, vip: &str, target: u16, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{port: 80, targetPort: {target}}}]{extra}}}\n---\n"
        )
    };
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}\n---\n".to_string(),
        node("node1", "za"),
        node("node2", "za"),
        node("node3", "zb"),
        pod("client", "client", "node1", "10.244.1.10"),
        pod("near-1", "server", "node1", "10.244.1.11"),
        pod("near-2", "server", "node2", "10.244.2.11"),
        pod("far", "server", "node3", "10.244.3.11"),
        service("close", "10.96.0.10", 8080, ", trafficDistribution: PreferClose"),
        service("local", "10.96.0.11", 8080, ", internalTrafficPolicy: Local"),
        // Istio's annotation says the same as the field.
        "apiVersion: v1\nkind: Service\nmetadata: {name: refusing, namespace: app, annotations: {networking.istio.io/traffic-distribution: PreferClose}}\n\
         spec: {clusterIP: 10.96.0.12, selector: {app: server}, ports: [{port: 80, targetPort: 9090}]}\n"
            .to_string(),
    ]
    .concat()
}

/// Where `n` connections to `addr` landed (pod names), or the first error.
fn landings(m: &Mesh, addr: &str, n: usize) -> std::io::Result<Vec<String>> {
    (0..n)
        .map(|_| {
            let line = m.whoami("client", addr)?;
            Ok(line.split(' ').next().unwrap_or_default().to_string())
        })
        .collect()
}

fn set(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits (bounded) until a connection to `addr` lands on one of `on`:
/// the file is re-read every half second.
fn until_lands(m: &Mesh, addr: &str, on: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(l) = landings(m, addr, 1) {
            if on.contains(&l[0].as_str()) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{addr} never reached {on:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(m: &Mesh, node: &str, name: &str) -> f64 {
    m.metrics(node)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closest_zone_first_failover_and_strict() {
    let mut m = Mesh::new("loc", ZT);
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("near-1", "app", "server", "10.244.1.11", "node1", true);
    m.pod("near-2", "app", "server", "10.244.2.11", "node2", true);
    m.pod("far", "app", "server", "10.244.3.11", "node3", true);
    m.write_config(&yaml(&[]));
    let ca = m.dir.join("ca");
    for n in ["node1", "node2", "node3"] {
        m.start_node(n, &ca).await;
    }
    for p in ["near-1", "near-2", "far"] {
        m.whoami_server(p, 8080);
    }
    // near-2 refuses 9090: nothing listens there.
    m.whoami_server("near-1", 9090);
    m.whoami_server("far", 9090);

    // PreferClose: every connection stays in zone a while it has a ready
    // endpoint, spread over both of its endpoints (two nodes).
    let got = landings(&m, "10.96.0.10:80", 40).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["near-1", "near-2"]), "{got:?}");

    // An endpoint that refuses is skipped before the client sees an
    // error: the other one of the zone serves, never the far zone.
    let before = metric(&m, "node1", "ztunnel_connect_retries_total");
    let got = landings(&m, "10.96.0.12:80", 30).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["near-1"]), "{got:?}");
    // 30 tries, each picking near-2 first half the time: some did.
    assert!(metric(&m, "node1", "ztunnel_connect_retries_total") > before);
    assert!(m.log("node1").contains("endpoint failed; trying another"));

    // internalTrafficPolicy Local (STRICT, node): this node only.
    let got = landings(&m, "10.96.0.11:80", 20).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["near-1"]), "{got:?}");

    // Zone a no longer ready: PreferClose fails over to zone b...
    m.write_config(&yaml(&["near-1", "near-2"]));
    until_lands(&m, "10.96.0.10:80", &["far"]);
    let got = landings(&m, "10.96.0.10:80", 20).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["far"]), "{got:?}");
    // ...STRICT never leaves: the client's connection fails.
    assert!(landings(&m, "10.96.0.11:80", 1).is_err());
    assert!(m
        .log("node1")
        .contains("has no endpoint for port 80 close enough (STRICT)"));
    // With one refusing endpoint left in the zone, the retry crosses to
    // the next tier.
    m.write_config(&yaml(&["near-1"]));
    until_lands(&m, "10.96.0.10:80", &["near-2"]);
    let got = landings(&m, "10.96.0.12:80", 10).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["far"]), "{got:?}");

    // Back in zone a once it is ready again.
    m.write_config(&yaml(&[]));
    until_lands(&m, "10.96.0.11:80", &["near-1"]);
    let got = landings(&m, "10.96.0.10:80", 30).unwrap();
    assert_eq!(set(&got), BTreeSet::from(["near-1", "near-2"]), "{got:?}");

    // The dump says where each workload runs and how each service balances.
    let dump = m.config_dump("node1");
    let far = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "far")
        .unwrap();
    assert_eq!(far["locality"]["zone"], "zb");
    let local = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "local")
        .unwrap();
    assert_eq!(local["loadBalancer"]["mode"], "Strict");
    assert_eq!(local["loadBalancer"]["routingPreferences"][0], "Node");
}
