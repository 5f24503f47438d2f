//! What the waypoint's end-to-end test files share: reading its access log
//! and the Python peers some of them run inside pods.

#![allow(dead_code)] // each test file uses its own part

pub mod dashboards;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testbed::*;

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

/// Every line of the waypoint's JSON access log so far (each must be JSON).
pub fn access_log(m: &Mesh) -> Vec<serde_json::Value> {
    // The waypoint flushes its access log every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::read_to_string(m.dir.join("waypoint-access.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("access log line is not JSON: {l}: {e}"))
        })
        .collect()
}

/// Python peers, killed (by their own pid) when the test ends, pass or fail.
#[derive(Default)]
pub struct Peers(Vec<Child>);

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Peers {
    /// Starts `tests/peers/<script> args` in `pod` and waits for it to
    /// listen on `port`.
    pub fn start(&mut self, m: &Mesh, pod: &str, script: &str, args: &[&str], port: u16) {
        let log_path = m.dir.join(format!("{script}-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &m.pod_ns(pod), "python3", "-u"])
            .arg(format!("{PEERS}/{script}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3 (run scripts/deps.sh)");
        self.0.push(child);
        for _ in 0..100 {
            if in_ns(&m.pod_ns(pod), move || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{script} did not listen on {port}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
}
