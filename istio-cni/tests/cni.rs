//! The CNI plugin and node agent end to end: the test is the container
//! runtime, running the real reference plugins (bridge, host-local,
//! loopback) chained with ours through a real conflist that the real agent
//! installed itself into; real ztunnels learn pods from that agent.

use std::path::Path;
use std::time::{Duration, Instant};

use testbed::*;

const AGENT: &str = env!("CARGO_BIN_EXE_istio-cni-agent");

/// Namespace `app` is ambient (a on node1, b on node2); `plain` is not
/// unless `plain_ambient` (c and d on node1).
fn yaml(plain_ambient: bool) -> String {
    let label = if plain_ambient {
        "labels: {istio.io/dataplane-mode: ambient}"
    } else {
        "labels: {}"
    };
    let pod = |name: &str, ns: &str, node: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec: {{serviceAccountName: {name}, nodeName: {node}}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: plain, {label}}}\n{}{}{}{}",
        pod("a", "app", "node1", "10.244.1.10"),
        pod("b", "app", "node2", "10.244.2.10"),
        pod("c", "plain", "node1", "10.244.1.20"),
        pod("d", "plain", "node1", "10.244.1.21"),
    )
}

/// Two CNI nodes, each with the real agent (installed into its conflist)
/// and a ztunnel.
fn cluster(tag: &str, nodes: &[&str]) -> Mesh {
    cluster_version(tag, nodes, "1.0.0")
}

/// `cluster` whose nodes' conflists speak CNI `version`. The agents install
/// the static plugin, as on a real node.
fn cluster_version(tag: &str, nodes: &[&str], version: &str) -> Mesh {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.write_config(&yaml(false));
    let ca = m.dir.join("ca");
    for (i, n) in nodes.iter().enumerate() {
        m.cni_node_version(n, i as u8 + 1, version);
        m.start_cni_agent(n, AGENT, &static_plugin(), &[]);
        m.start_ztunnel(n, &ca);
    }
    m
}

fn in_pod(m: &Mesh, pod: &str, cmd: &str) -> String {
    let (_, out) = sh_out(&format!("ip netns exec {} {cmd}", m.pod_ns(pod)));
    out
}

/// Every trace the agent can leave in a pod netns.
fn capture_traces(m: &Mesh, pod: &str) -> String {
    let mut t = String::new();
    let rules = in_pod(m, pod, "iptables-save");
    t += &rules
        .lines()
        .filter(|l| l.contains("ISTIO"))
        .collect::<Vec<_>>()
        .join("\n");
    let ip_rules = in_pod(m, pod, "ip rule show");
    t += &ip_rules
        .lines()
        .filter(|l| l.contains("fwmark"))
        .collect::<Vec<_>>()
        .join("\n");
    t += in_pod(m, pod, "ip route show table 100 2>/dev/null").trim();
    t
}

