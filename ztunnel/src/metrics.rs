//! Istio's L4 metrics and the per-connection access log. Counter
//! handles are resolved once per label set, so counting bytes on the data
//! path is one atomic add; connections with the same labels (the same
//! workloads, service and identity) share them, and the access log's names,
//! so a held connection costs a pointer here rather than its own copies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use identity::Identity;
use mesh::{Service, Workload};
use metrics::{Counter, Label};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// Why a connection ended badly, as Istio's `response_flags` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    None,
    Deny,
    ConnectFailure,
    /// The destination's name did not resolve (a DNS ServiceEntry).
    DnsFailure,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::Deny => "DENY",
            Flag::ConnectFailure => "CONNECT",
            Flag::DnsFailure => "DF",
        }
    }
}

pub struct ConnInfo<'a> {
    pub reporter: Reporter,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<&'a Workload>,
    /// The verified mTLS identity (inbound) or our own (outbound).
    pub src_identity: Option<&'a Identity>,
    pub dst_workload: Option<&'a Workload>,
    pub dst_service: Option<&'a Service>,
    pub mtls: bool,
}

pub struct ConnMetrics {
    shared: Arc<Shared>,
    start: Instant,
    log: AccessLog,
    _live: Live,
}

/// Connections with metrics open now, proxied or not yet.
static LIVE: AtomicUsize = AtomicUsize::new(0);

pub fn live_connections() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// One connection counted in LIVE while it exists, however it ends.
struct Live;

