//! The Kubernetes API as a config source. Watches the kinds a component
//! needs and renders them, object by object, into the same multi-document
//! YAML the standalone file holds; that file is then read by the very
//! translator (and file watcher) standalone mode uses, so a live cluster and a
//! YAML file cannot drift apart in meaning. The rendered file is also what an
//! operator inspects when asking "what does this component think the cluster
//! says".
//!
//! One bad object does not freeze the rest: objects whose kind the translator
//! checks strictly are validated alone first; an invalid one is left out,
//! logged and counted once by name, and listed in `Dropped` for the config
//! dump. Security objects are never left out: the translator makes what it
//! cannot evaluate fail closed, and reports it itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::Value;
use tokio::sync::{watch, Notify};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Kubernetes client (in-cluster or KUBECONFIG): {0}")]
    Client(String),
    #[error("no complete view of the Kubernetes API after {0:?}")]
    NotSynced(Duration),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// The objects the last render left out, and why.
pub type Dropped = Arc<std::sync::Mutex<Vec<mesh::Rejected>>>;

/// Connects (in-cluster credentials, or KUBECONFIG), starts `run` in the
/// background and returns once the first complete render is on disk, so the
/// caller can read `out` as its standalone config and watch it.
pub async fn start(
    sel: Selection,
    out: PathBuf,
    trust_domain: String,
    stop: watch::Receiver<bool>,
) -> Result<Dropped, SourceError> {
    // A render from a previous run is stale: the view must come from now.
    let _ = std::fs::remove_file(&out);
    let client = kube::Client::try_default()
        .await
        .map_err(|e| SourceError::Client(e.to_string()))?;
    let path = out.clone();
    let dropped = Dropped::default();
    let report = dropped.clone();
    let mut task = tokio::spawn(async move {
        if let Err(e) = run(client, sel, path, trust_domain, report, stop).await {
            tracing::error!(error = %e, "Kubernetes source stopped");
        }
    });
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    while !out.exists() {
        if tokio::time::Instant::now() > deadline {
            task.abort();
            return Err(SourceError::NotSynced(limit));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = &mut task => return Err(SourceError::NotSynced(limit)),
        }
    }
    Ok(dropped)
}

/// Watches `sel` and keeps `out` holding the rendered config, rewriting it
/// (atomically) on every change. Returns when `stop` fires.
pub async fn run(
    client: kube::Client,
    sel: Selection,
    out: PathBuf,
    trust_domain: String,
    dropped: Dropped,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
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
        let writer = reflector::store::Writer::new(ar.clone());
        stores.push((ar, writer.as_reader()));
        let changed = changed.clone();
        let kind = g.kind.clone();
        tasks.spawn(async move {
            let mut events = watcher(api, cfg).default_backoff().reflect(writer).boxed();
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(_) => changed.notify_one(),
                    // The watcher relists by itself; the last good objects stay.
                    Err(e) => tracing::warn!(kind = %kind, error = %e, "watch error; retrying"),
                }
            }
        });
    }
    // Render nothing until every kind has listed once: a file with the
    // namespaces but not yet the pods would release every captured pod.
    for (ar, store) in &stores {
        tokio::select! {
            r = store.wait_until_ready() => if r.is_err() {
                tracing::error!(kind = %ar.kind, "watch ended before its first list");
            },
            _ = stop.changed() => return Ok(()),
        }
    }
    changed.notify_one();
    let mut last = None;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = stop.changed() => return Ok(()),
        }
        // Let a burst of events (an initial list, a `kubectl apply -f dir`)
        // land as one rewrite.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (text, left_out) = render(&stores, &trust_domain);
        {
            let mut d = dropped.lock().unwrap();
            mesh::report_rejected(&d, &left_out);
            *d = left_out;
        }
        if last.as_ref() == Some(&text) {
            continue;
        }
        let tmp = out.with_extension("tmp");
        let write = std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &out));
        write.map_err(|source| SourceError::Write {
            path: out.clone(),
            source,
        })?;
        tracing::info!(path = %out.display(), bytes = text.len(), "cluster config rendered");
        last = Some(text);
    }
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

/// The objects as standalone YAML documents, sorted for stable output, and
/// those left out because the translator refuses them.
fn render(
    stores: &[(ApiResource, Store<DynamicObject>)],
    trust_domain: &str,
) -> (String, Vec<mesh::Rejected>) {
    let mut left_out = Vec::new();
    let mut docs: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    for (ar, store) in stores {
        for obj in store.state() {
            let Some(v) = clean(ar, &obj) else { continue };
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            docs.insert((ar.kind.clone(), ns, name), v);
        }
    }
    let mut text = String::new();
    for ((kind, ns, name), v) in docs {
        let yaml = serde_yaml::to_string(&v).expect("JSON values serialize");
        if !matches!(kind.as_str(), "Namespace" | "Pod" | "Service") {
            if let Err(e) = mesh::standalone::parse(&yaml, trust_domain) {
                left_out.push(mesh::Rejected {
                    kind,
                    namespace: ns,
                    name,
                    field: e.field,
                    reason: e.message,
                    effect: "left out of the mesh config".into(),
                });
                continue;
            }
        }
        text.push_str("---\n");
        text.push_str(&yaml);
    }
    (text, left_out)
}

/// What the translator reads of an object: identity, labels, annotations,
/// spec, and for pods the address the kubelet reported. Finished pods are not
/// part of the mesh.
fn clean(ar: &ApiResource, obj: &DynamicObject) -> Option<Value> {
    let m = &obj.metadata;
    let mut meta = serde_json::Map::new();
    meta.insert("name".into(), m.name.clone()?.into());
    if let Some(ns) = &m.namespace {
        meta.insert("namespace".into(), ns.clone().into());
    }
    if let Some(uid) = &m.uid {
        meta.insert("uid".into(), uid.clone().into());
    }
    for (k, v) in [("labels", &m.labels), ("annotations", &m.annotations)] {
        if let Some(v) = v {
            let v: BTreeMap<_, _> = v
                .iter()
                .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/"))
                .collect();
            meta.insert(k.into(), serde_json::to_value(v).unwrap());
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("apiVersion".into(), ar.api_version.clone().into());
    out.insert("kind".into(), ar.kind.clone().into());
    out.insert("metadata".into(), Value::Object(meta));
    if let Some(spec) = obj.data.get("spec") {
        out.insert("spec".into(), spec.clone());
    }
    if ar.kind == "Pod" {
        let status = obj.data.get("status");
        let phase = status
            .and_then(|s| s.get("phase"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        // Unscheduled pods belong to no node yet.
        obj.data.get("spec")?.get("nodeName")?;
        // A scheduled pod without an IP is still rendered (`status: {}`): its
        // CNI ADD, which gives it the IP, is where capture is decided.
        let ip = status
            .and_then(|s| s.get("podIP"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let status = if ip.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::json!({ "podIP": ip })
        };
        out.insert("status".into(), status);
    }
    if ar.kind == "Service" {
        // Headless and ExternalName services have no VIP for ztunnel to match.
        let ip = obj
            .data
            .get("spec")?
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ip.is_empty() || ip == "None" {
            return None;
        }
    }
    Some(Value::Object(out))
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
