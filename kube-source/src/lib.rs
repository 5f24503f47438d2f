//! The Kubernetes API as a config source. Watches the kinds a component
//! needs and feeds each event, object by object, into the same incremental
//! translator the standalone file feeds (`mesh::objects`), so a live cluster
//! and a YAML file cannot drift apart in meaning, and a one-pod change costs
//! one pod's translation. Nothing is written for another component to read:
//! the state lives in the `MeshStore` this returns, and `/config_dump` shows
//! it.
//!
//! One bad object does not freeze the rest: an object the translator refuses
//! is left out, logged and counted once by name, and listed in `Dropped` for
//! the config dump. Security objects are never left out: the translator makes
//! what it cannot evaluate fail closed, and reports it itself.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use mesh::MeshStore;
use serde_json::Value;
use tokio::sync::watch;

mod translate;
use translate::{translate_loop, Change};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Kubernetes client (in-cluster or KUBECONFIG): {0}")]
    Client(String),
    #[error("no complete view of the Kubernetes API after {0:?}")]
    NotSynced(Duration),
    #[error(transparent)]
    File(#[from] mesh::FileError),
}

/// A component's mesh config: the standalone file when one is given (then
/// watched for changes), else the Kubernetes API.
pub async fn open(
    file: Option<&std::path::Path>,
    sel: Selection,
    trust_domain: &str,
    stop: watch::Receiver<bool>,
) -> Result<Source, SourceError> {
    let Some(path) = file else {
        return start(sel, trust_domain.to_string(), stop).await;
    };
    Ok(Source {
        store: mesh::open_file(path, trust_domain, stop)?,
        dropped: Dropped::default(),
    })
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct Selection {
    pub kinds: Vec<GroupVersionKind>,
    /// Only pods scheduled on this node (the node agent's view).
    pub pods_on_node: Option<String>,
}

fn gvk(group: &str, version: &str, kind: &str) -> GroupVersionKind {
    GroupVersionKind::gvk(group, version, kind)
}

impl Selection {
    /// The node agent decides capture from namespaces and its node's pods.
    pub fn node_agent(node: &str) -> Selection {
        Selection {
            kinds: vec![gvk("", "v1", "Namespace"), gvk("", "v1", "Pod")],
            pods_on_node: Some(node.to_string()),
        }
    }

    /// The waypoint routes and authorizes with the whole L7 picture.
    pub fn waypoint() -> Selection {
        Selection {
            kinds: vec![
                gvk("", "v1", "Namespace"),
                gvk("", "v1", "Pod"),
                gvk("", "v1", "Service"),
                gvk("gateway.networking.k8s.io", "v1", "Gateway"),
                gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
                gvk("gateway.networking.k8s.io", "v1", "GRPCRoute"),
                gvk("networking.istio.io", "v1", "VirtualService"),
                gvk("networking.istio.io", "v1", "DestinationRule"),
                gvk("networking.istio.io", "v1", "ServiceEntry"),
                gvk("security.istio.io", "v1", "AuthorizationPolicy"),
                gvk("security.istio.io", "v1", "PeerAuthentication"),
            ],
            pods_on_node: None,
        }
    }
}

/// The objects the translator left out, and why.
pub type Dropped = Arc<std::sync::Mutex<Vec<mesh::Rejected>>>;

/// A running Kubernetes source: the state it keeps current, and what it
/// left out.
pub struct Source {
    pub store: Arc<MeshStore>,
    pub dropped: Dropped,
}

/// Connects (in-cluster credentials, or KUBECONFIG), starts watching and
/// returns once every kind has listed once and the first state is in the
/// store: a state with the namespaces but not yet the pods would release
/// every captured pod.
pub async fn start(
    sel: Selection,
    trust_domain: String,
    stop: watch::Receiver<bool>,
) -> Result<Source, SourceError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| SourceError::Client(e.to_string()))?;
    start_with(client, sel, trust_domain, stop).await
}

/// `start` with a client of the caller's.
pub async fn start_with(
    client: kube::Client,
    sel: Selection,
    trust_domain: String,
    stop: watch::Receiver<bool>,
) -> Result<Source, SourceError> {
    let (tx, rx) = mpsc::channel();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let dropped = Dropped::default();
    let report = dropped.clone();
    // The translator owns the objects on a thread of its own: translating
    // and deriving is CPU work, never done on the async workers.
    std::thread::Builder::new()
        .name("kube-source".into())
        .spawn(move || translate_loop(rx, trust_domain, report, first_tx))
        .expect("spawn the Kubernetes source thread");
    tokio::spawn(async move {
        if let Err(e) = watch_all(client, sel, tx, stop).await {
            tracing::error!(error = %e, "Kubernetes source stopped");
        }
    });
    let limit = Duration::from_secs(60);
    match tokio::time::timeout(limit, first_rx).await {
        Ok(Ok(store)) => Ok(Source { store, dropped }),
        _ => Err(SourceError::NotSynced(limit)),
    }
}

