//! The node agent: owns which pods on this node are captured. One task holds
//! all state and handles one event at a time (plugin calls, ztunnel
//! connections, config changes, a periodic prune), which matches ZDS's
//! lockstep and needs no locks.
//!
//! Fail-closed rules of thumb: rules go in before ztunnel hears of a pod and
//! stay in while ztunnel or the agent is away (traffic fails rather than
//! leaving in plaintext); they come out only when the pod leaves the mesh.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh::MeshState;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use zds::{WorkloadInfo, ZdsConn, ZdsError, ZdsServer};

use crate::api::{Op, Request, Response};
use crate::membership::{decide, Membership};
use crate::{host, redirect};

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub mesh_config: PathBuf,
    pub zds_socket: PathBuf,
    pub plugin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub dns_capture: bool,
    pub exclude_namespaces: Vec<String>,
    /// Keep the node's probe SNAT rule and ipset.
    pub probe_snat: bool,
    /// In a cluster: annotate captured pods so istiod advertises them as
    /// reachable over HBONE.
    pub annotator: Option<kube_source::PodAnnotator>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Enrolled {
    uid: String,
    ip: IpAddr,
    service_account: String,
    options: redirect::Options,
}

/// A pod the plugin told us about. Persisted, so a restarted agent knows
/// every netns it captured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    namespace: String,
    name: String,
    container_id: String,
    netns: PathBuf,
    ips: Vec<IpAddr>,
    /// Rules installed and handed (or queued for the next snapshot) to ztunnel.
    enrolled: Option<Enrolled>,
}

type Key = (String, String);

enum Event {
    Plugin(Request, oneshot::Sender<Response>),
    Ztunnel(ZdsConn),
    Tick,
}

struct Agent {
    cfg: Config,
    state: Arc<MeshState>,
    config_bytes: Vec<u8>,
    pods: BTreeMap<Key, Record>,
    ztunnel: Option<ZdsConn>,
    /// What `pods.json` holds: rewritten only when the records change (a
    /// config change on a busy node would otherwise rewrite it each time).
    persisted: Vec<u8>,
}

/// Runs until `stop`; leaves every captured pod captured on exit.
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let config_bytes = std::fs::read(&cfg.mesh_config)
        .with_context(|| format!("read mesh config {}", cfg.mesh_config.display()))?;
    let state = mesh::standalone::parse(
        &String::from_utf8_lossy(&config_bytes),
        identity::DEFAULT_TRUST_DOMAIN,
    )
    .with_context(|| format!("mesh config {}", cfg.mesh_config.display()))?;
    if cfg.probe_snat {
        blocking(host::install)
            .await
            .context("node probe SNAT rule")?;
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
    publish_config(&cfg.state_dir, &config_bytes);
    let pods = load_records(&cfg.state_dir.join(STATE_FILE))?;
    let mut agent = Agent {
        cfg: cfg.clone(),
        state: Arc::new(state),
        config_bytes,
        pods,
        ztunnel: None,
        persisted: Vec::new(),
    };
    // What a previous agent captured is re-checked before anyone is served.
    agent.prune().await;
    let keys: Vec<Key> = agent.pods.keys().cloned().collect();
    for k in keys {
        if let Err(e) = agent.reconcile(&k).await {
            tracing::error!(pod = %format!("{}/{}", k.0, k.1), error = %e, "reconcile on start failed");
        }
    }
    agent.persist();
    tracing::info!(
        pods = agent.pods.len(),
        enrolled = agent.pods.values().filter(|r| r.enrolled.is_some()).count(),
        "node agent reconciled"
    );

    let zds = ZdsServer::bind(&cfg.zds_socket)
        .with_context(|| format!("ZDS socket {}", cfg.zds_socket.display()))?;
    if let Some(d) = cfg.plugin_socket.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(&cfg.plugin_socket);
    let plugin = UnixListener::bind(&cfg.plugin_socket)
        .with_context(|| format!("plugin socket {}", cfg.plugin_socket.display()))?;
    let (tx, mut rx) = mpsc::channel(64);
    // The accept loops and the ticker hold nothing to drain: aborted on stop.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(accept_ztunnels(zds, tx.clone()));
    tasks.spawn(accept_plugin(plugin, tx.clone()));
    tasks.spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(500));
        while tx.send(Event::Tick).await.is_ok() {
            t.tick().await;
        }
    });
    tracing::info!(zds = %cfg.zds_socket.display(), plugin = %cfg.plugin_socket.display(), "node agent serving");
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.wait_for(|s| *s) => None,
        };
        match ev {
            Some(Event::Plugin(req, reply)) => {
                let error = agent.plugin(req).await.err();
                let _ = reply.send(Response { error });
            }
            Some(Event::Ztunnel(conn)) => agent.snapshot(conn).await,
            Some(Event::Tick) => {
                agent.refresh_config().await;
                agent.prune().await;
            }
            None => break,
        }
    }
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&cfg.plugin_socket);
    tracing::info!("node agent stopped; captured pods stay captured");
    Ok(())
}

