//! Bringing a pod to what the mesh state says it should be: rules in and
//! ztunnel told, or rules out and ztunnel told.

use std::path::Path;

use super::records::Enrolled;
use super::{blocking, pod_name, Agent, Key};
use crate::membership::{decide, Membership};
use crate::{host, redirect};

/// Where a reconciled pod stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Standing {
    Enrolled,
    /// Not captured, and why.
    Outside(String),
}

impl Agent {
    /// Pods whose netns vanished without a DEL (the agent was down, or the
    /// runtime skipped it) are forgotten, and ztunnel told.
    pub(super) async fn prune(&mut self) {
        let gone: Vec<Key> = self
            .pods
            .iter()
            .filter(|(_, r)| !r.netns.exists())
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            tracing::info!(pod = pod_name(&k), "netns gone; removing pod");
            self.unenrol(&k).await;
            self.pods.remove(&k);
        }
        self.persist();
    }

    /// Brings one pod to what the mesh state says it should be.
    pub(super) async fn reconcile(&mut self, key: &Key) -> Result<Standing, String> {
        let r = self.pods.get(key).expect("caller holds the key").clone();
        let pod = pod_name(key);
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
                return Ok(Standing::Outside(why));
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
        Ok(Standing::Enrolled)
    }

    pub(super) async fn unenrol(&mut self, key: &Key) {
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
        tracing::info!(pod = pod_name(key), "pod released: rules removed");
    }

    pub(super) async fn remove_rules(&self, netns: &Path, ip: std::net::IpAddr) {
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
}
