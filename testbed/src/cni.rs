//! The test as container runtime: "nodes" with the reference CNI plugins
//! (bridge, host-local, loopback from Debian's containernetworking-plugins)
//! and a primary conflist, executed in chain order the way libcni does, with
//! the real istio-cni agent installing itself into that conflist.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{sh, Mesh, Node, Pod};

/// Where the reference plugins live on Debian (they speak CNI up to 1.0.0).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The reference plugins scripts/peers.sh builds from their Go module, which
/// speak CNI 1.1.0 as well.
pub fn reference_plugins_1_1() -> PathBuf {
    let dir = crate::cluster::peers_dir().join("cni-plugins");
    assert!(
        dir.join("bridge").exists(),
        "{} missing: build the CNI reference plugins first with scripts/peers.sh",
        dir.display()
    );
    dir
}

/// The static (musl) plugin, built beside this test's own profile by
/// scripts/test.sh; the one the agent must install on nodes.
pub fn static_plugin() -> String {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test>
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let target = profile.parent().unwrap();
    let bin = target
        .join("x86_64-unknown-linux-musl")
        .join(profile.file_name().unwrap())
        .join("istio-cni");
    assert!(
        bin.exists(),
        "{} not built: cargo build -p istio-cni --no-default-features --bin istio-cni --target x86_64-unknown-linux-musl (scripts/test.sh does)",
        bin.display()
    );
    bin.display().to_string()
}

/// A node's CNI directories.
pub struct CniNet {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

/// A plugin that failed, with its CNI error object when it printed one.
#[derive(Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub error: Value,
    pub stderr: String,
}

impl CniFailure {
    pub fn code(&self) -> Option<u64> {
        self.error.get("code").and_then(Value::as_u64)
    }
    pub fn msg(&self) -> String {
        format!(
            "{} {}",
            self.error["msg"].as_str().unwrap_or(""),
            self.error["details"].as_str().unwrap_or("")
        )
    }
}

impl Mesh {
    pub fn cni_net(&self, node: &str) -> CniNet {
        CniNet {
            conf_dir: self.dir.join(node).join("net.d"),
            bin_dir: self.dir.join(node).join("bin"),
        }
    }

    /// Node `index` (1..=9): a netns on the wire at 172.30.0.<index>, routing
    /// to the other nodes' pod subnets 10.244.<n>.0/24, with a bin dir of the
    /// reference plugins and a primary conflist (bridge + host-local).
    pub fn cni_node(&mut self, node: &str, index: u8) {
        self.cni_node_version(node, index, "1.0.0");
    }

    /// `cni_node` whose conflist speaks `version`: 1.1.0 lists its
    /// `cniVersions` too and runs the reference plugins that speak it.
    pub fn cni_node_version(&mut self, node: &str, index: u8, version: &str) {
        self.cni_node_with(node, index, version, false)
    }

    /// `cni_node` on a dual-stack network: the node also at
    /// fd00:172:30::<index>, routing to the other nodes' fd00:10:244:<n>::/64,
    /// and host-local handing out an address of each family. Duplicate
    /// address detection is off in the node and its pods, so addresses are
    /// usable at once.
    pub fn cni_node_dual_stack(&mut self, node: &str, index: u8) {
        self.cni_node_with(node, index, "1.0.0", true)
    }

