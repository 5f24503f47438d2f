//! 15001: traffic a pod sends, REDIRECTed here with its original destination.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use mesh::{Service, TunnelProtocol, Workload};
use tokio::net::TcpStream;

use super::{Pod, Proxy};
use crate::metrics::{ConnInfo, ConnMetrics, Flag, Reporter};

enum Target {
    Workload(Arc<Workload>, u16),
    /// Not a mesh address: plain TCP to where the pod was going.
    Passthrough(SocketAddr),
}

pub async fn handle(px: Arc<Proxy>, pod: Arc<Pod>, down: TcpStream, peer: SocketAddr) {
    let Some(orig) = super::redirected_dst(&pod, &down, peer) else {
        return;
    };
    let state = px.store.load();
    let src_w = pod.workload(&state);
    // A destination that asks for a waypoint goes through it, never around.
    let waypoint = match state.service_by_vip(orig.ip()) {
        Some(svc) => state
            .service_waypoint(svc)
            .cloned()
            .map(|r| (r, Some(svc.clone()))),
        None => state
            .workload_by_ip(orig.ip())
            .and_then(|w| state.workload_waypoint(w))
            .cloned()
            .map(|r| (r, None)),
    };
    if let Some((r, svc)) = waypoint {
        let pods = state.waypoint(&r).map(|(_, p)| p).unwrap_or_default();
        let dst_w = svc
            .is_none()
            .then(|| state.workload_by_ip(orig.ip()).cloned())
            .flatten();
        drop(state);
        let m = ConnMetrics::open(ConnInfo {
            reporter: Reporter::Source,
            src: peer,
            dst: orig,
            src_workload: src_w.as_deref(),
            src_identity: Some(&pod.identity),
            dst_workload: dst_w.as_deref(),
            dst_service: svc.as_deref(),
            mtls: true,
        });
        if pods.is_empty() {
            let why = format!(
                "waypoint {}/{} has no ready pod (or no Gateway); not bypassing it",
                r.namespace, r.name
            );
            return m.close(Flag::ConnectFailure, (0, 0), Some(&why));
        }
        let wp = pods[rand::random_range(0..pods.len())].clone();
        // The CONNECT names the original destination; the waypoint routes it.
        // Of the original destination's family: a v6 connection stays v6.
        let at = wp.address_like(orig.ip());
        return via_hbone(&px, &pod, down, orig, (at, &wp), src_w.as_deref(), m).await;
    }
    let mut service: Option<Arc<Service>> = None;
    let target = if let Some(svc) = state.service_by_vip(orig.ip()) {
        service = Some(svc.clone());
        let eps = state.endpoints_for(svc, orig.port());
        if eps.is_empty() {
            let m = ConnMetrics::open(ConnInfo {
                reporter: Reporter::Source,
                src: peer,
                dst: orig,
                src_workload: src_w.as_deref(),
                src_identity: Some(&pod.identity),
                dst_workload: None,
                dst_service: Some(svc),
                mtls: false,
            });
            let why = format!(
                "service {} has no endpoint for port {}",
                svc.hostname,
                orig.port()
            );
            m.close(Flag::ConnectFailure, (0, 0), Some(&why));
            return;
        }
        let (w, port) = eps[rand::random_range(0..eps.len())].clone();
        Target::Workload(w, port)
    } else if let Some(w) = state.workload_by_ip(orig.ip()) {
        Target::Workload(w.clone(), orig.port())
    } else {
        Target::Passthrough(orig)
    };
    drop(state);

    let (dst, dst_w) = match &target {
        // A DNS ServiceEntry's endpoint: connect to what its name resolves
        // to now (the resolver keeps answers for their TTL).
        Target::Workload(w, port) if w.hostname.is_some() => {
            let host = w.hostname.as_deref().unwrap_or_default();
            match resolve(host, *port).await {
                Ok(at) => (at, Some(w.clone())),
                Err(e) => {
                    let m = ConnMetrics::open(ConnInfo {
                        reporter: Reporter::Source,
                        src: peer,
                        dst: orig,
                        src_workload: src_w.as_deref(),
                        src_identity: Some(&pod.identity),
                        dst_workload: Some(w),
                        dst_service: service.as_deref(),
                        mtls: false,
                    });
                    // A reset, not an accepted connection that just ends:
                    // the client sees at once that there is no upstream.
                    let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
                    let why = format!("endpoint {host} did not resolve: {e}");
                    return m.close(Flag::DnsFailure, (0, 0), Some(&why));
                }
            }
        }
        // A dual-stack endpoint is reached in the family the pod used (a
        // v6 VIP goes to its v6 address).
        Target::Workload(w, port) => (
            SocketAddr::new(w.address_like(orig.ip()), *port),
            Some(w.clone()),
        ),
        Target::Passthrough(a) => (*a, None),
    };
    // A hostname endpoint is reached at what its name resolved to (its own
    // address is unspecified): over HBONE there too when the source says it
    // speaks HBONE, never downgraded to plain TCP.
    let hbone = dst_w
        .as_ref()
        .is_some_and(|w| w.protocol == TunnelProtocol::Hbone);
    let m = ConnMetrics::open(ConnInfo {
        reporter: Reporter::Source,
        src: peer,
        dst,
        src_workload: src_w.as_deref(),
        src_identity: Some(&pod.identity),
        dst_workload: dst_w.as_deref(),
        dst_service: service.as_deref(),
        mtls: hbone,
    });
    match (hbone, dst_w) {
        (true, Some(w)) => {
            let at = if w.hostname.is_some() {
                dst.ip()
            } else {
                w.address_like(dst.ip())
            };
            via_hbone(&px, &pod, down, dst, (at, &w), src_w.as_deref(), m).await
        }
        _ => direct(&pod, down, dst, m).await,
    }
}

