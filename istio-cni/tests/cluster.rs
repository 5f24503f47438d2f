//! The node agent deciding capture from a real kube-apiserver (built from its
//! Go module by scripts/peers.sh): labelling a namespace through the API
//! captures its pods, unlabelling releases them, and a pod of an ambient
//! namespace is captured at its CNI ADD, before the kubelet reports its IP.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::*;

const AGENT: &str = env!("CARGO_BIN_EXE_istio-cni-agent");

/// ztunnel's own view (standalone): it needs the pods' identities, while
/// capture is decided by the agent from the API alone.
const ZTUNNEL_VIEW: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app}
spec: {serviceAccountName: a, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: plain}
spec: {serviceAccountName: c, nodeName: node1}
status: {podIP: 10.244.1.20}
";

fn traces(m: &Mesh, pod: &str) -> String {
    let (_, out) = sh_out(&format!("ip netns exec {} iptables-save", m.pod_ns(pod)));
    out.lines()
        .filter(|l| l.contains("ISTIO"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn served(m: &Mesh) -> Vec<String> {
    m.config_dump("node1")["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn annotated(c: &Cluster, ns: &str, pod: &str) -> Option<String> {
    let (c, ns, pod) = (c.client.clone(), ns.to_string(), pod.to_string());
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, &ns);
    let p =
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(api.get(&pod)))
            .ok()?;
    p.metadata
        .annotations?
        .get("ambient.istio.io/redirection")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_label_through_the_api_captures_and_releases() {
    let mut m = Mesh::new("kcn", &workspace_bin("ztunnel"));
    m.write_config(ZTUNNEL_VIEW);
    m.cni_node("node1", 1);
    let c = Cluster::start(&m).await;
    c.reach_from_cni_node(&m, "node1");
    m.kubeconfig = Some(c.kubeconfig.clone());

    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n").await;
    let none = BTreeMap::new();
    // Scheduled, not yet networked: what the API says at CNI ADD time.
    c.pod("app", "a", "a", "node1", None, &none).await;
    c.pod("plain", "c", "c", "node1", None, &none).await;

    m.start_cni_agent("node1", AGENT, &static_plugin(), &[]);
    let ca = m.dir.join("ca");
    m.start_ztunnel("node1", &ca);

    m.cni_pod("node1", "a", "app", "a", "10.244.1.10")
        .expect("ADD of an ambient pod");
    c.pod_ready("app", "a", "10.244.1.10").await;
    assert!(
        traces(&m, "a").contains("REDIRECT --to-ports 15001"),
        "a not captured at ADD"
    );
    // istiod only routes HBONE to pods the agent marked as captured.
    eventually("a annotated as captured", Duration::from_secs(20), || {
        annotated(&c, "app", "a") == Some("enabled".into())
    })
    .await;
    m.cni_pod("node1", "c", "plain", "c", "10.244.1.20")
        .expect("ADD of a plain pod");
    c.pod_ready("plain", "c", "10.244.1.20").await;
    assert_eq!(
        traces(&m, "c"),
        "",
        "a pod of an unlabelled namespace got rules"
    );
    eventually("ztunnel serves a", Duration::from_secs(20), || {
        served(&m) == ["a"]
    })
    .await;

    // Label through the API: c is captured, no restart, and talks mTLS.
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}\n").await;
    let took = eventually(
        "c captured after labelling",
        Duration::from_secs(20),
        || traces(&m, "c").contains("REDIRECT --to-ports 15001"),
    )
    .await;
    eprintln!("namespace label to capture: {took:?}");
    eventually("ztunnel serves c", Duration::from_secs(20), || {
        served(&m).contains(&"c".to_string())
    })
    .await;
    m.whoami_server("a", 9090);
    assert_eq!(m.whoami("c", "10.244.1.10:9090").unwrap(), "a 10.244.1.20");
    assert!(m
        .metrics("node1")
        .lines()
        .any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("source_workload=\"c\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")));

    // A pod label opts one pod out even in an ambient namespace.
    c.merge(
        "v1",
        "Pod",
        "app",
        "a",
        serde_json::json!({"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}}),
    )
    .await;
    eventually(
        "a released by its opt-out label",
        Duration::from_secs(20),
        || traces(&m, "a").is_empty(),
    )
    .await;
    eventually(
        "a's capture annotation removed",
        Duration::from_secs(20),
        || annotated(&c, "app", "a").is_none(),
    )
    .await;

    // Unlabel through the API: rules gone, ztunnel lets go.
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: plain, labels: {istio.io/dataplane-mode: none}}\n").await;
    eventually(
        "c released after unlabelling",
        Duration::from_secs(20),
        || traces(&m, "c").is_empty(),
    )
    .await;
    eventually("ztunnel drops c", Duration::from_secs(20), || {
        served(&m).is_empty()
    })
    .await;
    let log = m.agent_log("node1");
    assert!(log.contains("cluster view complete"), "{log}");
    // The API goes straight into the agent's state: no rendered mesh file in
    // its state dir, only its records and the plugin's small answer.
    let mut files: Vec<String> = std::fs::read_dir(m.dir.join("node1/state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["membership.json", "pods.json"], "{log}");
}
