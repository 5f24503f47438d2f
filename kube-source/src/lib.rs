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

use kube::api::Api;
use kube::core::GroupVersionKind;
use mesh::MeshStore;
use serde_json::Value;
use tokio::sync::watch;

mod translate;
mod watch_all;
use translate::{translate_loop, Scope};
use watch_all::watch_all;

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
    /// Which pods, when `kinds` has Pod.
    pub pods: PodScope,
}

/// The pods a component looks at.
#[derive(Clone, Debug)]
pub enum PodScope {
    All,
    /// Only pods scheduled on this node (the node agent's view).
    OnNode(String),
    /// A waypoint's view: the pods of the namespaces whose traffic it may
    /// serve (`mesh::scope::waypoint_namespaces`, followed as bindings
    /// change), plus pods anywhere that bind themselves to a waypoint by
    /// label. At cluster size that is a few namespaces, not every pod.
    ServedBy(mesh::routes::WaypointRef),
}

fn gvk(group: &str, version: &str, kind: &str) -> GroupVersionKind {
    GroupVersionKind::gvk(group, version, kind)
}

impl Selection {
    /// The node agent decides capture from namespaces and its node's pods.
    pub fn node_agent(node: &str) -> Selection {
        Selection {
            kinds: vec![gvk("", "v1", "Namespace"), gvk("", "v1", "Pod")],
            pods: PodScope::OnNode(node.to_string()),
        }
    }

    /// The waypoint `name` in `namespace` routes and authorizes with the
    /// L7 picture of the cluster (services, routes, policies are all
    /// watched: they decide what is bound to it) and the pods of what it
    /// serves.
    pub fn waypoint(name: &str, namespace: &str) -> Selection {
        Selection {
            kinds: vec![
                gvk("", "v1", "Namespace"),
                // Where each endpoint runs, for locality-aware balancing.
                gvk("", "v1", "Node"),
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
                gvk("security.istio.io", "v1", "RequestAuthentication"),
                // meshConfig's extension providers, for CUSTOM policies
                // (only istio-system/istio is watched).
                gvk("", "v1", "ConfigMap"),
            ],
            pods: PodScope::ServedBy(mesh::routes::WaypointRef {
                name: name.to_string(),
                namespace: namespace.to_string(),
            }),
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
    // A waypoint's pod namespaces follow what the translator sees bound.
    let (scope, scope_rx) = match &sel.pods {
        PodScope::ServedBy(me) => {
            let (tx, rx) = watch::channel(Default::default());
            (Some(Scope { me: me.clone(), tx }), Some(rx))
        }
        _ => (None, None),
    };
    std::thread::Builder::new()
        .name("kube-source".into())
        .spawn(move || translate_loop(rx, trust_domain, report, first_tx, scope))
        .expect("spawn the Kubernetes source thread");
    tokio::spawn(async move {
        if let Err(e) = watch_all(client, sel, tx, scope_rx, stop).await {
            tracing::error!(error = %e, "Kubernetes source stopped");
        }
    });
    let limit = Duration::from_secs(60);
    match tokio::time::timeout(limit, first_rx).await {
        Ok(Ok(store)) => Ok(Source { store, dropped }),
        _ => Err(SourceError::NotSynced(limit)),
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
                // Through pods/status, as Istio's agent does: it may change
                // metadata too and is the lower privilege, the only one
                // Istio's chart grants the agent.
                match api
                    .patch_status(&name, &pp, &kube::api::Patch::Merge(&patch))
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
