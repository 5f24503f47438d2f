//! Locality through a real istiod: the zones are labels on the Node objects
//! of the Kubernetes API, the preference is the Service's
//! `trafficDistribution`; istiod turns them into WDS locality and
//! load_balancing, and ztunnel keeps a client's connections in its zone
//! while an endpoint there is ready.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

/// Where one connection from the client to `addr` landed.
fn landed(m: &Mesh, addr: &str) -> Option<String> {
    let line = m.whoami("client", addr).ok()?;
    Some(line.split(' ').next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_locality_keeps_traffic_in_the_zone() {
    let mut m = Mesh::new("cloc", ZT);
    m.pod("client", "demo", "client", "10.244.1.10", "node1", true);
    m.pod("near", "demo", "server", "10.244.1.11", "node1", true);
    m.pod("far", "demo", "server", "10.244.2.11", "node2", true);
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    for (node, zone) in [("node1", "za"), ("node2", "zb")] {
        c.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: {zone}}}}}\n"
        ))
        .await;
    }
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n").await;
    for (name, app, ip, node) in [
        ("client", "client", "10.244.1.10", "node1"),
        ("near", "server", "10.244.1.11", "node1"),
        ("far", "server", "10.244.2.11", "node2"),
    ] {
        let labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        c.pod("demo", name, app, node, Some(ip), &labels).await;
        c.mark_captured("demo", name).await;
    }
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec:\n  selector: {app: server}\n  trafficDistribution: PreferClose\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n").await;
    let target = format!("{}:80", c.cluster_ip("demo", "server").await);
    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    c.attach_node(&mut m, "node2", "10.244.250.2").await;
    let dir = m.dir.clone();
    m.start_node("node1", &dir).await;
    m.start_node("node2", &dir).await;
    m.whoami_server("near", 8080);
    m.whoami_server("far", 8080);

    // istiod's WDS says where each runs and how the service balances.
    eventually(
        "istiod sends the service's load balancing and the far endpoint's zone",
        Duration::from_secs(30),
        || {
            let dump = m.config_dump("node1");
            let zone = dump["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["name"] == "far")
                .map(|w| w["locality"]["zone"].clone());
            let mode = dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == "server")
                .map(|s| s["loadBalancer"]["mode"].clone());
            zone == Some("zb".into()) && mode == Some("Failover".into())
        },
    )
    .await;
    eventually(
        "the client reaches the zone's endpoint",
        Duration::from_secs(30),
        || landed(&m, &target).as_deref() == Some("near"),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(landed(&m, &target).as_deref(), Some("near"));
    }

    // The zone's endpoint is no longer ready: over to the other zone...
    c.pod_not_ready("demo", "near").await;
    eventually(
        "an unready zone fails over to the other",
        Duration::from_secs(30),
        || landed(&m, &target).as_deref() == Some("far"),
    )
    .await;
    for _ in 0..10 {
        assert_eq!(landed(&m, &target).as_deref(), Some("far"));
    }
    // ...and back once it is ready again.
    c.pod_ready("demo", "near", "10.244.1.11").await;
    eventually(
        "the ready zone takes its traffic back",
        Duration::from_secs(30),
        || landed(&m, &target).as_deref() == Some("near"),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(landed(&m, &target).as_deref(), Some("near"));
    }
}
