//! 15001: traffic a pod sends, REDIRECTed here with its original destination.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use mesh::{Service, TunnelProtocol, Workload};
use tokio::net::TcpStream;

use super::{balance, Pod, Proxy};
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
        // The waypoint's own Service may prefer close instances (istiod
        // asks for it on waypoints): the closest one serves.
        let (pods, wp_lb) = state
            .waypoint(&r)
            .map(|(wp, p)| {
                let lb = state.service_by_host(&wp.hostname);
                (p, lb.and_then(|s| s.load_balancing.clone()))
            })
            .unwrap_or_default();
        let pods: Vec<_> = pods.into_iter().map(|p| (p, hbone::HBONE_PORT)).collect();
        let pods = balance::order(src_w.as_deref(), wp_lb.as_ref(), pods);
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
                "waypoint {}/{} has no ready pod (none close enough under STRICT, or no Gateway); not bypassing it",
                r.namespace, r.name
            );
            return m.close(Flag::ConnectFailure, (0, 0), Some(&why));
        }
        let wp = pods[0].0.clone();
        // The CONNECT names the original destination; the waypoint routes it.
        // Of the original destination's family: a v6 connection stays v6.
        let at = wp.address_like(orig.ip());
        return via_hbone(&px, &pod, down, orig, (at, &wp), src_w.as_deref(), m).await;
    }
    let mut service: Option<Arc<Service>> = None;
    let targets = if let Some(svc) = state.service_by_vip(orig.ip()) {
        service = Some(svc.clone());
        let lb = svc.load_balancing.as_ref();
        if lb.is_some_and(|l| l.mode == mesh::locality::Mode::Passthrough) {
            // No endpoint choice: where the client was going.
            vec![Target::Passthrough(orig)]
        } else {
            let eps = state.endpoints_for(svc, orig.port());
            let any = !eps.is_empty();
            let eps = balance::order(src_w.as_deref(), lb, eps);
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
                let why = if any {
                    format!(
                        "service {} has no endpoint for port {} close enough (STRICT)",
                        svc.hostname,
                        orig.port()
                    )
                } else {
                    format!(
                        "service {} has no endpoint for port {}",
                        svc.hostname,
                        orig.port()
                    )
                };
                m.close(Flag::ConnectFailure, (0, 0), Some(&why));
                return;
            }
            eps.into_iter()
                .map(|(w, port)| Target::Workload(w, port))
                .collect()
        }
    } else if let Some(w) = state.workload_by_ip(orig.ip()) {
        vec![Target::Workload(w.clone(), orig.port())]
    } else {
        vec![Target::Passthrough(orig)]
    };
    drop(state);

    let tries = targets.len();
    for (i, target) in targets.into_iter().enumerate() {
        let src = Source {
            px: &px,
            pod: &pod,
            peer,
            orig,
            src_w: src_w.as_deref(),
            service: service.as_deref(),
        };
        // Boxed: the dial's state (DNS, TLS and HTTP/2 handshakes) is large
        // and over once the tunnel is up; inline it would stay part of every
        // connection's task for as long as the connection lives.
        let (flag, why, m) = match Box::pin(dial(&src, &target)).await {
            Ok((up, m)) => return relay(down, up, m).await,
            Err(e) => e,
        };
        let retry = i + 1 < tries && matches!(flag, Flag::ConnectFailure | Flag::DnsFailure);
        if retry {
            // Nothing reached the client yet: another endpoint may serve it.
            metrics::counter!("ztunnel_connect_retries_total").increment(1);
            let what = match &target {
                Target::Workload(w, port) => format!("{}/{}:{port}", w.namespace, w.name),
                Target::Passthrough(a) => a.to_string(),
            };
            tracing::warn!(
                endpoint = %what,
                attempt = i + 1,
                of = tries,
                error = %why,
                "endpoint failed; trying another"
            );
            m.close(
                flag,
                (0, 0),
                Some(&format_args!("{why}; trying another endpoint")),
            );
            continue;
        }
        if flag == Flag::DnsFailure {
            // A reset, not an accepted connection that just ends: the
            // client sees at once that there is no upstream.
            let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
        }
        return m.close(flag, (0, 0), Some(&why));
    }
}

/// Who is connecting, and to what it asked for.
struct Source<'a> {
    px: &'a Proxy,
    pod: &'a Arc<Pod>,
    peer: SocketAddr,
    orig: SocketAddr,
    src_w: Option<&'a Workload>,
    service: Option<&'a Service>,
}

/// An HBONE stream to a peer: its two halves, and what keeps its pooled
/// connection counted as in use.
type Tunnel = (
    h2::SendStream<bytes::Bytes>,
    h2::RecvStream,
    hbone::StreamGuard,
);

/// A connection to the chosen upstream, not yet carrying bytes.
enum Upstream {
    Hbone(Tunnel),
    Plain(TcpStream),
}

type Failed = (Flag, String, ConnMetrics);

