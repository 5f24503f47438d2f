//! The kit of the real-node tests (`tests/node*.rs`): a control plane with
//! two real nodes, the ambient app they run (a busybox httpd server on
//! node2, a client on node1), and the kubectl reads and waits the checks
//! are made of.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ClusterDns, RealNode, CONTROL_IP};
use crate::{Cluster, Mesh};

/// A control plane (API server, controllers, istiod beside them, the
/// cluster DNS) and two real nodes. Fields drop in order: the nodes stop
/// before the control plane, the mesh's network last.
pub struct NodeTestbed {
    pub nodes: Vec<RealNode>,
    pub cluster: Cluster,
    pub dns: ClusterDns,
    pub mesh: Mesh,
}

impl NodeTestbed {
    /// Starts everything, with our images imported into both nodes'
    /// containerd. `None` when the peers are missing and optional.
    pub async fn start(name: &str) -> Option<NodeTestbed> {
        peers()?;
        let ztunnel = std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join("ztunnel");
        let mut mesh = Mesh::new(name, ztunnel.to_str().unwrap());
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
        // Two nodes, each its own netns (address), containerd and kubelet:
        // the client runs on node1, the server on node2, so HBONE crosses
        // the wire between them.
        let mut nodes = Vec::new();
        for (i, node) in ["node1", "node2"].iter().enumerate() {
            nodes.push(
                cluster
                    .start_node(&mut mesh, node, i as u8 + 1, &images)
                    .await,
            );
        }
        Some(NodeTestbed {
            nodes,
            cluster,
            dns,
            mesh,
        })
    }

    /// Whether the node's CNI config (the one containerd reads) has
    /// istio-cni chained last.
    pub fn chained(node: &RealNode) -> bool {
        std::fs::read_dir(&node.conf_dir)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .any(|conf| {
                conf["plugins"]
                    .as_array()
                    .and_then(|p| p.last())
                    .map(|p| p["type"] == "istio-cni")
                    == Some(true)
            })
    }

    /// Writes `yaml` to the test's directory as `file` and `kubectl apply`s it.
    pub fn apply(&self, file: &str, yaml: &str) {
        let path = self.mesh.dir.join(file);
        std::fs::write(&path, yaml).unwrap();
        let (ok, out) = self
            .cluster
            .kubectl(&format!("apply -f {}", path.display()));
        assert!(ok, "kubectl apply -f {file}: {out}");
    }
}

/// The repository (manifests/, scripts/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The node's peers, or `None` (skip) when they are missing and
/// `MESH_PEERS_OPTIONAL=1` says a machine without them is expected.
pub fn peers() -> Option<()> {
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
        if !crate::sh_out(&format!("command -v {tool}")).0 {
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
pub fn images(out: &Path) -> Vec<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let musl = profile
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-musl")
        .join(profile.file_name().unwrap());
    for b in [
        profile.join("ztunnel"),
        profile.join("waypoint"),
        profile.join("istio-cni-agent"),
        musl.join("istio-cni"),
    ] {
        assert!(
            b.exists(),
            "{} not built (scripts/test.sh builds it)",
            b.display()
        );
    }
    crate::sh(&format!(
        "{} {} {} {}",
        root().join("scripts/images.sh").display(),
        out.display(),
        profile.display(),
        musl.display()
    ));
    ["pause", "ztunnel", "waypoint", "istio-cni", "app"]
        .iter()
        .map(|i| out.join(format!("{i}.tar")))
        .collect()
}

/// `kubectl get <what> -o jsonpath=<path>`, trimmed; "" when it fails.
pub fn jsonpath(c: &Cluster, what: &str, path: &str) -> String {
    let (ok, out) = c.kubectl(&format!("get {what} -o jsonpath='{path}'"));
    if ok {
        out.trim().to_string()
    } else {
        String::new()
    }
}

/// A `wait_for` condition: Ok, or what was seen instead.
pub fn holds(ok: bool, seen: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(seen())
    }
}

/// Polls `f` (Err: what it saw instead) until it holds or 180s pass.
pub async fn wait_for(
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

/// istiod (beside the API server) as the in-cluster Service pods dial.
pub const ISTIOD_SERVICE: &str = r#"
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

/// What the checks read of a pod.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub uid: String,
    pub ip: String,
    pub phase: String,
    pub redirection: String,
    pub node: String,
}

