//! The node agent in process, fed a `MeshStore` directly, and the real
//! plugin code asking it: membership is the agent's decision from its live
//! state; the plugin reads no mesh; the agent's small membership answer on
//! disk changes only with the labels it is made from, and is what the
//! plugin judges from while the agent is down. Pods here are outside the
//! mesh or refused, so no netns is needed (tests/cni.rs enrols real ones).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use istio_cni::cni::{code, CniError, Env};
use istio_cni::{agent, fallback, plugin};
use mesh::MeshStore;
use serde_json::json;

const NODE: &str = "node1";

fn ns(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n")
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, mode: Option<&str>) -> String {
    let labels = match mode {
        Some(m) => format!("{{app: {name}, istio.io/dataplane-mode: {m}}}"),
        None => format!("{{app: {name}}}"),
    };
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec: {{serviceAccountName: {name}, nodeName: {node}}}\nstatus: {{podIP: {ip}}}\n")
}

fn service(name: &str, vip: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec: {{clusterIP: {vip}, selector: {{app: a}}, ports: [{{port: 80}}]}}\n")
}

fn state(yaml: &str) -> mesh::MeshState {
    mesh::standalone::parse(yaml, "cluster.local").unwrap()
}

/// `app` ambient with a (node1) and out (node1, opted out); `plain` not.
fn base() -> String {
    ns("app", true)
        + &ns("plain", false)
        + &pod("app", "a", NODE, "10.244.1.10", None)
        + &pod("app", "out", NODE, "10.244.1.11", Some("none"))
        + &service("s", "10.96.0.10")
}

struct Node {
    dir: PathBuf,
    store: Arc<MeshStore>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("istio-cni-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn start(dir: &Path, store: Arc<MeshStore>) -> Node {
    start_with(dir, store, true).await
}

/// `start` with AMBIENT_IPV6 as `ipv6`.
async fn start_with(dir: &Path, store: Arc<MeshStore>, ipv6: bool) -> Node {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let cfg = agent::Config {
        node: NODE.into(),
        store: store.clone(),
        zds_socket: dir.join("zds.sock"),
        plugin_socket: dir.join("plugin.sock"),
        state_dir: dir.join("state"),
        dns_capture: true,
        ipv6,
        exclude_namespaces: vec!["kube-system".into()],
        probe_snat: false,
        host_netns: None,
        host_root: "/".into(),
        // Empty: these tests have no netns to find, and must not look into
        // the machine's.
        proc_root: dir.join("proc"),
        netns_dir: dir.join("netns"),
        annotator: None,
        status: Default::default(),
    };
    let task = tokio::spawn(agent::run(cfg, rx));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("plugin.sock").exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Node {
        dir: dir.to_path_buf(),
        store,
        stop,
        task,
    }
}

impl Node {
    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap().unwrap();
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The plugin as the runtime runs it (blocking, so off the workers).
    async fn plugin(&self, cmd: &str, pod: &str) -> Result<Option<String>, CniError> {
        cni_plugin(&self.dir, cmd, pod).await
    }

    /// The answer file's identity and content: a rewrite is a new inode.
    fn answer(&self) -> (u64, String) {
        let p = self.state_dir().join(fallback::FILE);
        (
            std::fs::metadata(&p).unwrap().ino(),
            std::fs::read_to_string(&p).unwrap(),
        )
    }

