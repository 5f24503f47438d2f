//! Names the waypoint resolves itself: the endpoints of a ServiceEntry with
//! `resolution: DNS`. One resolver for the process, configured from the
//! waypoint's own resolv.conf; its cache keeps each answer for its TTL, so
//! a changed record is followed once the old one expires.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use mesh::{TunnelProtocol, Workload};
use tokio::sync::OnceCell;

use crate::error::ProxyError;

static RESOLVER: OnceCell<Result<TokioResolver, String>> = OnceCell::const_new();

async fn resolver() -> Result<&'static TokioResolver, ProxyError> {
    let r = RESOLVER
        .get_or_init(|| async {
            // Reading the system configuration is file I/O: off the
            // runtime's threads.
            tokio::task::spawn_blocking(|| {
                let mut b = TokioResolver::builder_tokio().map_err(|e| e.to_string())?;
                // AAAA only when there is no A: an endpoint is reached over
                // whichever family it has, and a name's A is its answer.
                b.options_mut().ip_strategy =
                    hickory_resolver::config::LookupIpStrategy::Ipv4thenIpv6;
                b.build().map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        })
        .await;
    r.as_ref()
        .map_err(|e| ProxyError::Dns(format!("no resolver: {e}")))
}

/// The addresses of `targets` (name, port), as endpoints outside the mesh,
/// in the order the names were given. Names that do not resolve are
/// skipped; none resolving is the error.
pub async fn resolve(targets: &[(String, u16)]) -> Result<Vec<(Arc<Workload>, u16)>, ProxyError> {
    let r = resolver().await?;
    let mut eps = Vec::new();
    let mut last = String::new();
    for (name, port) in targets {
        // Fully qualified: the search list is for the mesh's short names.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match r.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => eps.extend(ips.iter().map(|ip| (endpoint(name, ip), *port))),
            Err(e) => {
                tracing::info!(name, error = %e, "DNS endpoint did not resolve");
                last = format!("{name}: {e}");
            }
        }
    }
    if eps.is_empty() {
        return Err(ProxyError::Dns(last));
    }
    Ok(eps)
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
        labels: Default::default(),
        annotations: Default::default(),
        waypoint: None,
        named_ports: Default::default(),
        protocol: TunnelProtocol::None,
        canonical_name: s(name),
        canonical_revision: s(""),
        authorization_policies: Vec::new(),
    })
}