/// Connects to `target` (resolving a hostname endpoint first), with the
/// connection's metrics opened for it.
async fn dial(s: &Source<'_>, target: &Target) -> Result<(Upstream, ConnMetrics), Failed> {
    let open = |dst, dst_w: Option<&Workload>, mtls| {
        ConnMetrics::open(ConnInfo {
            reporter: Reporter::Source,
            src: s.peer,
            dst,
            src_workload: s.src_w,
            src_identity: Some(&s.pod.identity),
            dst_workload: dst_w,
            dst_service: s.service,
            mtls,
        })
    };
    let (dst, dst_w) = match target {
        // A DNS ServiceEntry's endpoint: connect to what its name resolves
        // to now (the resolver keeps answers for their TTL).
        Target::Workload(w, port) if w.hostname.is_some() => {
            let host = w.hostname.as_deref().unwrap_or_default();
            match resolve(host, *port).await {
                Ok(at) => (at, Some(w)),
                Err(e) => {
                    let m = open(s.orig, Some(w), false);
                    let why = format!("endpoint {host} did not resolve: {e}");
                    return Err((Flag::DnsFailure, why, m));
                }
            }
        }
        // A dual-stack endpoint is reached in the family the pod used (a
        // v6 VIP goes to its v6 address).
        Target::Workload(w, port) => (SocketAddr::new(w.address_like(s.orig.ip()), *port), Some(w)),
        Target::Passthrough(a) => (*a, None),
    };
    // A hostname endpoint is reached at what its name resolved to (its own
    // address is unspecified): over HBONE there too when the source says it
    // speaks HBONE, never downgraded to plain TCP.
    let hbone = dst_w.is_some_and(|w| w.protocol == TunnelProtocol::Hbone);
    let mut m = open(dst, dst_w.map(|w| &**w), hbone);
    match (hbone, dst_w) {
        (true, Some(w)) => {
            let at = if w.hostname.is_some() {
                dst.ip()
            } else {
                w.address_like(dst.ip())
            };
            match hbone_connect(s.px, s.pod, dst, (at, w), s.src_w, &mut m).await {
                Ok(t) => Ok((Upstream::Hbone(t), m)),
                Err((flag, why)) => Err((flag, why, m)),
            }
        }
        _ => match s.pod.netns.connect(dst, None).await {
            Ok(up) => Ok((Upstream::Plain(up), m)),
            Err(e) => Err((Flag::ConnectFailure, e.to_string(), m)),
        },
    }
}

async fn relay(down: TcpStream, up: Upstream, m: ConnMetrics) {
    match up {
        Upstream::Plain(up) => super::relay_plain(down, up, m).await,
        Upstream::Hbone((send, recv, _guard)) => {
            let (rd, wr) = down.into_split();
            let res = hbone::pump(rd, wr, send, recv, &|t| m.count(t.sent, t.received)).await;
            match res {
                Ok(t) => m.close(Flag::None, (t.sent, t.received), None),
                Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
            }
        }
    }
}

async fn via_hbone(
    px: &Proxy,
    pod: &Arc<Pod>,
    down: TcpStream,
    dst: SocketAddr,
    // The peer, and where it takes HBONE: its address, or what its
    // hostname resolved to.
    peer: (std::net::IpAddr, &Workload),
    src_w: Option<&Workload>,
    mut m: ConnMetrics,
) {
    // Boxed for the task's size, as in `handle`.
    match Box::pin(hbone_connect(px, pod, dst, peer, src_w, &mut m)).await {
        Ok(t) => relay(down, Upstream::Hbone(t), m).await,
        Err((flag, why)) => m.close(flag, (0, 0), Some(&why)),
    }
}

/// A tunnel to `dst` through the HBONE peer at `at` (pooled); a refusal
/// for policy is `Deny`, anything else a connect failure.
async fn hbone_connect(
    px: &Proxy,
    pod: &Arc<Pod>,
    dst: SocketAddr,
    (at, w): (std::net::IpAddr, &Workload),
    src_w: Option<&Workload>,
    m: &mut ConnMetrics,
) -> Result<Tunnel, (Flag, String)> {
    let hbone_addr = SocketAddr::new(at, hbone::HBONE_PORT);
    m.tunnel_to(hbone_addr);
    let cert = px
        .certs
        .fetch(&pod.identity)
        .await
        .map_err(|e| (Flag::ConnectFailure, e.to_string()))?;
    let key = hbone::PoolKey {
        source: pod.uid.clone(),
        dst_identity: w.identity(),
        dst: hbone_addr,
    };
    let netns_pod = pod.clone();
    let dial = move || async move { netns_pod.netns.connect(hbone_addr, None).await };
    px.pool
        .connect(
            key,
            cert.client.clone(),
            dial,
            &dst.to_string(),
            request_headers(pod, src_w),
        )
        .await
        .map_err(|e| {
            let denied = matches!(&e, hbone::Error::Refused { status, .. } if *status == http::StatusCode::UNAUTHORIZED || *status == http::StatusCode::FORBIDDEN);
            let flag = if denied {
                Flag::Deny
            } else {
                Flag::ConnectFailure
            };
            (flag, e.to_string())
        })
}

/// One address of `host`, at random among its answers, with `port`.
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, mesh::resolve::ResolveError> {
    let found = mesh::resolve::resolve_all(&[(host, port)]).await?;
    Ok(found[rand::random_range(0..found.len())].1)
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
