//! Istio's standard L7 metrics with `reporter="waypoint"` and one
//! JSON access-log line per request on stdout.

use std::io::Write;
use std::time::Duration;

use identity::Identity;
use mesh::{Service, Workload};

/// Istio's response flags that the waypoint sets.
pub mod flag {
    pub const NONE: &str = "-";
    /// No route matched.
    pub const NO_ROUTE: &str = "NR";
    /// A route points at something that does not exist (cluster not found).
    pub const NO_CLUSTER: &str = "NC";
    /// No healthy endpoint.
    pub const NO_HEALTHY: &str = "UH";
    /// Connection pool overflow.
    pub const OVERFLOW: &str = "UO";
    /// Upstream request timeout.
    pub const TIMEOUT: &str = "UT";
    /// Upstream connection failure / reset.
    pub const CONNECT_FAILURE: &str = "UF";
    pub const RESET: &str = "UR";
    /// The destination's name did not resolve (DNS ServiceEntry).
    pub const DNS_FAILURE: &str = "DF";
    /// Fault injection: delay, abort.
    pub const DELAY: &str = "DI";
    pub const ABORT: &str = "FI";
    /// Denied by L7 policy (Envoy's RBAC filter has no flag; Istio logs it
    /// as a 403 with this detail).
    pub const RBAC: &str = "-";
    /// A JWT that does not verify (Envoy's jwt_authn filter sets no flag
    /// either; the response code and details tell it).
    pub const JWT: &str = "-";
    /// Denied by a CUSTOM policy's external authorizer, or its check failed
    /// (Envoy's "unauthorized external service").
    pub const EXT_AUTHZ: &str = "UAEX";
}

pub struct Record<'a> {
    pub src_identity: &'a Identity,
    pub src_workload: Option<&'a Workload>,
    pub service: Option<&'a Service>,
    pub dst_workload: Option<&'a Workload>,
    pub protocol: &'static str,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub code: u16,
    pub flags: String,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream: Option<std::net::SocketAddr>,
    pub request_id: &'a str,
    pub route: Option<&'a str>,
    pub attempts: u32,
    /// The response's gRPC status (gRPC requests only).
    pub grpc_status: Option<u32>,
    /// Why a retry the policy asked for was not made.
    pub not_retried: Option<&'static str>,
    /// The client's address as its ztunnel gave it (the CONNECT's source).
    pub downstream: Option<std::net::SocketAddr>,
    pub user_agent: Option<&'a str>,
    pub forwarded_for: Option<&'a str>,
    /// Envoy's `response_code_details` for a reply policy made here (a JWT
    /// rejection, an RBAC denial).
    pub details: Option<&'static str>,
}

pub const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

