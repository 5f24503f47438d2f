//! A real control plane for the cluster tests: etcd, kube-apiserver and istiod
//! built from their Go modules by `scripts/peers.sh`, no kubelet. Tests create
//! Kubernetes objects through the API for pods they made as network
//! namespaces (patching `status.podIP` to match), and istiod serves them.
//!
//! etcd listens on host loopback. The API server and istiod must be reachable
//! from the node netns where ztunnel and the node agent run, so the host gets
//! a veth into the mesh bridge (CONTROL_IP) and they bind there only. Nodes
//! of the pod-bridge topology join it with `Cluster::attach_node`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde::Deserialize;
use serde_json::json;

use crate::{sh, sh_out, Mesh};

mod demo;
mod node;
mod node_dns;
pub mod node_kit;
pub use demo::{allow_only, demo_serves_over_hbone, DEMO_PODS};
pub use node::RealNode;
pub use node_dns::ClusterDns;

/// Where the API server and istiod listen (the host's leg on the bridge).
pub const CONTROL_IP: &str = "10.244.254.1";
const ADMIN_TOKEN: &str = "mesh-test-admin-token";

pub struct Cluster {
    pub dir: PathBuf,
    pub client: kube::Client,
    /// Istio's root (we plug it in as istiod's CA): what ztunnel trusts.
    pub root_cert: PathBuf,
    pub kubeconfig: PathBuf,
    bin: PathBuf,
    procs: Mutex<BTreeMap<&'static str, Child>>,
    istiod_http: u16,
    /// Held for the cluster's life: every cluster binds the same control
    /// address and ports, so the tests of one binary (run on parallel
    /// threads) take turns.
    _exclusive: tokio::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `f` until it holds; panics naming `what` after `timeout`. Returns
/// how long it took (the cluster tests report propagation delays).
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

/// A port for a peer to listen on. The port is only reserved until the peer
/// binds it, so it comes from below the kernel's ephemeral range: a port the
/// kernel hands out (`bind(0)`) can be taken in that window as the source
/// port of any outgoing connection (the tests' API clients open many), and
/// istiod then fails with "address already in use".
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // Test binaries run one after another, but start each at its own offset
    // so a peer left behind by an earlier binary is not asked to share.
    let (base, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1000));
    let start = std::process::id() * 97;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (base + (start + n) % span) as u16;
        // The wildcard conflicts with a listener on any address.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {base}..{}", base + span);
}

pub(crate) fn peers_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("MESH_PEERS_DIR").unwrap_or_else(|_| "/var/cache/mesh-peers".into()),
    )
}

fn peer_bin(bin: &Path, name: &str) -> PathBuf {
    let p = bin.join(name);
    assert!(
        p.exists(),
        "{} missing: build the real control plane first with scripts/peers.sh",
        p.display()
    );
    p
}

