//! Names a proxy resolves itself: the endpoints of a ServiceEntry with
//! `resolution: DNS` (hostname workloads). One resolver per process,
//! configured from the process's own resolv.conf (as upstream ztunnel and
//! Envoy do: the proxy's view of DNS, not the client pod's); its cache keeps
//! each answer for its TTL, so a changed record is followed once the old one
//! expires. ztunnel and the waypoint share it.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("no resolver: {0}")]
    NoResolver(String),
    #[error("{name}: {reason}")]
    Lookup { name: String, reason: String },
}

/// Built on first use; a failure is not kept, so a `resolv.conf` that was
/// unreadable once is read again on the next connection.
static RESOLVER: OnceCell<TokioResolver> = OnceCell::const_new();

async fn resolver() -> Result<&'static TokioResolver, ResolveError> {
    RESOLVER
        .get_or_try_init(|| async {
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
        .await
        .map_err(ResolveError::NoResolver)
}

/// The addresses of `targets` (name, port), in the order the names were
/// given, each with the index of the target it came from. Names that do not
/// resolve are skipped (logged); none resolving is the error, naming the
/// last failure.
pub async fn resolve_all(
    targets: &[(&str, u16)],
) -> Result<Vec<(usize, SocketAddr)>, ResolveError> {
    let r = resolver().await?;
    let mut out = Vec::new();
    let mut last = None;
    for (i, (name, port)) in targets.iter().enumerate() {
        // Fully qualified: the search list is for the mesh's short names.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match r.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => out.extend(ips.iter().map(|ip: IpAddr| (i, SocketAddr::new(ip, *port)))),
            Err(e) => {
                tracing::info!(name, error = %e, "DNS endpoint did not resolve");
                last = Some(ResolveError::Lookup {
                    name: name.to_string(),
                    reason: e.to_string(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(last.unwrap_or_else(|| ResolveError::Lookup {
            name: String::new(),
            reason: "no names to resolve".into(),
        }));
    }
    Ok(out)
}
