//! A real Kubernetes node: containerd (Debian's, with runc), kubelet and
//! kube-proxy built from the pinned k8s.io/kubernetes, in the netns of a CNI
//! node (`Mesh::cni_node`), plus kube-scheduler and kube-controller-manager
//! beside the API server. Pods are made by the kubelet, not by the test.
//!
//! Each node runs in its own mount and pid namespace: the host paths a
//! DaemonSet mounts (`/etc/cni/net.d`, `/opt/cni/bin`, `/var/run/ztunnel`,
//! `/var/run/netns`, ...) are bind mounts of the node's test directory, so
//! nothing is written to the machine's own, and killing the namespace's
//! first process ends containerd, its shims and every container at once.
//! That happens on drop (also when the test panics); a test process that is
//! killed outright leaves the node running, as it leaves its other peers.
//!
//! Settings this machine needs (a VM whose root lacks CAP_SYS_RESOURCE, on
//! cgroup v1): containerd's `restrict_oom_score_adj` (runc cannot set the
//! negative oom_score_adj of a pod sandbox otherwise: "can't get final
//! child's PID from pipe: EOF"), and the kubelet's `failCgroupV1: false`,
//! `cgroupDriver: cgroupfs`, `failSwapOn: false`, with a cgroup root of its
//! own that is removed afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{peer_bin, peers_dir, spawn, Cluster, ADMIN_TOKEN, CONTROL_IP};
use crate::{sh, sh_out, Mesh};

/// The cgroup v1 controllers the kubelet manages on this machine.
const CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];

/// The token a node's kubelet authenticates with: `system:node:<name>` in
/// `system:nodes`, so the API server's Node authorizer judges it.
pub(super) fn node_token(node: &str) -> String {
    format!("mesh-test-node-token-{node}")
}

/// Nodes a cluster has tokens for.
pub(super) const NODE_NAMES: &[&str] = &["node1", "node2"];

pub struct RealNode {
    pub name: String,
    /// The node's netns (`<prefix>-<name>`), where kubelet and pods' hosts are.
    pub netns: String,
    /// 172.30.0.<index>: its address on the wire.
    pub ip: String,
    pub dir: PathBuf,
    /// The node's CNI config dir (bind-mounted at /etc/cni/net.d inside).
    pub conf_dir: PathBuf,
    cgroup: String,
    child: Option<Child>,
}

impl Cluster {
    /// Starts the scheduler and the controller manager (DaemonSets,
    /// Deployments, ServiceAccounts, the root CA ConfigMap, endpoints).
    pub fn start_controllers(&self) {
        let kc = &self.kubeconfig;
        let kcm = spawn(
            &self.dir,
            "kube-controller-manager",
            Command::new(peer_bin(&node_bin(), "kube-controller-manager"))
                .arg("--kubeconfig")
                .arg(kc)
                .arg("--root-ca-file")
                .arg(self.dir.join("apiserver-ca.pem"))
                .arg("--service-account-private-key-file")
                .arg(self.dir.join("sa.key"))
                .args(["--leader-elect=false", "--secure-port=0"])
                .args(["--cluster-cidr", "10.244.0.0/16"])
                .args(["--service-cluster-ip-range", "10.96.0.0/16"]),
        );
        let sched = spawn(
            &self.dir,
            "kube-scheduler",
            Command::new(peer_bin(&node_bin(), "kube-scheduler"))
                .arg("--kubeconfig")
                .arg(kc)
                .arg("--authentication-kubeconfig")
                .arg(kc)
                .arg("--authorization-kubeconfig")
                .arg(kc)
                .args(["--leader-elect=false", "--secure-port=0"]),
        );
        let mut procs = self.procs.lock().unwrap();
        procs.insert("kube-controller-manager", kcm);
        procs.insert("kube-scheduler", sched);
    }

    /// `kubectl` with the admin kubeconfig; returns (success, output).
    pub fn kubectl(&self, args: &str) -> (bool, String) {
        sh_out(&format!(
            "{} --kubeconfig {} {args}",
            peer_bin(&node_bin(), "kubectl").display(),
            self.kubeconfig.display()
        ))
    }