fn labels(r: &Record) -> [(&'static str, String); 25] {
    let unknown = || "unknown".to_string();
    let (svc_host, svc_name, svc_ns) = match r.service {
        Some(s) => (s.hostname.clone(), s.name.clone(), s.namespace.clone()),
        None => (unknown(), unknown(), unknown()),
    };
    let w = |w: Option<&Workload>, f: fn(&Workload) -> String| w.map(f).unwrap_or_else(unknown);
    [
        ("reporter", "waypoint".to_string()),
        (
            "source_workload",
            w(r.src_workload, |w| w.workload_name.to_string()),
        ),
        (
            "source_workload_namespace",
            r.src_identity.namespace.clone(),
        ),
        ("source_principal", r.src_identity.to_string()),
        (
            "source_app",
            w(r.src_workload, |w| w.canonical_name.to_string()),
        ),
        (
            "source_version",
            w(r.src_workload, |w| w.canonical_revision.to_string()),
        ),
        (
            "source_canonical_service",
            w(r.src_workload, |w| w.canonical_name.to_string()),
        ),
        (
            "source_canonical_revision",
            w(r.src_workload, |w| w.canonical_revision.to_string()),
        ),
        (
            "source_cluster",
            w(r.src_workload, |w| mesh::owner::cluster_of(w).to_string()),
        ),
        ("destination_service", svc_host),
        ("destination_service_name", svc_name),
        ("destination_service_namespace", svc_ns),
        (
            "destination_workload",
            w(r.dst_workload, |w| w.workload_name.to_string()),
        ),
        (
            "destination_workload_namespace",
            w(r.dst_workload, |w| w.namespace.to_string()),
        ),
        (
            "destination_principal",
            w(r.dst_workload, |w| w.identity().to_string()),
        ),
        (
            "destination_app",
            w(r.dst_workload, |w| w.canonical_name.to_string()),
        ),
        (
            "destination_version",
            w(r.dst_workload, |w| w.canonical_revision.to_string()),
        ),
        (
            "destination_canonical_service",
            w(r.dst_workload, |w| w.canonical_name.to_string()),
        ),
        (
            "destination_canonical_revision",
            w(r.dst_workload, |w| w.canonical_revision.to_string()),
        ),
        (
            "destination_cluster",
            w(r.dst_workload, |w| mesh::owner::cluster_of(w).to_string()),
        ),
        ("request_protocol", r.protocol.to_string()),
        ("response_code", r.code.to_string()),
        (
            "grpc_response_status",
            r.grpc_status.map(|c| c.to_string()).unwrap_or_default(),
        ),
        ("response_flags", r.flags.clone()),
        ("connection_security_policy", "mutual_tls".to_string()),
    ]
}

/// The metric handles of one label set: registering is costly (25 labels,
/// four metrics), recording through a held handle is not.
/// The parts of a label set that vary: source principal and workload,
/// service, destination workload, protocol, code, flags, gRPC status.
type Key = (
    Identity,
    String,
    String,
    String,
    &'static str,
    u16,
    String,
    Option<u32>,
);

struct Handles {
    key: Key,
    requests: metrics::Counter,
    duration: metrics::Histogram,
    request_bytes: metrics::Histogram,
    response_bytes: metrics::Histogram,
}

static HANDLES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<u64, Vec<std::sync::Arc<Handles>>>>,
> = std::sync::LazyLock::new(Default::default);

fn handles(r: &Record) -> std::sync::Arc<Handles> {
    use std::hash::{Hash, Hasher};
    fn uid(w: Option<&Workload>) -> &str {
        w.map(|w| w.uid.as_str()).unwrap_or("")
    }
    let key = (
        r.src_identity,
        uid(r.src_workload),
        r.service.map(|s| s.hostname.as_str()).unwrap_or(""),
        uid(r.dst_workload),
        r.protocol,
        r.code,
        r.flags.as_str(),
        r.grpc_status,
    );
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let hash = h.finish();
    let same = |k: &Key| {
        (
            &k.0,
            k.1.as_str(),
            k.2.as_str(),
            k.3.as_str(),
            k.4,
            k.5,
            k.6.as_str(),
            k.7,
        ) == key
    };
    if let Some(found) = HANDLES
        .lock()
        .unwrap()
        .get(&hash)
        .and_then(|v| v.iter().find(|x| same(&x.key)).cloned())
    {
        return found;
    }
    let l = labels(r);
    let made = std::sync::Arc::new(Handles {
        key: (
            key.0.clone(),
            key.1.to_string(),
            key.2.to_string(),
            key.3.to_string(),
            key.4,
            key.5,
            key.6.to_string(),
            key.7,
        ),
        requests: metrics::counter!("istio_requests_total", &l),
        duration: metrics::histogram!("istio_request_duration_milliseconds", &l),
        request_bytes: metrics::histogram!("istio_request_bytes", &l),
        response_bytes: metrics::histogram!("istio_response_bytes", &l),
    });
    HANDLES
        .lock()
        .unwrap()
        .entry(hash)
        .or_default()
        .push(made.clone());
    made
}

pub fn record(r: &Record) {
    let h = handles(r);
    h.requests.increment(1);
    h.duration.record(r.duration.as_secs_f64() * 1000.0);
    h.request_bytes.record(r.request_bytes as f64);
    h.response_bytes.record(r.response_bytes as f64);
    if let Some(reason) = r
        .details
        .and_then(|d| d.strip_prefix("jwt_authn_access_denied"))
    {
        let reason = reason.trim_matches(['{', '}']).to_string();
        metrics::counter!("istio_waypoint_jwt_denied_total", "reason" => reason).increment(1);
    }
    if r.attempts > 1 {
        let svc = r
            .service
            .map(|s| s.hostname.clone())
            .unwrap_or_else(|| "unknown".into());
        metrics::counter!("istio_waypoint_retries_total", "destination_service" => svc)
            .increment(u64::from(r.attempts - 1));
    }
    let line = access_line(r);
    let mut log = ACCESS_LOG.lock().unwrap();
    // Whole lines only, so lines from concurrent requests never interleave.
    let _ = serde_json::to_writer(&mut *log, &line);
    log.push(b'\n');
    if log.len() >= 64 * 1024 {
        let _ = std::io::stdout().lock().write_all(&log);
        log.clear();
    }
}

/// The access-log line of `r`.
fn access_line<'a>(r: &'a Record<'a>) -> AccessLine<'a> {
    let start = std::time::SystemTime::now()
        .checked_sub(r.duration)
        .unwrap_or(std::time::UNIX_EPOCH);
    AccessLine {
        start_time: Shown(humantime::format_rfc3339_millis(start)),
        route_name: r.route,
        method: r.method,
        path: r.path,
        protocol: r.protocol,
        response_code: r.code,
        response_flags: &r.flags,
        bytes_received: r.request_bytes,
        bytes_sent: r.response_bytes,
        duration: r.duration.as_millis() as u64,
        x_forwarded_for: r.forwarded_for,
        user_agent: r.user_agent,
        request_id: r.request_id,
        authority: r.authority,
        upstream_host: r.upstream.map(Shown),
        downstream_remote_address: r.downstream.map(Shown),
        source_principal: Shown(r.src_identity),
        attempts: r.attempts,
        grpc_status: r.grpc_status,
        not_retried: r.not_retried,
        response_code_details: r.details,
    }
}

/// One access-log line: Istio's JSON access-log keys (what log pipelines
/// built for Envoy waypoints and sidecars index), then ours: the client's
/// principal, attempts, gRPC status and why a retry was not made, in that
/// order. Written straight from the record's borrowed fields: building a
/// JSON value first cost a dozen allocations per request.
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    start_time: Shown<humantime::Rfc3339Timestamp>,
    route_name: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    x_forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: &'a str,
    authority: &'a str,
    upstream_host: Option<Shown<std::net::SocketAddr>>,
    downstream_remote_address: Option<Shown<std::net::SocketAddr>>,
    source_principal: Shown<&'a Identity>,
    attempts: u32,
    grpc_status: Option<u32>,
    not_retried: Option<&'a str>,
    response_code_details: Option<&'a str>,
}