fn listening(m: &Mesh, pod: &str) -> Vec<u16> {
    let out = in_pod(m, pod, "ss -Htln");
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

fn served(m: &Mesh, node: &str) -> Vec<String> {
    m.config_dump(node)["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_pods_are_captured_at_add_and_talk_hbone() {
    let mut m = cluster("cad", &["node1", "node2"]);
    let result = m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    // prevResult passes through unchanged: the bridge plugin's address.
    assert_eq!(result["ips"][0]["address"], "10.244.1.10/24", "{result}");
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10").unwrap();

    let traces = capture_traces(&m, "a");
    for want in [
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        "-A OUTPUT -j ISTIO_OUTPUT",
        // DNS capture is the agent's default.
        "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "fwmark 0x111/0xfff lookup 100",
        "local default dev lo",
    ] {
        assert!(traces.contains(want), "missing {want:?} in:\n{traces}");
    }
    for port in [15001, 15006, 15008, 15053] {
        assert!(
            listening(&m, "a").contains(&port),
            "ztunnel not listening on {port} in pod a: {:?}",
            listening(&m, "a")
        );
    }
    assert_eq!(served(&m, "node1"), ["a"]);
    // The node's probe SNAT set holds the ambient pod.
    let (_, set) = sh_out(&format!(
        "ip netns exec {}-node1 ipset list istio-inpod-probes-v4",
        m.prefix
    ));
    assert!(set.contains("10.244.1.10"), "{set}");

    m.greet_echo_server("b", 9090);
    let cap = Capture::start(
        &format!("{}-node1", m.prefix),
        "eth0",
        m.dir.join("node1.pcap"),
    );
    let secret = b"CNI-CAPTURED-SECRET".repeat(500);
    let mut s = m.connect("a", "10.244.2.10:9090").unwrap();
    let mut greeting = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut greeting).unwrap();
    assert_eq!(greeting.trim(), "b 10.244.1.10");
    echo_roundtrip(s, &secret);
    let pcap = cap.pcap.clone();
    let raw = cap.stop();
    assert!(
        !contains(&raw, b"CNI-CAPTURED-SECRET"),
        "plaintext crossed between nodes"
    );
    let (ok, ports) = sh_out(&format!(
        "tshark -r {} -Y 'ip.addr==10.244.1.10 && ip.addr==10.244.2.10' -T fields -e tcp.port 2>/dev/null | sort -u",
        pcap.display()
    ));
    assert!(
        ok && !ports.trim().is_empty(),
        "no traffic seen between the pods: {ports}"
    );
    assert!(
        ports.lines().all(|l| l.split(',').any(|p| p == "15008")),
        "non-HBONE ports: {ports}"
    );

    // CHECK agrees while the rules are there, and notices when they are not.
    m.cni("node1", "CHECK", "a", "app", "").unwrap();
    in_pod(&m, "a", "iptables -t nat -D OUTPUT -j ISTIO_OUTPUT");
    let err = m.cni("node1", "CHECK", "a", "app", "").unwrap_err();
    assert!(err.msg().contains("capture rules are missing"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ambient_pod_is_untouched_until_its_namespace_is_labelled() {
    let mut m = cluster("lbl", &["node1", "node2"]);
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10").unwrap();
    m.cni_pod("node1", "c", "plain", "c", "10.244.1.20")
        .unwrap();
    m.cni_pod("node1", "d", "plain", "d", "10.244.1.21")
        .unwrap();
    assert_eq!(capture_traces(&m, "c"), "", "a non-ambient pod got rules");
    assert!(!listening(&m, "c").contains(&15008));
    // Plaintext between two pods outside the mesh, seen as such on the bridge.
    m.echo_server("d", 7070);
    let cap = Capture::start(
        &format!("{}-node1", m.prefix),
        "cni0",
        m.dir.join("cni0.pcap"),
    );
    echo_roundtrip(
        m.connect("c", "10.244.1.21:7070").unwrap(),
        &b"PLAIN-BETWEEN-OUTSIDERS".repeat(50),
    );
    assert!(contains(&cap.stop(), b"PLAIN-BETWEEN-OUTSIDERS"));

    // Label the namespace: c is captured without a restart.
    m.write_config(&yaml(true));
    eventually("c captured after labelling", || {
        capture_traces(&m, "c").contains("REDIRECT --to-ports 15001")
    });
    eventually("ztunnel serves c", || {
        served(&m, "node1").contains(&"c".to_string())
    });
    m.whoami_server("b", 9090);
    assert_eq!(m.whoami("c", "10.244.2.10:9090").unwrap(), "b 10.244.1.20");
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("source_workload=\"c\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // Unlabel: rules gone, ztunnel lets go.
    m.write_config(&yaml(false));
    eventually("c released", || capture_traces(&m, "c").is_empty());
    eventually("d released", || capture_traces(&m, "d").is_empty());
    eventually("ztunnel drops c", || {
        !served(&m, "node1").contains(&"c".to_string())
    });
    echo_roundtrip(m.connect("c", "10.244.1.21:7070").unwrap(), b"plain again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_ztunnel_and_agent_keep_pods_captured() {
    let mut m = cluster("rst", &["node1", "node2"]);
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10").unwrap();
    m.whoami_server("b", 9090);
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");

    // ztunnel gone: a's connections fail instead of leaving uncaptured
    // (b, PERMISSIVE, would answer a plaintext one).
    let _ = m.stop_node("node1");
    let cap = Capture::start(
        &format!("{}-node1", m.prefix),
        "eth0",
        m.dir.join("down.pcap"),
    );
    for _ in 0..3 {
        assert!(
            m.whoami("a", "10.244.2.10:9090").is_err(),
            "connection escaped while ztunnel was down"
        );
    }
    let raw = cap.stop();
    let pcap = m.dir.join("down.pcap");
    let (_, to_b) = sh_out(&format!(
        "tshark -r {} -Y 'ip.dst==10.244.2.10' 2>/dev/null | wc -l",
        pcap.display()
    ));
    assert_eq!(
        to_b.trim(),
        "0",
        "packets left a for b while ztunnel was down ({} bytes captured)",
        raw.len()
    );
    let traces = capture_traces(&m, "a");
    assert!(traces.contains("REDIRECT --to-ports 15001"), "{traces}");

    // A new ztunnel gets the snapshot and serves a again.
    m.start_ztunnel("node1", &m.dir.join("ca"));
    eventually("ztunnel serves a after restart", || {
        served(&m, "node1") == ["a"]
    });
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");

    // The agent dies hard: pods keep working; a new agent reconciles from
    // its state, and ztunnel keeps serving through the reconnect.
    m.kill_cni_agent("node1");
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");
    m.start_cni_agent("node1", AGENT, &static_plugin(), &[]);
    eventually("ztunnel reconnected to the new agent", || {
        m.agent_log("node1")
            .matches("ztunnel connected; snapshot sent")
            .count()
            >= 3
    });
    assert_eq!(served(&m, "node1"), ["a"]);
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");
    // The new agent still owns a: DEL releases it.
    m.cni("node1", "DEL", "a", "app", "").unwrap();
    assert_eq!(capture_traces(&m, "a"), "");
    eventually("ztunnel drops a", || served(&m, "node1").is_empty());
}

/// Runs our plugin alone, as the last plugin of a chain would be run.
fn plugin(m: &Mesh, cmd: &str, netns: &str, pod: &str, stdin: &str) -> Result<String, CniFailure> {
    let (ns, name) = pod.split_once('/').unwrap();
    let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
    m.exec_plugin(
        "node1",
        "istio-cni",
        cmd,
        "x",
        netns,
        "eth0",
        &args,
        stdin.as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_cni_error_and_leaves_nothing() {
    let mut m = cluster("bad", &["node1"]);
    // Another writer rewrites the node's config without us: repaired.
    let conflist = m.cni_net("node1").conf_dir.join("10-k8s.conflist");
    let ours = std::fs::read_to_string(&conflist).unwrap();
    let mut theirs: serde_json::Value = serde_json::from_str(&ours).unwrap();
    theirs["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "istio-cni");
    std::fs::write(&conflist, theirs.to_string()).unwrap();
    eventually("agent re-chains the plugin", || {
        std::fs::read_to_string(&conflist)
            .unwrap()
            .contains("\"istio-cni\"")
    });
    sh(&format!("ip netns add {}-x", m.prefix));
    let netns = format!("/run/netns/{}-x", m.prefix);
    let (state_dir, socket) = (
        m.dir.join("node1/state").display().to_string(),
        m.plugin_socket("node1").display().to_string(),
    );
    let conf = move |v: &str, extra: &str| {
        format!(
            r#"{{"cniVersion":"{v}","name":"k8s","type":"istio-cni","agent_state_dir":"{state_dir}","agent_socket":"{socket}","prevResult":{{"cniVersion":"{v}","ips":[{{"address":"10.244.1.10/24"}}]}}{extra}}}"#
        )
    };

    let e = plugin(&m, "ADD", &netns, "app/a", "{not json").unwrap_err();
    assert_eq!(e.code(), Some(6), "{e:?}");
    assert!(e.msg().contains("not valid JSON"), "{e:?}");

    let e = plugin(&m, "ADD", &netns, "app/a", &conf("9.9.9", "")).unwrap_err();
    assert_eq!(e.code(), Some(1), "{e:?}");
    assert!(
        e.msg().contains("9.9.9") && e.msg().contains("1.0.0"),
        "{e:?}"
    );
    assert!(plugin(&m, "VERSION", "", "app/a", "{}")
        .unwrap()
        .contains("\"1.0.0\""));

    let e = plugin(
        &m,
        "ADD",
        "/run/netns/does-not-exist",
        "app/a",
        &conf("1.0.0", ""),
    )
    .unwrap_err();
    assert_eq!(e.code(), Some(3), "{e:?}");
    assert!(e.msg().contains("does-not-exist"), "{e:?}");

    let e = plugin(&m, "BOGUS", &netns, "app/a", &conf("1.0.0", "")).unwrap_err();
    assert_eq!(e.code(), Some(4), "{e:?}");

    let e = plugin(
        &m,
        "ADD",
        &netns,
        "app/a",
        &conf("1.0.0", "").replace(",\"prevResult\"", ",\"unchained\""),
    )
    .unwrap_err();
    assert!(e.msg().contains("chained"), "{e:?}");

    // Ambient namespace, pod not declared: no identity, so no start.
    let e = plugin(&m, "ADD", &netns, "app/ghost", &conf("1.0.0", "")).unwrap_err();
    assert_eq!(e.code(), Some(100), "{e:?}");
    assert!(
        e.msg().contains("app/ghost") && e.msg().contains("not in the mesh config"),
        "{e:?}"
    );

    // The mesh config places a at 10.244.1.10: another address is refused by
    // the agent, naming both, and nothing is installed.
    let e = m
        .cni_pod("node1", "a", "app", "a", "10.244.1.99")
        .unwrap_err();
    assert_eq!(e.code(), Some(100), "{e:?}");
    assert!(
        e.msg().contains("10.244.1.99") && e.msg().contains("10.244.1.10"),
        "{e:?}"
    );
    assert_eq!(capture_traces(&m, "a"), "");
    assert!(served(&m, "node1").is_empty());

    // The agent is down: an ambient pod fails (try again later) and is left
    // exactly as it was; a non-ambient pod still starts.
    m.kill_cni_agent("node1");
    let e = plugin(&m, "ADD", &netns, "app/a", &conf("1.0.0", "")).unwrap_err();
    assert_eq!(e.code(), Some(11), "{e:?}");
    assert!(e.msg().contains("unreachable"), "{e:?}");
    let (_, rules) = sh_out(&format!("ip netns exec {}-x iptables-save", m.prefix));
    assert!(!rules.contains("ISTIO"), "{rules}");
    let out = plugin(&m, "ADD", &netns, "plain/c", &conf("1.0.0", "")).unwrap();
    assert!(
        out.contains("10.244.1.10/24"),
        "prevResult passed through: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_is_idempotent_and_leaves_nothing_behind() {
    let mut m = cluster("del", &["node1"]);
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    eventually("ztunnel serves a", || served(&m, "node1") == ["a"]);
    m.cni("node1", "DEL", "a", "app", "").unwrap();
    m.cni("node1", "DEL", "a", "app", "").unwrap();
    assert_eq!(capture_traces(&m, "a"), "");
    assert!(served(&m, "node1").is_empty());
    let node_ns = format!("{}-node1", m.prefix);
    let probe_set = || {
        sh_out(&format!(
            "ip netns exec {node_ns} ipset list istio-inpod-probes-v4"
        ))
        .1
    };
    assert!(!probe_set().contains("10.244.1.10"), "{}", probe_set());
    let state_file = m.dir.join("node1/state/pods.json");
    let state = || std::fs::read_to_string(&state_file).unwrap();
    assert!(!state().contains("\"a\""), "{}", state());
    // The bridge plugin released the address too (host-local keeps a file per IP).
    assert!(!Path::new(&m.dir.join("node1/ipam/k8s-pod-network/10.244.1.10")).exists());

    // A pod never added, and a DEL without a netns at all: both succeed.
    sh(&format!("ip netns add {}-never", m.prefix));
    m.cni("node1", "DEL", "never", "app", "").unwrap();
    plugin(
        &m,
        "DEL",
        "",
        "app/gone",
        r#"{"cniVersion":"1.0.0","name":"k8s","type":"istio-cni"}"#,
    )
    .unwrap();

    // A pod whose netns vanishes without any DEL is pruned by the agent.
    sh(&format!("ip netns del {}-a", m.prefix));
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    eventually("ztunnel serves a again", || served(&m, "node1") == ["a"]);
    assert!(probe_set().contains("10.244.1.10"));
    sh(&format!("ip netns del {}-a", m.prefix));
    eventually("agent prunes the vanished pod", || {
        !state().contains("\"a\"")
    });
    eventually("ztunnel drops it", || served(&m, "node1").is_empty());
    assert!(!probe_set().contains("10.244.1.10"), "{}", probe_set());

    // DEL with the agent down succeeds as well.
    m.kill_cni_agent("node1");
    let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"istio-cni","agent_socket":"/nonexistent.sock"}"#;
    plugin(&m, "DEL", "/run/netns/none", "app/a", conf).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_decides_membership_and_no_mesh_file_is_published() {
    let mut m = cluster("nmf", &["node1"]);
    let state = m.dir.join("node1/state");
    let files: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().all(|f| !f.ends_with(".yaml")), "{files:?}");
    assert!(files.contains(&"membership.json".to_string()), "{files:?}");
    let conflist: serde_json::Value = serde_json::from_slice(
        &std::fs::read(m.cni_net("node1").conf_dir.join("10-k8s.conflist")).unwrap(),
    )
    .unwrap();
    let ours = &conflist["plugins"][1];
    assert_eq!(ours["type"], "istio-cni");
    assert!(ours.get("mesh_config").is_none(), "{ours}");
    assert_eq!(ours["agent_state_dir"], state.display().to_string());
    // The file the agent was started from goes away (the agent keeps its
    // last good state): the plugin never needed it.
    let away = m.dir.join("away.yaml");
    std::fs::rename(&m.config, &away).unwrap();
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    assert!(capture_traces(&m, "a").contains("REDIRECT --to-ports 15001"));
    eventually("ztunnel serves a", || served(&m, "node1") == ["a"]);
    m.cni_pod("node1", "c", "plain", "c", "10.244.1.20")
        .unwrap();
    assert_eq!(capture_traces(&m, "c"), "");
    std::fs::rename(&away, &m.config).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_agent_down_outside_pods_start_and_ambient_pods_wait() {
    let mut m = cluster("adn", &["node1"]);
    m.kill_cni_agent("node1");
    // Ambient namespace: the chain fails with "try again later" and the pod
    // is left without rules.
    let e = m
        .cni_pod("node1", "a", "app", "a", "10.244.1.10")
        .unwrap_err();
    assert_eq!(e.code(), Some(11), "{e:?}");
    assert!(
        e.msg().contains("may be ambient") && e.msg().contains("unreachable"),
        "{e:?}"
    );
    assert_eq!(capture_traces(&m, "a"), "");
    // Not ambient: starts, uncaptured.
    m.cni_pod("node1", "c", "plain", "c", "10.244.1.20")
        .unwrap();
    assert_eq!(capture_traces(&m, "c"), "");

    // The agent is back: it took c in, so labelling c's namespace captures it.
    m.start_cni_agent("node1", AGENT, &static_plugin(), &[]);
    eventually("agent took in c", || {
        m.agent_log("node1")
            .contains("pod started while the agent was away")
    });
    m.write_config(&yaml(true));
    eventually("c captured after labelling", || {
        capture_traces(&m, "c").contains("REDIRECT --to-ports 15001")
    });
    eventually("ztunnel serves c", || {
        served(&m, "node1").contains(&"c".to_string())
    });
}

/// A mesh change costs what it changes: another pod's labels, or another
/// pod entering the mesh, leave an enrolled pod's rules and ztunnel's view
/// of it alone; its own dns-capture annotation rewrites its rules only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_change_reinstalls_only_the_rules_it_changes() {
    let mut m = cluster("inc", &["node1"]);
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    m.cni_pod("node1", "c", "plain", "c", "10.244.1.20")
        .unwrap();
    // The log lines name the pod as a quoted field value.
    let count = |what: &str, pod: &str| {
        let quoted = format!("\"{pod}\"");
        m.agent_log("node1")
            .lines()
            .filter(|l| l.contains(what) && l.contains(&quoted))
            .count()
    };
    let installs = |pod: &str| count("capture rules installed", pod);
    let told = |pod: &str| count("pod captured", pod);
    let decided = || m.agent_log("node1").matches("capture re-decided").count();
    // The agent handles one event at a time: once it has answered a CHECK,
    // what it did for earlier changes is in its log.
    let barrier = || m.cni("node1", "CHECK", "a", "app", "").unwrap();
    assert_eq!((installs("app/a"), told("app/a")), (1, 1));

    // Another pod's labels: re-decided, nothing done.
    let before = decided();
    m.write_config(&yaml(false).replace("labels: {app: c}", "labels: {app: c, tier: web}"));
    eventually("agent re-decided", || decided() > before);
    barrier();
    assert_eq!(
        (installs("app/a"), told("app/a")),
        (1, 1),
        "{}",
        m.agent_log("node1")
    );

    // Another pod enters the mesh: it alone gets rules.
    m.write_config(&yaml(true));
    eventually("c captured after labelling", || told("plain/c") == 1);
    barrier();
    assert!(capture_traces(&m, "c").contains("REDIRECT --to-ports 15001"));
    assert_eq!(served(&m, "node1"), ["a", "c"]);
    assert_eq!((installs("app/a"), told("app/a")), (1, 1));
    assert_eq!(installs("plain/c"), 1);

    // a's own DNS capture is turned off: its rules are rewritten without the
    // DNS redirect; ztunnel already knows it, and c is left alone.
    assert!(capture_traces(&m, "a").contains("--to-ports 15053"));
    m.write_config(&yaml(true).replace(
        "namespace: app, labels: {app: a}}",
        "namespace: app, labels: {app: a}, annotations: {ambient.istio.io/dns-capture: \"false\"}}",
    ));
    eventually("a's rules rewritten", || installs("app/a") == 2);
    barrier();
    let t = capture_traces(&m, "a");
    assert!(
        t.contains("REDIRECT --to-ports 15001") && !t.contains("--to-ports 15053"),
        "{t}"
    );
    assert_eq!(told("app/a"), 1);
    assert_eq!((installs("plain/c"), told("plain/c")), (1, 1));
    assert_eq!(served(&m, "node1"), ["a", "c"]);
}

/// A node whose conflist speaks CNI 1.1.0 (with reference plugins that do):
/// the agent installs the static plugin, which chains, answers in 1.1.0 and
/// captures; the plugin alone converts results to an older version asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_plugin_chains_in_a_cni_1_1_0_conflist() {
    let mut m = cluster_version("v11", &["node1", "node2"], "1.1.0");
    let installed = m.cni_net("node1").bin_dir.join("istio-cni");
    let (_, ldd) = sh_out(&format!("ldd {} 2>&1", installed.display()));
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "installed plugin is dynamically linked: {ldd}"
    );
    let conflist: serde_json::Value = serde_json::from_slice(
        &std::fs::read(m.cni_net("node1").conf_dir.join("10-k8s.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conflist["cniVersion"], "1.1.0");
    assert_eq!(
        conflist["cniVersions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
    assert_eq!(conflist["plugins"][1]["type"], "istio-cni");
    // Ready (plugin and config installed, ZDS up) on Istio's probe port;
    // metrics under Istio's names on 15014.
    let node_ns = format!("{}-node1", m.prefix);
    let (_, ready) = sh_out(&format!(
        "ip netns exec {node_ns} curl -s -w ' %{{http_code}}' http://127.0.0.1:8000/readyz"
    ));
    assert_eq!(ready.trim(), "ready\n 200", "{ready}");
    let (_, metrics) = sh_out(&format!(
        "ip netns exec {node_ns} curl -s http://127.0.0.1:15014/metrics"
    ));
    for want in [
        "istio_cni_install_ready 1",
        "ztunnel_connected 1",
        "istio_cni_installs_total{result=\"SUCCESS\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing: {metrics}");
    }

    let result = m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    assert_eq!(result["cniVersion"], "1.1.0", "{result}");
    assert_eq!(result["ips"][0]["address"], "10.244.1.10/24", "{result}");
    assert!(result["ips"][0].get("version").is_none(), "{result}");
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10").unwrap();
    assert!(capture_traces(&m, "a").contains("REDIRECT --to-ports 15001"));
    eventually("ztunnel serves a", || served(&m, "node1") == ["a"]);
    m.whoami_server("b", 9090);
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");
    // 1.1.0's verbs: ready, and nothing to collect.
    for verb in ["STATUS", "GC"] {
        let conf = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"istio-cni"}"#;
        let out = plugin(&m, verb, "", "app/a", conf).unwrap();
        assert_eq!(out.trim(), "", "{verb}");
    }
    m.cni("node1", "DEL", "a", "app", "").unwrap();
    assert_eq!(capture_traces(&m, "a"), "");

    // Asked in 0.3.1 with a 1.0.0-shaped prevResult: answered in 0.3.1 (an
    // excluded namespace's pod, so the answer needs no agent).
    sh(&format!("ip netns add {}-old", m.prefix));
    let conf = r#"{"cniVersion":"0.3.1","name":"k8s","type":"istio-cni","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.30/24"}]}}"#;
    let netns = format!("/run/netns/{}-old", m.prefix);
    let out: serde_json::Value =
        serde_json::from_str(&plugin(&m, "ADD", &netns, "kube-system/old", conf).unwrap()).unwrap();
    assert_eq!(out["cniVersion"], "0.3.1", "{out}");
    assert_eq!(out["ips"][0]["version"], "4", "{out}");
    let e = plugin(
        &m,
        "ADD",
        &netns,
        "kube-system/old",
        &conf.replace("0.3.1", "1.2.0"),
    )
    .unwrap_err();
    assert_eq!(e.code(), Some(1), "{e:?}");
    assert!(e.msg().contains("\"1.2.0\""), "{e:?}");
}

/// A pod that was running before its node had an agent (no ADD ever
/// reached us, its conflist did not chain istio-cni yet) is found by its
/// netns when the agent starts and captured, its process left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_running_before_the_agent_is_captured_when_it_starts() {
    let mut m = Mesh::new("pre", &workspace_bin("ztunnel"));
    m.write_config(&yaml(false));
    let ca = m.dir.join("ca");
    m.cni_node("node1", 1);
    m.cni_node("node2", 2);
    m.start_cni_agent("node2", AGENT, &static_plugin(), &[]);
    m.start_ztunnel("node2", &ca);
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10").unwrap();
    // node1 without an agent: the bridge alone networks a.
    m.cni_pod("node1", "a", "app", "a", "10.244.1.10").unwrap();
    assert_eq!(capture_traces(&m, "a"), "");
    // The pod's own process (Mesh's drop kills what runs in its netns).
    let mut app = std::process::Command::new("ip")
        .args(["netns", "exec", &m.pod_ns("a"), "sleep", "600"])
        .spawn()
        .unwrap();
    let a_ns = m.pod_ns("a");
    let pids = || sh_out(&format!("ip netns pids {a_ns}")).1;
    eventually("a's process runs", || !pids().trim().is_empty());
    let before = pids();
    // The node's /proc as the agent reads it: this node's processes only
    // (the machine's holds other tests' pods with the same addresses).
    let proc_dir = m.dir.join("node1/proc").join(app.id().to_string());
    std::fs::create_dir_all(proc_dir.join("ns")).unwrap();
    for ns in ["net", "user"] {
        std::os::unix::fs::symlink(
            format!("/proc/{}/ns/{ns}", app.id()),
            proc_dir.join("ns").join(ns),
        )
        .unwrap();
    }

    // A process in a user namespace of its own gives a netns of its own
    // a's address: not a pod's (runtimes make pods' netns in the node's
    // user namespace), so it is not a second candidate and a is taken in.
    let marker = m.dir.join("impostor-ready");
    let mut impostor = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && ip addr add 10.244.1.10/32 dev lo && touch {} && exec sleep 600",
            marker.display()
        ))
        .spawn()
        .unwrap();
    eventually("the impostor netns holds a's address", || marker.exists());
    let fake = m
        .dir
        .join("node1/proc")
        .join(impostor.id().to_string())
        .join("ns");
    std::fs::create_dir_all(&fake).unwrap();
    for ns in ["net", "user"] {
        std::os::unix::fs::symlink(format!("/proc/{}/ns/{ns}", impostor.id()), fake.join(ns))
            .unwrap();
    }

    m.start_cni_agent("node1", AGENT, &static_plugin(), &[]);
    let _ = impostor.kill();
    let _ = impostor.wait();
    m.start_ztunnel("node1", &ca);
    assert!(
        m.agent_log("node1")
            .contains("pod running before the agent; taking it in"),
        "{}",
        m.agent_log("node1")
    );
    let traces = capture_traces(&m, "a");
    assert!(traces.contains("REDIRECT --to-ports 15001"), "{traces}");
    eventually("ztunnel serves a", || served(&m, "node1") == ["a"]);
    m.whoami_server("b", 9090);
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");
    assert_eq!(pids(), before, "a's process was restarted");
    assert!(app.try_wait().unwrap().is_none(), "a's process exited");
    let _ = app.kill();
    let _ = app.wait();
}

/// Dual-stack nodes (host-local hands out an address per family): the
/// agent captures the pod's IPv6 too (ip6tables, same chains) and v6
/// traffic between pods goes through ztunnel, the server seeing the
/// client's v6 address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_are_captured_for_both_families() {
    let pod = |name: &str, node: &str, v4: &str, v6: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app}}\nspec: {{serviceAccountName: {name}, nodeName: {node}}}\nstatus: {{podIP: {v4}, podIPs: [{{ip: {v4}}}, {{ip: '{v6}'}}]}}\n"
        )
    };
    let mut m = Mesh::new("dual", &workspace_bin("ztunnel"));
    m.write_config(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}\n{}{}",
        pod("a", "node1", "10.244.1.10", "fd00:10:244:1::10"),
        pod("b", "node2", "10.244.2.10", "fd00:10:244:2::10"),
    ));
    let ca = m.dir.join("ca");
    for (i, n) in ["node1", "node2"].iter().enumerate() {
        m.cni_node_dual_stack(n, i as u8 + 1);
        m.start_cni_agent(n, AGENT, &static_plugin(), &[]);
        m.start_ztunnel(n, &ca);
    }
    let out = m
        .cni_pod("node1", "a", "app", "a", "10.244.1.10,fd00:10:244:1::10")
        .unwrap();
    assert_eq!(out["ips"].as_array().map(Vec::len), Some(2), "{out}");
    m.cni_pod("node2", "b", "app", "b", "10.244.2.10,fd00:10:244:2::10")
        .unwrap();
    let v6_rules = in_pod(&m, "a", "ip6tables-save");
    assert!(v6_rules.contains("REDIRECT --to-ports 15001"), "{v6_rules}");
    assert!(in_pod(&m, "a", "ip -6 rule show").contains("fwmark 0x111/0xfff"));
    eventually("ztunnels serve a and b", || {
        served(&m, "node1") == ["a"] && served(&m, "node2") == ["b"]
    });
    m.whoami_server("b", 9090);
    assert_eq!(
        m.whoami("a", "[fd00:10:244:2::10]:9090").unwrap(),
        "b fd00:10:244:1::10"
    );
    assert_eq!(m.whoami("a", "10.244.2.10:9090").unwrap(), "b 10.244.1.10");
    // Through ztunnel: node2 counted an mTLS connection from a.
    assert!(m.metrics("node2").lines().any(|l| l
        .starts_with("istio_tcp_connections_opened_total")
        && l.contains("reporter=\"destination\"")
        && l.contains("connection_security_policy=\"mutual_tls\"")
        && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/a\"")));

    // DEL takes both families' rules out.
    m.cni("node1", "DEL", "a", "app", "").unwrap();
    let left = in_pod(&m, "a", "ip6tables-save");
    assert!(!left.contains("ISTIO"), "{left}");
}
