//! The pods this ztunnel serves, as the node agent hands them over ZDS.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use identity::Identity;
use serde::Serialize;
use tokio::sync::watch;
use zds::{Payload, WorkloadInfo, ZdsClient, ZdsError};

use crate::netns::PodNetns;
use crate::proxy::{start_pod, Pod, Proxy};

struct Served {
    pod: Arc<Pod>,
    stop: watch::Sender<bool>,
}

pub struct Pods {
    px: Arc<Proxy>,
    pods: Mutex<HashMap<String, Served>>,
    pub zds_connected: watch::Sender<bool>,
}

#[derive(Serialize)]
pub struct PodView {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub netns: String,
}

impl Pods {
    pub fn new(px: Arc<Proxy>) -> Arc<Self> {
        // Present from the start, so dashboards plot zero rather than nothing.
        metrics::gauge!("workload_manager_active_proxy_count").set(0.0);
        metrics::gauge!("workload_manager_pending_proxy_count").set(0.0);
        Arc::new(Pods {
            px,
            pods: Mutex::new(HashMap::new()),
            zds_connected: watch::channel(false).0,
        })
    }

    /// Counts the add as pending while its listeners start (upstream's
    /// `workload_manager_pending_proxy_count`; ours start at once, so it
    /// shows a stuck start, not a queue).
    fn add(&self, uid: &str, info: WorkloadInfo, fd: OwnedFd) -> Result<(), String> {
        let pending = metrics::gauge!("workload_manager_pending_proxy_count");
        pending.increment(1.0);
        let r = self.start(uid, info, fd);
        pending.decrement(1.0);
        r
    }

    fn start(&self, uid: &str, info: WorkloadInfo, fd: OwnedFd) -> Result<(), String> {
        let netns = PodNetns::new(fd).map_err(|e| format!("netns fd: {e}"))?;
        if let Some(s) = self.pods.lock().unwrap().get(uid) {
            if s.pod.netns.id == netns.id {
                return Ok(()); // same pod, same netns: already serving
            }
        }
        if info.namespace.is_empty() || info.name.is_empty() {
            return Err(format!("add {uid}: workload_info needs name and namespace"));
        }
        let sa = if info.service_account.is_empty() {
            "default"
        } else {
            &info.service_account
        };
        let pod = Arc::new(Pod {
            uid: uid.to_string(),
            identity: Identity::new(&self.px.trust_domain, &info.namespace, sa),
            name: info.name,
            namespace: info.namespace,
            netns,
        });
        // The agent and the config should agree; when they do not, say so
        // loudly: peers check this pod's certificate against the config's
        // service account, so a mismatch fails every connection.
        match pod.workload(&self.px.store.load()) {
            None => tracing::warn!(
                uid,
                "pod is not in the mesh config: its traffic is refused until it is"
            ),
            Some(w) if *w.service_account != *sa => {
                tracing::error!(uid, agent = sa, config = %w.service_account, "service account differs between node agent and config")
            }
            Some(w) if *w.node != *self.px.node => {
                tracing::warn!(uid, config_node = %w.node, node = %self.px.node, "pod handed to this ztunnel runs on another node per the config")
            }
            Some(_) => {}
        }
        // A replaced netns (pod sandbox recreated) closes the old listeners first.
        self.del(uid);
        let (stop, stop_rx) = watch::channel(false);
        // The certificate is asked for before the first connection can arrive.
        self.px.certs.retain(&pod.identity);
        if let Err(e) = start_pod(&self.px, pod.clone(), stop_rx) {
            self.px.certs.release(&pod.identity);
            return Err(format!("listen in pod {uid} netns: {e}"));
        }
        tracing::info!(uid, pod = %format!("{}/{}", pod.namespace, pod.name), identity = %pod.identity, "pod enrolled: listening in its netns");
        let mut pods = self.pods.lock().unwrap();
        pods.insert(uid.to_string(), Served { pod, stop });
        metrics::counter!("workload_manager_proxies_started_total").increment(1);
        active(&pods);
        Ok(())
    }