/// A JSON string of a value's `Display`, formatted into the output.
struct Shown<T>(T);

impl<T: std::fmt::Display> serde::Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Access-log lines not yet written: flushed every 100 ms (and when large,
/// and on exit) rather than with one write per request.
static ACCESS_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

pub fn flush_access_log() {
    let pending = std::mem::take(&mut *ACCESS_LOG.lock().unwrap());
    if !pending.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&pending);
        let _ = out.flush();
    }
}

/// Starts the periodic flush (a plain thread: it only sleeps and writes).
pub fn start_access_log_flusher() {
    std::thread::spawn(|| loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        flush_access_log();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(id: &'a Identity, full: bool) -> Record<'a> {
        Record {
            src_identity: id,
            src_workload: None,
            service: None,
            dst_workload: None,
            protocol: "http",
            method: "GET",
            path: "/a?b=\"c\"",
            authority: "web.app:80",
            code: 503,
            flags: flag::RESET.to_string(),
            duration: Duration::from_millis(12),
            request_bytes: 3,
            response_bytes: 4,
            upstream: full.then(|| "10.0.0.2:8080".parse().unwrap()),
            request_id: "rid",
            route: full.then_some("r1"),
            attempts: 3,
            grpc_status: full.then_some(14),
            not_retried: full.then_some("budget"),
            downstream: full.then(|| "[fd00::1]:5555".parse().unwrap()),
            user_agent: full.then_some("curl/8"),
            forwarded_for: full.then_some("1.2.3.4"),
            details: full.then_some("via_upstream"),
        }
    }

    /// Every key, in Istio's order then ours, absent
    /// values as null, addresses and the principal as their text, and a
    /// path with quotes escaped into valid JSON.
    #[test]
    fn access_line_has_every_key_and_value() {
        let id: Identity = "spiffe://cluster.local/ns/app/sa/client".parse().unwrap();
        let keys = [
            "start_time",
            "route_name",
            "method",
            "path",
            "protocol",
            "response_code",
            "response_flags",
            "bytes_received",
            "bytes_sent",
            "duration",
            "x_forwarded_for",
            "user_agent",
            "request_id",
            "authority",
            "upstream_host",
            "downstream_remote_address",
            "source_principal",
            "attempts",
            "grpc_status",
            "not_retried",
            "response_code_details",
        ];
        for full in [true, false] {
            let r = record(&id, full);
            let text = serde_json::to_string(&access_line(&r)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let mut got: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            let mut want = keys.to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{text}");
            // In the line's own order (whatever map the parser keeps).
            let at: Vec<usize> = keys
                .iter()
                .map(|k| text.find(&format!("\"{k}\":")).unwrap())
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
            assert_eq!(v["path"], "/a?b=\"c\"");
            assert_eq!(v["response_code"], 503);
            assert_eq!(v["response_flags"], "UR");
            assert_eq!(v["duration"], 12);
            assert_eq!(
                v["source_principal"],
                "spiffe://cluster.local/ns/app/sa/client"
            );
            assert!(v["start_time"].as_str().unwrap().ends_with('Z'), "{text}");
            if full {
                assert_eq!(v["upstream_host"], "10.0.0.2:8080");
                assert_eq!(v["downstream_remote_address"], "[fd00::1]:5555");
                assert_eq!(v["grpc_status"], 14);
                assert_eq!(v["route_name"], "r1");
                assert_eq!(v["x_forwarded_for"], "1.2.3.4");
            } else {
                for k in [
                    "upstream_host",
                    "downstream_remote_address",
                    "grpc_status",
                    "route_name",
                    "not_retried",
                    "user_agent",
                    "response_code_details",
                ] {
                    assert!(v[k].is_null(), "{k}: {text}");
                }
            }
        }
    }
}
