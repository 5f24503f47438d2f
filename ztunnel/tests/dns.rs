//! ztunnel's DNS proxy end to end: pods' port-53 traffic is redirected to it
//! by the capture rules; mesh names are answered, the rest forwarded to the
//! pod's resolver (a test DNS server in another netns).

use std::time::Duration;

use testbed::hickory_proto::op::{Message, Query, ResponseCode};
use testbed::hickory_proto::rr::{Name, RecordType};
use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");
/// Any address off the pod: the capture rules send it to ztunnel.
const NS: &str = "10.96.0.53:53";

const SERVICE_ENTRY: &str = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: app}
spec: {hosts: [api.example.com], addresses: [240.0.0.9], resolution: DNS}
---
apiVersion: v1
kind: Pod
metadata: {name: resolver, namespace: infra}
spec: {nodeName: node2}
status: {podIP: 10.244.3.53}
";

async fn mesh(tag: &str) -> Mesh {
    let mut m = Mesh::new(tag, ZT);
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("other", "app", "other", "10.244.2.10", "node2", true);
    m.pod("server-1", "app", "server", "10.244.1.11", "node1", true);
    m.pod(
        "resolver",
        "infra",
        "default",
        "10.244.3.53",
        "node2",
        false,
    );
    m.resolv_conf("client", "nameserver 10.244.3.53\nsearch app.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n");
    // other's resolver is an address nobody answers on.
    m.resolv_conf(
        "other",
        "nameserver 10.244.3.99\nsearch app.svc.cluster.local svc.cluster.local cluster.local\n",
    );
    m.write_config(&two_node_yaml(SERVICE_ENTRY));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| format!("{} {}", r.ttl, r.data))
        .collect()
}

fn metric(m: &Mesh, node: &str, name: &str) -> f64 {
    m.metrics(node)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains("source_workload=\"client\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_answered_and_the_rest_forwarded() {
    let m = mesh("dns").await;
    let upstream = m.dns_server("resolver");

    for name in [
        "server",
        "server.app",
        "server.app.svc",
        "server.app.svc.cluster.local.",
    ] {
        for tcp in [false, true] {
            let r = m.dns_query("client", NS, name, RecordType::A, tcp).unwrap();
            assert_eq!(
                r.metadata.response_code,
                ResponseCode::NoError,
                "{name} tcp={tcp}"
            );
            assert_eq!(a_records(&r), ["30 10.96.0.10"], "{name} tcp={tcp}");
        }
    }
    let r = m
        .dns_query("client", NS, "api.example.com", RecordType::A, false)
        .unwrap();
    assert_eq!(a_records(&r), ["30 240.0.0.9"]);
    // Mesh names never reached the upstream.
    assert_eq!(upstream.udp.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Forwarded: the answer and its TTL as the upstream gave them.
    let r = m
        .dns_query("client", NS, "outside.test", RecordType::A, false)
        .unwrap();
    assert_eq!(a_records(&r), ["1234 192.0.2.1"]);
    assert!(upstream.udp.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // NXDOMAIN stays NXDOMAIN, with the zone's SOA for negative caching.
    let r = m
        .dns_query("client", NS, "missing.test", RecordType::A, false)
        .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        r.authorities
            .iter()
            .any(|a| a.record_type() == RecordType::SOA),
        "{r:?}"
    );
    // Too big for UDP: truncated to the pod (which retries over TCP), whole
    // over TCP; upstream, ztunnel itself had to retry over TCP.
    let r = m
        .dns_query("client", NS, "big.test", RecordType::TXT, false)
        .unwrap();
    assert!(
        r.metadata.truncation && r.answers.is_empty(),
        "{:?}",
        r.metadata
    );
    let r = m
        .dns_query("client", NS, "big.test", RecordType::TXT, true)
        .unwrap();
    assert_eq!(r.answers.len(), 40);
    assert!(upstream.tcp.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // The pod's own stub resolver (glibc, search list from its resolv.conf).
    let (ok, out) = sh_out(&format!(
        "ip netns exec {} getent ahostsv4 server",
        m.pod_ns("client")
    ));
    assert!(ok && out.contains("10.96.0.10"), "{out}");
    let (ok, out) = sh_out(&format!(
        "ip netns exec {} getent ahostsv4 outside.test",
        m.pod_ns("client")
    ));
    assert!(ok && out.contains("192.0.2.1"), "{out}");

    assert!(metric(&m, "node1", "istio_dns_requests_total") >= 14.0);
    assert!(metric(&m, "node1", "istio_dns_upstream_requests_total") >= 4.0);
    assert!(m
        .metrics("node1")
        .contains("istio_dns_upstream_request_duration_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_are_dropped_and_a_dead_upstream_is_servfail() {
    let m = mesh("dnx").await;
    m.dns_server("resolver");

    // Garbage, a truncated header, a response instead of a query: no answer
    // (the client times out), counted, and the proxy keeps serving.
    let mut resp = Message::query();
    resp.metadata.message_type = testbed::hickory_proto::op::MessageType::Response;
    resp.add_query(Query::query(
        Name::from_ascii("server.").unwrap(),
        RecordType::A,
    ));
    for bad in [
        b"\xff\xfe garbage".to_vec(),
        vec![0x12],
        resp.to_vec().unwrap(),
    ] {
        assert!(
            m.dns_raw("client", NS, &bad, false, Duration::from_secs(1))
                .is_err(),
            "{bad:?} was answered"
        );
    }
    assert_eq!(
        metric(&m, "node1", "istio_dns_malformed_requests_total"),
        3.0
    );
    let r = m
        .dns_query("client", NS, "server", RecordType::A, false)
        .unwrap();
    assert_eq!(a_records(&r), ["30 10.96.0.10"]);
    // Over TCP a malformed message closes that connection only.
    assert!(m
        .dns_raw("client", NS, b"\x00\x01", true, Duration::from_secs(1))
        .is_err());
    let r = m
        .dns_query("client", NS, "server", RecordType::A, true)
        .unwrap();
    assert_eq!(a_records(&r), ["30 10.96.0.10"]);

    // A pod whose resolver never answers: mesh names still resolve, others
    // get SERVFAIL (not silence, not a guess) within the proxy's deadline.
    let r = m
        .dns_query("other", NS, "server.app", RecordType::A, false)
        .unwrap();
    assert_eq!(a_records(&r), ["30 10.96.0.10"]);
    // (dns_query gives up after 8 s: an answer at all means the proxy's
    // deadline fired first.)
    let r = m
        .dns_query("other", NS, "outside.test", RecordType::A, false)
        .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    let failures: f64 = m
        .metrics("node2")
        .lines()
        .filter(|l| {
            l.starts_with("istio_dns_upstream_failures_total")
                && l.contains("source_workload=\"other\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures >= 1.0, "{}", m.metrics("node2"));
}