    /// Replaces the mesh state and waits until the agent acted on it: any
    /// plugin call is answered only after the agent took in the store's
    /// current state.
    async fn replace(&self, yaml: &str) {
        self.store.replace(state(yaml));
        let _ = self.plugin("CHECK", "plain/barrier").await;
    }
}

async fn cni_plugin(dir: &Path, cmd: &str, pod: &str) -> Result<Option<String>, CniError> {
    cni_plugin_with(dir, cmd, pod, &["10.244.1.50/24"]).await
}

/// `cni_plugin` with the primary plugin's result giving the pod `ips`.
async fn cni_plugin_with(
    dir: &Path,
    cmd: &str,
    pod: &str,
    ips: &[&str],
) -> Result<Option<String>, CniError> {
    let (ns, name) = pod.split_once('/').unwrap();
    // The "netns": only its existence is looked at for pods outside the mesh.
    let netns = dir.join(format!("netns-{name}"));
    std::fs::write(&netns, b"").unwrap();
    let vars: Vec<(String, String)> = [
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", format!("ctr-{name}")),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".into()),
        (
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "istio-cni",
        "agent_socket": dir.join("plugin.sock"),
        "agent_state_dir": dir.join("state"),
        "prevResult": {"cniVersion": "1.0.0", "ips": ips.iter().map(|a| json!({"address": a})).collect::<Vec<_>>()},
    });
    tokio::task::spawn_blocking(move || {
        let env = Env::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
        plugin::run(&env, conf.to_string().as_bytes())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_answer_is_rewritten_only_when_its_labels_change() {
    let dir = tmp("answer");
    let n = start(&dir, MeshStore::new(state(&base()), "test")).await;
    let (ino0, text0) = n.answer();
    let a: fallback::Answer = serde_json::from_str(&text0).unwrap();
    assert_eq!(a.ambient_namespaces, ["app".to_string()].into(), "{text0}");
    assert_eq!(a.excluded_namespaces, ["kube-system".to_string()].into());

    // A Service changes, and a pod of another node gets its own label: not
    // what the plugin decides from, so the file is left alone.
    let other_node = base()
        + &service("t", "10.96.0.11")
        + &pod("plain", "far", "node2", "10.244.2.10", Some("ambient"));
    n.replace(&other_node).await;
    assert_eq!(n.answer(), (ino0, text0.clone()));

    // A namespace label changes: rewritten, by rename.
    let labelled = other_node.replace(&ns("plain", false), &ns("plain", true));
    n.replace(&labelled).await;
    let (ino1, text1) = n.answer();
    assert_ne!(ino1, ino0);
    let a: fallback::Answer = serde_json::from_str(&text1).unwrap();
    assert_eq!(
        a.ambient_namespaces,
        ["app", "plain"].map(String::from).into()
    );

    // The same labels again (another unrelated change): left alone.
    n.replace(&(labelled.clone() + &service("u", "10.96.0.12")))
        .await;
    assert_eq!(n.answer(), (ino1, text1.clone()));

    // One of this node's pods gets its own label: rewritten.
    n.replace(&(labelled + &pod("plain", "mine", NODE, "10.244.1.30", Some("none"))))
        .await;
    let (ino2, text2) = n.answer();
    assert_ne!(ino2, ino1);
    assert!(text2.contains("plain/mine"), "{text2}");

    // A restarted agent with the same view does not rewrite it either.
    let store = n.store.clone();
    n.stop().await;
    let n = start(&dir, store).await;
    assert_eq!(n.answer(), (ino2, text2));
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// AMBIENT_IPV6=false: no IPv6 rules are written, so an ambient pod with
/// an IPv6 address fails its ADD (its IPv6 traffic would bypass ztunnel); a
/// pod outside the mesh with one starts as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ambient_ipv6_a_pod_with_an_ipv6_address_is_refused() {
    let dir = tmp("ipv6");
    let n = start_with(&dir, MeshStore::new(state(&base()), "test"), false).await;
    let dual = ["10.244.1.10/24", "fd00:10:244:1::10/64"];
    let e = cni_plugin_with(&dir, "ADD", "app/a", &dual)
        .await
        .unwrap_err();
    assert_eq!(e.code, code::ENROL_FAILED, "{e}");
    assert!(e.details.contains("AMBIENT_IPV6=false"), "{e}");
    let out = cni_plugin_with(&dir, "ADD", "plain/p", &dual)
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("fd00:10:244:1::10/64"), "{out}");
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_asks_the_agent_and_judges_from_its_answer_while_it_is_down() {
    let dir = tmp("ask");
    let n = start(&dir, MeshStore::new(state(&base()), "test")).await;
    // Nothing mesh-shaped is there for the plugin to read.
    let listing: Vec<String> = std::fs::read_dir(n.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listing.iter().all(|f| !f.ends_with(".yaml")), "{listing:?}");

    // Outside: passed through, and remembered by the agent (so a later
    // label captures it).
    let out = n.plugin("ADD", "plain/p").await.unwrap().unwrap();
    assert!(
        out.contains("10.244.1.50/24"),
        "prevResult passed on: {out}"
    );
    let records = std::fs::read_to_string(n.state_dir().join("pods.json")).unwrap();
    assert!(records.contains("\"p\""), "{records}");
    n.plugin("CHECK", "plain/p").await.unwrap();
    // Ambient namespace, pod unknown to the mesh: the agent refuses.
    let e = n.plugin("ADD", "app/ghost").await.unwrap_err();
    assert_eq!(e.code, code::ENROL_FAILED, "{e}");
    assert!(e.details.contains("not in the mesh config"), "{e}");
    // The agent follows the store: labelling plain makes p's CHECK the
    // agent's business (p is not declared, so it is refused).
    n.replace(&base().replace(&ns("plain", false), &ns("plain", true)))
        .await;
    let e = n.plugin("CHECK", "plain/p").await.unwrap_err();
    assert_eq!(e.code, code::ENROL_FAILED, "{e}");
    n.replace(&base()).await;

    // The agent goes away.
    n.stop().await;
    assert!(!dir.join("plugin.sock").exists());
    // Certainly outside: starts, and is left for the agent.
    assert!(cni_plugin(&dir, "ADD", "plain/q").await.is_ok());
    assert!(dir.join("state/pending/ctr-q.json").exists());
    assert!(cni_plugin(&dir, "CHECK", "plain/p").await.is_ok());
    assert!(cni_plugin(&dir, "ADD", "app/out").await.is_ok());
    assert!(cni_plugin(&dir, "ADD", "kube-system/dns").await.is_ok());
    // May be ambient: try again later, naming why.
    for (cmd, pod) in [("ADD", "app/a"), ("ADD", "app/new"), ("CHECK", "app/a")] {
        let e = cni_plugin(&dir, cmd, pod).await.unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{cmd} {pod}: {e}");
        assert!(
            e.msg.contains("namespace app is labelled") && e.details.contains("unreachable"),
            "{e}"
        );
    }
    // No answer on disk: only the excluded namespaces are certain.
    let answer = dir.join("state").join(fallback::FILE);
    std::fs::rename(&answer, dir.join("answer.away")).unwrap();
    let e = cni_plugin(&dir, "ADD", "plain/r").await.unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(e.details.contains("no membership answer"), "{e}");
    assert!(cni_plugin(&dir, "ADD", "kube-system/dns").await.is_ok());

    // Back: the pod started meanwhile is known, its entry consumed, and the
    // answer written again.
    let n = start(&dir, MeshStore::new(state(&base()), "test")).await;
    let records = std::fs::read_to_string(n.state_dir().join("pods.json")).unwrap();
    assert!(records.contains("\"q\""), "{records}");
    assert!(!dir.join("state/pending/ctr-q.json").exists());
    assert!(answer.exists());
    n.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
