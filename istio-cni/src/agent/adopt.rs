//! Pods that were already running when the agent started (installed into a
//! live cluster, or started while no agent ran and its plugin was not yet
//! chained): they never had an ADD for us, so nothing tells us their netns.
//! As Istio's agent does, we find it on the node: every netns the node has
//! (the runtime's netns dir, and each process's `<proc>/<pid>/ns/net`), the
//! one holding the pod's address is the pod's. The pod keeps running; its
//! capture starts now.
//!
//! A pod is adopted only if the mesh says it is ambient, on this node, with
//! an address, and no record of it exists (a record's netns is known).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::records::Record;
use super::{blocking, pod_name, Agent, Key};
use crate::membership::{decide, Membership};

/// Every netns on the node but the node's own and the agent's, one path
/// each, by (device, inode): the runtime's name in `netns_dir` where it has
/// one (it lasts, unlike `/proc/<pid>`, whose pid may go and be reused).
fn candidates(netns_dir: &Path, proc_root: &Path) -> Vec<PathBuf> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let skip: Vec<_> = [
        id(&proc_root.join("1/ns/net")),
        id(Path::new("/proc/self/ns/net")),
    ]
    .into_iter()
    .flatten()
    .collect();
    // The agent's own user namespace is the node's (it runs privileged in
    // it); PID 1's is not always readable, even to root.
    let node_user = id(Path::new("/proc/self/ns/user"));
    let mut found: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let named = std::fs::read_dir(netns_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let procs = std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        // A process in a user namespace of its own can make a netns and
        // give it any address, a pod's among them: only netns of the
        // node's user namespace (what runtimes make for pods) are pods'.
        .filter(|e| id(&e.path().join("ns/user")) == node_user)
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(procs) {
        if let Some(key) = id(&path).filter(|k| !skip.contains(k)) {
            found.entry(key).or_insert(path);
        }
    }
    found.into_values().collect()
}

/// The addresses inside `netns`.
fn addresses(netns: &Path) -> Vec<IpAddr> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "-o", "addr", "show"])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|t| *t == "inet" || *t == "inet6")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

impl Agent {
    /// Takes in the ambient pods of this node that run without a record,
    /// with the netns that holds their address. Returns the keys taken in.
    pub(super) async fn adopt_running(&mut self) -> Vec<Key> {
        let wanted: BTreeMap<IpAddr, Key> = self
            .state
            .workloads
            .values()
            .filter(|w| &*w.node == self.cfg.node.as_str() && !w.ip.is_unspecified())
            .map(|w| (w.namespace.to_string(), w.name.clone()))
            .filter(|k| !self.pods.contains_key(k))
            .filter_map(|k| {
                match decide(
                    &self.state,
                    &k.0,
                    &k.1,
                    &self.cfg.exclude_namespaces,
                    self.cfg.dns_capture,
                ) {
                    Membership::Ambient { ip, .. } if !ip.is_unspecified() => Some((ip, k)),
                    _ => None,
                }
            })
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let (netns_dir, proc_root) = (self.cfg.netns_dir.clone(), self.cfg.proc_root.clone());
        let netns: Vec<(PathBuf, Vec<IpAddr>)> = blocking(move || {
            Ok::<_, std::convert::Infallible>(
                candidates(&netns_dir, &proc_root)
                    .into_iter()
                    .map(|p| {
                        let a = addresses(&p);
                        (p, a)
                    })
                    .collect(),
            )
        })
        .await
        .expect("infallible");
        // Every netns holding each wanted address: a pod is taken in only
        // when exactly one does. Two mean one is not the pod's, and handing
        // the wrong one to ztunnel would serve it under the pod's identity
        // (and leave the pod itself uncaptured), so neither is taken.
        let mut holders: BTreeMap<Key, Vec<(PathBuf, IpAddr)>> = BTreeMap::new();
        for (path, ips) in netns {
            if let Some((ip, key)) = ips
                .iter()
                .find_map(|ip| Some((*ip, wanted.get(ip)?.clone())))
            {
                holders.entry(key).or_default().push((path, ip));
            }
        }
        let mut taken = Vec::new();
        for (key, mut found) in holders {
            if found.len() > 1 {
                let netns: Vec<String> =
                    found.iter().map(|(p, _)| p.display().to_string()).collect();
                tracing::error!(pod = pod_name(&key), ?netns, "several netns hold the pod's address; none taken in (the pod stays uncaptured until it restarts)");
                continue;
            }
            let (path, ip) = found.pop().expect("one holder");
            tracing::info!(pod = pod_name(&key), %ip, netns = %path.display(), "pod running before the agent; taking it in");
            self.pods.insert(
                key.clone(),
                Record {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    container_id: String::new(),
                    netns: path,
                    ips: vec![ip],
                    enrolled: None,
                    refused: None,
                },
            );
            taken.push(key);
        }
        let missing: Vec<String> = wanted
            .values()
            .filter(|k| !self.pods.contains_key(k))
            .map(pod_name)
            .collect();
        if !missing.is_empty() {
            tracing::info!(?missing, "ambient pods of this node with no netns found (not started yet: their ADD takes them in)");
        }
        taken
    }
}
