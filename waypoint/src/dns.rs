//! Names the waypoint resolves itself: hostname workloads, the endpoints of
//! a ServiceEntry with `resolution: DNS`, through the resolver the mesh's
//! proxies share (`mesh::resolve`: the waypoint's own resolv.conf, answers
//! kept for their TTL).

use std::net::IpAddr;
use std::sync::Arc;

use mesh::{TunnelProtocol, Workload};

use crate::error::ProxyError;

/// The addresses of `targets` (name, port), as endpoints outside the mesh,
/// in the order the names were given. Names that do not resolve are
/// skipped; none resolving is the error.
pub async fn resolve(targets: &[(String, u16)]) -> Result<Vec<(Arc<Workload>, u16)>, ProxyError> {
    let names: Vec<(&str, u16)> = targets.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let found = mesh::resolve::resolve_all(&names)
        .await
        .map_err(|e| ProxyError::Dns(e.to_string()))?;
    Ok(found
        .into_iter()
        .map(|(i, at)| (endpoint(names[i].0, at.ip()), at.port()))
        .collect())
}

/// Outside the mesh and in no namespace: the telemetry names the entry's
/// host as the destination service, and this name as its workload.
fn endpoint(name: &str, ip: IpAddr) -> Arc<Workload> {
    let s = |v: &str| -> Arc<str> { Arc::from(v) };
    Arc::new(Workload {
        uid: format!("dns/{name}/{ip}"),
        name: name.to_string(),
        workload_name: s(name),
        workload_kind: Default::default(),
        cluster_id: None,
        namespace: s(""),
        service_account: s(""),
        trust_domain: s(""),
        node: s(""),
        ip,
        extra_ips: Vec::new(),
        hostname: None,
        labels: Default::default(),
        annotations: Default::default(),
        waypoint: None,
        named_ports: Default::default(),
        protocol: TunnelProtocol::None,
        canonical_name: s(name),
        canonical_revision: s(""),
        authorization_policies: Vec::new(),
        locality: None,
        healthy: true,
    })
}