    /// `kubectl` started in the background (output piped): for a command
    /// the test must not wait on, such as a connection held open.
    pub fn kubectl_child(&self, args: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} --kubeconfig {} {args}",
                peer_bin(&node_bin(), "kubectl").display(),
                self.kubeconfig.display()
            ))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kubectl")
    }

    /// Makes `mesh`'s CNI node `name` (index 1..=9) a real node: containerd
    /// with `images` (OCI archives) imported, kube-proxy and a kubelet that
    /// registers it. Returns once the node is Ready.
    pub async fn start_node(
        &self,
        mesh: &mut Mesh,
        name: &str,
        index: u8,
        images: &[PathBuf],
    ) -> RealNode {
        assert!(NODE_NAMES.contains(&name), "no API token for node {name}");
        // containerd 1.6 reads CNI results up to 1.0.0.
        mesh.cni_node(name, index);
        self.reach_from_cni_node(mesh, name);
        let netns = format!("{}-{name}", mesh.prefix);
        let ip = format!("172.30.0.{index}");
        // A default route, as nodes have: Service IPs are routed before
        // kube-proxy's DNAT (no route, no connect). The host answers this
        // node's pods (as the API server and istiod) by way of it.
        sh(&format!(
            "ip -n {netns} route add default via 172.30.254.254 && \
             ip route add 10.244.{index}.0/24 via {ip} dev {}h",
            mesh.prefix
        ));
        let net = mesh.cni_net(name);
        let dir = mesh.dir.join(name).join("node");
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = format!("mesh-{netns}");
        for c in CONTROLLERS {
            let _ = std::fs::create_dir_all(format!("/sys/fs/cgroup/{c}/{cgroup}"));
        }
        let bin = node_bin();
        let w = |file: &str, text: String| {
            std::fs::write(dir.join(file), text).unwrap();
            dir.join(file)
        };
        let api = self.api_server();
        let ca = self.dir.join("apiserver-ca.pem");
        let kubeconfig = w(
            "kubelet.kubeconfig",
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {api}\n    certificate-authority: {ca}\nusers:\n- name: node\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: node}}\ncurrent-context: test\n",
                node_token(name),
                ca = ca.display()
            ),
        );
        let containerd_conf = w(
            "containerd.toml",
            format!(
                r#"version = 2
root = "{d}/containerd"
state = "{d}/containerd-state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
                d = dir.display()
            ),
        );
        let kubelet_conf = w(
            "kubelet.yaml",
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 cgroupDriver: cgroupfs\nfailCgroupV1: false\nfailSwapOn: false\n\
                 cgroupRoot: /{cgroup}\n\
                 containerRuntimeEndpoint: unix://{d}/containerd.sock\n\
                 authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}\n\
                 authorization: {{mode: AlwaysAllow}}\n\
                 address: {ip}\nreadOnlyPort: 0\nhealthzBindAddress: 127.0.0.1\n\
                 clusterDomain: cluster.local\nclusterDNS: [{CONTROL_IP}]\nresolvConf: {d}/resolv.conf\n\
                 enforceNodeAllocatable: []\nevictionHard: {{}}\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 localStorageCapacityIsolation: false\nserializeImagePulls: false\n",
                d = dir.display()
            ),
        );
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let proxy_kubeconfig = w(
            "proxy.kubeconfig",
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {api}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                ca = ca.display()
            ),
        );
        // The node's host paths, each a directory of this test.
        let mut binds = vec![
            (net.conf_dir.clone(), PathBuf::from("/etc/cni/net.d")),
            (net.bin_dir.clone(), PathBuf::from("/opt/cni/bin")),
        ];
        for host in [
            "/run/netns",
            "/run/containerd",
            "/run/ztunnel",
            "/run/istio-cni",
            "/var/log/pods",
            "/var/lib/kubelet",
        ] {
            binds.push((
                dir.join(host.trim_start_matches('/').replace('/', "-")),
                host.into(),
            ));
        }
        let mut script = String::from("set -e\nmount --make-rshared /\n");
        for (src, dst) in &binds {
            std::fs::create_dir_all(src).unwrap();
            // The mount point on the machine: an empty directory.
            std::fs::create_dir_all(dst).unwrap();
            script += &format!("mount --bind {} {}\n", src.display(), dst.display());
        }
        let d = dir.display();
        script += &format!(
            "containerd --config {conf} >{d}/containerd.log 2>&1 &\n\
             while [ ! -S {d}/containerd.sock ]; do sleep 0.1; done\n",
            conf = containerd_conf.display()
        );
        for img in images {
            script += &format!(
                "ctr -a {d}/containerd.sock -n k8s.io images import {} >>{d}/import.log 2>&1\n",
                img.display()
            );
        }
        script += &format!(
            "{proxy} --kubeconfig {pk} --hostname-override {name} --proxy-mode iptables \
             --cluster-cidr 10.244.0.0/16 --conntrack-max-per-core 0 --metrics-bind-address 127.0.0.1:10249 \
             >{d}/kube-proxy.log 2>&1 &\n\
             {kubelet} --config {kc} --kubeconfig {kk} --hostname-override {name} --node-ip {ip} \
             --v 2 >{d}/kubelet.log 2>&1 &\nwait\n",
            proxy = bin.join("kube-proxy").display(),
            pk = proxy_kubeconfig.display(),
            kubelet = peer_bin(&bin, "kubelet").display(),
            kc = kubelet_conf.display(),
            kk = kubeconfig.display(),
        );
        let script_path = w("node.sh", script);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ])
            .arg("sh")
            .arg(&script_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("node.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("node.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start node {name}: {e}"));
        let mut node = RealNode {
            name: name.into(),
            netns,
            ip,
            dir,
            conf_dir: net.conf_dir,
            cgroup,
            child: Some(child),
        };
        node.wait_ready(self).await;
        node
    }

    fn api_server(&self) -> String {
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server in kubeconfig");
        assert!(server.contains(CONTROL_IP));
        server.to_string()
    }
}

