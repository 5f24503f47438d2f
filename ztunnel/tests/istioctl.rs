//! Istio's own istioctl (built from the pinned istio module by
//! scripts/peers.sh) reads our ztunnel's `/config_dump`: `istioctl
//! ztunnel-config ... --file <dump>` must list our pods, services, policies
//! and certificates, not print empty tables.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

const POLICY: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-from-client, namespace: app}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/app/sa/client]}
";

/// istioctl from the peers cache, as the cluster tests find kube-apiserver
/// and istiod. `None` (the test skips) only when it is missing and
/// `MESH_PEERS_OPTIONAL=1` says a machine without peers is expected.
fn istioctl() -> Option<PathBuf> {
    let dir = std::env::var("MESH_PEERS_DIR").unwrap_or_else(|_| "/var/cache/mesh-peers".into());
    let bin = Path::new(&dir).join("bin/istioctl");
    if bin.exists() {
        return Some(bin);
    }
    let optional = std::env::var("MESH_PEERS_OPTIONAL").is_ok_and(|v| v == "1");
    assert!(
        optional,
        "{} missing: build it with scripts/peers.sh (or set MESH_PEERS_OPTIONAL=1 to skip)",
        bin.display()
    );
    eprintln!("SKIP: {} missing and MESH_PEERS_OPTIONAL=1", bin.display());
    None
}

/// Runs `istioctl ztunnel-config <what> --file <dump>`; its stdout.
fn ztunnel_config(istioctl: &Path, dir: &Path, what: &str, dump: &Path) -> String {
    // istioctl builds its Kubernetes client config before it looks at
    // --file; a kubeconfig that points nowhere keeps it off any real cluster.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: 'https://127.0.0.1:1'}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
users: [{name: none, user: {}}]
current-context: none
",
    )
    .unwrap();
    let out = Command::new(istioctl)
        .args(["ztunnel-config", what, "--file"])
        .arg(dump)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir)
        .output()
        .expect("run istioctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "istioctl ztunnel-config {what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The row whose whitespace-separated columns start with `cols`.
fn row<'a>(table: &'a str, cols: &[&str]) -> Option<&'a str> {
    table.lines().find(|l| {
        let got: Vec<&str> = l.split_whitespace().collect();
        got.len() >= cols.len() && got[..cols.len()] == *cols
    })
}

fn save_dump(m: &Mesh, node: &str) -> PathBuf {
    let (code, body) = m.http(node, 15000, "/config_dump").expect("admin answers");
    assert_eq!(code, 200);
    let path = m.dir.join(format!("{node}-dump.json"));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istioctl_reads_workloads_services_policies_and_certificates() {
    let Some(istioctl) = istioctl() else { return };
    let m = two_nodes("ictl", ZT, POLICY).await;
    m.echo_server("server-2", 8080);
    // Traffic, so the client's certificate is issued and a connection from
    // it is live on node2 while we dump.
    let mut live = m.connect("client", "10.244.2.11:8080").unwrap();
    live.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut live, &mut b).unwrap();

    let dump1 = save_dump(&m, "node1");
    let dir = &m.dir;

    let workloads = ztunnel_config(&istioctl, dir, "workloads", &dump1);
    for (pod, ip, node, proto) in [
        ("client", "10.244.1.10", "node1", "HBONE"),
        ("other", "10.244.2.10", "node2", "HBONE"),
        ("server-1", "10.244.1.11", "node1", "HBONE"),
        ("server-2", "10.244.2.11", "node2", "HBONE"),
        ("outsider", "10.244.3.10", "node2", "TCP"),
    ] {
        assert!(
            row(&workloads, &["app", pod, ip, node, "None", proto]).is_some(),
            "no row for {pod}:\n{workloads}"
        );
    }

    let services = ztunnel_config(&istioctl, dir, "services", &dump1);
    assert!(
        row(&services, &["app", "server", "10.96.0.10", "None", "2/2"]).is_some(),
        "server with both endpoints healthy:\n{services}"
    );

    let policies = ztunnel_config(&istioctl, dir, "policies", &dump1);
    assert!(
        row(
            &policies,
            &["app", "server-from-client", "Allow", "WorkloadSelector"]
        )
        .is_some(),
        "{policies}"
    );

    // The client's leaf and root: valid now, with the leaf's expiry as the
    // dump has it, in the future and within --cert-ttl's default (24h).
    let certificates = ztunnel_config(&istioctl, dir, "certificates", &dump1);
    let id = "spiffe://cluster.local/ns/app/sa/client";
    let leaf = row(&certificates, &[id, "Leaf", "Available", "true"])
        .unwrap_or_else(|| panic!("no valid leaf for {id}:\n{certificates}"));
    assert!(
        row(&certificates, &[id, "Root", "Available", "true"]).is_some(),
        "{certificates}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump1).unwrap()).unwrap();
    let cert = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == id)
        .unwrap();
    let expiry = cert["certChain"][0]["expirationTime"].as_str().unwrap();
    let cols: Vec<&str> = leaf.split_whitespace().collect();
    assert_eq!(cols[5], expiry, "NOT AFTER column: {leaf}");
    // istioctl prints the serial in hex from the decimal we give it.
    assert!(
        cols[4].len() >= 16 && cols[4].chars().all(|c| c.is_ascii_hexdigit()),
        "{leaf}"
    );
    let now = identity::rfc3339(SystemTime::now());
    let day = identity::rfc3339(SystemTime::now() + Duration::from_secs(24 * 3600 + 60));
    // RFC 3339 UTC with whole seconds sorts as text.
    assert!(
        now.as_str() < expiry && expiry < day.as_str(),
        "{now} < {expiry} < {day}"
    );

    let all = ztunnel_config(&istioctl, dir, "all", &dump1);
    for part in [&workloads, &services, &policies] {
        for line in part.lines().skip(1) {
            assert!(
                all.contains(line.trim_end()),
                "`all` lacks {line:?}:\n{all}"
            );
        }
    }
    assert!(
        all.contains(leaf.split_whitespace().nth(4).unwrap()),
        "{all}"
    );

    // node2 holds the live inbound connection from the client, for server-2.
    let dump2 = save_dump(&m, "node2");
    let connections = ztunnel_config(&istioctl, dir, "connections", &dump2);
    assert!(
        connections.lines().any(|l| l.starts_with("server-2.app")
            && l.contains("Inbound")
            && l.contains("client.app")),
        "{connections}"
    );
    drop(live);
}
