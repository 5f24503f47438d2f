//! Istio's own cni chart runs our agent: `helm` (built from the pinned istio
//! module by scripts/peers.sh) renders the chart with our image, and the test
//! runs the agent as the kubelet would run that container: the rendered
//! command (`install-cni`, resolved in an image-shaped dir), args and only
//! the rendered env (ConfigMap envFrom resolved), in the node's netns
//! against a real kube-apiserver. Each rendered mount is mapped to a temp
//! dir: the `/host/...` ones through the agent's --host-root (the node's
//! root as the chart mounts it), the two others through the chart's own
//! `env` values (CNI_AGENT_RUN_DIR, ZTUNNEL_UDS_ADDRESS). It must turn ready
//! on the rendered probe and install the plugin and its config as the
//! ConfigMap says.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::helm::{self, PodFacts, VolumeSource};
use testbed::*;

const AGENT: &str = env!("CARGO_BIN_EXE_istio-cni-agent");

/// The image's /usr/local/bin as docker/istio-cni.Dockerfile lays it out:
/// the agent, the static plugin beside it, `install-cni` linking the agent.
fn image_bin(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("image/usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(AGENT, bin.join("istio-cni-agent")).unwrap();
    std::fs::copy(static_plugin(), bin.join("istio-cni")).unwrap();
    std::os::unix::fs::symlink("istio-cni-agent", bin.join("install-cni")).unwrap();
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_cni_chart_runs_our_agent_ready_and_installed() {
    let Some(chart) = helm::istio_chart("istio-cni") else {
        return;
    };
    let mut m = Mesh::new("chr", &workspace_bin("ztunnel"));
    m.write_config("");
    m.cni_node("node1", 1);
    let run_dir = m.dir.join("mnt/var/run/istio-cni");
    let zds_dir = m.dir.join("mnt/var/run/ztunnel");
    let (run_s, zds_s) = (
        run_dir.display().to_string(),
        zds_dir.join("ztunnel.sock").display().to_string(),
    );
    let render = helm::template(
        &chart,
        "istio-cni",
        "istio-system",
        &[
            ("image", "example.test/istio-cni:dev"),
            ("profile", "ambient"),
            ("env.CNI_AGENT_RUN_DIR", &run_s),
            ("env.ZTUNNEL_UDS_ADDRESS", &zds_s),
        ],
    )
    .unwrap();
    let facts = PodFacts {
        node: "node1".into(),
        ..PodFacts::example()
    };
    let c = render
        .daemonset_container("istio-cni-node", "install-cni", &facts)
        .unwrap();
    assert_eq!(c.command, ["install-cni"]);
    let probe = c.readiness.clone().expect("rendered readiness probe");

    // Every rendered mount, mapped. A mount this list does not know fails
    // the test: the chart changed and the mapping must follow.
    let host = m.dir.join("mnt/host");
    let net = m.cni_net("node1");
    let node_ns = format!("{}-node1", m.prefix);
    let mut mapped = BTreeMap::new();
    for mount in &c.mounts {
        let at = mount.mount_path.as_str();
        let VolumeSource::HostPath { path } = &mount.source else {
            panic!("mount {at}: not a hostPath ({:?})", mount.source);
        };
        let to = match at {
            "/host/opt/cni/bin" => net.bin_dir.clone(),
            "/host/etc/cni/net.d" => net.conf_dir.clone(),
            // This node's netns only (the machine's hold other tests').
            "/host/var/run/netns" => m.dir.join("node1/netns"),
            // The node's /proc as far as the agent reads it: PID 1's netns
            // is the node's (ALLOW_SWITCH_TO_HOST_NS puts node rules there).
            "/host/proc" => {
                let p = m.dir.join("node1/proc");
                std::fs::create_dir_all(p.join("1/ns")).unwrap();
                std::os::unix::fs::symlink(format!("/run/netns/{node_ns}"), p.join("1/ns/net"))
                    .unwrap();
                p
            }
            "/var/run/istio-cni" => run_dir.clone(),
            "/var/run/ztunnel" => zds_dir.clone(),
            other => panic!("rendered mount {other} (hostPath {path}) is not mapped"),
        };
        std::fs::create_dir_all(&to).unwrap();
        if at.starts_with("/host/") {
            let link = host.join(at.trim_start_matches("/host/"));
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&to, &link).unwrap();
        }
        mapped.insert(at.to_string(), to);
    }
    assert_eq!(mapped.len(), 6, "{mapped:?}");

    let cluster = Cluster::start(&m).await;
    cluster.reach_from_cni_node(&m, "node1");
    cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}\n")
        .await;

    let bin = image_bin(&m.dir);
    let log_path = m.dir.join("chart-agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &node_ns])
        .arg(bin.join(&c.command[0]))
        .args(&c.command[1..])
        .args(&c.args)
        .arg("--host-root")
        .arg(&host)
        .env_clear()
        .envs(c.env.iter().cloned())
        // What a pod has besides its env: the image's PATH and API
        // credentials (in-cluster, here the test cluster's kubeconfig).
        .env("PATH", std::env::var("PATH").unwrap())
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let get = |port: u16, path: &str| {
        sh_out(&format!(
            "ip netns exec {node_ns} curl -s -m 2 -w ' %{{http_code}}' http://127.0.0.1:{port}{path}"
        ))
        .1
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = get(probe.port, &probe.path);
        if r.ends_with(" 200") {
            break;
        }
        assert!(
            agent.try_wait().unwrap().is_none(),
            "agent exited; log:\n{}",
            agent_log()
        );
        assert!(
            Instant::now() < deadline,
            "{} never ready ({r}); log:\n{}",
            probe.path,
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Installed as the ConfigMap says: the static plugin in the bin dir,
    // chained last into the primary config with the rendered run dir and
    // excluded namespaces.
    let installed = net.bin_dir.join("istio-cni");
    let (_, ldd) = sh_out(&format!("ldd {} 2>&1", installed.display()));
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "{ldd}"
    );
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(net.conf_dir.join("10-k8s.conflist")).unwrap())
            .unwrap();
    let ours = conflist["plugins"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(ours["type"], "istio-cni", "{conflist}");
    assert_eq!(ours["agent_socket"], format!("{run_s}/pluginevent.sock"));
    let excluded: Vec<String> = c
        .env("EXCLUDE_NAMESPACES")
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(ours["exclude_namespaces"], serde_json::json!(excluded));
    assert!(zds_dir.join("ztunnel.sock").exists());
    let metrics_port = c
        .ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("rendered metrics port")
        .container_port;
    let metrics = get(metrics_port, "/metrics");
    assert!(metrics.contains("istio_cni_install_ready 1"), "{metrics}");
    // The node rule went into the node's netns, through PID 1's.
    let (_, set) = sh_out(&format!(
        "ip netns exec {node_ns} ipset list istio-inpod-probes-v4"
    ));
    assert!(set.contains("Name: istio-inpod-probes-v4"), "{set}");
    let log = agent_log();
    assert!(
        log.contains("chart: true") || log.contains("chart=true"),
        "{log}"
    );

    // A pod of the ambient namespace, ADDed through the node's conflist, is
    // captured by the chart-run agent. This test's runtime names netns
    // /run/netns/<name> (a node's names them under /var/run/netns, which the
    // chart mounts); the agent opens them under its host root, so /run is
    // mapped there too.
    std::os::unix::fs::symlink("/run", host.join("run")).unwrap();
    cluster
        .pod("app", "a", "a", "node1", None, &BTreeMap::new())
        .await;
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10")
        .expect("ADD through the chained plugin");
    let (_, rules) = sh_out(&format!("ip netns exec {} iptables-save", m.pod_ns("a")));
    assert!(rules.contains("REDIRECT --to-ports 15001"), "{rules}");
    let (_, set) = sh_out(&format!(
        "ip netns exec {node_ns} ipset list istio-inpod-probes-v4"
    ));
    assert!(set.contains("10.244.1.10"), "{set}");

    let _ = agent.kill();
    let _ = agent.wait();
}
