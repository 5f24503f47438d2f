//! Istio's own charts on real nodes: `helm template` of the pinned istio
//! module's `cni` and `ztunnel` charts, with only our images set through
//! chart values, applied with kubectl to two real kubelets (containerd, our
//! images imported). The charts' agent is not on the host network: it runs
//! in a pod netns and enters the node's through the host's /proc
//! (`ALLOW_SWITCH_TO_HOST_NS`), unlike our manifests' agent.
//!
//! Run under the shared lock with --test-threads=1, like tests/node.rs.

use testbed::cluster::node_kit::{
    fetch, hbone_only, holds, jsonpath, pod_of, wait_for, NodeTestbed, APP,
};
use testbed::helm;

const CNI_IMAGE: &str = "ghcr.io/ambient-rs/istio-cni:0.1.0";
const ZTUNNEL_IMAGE: &str = "ghcr.io/ambient-rs/ztunnel:0.1.0";

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
    wait_for(
        cluster,
        nodes,
        "client reaches server through the mesh",
        |c| {
            let (served, out) = fetch(c, &vip);
            holds(served, || out)
        },
    )
    .await;
    hbone_only(
        cluster,
        &nodes[0],
        &nodes[1],
        &mesh.dir.join("pcap"),
        &vip,
        &server.ip,
    );
}