    fn cni_node_with(&mut self, node: &str, index: u8, version: &str, dual: bool) {
        let ns = format!("{}-{}", self.prefix, node);
        let host_if = format!(
            "w{}{}",
            self.prefix.chars().rev().take(6).collect::<String>(),
            index
        );
        let mut cmd = format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip link add {host_if} type veth peer name eth0 netns {ns} && \
             ip link set {host_if} netns {net} && ip -n {net} link set {host_if} master br0 up && \
             ip -n {ns} addr add 172.30.0.{index}/16 dev eth0 && ip -n {ns} link set eth0 up && \
             ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1",
            net = self.net
        );
        for other in (1..=9u8).filter(|o| *o != index) {
            cmd += &format!(" && ip -n {ns} route add 10.244.{other}.0/24 via 172.30.0.{other}");
        }
        if dual {
            // Set before cni0 and the pods' host ends exist: they inherit it.
            cmd = cmd.replacen(
                " && ip link add",
                &format!(" && ip netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.forwarding=1 && ip link add"),
                1,
            );
            cmd += &format!(" && ip -n {ns} addr add fd00:172:30::{index}/64 dev eth0 nodad");
            for other in (1..=9u8).filter(|o| *o != index) {
                cmd += &format!(
                    " && ip -n {ns} -6 route add fd00:10:244:{other}::/64 via fd00:172:30::{other}"
                );
            }
        }
        sh(&cmd);
        let net = self.cni_net(node);
        std::fs::create_dir_all(&net.conf_dir).unwrap();
        std::fs::create_dir_all(&net.bin_dir).unwrap();
        let plugins = match version {
            "1.1.0" => reference_plugins_1_1(),
            _ => PathBuf::from(REFERENCE_PLUGINS),
        };
        for p in ["bridge", "host-local", "loopback"] {
            let src = plugins.join(p);
            assert!(
                src.exists(),
                "{} missing: apt-get install containernetworking-plugins",
                src.display()
            );
            std::os::unix::fs::symlink(&src, net.bin_dir.join(p)).unwrap();
        }
        let mut conflist = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.dir.join(node).join("ipam"),
                    "ranges": [[{"subnet": format!("10.244.{index}.0/24")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        });
        if dual {
            let ipam = &mut conflist["plugins"][0]["ipam"];
            ipam["ranges"]
                .as_array_mut()
                .unwrap()
                .push(json!([{"subnet": format!("fd00:10:244:{index}::/64")}]));
            ipam["routes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"dst": "::/0"}));
        }
        if version == "1.1.0" {
            conflist["cniVersions"] = json!(["1.0.0", "1.1.0"]);
        }
        std::fs::write(
            net.conf_dir.join("10-k8s.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        self.nodes.insert(
            node.into(),
            Node {
                name: node.into(),
                ns,
                child: None,
                log: self.dir.join(format!("{node}.log")),
                sock: self.dir.join(format!("{node}.sock")),
                agent: None,
                server: None,
                cni_agent: None,
            },
        );
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{node}-agent.log"))).unwrap_or_default()
    }

    pub fn plugin_socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}-cni.sock"))
    }

