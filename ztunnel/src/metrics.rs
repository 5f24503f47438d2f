//! Istio's L4 metrics and the per-connection access log. Counter
//! handles are resolved once per connection, so counting bytes on the data
//! path is one atomic add.

use std::net::SocketAddr;
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
    labels: Vec<Label>,
    sent: Counter,
    received: Counter,
    start: Instant,
    log: String,
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
        let with_flag = |f: Flag| {
            let mut v = labels.clone();
            v.push(Label::new("response_flags", f.as_str()));
            v
        };
        metrics::counter!("istio_tcp_connections_opened_total", with_flag(Flag::None)).increment(1);
        let log = format!(
            "src.addr={} src.workload={} src.identity={} dst.addr={} dst.service={} dst.workload={} direction={}",
            c.src,
            unknown(sw.map(|w| w.name.as_str())),
            unknown(c.src_identity.map(|i| i.to_string()).as_deref()),
            c.dst,
            unknown(ds.map(|s| s.hostname.as_str())),
            unknown(dw.map(|w| w.name.as_str())),
            if c.reporter == Reporter::Source { "outbound" } else { "inbound" },
        );
        ConnMetrics {
            sent: metrics::counter!("istio_tcp_sent_bytes_total", with_flag(Flag::None)),
            received: metrics::counter!("istio_tcp_received_bytes_total", with_flag(Flag::None)),
            labels,
            start: Instant::now(),
            log,
        }
    }

    /// Istio counts `received` as request bytes (client to server) and
    /// `sent` as response bytes, whichever side reports.
    pub fn count(&self, request: u64, response: u64) {
        if request > 0 {
            self.received.increment(request);
        }
        if response > 0 {
            self.sent.increment(response);
        }
    }

    /// `bytes` is (request, response).
    pub fn close(self, flag: Flag, bytes: (u64, u64), error: Option<&dyn std::fmt::Display>) {
        let mut labels = self.labels;
        labels.push(Label::new("response_flags", flag.as_str()));
        metrics::counter!("istio_tcp_connections_closed_total", labels).increment(1);
        let duration_ms = self.start.elapsed().as_millis() as u64;
        match error {
            None => {
                tracing::info!(target: "access", flag = flag.as_str(), request_bytes = bytes.0, response_bytes = bytes.1, duration_ms, "{} connection complete", self.log)
            }
            Some(e) => {
                tracing::warn!(target: "access", flag = flag.as_str(), request_bytes = bytes.0, response_bytes = bytes.1, duration_ms, error = %e, "{} connection failed", self.log)
            }
        }
    }
}
