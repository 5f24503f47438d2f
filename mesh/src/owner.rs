//! Which workload a pod belongs to, as Istio names it in telemetry
//! (`source_workload`, `destination_workload`) and in ztunnel's config dump:
//! the object that owns its pods across rollouts, not the pod. Naming the pod
//! would start new metric series on every rollout and split one workload
//! into many in dashboards and Kiali's graph.

use std::sync::OnceLock;

use serde::Serialize;

use crate::Workload;

/// The cluster this process runs in (`--cluster-id`), set once at start.
/// Process-wide like the metrics recorder it labels for: every proxy
/// reports one cluster, and threading it through each connection's
/// context would only copy it.
static LOCAL_CLUSTER: OnceLock<String> = OnceLock::new();

pub fn set_local_cluster(id: &str) {
    let _ = LOCAL_CLUSTER.set(id.to_string());
}

/// The cluster a workload runs in, as telemetry's `*_cluster` labels and
/// baggage name it: what WDS said, else ours. Istio's default cluster id
/// is `Kubernetes`.
pub fn cluster_of(w: &Workload) -> &str {
    match &w.cluster_id {
        Some(c) => c,
        None => local_cluster(),
    }
}

pub fn local_cluster() -> &'static str {
    LOCAL_CLUSTER.get().map_or("Kubernetes", String::as_str)
}

/// Overrides the derived name, for controllers Istio does not know.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// The kinds Istio distinguishes; every other owner (StatefulSet,
/// DaemonSet, a custom controller) names the workload but counts as `Pod`,
/// as istiod reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Deployment,
    #[serde(rename = "cronjob")]
    CronJob,
    #[default]
    Pod,
    Job,
}

impl WorkloadKind {
    /// The `k8s.<kind>.name` key of W3C baggage naming such a workload.
    pub fn baggage_key(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
            WorkloadKind::Pod => "k8s.pod.name",
            WorkloadKind::Job => "k8s.job.name",
        }
    }

    /// The kind a baggage key names (`k8s.statefulset.name` and other
    /// owners count as `Pod`, as above).
    pub fn from_baggage_key(key: &str) -> Self {
        match key {
            "k8s.deployment.name" => WorkloadKind::Deployment,
            "k8s.cronjob.name" => WorkloadKind::CronJob,
            "k8s.job.name" => WorkloadKind::Job,
            _ => WorkloadKind::Pod,
        }
    }
}

/// The pod's controlling owner reference (`metadata.ownerReferences` with
/// `controller: true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// Istio's rule: a ReplicaSet whose name is `<deployment>-<pod-template-hash>`
/// stands for its Deployment; a Job named `<cronjob>-<digits>` for its
/// CronJob; any other owner for itself. A pod without an owner (as a
/// standalone file usually writes it) falls back to the name a Deployment
/// gives its pods, `<deployment>-<hash>-<suffix>`, else is its own workload.
pub fn workload_name(
    pod: &str,
    labels: &impl crate::labels::Lookup,
    owner: Option<&Owner>,
) -> (String, WorkloadKind) {
    let hash = labels.label("pod-template-hash");
    let kind = match owner {
        Some(o) => owner_kind(o, hash.map(String::as_str)),
        None => from_pod_name(pod, hash.map(String::as_str)),
    };
    match labels.label(WORKLOAD_NAME_LABEL).filter(|n| !n.is_empty()) {
        Some(name) => (name.clone(), kind.1),
        None => kind,
    }
}

fn owner_kind(o: &Owner, hash: Option<&str>) -> (String, WorkloadKind) {
    match o.kind.as_str() {
        "ReplicaSet" => match hash.and_then(|h| o.name.strip_suffix(h)?.strip_suffix('-')) {
            Some(deployment) if !deployment.is_empty() => {
                (deployment.to_string(), WorkloadKind::Deployment)
            }
            _ => (o.name.clone(), WorkloadKind::Pod),
        },
        "Job" => match o.name.rsplit_once('-') {
            Some((cron, stamp))
                if !cron.is_empty()
                    && !stamp.is_empty()
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (cron.to_string(), WorkloadKind::CronJob)
            }
            _ => (o.name.clone(), WorkloadKind::Job),
        },
        _ => (o.name.clone(), WorkloadKind::Pod),
    }
}