impl Cluster {
    /// Starts etcd and kube-apiserver for `mesh` and applies the Istio and
    /// Gateway API CRDs; `start_istiod` adds istiod. Everything stops when
    /// the Cluster is dropped.
    pub async fn start(mesh: &Mesh) -> Cluster {
        let exclusive = ONE_CLUSTER.lock().await;
        let peers = peers_dir();
        let dir = mesh.dir.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let bin = peers.join("bin");
        let mut procs = BTreeMap::new();

        // The host's leg on the mesh bridge: the API server and istiod listen
        // there, reachable from the node netns of either topology (the pod
        // bridge 10.244/16 and the CNI nodes' 172.30/16).
        let host_if = format!("{}h", mesh.prefix);
        sh(&format!(
            "ip link add {host_if} type veth peer name cp0 netns {net} && \
             ip -n {net} link set cp0 master br0 up && \
             ip addr add {CONTROL_IP}/16 dev {host_if} && \
             ip addr add 172.30.254.254/16 dev {host_if} && ip link set {host_if} up",
            net = mesh.net
        ));

        // etcd
        let (client_port, peer_port) = (free_port(), free_port());
        let etcd = spawn(
            &dir,
            "etcd",
            Command::new(peer_bin(&bin, "etcd"))
                .arg("--data-dir")
                .arg(dir.join("etcd"))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client_port}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client_port}"),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer_port}"),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer_port}"),
                ])
                .args([
                    "--initial-cluster",
                    &format!("default=http://127.0.0.1:{peer_port}"),
                ])
                .args(["--log-level", "warn"]),
        );
        procs.insert("etcd", etcd);

        // kube-apiserver: serving cert, service-account signing key, an admin token.
        let ca = rcgen::CertificateParams::new(vec![]).unwrap();
        let mut ca = ca;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "mesh-test-apiserver-ca");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut srv = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        srv.subject_alt_names
            .push(rcgen::SanType::IpAddress(CONTROL_IP.parse().unwrap()));
        // As a real API server's: in-cluster clients (a kubelet's pods) reach
        // it at the `kubernetes` Service's ClusterIP, the range's first.
        srv.subject_alt_names
            .push(rcgen::SanType::IpAddress("10.96.0.1".parse().unwrap()));
        for dns in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
            srv.subject_alt_names
                .push(rcgen::SanType::DnsName(dns.try_into().unwrap()));
        }
        let srv_key = rcgen::KeyPair::generate().unwrap();
        let srv_cert = srv.signed_by(&srv_key, &issuer).unwrap();
        let sa_key = rcgen::KeyPair::generate().unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let api_ca = w("apiserver-ca.pem", &ca_cert.pem());
        let tls_cert = w("apiserver.pem", &srv_cert.pem());
        let tls_key = w("apiserver-key.pem", &srv_key.serialize_pem());
        let sa_priv = w("sa.key", &sa_key.serialize_pem());
        let sa_pub = w("sa.pub", &sa_key.public_key_pem());
        let mut token_lines = format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n");
        for n in node::NODE_NAMES {
            token_lines += &format!(
                "{},system:node:{n},node-{n},\"system:nodes\"\n",
                node::node_token(n)
            );
        }
        let tokens = w("tokens.csv", &token_lines);
        let api_port = free_port();
        let apiserver = spawn(
            &dir,
            "kube-apiserver",
            Command::new(peer_bin(&bin, "kube-apiserver"))
                .args(["--etcd-servers", &format!("http://127.0.0.1:{client_port}")])
                .args([
                    "--bind-address",
                    CONTROL_IP,
                    "--advertise-address",
                    CONTROL_IP,
                ])
                .args(["--secure-port", &api_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls_cert)
                .arg("--tls-private-key-file")
                .arg(&tls_key)
                .arg("--token-auth-file")
                .arg(&tokens)
                // Node: real kubelets (cluster::node) are judged as nodes.
                .args(["--authorization-mode", "Node,RBAC"])
                // As real clusters do: the CNI agent's DaemonSet is privileged.
                .arg("--allow-privileged=true")
                // Real nodes' kubelets (exec, logs) by address: their names
                // are in no DNS.
                .arg("--kubelet-preferred-address-types=InternalIP")
                .args([
                    "--service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local",
                ])
                .arg("--service-account-key-file")
                .arg(&sa_pub)
                .arg("--service-account-signing-key-file")
                .arg(&sa_priv)
                .args(["--service-cluster-ip-range", "10.96.0.0/16"])
                .arg("--cert-dir")
                .arg(dir.join("apiserver-certs")),
        );
        procs.insert("kube-apiserver", apiserver);

        let server = format!("https://{CONTROL_IP}:{api_port}");
        let kubeconfig = w(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                api_ca.display()
            ),
        );
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();

        let mut cluster = Cluster {
            dir: dir.clone(),
            client,
            root_cert: PathBuf::new(),
            kubeconfig,
            bin,
            procs: Mutex::new(procs),
            istiod_http: free_port(),
            _exclusive: exclusive,
        };
        cluster.wait_api().await;
        for crds in ["istio.yaml", "gateway-api.yaml"] {
            let text = std::fs::read_to_string(peers.join("crds").join(crds)).unwrap();
            cluster.apply(&text).await;
        }
        cluster.wait_crds().await;
        cluster
            .apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n")
            .await;

        // istiod signs with a root we plug in, so the test knows what to trust.
        let cacerts = dir.join("cacerts");
        let ca_state = dir.join("istio-root");
        identity::BuiltinCa::load_or_create(&ca_state, identity::DEFAULT_TRUST_DOMAIN).unwrap();
        std::fs::create_dir_all(&cacerts).unwrap();
        let root = std::fs::read_to_string(ca_state.join("root-cert.pem")).unwrap();
        let key = std::fs::read_to_string(ca_state.join("root-key.pem")).unwrap();
        for (f, t) in [
            ("ca-cert.pem", &root),
            ("root-cert.pem", &root),
            ("cert-chain.pem", &root),
            ("ca-key.pem", &key),
        ] {
            std::fs::write(cacerts.join(f), t).unwrap();
        }
        cluster.root_cert = cacerts.join("root-cert.pem");

        std::fs::write(
            dir.join("mesh.yaml"),
            "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n",
        )
        .unwrap();
        cluster
    }

    /// (Re)starts istiod and waits until it is ready.
    pub async fn start_istiod(&self) {
        let d = &self.dir;
        let child = spawn(
            d,
            "istiod",
            Command::new(peer_bin(&self.bin, "pilot-discovery"))
                .current_dir(d)
                .arg("discovery")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .arg("--meshConfig")
                .arg(d.join("mesh.yaml"))
                .arg("--networksConfig")
                .arg(d.join("mesh-networks.yaml"))
                .args(["--httpAddr", &format!("127.0.0.1:{}", self.istiod_http)])
                .args(["--httpsAddr", &format!("127.0.0.1:{}", free_port())])
                .args(["--grpcAddr", &format!("127.0.0.1:{}", free_port())])
                .args(["--monitoringAddr", &format!("127.0.0.1:{}", free_port())])
                .args(["--secureGRPCAddr", &format!("{CONTROL_IP}:15012")])
                .args(["--log_output_level", "default:info"])
                .env("POD_NAMESPACE", "istio-system")
                .env("POD_NAME", "istiod-test")
                .env("REVISION", "default")
                .env("PILOT_ENABLE_AMBIENT", "true")
                .env("ROOT_CA_DIR", d.join("cacerts"))
                .env("CA_TRUSTED_NODE_ACCOUNTS", "istio-system/ztunnel")
                .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
                .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
                .env("PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER", "false"),
        );
        self.procs.lock().unwrap().insert("istiod", child);
        let url = format!("http://127.0.0.1:{}/ready", self.istiod_http);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (ok, out) = sh_out(&format!("curl -s -o /dev/null -w '%{{http_code}}' {url}"));
            if ok && out.trim() == "200" {
                return;
            }
            self.assert_alive("istiod");
            assert!(
                Instant::now() < deadline,
                "istiod not ready after 90s; log:\n{}",
                self.log_tail("istiod")
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops istiod (SIGKILL: as if its node died).
    pub fn stop_istiod(&self) {
        if let Some(mut c) = self.procs.lock().unwrap().remove("istiod") {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn assert_alive(&self, name: &str) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(c) = procs.get_mut(name) {
            if let Ok(Some(st)) = c.try_wait() {
                drop(procs);
                panic!("{name} exited ({st}); log:\n{}", self.log_tail(name));
            }
        }
    }

    async fn wait_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.client.apiserver_version().await.is_ok() {
                let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
                if ns.get("default").await.is_ok() {
                    return;
                }
            }
            self.assert_alive("etcd");
            self.assert_alive("kube-apiserver");
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready; log:\n{}",
                self.log_tail("kube-apiserver")
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn wait_crds(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for gvk in [
            GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
            GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
            GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
            GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        ] {
            while kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "CRD for {gvk:?} never became served"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Server-side applies every document of `yaml`.
    pub async fn apply(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(v.clone()).unwrap();
            let tm = obj.types.clone().expect("apiVersion and kind");
            let gvk = GroupVersionKind::try_from(&tm).unwrap();
            let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{gvk:?}: {e}"));
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Cluster => Api::all_with(self.client.clone(), &ar),
                Scope::Namespaced => Api::namespaced_with(
                    self.client.clone(),
                    obj.metadata.namespace.as_deref().unwrap_or("default"),
                    &ar,
                ),
            };
            let name = obj.metadata.name.clone().unwrap();
            api.patch(
                &name,
                &PatchParams::apply("mesh-test").force(),
                &Patch::Apply(&v),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {} {name}: {e}", tm.kind));
        }
    }

    async fn dynamic(&self, api_version: &str, kind: &str, namespace: &str) -> Api<DynamicObject> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .unwrap();
        Api::namespaced_with(self.client.clone(), namespace, &ar)
    }

    pub async fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let api = self.dynamic(api_version, kind, namespace).await;
        api.delete(name, &Default::default()).await.unwrap();
    }

    /// The object as the API serves it (JSON), for assertions and diagnostics.
    /// The ClusterIP the API server allocated to Service `namespace/name`.
    pub async fn cluster_ip(&self, namespace: &str, name: &str) -> String {
        let svc = self.get("v1", "Service", namespace, name).await;
        svc["spec"]["clusterIP"]
            .as_str()
            .unwrap_or_else(|| panic!("Service {namespace}/{name} has no clusterIP: {svc}"))
            .to_string()
    }

    pub async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> serde_json::Value {
        let api = self.dynamic(api_version, kind, namespace).await;
        serde_json::to_value(api.get(name).await.unwrap()).unwrap()
    }

    /// A JSON merge patch (e.g. a label change on an object another field
    /// manager owns, like a Pod).
    pub async fn merge(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) {
        let api = self.dynamic(api_version, kind, namespace).await;
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch {kind} {namespace}/{name}: {e}"));
    }

    /// A Pod object for a pod the test made as a netns: scheduled on `node`,
    /// and with `ip`, running and ready there as a kubelet would report it
    /// (without, as the kubelet leaves it until the CNI ADD returned).
    pub async fn pod(
        &self,
        namespace: &str,
        name: &str,
        sa: &str,
        node: &str,
        ip: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Pod {
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {namespace}}}\n"
        ))
        .await;
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "app", "image": "mesh-test/app"}]},
        });
        self.apply(&serde_json::to_string(&pod).unwrap()).await;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match ip {
            Some(ip) => self.pod_ready(namespace, name, ip).await,
            None => api.get(name).await.unwrap(),
        }
    }

    /// Reports the pod running and ready at `ip`, as the kubelet does once
    /// the CNI ADD returned.
    pub async fn pod_ready(&self, namespace: &str, name: &str, ip: &str) -> Pod {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("pod {namespace}/{name} status: {e}"))
    }

    /// Reports the pod no longer ready (a failing readiness probe): it
    /// keeps its address, and leaves its services' endpoints.
    pub async fn pod_not_ready(&self, namespace: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("pod {namespace}/{name} status: {e}"));
    }

    /// A token for `sa` bound to `pod`, audience istio-ca: what kubelet
    /// projects into the ztunnel pod.
    pub async fn pod_token(&self, namespace: &str, sa: &str, pod: &Pod) -> PathBuf {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["istio-ca".into()],
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                expiration_seconds: Some(3600),
            },
            ..Default::default()
        };
        let tr = api
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .unwrap();
        let path = self
            .dir
            .join(format!("token-{}", pod.metadata.name.as_deref().unwrap()));
        std::fs::write(&path, tr.status.unwrap().token).unwrap();
        path
    }

    /// The EndpointSlice kube-controller-manager (not run here) would write
    /// for Service `service`: its ready `pods` (name, ip) on `ports`
    /// (name, port). istiod finds a Service's instances through these.
    pub async fn endpoint_slice(
        &self,
        namespace: &str,
        service: &str,
        ports: &[(&str, u16)],
        pods: &[(&str, &str)],
    ) {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-test"), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "mesh-test"}},
            "addressType": "IPv4",
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
            "endpoints": pods.iter().map(|(name, ip)| json!({
                "addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": name, "namespace": namespace},
            })).collect::<Vec<_>>(),
        });
        self.apply(&serde_json::to_string(&slice).unwrap()).await;
    }

    /// Annotates the pod as istio-cni does once it captured it; istiod only
    /// sends HBONE as the pod's tunnel protocol after that. For tests where
    /// the testbed (not our agent) plays the node agent.
    pub async fn mark_captured(&self, namespace: &str, name: &str) {
        self.merge(
            "v1",
            "Pod",
            namespace,
            name,
            json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}}),
        )
        .await;
    }

    /// Routes a CNI node (172.30.0.x on the bridge) to the control plane.
    pub fn reach_from_cni_node(&self, mesh: &Mesh, node: &str) {
        sh(&format!(
            "ip -n {}-{node} route add {CONTROL_IP}/32 dev eth0",
            mesh.prefix
        ));
    }

    /// Gives node `node`'s netns a leg on the mesh bridge at `ip`, so its
    /// ztunnel reaches istiod. Returns the ztunnel arguments for cluster mode.
    pub async fn attach_node(&self, mesh: &mut Mesh, node: &str, ip: &str) -> Vec<String> {
        let ns = format!("{}-{}", mesh.prefix, node);
        if !Path::new(&format!("/run/netns/{ns}")).exists() {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        // Named by the address's last two octets: unique per node of a mesh
        // (lengths were not: node1/10.244.250.1 and node2/10.244.250.2
        // collided), and within IFNAMSIZ.
        let vif = format!(
            "n{}{}",
            mesh.prefix.chars().rev().take(6).collect::<String>(),
            ip.split('.').skip(2).collect::<String>()
        );
        sh(&format!(
            "ip link add {vif} type veth peer name eth0 netns {ns} && \
             ip link set {vif} netns {net} && ip -n {net} link set {vif} master br0 up && \
             ip -n {ns} addr add {ip}/16 dev eth0 && ip -n {ns} link set eth0 up",
            net = mesh.net
        ));
        self.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ztunnel, namespace: istio-system}\n").await;
        let pod = self
            .pod(
                "istio-system",
                &format!("ztunnel-{node}"),
                "ztunnel",
                node,
                Some(ip),
                &BTreeMap::from([("app".into(), "ztunnel".into())]),
            )
            .await;
        let token = self.pod_token("istio-system", "ztunnel", &pod).await;
        let args: Vec<String> = vec![
            "--xds-address".into(),
            format!("{CONTROL_IP}:15012"),
            "--xds-root-cert".into(),
            self.root_cert.display().to_string(),
            "--token-path".into(),
            token.display().to_string(),
            "--pod-ip".into(),
            ip.into(),
            "--pod-name".into(),
            format!("ztunnel-{node}"),
            "--pod-namespace".into(),
            "istio-system".into(),
        ];
        mesh.node_args.insert(node.into(), args.clone());
        args
    }
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // istiod and the controllers first, then the API server, then etcd.
        let mut procs = self.procs.lock().unwrap();
        for name in [
            "istiod",
            "kube-scheduler",
            "kube-controller-manager",
            "kube-apiserver",
            "etcd",
        ] {
            if let Some(mut c) = procs.remove(name) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