const STATE_FILE: &str = "pods.json";
/// The last good mesh config, where the CNI plugin (a host binary that cannot
/// see the agent container's files) reads membership from.
pub const PLUGIN_CONFIG: &str = "mesh.yaml";

fn publish_config(state_dir: &Path, bytes: &[u8]) {
    let path = state_dir.join(PLUGIN_CONFIG);
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)) {
        tracing::error!(path = %path.display(), error = %e, "cannot publish the mesh config for the CNI plugin");
    }
}

fn load_records(path: &Path) -> anyhow::Result<BTreeMap<Key, Record>> {
    let records: Vec<Record> = match std::fs::read(path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("agent state {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("agent state {}", path.display())),
    };
    Ok(records
        .into_iter()
        .map(|r| ((r.namespace.clone(), r.name.clone()), r))
        .collect())
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

async fn accept_ztunnels(server: ZdsServer, tx: mpsc::Sender<Event>) {
    loop {
        match server.accept().await {
            Ok(conn) => {
                if tx.send(Event::Ztunnel(conn)).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "ZDS accept failed"),
        }
    }
}

async fn accept_plugin(l: UnixListener, tx: mpsc::Sender<Event>) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            // One bounded line: a plugin request is a few hundred bytes.
            let read = BufReader::new(r.take(64 * 1024)).read_line(&mut line).await;
            let resp = match read.map_err(|e| e.to_string()).and_then(|_| {
                serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
            }) {
                Ok(req) => {
                    let (otx, orx) = oneshot::channel();
                    if tx.send(Event::Plugin(req, otx)).await.is_err() {
                        return;
                    }
                    match orx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                Err(error) => Response { error: Some(error) },
            };
            let mut out = serde_json::to_vec(&resp).expect("response serializes");
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

impl Agent {
    fn persist(&mut self) {
        let records: Vec<&Record> = self.pods.values().collect();
        let bytes = serde_json::to_vec_pretty(&records).expect("JSON");
        if bytes == self.persisted {
            return;
        }
        let path = self.cfg.state_dir.join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &path));
        match result {
            Ok(()) => self.persisted = bytes,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot persist agent state")
            }
        }
    }

    /// Re-reads the mesh config; a bad file keeps the last good state.
    /// Returns whether anything changed.
    async fn refresh_config(&mut self) -> bool {
        let Ok(bytes) = tokio::fs::read(&self.cfg.mesh_config).await else {
            return false;
        };
        if bytes == self.config_bytes {
            return false;
        }
        self.config_bytes = bytes;
        match mesh::standalone::parse(
            &String::from_utf8_lossy(&self.config_bytes),
            identity::DEFAULT_TRUST_DOMAIN,
        ) {
            Ok(s) => {
                self.state = Arc::new(s);
                publish_config(&self.cfg.state_dir, &self.config_bytes);
            }
            Err(e) => {
                tracing::error!(error = %e, "mesh config rejected; capture decisions keep the last good one");
                return false;
            }
        }
        tracing::info!("mesh config changed; re-deciding capture");
        let keys: Vec<Key> = self.pods.keys().cloned().collect();
        for k in keys {
            if let Err(e) = self.reconcile(&k).await {
                tracing::error!(pod = %format!("{}/{}", k.0, k.1), error = %e, "reconcile failed");
            }
        }
        self.persist();
        true
    }

    async fn plugin(&mut self, req: Request) -> Result<(), String> {
        let key = (req.namespace.clone(), req.name.clone());
        let pod = format!("{}/{}", req.namespace, req.name);
        match req.op {
            Op::Add | Op::Observe => {
                // The plugin decided from the file just now; decide from the same.
                self.refresh_config().await;
                let netns = req.netns.clone().ok_or("ADD without a netns path")?;
                if let Some(old) = self.pods.get(&key).filter(|o| o.netns != netns) {
                    // A recreated sandbox: the old netns leaves the mesh.
                    tracing::info!(pod, old = %old.netns.display(), new = %netns.display(), "pod sandbox replaced");
                    self.unenrol(&key).await;
                }
                let enrolled = self.pods.get(&key).and_then(|o| o.enrolled.clone());
                self.pods.insert(
                    key.clone(),
                    Record {
                        namespace: req.namespace,
                        name: req.name,
                        container_id: req.container_id,
                        netns,
                        ips: req.ips,
                        enrolled,
                    },
                );
                let result = self.reconcile(&key).await;
                if result.is_err() && req.op == Op::Add {
                    // Failed ADD: the runtime will retry with a fresh call.
                    self.pods.remove(&key);
                }
                self.persist();
                match (req.op, result) {
                    (Op::Add, Err(e)) => Err(e),
                    (Op::Add, Ok(())) if self.pods[&key].enrolled.is_none() => {
                        Err(format!("the node agent does not consider {pod} ambient"))
                    }
                    (_, r) => r,
                }
            }
            Op::Check => {
                let r = self
                    .pods
                    .get(&key)
                    .ok_or(format!("{pod} is not known to the node agent"))?;
                if r.enrolled.is_none() {
                    return Err(format!("{pod} is not enrolled"));
                }
                let netns = r.netns.clone();
                match blocking(move || redirect::installed(&netns)).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!("{pod}: capture rules are missing")),
                    Err(e) => Err(e.to_string()),
                }
            }
            Op::Del => {
                if self.pods.contains_key(&key) {
                    self.unenrol(&key).await;
                    self.pods.remove(&key);
                    self.persist();
                    tracing::info!(pod, "pod deleted");
                }
                Ok(())
            }
        }
    }

    /// Pods whose netns vanished without a DEL (the agent was down, or the
    /// runtime skipped it) are forgotten, and ztunnel told.
    async fn prune(&mut self) {
        let gone: Vec<Key> = self
            .pods
            .iter()
            .filter(|(_, r)| !r.netns.exists())
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            tracing::info!(pod = %format!("{}/{}", k.0, k.1), "netns gone; removing pod");
            self.unenrol(&k).await;
            self.pods.remove(&k);
        }
        self.persist();
    }

    /// Brings one pod to what the config says it should be.
    async fn reconcile(&mut self, key: &Key) -> Result<(), String> {
        let r = self.pods.get(key).expect("caller holds the key").clone();
        let pod = format!("{}/{}", r.namespace, r.name);
        let want = match decide(
            &self.state,
            &r.namespace,
            &r.name,
            &self.cfg.exclude_namespaces,
            self.cfg.dns_capture,
        ) {
            Membership::Ambient {
                uid,
                ip,
                node,
                service_account,
                options,
            } => {
                if node != self.cfg.node {
                    return Err(format!(
                        "the mesh config places {pod} on node {node}, but it runs on {}",
                        self.cfg.node
                    ));
                }
                let ip = match r.ips.first() {
                    Some(cni) if ip.is_unspecified() => *cni,
                    _ => ip,
                };
                if ip.is_unspecified() {
                    return Err(format!(
                        "{pod} has no address yet (neither CNI nor the API reported one)"
                    ));
                }
                if !r.ips.is_empty() && !r.ips.contains(&ip) {
                    return Err(format!(
                        "{pod} got {:?} from the CNI, but the mesh config declares podIP {ip}",
                        r.ips
                    ));
                }
                Enrolled {
                    uid,
                    ip,
                    service_account,
                    options,
                }
            }
            Membership::Undeclared => {
                self.unenrol(key).await;
                return Err(format!(
                    "{pod} is in an ambient namespace but not in the mesh config"
                ));
            }
            Membership::Outside(why) => {
                if r.enrolled.is_some() {
                    tracing::info!(pod, why, "pod leaves the mesh");
                    self.unenrol(key).await;
                }
                return Ok(());
            }
        };
        let netns = r.netns.clone();
        let options = want.options;
        // Install is idempotent: run on every reconcile so a restarted agent
        // repairs rules someone removed.
        blocking(move || redirect::install(&netns, options))
            .await
            .map_err(|e| e.to_string())?;
        if self.cfg.probe_snat {
            let ip = want.ip;
            if let Err(e) = blocking(move || host::add_pod(ip)).await {
                tracing::warn!(pod, error = %e, "probe SNAT set not updated");
            }
        }
        let old = r.enrolled.clone();
        if old.as_ref().map(|o| (&o.uid, &o.service_account))
            != Some((&want.uid, &want.service_account))
        {
            if let Err(e) = self.tell_add(&r, &want).await {
                if old.is_none() {
                    // ztunnel refused a new pod: leave nothing behind.
                    self.remove_rules(&r.netns, want.ip).await;
                }
                return Err(e);
            }
            if let Some(o) = old.as_ref().filter(|o| o.uid != want.uid) {
                self.tell_del(&o.uid).await;
            }
            tracing::info!(
                pod,
                uid = want.uid,
                dns = options.dns,
                inbound = options.inbound,
                "pod captured"
            );
            if let Some(a) = &self.cfg.annotator {
                a.set(&r.namespace, &r.name, true);
            }
        }
        self.pods.get_mut(key).expect("held").enrolled = Some(want);
        Ok(())
    }

    async fn unenrol(&mut self, key: &Key) {
        let Some(r) = self.pods.get(key).cloned() else {
            return;
        };
        let Some(e) = r.enrolled else { return };
        // Rules out first: from here the pod's traffic is its own again.
        self.remove_rules(&r.netns, e.ip).await;
        self.tell_del(&e.uid).await;
        self.pods.get_mut(key).expect("held").enrolled = None;
        if let Some(a) = &self.cfg.annotator {
            a.set(&r.namespace, &r.name, false);
        }
        tracing::info!(pod = %format!("{}/{}", r.namespace, r.name), "pod released: rules removed");
    }

    async fn remove_rules(&self, netns: &Path, ip: IpAddr) {
        let n = netns.to_path_buf();
        if let Err(e) = blocking(move || redirect::remove(&n)).await {
            tracing::error!(netns = %netns.display(), error = %e, "removing capture rules failed");
        }
        if self.cfg.probe_snat {
            if let Err(e) = blocking(move || host::del_pod(ip)).await {
                tracing::warn!(error = %e, "probe SNAT set not updated");
            }
        }
    }

    /// AddWorkload to the connected ztunnel. Without one the pod waits for
    /// the next snapshot (its traffic fails closed until then): Ok.
    async fn tell_add(&mut self, r: &Record, e: &Enrolled) -> Result<(), String> {
        let Some(conn) = &self.ztunnel else {
            tracing::warn!(pod = %format!("{}/{}", r.namespace, r.name), "no ztunnel connected; pod captured, served at its next snapshot");
            return Ok(());
        };
        let fd = File::open(&r.netns)
            .map_err(|err| format!("open netns {}: {err}", r.netns.display()))?;
        let info = WorkloadInfo {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            service_account: e.service_account.clone(),
        };
        match conn.add(&e.uid, info, &fd).await {
            Ok(()) => Ok(()),
            Err(ZdsError::Nack(why)) => Err(format!("ztunnel refused the pod: {why}")),
            Err(err) => {
                tracing::warn!(error = %err, "ztunnel connection lost; it gets the pod in its next snapshot");
                self.ztunnel = None;
                Ok(())
            }
        }
    }

    async fn tell_del(&mut self, uid: &str) {
        let Some(conn) = &self.ztunnel else { return };
        match conn.del(uid).await {
            Ok(()) => {}
            Err(ZdsError::Nack(why)) => tracing::warn!(uid, why, "ztunnel refused DelWorkload"),
            Err(err) => {
                tracing::warn!(error = %err, "ztunnel connection lost");
                self.ztunnel = None;
            }
        }
    }

    /// A (re)connected ztunnel gets every enrolled pod, then SnapshotSent.
    /// The newest ztunnel is the one told about later changes.
    async fn snapshot(&mut self, conn: ZdsConn) {
        let enrolled: Vec<Record> = self
            .pods
            .values()
            .filter(|r| r.enrolled.is_some())
            .cloned()
            .collect();
        for r in &enrolled {
            let e = r.enrolled.as_ref().expect("filtered");
            let Ok(fd) = File::open(&r.netns) else {
                continue;
            };
            let info = WorkloadInfo {
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                service_account: e.service_account.clone(),
            };
            match conn.add(&e.uid, info, &fd).await {
                Ok(()) => {}
                Err(ZdsError::Nack(why)) => {
                    // Rules stay: the pod fails closed rather than escaping.
                    tracing::error!(uid = e.uid, why, "ztunnel refused a pod in the snapshot")
                }
                Err(err) => {
                    tracing::warn!(error = %err, "ztunnel left during the snapshot");
                    return;
                }
            }
        }
        match conn.snapshot_sent().await {
            Ok(()) => {
                tracing::info!(pods = enrolled.len(), "ztunnel connected; snapshot sent");
                self.ztunnel = Some(conn);
            }
            Err(err) => tracing::warn!(error = %err, "ztunnel refused the snapshot"),
        }
    }
}