async fn via_hbone(
    px: &Proxy,
    pod: &Arc<Pod>,
    down: TcpStream,
    dst: SocketAddr,
    // The peer, and where it takes HBONE: its address, or what its
    // hostname resolved to.
    (at, w): (std::net::IpAddr, &Workload),
    src_w: Option<&Workload>,
    mut m: ConnMetrics,
) {
    let hbone_addr = SocketAddr::new(at, hbone::HBONE_PORT);
    m.tunnel_to(hbone_addr);
    let cert = match px.certs.fetch(&pod.identity).await {
        Ok(c) => c,
        Err(e) => return m.close(Flag::ConnectFailure, (0, 0), Some(&e)),
    };
    let key = hbone::PoolKey {
        source: pod.uid.clone(),
        dst_identity: w.identity(),
        dst: hbone_addr,
    };
    let netns_pod = pod.clone();
    let dial = move || async move { netns_pod.netns.connect(hbone_addr, None).await };
    let tunnel = px
        .pool
        .connect(
            key,
            cert.client.clone(),
            dial,
            &dst.to_string(),
            request_headers(pod, src_w),
        )
        .await;
    let (send, recv, _guard) = match tunnel {
        Ok(t) => t,
        Err(e) => {
            let flag = if matches!(e, hbone::Error::Refused { status, .. } if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN)
            {
                Flag::Deny
            } else {
                Flag::ConnectFailure
            };
            return m.close(flag, (0, 0), Some(&e));
        }
    };
    let (rd, wr) = down.into_split();
    let res = hbone::pump(rd, wr, send, recv, &|t| m.count(t.sent, t.received)).await;
    match res {
        Ok(t) => m.close(Flag::None, (t.sent, t.received), None),
        Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
    }
}

/// One address of `host`, at random among its answers, with `port`.
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, mesh::resolve::ResolveError> {
    let found = mesh::resolve::resolve_all(&[(host, port)]).await?;
    Ok(found[rand::random_range(0..found.len())].1)
}

async fn direct(pod: &Pod, down: TcpStream, dst: SocketAddr, m: ConnMetrics) {
    match pod.netns.connect(dst, None).await {
        Ok(up) => super::relay_plain(down, up, m).await,
        Err(e) => m.close(Flag::ConnectFailure, (0, 0), Some(&e)),
    }
}

/// A fresh W3C traceparent per connection and baggage naming the source.
fn request_headers(pod: &Pod, src_w: Option<&Workload>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    let tp = format!("00-{trace:032x}-{span:016x}-01");
    h.insert("traceparent", tp.parse().expect("hex is a valid header"));
    // Upstream's shape: the workload under its kind's key, so a peer that
    // does not hold our pod still reports the workload, not the pod. A
    // workload of kind Pod already fills `k8s.pod.name`.
    let baggage = match src_w {
        Some(w) => {
            let key = w.workload_kind.baggage_key();
            let pod_name = if key == "k8s.pod.name" {
                String::new()
            } else {
                format!(",k8s.pod.name={}", pod.name)
            };
            format!(
                "k8s.cluster.name={},k8s.namespace.name={},{key}={}{pod_name},service.name={},service.version={}",
                mesh::owner::cluster_of(w),
                pod.namespace,
                w.workload_name,
                w.canonical_name,
                w.canonical_revision
            )
        }
        None => format!(
            "k8s.cluster.name={},k8s.namespace.name={},k8s.pod.name={}",
            mesh::owner::local_cluster(),
            pod.namespace,
            pod.name
        ),
    };
    if let Ok(v) = baggage.parse() {
        h.insert("baggage", v);
    }
    h
}
