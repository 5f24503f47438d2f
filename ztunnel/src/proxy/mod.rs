//! The data path: per-pod listeners and what each does with a connection.

mod balance;
mod inbound;
mod outbound;

use std::net::SocketAddr;
use std::sync::Arc;

use identity::{Identity, SecretManager};
use mesh::{MeshStore, Workload};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::metrics::{ConnMetrics, Flag};
use crate::netns::PodNetns;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// What every connection handler shares.
pub struct Proxy {
    pub store: Arc<MeshStore>,
    pub certs: Arc<SecretManager>,
    pub pool: Arc<hbone::Pool>,
    pub trust_domain: String,
    pub node: String,
    /// Every connection task, so a drain can wait for them.
    pub tasks: TaskTracker,
    /// Flips to true on SIGTERM: stop accepting, let live connections end.
    pub drain: watch::Receiver<bool>,
    /// Admitted inbound connections, re-judged on every config change.
    pub live: Arc<mesh::live::LiveConns<inbound::Inbound>>,
    /// Whether each pod gets the DNS proxy (ISTIO_META_DNS_CAPTURE).
    pub dns_proxy: bool,
}

pub use inbound::watch_live;

/// A pod this ztunnel serves, as the node agent described it.
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub netns: PodNetns,
}

impl Pod {
    /// The pod in the mesh model. Handlers refuse traffic for a pod the model
    /// does not know rather than guess its policy.
    pub fn workload(&self, state: &mesh::MeshState) -> Option<Arc<Workload>> {
        state
            .workloads
            .get(&self.uid)
            .or_else(|| state.workload_by_name(&self.namespace, &self.name))
            .cloned()
    }
}

/// Opens the pod's listeners (three TCP ports, and DNS; each for IPv4 and
/// IPv6) and serves them until `stop` or the drain.
pub fn start_pod(
    px: &Arc<Proxy>,
    pod: Arc<Pod>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let outbound = pod.netns.listeners(OUTBOUND_PORT)?;
    let plaintext = pod.netns.listeners(INBOUND_PLAINTEXT_PORT)?;
    let hbone = pod.netns.listeners(hbone::HBONE_PORT)?;
    for l in outbound {
        spawn_accept(px, &pod, l, stop.clone(), outbound::handle);
    }
    for l in plaintext {
        spawn_accept(px, &pod, l, stop.clone(), inbound::plaintext);
    }
    for l in hbone {
        spawn_accept(px, &pod, l, stop.clone(), inbound::hbone);
    }
    if !px.dns_proxy {
        return Ok(());
    }
    crate::dns::start(px, pod, stop)
}

fn spawn_accept<F, Fut>(
    px: &Arc<Proxy>,
    pod: &Arc<Pod>,
    l: TcpListener,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Arc<Proxy>, Arc<Pod>, tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (px, pod) = (px.clone(), pod.clone());
    let mut drain = px.drain.clone();
    tokio::spawn(async move {
        let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
        loop {
            let accepted = tokio::select! {
                a = l.accept() => a,
                _ = stop.changed() => break,
                _ = drain.wait_for(|d| *d) => break,
            };
            match accepted {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    px.tasks.spawn(handler(px.clone(), pod.clone(), s, peer));
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.uid, port, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        tracing::debug!(pod = %pod.uid, port, "listener closed");
    });
}

/// Where a REDIRECTed connection was headed; None (logged) closes it.
fn redirected_dst(pod: &Pod, s: &tokio::net::TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    crate::netns::original_dst(s)
        .inspect_err(|e| tracing::warn!(pod = %pod.uid, %peer, error = %e, "no original destination; closing"))
        .ok()
}

/// Plain TCP both ways (no tunnel): the bytes are not inspected, so the
/// kernel-side copy loop does the work; the totals go to metrics at the end.
async fn relay_plain(
    mut down: tokio::net::TcpStream,
    mut up: tokio::net::TcpStream,
    m: ConnMetrics,
) {
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 * 1024, 64 * 1024).await {
        Ok((req, resp)) => {
            m.count(req, resp);
            m.close(Flag::None, (req, resp), None)
        }
        Err(e) => m.close(Flag::None, (0, 0), Some(&e)),
    }
}