fn from_pod_name(pod: &str, hash: Option<&str>) -> (String, WorkloadKind) {
    if let Some(hash) = hash.filter(|h| !h.is_empty()) {
        if let Some(at) = pod.rfind(&format!("-{hash}-")) {
            if at > 0 {
                return (pod[..at].to_string(), WorkloadKind::Deployment);
            }
        }
    }
    (pod.to_string(), WorkloadKind::Pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_file_and_kubernetes_pods_carry_their_controller() {
        let state = crate::standalone::parse(
            "apiVersion: v1
kind: Pod
metadata:
  name: backup-28391040-k2
  namespace: a
  ownerReferences:
  - {apiVersion: batch/v1, kind: Job, name: backup-28391040, uid: u1, controller: true}
  - {apiVersion: v1, kind: ConfigMap, name: not-the-controller, uid: u2}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
",
            "cluster.local",
        )
        .unwrap();
        let w = state.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            (&*w.workload_name, w.workload_kind, w.name.as_str()),
            ("backup", WorkloadKind::CronJob, "backup-28391040-k2")
        );
        assert_eq!(cluster_of(w), "Kubernetes");
    }

    #[test]
    fn names_the_owner_as_istio_does() {
        use WorkloadKind::*;
        let owner = |kind: &str, name: &str| {
            Some(Owner {
                kind: kind.into(),
                name: name.into(),
            })
        };
        // (pod, pod-template-hash, override label, owner, name, kind)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            Option<&str>,
            Option<&str>,
            Option<Owner>,
            &str,
            WorkloadKind,
        )] = &[
            (
                "web-7d4b9-x2x",
                Some("7d4b9"),
                None,
                owner("ReplicaSet", "web-7d4b9"),
                "web",
                Deployment,
            ),
            // A ReplicaSet made by hand: no hash suffix, it is the workload.
            ("rs-abcde", None, None, owner("ReplicaSet", "rs"), "rs", Pod),
            (
                "rs-abcde",
                Some("zz"),
                None,
                owner("ReplicaSet", "rs"),
                "rs",
                Pod,
            ),
            ("db-0", None, None, owner("StatefulSet", "db"), "db", Pod),
            (
                "agent-q7",
                None,
                None,
                owner("DaemonSet", "agent"),
                "agent",
                Pod,
            ),
            (
                "backup-28391040-k2",
                None,
                None,
                owner("Job", "backup-28391040"),
                "backup",
                CronJob,
            ),
            (
                "migrate-k2",
                None,
                None,
                owner("Job", "migrate"),
                "migrate",
                Job,
            ),
            ("m-v2-k2", None, None, owner("Job", "m-v2"), "m-v2", Job),
            // No owner: a Deployment-shaped name with its hash label.
            (
                "web-7d4b9-x2x",
                Some("7d4b9"),
                None,
                None,
                "web",
                Deployment,
            ),
            ("web-7d4b9-x2x", None, None, None, "web-7d4b9-x2x", Pod),
            ("-7d4b9-x", Some("7d4b9"), None, None, "-7d4b9-x", Pod),
            ("client", None, None, None, "client", Pod),
            (
                "web-7d4b9-x2x",
                Some("7d4b9"),
                Some("frontend"),
                None,
                "frontend",
                Deployment,
            ),
            ("x", None, Some(""), None, "x", Pod),
        ];
        for (pod, hash, name_label, owner, name, kind) in cases {
            let mut labels = BTreeMap::new();
            if let Some(h) = hash {
                labels.insert("pod-template-hash".to_string(), h.to_string());
            }
            if let Some(n) = name_label {
                labels.insert(WORKLOAD_NAME_LABEL.to_string(), n.to_string());
            }
            assert_eq!(
                workload_name(pod, &labels, owner.as_ref()),
                (name.to_string(), *kind),
                "pod {pod} owner {owner:?}"
            );
        }
    }
}