    fn del(&self, uid: &str) {
        let removed = {
            let mut pods = self.pods.lock().unwrap();
            let removed = pods.remove(uid);
            active(&pods);
            removed
        };
        if let Some(s) = removed {
            metrics::counter!("workload_manager_proxies_stopped_total").increment(1);
            let _ = s.stop.send(true);
            self.px.certs.release(&s.pod.identity);
            tracing::info!(uid, "pod removed: listeners closed");
        }
    }

    pub fn list(&self) -> Vec<PodView> {
        let mut v: Vec<_> = self
            .pods
            .lock()
            .unwrap()
            .values()
            .map(|s| PodView {
                uid: s.pod.uid.clone(),
                name: s.pod.name.clone(),
                namespace: s.pod.namespace.clone(),
                identity: s.pod.identity.to_string(),
                netns: format!("{}:{}", s.pod.netns.id.0, s.pod.netns.id.1),
            })
            .collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    /// Connects to the agent and follows it for ever, reconnecting with
    /// backoff. Pods keep being served while the agent is away.
    pub async fn run_zds(self: Arc<Self>, path: PathBuf, mut drain: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = async {
                let client = ZdsClient::connect(&path).await?;
                tracing::info!(path = %path.display(), "connected to node agent (ZDS)");
                self.zds_connected.send_replace(true);
                backoff = Duration::from_millis(100);
                self.session(&client).await
            };
            let result = tokio::select! {
                r = session => r,
                _ = drain.wait_for(|d| *d) => return,
            };
            self.zds_connected.send_replace(false);
            match result {
                Err(ZdsError::Closed) => tracing::warn!("node agent closed ZDS; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "ZDS session failed; reconnecting")
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = drain.wait_for(|d| *d) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self, c: &ZdsClient) -> Result<(), ZdsError> {
        // Until SnapshotSent, the agent replays what it knows; what it did not
        // replay is gone.
        let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
        loop {
            let (payload, fd) = match c.recv().await {
                Ok(x) => x,
                Err(ZdsError::Protocol(p)) => {
                    tracing::warn!(error = %p, "ZDS protocol error");
                    c.ack(Some(p)).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let result = match payload {
                Payload::Add(a) => {
                    if let Some(seen) = snapshot.as_mut() {
                        seen.insert(a.uid.clone());
                    }
                    let info = a.workload_info.unwrap_or_default();
                    self.add(&a.uid, info, fd.expect("checked by ZdsClient::recv"))
                }
                Payload::Keep(k) => match snapshot.as_mut() {
                    Some(seen) if self.pods.lock().unwrap().contains_key(&k.uid) => {
                        seen.insert(k.uid);
                        Ok(())
                    }
                    Some(_) => Err(format!("keep {}: not a pod this ztunnel serves", k.uid)),
                    None => Err("keep after snapshot_sent".into()),
                },
                Payload::Del(d) => {
                    self.del(&d.uid);
                    Ok(())
                }
                Payload::SnapshotSent(_) => match snapshot.take() {
                    Some(seen) => {
                        let stale: Vec<String> = self
                            .pods
                            .lock()
                            .unwrap()
                            .keys()
                            .filter(|u| !seen.contains(*u))
                            .cloned()
                            .collect();
                        for uid in stale {
                            self.del(&uid);
                        }
                        tracing::info!(pods = seen.len(), "ZDS snapshot complete");
                        Ok(())
                    }
                    None => Err("second snapshot_sent".into()),
                },
            };
            if let Err(e) = &result {
                tracing::warn!(error = %e, "ZDS request failed");
            }
            c.ack(result.err()).await?;
        }
    }

    pub fn stop_all(&self) {
        let mut pods = self.pods.lock().unwrap();
        for (_, s) in pods.drain() {
            let _ = s.stop.send(true);
        }
        active(&pods);
    }
}

/// Pods whose in-pod listeners run, as Istio's ztunnel dashboard reads it.
fn active(pods: &HashMap<String, Served>) {
    metrics::gauge!("workload_manager_active_proxy_count").set(pods.len() as f64);
}