/// Where the node's peers are (built by scripts/peers.sh).
fn node_bin() -> PathBuf {
    peers_dir().join("bin")
}

impl RealNode {
    pub fn log(&self, what: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `script` (sh) in the node's mount and network namespaces,
    /// where its pods' netns are named (containerd's `/run/netns/cni-*`
    /// mounts exist only there). Returns (success, output).
    pub fn exec(&self, script: &str) -> (bool, String) {
        let pid = self.child.as_ref().expect("node running").id();
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n", "sh", "-c", script])
            .output()
            .expect("nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text += &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The name (under the node's /run/netns) of the pod netns that has
    /// `ip`, or "".
    pub fn pod_netns(&self, ip: &str) -> String {
        let (_, out) = self.exec(&format!(
            "for n in $(ls /run/netns); do ip -n $n -4 -o addr | grep -q ' {ip}/' && echo $n; done"
        ));
        out.trim().to_string()
    }

    /// The last lines of every container's log on this node (the kubelet
    /// writes them under /var/log/pods, a directory of this test).
    pub fn container_logs(&self) -> String {
        let (_, out) = sh_out(&format!(
            "for f in $(find {} -name '*.log'); do echo \"== $f\"; tail -n 15 \"$f\" | cut -c1-400; done",
            self.dir.join("var-log-pods").display()
        ));
        out
    }

    async fn wait_ready(&mut self, cluster: &Cluster) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (ok, out) = cluster.kubectl(&format!(
                "get node {} -o jsonpath='{{.status.conditions[?(@.type==\"Ready\")].status}}'",
                self.name
            ));
            if ok && out.trim() == "True" {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "node {} exited ({st}): {}\ncontainerd:\n{}\nkubelet:\n{}",
                    self.name,
                    std::fs::read_to_string(self.dir.join("node.err")).unwrap_or_default(),
                    self.log("containerd"),
                    self.log("kubelet")
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} not Ready after 120s: {out}\nkubelet:\n{}",
                self.name,
                self.log("kubelet")
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The namespace's first process dies with unshare (--kill-child), and
        // every process of the pid namespace with it: containerd, shims,
        // containers. Its mounts go with the mount namespace.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        // The kubelet also mirrors its tree into the hybrid's v2 hierarchy.
        for c in CONTROLLERS.iter().chain(&["unified"]) {
            let root = PathBuf::from(format!("/sys/fs/cgroup/{c}/{}", self.cgroup));
            while root.exists() && Instant::now() < deadline {
                remove_cgroups(&root);
                if root.exists() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Removes a cgroup tree depth-first (empty cgroups only: the processes
/// are gone by now).
fn remove_cgroups(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroups(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