impl Live {
    fn new() -> Live {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What connections with the same labels and log names share.
struct Shared {
    key: SharedKey,
    sent: Counter,
    received: Counter,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct SharedKey {
    labels: Vec<Label>,
    names: LogNames,
}

/// Label sets of live connections. Weak: a set goes when its last
/// connection does (the registry keeps its counters).
static SHARED: Mutex<Option<Sets>> = Mutex::new(None);

struct Sets {
    map: HashMap<SharedKey, Weak<Shared>>,
    /// The map's length at which gone sets are swept next.
    sweep_at: usize,
}

/// Where the next sweep is, after one left `live` sets: twice that, so
/// sweeps stay amortized O(1) per new set even when the live count sits
/// just below a threshold and short-lived sets keep coming and going.
fn next_sweep(live: usize) -> usize {
    (2 * live).max(64)
}

impl Shared {
    fn get(key: SharedKey) -> Arc<Shared> {
        let mut sets = SHARED.lock().unwrap();
        let sets = sets.get_or_insert_with(|| Sets {
            map: HashMap::new(),
            sweep_at: next_sweep(0),
        });
        if let Some(s) = sets.map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        // Gone sets are swept when the map has doubled since the last
        // sweep, so it stays near the number of sets in use without a
        // sweep per connection.
        if sets.map.len() >= sets.sweep_at {
            sets.map.retain(|_, w| w.strong_count() > 0);
            sets.sweep_at = next_sweep(sets.map.len());
        }
        let map = &mut sets.map;
        let with_flag = |f: Flag| {
            let mut v = key.labels.clone();
            v.push(Label::new("response_flags", f.as_str()));
            v
        };
        let s = Arc::new(Shared {
            sent: metrics::counter!("istio_tcp_sent_bytes_total", with_flag(Flag::None)),
            received: metrics::counter!("istio_tcp_received_bytes_total", with_flag(Flag::None)),
            key: key.clone(),
        });
        map.insert(key, Arc::downgrade(&s));
        s
    }
}

/// The access log's fields, with upstream ztunnel's names, each its own
/// structured field (a JSON key with LOG_FORMAT=json) rather than text in
/// the message. Fields that are not known are left out, as upstream does.
struct AccessLog {
    src_addr: SocketAddr,
    /// Where the connection went: for HBONE the peer's port 15008.
    dst_addr: SocketAddr,
    /// The tunnel's target (the CONNECT authority), for HBONE only.
    dst_hbone_addr: Option<SocketAddr>,
}

/// The access log's names: the same for every connection of a label set.
#[derive(Clone, PartialEq, Eq, Hash)]
struct LogNames {
    src_workload: Option<String>,
    src_namespace: Option<String>,
    src_identity: Option<String>,
    dst_service: Option<String>,
    dst_workload: Option<String>,
    dst_namespace: Option<String>,
    dst_identity: Option<String>,
    direction: &'static str,
}

fn known(v: Option<&str>) -> Option<String> {
    v.filter(|s| !s.is_empty()).map(str::to_string)
}

impl AccessLog {
    fn new(c: &ConnInfo) -> AccessLog {
        AccessLog {
            src_addr: c.src,
            dst_addr: if c.mtls {
                SocketAddr::new(c.dst.ip(), hbone::HBONE_PORT)
            } else {
                c.dst
            },
            dst_hbone_addr: c.mtls.then_some(c.dst),
        }
    }
}

impl LogNames {
    fn new(c: &ConnInfo) -> LogNames {
        let (sw, dw, ds) = (c.src_workload, c.dst_workload, c.dst_service);
        LogNames {
            src_workload: known(sw.map(|w| w.name.as_str())),
            src_namespace: known(
                sw.map(|w| &*w.namespace)
                    .or(c.src_identity.map(|i| i.namespace.as_str())),
            ),
            src_identity: c.src_identity.map(|i| i.to_string()),
            dst_service: known(ds.map(|s| s.hostname.as_str())),
            dst_workload: known(dw.map(|w| w.name.as_str())),
            dst_namespace: known(
                dw.map(|w| &*w.namespace)
                    .or(ds.map(|s| s.namespace.as_str())),
            ),
            dst_identity: dw.map(|w| w.identity().to_string()),
            direction: match c.reporter {
                Reporter::Source => "outbound",
                Reporter::Destination => "inbound",
            },
        }
    }
}

fn unknown(v: Option<&str>) -> String {
    v.filter(|s| !s.is_empty()).unwrap_or("unknown").to_string()
}

impl ConnMetrics {
    pub fn open(c: ConnInfo) -> Self {
        let sw = c.src_workload;
        let dw = c.dst_workload;
        let ds = c.dst_service;
        let l = |k: &'static str, v: String| Label::new(k, v);
        let labels = vec![
            l(
                "reporter",
                if c.reporter == Reporter::Source {
                    "source"
                } else {
                    "destination"
                }
                .into(),
            ),
            l("source_workload", unknown(sw.map(|w| &*w.workload_name))),
            l(
                "source_workload_namespace",
                unknown(
                    sw.map(|w| &*w.namespace)
                        .or(c.src_identity.map(|i| i.namespace.as_str())),
                ),
            ),
            l(
                "source_principal",
                unknown(c.src_identity.map(|i| i.to_string()).as_deref()),
            ),
            l("source_app", unknown(sw.map(|w| &*w.canonical_name))),
            l(
                "source_version",
                unknown(sw.map(|w| &*w.canonical_revision)),
            ),
            l(
                "source_canonical_service",
                unknown(sw.map(|w| &*w.canonical_name)),
            ),
            l(
                "source_canonical_revision",
                unknown(sw.map(|w| &*w.canonical_revision)),
            ),
            l("source_cluster", unknown(sw.map(mesh::owner::cluster_of))),
            l(
                "destination_service",
                unknown(ds.map(|s| s.hostname.as_str())),
            ),
            l(
                "destination_service_namespace",
                unknown(ds.map(|s| s.namespace.as_str())),
            ),
            l(
                "destination_service_name",
                unknown(ds.map(|s| s.name.as_str())),
            ),
            l(
                "destination_workload",
                unknown(dw.map(|w| &*w.workload_name)),
            ),
            l(
                "destination_workload_namespace",
                unknown(dw.map(|w| &*w.namespace)),
            ),
            l(
                "destination_principal",
                unknown(dw.map(|w| w.identity().to_string()).as_deref()),
            ),
            l("destination_app", unknown(dw.map(|w| &*w.canonical_name))),
            l(
                "destination_version",
                unknown(dw.map(|w| &*w.canonical_revision)),
            ),
            l(
                "destination_canonical_service",
                unknown(dw.map(|w| &*w.canonical_name)),
            ),
            l(
                "destination_canonical_revision",
                unknown(dw.map(|w| &*w.canonical_revision)),
            ),
            l(
                "destination_cluster",
                unknown(dw.map(mesh::owner::cluster_of)),
            ),
            l("request_protocol", "tcp".into()),
            l(
                "connection_security_policy",
                if c.mtls { "mutual_tls" } else { "none" }.into(),
            ),
        ];
        let shared = Shared::get(SharedKey {
            labels,
            names: LogNames::new(&c),
        });
        let mut opened = shared.key.labels.clone();
        opened.push(Label::new("response_flags", Flag::None.as_str()));
        metrics::counter!("istio_tcp_connections_opened_total", opened).increment(1);
        ConnMetrics {
            shared,
            start: Instant::now(),
            log: AccessLog::new(&c),
            _live: Live::new(),
        }
    }

    /// Istio counts `received` as request bytes (client to server) and
    /// `sent` as response bytes, whichever side reports.
    pub fn count(&self, request: u64, response: u64) {
        if request > 0 {
            self.shared.received.increment(request);
        }
        if response > 0 {
            self.shared.sent.increment(response);
        }
    }

    /// Where an HBONE connection actually went (a waypoint rather than
    /// the destination workload), once it is chosen.
    pub fn tunnel_to(&mut self, addr: SocketAddr) {
        if self.log.dst_hbone_addr.is_some() {
            self.log.dst_addr = addr;
        }
    }

    /// `bytes` is (request, response): logged as `bytes_sent` (source to
    /// destination) and `bytes_recv` (back).
    pub fn close(self, flag: Flag, bytes: (u64, u64), error: Option<&dyn std::fmt::Display>) {
        let mut labels = self.shared.key.labels.clone();
        labels.push(Label::new("response_flags", flag.as_str()));
        metrics::counter!("istio_tcp_connections_closed_total", labels).increment(1);
        // As upstream writes it: a unit, milliseconds.
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        let a = &self.log;
        let n = &self.shared.key.names;
        let opt = |v: &Option<String>| v.clone().map(tracing::field::display);
        let err = error.map(tracing::field::display);
        // tracing fixes an event's level at its call site: one site per
        // level, the fields written once. event! rather than info!: info!
        // with a target cannot parse dotted field names (tracing 0.1.44).
        macro_rules! access {
            ($level:expr, $msg:literal) => {
                tracing::event!(
                    target: "access",
                    $level,
                    src.addr = %a.src_addr,
                    src.workload = opt(&n.src_workload),
                    src.namespace = opt(&n.src_namespace),
                    src.identity = opt(&n.src_identity),
                    dst.addr = %a.dst_addr,
                    dst.hbone_addr = a.dst_hbone_addr.map(tracing::field::display),
                    dst.service = opt(&n.dst_service),
                    dst.workload = opt(&n.dst_workload),
                    dst.namespace = opt(&n.dst_namespace),
                    dst.identity = opt(&n.dst_identity),
                    direction = n.direction,
                    bytes_sent = bytes.0,
                    bytes_recv = bytes.1,
                    duration = %duration,
                    flag = flag.as_str(),
                    error = err,
                    $msg
                )
            };
        }
        match err {
            None => access!(tracing::Level::INFO, "connection complete"),
            Some(_) => access!(tracing::Level::WARN, "connection failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_sweep;

    #[test]
    fn sweeps_stay_amortized() {
        // live sets left by a sweep -> the map length of the next one
        for (live, want) in [
            (0, 64),
            (10, 64),
            (32, 64),
            (33, 66),
            (63, 126),
            (1000, 2000),
        ] {
            assert_eq!(next_sweep(live), want, "after {live} live");
        }
        // A live count just under a threshold: the sweep that finds it
        // moves the next one far enough that new sets do not each sweep.
        let live = 127;
        assert!(next_sweep(live) - live >= live);
    }
}
