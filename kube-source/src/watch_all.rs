//! The watches: one per kind (a waypoint's pods: one per namespace it
//! serves, plus one for pods that bind themselves by label), each event sent
//! to the translator tagged with the watch it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::translate::{Change, Watch};
use crate::{PodScope, Selection, SourceError};

/// Starts every watch, tells the translator once each has listed once
/// (`Synced`), then follows the waypoint's pod namespaces if it has any.
/// Returns when `stop` fires (the translator ends when the last sender is
/// gone).
pub(crate) async fn watch_all(
    client: kube::Client,
    sel: Selection,
    tx: mpsc::Sender<Change>,
    scope: Option<watch::Receiver<BTreeSet<String>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let mut tasks = JoinSet::new();
    let mut pending = Vec::new();
    let mut pods = None;
    for g in &sel.kinds {
        let Some(ar) = (tokio::select! {
            r = discover(&client, g) => r,
            _ = stop.changed() => return Ok(()),
        }) else {
            continue;
        };
        let mut api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let mut cfg = watcher::Config::default();
        // Of ConfigMaps only meshConfig: `istio` in istio-system.
        if ar.kind == "ConfigMap" {
            api = Api::namespaced_with(client.clone(), mesh::ROOT_NAMESPACE, &ar);
            cfg = cfg.fields(&format!(
                "metadata.name={}",
                mesh::ext_authz::MESH_CONFIG_NAME
            ));
        }
        let mut w = Watch::Kind(ar.kind.clone());
        if ar.kind == "Pod" {
            match &sel.pods {
                PodScope::All => {}
                PodScope::OnNode(node) => cfg = cfg.fields(&format!("spec.nodeName={node}")),
                PodScope::ServedBy(_) => {
                    cfg = cfg.labels(mesh::routes::USE_WAYPOINT_LABEL);
                    w = Watch::BoundPods;
                    pods = Some(ar.clone());
                }
            }
        }
        let (listed_tx, listed_rx) = oneshot::channel();
        pending.push(listed_rx);
        spawn_watch(&mut tasks, api, cfg, w, ar, tx.clone(), Some(listed_tx));
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
    if let (Some(ar), Some(mut scope)) = (pods, scope) {
        // Namespaces come and go as bindings change; the translator drops a
        // namespace's pods itself when it leaves the set.
        let mut running: BTreeMap<String, AbortHandle> = BTreeMap::new();
        loop {
            let want = scope.borrow_and_update().clone();
            running.retain(|ns, h| {
                let keep = want.contains(ns);
                if !keep {
                    h.abort();
                }
                keep
            });
            for ns in want {
                if running.contains_key(&ns) {
                    continue;
                }
                tracing::info!(namespace = %ns, "watching the pods of a namespace this waypoint serves");
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
                let cfg = watcher::Config::default();
                let w = Watch::PodsIn(ns.clone());
                let h = spawn_watch(&mut tasks, api, cfg, w, ar.clone(), tx.clone(), None);
                running.insert(ns, h);
            }
            // Reap what was aborted.
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                r = scope.changed() => if r.is_err() { break },
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }
    drop(tx);
    let _ = stop.wait_for(|s| *s).await;
    tasks.shutdown().await;
    Ok(())
}

fn spawn_watch(
    tasks: &mut JoinSet<()>,
    api: Api<DynamicObject>,
    cfg: watcher::Config,
    w: Watch,
    ar: ApiResource,
    tx: mpsc::Sender<Change>,
    mut listed: Option<oneshot::Sender<()>>,
) -> AbortHandle {
    tasks.spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            let change = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    Change::Apply(w.clone(), ar.clone(), o)
                }
                Ok(watcher::Event::Delete(o)) => Change::Delete(w.clone(), ar.clone(), o),
                Ok(watcher::Event::Init) => Change::Relist(w.clone()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(l) = listed.take() {
                        let _ = l.send(());
                    }
                    Change::Listed(w.clone())
                }
                // The watcher relists by itself; the last good objects stay.
                Err(e) => {
                    tracing::warn!(watch = ?w, error = %e, "watch error; retrying");
                    continue;
                }
            };
            if tx.send(change).is_err() {
                return;
            }
        }
    })
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
