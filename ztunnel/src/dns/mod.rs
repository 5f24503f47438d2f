//! The DNS proxy each pod's port-53 traffic is redirected to (127.0.0.1:15053
//! in the pod netns, UDP and TCP): mesh names are answered here, the rest is
//! forwarded to the pod's own resolvers from inside the pod.

mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::ResponseCode;
use metrics::{Counter, Histogram};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::proxy::{Pod, Proxy};
use ztunnel::dns::answer::{self, Plan};

pub const DNS_PORT: u16 = 15053;
/// Requests in flight per pod; more are dropped (the client retries), so a
/// flood cannot grow memory without bound.
const MAX_IN_FLIGHT: usize = 256;
/// A forward that takes longer is answered SERVFAIL.
pub const UPSTREAM_DEADLINE: Duration = Duration::from_secs(5);
const TCP_IDLE: Duration = Duration::from_secs(10);

struct Meters {
    requests: Counter,
    malformed: Counter,
    forwards: Counter,
    failures: Counter,
    duration: Histogram,
    upstream_duration: Histogram,
}

impl Meters {
    fn new(pod: &Pod) -> Self {
        let l = [
            ("source_workload", pod.name.clone()),
            ("source_workload_namespace", pod.namespace.clone()),
        ];
        Meters {
            requests: metrics::counter!("istio_dns_requests_total", &l),
            malformed: metrics::counter!("istio_dns_malformed_requests_total", &l),
            forwards: metrics::counter!("istio_dns_upstream_requests_total", &l),
            failures: metrics::counter!("istio_dns_upstream_failures_total", &l),
            duration: metrics::histogram!("istio_dns_request_duration_seconds", &l),
            upstream_duration: metrics::histogram!(
                "istio_dns_upstream_request_duration_seconds",
                &l
            ),
        }
    }
}

/// Histogram buckets for the DNS latencies, seconds.
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

struct Dns {
    px: Arc<Proxy>,
    upstream: upstream::Upstream,
    meters: Meters,
}

impl Dns {
    /// The answer to one request, encoded; None drops it (malformed).
    async fn handle(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let start = Instant::now();
        let Some(req) = answer::parse(bytes) else {
            self.meters.malformed.increment(1);
            return None;
        };
        self.meters.requests.increment(1);
        let resp = match answer::plan(&req, &self.px.store.load(), &self.upstream.search) {
            Plan::Reply(m) => m,
            Plan::Forward { name, qtype } => {
                self.meters.forwards.increment(1);
                let t = Instant::now();
                let r = tokio::time::timeout(
                    UPSTREAM_DEADLINE,
                    self.upstream.forward(&req, name, qtype),
                )
                .await;
                self.meters.upstream_duration.record(t.elapsed());
                match r {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "DNS forward failed");
                        self.meters.failures.increment(1);
                        answer::response(&req, ResponseCode::ServFail)
                    }
                    Err(_) => {
                        self.meters.failures.increment(1);
                        answer::response(&req, ResponseCode::ServFail)
                    }
                }
            }
        };
        self.meters.duration.record(start.elapsed());
        if udp {
            answer::encode_udp(&req, &resp)
        } else {
            resp.to_vec().ok()
        }
    }
}

/// Opens the pod's DNS sockets and serves them until `stop` or the drain.
pub fn start(px: &Arc<Proxy>, pod: Arc<Pod>, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let sockets = pod.netns.dns_listeners(DNS_PORT)?;
    let dns = Arc::new(Dns {
        px: px.clone(),
        upstream: upstream::Upstream::for_pod(pod.clone()),
        meters: Meters::new(&pod),
    });
    for (udp, tcp) in sockets {
        tokio::spawn(serve_udp(
            dns.clone(),
            Arc::new(udp),
            stop.clone(),
            px.drain.clone(),
        ));
        tokio::spawn(serve_tcp(dns.clone(), tcp, stop.clone(), px.drain.clone()));
    }
    Ok(())
}

async fn stopped(mut stop: watch::Receiver<bool>, mut drain: watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.changed() => {}
        _ = drain.wait_for(|d| *d) => {}
    }
}

async fn serve_udp(
    dns: Arc<Dns>,
    sock: Arc<UdpSocket>,
    stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let stopped = stopped(stop, drain);
    tokio::pin!(stopped);
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // overloaded: the client's own retry is the back-pressure
        };
        let (dns, sock, bytes) = (dns.clone(), sock.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            if let Some(out) = dns.handle(&bytes, true).await {
                let _ = sock.send_to(&out, peer).await;
            }
            drop(slot);
        });
    }
}

async fn serve_tcp(
    dns: Arc<Dns>,
    l: TcpListener,
    stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    let stopped = stopped(stop, drain);
    tokio::pin!(stopped);
    loop {
        let s = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        tokio::spawn(serve_tcp_conn(dns.clone(), s));
    }
}

/// RFC 7766 framing: a 2-byte length before each message; several requests
/// may share a connection. A malformed one closes it.
async fn serve_tcp_conn(dns: Arc<Dns>, mut s: TcpStream) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return;
        };
        let msg = &mut buf[..len as usize];
        if tokio::time::timeout(TCP_IDLE, s.read_exact(msg))
            .await
            .is_err()
        {
            return;
        }
        let Some(out) = dns.handle(msg, false).await else {
            return;
        };
        let Ok(len) = u16::try_from(out.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&out);
        if s.write_all(&framed).await.is_err() {
            return;
        }
    }
}