/// The first pod `selector` matches in `ns` (fields empty when there is
/// none).
pub fn pod_of(c: &Cluster, ns: &str, selector: &str) -> Pod {
    pod_where(c, &format!("pods -n {ns} -l {selector}"))
}

/// The first pod `selector` matches in `ns` on `node`.
pub fn pod_on(c: &Cluster, ns: &str, selector: &str, node: &str) -> Pod {
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
pub fn logs(c: &Cluster, what: &str) -> String {
    c.kubectl(&format!("logs {what} --tail=-1")).1
}

/// The server's page (never seen in plaintext on the wire).
pub const MARKER: &str = "served-by-the-kubelets-pod";

/// One GET from the client pod (kubectl exec through the kubelet; busybox
/// nc, as Debian's static busybox wget crashes) to `vip`:80. Whether the
/// server's page came back, and what did. nc half-closes at the end of its
/// input, which an L4 path carries through (HBONE's END_STREAM).
pub fn fetch(c: &Cluster, vip: &str) -> (bool, String) {
    let (ok, out) = get(c, vip, "/", "");
    (ok && out.contains(MARKER), out)
}

/// One GET of `path` through an HTTP proxy on the way (a waypoint): the
/// client keeps its write side open a second, since an HTTP proxy closes
/// the connection of a client that half-closes before its response, as
/// Envoy does. Whether kubectl exec ran, and the response.
pub fn fetch_path(c: &Cluster, vip: &str, path: &str) -> (bool, String) {
    get(c, vip, path, "; sleep 1")
}

fn get(c: &Cluster, vip: &str, path: &str, then: &str) -> (bool, String) {
    c.kubectl(&format!(
        "exec -n app deploy/client -- sh -c \"(printf 'GET {path} HTTP/1.0\\r\\nHost: server.app.svc.cluster.local\\r\\n\\r\\n'{then}) | nc -w 5 {vip} 80\""
    ))
}

/// Waits until a fetch from the client gets the server's page at `vip`.
pub async fn wait_served(cluster: &Cluster, nodes: &[RealNode], what: &str, vip: &str) {
    wait_for(cluster, nodes, what, |c| {
        let (served, out) = fetch(c, vip);
        holds(served, || out)
    })
    .await;
}

/// `wait_served`, then `hbone_only` between the first two nodes (client's,
/// server's), keeping the captures in `dir`.
pub async fn served_hbone_only(
    cluster: &Cluster,
    nodes: &[RealNode],
    what: &str,
    dir: &Path,
    vip: &str,
    server_ip: &str,
) {
    wait_served(cluster, nodes, what, vip).await;
    hbone_only(cluster, &nodes[0], &nodes[1], dir, vip, server_ip);
}

/// One fetch while the client's node (`from`) is captured on its interface
/// to the other node and the server's node (`to`) on every interface
/// (bridged packets pass its veths, not cni0): between the nodes and into
/// the server, nothing to or from `server_ip` but HBONE (15008), and the
/// page never in plaintext.
pub fn hbone_only(
    cluster: &Cluster,
    from: &RealNode,
    to: &RealNode,
    dir: &Path,
    vip: &str,
    server_ip: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    let wire = crate::Capture::start(
        &from.netns,
        "eth0",
        dir.join(format!("{}-eth0.pcap", from.name)),
    );
    let server = crate::Capture::start(&to.netns, "any", dir.join(format!("{}-any.pcap", to.name)));
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
        let (ok, plain) = crate::sh_out(&format!(
            "tshark -r {} -Y 'ip.addr=={server_ip} && frame contains \"{MARKER}\"' -T fields -e frame.number 2>/dev/null",
            pcap.display()
        ));
        assert!(
            ok && plain.trim().is_empty(),
            "the page crossed {} in plaintext: {plain}",
            pcap.display()
        );
        let (ok, ports) = crate::sh_out(&format!(
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

/// The ambient namespace `app`: a busybox httpd `server` (port 80 → 8080)
/// on node2 and a `client` on node1, both non-root.
pub const APP: &str = r#"
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
