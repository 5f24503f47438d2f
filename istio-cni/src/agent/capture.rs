//! Bringing a pod to what the mesh state says it should be: rules in and
//! ztunnel told, or rules out and ztunnel told. What to do is planned
//! (`super::plan`); this carries it out.

use std::path::Path;

use super::plan::{plan, plan_pod, Action};
use super::records::{Enrolled, Record};
use super::{blocking, pod_name, Agent, Key};
use crate::membership::{decide, Membership};
use crate::redirect;

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

    /// Brings one pod to what the mesh state says, trusting nothing recorded
    /// as installed (a sandbox's ADD, an agent starting, a pod taken in
    /// after the agent was away): see `plan::plan_pod`'s repair.
    pub(super) async fn reconcile(&mut self, key: &Key) -> Result<Standing, String> {
        let r = self.pods.get(key).expect("caller holds the key");
        let decision = self.decide(r);
        let action =
            plan_pod(&self.cfg.node, key, r, decision, true).expect("a repair always acts");
        self.apply(key, action).await
    }

    /// After a mesh change: every known pod re-decided (cheap, no I/O), and
    /// only those whose decision or its inputs changed acted on.
    pub(super) async fn follow(&mut self) {
        let decisions: Vec<(Key, Membership)> = self
            .pods
            .iter()
            .map(|(k, r)| (k.clone(), self.decide(r)))
            .collect();
        let actions = plan(&self.cfg.node, &self.pods, decisions);
        tracing::info!(
            pods = self.pods.len(),
            acting_on = actions.len(),
            "capture re-decided"
        );
        for (key, action) in actions {
            if let Err(e) = self.apply(&key, action).await {
                tracing::error!(pod = pod_name(&key), error = %e, "reconcile failed");
            }
        }
    }

    fn decide(&self, r: &Record) -> Membership {
        decide(
            &self.state,
            &r.namespace,
            &r.name,
            &self.cfg.exclude_namespaces,
            self.cfg.dns_capture,
        )
    }

    /// Carries out one planned action and records the outcome. A failed
    /// enrolment records nothing, so the next change or ADD plans it again
    /// (a transient iptables or ztunnel failure heals then).
    async fn apply(&mut self, key: &Key, action: Action) -> Result<Standing, String> {
        let r = self.pods.get(key).expect("caller holds the key").clone();
        let result = match &action {
            Action::Refuse(why) => Err(why.clone()),
            Action::Release { why, refused } => {
                if r.enrolled.is_some() {
                    tracing::info!(pod = pod_name(key), why, "pod leaves the mesh");
                    self.unenrol(key).await;
                }
                match refused {
                    true => Err(why.clone()),
                    false => Ok(Standing::Outside(why.clone())),
                }
            }
            Action::Enrol {
                to,
                rules,
                address,
                ztunnel,
            } => self
                .enrol(key, &r, to, *rules, *address, *ztunnel)
                .await
                .map(|()| Standing::Enrolled),
        };
        if result.is_ok() || !matches!(action, Action::Enrol { .. }) {
            action.settle(self.pods.get_mut(key).expect("held"));
        }
        result
    }

    /// Does what the flags say for `to`, in the fail-closed order: rules
    /// before ztunnel hears of the pod.
    async fn enrol(
        &mut self,
        key: &Key,
        r: &Record,
        to: &Enrolled,
        rules: bool,
        address: bool,
        ztunnel: bool,
    ) -> Result<(), String> {
        let pod = pod_name(key);
        // AMBIENT_IPV6=false: no v6 rules are written, so a pod with an IPv6
        // address would have its v6 traffic bypass ztunnel (no mTLS, no
        // policy). Refused rather than left half outside the mesh.
        if !self.cfg.ipv6 && to.options.ipv6 {
            return Err(format!(
                "{pod} has an IPv6 address but AMBIENT_IPV6=false: refused rather than left half outside the mesh"
            ));
        }
        let old = r.enrolled.as_ref();
        let options = to.options;
        if rules {
            let netns = r.netns.clone();
            blocking(move || redirect::install(&netns, options))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                pod,
                dns = options.dns,
                inbound = options.inbound,
                "capture rules installed"
            );
        }
        if let Some(host) = self.host.clone().filter(|_| address) {
            let ip = to.ip;
            let h = host.clone();
            if let Err(e) = blocking(move || h.add_pod(ip)).await {
                tracing::warn!(pod, error = %e, "probe SNAT set not updated");
            }
            // The old address may be another pod's by now: its probes must
            // not be SNATed as if it were ambient.
            if let Some(stale) = old.map(|o| o.ip).filter(|o| *o != ip) {
                if let Err(e) = blocking(move || host.del_pod(stale)).await {
                    tracing::warn!(pod, error = %e, "probe SNAT set not updated");
                }
            }
        }
        if ztunnel {
            if let Err(e) = self.tell_add(r, to).await {
                if old.is_none() {
                    // ztunnel refused a new pod: leave nothing behind.
                    self.remove_rules(&r.netns, to.ip).await;
                }
                return Err(e);
            }
            if let Some(o) = old.filter(|o| o.uid != to.uid) {
                self.tell_del(&o.uid).await;
            }
            tracing::info!(
                pod,
                uid = to.uid,
                dns = options.dns,
                inbound = options.inbound,
                "pod captured"
            );
            if let Some(a) = &self.cfg.annotator {
                a.set(&r.namespace, &r.name, true);
            }
        }
        Ok(())
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
        if let Some(host) = self.host.clone() {
            if let Err(e) = blocking(move || host.del_pod(ip)).await {
                tracing::warn!(error = %e, "probe SNAT set not updated");
            }
        }
    }
}
