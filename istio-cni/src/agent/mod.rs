//! The node agent: owns which pods on this node are captured. One task holds
//! all state and handles one event at a time (plugin calls, ztunnel
//! connections, mesh changes, a periodic prune), which matches ZDS's
//! lockstep and needs no locks.
//!
//! Membership is decided from the live mesh state (`Config::store`): the
//! agent follows `MeshStore::subscribe`, re-decides every pod it knows when
//! the state changes and acts only on the pods whose decision or its inputs
//! changed (`plan`): a change costs what it changes, not a rule rewrite per
//! captured pod. The plugin asks the agent about each pod
//! (`crate::api`); for when it cannot, the agent keeps a small membership
//! answer on disk (`crate::fallback`), rewritten only when it changes.
//!
//! Fail-closed rules of thumb: rules go in before ztunnel hears of a pod and
//! stay in while ztunnel or the agent is away (traffic fails rather than
//! leaving in plaintext); they come out only when the pod leaves the mesh.

mod adopt;
mod capture;
mod plan;
mod records;
mod serve;
mod ztunnel;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh::{MeshState, MeshStore};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use zds::{ZdsConn, ZdsServer};

use crate::api::{Request, Response};
use crate::host::Host;
use crate::status::Status;
use records::Record;

#[derive(Clone)]
pub struct Config {
    pub node: String,
    /// The live mesh state capture is decided from (kept current by the
    /// standalone file watcher or the Kubernetes source).
    pub store: Arc<MeshStore>,
    pub zds_socket: PathBuf,
    pub plugin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub dns_capture: bool,
    /// Capture pods' IPv6 too (AMBIENT_IPV6); off refuses pods with one.
    pub ipv6: bool,
    pub exclude_namespaces: Vec<String>,
    /// Keep the node's probe SNAT rule and ipset.
    pub probe_snat: bool,
    /// The node's netns for that rule, when it is not the agent's own.
    pub host_netns: Option<PathBuf>,
    /// Where the node's filesystem is mounted ("/" when it is ours): the
    /// netns paths the plugin sends are the node's, opened under it.
    pub host_root: PathBuf,
    /// The node's /proc and the runtime's netns dir (as mounted here),
    /// where pods running before the agent are found.
    pub proc_root: PathBuf,
    pub netns_dir: PathBuf,
    /// In a cluster: annotate captured pods so istiod advertises them as
    /// reachable over HBONE.
    pub annotator: Option<kube_source::PodAnnotator>,
    /// Readiness and metrics, shared with the installer and the HTTP side.
    pub status: Arc<Status>,
}

type Key = (String, String);

fn pod_name(k: &Key) -> String {
    format!("{}/{}", k.0, k.1)
}

/// A node path as this agent opens it: under `host_root`.
fn on_node(host_root: &std::path::Path, p: &std::path::Path) -> PathBuf {
    host_root.join(p.strip_prefix("/").unwrap_or(p))
}

enum Event {
    Plugin(Request, oneshot::Sender<Response>),
    Ztunnel(ZdsConn),
    MeshChanged,
    Tick,
}

struct Agent {
    cfg: Config,
    /// The snapshot the current decisions were made from.
    state: Arc<MeshState>,
    pods: BTreeMap<Key, Record>,
    ztunnel: Option<ZdsConn>,
    /// Where the probe SNAT set lives (None: not kept).
    host: Option<Host>,
    /// What `pods.json` holds: rewritten only when the records change (a
    /// mesh change on a busy node would otherwise rewrite it each time).
    persisted: Vec<u8>,
    /// What `membership.json` holds, likewise.
    answered: Vec<u8>,
}

/// Runs until `stop`; leaves every captured pod captured on exit.
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Subscribed before the first load, so a change landing in between is
    // seen as a change.
    let mut changes = cfg.store.subscribe();
    let state = cfg.store.load();
    let host = match cfg.probe_snat {
        true => {
            let (netns, ipv6) = (cfg.host_netns.clone(), cfg.ipv6);
            let host = blocking(move || {
                let h = Host::detect(netns)?;
                h.install(ipv6).map(|()| h)
            })
            .await
            .context("node probe SNAT rule")?;
            Some(host)
        }
        false => None,
    };
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
    let (pods, persisted) = records::load(&cfg.state_dir)?;
    let mut agent = Agent {
        answered: records::current_answer(&cfg.state_dir),
        cfg: cfg.clone(),
        state,
        pods,
        ztunnel: None,
        host,
        persisted,
    };
    // The answer first: a plugin that cannot reach us meanwhile decides from
    // the state we decide from.
    agent.publish_answer();
    // What a previous agent captured is re-checked before anyone is served,
    // and pods the plugin started while no agent answered are taken in.
    agent.prune().await;
    agent.take_pending();
    // Ambient pods running without a record (the agent is new on this
    // node) are found by their netns and captured without a restart.
    agent.adopt_running().await;
    agent.reconcile_all("reconcile on start failed").await;
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
    // Ready from here: ztunnel can connect and the plugin be answered.
    cfg.status.zds_serving(true);
    let (tx, mut rx) = mpsc::channel(64);
    // The accept loops and the ticker hold nothing to drain: aborted on stop.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(ztunnel::accept(zds, tx.clone()));
    tasks.spawn(serve::accept(plugin, tx.clone()));
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
            // The store lives as long as the agent holds it: `changed` only
            // fails if it is gone, and then there is nothing to follow.
            Ok(()) = changes.changed() => Some(Event::MeshChanged),
            _ = stop.wait_for(|s| *s) => None,
        };
        match ev {
            Some(Event::Plugin(req, reply)) => {
                let resp = agent.plugin(req).await;
                let _ = reply.send(resp);
            }
            Some(Event::Ztunnel(conn)) => agent.snapshot(conn).await,
            Some(Event::MeshChanged) => agent.refresh().await,
            Some(Event::Tick) => {
                agent.prune().await;
                // Normally empty: filled only while the plugin could not
                // reach us (a restart, a stall).
                for key in agent.take_pending() {
                    if let Err(e) = agent.reconcile(&key).await {
                        tracing::error!(pod = pod_name(&key), error = %e, "pending pod not reconciled");
                    }
                }
                agent.persist();
            }
            None => break,
        }
    }
    tasks.shutdown().await;
    cfg.status.zds_serving(false);
    let _ = std::fs::remove_file(&cfg.plugin_socket);
    tracing::info!("node agent stopped; captured pods stay captured");
    Ok(())
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

impl Agent {
    /// Takes the store's current state; a new one re-decides every pod and
    /// acts where that changed something. Cheap when nothing changed (a
    /// pointer comparison), so plugin calls run it too: a change the event
    /// loop has not reached yet then decides their pod as well.
    async fn refresh(&mut self) {
        let now = self.cfg.store.load();
        if Arc::ptr_eq(&now, &self.state) {
            return;
        }
        self.state = now;
        tracing::info!(
            generation = self.cfg.store.status().generation,
            "mesh state changed; re-deciding capture"
        );
        self.publish_answer();
        self.follow().await;
        self.persist();
    }

    /// Every pod, repairing (rules rewritten): at start only, so a
    /// restarted agent repairs what was changed while it was away.
    async fn reconcile_all(&mut self, what: &str) {
        let keys: Vec<Key> = self.pods.keys().cloned().collect();
        for k in keys {
            if let Err(e) = self.reconcile(&k).await {
                tracing::error!(pod = pod_name(&k), error = %e, "{what}");
            }
        }
    }
}
