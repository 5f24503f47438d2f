//! Istio's own ztunnel chart runs our ztunnel: `helm template` (built by
//! scripts/peers.sh) renders `manifests/charts/ztunnel` of the pinned istio
//! module with our image, and this test starts our binary exactly as the
//! kubelet would start that container: the image's entrypoint (our binary)
//! with the rendered args, only the rendered environment (downward-API
//! fields resolved for the ztunnel pod made in the API), and each volume
//! mount bind-mounted at its path in a private mount namespace (a temp dir
//! per volume: the root certificate, a token issued by the API server, the
//! ZDS socket dir, /tmp). It must become ready on the rendered readiness
//! probe and carry HBONE between pods, with an AuthorizationPolicy applied
//! through the API enforced, against the real kube-apiserver and istiod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testbed::cluster::{allow_only, CONTROL_IP};
use testbed::helm::{self, Mount, PodFacts, Projection, VolumeSource};
use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");
const IMAGE: &str = "ghcr.io/mesh/ztunnel:dev";
const NODE_IP: &str = "10.244.250.1";

/// The absolute path of a host tool (the container gets no PATH of ours).
fn tool(name: &str) -> String {
    let (ok, out) = sh_out(&format!("command -v {name}"));
    assert!(ok, "{name} not found");
    out.trim().to_string()
}

/// Host directories made as mount points; removed again when the test ends.
struct MountPoints(Vec<PathBuf>);

