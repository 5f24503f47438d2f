//! A real node: containerd and a kubelet start our DaemonSets as the user
//! installs them (`kubectl apply -k manifests/`, our images imported into
//! containerd), and the kubelet starts an ambient namespace's pods through
//! the CNI config our agent chained our plugin into. Nothing here plays the
//! container runtime.
//!
//! Run under the shared lock with --test-threads=1 (one cluster, fixed
//! ports); needs scripts/peers.sh (kubelet and friends), containerd and runc
//! (scripts/deps.sh) and the binaries scripts/test.sh builds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testbed::cluster::{ClusterDns, RealNode, CONTROL_IP};
use testbed::{Cluster, Mesh};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The node's peers, or `None` (skip) when they are missing and
/// `MESH_PEERS_OPTIONAL=1` says a machine without them is expected.
fn peers() -> Option<()> {
    let dir = std::env::var("MESH_PEERS_DIR").unwrap_or_else(|_| "/var/cache/mesh-peers".into());
    let mut missing: Vec<String> = [
        "kubelet",
        "kube-proxy",
        "kube-scheduler",
        "kube-controller-manager",
        "kubectl",
        "kube-apiserver",
        "etcd",
    ]
    .iter()
    .map(|b| Path::new(&dir).join("bin").join(b))
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    for tool in ["containerd", "runc", "ctr"] {
        if !testbed::sh_out(&format!("command -v {tool}")).0 {
            missing.push(tool.into());
        }
    }
    if missing.is_empty() {
        return Some(());
    }
    let optional = std::env::var("MESH_PEERS_OPTIONAL").is_ok_and(|v| v == "1");
    assert!(
        optional,
        "{missing:?} missing: scripts/peers.sh and scripts/deps.sh install them (or set MESH_PEERS_OPTIONAL=1 to skip)"
    );
    eprintln!("SKIP: {missing:?} missing and MESH_PEERS_OPTIONAL=1");
    None
}

/// Our images, built from this test's own profile by scripts/images.sh.
fn images(out: &Path) -> Vec<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let musl = profile
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-musl")
        .join(profile.file_name().unwrap());
    for b in [
        profile.join("ztunnel"),
        profile.join("istio-cni-agent"),
        musl.join("istio-cni"),
    ] {
        assert!(
            b.exists(),
            "{} not built (scripts/test.sh builds it)",
            b.display()
        );
    }
    testbed::sh(&format!(
        "{} {} {} {}",
        root().join("scripts/images.sh").display(),
        out.display(),
        profile.display(),
        musl.display()
    ));
    ["pause", "ztunnel", "istio-cni", "app"]
        .iter()
        .map(|i| out.join(format!("{i}.tar")))
        .collect()
}

fn jsonpath(c: &Cluster, what: &str, path: &str) -> String {
    let (ok, out) = c.kubectl(&format!("get {what} -o jsonpath='{path}'"));
    if ok {
        out.trim().to_string()
    } else {
        String::new()
    }
}

fn holds(ok: bool, seen: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(seen())
    }
}

