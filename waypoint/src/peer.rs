//! Who the client is, for telemetry. The waypoint holds the pods of what it
//! serves, not of every client, so a client from another namespace is
//! usually not in its state. Its ztunnel names it in the CONNECT's W3C
//! `baggage` (cluster, namespace, workload and pod name, canonical service
//! and revision), as upstream ztunnel and ours both send. Metrics and the access
//! log use that then; the namespace and service account always come from
//! the client's certificate, never from baggage. Policy never reads this.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use identity::Identity;
use mesh::intern::Str;
use mesh::{MeshState, TunnelProtocol, Workload};

/// The client workload: the one the state has at `ip`, else one described
/// by the CONNECT's baggage (None without a workload name in it).
pub fn source(
    state: &MeshState,
    ip: IpAddr,
    id: &Identity,
    connect: &HeaderMap,
) -> Option<Arc<Workload>> {
    if let Some(w) = state.workload_by_ip(ip) {
        return Some(w.clone());
    }
    let baggage = connect.get("baggage")?.to_str().ok()?;
    let mut name = None;
    let mut kind = mesh::owner::WorkloadKind::Pod;
    let mut pod = None;
    let mut cluster = None;
    let (mut service, mut version) = (None, None);
    for item in baggage.split(',') {
        // Members may carry `;properties` after the value.
        let Some((k, v)) = item.split(';').next().and_then(|m| m.split_once('=')) else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if v.is_empty() {
            continue;
        }
        match k {
            "k8s.pod.name" => pod = Some(v),
            "k8s.cluster.name" => cluster = Some(v),
            "service.name" => service = Some(v),
            "service.version" => version = Some(v),
            k if k.starts_with("k8s.") && k.ends_with(".name") && !NOT_WORKLOADS.contains(&k) => {
                name = Some(v);
                kind = mesh::owner::WorkloadKind::from_baggage_key(k);
            }
            _ => {}
        }
    }
    let workload = name.or(pod)?;
    // Distinct per described workload: telemetry caches label sets by uid.
    let uid = format!(
        "baggage/{}/{}/{workload}",
        cluster.unwrap_or(""),
        id.namespace
    );
    if !admit_described(&uid) {
        return None;
    }
    let s = |v: &str| -> Str { Arc::from(v) };
    Some(Arc::new(Workload {
        uid,
        name: pod.unwrap_or(workload).to_string(),
        workload_name: s(workload),
        workload_kind: kind,
        cluster_id: cluster.map(s),
        namespace: s(&id.namespace),
        service_account: s(&id.service_account),
        trust_domain: s(&id.trust_domain),
        node: s(""),
        ip,
        extra_ips: Vec::new(),
        hostname: None,
        labels: Default::default(),
        annotations: Default::default(),
        waypoint: None,
        named_ports: Default::default(),
        protocol: TunnelProtocol::Hbone,
        canonical_name: s(service.unwrap_or(workload)),
        canonical_revision: s(version.unwrap_or("latest")),
        authorization_policies: Vec::new(),
        locality: None,
        healthy: true,
    }))
}

/// Baggage is the client's to write: each new name it gives is a label set
/// the waypoint keeps and exports for ever. Past this many, a newly described
/// workload is reported as unknown, so a peer inventing names cannot grow
/// the waypoint's memory or its metrics without bound.
const MAX_DESCRIBED: usize = 4096;

fn admit_described(uid: &str) -> bool {
    static SEEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap();
    if seen.contains(uid) {
        return true;
    }
    if seen.len() >= MAX_DESCRIBED {
        return false;
    }
    seen.insert(uid.to_string());
    true
}

/// `k8s.*.name` keys that do not name the workload.
const NOT_WORKLOADS: &[&str] = &[
    "k8s.cluster.name",
    "k8s.namespace.name",
    "k8s.node.name",
    "k8s.pod.name",
    "k8s.container.name",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(baggage: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("baggage", baggage.parse().unwrap());
        h
    }

    #[test]
    fn source_from_state_or_baggage() {
        let state = mesh::standalone::parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: known, namespace: a}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n",
            "cluster.local",
        )
        .unwrap();
        let id = Identity::new("cluster.local", "far", "client-sa");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let got = |addr: &str, baggage: &str| {
            source(&state, ip(addr), &id, &connect(baggage)).map(|w| {
                format!(
                    "{}/{} pod={} {:?} cluster={} sa={} app={} v={}",
                    w.namespace,
                    w.workload_name,
                    w.name,
                    w.workload_kind,
                    mesh::owner::cluster_of(&w),
                    w.service_account,
                    w.canonical_name,
                    w.canonical_revision
                )
            })
        };
        let cases = [
            // The state wins over baggage.
            ("10.0.0.1", "k8s.deployment.name=other", Some("a/known pod=known Pod cluster=Kubernetes sa=default app=known v=latest")),
            // Upstream ztunnel's shape: the workload's kind in the key; the
            // namespace is the certificate's, not the baggage's.
            (
                "10.0.0.9",
                "k8s.cluster.name=east,k8s.namespace.name=spoofed,k8s.deployment.name=client,service.name=client-app,service.version=v2",
                Some("far/client pod=client Deployment cluster=east sa=client-sa app=client-app v=v2"),
            ),
            // Ours: the pod's name.
            ("10.0.0.9", "k8s.namespace.name=far,k8s.pod.name=client-0", Some("far/client-0 pod=client-0 Pod cluster=Kubernetes sa=client-sa app=client-0 v=latest")),
            ("10.0.0.9", "k8s.statefulset.name=db ; p=1, k8s.pod.name=db-0", Some("far/db pod=db-0 Pod cluster=Kubernetes sa=client-sa app=db v=latest")),
            // Nothing naming a workload: unknown, as before.
            ("10.0.0.9", "k8s.cluster.name=Kubernetes,k8s.namespace.name=far", None),
            ("10.0.0.9", "garbage", None),
        ];
        for (addr, baggage, want) in cases {
            assert_eq!(got(addr, baggage).as_deref(), want, "{baggage}");
        }
        assert!(source(&state, ip("10.0.0.9"), &id, &HeaderMap::new()).is_none());
    }
}
