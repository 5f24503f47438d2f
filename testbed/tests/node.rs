//! Two real nodes: on each, containerd and a kubelet start our DaemonSets as
//! the user installs them (`kubectl apply -k manifests/`, our images
//! imported into containerd), and the kubelets start an ambient namespace's
//! pods (client on node1, server on node2) through the CNI config our agent
//! chained our plugin into. Nothing here plays the container runtime.
//!
//! Run under the shared lock with --test-threads=1 (one cluster, fixed
//! ports); needs scripts/peers.sh (kubelet and friends), containerd and runc
//! (scripts/deps.sh) and the binaries scripts/test.sh builds.

use testbed::cluster::node_kit::{
    fetch, holds, jsonpath, logs, pod_of, pod_on, root, served_hbone_only, wait_for, wait_served,
    NodeTestbed, APP, MARKER,
};

/// The node agent's ipset of ambient pod addresses (kubelet probes from
/// the node to them are SNATed).
const PROBE_IPSET: &str = "istio-inpod-probes-v4";

const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allows-someone-else, namespace: app}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/app/sa/someone-else"]}}]}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_runs_our_daemonsets_and_captures_ambient_pods() {
    let Some(tb) = NodeTestbed::start("node").await else {
        return;
    };
    let (cluster, nodes, mesh) = (&tb.cluster, &tb.nodes, &tb.mesh);

    // The user's install command, with the images containerd holds.
    let (ok, out) = cluster.kubectl(&format!("apply -k {}", root().join("manifests").display()));
    assert!(ok, "kubectl apply -k manifests/: {out}");

    // The kubelet starts the agent, which chains our plugin into the
    // node's CNI config (the one containerd reads).
    for node in nodes {
        wait_for(
            cluster,
            nodes,
            &format!("the agent chains istio-cni into {}'s conflist", node.name),
            |_| holds(NodeTestbed::chained(node), String::new),
        )
        .await;
        assert!(node
            .conf_dir
            .parent()
            .unwrap()
            .join("bin/istio-cni")
            .exists());
    }

    // ztunnel's pod is started by the kubelet from our image and passes its
    // readiness probe (istiod's first full sync).
    wait_for(cluster, nodes, "ztunnel DaemonSet ready", |c| {
        let n = jsonpath(c, "ds -n istio-system ztunnel", "{.status.numberReady}");
        holds(n == "2", || n)
    })
    .await;

    // Pods the kubelet starts in an ambient namespace are captured.
    let app = mesh.dir.join("app.yaml");
    std::fs::write(&app, APP).unwrap();
    let (ok, out) = cluster.kubectl(&format!("apply -f {}", app.display()));
    assert!(ok, "{out}");
    for a in ["server", "client"] {
        wait_for(cluster, nodes, &format!("{a} running"), |c| {
            let phase = jsonpath(
                c,
                &format!("pods -n app -l app={a}"),
                "{.items[0].status.phase}",
            );
            holds(phase == "Running", || phase)
        })
        .await;
        let pod = pod_of(cluster, "app", &format!("app={a}"));
        assert_eq!(pod.redirection, "enabled", "{a} not annotated as captured");
        let on = if a == "client" { "node1" } else { "node2" };
        assert_eq!(pod.node, on, "{a} scheduled where its nodeSelector says");
    }

    // Traffic between them crosses the node's pod network as HBONE only.
    let vip = cluster.cluster_ip("app", "server").await;
    let server_ip = jsonpath(
        cluster,
        "pods -n app -l app=server",
        "{.items[0].status.podIP}",
    );
    served_hbone_only(
        cluster,
        nodes,
        "client reaches server through the mesh",
        &mesh.dir.join("first"),
        &vip,
        &server_ip,
    )
    .await;

    // A policy applied with kubectl is enforced: the client is not allowed.
    let policy = mesh.dir.join("deny.yaml");
    std::fs::write(&policy, DENY_CLIENT).unwrap();
    let (ok, out) = cluster.kubectl(&format!("apply -f {}", policy.display()));
    assert!(ok, "{out}");
    wait_for(cluster, nodes, "the policy refuses the client", |c| {
        let (served, out) = fetch(c, &vip);
        holds(!served, || out)
    })
    .await;
    let (ok, out) = cluster.kubectl(&format!("delete -f {}", policy.display()));
    assert!(ok, "{out}");
    wait_served(
        cluster,
        nodes,
        "the client is served again without the policy",
        &vip,
    )
    .await;

    // Deleting a pod releases it: the kubelet's CNI DEL reaches the agent,
    // which tells ztunnel, and ztunnel closes that pod's listeners. The
    // Deployment's replacement is captured and served over HBONE.
    let old = pod_of(cluster, "app", "app=server");
    // Before: the pod's netns has the capture rules and the node's probe
    // ipset has its address.
    let server_node = &nodes[1];
    let old_netns = server_node.pod_netns(&old.ip);
    assert!(!old_netns.is_empty(), "no netns on node2 has {}", old.ip);
    let (_, rules) = server_node.exec(&format!(
        "ip netns exec {old_netns} iptables-nft-save; ip netns exec {old_netns} iptables-legacy-save"
    ));
    assert!(
        rules.contains("ISTIO_PRERT") && rules.contains("ISTIO_OUTPUT"),
        "the server's netns {old_netns} has no capture rules: {rules}"
    );
    let probes =
        |node: &testbed::cluster::RealNode| node.exec(&format!("ipset list {PROBE_IPSET}")).1;
    assert!(
        probes(server_node).lines().any(|l| l.trim() == old.ip),
        "{} not in node2's probe ipset",
        old.ip
    );
    let (ok, out) = cluster.kubectl(&format!("delete pod -n app {}", old.name));
    assert!(ok, "{out}");
    // The server's node's agent and ztunnel.
    let agent = pod_on(cluster, "istio-system", "app=istio-cni", "node2");
    let zt = pod_on(cluster, "istio-system", "app=ztunnel", "node2");
    assert!(
        !agent.name.is_empty() && !zt.name.is_empty(),
        "node2's agent {agent:?} and ztunnel {zt:?}"
    );
    wait_for(cluster, nodes, "the agent takes the CNI DEL", |c| {
        let log = logs(c, &format!("-n istio-system {}", agent.name));
        holds(
            log.lines()
                .any(|l| l.contains("pod deleted") && l.contains(&format!("app/{}", old.name))),
            || log,
        )
    })
    .await;
    wait_for(cluster, nodes, "ztunnel no longer serves the pod", |c| {
        let log = logs(c, &format!("-n istio-system {}", zt.name));
        holds(
            log.lines()
                .any(|l| l.contains("pod removed: listeners closed") && l.contains(&old.uid)),
            || log,
        )
    })
    .await;
    // After: its netns is gone with the rules in it, and its address left
    // the node's ipset.
    wait_for(
        cluster,
        nodes,
        "the old server's netns and probe entry gone",
        |_| {
            let (_, left) = server_node.exec("ls /run/netns");
            let set = probes(server_node);
            holds(
                !left.lines().any(|n| n.trim() == old_netns)
                    && !set.lines().any(|l| l.trim() == old.ip),
                || format!("netns: {left}\nipset: {set}"),
            )
        },
    )
    .await;
    wait_for(cluster, nodes, "the replacement server captured", |c| {
        let new = pod_of(c, "app", "app=server");
        holds(
            new.name != old.name && new.phase == "Running" && new.redirection == "enabled",
            || format!("{new:?}"),
        )
    })
    .await;
    let new = pod_of(cluster, "app", "app=server");
    let replaced = mesh.dir.join("replaced");
    served_hbone_only(
        cluster,
        nodes,
        "the replacement server is served",
        &replaced,
        &vip,
        &new.ip,
    )
    .await;

    // A rollout of the ztunnel DaemonSet (maxSurge 1, maxUnavailable 0):
    // node by node, the new ztunnel is ready before the old one is told to
    // stop, the old one then drains (new connections go to the new one; the
    // ones it holds go on until they end or --drain-timeout, 30s). Checked:
    // a new connection while the first node's old one drains, the held one
    // (through both nodes' old ztunnels) finishing, and the rollout
    // completing.
    let old_zt: Vec<String> = ["node1", "node2"]
        .iter()
        .map(|n| pod_on(cluster, "istio-system", "app=ztunnel", n).name)
        .collect();
    // A request held open through the old ztunnel: connected now, finished
    // when the test writes /gate/go (the client's fresh emptyDir).
    let held = cluster.kubectl_child(&format!(
        "exec -n app deploy/client -- sh -c \"(printf 'GET / HTTP/1.0\\r\\n'; while [ ! -e /gate/go ]; do sleep 1; done; printf '\\r\\n') | nc {vip} 80\""
    ));
    wait_for(
        cluster,
        nodes,
        "the held connection reaches the server",
        |c| {
            let (ok, tcp) =
                c.kubectl("exec -n app deploy/server -- cat /proc/net/tcp /proc/net/tcp6");
            // httpd's port 8080 (1F90; its socket is IPv6), ESTABLISHED (01).
            let up = tcp.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(":1F90") && f[3] == "01"
            });
            holds(ok && up, || tcp)
        },
    )
    .await;
    let (ok, out) = cluster.kubectl("rollout restart daemonset/ztunnel -n istio-system");
    assert!(ok, "{out}");
    wait_for(
        cluster,
        nodes,
        "a new ztunnel ready on a node while its old one drains",
        |c| {
            // name node ready [deletionTimestamp]
            let (_, pods) = c.kubectl(
                "get pods -n istio-system -l app=ztunnel -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.conditions[?(@.type==\"Ready\")].status} {.metadata.deletionTimestamp}{\"\\n\"}{end}'",
            );
            let rows: Vec<Vec<&str>> = pods.lines().map(|l| l.split_whitespace().collect()).collect();
            let rolling = rows.iter().any(|old| {
                old.len() == 4
                    && old_zt.iter().any(|n| n == old[0])
                    && rows.iter().any(|new| {
                        new.len() == 3
                            && !old_zt.iter().any(|n| n == new[0])
                            && new[1] == old[1]
                            && new[2] == "True"
                    })
            });
            holds(rolling, || pods)
        },
    )
    .await;
    // New connections: the new ztunnel serves them.
    let (served, out) = fetch(cluster, &vip);
    assert!(served, "a new connection during the drain: {out}");
    // The held one goes on through the draining ztunnel.
    let (ok, out) = cluster.kubectl("exec -n app deploy/client -- sh -c 'echo > /gate/go'");
    assert!(ok, "{out}");
    let held = held.wait_with_output().unwrap();
    let page = String::from_utf8_lossy(&held.stdout);
    assert!(
        held.status.success() && page.contains(MARKER),
        "the connection held across the rollout: {page}{}",
        String::from_utf8_lossy(&held.stderr)
    );
    let (ok, out) =
        cluster.kubectl("rollout status daemonset/ztunnel -n istio-system --timeout=120s");
    assert!(ok, "{out}");
    let (served, out) = fetch(cluster, &vip);
    assert!(served, "after the rollout: {out}");

    // Removing the namespace's label releases its running pods: the agent
    // takes its capture annotation back, and they still talk (now directly).
    let (ok, out) = cluster.kubectl("label namespace app istio.io/dataplane-mode-");
    assert!(ok, "{out}");
    for a in ["server", "client"] {
        wait_for(cluster, nodes, &format!("{a} released"), |c| {
            let annotation = jsonpath(
                c,
                &format!("pods -n app -l app={a}"),
                "{.items[0].metadata.annotations.ambient\\.istio\\.io/redirection}",
            );
            holds(annotation.is_empty(), || annotation)
        })
        .await;
    }
    wait_for(cluster, nodes, "the released client is served", |c| {
        let (served, out) = fetch(c, &vip);
        holds(served, || out)
    })
    .await;
}