/// Polls `f` (Err: what it saw instead) until it holds or 180s pass.
async fn wait_for(
    c: &Cluster,
    nodes: &[RealNode],
    what: &str,
    f: impl Fn(&Cluster) -> Result<(), String>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while let Err(last) = f(c) {
        if std::time::Instant::now() >= deadline {
            let mut seen = String::new();
            for n in nodes {
                seen += &format!(
                    "\n{} kubelet:\n{}\n{} containers:\n{}",
                    n.name,
                    n.log("kubelet"),
                    n.name,
                    n.container_logs()
                );
            }
            panic!(
                "timed out waiting for {what}; last: {last}\npods:\n{}\nevents:\n{}{seen}",
                c.kubectl("get pods -A -o wide").1,
                c.kubectl("get events -A").1,
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

const ISTIOD_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: istiod, namespace: istio-system}
spec:
  ports: [{name: grpc-xds, port: 15012, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: istiod-external
  namespace: istio-system
  labels: {kubernetes.io/service-name: istiod, endpointslice.kubernetes.io/managed-by: mesh-test}
addressType: IPv4
ports: [{name: grpc-xds, port: 15012, protocol: TCP}]
endpoints: [{addresses: ["CONTROL_IP"], conditions: {ready: true}}]
"#;

const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-allows-someone-else, namespace: app}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/app/sa/someone-else"]}}]}]
"#;

#[derive(Debug)]
struct Pod {
    name: String,
    uid: String,
    ip: String,
    phase: String,
    redirection: String,
    node: String,
}

/// The first pod `selector` matches in `ns` (fields empty when there is
/// none).
fn pod_of(c: &Cluster, ns: &str, selector: &str) -> Pod {
    pod_where(c, &format!("pods -n {ns} -l {selector}"))
}

/// The first pod `selector` matches in `ns` on `node`.
fn pod_on(c: &Cluster, ns: &str, selector: &str, node: &str) -> Pod {
    pod_where(
        c,
        &format!("pods -n {ns} -l {selector} --field-selector spec.nodeName={node}"),
    )
}

fn pod_where(c: &Cluster, what: &str) -> Pod {
    let f = jsonpath(
        c,
        what,
        "{.items[0].metadata.name}|{.items[0].metadata.uid}|{.items[0].status.podIP}|{.items[0].status.phase}|{.items[0].metadata.annotations.ambient\\.istio\\.io/redirection}|{.items[0].spec.nodeName}",
    );
    let mut f = f.split('|').map(str::to_string);
    let mut next = || f.next().unwrap_or_default();
    Pod {
        name: next(),
        uid: next(),
        ip: next(),
        phase: next(),
        redirection: next(),
        node: next(),
    }
}

/// A container's log through the kubelet (`kubectl logs`).
fn logs(c: &Cluster, what: &str) -> String {
    c.kubectl(&format!("logs {what} --tail=-1")).1
}

const MARKER: &str = "served-by-the-kubelets-pod";

/// One GET from the client pod (kubectl exec through the kubelet; busybox
/// nc, as Debian's static busybox wget crashes) to `vip`:80. Whether the
/// server's page came back, and what did.
fn fetch(c: &Cluster, vip: &str) -> (bool, String) {
    let (ok, out) = c.kubectl(&format!(
        "exec -n app deploy/client -- sh -c \"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {vip} 80\""
    ));
    (ok && out.contains(MARKER), out)
}

/// One fetch while the client's node (`from`) is captured on its interface
/// to the other node and the server's node (`to`) on every interface
/// (bridged packets pass its veths, not cni0): between the nodes and into
/// the server, nothing to or from `server_ip` but HBONE (15008), and the
/// page never in plaintext.
fn hbone_only(
    cluster: &Cluster,
    from: &RealNode,
    to: &RealNode,
    dir: &Path,
    vip: &str,
    server_ip: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    let wire = testbed::Capture::start(
        &from.netns,
        "eth0",
        dir.join(format!("{}-eth0.pcap", from.name)),
    );
    let server =
        testbed::Capture::start(&to.netns, "any", dir.join(format!("{}-any.pcap", to.name)));
    let (served, out) = fetch(cluster, vip);
    assert!(served, "{out}");
    wire.stop();
    server.stop();
    for pcap in [
        dir.join(format!("{}-eth0.pcap", from.name)),
        dir.join(format!("{}-any.pcap", to.name)),
    ] {
        // (The page does cross a node's loopback in plaintext: that is
        // kubectl exec's stream from containerd to the kubelet.)
        let (ok, plain) = testbed::sh_out(&format!(
            "tshark -r {} -Y 'ip.addr=={server_ip} && frame contains \"{MARKER}\"' -T fields -e frame.number 2>/dev/null",
            pcap.display()
        ));
        assert!(
            ok && plain.trim().is_empty(),
            "the page crossed {} in plaintext: {plain}",
            pcap.display()
        );
        let (ok, ports) = testbed::sh_out(&format!(
            "tshark -r {} -Y 'ip.addr=={server_ip}' -T fields -e ip.src -e ip.dst -e tcp.srcport -e tcp.dstport 2>/dev/null",
            pcap.display()
        ));
        assert!(ok, "{ports}");
        let flows: Vec<&str> = ports.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !flows.is_empty(),
            "no packet to or from the server in {}",
            pcap.display()
        );
        for f in &flows {
            assert!(
                f.split_whitespace().skip(2).any(|p| p == "15008"),
                "non-HBONE packet to the server in {}: {f}",
                pcap.display()
            );
        }
    }
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: app
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: app}
spec:
  replicas: 1
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node2}
      containers:
        - name: httpd
          image: mesh.test/app:1
          imagePullPolicy: Never
          args: [sh, -c, "echo served-by-the-kubelets-pod > /www/index.html && exec httpd -f -p 8080 -h /www"]
          securityContext: {runAsNonRoot: true, runAsUser: 65532}
          volumeMounts: [{name: www, mountPath: /www}]
      volumes: [{name: www, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: app}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: app}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node1}
      containers:
        - name: client
          image: mesh.test/app:1
          imagePullPolicy: Never
          args: [sleep, "3600"]
          securityContext: {runAsNonRoot: true, runAsUser: 65532}
          # A connection held open waits here for the test's go.
          volumeMounts: [{name: gate, mountPath: /gate}]
      volumes: [{name: gate, emptyDir: {}}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_runs_our_daemonsets_and_captures_ambient_pods() {
    if peers().is_none() {
        return;
    }
    let ztunnel = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("ztunnel");
    let mut mesh = Mesh::new("node", ztunnel.to_str().unwrap());
    let images = images(&mesh.dir.join("images"));
    let cluster = Cluster::start(&mesh).await;
    cluster.start_controllers();
    // istiod runs beside the API server, outside the cluster: pods reach it
    // as `istiod.istio-system.svc` through a Service whose endpoint is its
    // address (kube-proxy routes the ClusterIP), named by the test's
    // cluster DNS.
    let dns = ClusterDns::start();
    cluster.start_istiod().await;
    cluster
        .apply(&ISTIOD_SERVICE.replace("CONTROL_IP", CONTROL_IP))
        .await;
    dns.add_service(&cluster, "istio-system", "istiod").await;
    // Two nodes, each its own netns (address), containerd and kubelet: the
    // client runs on node1, the server on node2, so HBONE crosses the wire.
    let mut nodes = Vec::new();
    for (i, name) in ["node1", "node2"].iter().enumerate() {
        nodes.push(
            cluster
                .start_node(&mut mesh, name, i as u8 + 1, &images)
                .await,
        );
    }

    // The user's install command, with the images containerd holds.
    let (ok, out) = cluster.kubectl(&format!("apply -k {}", root().join("manifests").display()));
    assert!(ok, "kubectl apply -k manifests/: {out}");

    // The kubelet starts the agent, which chains our plugin into the
    // node's CNI config (the one containerd reads).
    let chained = |node: &RealNode| {
        std::fs::read_dir(&node.conf_dir)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .find(|conf| {
                conf["plugins"]
                    .as_array()
                    .and_then(|p| p.last())
                    .map(|p| p["type"] == "istio-cni")
                    == Some(true)
            })
    };
    for node in &nodes {
        wait_for(
            &cluster,
            &nodes,
            &format!("the agent chains istio-cni into {}'s conflist", node.name),
            |_| holds(chained(node).is_some(), String::new),
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
    wait_for(&cluster, &nodes, "ztunnel DaemonSet ready", |c| {
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
        wait_for(&cluster, &nodes, &format!("{a} running"), |c| {
            let phase = jsonpath(
                c,
                &format!("pods -n app -l app={a}"),
                "{.items[0].status.phase}",
            );
            holds(phase == "Running", || phase)
        })
        .await;
        let pod = pod_of(&cluster, "app", &format!("app={a}"));
        assert_eq!(pod.redirection, "enabled", "{a} not annotated as captured");
        let on = if a == "client" { "node1" } else { "node2" };
        assert_eq!(pod.node, on, "{a} scheduled where its nodeSelector says");
    }

    // Traffic between them crosses the node's pod network as HBONE only.
    let vip = cluster.cluster_ip("app", "server").await;
    let server_ip = jsonpath(
        &cluster,
        "pods -n app -l app=server",
        "{.items[0].status.podIP}",
    );
    wait_for(
        &cluster,
        &nodes,
        "client reaches server through the mesh",
        |c| {
            let (served, out) = fetch(c, &vip);
            holds(served, || out)
        },
    )
    .await;
    hbone_only(
        &cluster,
        &nodes[0],
        &nodes[1],
        &mesh.dir.join("first"),
        &vip,
        &server_ip,
    );

    // A policy applied with kubectl is enforced: the client is not allowed.
    let policy = mesh.dir.join("deny.yaml");
    std::fs::write(&policy, DENY_CLIENT).unwrap();
    let (ok, out) = cluster.kubectl(&format!("apply -f {}", policy.display()));
    assert!(ok, "{out}");
    wait_for(&cluster, &nodes, "the policy refuses the client", |c| {
        let (served, out) = fetch(c, &vip);
        holds(!served, || out)
    })
    .await;
    let (ok, out) = cluster.kubectl(&format!("delete -f {}", policy.display()));
    assert!(ok, "{out}");
    wait_for(
        &cluster,
        &nodes,
        "the client is served again without the policy",
        |c| {
            let (served, out) = fetch(c, &vip);
            holds(served, || out)
        },
    )
    .await;

    // Deleting a pod releases it: the kubelet's CNI DEL reaches the agent,
    // which tells ztunnel, and ztunnel closes that pod's listeners. The
    // Deployment's replacement is captured and served over HBONE.
    let old = pod_of(&cluster, "app", "app=server");
    let (ok, out) = cluster.kubectl(&format!("delete pod -n app {}", old.name));
    assert!(ok, "{out}");
    // The server's node's agent and ztunnel.
    let agent = pod_on(&cluster, "istio-system", "app=istio-cni", "node2");
    let zt = pod_on(&cluster, "istio-system", "app=ztunnel", "node2");
    assert!(
        !agent.name.is_empty() && !zt.name.is_empty(),
        "node2's agent {agent:?} and ztunnel {zt:?}"
    );
    wait_for(&cluster, &nodes, "the agent takes the CNI DEL", |c| {
        let log = logs(c, &format!("-n istio-system {}", agent.name));
        holds(
            log.lines()
                .any(|l| l.contains("pod deleted") && l.contains(&format!("app/{}", old.name))),
            || log,
        )
    })
    .await;
    wait_for(&cluster, &nodes, "ztunnel no longer serves the pod", |c| {
        let log = logs(c, &format!("-n istio-system {}", zt.name));
        holds(
            log.lines()
                .any(|l| l.contains("pod removed: listeners closed") && l.contains(&old.uid)),
            || log,
        )
    })
    .await;
    wait_for(&cluster, &nodes, "the replacement server captured", |c| {
        let new = pod_of(c, "app", "app=server");
        holds(
            new.name != old.name && new.phase == "Running" && new.redirection == "enabled",
            || format!("{new:?}"),
        )
    })
    .await;
    let new = pod_of(&cluster, "app", "app=server");
    wait_for(&cluster, &nodes, "the replacement server is served", |c| {
        let (served, out) = fetch(c, &vip);
        holds(served, || out)
    })
    .await;
    hbone_only(
        &cluster,
        &nodes[0],
        &nodes[1],
        &mesh.dir.join("replaced"),
        &vip,
        &new.ip,
    );

    // A rollout of the ztunnel DaemonSet (maxSurge 1, maxUnavailable 0):
    // node by node, the new ztunnel is ready before the old one is told to
    // stop, the old one then drains (new connections go to the new one; the
    // ones it holds go on until they end or --drain-timeout, 30s). Checked:
    // a new connection while the first node's old one drains, the held one
    // (through both nodes' old ztunnels) finishing, and the rollout
    // completing.
    let old_zt: Vec<String> = ["node1", "node2"]
        .iter()
        .map(|n| pod_on(&cluster, "istio-system", "app=ztunnel", n).name)
        .collect();
    // A request held open through the old ztunnel: connected now, finished
    // when the test writes /gate/go (the client's fresh emptyDir).
    let held = cluster.kubectl_child(&format!(
        "exec -n app deploy/client -- sh -c \"(printf 'GET / HTTP/1.0\\r\\n'; while [ ! -e /gate/go ]; do sleep 1; done; printf '\\r\\n') | nc {vip} 80\""
    ));
    wait_for(
        &cluster,
        &nodes,
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
        &cluster,
        &nodes,
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
    let (served, out) = fetch(&cluster, &vip);
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
    let (served, out) = fetch(&cluster, &vip);
    assert!(served, "after the rollout: {out}");

    // Removing the namespace's label releases its running pods: the agent
    // takes its capture annotation back, and they still talk (now directly).
    let (ok, out) = cluster.kubectl("label namespace app istio.io/dataplane-mode-");
    assert!(ok, "{out}");
    for a in ["server", "client"] {
        wait_for(&cluster, &nodes, &format!("{a} released"), |c| {
            let annotation = jsonpath(
                c,
                &format!("pods -n app -l app={a}"),
                "{.items[0].metadata.annotations.ambient\\.istio\\.io/redirection}",
            );
            holds(annotation.is_empty(), || annotation)
        })
        .await;
    }
    wait_for(&cluster, &nodes, "the released client is served", |c| {
        let (served, out) = fetch(c, &vip);
        holds(served, || out)
    })
    .await;
}
