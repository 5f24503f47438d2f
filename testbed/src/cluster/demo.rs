//! The cluster scenario's app (client, intruder and server in namespace
//! `demo` on node1, behind Service `server`; the server a Deployment `web`'s pod), shared by the tests that run
//! ztunnel against the real control plane in different ways.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{eventually, Cluster};
use crate::Mesh;

/// The pods of `Cluster::demo_app`: (name, ip), all on node1 in `demo`.
pub const DEMO_PODS: [(&str, &str); 3] = [
    ("client", "10.244.1.10"),
    ("intruder", "10.244.1.12"),
    ("server", "10.244.1.11"),
];

/// An ALLOW policy admitting only service account `sa` of `demo` to the
/// demo app's server.
pub fn allow_only(sa: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: [cluster.local/ns/demo/sa/{sa}]}}
"
    )
}

/// The demo app serves over HBONE through node1's ztunnel: the server
/// answers at `target` (the Service), client and intruder both get in with
/// their own addresses kept (no policy yet), and the connection is counted
/// as mutual TLS with the client's identity.
pub async fn demo_serves_over_hbone(m: &Mesh, target: &str) {
    m.whoami_server("server", 8080);
    eventually(
        "client reaches the service through istiod's config",
        Duration::from_secs(30),
        || m.whoami("client", target).ok().as_deref() == Some("server 10.244.1.10"),
    )
    .await;
    assert_eq!(m.whoami("intruder", target).unwrap(), "server 10.244.1.12");
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")),
        "mTLS connection not reported:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"web\"")
                && l.contains("source_workload=\"client\"")
                && l.contains("destination_cluster=\"Kubernetes\"")),
        "the server's connections are not reported under its Deployment:\n{metrics}"
    );
}

impl Cluster {
    /// The cluster scenario's app, in the API: namespace `demo` (ambient),
    /// pods client, intruder and server of `DEMO_PODS` on node1 (each its
    /// own service account, label `app=<name>`, marked captured) and Service
    /// `server` (80 to 8080). Returns the Service's `<vip>:80`. The pods'
    /// netns are the test's to make (`Mesh::pod` with `DEMO_PODS`).
    pub async fn demo_app(&self) -> String {
        self.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n").await;
        for (name, ip) in DEMO_PODS {
            let mut labels = BTreeMap::from([("app".to_string(), name.to_string())]);
            if name == "server" {
                labels.insert("pod-template-hash".into(), "5d9c7b".into());
            }
            self.pod("demo", name, name, "node1", Some(ip), &labels)
                .await;
            self.mark_captured("demo", name).await;
        }
        // The server is a Deployment's pod: telemetry must name the workload
        // istiod derives from its ReplicaSet (`web`), not the pod. istiod
        // reads the owner only of pods with a generated name.
        self.merge(
            "v1",
            "Pod",
            "demo",
            "server",
            serde_json::json!({"metadata": {"generateName": "web-5d9c7b-", "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c7b",
                "uid": "00000000-0000-0000-0000-00000000feed", "controller": true,
            }]}}),
        )
        .await;
        self.apply("apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec:\n  selector: {app: server}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n").await;
        format!("{}:80", self.cluster_ip("demo", "server").await)
    }
}