/// One watch per kind, each event sent to the translator. Returns when
/// `stop` fires (the translator ends when the last sender is gone).
async fn watch_all(
    client: kube::Client,
    sel: Selection,
    tx: mpsc::Sender<Change>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = Vec::new();
    for g in &sel.kinds {
        let Some(ar) = (tokio::select! {
            r = discover(&client, g) => r,
            _ = stop.changed() => return Ok(()),
        }) else {
            continue;
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let mut cfg = watcher::Config::default();
        if let (Some(node), "Pod") = (&sel.pods_on_node, g.kind.as_str()) {
            cfg = cfg.fields(&format!("spec.nodeName={node}"));
        }
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        pending.push(listed_rx);
        let tx = tx.clone();
        tasks.spawn(async move {
            let mut listed = Some(listed_tx);
            let mut events = watcher(api, cfg).default_backoff().boxed();
            while let Some(ev) = events.next().await {
                let change = match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        Change::Apply(ar.clone(), o)
                    }
                    Ok(watcher::Event::Delete(o)) => Change::Delete(ar.clone(), o),
                    Ok(watcher::Event::Init) => Change::Relist(ar.kind.clone()),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(l) = listed.take() {
                            let _ = l.send(());
                        }
                        Change::Listed(ar.kind.clone())
                    }
                    // The watcher relists by itself; the last good objects stay.
                    Err(e) => {
                        tracing::warn!(kind = %ar.kind, error = %e, "watch error; retrying");
                        continue;
                    }
                };
                if tx.send(change).is_err() {
                    return;
                }
            }
        });
    }
    for l in pending {
        tokio::select! {
            r = l => if r.is_err() {
                tracing::error!("a watch ended before its first list");
            },
            _ = stop.changed() => return Ok(()),
        }
    }
    let _ = tx.send(Change::Synced);
    drop(tx);
    let _ = stop.wait_for(|s| *s).await;
    tasks.shutdown().await;
    Ok(())
}

/// The API resource for `g`, retrying until the API server answers. None
/// only when the server says it does not serve the kind: a cluster without
/// (say) the Gateway API CRDs simply has none of those objects. An
/// unreachable server is not an empty one: treating it so would release
/// every captured pod.
async fn discover(client: &kube::Client, g: &GroupVersionKind) -> Option<ApiResource> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match kube::discovery::pinned_kind(client, g).await {
            Ok((ar, _)) => return Some(ar),
            Err(kube::Error::Discovery(e)) => {
                tracing::warn!(kind = %g.kind, group = %g.group, error = %e, "kind not served by the API server; not watched");
                return None;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::warn!(kind = %g.kind, group = %g.group, "group not served by the API server; not watched");
                return None;
            }
            Err(e) => {
                tracing::warn!(kind = %g.kind, error = %e, retry_ms = backoff.as_millis() as u64, "API discovery failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Tells the cluster which pods the node agent captured, with the annotation
/// istiod reads before it lets peers reach a pod over HBONE
/// (`ambient.istio.io/redirection: enabled`). Patches run in the background
/// and retry: the data path never waits on the API server.
#[derive(Clone)]
pub struct PodAnnotator {
    client: kube::Client,
}

impl std::fmt::Debug for PodAnnotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodAnnotator")
    }
}

pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

impl PodAnnotator {
    pub async fn new() -> Result<Self, SourceError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| SourceError::Client(e.to_string()))?;
        Ok(PodAnnotator { client })
    }

    pub fn set(&self, namespace: &str, name: &str, captured: bool) {
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), namespace);
        let name = name.to_string();
        // null removes the key in a JSON merge patch.
        let value = if captured {
            Value::from("enabled")
        } else {
            Value::Null
        };
        let patch =
            serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            for attempt in 1..=5 {
                let pp = kube::api::PatchParams::default();
                match api
                    .patch(&name, &pp, &kube::api::Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => return,
                    // The pod is gone: nothing left to annotate.
                    Err(kube::Error::Api(s)) if s.code == 404 => return,
                    Err(e) => {
                        tracing::warn!(pod = %name, attempt, error = %e, "cannot annotate pod capture state");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        });
    }
}
