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
    let (tls, src_id) = match hbone::terminate(cert.server.clone(), tcp).await {
        Ok((tls, id)) => (tls, Arc::new(id)),
        Err(e) => {
            metrics::counter!("ztunnel_tls_handshake_failures_total", "reason" => e.reason())
                .increment(1);
            tracing::warn!(pod = %pod.uid, %peer, error = %e, "HBONE connection not terminated");
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

/// What an inbound connection was admitted on, kept to judge it again when
/// policy changes. `src` is None for plaintext (15006).
#[derive(Clone)]
pub struct Inbound {
    pub pod: Arc<Pod>,
    pub src: Option<Arc<Identity>>,
    pub peer: SocketAddr,
    pub target: SocketAddr,
}

/// Why an inbound connection is refused; knows its HBONE status.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("pod is not in the mesh config")]
    UnknownPod,
    #[error("CONNECT names {0}, which is not this pod")]
    NotThisPod(SocketAddr),
    #[error("{0}")]
    Policy(String),
}

impl Refused {
    fn status(&self) -> StatusCode {
        match self {
            Refused::UnknownPod => StatusCode::SERVICE_UNAVAILABLE,
            Refused::NotThisPod(_) => StatusCode::BAD_REQUEST,
            Refused::Policy(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The admission decision for a connection to `c.pod`, pure: the same rules
/// for a new connection and for a live one when policy changes.
pub fn admit(state: &mesh::MeshState, c: &Inbound) -> Result<Arc<mesh::Workload>, Refused> {
    let dst_w = c.pod.workload(state).ok_or(Refused::UnknownPod)?;
    let conn = Connection {
        src_identity: c.src.as_deref(),
        src_ip: c.peer.ip(),
        dst_ip: c.target.ip(),
        dst_port: c.target.port(),
        request: None,
    };
    match &c.src {
        Some(src) => {
            if !dst_w.has_address(c.target.ip()) {
                return Err(Refused::NotThisPod(c.target));
            }
            if let Some(why) = bypasses_waypoint(state, &dst_w, src, &conn) {
                return Err(Refused::Policy(why));
            }
        }
        None => {
            if let Some(r) = state.workload_waypoint(&dst_w) {
                let why = format!("plaintext bypasses waypoint {}/{}", r.namespace, r.name);
                return Err(Refused::Policy(why));
            }
            if state.mtls_mode(&dst_w, c.target.port()) == MtlsMode::Strict {
                return Err(Refused::Policy(
                    "plaintext refused: PeerAuthentication is STRICT".into(),
                ));
            }
        }
    }
    match authz::evaluate_selected(state.policies_selecting(&dst_w), &conn) {
        Decision::Allow => Ok(dst_w),
        Decision::Deny(why) => Err(Refused::Policy(why)),
    }
}

/// Re-judges live inbound connections whenever the mesh config changes.
pub fn watch_live(px: &Proxy) {
    px.live.clone().watch(
        px.store.clone(),
        "ztunnel",
        px.drain.clone(),
        |state, c: &Inbound| admit(state, c).map(|_| ()).map_err(|e| e.to_string()),
    );
}

async fn stream(
    px: Arc<Proxy>,
    pod: Arc<Pod>,
    src_id: Arc<Identity>,
    peer: SocketAddr,
    inb: hbone::Inbound,
) {
    let c = Inbound {
        pod,
        src: Some(src_id.clone()),
        peer,
        target: inb.authority,
    };
    // Registered before the decision: a change that lands after the state
    // below was loaded is re-checked against this connection too.
    let mut live = px.live.admit(c.clone());
    let state = px.store.load();
    let dst_w = match admit(&state, &c) {
        Ok(w) => w,
        Err(e @ (Refused::UnknownPod | Refused::NotThisPod(_))) => {
            tracing::warn!(pod = %c.pod.uid, target = %c.target, source = %src_id, error = %e, "refusing CONNECT");
            return inb.refuse(e.status());
        }
        Err(e) => {
            let m = open_metrics(&state, peer, c.target, Some(&src_id), &c.pod, None);
            // Recorded before the peer hears it, so metrics never lag the answer.
            m.close(Flag::Deny, (0, 0), Some(&e));
            return inb.refuse(e.status());
        }
    };
    let m = open_metrics(&state, peer, c.target, Some(&src_id), &c.pod, Some(&dst_w));
    drop(state);
    let (pod, target) = (c.pod, c.target);
    // Boxed: the connect's state is over once the tunnel is up; inline it
    // would stay part of the stream's task for the connection's life.
    let app = match Box::pin(pod.netns.connect(target, Some(peer))).await {
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
    // Running totals, for the log of a connection a policy change closes.
    let totals = std::sync::Mutex::new((0u64, 0u64));
    let count = |t: hbone::Transfer| {
        m.count(t.received, t.sent);
        let mut tot = totals.lock().unwrap();
        tot.0 += t.received;
        tot.1 += t.sent;
    };
    tokio::select! {
        r = hbone::pump(rd, wr, send, recv, &count) => match r {
            Ok(t) => m.close(Flag::None, (t.received, t.sent), None),
            Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
        },
        // Dropping the pump resets the stream and closes the app socket.
        Ok(why) = &mut live.revoked => {
            let bytes = *totals.lock().unwrap();
            revoked(m, &pod, target, Some(&src_id), bytes, &why);
        }
    }
}

/// A live connection the new policy refuses: closed, logged with the policy
/// that closed it, counted as a denial.
fn revoked(
    m: ConnMetrics,
    pod: &Pod,
    target: SocketAddr,
    src: Option<&Identity>,
    bytes: (u64, u64),
    why: &str,
) {
    let source = src.map(|s| s.to_string()).unwrap_or_default();
    tracing::info!(pod = %pod.uid, %target, source, reason = why, "live connection closed by a policy change");
    m.close(
        Flag::Deny,
        bytes,
        Some(&format!("closed by policy change: {why}")),
    );
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
        .policies_selecting(w)
        .any(|p| p.action == authz::Action::Allow && p.matches(c));
    (!explicitly_allowed).then(|| format!("{src} bypassed waypoint {}/{}", r.namespace, r.name))
}

pub async fn plaintext(px: Arc<Proxy>, pod: Arc<Pod>, mut down: TcpStream, peer: SocketAddr) {
    let Some(target) = super::redirected_dst(&pod, &down, peer) else {
        return;
    };
    let c = Inbound {
        pod,
        src: None,
        peer,
        target,
    };
    // Registered before the decision, as for HBONE.
    let mut live = px.live.admit(c.clone());
    let state = px.store.load();
    let dst_w = match admit(&state, &c) {
        Ok(w) => w,
        Err(Refused::UnknownPod) => {
            return tracing::warn!(pod = %c.pod.uid, "pod is not in the mesh config; refusing plaintext")
        }
        Err(e) => {
            let m = open_metrics(&state, peer, target, None, &c.pod, None);
            return m.close(Flag::Deny, (0, 0), Some(&e));
        }
    };
    let m = open_metrics(&state, peer, target, None, &c.pod, Some(&dst_w));
    drop(state);
    let pod = c.pod;
    let mut app = match pod.netns.connect(target, Some(peer)).await {
        Ok(app) => app,
        Err(e) => return m.close(Flag::ConnectFailure, (0, 0), Some(&e)),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut app, 64 * 1024, 64 * 1024);
    tokio::select! {
        r = copy => match r {
            Ok((req, resp)) => {
                m.count(req, resp);
                m.close(Flag::None, (req, resp), None)
            }
            Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
        },
        // The kernel copy keeps no running totals: bytes are unknown here.
        Ok(why) = &mut live.revoked => revoked(m, &pod, target, None, (0, 0), &why),
    }
}

/// Destination-side metrics; the source is named by the verified identity
/// (mTLS) and, for workload labels, by its address in the model.
fn open_metrics(
    state: &mesh::MeshState,
    peer: SocketAddr,
    target: SocketAddr,
    src_id: Option<&Identity>,
    pod: &Pod,
    dst_w: Option<&mesh::Workload>,
) -> ConnMetrics {
    let found = dst_w.is_none().then(|| pod.workload(state)).flatten();
    let dst_w = dst_w.or(found.as_deref());
    let src_w = state.workload_by_ip(peer.ip());
    ConnMetrics::open(ConnInfo {
        reporter: Reporter::Destination,
        src: peer,
        dst: target,
        src_workload: src_w.map(|w| &**w),
        src_identity: src_id,
        dst_workload: dst_w,
        dst_service: None,
        mtls: src_id.is_some(),
    })
}
