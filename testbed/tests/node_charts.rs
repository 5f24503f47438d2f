//! Istio's own charts on real nodes: `helm template` of the pinned istio
//! module's `cni` and `ztunnel` charts, with only our images set through
//! chart values, applied with kubectl to two real kubelets (containerd, our
//! images imported). The charts' agent is not on the host network: it runs
//! in a pod netns and enters the node's through the host's /proc
//! (`ALLOW_SWITCH_TO_HOST_NS`), unlike our manifests' agent.
//!
//! Run under the shared lock with --test-threads=1, like tests/node.rs.

use testbed::cluster::node_kit::{
    fetch_path, holds, jsonpath, pod_of, root, served_hbone_only, wait_for, NodeTestbed, APP,
    MARKER,
};
use testbed::helm;

const CNI_IMAGE: &str = "ghcr.io/ambient-rs/istio-cni:0.1.0";
const ZTUNNEL_IMAGE: &str = "ghcr.io/ambient-rs/ztunnel:0.1.0";

/// An L7 rule only a waypoint can enforce (ztunnel sees no paths).
const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-no-admin, namespace: app}
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

/// The HTTP status of a response (`HTTP/1.x <code> ...`), or "".
fn status(response: &str) -> &str {
    response
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn istios_charts_run_our_images_on_real_nodes() {
    let (Some(cni), Some(ztunnel), Some(_)) = (
        helm::istio_chart("istio-cni"),
        helm::istio_chart("ztunnel"),
        helm::helm_bin(),
    ) else {
        return;
    };
    let Some(tb) = NodeTestbed::start("ncharts").await else {
        return;
    };
    let (cluster, nodes, mesh) = (&tb.cluster, &tb.nodes, &tb.mesh);

    // The user's install: Istio's charts, our images.
    let cni = helm::template_yaml(
        &cni,
        "istio-cni",
        "istio-system",
        &[("profile", "ambient"), ("image", CNI_IMAGE)],
    )
    .expect("helm template istio-cni");
    let ztunnel = helm::template_yaml(
        &ztunnel,
        "ztunnel",
        "istio-system",
        &[("image", ZTUNNEL_IMAGE)],
    )
    .expect("helm template ztunnel");
    assert!(cni.contains(CNI_IMAGE) && ztunnel.contains(ZTUNNEL_IMAGE));
    tb.apply("istio-cni.yaml", &cni);
    tb.apply("ztunnel.yaml", &ztunnel);

    for node in nodes {
        wait_for(
            cluster,
            nodes,
            &format!(
                "the chart's agent chains istio-cni into {}'s conflist",
                node.name
            ),
            |_| holds(NodeTestbed::chained(node), String::new),
        )
        .await;
    }
    for ds in ["istio-cni-node", "ztunnel"] {
        wait_for(cluster, nodes, &format!("{ds} ready on both nodes"), |c| {
            let n = jsonpath(
                c,
                &format!("ds -n istio-system {ds}"),
                "{.status.numberReady}",
            );
            holds(n == "2", || n)
        })
        .await;
    }
    // The chart's agent has a pod address, not its node's.
    let agent = pod_of(cluster, "istio-system", "k8s-app=istio-cni-node");
    assert!(
        agent.ip.starts_with("10.244."),
        "the chart's agent is on the pod network: {agent:?}"
    );

    // An ambient namespace's pods are captured when the kubelet starts them,
    // and talk across the nodes over HBONE only.
    tb.apply("app.yaml", APP);
    for a in ["server", "client"] {
        wait_for(cluster, nodes, &format!("{a} running and captured"), |c| {
            let pod = pod_of(c, "app", &format!("app={a}"));
            holds(
                pod.phase == "Running" && pod.redirection == "enabled",
                || format!("{pod:?}"),
            )
        })
        .await;
    }
    let vip = cluster.cluster_ip("app", "server").await;
    let server = pod_of(cluster, "app", "app=server");
    assert_eq!(server.node, "node2");
    served_hbone_only(
        cluster,
        nodes,
        "client reaches server through the mesh",
        &mesh.dir.join("pcap"),
        &vip,
        &server.ip,
    )
    .await;
    // Our waypoint, installed as the user does (its ClusterRole, then
    // manifests/waypoint through the example overlay, set to this
    // namespace), enforces an L7 policy:
    // the namespace's Service traffic goes through it once labelled.
    let overlay = mesh.dir.join("waypoint-overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let example = std::fs::read_to_string(
        root().join("manifests/examples/waypoint-overlay/kustomization.yaml"),
    )
    .unwrap();
    assert!(example.contains("namespace: demo") && example.contains("../../waypoint"));
    // kustomize takes relative resource paths only: from the overlay up to
    // `/`, then down to the repository's base.
    let up = "../".repeat(overlay.components().count() - 1);
    let base = root().join("manifests/waypoint");
    let kustomization = example
        .replace("namespace: demo", "namespace: app")
        .replace(
            "../../waypoint",
            &format!("{up}{}", base.strip_prefix("/").unwrap().display()),
        );
    std::fs::write(overlay.join("kustomization.yaml"), kustomization).unwrap();
    let reader = root().join("manifests/base/waypoint-reader.yaml");
    let (ok, out) = cluster.kubectl(&format!("apply -f {}", reader.display()));
    assert!(
        ok,
        "kubectl apply -f manifests/base/waypoint-reader.yaml: {out}"
    );
    let (ok, out) = cluster.kubectl(&format!("apply -k {}", overlay.display()));
    assert!(ok, "kubectl apply -k the waypoint overlay: {out}");
    wait_for(cluster, nodes, "both waypoint replicas ready", |c| {
        let n = jsonpath(c, "deploy -n app waypoint", "{.status.readyReplicas}");
        holds(n == "2", || n)
    })
    .await;
    let (ok, out) = cluster.kubectl("label namespace app istio.io/use-waypoint=waypoint");
    assert!(ok, "{out}");
    tb.apply("deny-admin.yaml", DENY_ADMIN);
    wait_for(cluster, nodes, "the waypoint refuses /admin", |c| {
        let (_, out) = fetch_path(c, &vip, "/admin");
        holds(status(&out) == "403", || out)
    })
    .await;
    // (httpd itself answers /admin with 404.) What the policy does not
    // cover is still served through the waypoint.
    let (_, out) = fetch_path(cluster, &vip, "/");
    assert!(out.contains(MARKER), "/ through the waypoint: {out}");
}
