//! Real peers built by `scripts/peers.sh` run as pods of the mesh.

use std::fs::File;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{in_ns, Mesh};

impl Mesh {
    /// Runs `$MESH_PEERS_DIR/bin/<bin>` with `args` inside `pod`'s netns
    /// (its log in `<dir>/<bin>.log`), waiting until each of `ports`
    /// accepts there. Reaped when the mesh is dropped.
    pub fn start_peer(&self, pod: &str, bin: &str, args: &[&str], ports: &[u16]) {
        let path = crate::cluster::peers_dir().join("bin").join(bin);
        assert!(
            path.exists(),
            "{} missing: build the peers first with scripts/peers.sh",
            path.display()
        );
        let ns = self.pod_ns(pod);
        let log = self.dir.join(format!("{bin}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&path)
            .args(args)
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(self.dir.join(format!("{bin}.err"))).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.peers.lock().unwrap().push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in ports {
            loop {
                if in_ns(&ns, move || TcpStream::connect(("127.0.0.1", port)).is_ok()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{bin} did not listen on {port}; log:\n{}",
                    std::fs::read_to_string(self.dir.join(format!("{bin}.err")))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
