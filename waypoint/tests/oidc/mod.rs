//! The OIDC provider the JWT tests run (testbed/peers/oidc: mockoidc behind
//! a tiny main), in a pod netns of the mesh's bridge.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use testbed::*;

pub const ISSUER: &str = "https://idp.test";
/// The provider's pod address: HTTPS on 8443, control on its loopback 9000.
pub const IDP: &str = "10.244.2.40";

/// A process of the test's, killed when dropped.
pub struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn oidc_bin() -> PathBuf {
    let dir = std::env::var("MESH_PEERS_DIR").unwrap_or_else(|_| "/var/cache/mesh-peers".into());
    let p = PathBuf::from(dir).join("bin/oidc");
    assert!(
        p.exists(),
        "{} missing: build the peers first with scripts/peers.sh",
        p.display()
    );
    p
}

/// The provider in the `idp` pod: HTTPS on 8443 with a certificate for its
/// address from a CA in `dir` (returned: the CA file the waypoint trusts).
pub fn start_idp(m: &Mesh) -> (Peer, PathBuf) {
    let dir = m.dir.join("idp-ca");
    std::fs::create_dir_all(&dir).unwrap();
    identity::BuiltinCa::load_or_create(&dir, "idp.test").unwrap();
    let (cert, key) = issue_raw_cert(
        &dir,
        vec![rcgen::SanType::IpAddress(IDP.parse().unwrap())],
        (2024, 1, 1),
        (2099, 1, 1),
        &dir,
        "idp",
    );
    let log = std::fs::File::create(m.dir.join("idp.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &m.pod_ns("idp")])
        .arg(oidc_bin())
        .args(["-listen", "0.0.0.0:8443", "-issuer", ISSUER])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (Peer(child), dir.join("root-cert.pem"))
}

pub fn idp(m: &Mesh, path: &str, body: &str) -> String {
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 5 -X POST --data-binary '{body}' http://127.0.0.1:9000{path}",
        m.pod_ns("idp")
    ));
    out
}

/// A token the provider signs with its current key.
pub fn mint(m: &Mesh, claims: serde_json::Value) -> String {
    let t = idp(m, "/token", &claims.to_string());
    assert_eq!(t.split('.').count(), 3, "not a token: {t}");
    t
}

/// Waits for the provider's control port.
pub async fn wait_ready(m: &Mesh) {
    eventually(
        "the OIDC provider's control port",
        std::time::Duration::from_secs(10),
        || idp(m, "/issuer", "") == ISSUER,
    )
    .await;
}