    /// Starts the real node agent for `node` in install mode and waits until
    /// it has chained the plugin into the node's conflist.
    pub fn start_cni_agent(
        &mut self,
        node: &str,
        agent_bin: &str,
        plugin_bin: &str,
        extra: &[&str],
    ) {
        let net = self.cni_net(node);
        let ns = self.nodes[node].ns.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{node}-agent.log")))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, agent_bin, "--node", node]);
        // The machine's /proc and /run/netns hold every test's pods (with
        // the same addresses): each node looks for running pods only in
        // dirs of its own, empty unless a test puts a pod there.
        for (flag, sub) in [("--proc-root", "proc"), ("--netns-dir", "netns")] {
            if !extra.contains(&flag) {
                let d = self.dir.join(node).join(sub);
                std::fs::create_dir_all(&d).unwrap();
                cmd.arg(flag).arg(d);
            }
        }
        match &self.kubeconfig {
            Some(k) => cmd.arg("--from-kube").env("KUBECONFIG", k),
            None => cmd.arg("--config").arg(&self.config),
        };
        let child = cmd
            .arg("--zds-socket")
            .arg(&self.nodes[node].sock)
            .arg("--plugin-socket")
            .arg(self.plugin_socket(node))
            .arg("--state-dir")
            .arg(self.dir.join(node).join("state"))
            .arg("--cni-conf-dir")
            .arg(&net.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&net.bin_dir)
            .arg("--plugin-binary")
            .arg(plugin_bin)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.get_mut(node).unwrap().cni_agent = Some(child);
        // In cluster mode the agent installs the plugin once its first
        // complete view of the API is in; on a loaded 2-core machine that
        // has taken over 10 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let chained = std::fs::read_to_string(net.conf_dir.join("10-k8s.conflist"))
                .is_ok_and(|c| c.contains("\"istio-cni\""));
            if chained
                && self.plugin_socket(node).exists()
                && net.bin_dir.join("istio-cni").exists()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {node} did not install itself; log:\n{}",
                self.agent_log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the node agent (SIGKILL: no chance to clean anything up).
    pub fn kill_cni_agent(&mut self, node: &str) {
        if let Some(mut c) = self.nodes.get_mut(node).unwrap().cni_agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts ztunnel for a CNI node: it learns pods from the real agent.
    pub fn start_ztunnel(&mut self, node: &str, ca_dir: &Path) {
        let sock = self.nodes[node].sock.clone();
        let (_, child, _) = self.spawn_ztunnel(node, &sock, ca_dir);
        self.nodes.get_mut(node).unwrap().child = Some(child);
        self.wait_ready(node);
    }

    /// Runs one plugin binary as the runtime would, inside the node netns.
    #[allow(clippy::too_many_arguments)]
    pub fn exec_plugin(
        &self,
        node: &str,
        plugin: &str,
        command: &str,
        container: &str,
        netns: &str,
        ifname: &str,
        args: &str,
        conf: &[u8],
    ) -> Result<String, CniFailure> {
        let net = self.cni_net(node);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.nodes[node].ns])
            .arg(net.bin_dir.join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &net.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(conf).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(CniFailure {
                plugin: plugin.into(),
                error: serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)),
                stderr: String::from_utf8_lossy(&out.stderr).to_string(),
            })
        }
    }

    /// Runs the node's primary network config for `command` (ADD in chain
    /// order, DEL in reverse with the cached result), as libcni does.
    pub fn cni(
        &self,
        node: &str,
        command: &str,
        pod: &str,
        namespace: &str,
        ip: &str,
    ) -> Result<Value, CniFailure> {
        let net = self.cni_net(node);
        let path = istio_cni::install::primary_conf(&net.conf_dir).unwrap();
        let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let netns = format!("/run/netns/{}-{}", self.prefix, pod);
        let mut args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={pod}");
        // Several addresses (`v4,v6`) go in the config's `args.cni.ips`,
        // which host-local reads; CNI_ARGS' IP takes one.
        let many = ip.contains(',');
        if !ip.is_empty() && !many {
            args += &format!(";IP={ip}");
        }
        let cache = self.dir.join(node).join(format!("cache-{pod}.json"));
        let mut plugins: Vec<Value> = list["plugins"].as_array().unwrap().clone();
        let mut prev: Option<Value> = None;
        if command != "ADD" {
            prev = std::fs::read(&cache)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        }
        if command == "DEL" {
            plugins.reverse();
        }
        for p in plugins {
            let mut conf = p.clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["name"] = list["name"].clone();
            if let Some(prev) = &prev {
                conf["prevResult"] = prev.clone();
            }
            let plugin = p["type"].as_str().unwrap();
            if many && plugin == "bridge" {
                conf["args"] = json!({"cni": {"ips": ip.split(',').collect::<Vec<_>>()}});
            }
            let out = self.exec_plugin(
                node,
                plugin,
                command,
                pod,
                &netns,
                "eth0",
                &args,
                &serde_json::to_vec(&conf).unwrap(),
            )?;
            if command == "ADD" {
                prev = Some(
                    serde_json::from_str(&out)
                        .unwrap_or_else(|e| panic!("{plugin} ADD printed {out:?}: {e}")),
                );
            }
        }
        match command {
            "ADD" => {
                std::fs::write(&cache, serde_json::to_vec(prev.as_ref().unwrap()).unwrap()).unwrap()
            }
            "DEL" => {
                let _ = std::fs::remove_file(&cache);
            }
            _ => {}
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// A pod sandbox: its netns, loopback up through the loopback plugin,
    /// then ADD through the node's conflist asking host-local for `ip`
    /// (`v4,v6` on a dual-stack node: one of each).
    pub fn cni_pod(
        &mut self,
        node: &str,
        name: &str,
        namespace: &str,
        sa: &str,
        ip: &str,
    ) -> Result<Value, CniFailure> {
        let ns = format!("{}-{}", self.prefix, name);
        sh(&format!("ip netns add {ns}"));
        // Addresses of both families (`ip` is "v4,v6"): no duplicate
        // address detection for the interface the bridge plugin makes.
        let ips: Vec<String> = ip.split(',').map(str::to_string).collect();
        if ips.iter().any(|i| i.contains(':')) {
            sh(&format!("ip netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0"));
        }
        self.pods.insert(
            name.into(),
            Pod {
                ns: ns.clone(),
                name: name.into(),
                namespace: namespace.into(),
                sa: sa.into(),
                ip: ips[0].clone(),
                ips,
                node: node.into(),
                captured: true,
            },
        );
        let lo = json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"});
        self.exec_plugin(
            node,
            "loopback",
            "ADD",
            name,
            &format!("/run/netns/{ns}"),
            "lo",
            "",
            lo.to_string().as_bytes(),
        )
        .expect("loopback ADD");
        self.cni(node, "ADD", name, namespace, ip)
    }
}
