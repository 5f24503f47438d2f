//! 15008 (HBONE) and 15006 (plaintext) inside the destination pod: admit by
//! PeerAuthentication and AuthorizationPolicy, then connect to the application
//! as the original client.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use identity::Identity;
use mesh::authz::{self, Connection, Decision};
use mesh::MtlsMode;
use tokio::net::TcpStream;

use super::{Pod, Proxy};
use crate::metrics::{ConnInfo, ConnMetrics, Flag, Reporter};

pub async fn hbone(px: Arc<Proxy>, pod: Arc<Pod>, tcp: TcpStream, peer: SocketAddr) {
    let cert = match px.certs.fetch(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pod = %pod.uid, %peer, error = %e, "no certificate to terminate HBONE; closing");
            return;
        }
    };
    let handshake = tokio::time::timeout(
        hbone::HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cert.server.clone()).accept(hbone::read_buffered(tcp)),
    );
    let tls = match handshake.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            metrics::counter!("ztunnel_tls_handshake_failures_total", "reason" => "handshake")
                .increment(1);
            tracing::warn!(pod = %pod.uid, %peer, error = %e, "HBONE TLS handshake refused");
            return;
        }
        Err(_) => {
            metrics::counter!("ztunnel_tls_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            tracing::warn!(pod = %pod.uid, %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    let src_id = match identity::peer_identity(tls.get_ref().1) {
        Ok(id) => Arc::new(id),
        Err(e) => {
            metrics::counter!("ztunnel_tls_handshake_failures_total", "reason" => "identity")
                .increment(1);
            tracing::warn!(pod = %pod.uid, %peer, error = %e, "HBONE peer has no usable SPIFFE identity");
            return;
        }
    };
    let drain = px.drain.clone();
    let handler = {
        let px = px.clone();
        move |inb: hbone::Inbound| stream(px.clone(), pod.clone(), src_id.clone(), peer, inb)
    };
    hbone::log_end(peer, hbone::serve(tls, drain, handler).await);
}

async fn stream(
    px: Arc<Proxy>,
    pod: Arc<Pod>,
    src_id: Arc<Identity>,
    peer: SocketAddr,
    inb: hbone::Inbound,
) {
    let state = px.store.load();
    let Some(dst_w) = pod.workload(&state) else {
        tracing::warn!(pod = %pod.uid, "pod is not in the mesh config; refusing");
        return inb.refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    let target = inb.authority;
    if target.ip() != dst_w.ip {
        tracing::warn!(pod = %pod.uid, %target, "CONNECT names an address that is not this pod");
        return inb.refuse(StatusCode::BAD_REQUEST);
    }
    let m = open_metrics(&state, peer, target, Some(&src_id), &dst_w);
    let conn = Connection {
        src_identity: Some(&src_id),
        src_ip: peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
        request: None,
    };
    if let Some(why) = bypasses_waypoint(&state, &dst_w, &src_id, &conn) {
        m.close(Flag::Deny, (0, 0), Some(&why));
        return inb.refuse(StatusCode::UNAUTHORIZED);
    }
    if let Decision::Deny(why) = authz::evaluate(state.policies.iter().map(|p| &**p), &dst_w, &conn)
    {
        // Recorded before the peer hears it, so metrics never lag the answer.
        m.close(Flag::Deny, (0, 0), Some(&why));
        return inb.refuse(StatusCode::UNAUTHORIZED);
    }
    drop(state);
    let app = match pod.netns.connect(target, Some(peer)).await {
        Ok(s) => s,
        Err(e) => {
            m.close(Flag::ConnectFailure, (0, 0), Some(&e));
            return inb.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let (send, recv) = match inb.accept() {
        Ok(s) => s,
        Err(e) => return m.close(Flag::ConnectFailure, (0, 0), Some(&e)),
    };
    let (rd, wr) = app.into_split();
    match hbone::pump(rd, wr, send, recv, &|t| m.count(t.received, t.sent)).await {
        Ok(t) => m.close(Flag::None, (t.received, t.sent), None),
        Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
    }
}

/// A pod whose traffic must pass its waypoint (waypoint for `workload` or
/// `all`) takes HBONE only from that waypoint, unless an ALLOW policy on the
/// pod names this source explicitly.
fn bypasses_waypoint(
    state: &mesh::MeshState,
    w: &mesh::Workload,
    src: &Identity,
    c: &Connection,
) -> Option<String> {
    let r = state.workload_waypoint(w)?;
    let pods = state.waypoint(r).map(|(_, p)| p).unwrap_or_default();
    if pods.iter().any(|p| p.identity() == *src) {
        return None;
    }
    let explicitly_allowed = state
        .policies
        .iter()
        .any(|p| p.action == authz::Action::Allow && p.selects(w) && p.matches(c));
    (!explicitly_allowed).then(|| format!("{src} bypassed waypoint {}/{}", r.namespace, r.name))
}

pub async fn plaintext(px: Arc<Proxy>, pod: Arc<Pod>, down: TcpStream, peer: SocketAddr) {
    let Some(target) = super::redirected_dst(&pod, &down, peer) else {
        return;
    };
    let state = px.store.load();
    let Some(dst_w) = pod.workload(&state) else {
        tracing::warn!(pod = %pod.uid, "pod is not in the mesh config; refusing plaintext");
        return;
    };
    let m = open_metrics(&state, peer, target, None, &dst_w);
    if let Some(r) = state.workload_waypoint(&dst_w) {
        let why = format!("plaintext bypasses waypoint {}/{}", r.namespace, r.name);
        return m.close(Flag::Deny, (0, 0), Some(&why));
    }
    if state.mtls_mode(&dst_w, target.port()) == MtlsMode::Strict {
        return m.close(
            Flag::Deny,
            (0, 0),
            Some(&"plaintext refused: PeerAuthentication is STRICT"),
        );
    }
    let conn = Connection {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
        request: None,
    };
    if let Decision::Deny(why) = authz::evaluate(state.policies.iter().map(|p| &**p), &dst_w, &conn)
    {
        return m.close(Flag::Deny, (0, 0), Some(&why));
    }
    drop(state);
    match pod.netns.connect(target, Some(peer)).await {
        Ok(app) => super::relay_plain(down, app, m).await,
        Err(e) => m.close(Flag::ConnectFailure, (0, 0), Some(&e)),
    }
}

/// Destination-side metrics; the source is named by the verified identity
/// (mTLS) and, for workload labels, by its address in the model.
fn open_metrics(
    state: &mesh::MeshState,
    peer: SocketAddr,
    target: SocketAddr,
    src_id: Option<&Identity>,
    dst_w: &mesh::Workload,
) -> ConnMetrics {
    let src_w = state.workload_by_ip(peer.ip());
    ConnMetrics::open(ConnInfo {
        reporter: Reporter::Destination,
        src: peer,
        dst: target,
        src_workload: src_w.map(|w| &**w),
        src_identity: src_id,
        dst_workload: Some(dst_w),
        dst_service: None,
        mtls: src_id.is_some(),
    })
}