impl MountPoints {
    fn make(&mut self, target: &Path) {
        // The first missing ancestor is what we made; remove that one.
        let mut first_missing = None;
        for a in target.ancestors() {
            if a.exists() {
                break;
            }
            first_missing = Some(a.to_path_buf());
        }
        std::fs::create_dir_all(target).unwrap();
        self.0.extend(first_missing);
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Fills a temp dir with what the kubelet would put in volume `m`.
fn volume_dir(m: &Mount, dir: &Path, root_cert: &Path, token: &Path, zds_dir: &Path) -> PathBuf {
    match &m.source {
        VolumeSource::ConfigMap { name } if name == "istio-ca-root-cert" => {
            let d = dir.join(&m.name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(root_cert, d.join("root-cert.pem")).unwrap();
            d
        }
        VolumeSource::Projected(sources) => {
            let d = dir.join(&m.name);
            std::fs::create_dir_all(&d).unwrap();
            for s in sources {
                match s {
                    Projection::ServiceAccountToken { path, audience, .. } => {
                        assert_eq!(audience.as_deref(), Some("istio-ca"), "{m:?}");
                        std::fs::copy(token, d.join(path)).unwrap();
                    }
                    other => panic!("volume {}: projection {other:?} not mapped", m.name),
                }
            }
            d
        }
        VolumeSource::HostPath { path } if path == "/var/run/ztunnel" => zds_dir.to_path_buf(),
        VolumeSource::EmptyDir => {
            let d = dir.join(&m.name);
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        other => panic!(
            "the chart mounts {other:?} at {}: not mapped by this test",
            m.mount_path
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_chart_runs_our_binary() {
    let (Some(chart), Some(_)) = (helm::istio_chart("ztunnel"), helm::helm_bin()) else {
        return;
    };
    let xds = format!("{CONTROL_IP}:15012");
    let render = helm::template(
        &chart,
        "ztunnel",
        "istio-system",
        &[
            ("image", IMAGE),
            // istiod is not behind a cluster DNS name here.
            ("caAddress", &xds),
            ("xdsAddress", &xds),
            ("logAsJson", "true"),
            (
                "meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE",
                "true",
            ),
        ],
    )
    .expect("helm template");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let facts = PodFacts {
        name: "ztunnel-node1".into(),
        namespace: "istio-system".into(),
        node: "node1".into(),
        ip: NODE_IP.into(),
        host_ip: NODE_IP.into(),
        service_account: "ztunnel".into(),
        // No limit set: the downward API gives the node's CPUs; the 200m
        // request rounds up to 1 with divisor 1.
        resources: BTreeMap::from([
            ("limits.cpu".into(), cpus.to_string()),
            ("requests.cpu".into(), "1".into()),
        ]),
    };
    let c = render
        .daemonset_container("ztunnel", "istio-proxy", &facts)
        .expect("the chart's ztunnel container");
    assert_eq!(c.image, IMAGE);
    assert!(c.command.is_empty(), "the image's entrypoint runs: {c:?}");
    let probe = c.readiness.clone().expect("a readiness probe");

    let mut m = Mesh::new("chart", ZT);
    for (name, ip) in cluster::DEMO_PODS {
        m.pod(name, "demo", name, ip, "node1", true);
    }
    let cl = Cluster::start(&m).await;
    cl.start_istiod().await;
    let target = cl.demo_app().await;

    // The ztunnel pod in the API and its projected token; the arguments
    // attach_node returns are our flags, which this test does not use.
    let flags = cl.attach_node(&mut m, "node1", NODE_IP).await;
    let token = PathBuf::from(&flags[flags.iter().position(|a| a == "--token-path").unwrap() + 1]);

    // Volumes as the kubelet lays them out, bind-mounted where the chart
    // mounts them, in a mount namespace of ztunnel's own.
    let vols = m.dir.join("volumes");
    let zds_dir = vols.join("zds");
    std::fs::create_dir_all(&zds_dir).unwrap();
    let mut points = MountPoints(vec![]);
    let mut script = String::new();
    for mount in &c.mounts {
        let src = volume_dir(mount, &vols, &cl.root_cert, &token, &zds_dir);
        points.make(Path::new(&mount.mount_path));
        let ro = if mount.read_only { " -o ro" } else { "" };
        script += &format!(
            "{} --bind{ro} '{}' '{}' && ",
            tool("mount"),
            src.display(),
            mount.mount_path
        );
    }
    let ns = format!("{}-node1", m.prefix);
    script += &format!("exec {} netns exec {ns} \"$0\" \"$@\"", tool("ip"));
    let mut cmd = Command::new(tool("unshare"));
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(tool("sh"))
        .args(["-c", &script])
        .arg(ZT)
        .args(&c.args)
        .env_clear()
        .envs(c.env.iter().map(|(k, v)| (k, v)));
    let sock = zds_dir.join("ztunnel.sock");
    m.start_node_with("node1", sock, cmd).await;

    // Ready on the rendered probe, once istiod's first sync is in.
    eventually(
        "ready on the chart's readiness probe",
        Duration::from_secs(30),
        || m.http("node1", probe.port, &probe.path).map(|r| r.0) == Some(200),
    )
    .await;
    cluster::demo_serves_over_hbone(&m, &target).await;

    cl.apply(&allow_only("client")).await;
    eventually(
        "ALLOW policy applied through the API shuts the intruder out",
        Duration::from_secs(20),
        || m.whoami("intruder", &target).is_err(),
    )
    .await;
    assert_eq!(m.whoami("client", &target).unwrap(), "server 10.244.1.10");

    // LOG_FORMAT=json from the chart: every line of the log is JSON, and
    // the access log's fields are keys of their own, named as upstream's.
    let log = m.log("node1");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}\n{log}"))
        })
        .collect();
    let access = |direction: &str| {
        lines
            .iter()
            .find(|l| {
                l["target"] == "access"
                    && l["message"] == "connection complete"
                    && l["direction"] == direction
                    && l["src.workload"] == "client"
            })
            .unwrap_or_else(|| panic!("no {direction} access line from the client:\n{log}"))
    };
    let out = access("outbound");
    assert_eq!(out["src.namespace"], "demo", "{out}");
    assert_eq!(
        out["src.identity"], "spiffe://cluster.local/ns/demo/sa/client",
        "{out}"
    );
    assert!(
        out["src.addr"]
            .as_str()
            .unwrap()
            .starts_with("10.244.1.10:"),
        "{out}"
    );
    assert_eq!(out["dst.addr"], "10.244.1.11:15008", "{out}");
    assert_eq!(out["dst.hbone_addr"], "10.244.1.11:8080", "{out}");
    assert_eq!(out["dst.service"], "server.demo.svc.cluster.local", "{out}");
    assert_eq!(out["dst.workload"], "server", "{out}");
    assert_eq!(out["dst.namespace"], "demo", "{out}");
    assert_eq!(
        out["dst.identity"], "spiffe://cluster.local/ns/demo/sa/server",
        "{out}"
    );
    assert!(out["bytes_recv"].as_u64().unwrap() > 0, "{out}");
    assert!(out["bytes_sent"].is_u64(), "{out}");
    assert!(out["duration"].as_str().unwrap().ends_with("ms"), "{out}");
    let inb = access("inbound");
    assert_eq!(inb["dst.hbone_addr"], "10.244.1.11:8080", "{inb}");
    assert_eq!(
        inb["src.identity"], "spiffe://cluster.local/ns/demo/sa/client",
        "{inb}"
    );
    assert_eq!(inb["dst.workload"], "server", "{inb}");
    // Structured, not formatted into the message.
    assert!(lines.iter().all(|l| !l["message"]
        .as_str()
        .unwrap_or_default()
        .contains("src.addr")));
    drop(m);
    drop(points);
}
