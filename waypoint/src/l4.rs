//! A CONNECT stream that is not HTTP: one endpoint, bytes both ways, judged
//! by L4 policy only, and judged again whenever the mesh config changes.

use std::net::SocketAddr;
use std::sync::Arc;

use identity::Identity;
use mesh::authz::{self, Connection, Decision};
use mesh::{MeshState, Workload};

use crate::binding;
use crate::plan;
use crate::proxy::{Stream, Waypoint};

/// What an L4 stream was admitted on.
#[derive(Clone)]
pub struct L4Stream {
    src: Arc<Identity>,
    peer: SocketAddr,
    target: SocketAddr,
}

impl Waypoint {
    /// L4 admission, pure: the destination is bound here and the policies,
    /// enforced as ztunnel would without requests, allow it. The same for a
    /// new stream and for a live one when the config changes.
    pub(crate) fn admit_l4(&self, state: &MeshState, s: &L4Stream) -> Result<(), String> {
        binding::check(state, &self.me(), s.target).map_err(|e| e.to_string())?;
        let svc = state.service_by_vip(s.target.ip());
        let conn = Connection {
            src_identity: Some(&s.src),
            src_ip: s.peer.ip(),
            dst_ip: s.target.ip(),
            dst_port: s.target.port(),
            request: None,
        };
        // No request to send an authorizer: a CUSTOM policy denies the
        // streams its rules match (fail closed).
        let l4: Vec<_> = plan::policies_for(self.gateway(), state, svc.map(|s| &**s))
            .map(|p| {
                let mut p = p.l4_only();
                if p.action == authz::Action::Custom {
                    p.action = authz::Action::Deny;
                }
                p
            })
            .collect();
        match authz::evaluate_selected(&l4, &conn) {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
        }
    }
}

/// Not HTTP: one endpoint, bytes both ways, L4 policy only.
pub(crate) async fn l4(wp: &Waypoint, s: &Stream, mut io: hbone::StreamIo) {
    let key = L4Stream {
        src: s.src.clone(),
        peer: s.peer,
        target: s.target,
    };
    // Registered before the decision: a change after `state` was loaded is
    // re-checked against this stream too.
    let mut live = wp.live.admit(key.clone());
    let state = wp.store.load();
    let Some(eps) = endpoints_for_target(&state, s.target) else {
        return;
    };
    if let Err(why) = wp.admit_l4(&state, &key) {
        return tracing::info!(source = %s.src, target = %s.target, why, "L4 stream denied at the waypoint");
    }
    if eps.is_empty() {
        return;
    }
    let (ep, port) = eps[rand::random_range(0..eps.len())].clone();
    drop(state);
    let dst = crate::upstream::at(&ep, s.target.ip(), port);
    // An endpoint outside the mesh (a ServiceEntry's) is plain TCP.
    if ep.protocol == mesh::TunnelProtocol::None {
        match tokio::net::TcpStream::connect(dst).await {
            Ok(mut up) => {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut io, &mut up) => {}
                    Ok(why) = &mut live.revoked => {
                        tracing::info!(source = %s.src, target = %s.target, reason = why, "live L4 stream closed by a policy change");
                    }
                }
            }
            Err(e) => tracing::info!(%dst, error = %e, "L4 upstream failed"),
        }
        return;
    }
    let Ok(cert) = wp.certs.fetch(&wp.identity).await else {
        return;
    };
    let hbone_addr = SocketAddr::new(dst.ip(), hbone::HBONE_PORT);
    let key = hbone::PoolKey {
        source: "waypoint-l4".into(),
        dst_identity: ep.identity(),
        dst: hbone_addr,
    };
    let dial = move || async move { tokio::net::TcpStream::connect(hbone_addr).await };
    match wp
        .upstreams
        .pool_connect(key, cert.client.clone(), dial, dst)
        .await
    {
        Ok((send, recv, _guard)) => {
            let mut up = hbone::StreamIo::new(send, recv);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut io, &mut up) => {}
                Ok(why) = &mut live.revoked => {
                    tracing::info!(source = %s.src, target = %s.target, reason = why, "live L4 stream closed by a policy change");
                }
            }
        }
        Err(e) => tracing::info!(%dst, error = %e, "L4 upstream failed"),
    }
}

/// The (endpoint, port) pairs of the service the CONNECT named by VIP, on
/// that port, or the one workload it named; None: neither is known.
fn endpoints_for_target(
    state: &MeshState,
    target: SocketAddr,
) -> Option<Vec<(Arc<Workload>, u16)>> {
    if let Some(svc) = state.service_by_vip(target.ip()) {
        return Some(state.endpoints_for(svc, target.port()));
    }
    state
        .workload_by_ip(target.ip())
        .map(|w| vec![(w.clone(), target.port())])
}
