//! Egress through the waypoint: ServiceEntry hosts outside the mesh, an
//! ambient client that names them (resolved by ztunnel's DNS proxy), our
//! waypoint applying routes and L7 policy before reaching the entry's
//! endpoints; and an entry without a waypoint routed by ztunnel at L4.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testbed::*;

mod common;
use common::{access_log, Peers};

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: origin, namespace: app}
spec:
  hosts: [origin.example.com]
  addresses: [240.240.0.1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints: [{address: 10.244.3.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: raw, namespace: app, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [raw.example.com]
  addresses: [240.240.0.2]
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP, targetPort: 9000}]
  endpoints: [{address: 10.244.3.5}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: origin, namespace: app}
spec:
  hosts: [origin.example.com]
  http:
  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/}
    route: [{destination: {host: origin.example.com}}]
  - route: [{destination: {host: origin.example.com}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secrets, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/secret*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: origin-only, namespace: app}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: origin}]
  action: DENY
  rules: [{to: [{operation: {paths: [/entry-denied]}}]}]
";

/// `extra` gives more config once the test's directory exists.
async fn mesh(tag: &str, extra: impl FnOnce(&Mesh) -> String) -> Mesh {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    // Outside the mesh: on the network, in no config.
    m.pod("origin", "ext", "none", "10.244.3.5", "node2", false);
    m.pod("resolver", "ext", "none", "10.244.3.53", "node2", false);
    // The test DNS server's `outside.test` (192.0.2.1) is the origin too.
    sh(&format!(
        "ip -n {o} addr add 192.0.2.1/32 dev eth0 && ip -n {o} addr add 192.0.2.2/32 dev eth0 && \
         ip -n {w} route add 192.0.2.0/30 via 10.244.3.5",
        o = m.pod_ns("origin"),
        w = m.pod_ns("waypoint")
    ));
    // The waypoint resolves DNS entries through its own resolv.conf.
    m.resolv_conf("waypoint", "nameserver 10.244.3.53\n");
    // So does ztunnel (entries without a waypoint): node1's netns is on the
    // network, as a ztunnel pod is, made here before its ztunnel starts.
    m.pod("node1", "ext", "none", "10.244.4.1", "node1", false);
    m.resolv_conf("node1", "nameserver 10.244.3.53\n");
    // The client reaches the test resolver's answers (the origin's aliases).
    sh(&format!(
        "ip -n {} route add 192.0.2.0/30 via 10.244.3.5",
        m.pod_ns("client")
    ));
    // Any address off the pod: the capture rules send DNS to ztunnel.
    m.resolv_conf("client", "nameserver 10.96.0.53\n");
    let extra = extra(&m);
    m.write_config(&format!("{BASE}{extra}"));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    m
}

fn curl(m: &Mesh, url: &str) -> String {
    let cmd = format!(
        "ip netns exec {} curl -s -m 10 -w ' %{{http_code}}' {url}",
        m.pod_ns("client")
    );
    sh_out(&cmd).1.trim().to_string()
}

/// A STATIC ServiceEntry bound to the waypoint by its namespace: the client
/// names the host (ztunnel's DNS proxy answers the entry's VIP), ztunnel
/// sends the connection to the waypoint, which admits it, rewrites per the
/// VirtualService on the entry's host, denies what the policy denies, and
/// reaches the endpoint over plain TCP; the telemetry names the entry's
/// host. The entry that opts out of the waypoint is routed by ztunnel to
/// its endpoint at L4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_entry_served_by_the_waypoint_and_at_l4_without_it() {
    let m = mesh("egs", |_| String::new()).await;
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8080"], 8080);
    m.echo_server("origin", 9000);

    assert_eq!(
        curl(&m, "http://origin.example.com/hello"),
        "GET /hello host=origin.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://origin.example.com/old/x?q=1"),
        "GET /new/x?q=1 host=origin.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://origin.example.com/secret/key"),
        "RBAC: access denied 403"
    );
    // A policy naming the entry applies to it, and to nothing else.
    assert_eq!(
        curl(&m, "http://origin.example.com/entry-denied"),
        "RBAC: access denied 403"
    );
    let log = access_log(&m);
    assert!(
        log.iter()
            .any(|l| l["authority"] == "origin.example.com"
                && l["upstream_host"] == "10.244.3.5:8080"),
        "{log:?}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"origin.example.com\"")
                && l.contains("response_code=\"403\"")),
        "{metrics}"
    );

    // No waypoint: ztunnel connects the VIP's port to the endpoint's.
    let s = m.connect("client", "240.240.0.2:7000").unwrap();
    echo_roundtrip(s, &pattern(64 << 10, 7));
    drop(peers);
}

/// A CA of its own (not the mesh's) in `dir`, and a server certificate for
/// `host` it signed. Returns (CA certificate, server chain, server key).
fn outside_ca(dir: &std::path::Path, host: &str) -> (String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    identity::BuiltinCa::load_or_create(dir, "outside.example").unwrap();
    let (cert, key) = issue_raw_cert(
        dir,
        vec![rcgen::SanType::DnsName(host.try_into().unwrap())],
        (2024, 1, 1),
        (2099, 1, 1),
        dir,
        "server",
    );
    let s = |p: &std::path::Path| p.display().to_string();
    (s(&dir.join("root-cert.pem")), s(&cert), s(&key))
}

/// An entry on port 80 whose endpoint listens with TLS on `port`, and its
/// DestinationRule: TLS with `sni` and the CA file `ca` (none: empty), and
/// `more`.
fn tls_entry(name: &str, vip: &str, port: u16, sni: &str, ca: &str, more: &str) -> String {
    let ca = if ca.is_empty() {
        String::new()
    } else {
        format!("caCertificates: {ca}, ")
    };
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: app}}
spec:
  hosts: [{name}.example.com]
  addresses: [{vip}]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]
  endpoints: [{{address: 10.244.3.5}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: app}}
spec:
  host: {name}.example.com
  trafficPolicy: {{tls: {{sni: {sni}, {ca}{more}}}}}
"
    )
}

/// Plain HTTP from the client to an entry's host leaves the waypoint as
/// TLS it originates per the DestinationRule: the server (TLS only) sees
/// the rule's SNI and answers; the same server behind a rule with another
/// CA, or with an SNI its certificate does not name, is refused by the
/// waypoint (503, connection failure) before any request is sent. MUTUAL
/// presents the client certificate to a server that requires one (SIMPLE
/// there fails), and a capture at the server shows no request in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_originated_per_destination_rule() {
    let mut server = None;
    let m = mesh("egt", |m| {
        let dir = m.dir.join("outside-ca");
        let (ca, cert, key) = outside_ca(&dir, "secure.example.com");
        let (other_ca, _, _) = outside_ca(&m.dir.join("other-ca"), "secure.example.com");
        // A client certificate from the server's CA, for MUTUAL.
        let (ccert, ckey) = issue_raw_cert(
            &dir,
            vec![rcgen::SanType::DnsName(
                "client.example".try_into().unwrap(),
            )],
            (2024, 1, 1),
            (2099, 1, 1),
            &dir,
            "client",
        );
        let mutual = format!(
            "mode: MUTUAL, clientCertificate: {}, privateKey: {}",
            ccert.display(),
            ckey.display()
        );
        // The same client certificate and CA as a Secret, for
        // credentialName (PEM as JSON strings: valid YAML scalars).
        let pem = |p: &std::path::Path| {
            serde_json::to_string(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let secret = format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: cred, namespace: app}}\ntype: kubernetes.io/tls\nstringData: {{tls.crt: {}, tls.key: {}, ca.crt: {}}}\n",
            pem(&ccert),
            pem(&ckey),
            pem(std::path::Path::new(&ca))
        );
        server = Some((cert, key, ca.clone()));
        let sni = "secure.example.com";
        [
            tls_entry("secure", "240.240.0.3", 8443, sni, &ca, "mode: SIMPLE"),
            tls_entry(
                "wrongca",
                "240.240.0.4",
                8443,
                sni,
                &other_ca,
                "mode: SIMPLE",
            ),
            tls_entry(
                "wrongsni",
                "240.240.0.5",
                8443,
                "other.example.com",
                &ca,
                "mode: SIMPLE",
            ),
            tls_entry("mutual", "240.240.0.8", 8444, sni, &ca, &mutual),
            tls_entry("nocert", "240.240.0.9", 8444, sni, &ca, "mode: SIMPLE"),
            tls_entry(
                "skip",
                "240.240.0.11",
                8443,
                sni,
                &other_ca,
                "mode: SIMPLE, insecureSkipVerify: true",
            ),
            // subjectAltNames replace the server name in the check: the
            // name sent is not the certificate's, a listed one is; a list
            // without the certificate's name refuses it.
            tls_entry(
                "sanok",
                "240.240.0.14",
                8443,
                "other.example.com",
                &ca,
                "mode: SIMPLE, subjectAltNames: [nothere.example.com, secure.example.com]",
            ),
            tls_entry(
                "sanbad",
                "240.240.0.15",
                8443,
                sni,
                &ca,
                "mode: SIMPLE, subjectAltNames: [nothere.example.com]",
            ),
            // MUTUAL from a Secret; a Secret that does not exist fails
            // closed.
            tls_entry(
                "credmutual",
                "240.240.0.18",
                8444,
                sni,
                "",
                "mode: MUTUAL, credentialName: cred",
            ),
            tls_entry(
                "credmissing",
                "240.240.0.19",
                8444,
                sni,
                "",
                "mode: MUTUAL, credentialName: nothere",
            ),
            secret,
        ]
        .concat()
    })
    .await;
    let (cert, key, ca) = server.unwrap();
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8443", &cert, &key], 8443);
    peers.start(&m, "origin", "origin.py", &["8444", &cert, &key, &ca], 8444);
    let cap = Capture::start(&m.pod_ns("origin"), "eth0", m.dir.join("origin.pcap"));

    assert_eq!(
        curl(&m, "http://secure.example.com/hello"),
        "GET /hello host=secure.example.com sni=secure.example.com\n 200"
    );
    // MUTUAL presents the client certificate; SIMPLE to that server fails.
    assert_eq!(
        curl(&m, "http://mutual.example.com/m"),
        "GET /m host=mutual.example.com sni=secure.example.com\n 200"
    );
    // insecureSkipVerify: true takes the certificate the wrong CA refused.
    assert_eq!(
        curl(&m, "http://skip.example.com/s"),
        "GET /s host=skip.example.com sni=secure.example.com\n 200"
    );
    assert_eq!(
        curl(&m, "http://sanok.example.com/n"),
        "GET /n host=sanok.example.com sni=other.example.com\n 200"
    );
    assert_eq!(
        curl(&m, "http://credmutual.example.com/c"),
        "GET /c host=credmutual.example.com sni=secure.example.com\n 200"
    );
    for host in ["wrongca", "wrongsni", "nocert", "sanbad", "credmissing"] {
        let out = curl(&m, &format!("http://{host}.example.com/hello"));
        assert!(out.ends_with(" 503"), "{host}: {out}");
    }
    // The server is fine: only the verification failed.
    assert!(curl(&m, "http://secure.example.com/again").ends_with(" 200"));
    // The policy that names another entry does not apply here.
    assert!(curl(&m, "http://secure.example.com/entry-denied").ends_with(" 200"));
    // The server saw TLS only: no request line crossed its wire in clear.
    let pcap = cap.stop();
    assert!(contains(&pcap, b"secure.example.com"), "the SNI, in clear");
    for plain in [&b"GET /hello"[..], b"GET /m ", b"host=secure"] {
        assert!(
            !contains(&pcap, plain),
            "{:?} in clear",
            String::from_utf8_lossy(plain)
        );
    }
    let log = access_log(&m);
    assert!(
        log.iter()
            .any(|l| l["authority"] == "wrongca.example.com" && l["response_flags"] == "UF"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l["authority"] == "credmissing.example.com" && l["response_flags"] == "NC"),
        "{log:?}"
    );
    drop(peers);
}

/// A `resolution: DNS` ServiceEntry in `app` for `host` on `vip`: `meta` is
/// added to its metadata, `port` is its one port.
fn dns_entry(name: &str, host: &str, vip: &str, meta: &str, port: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: app{meta}}}
spec:
  hosts: [{host}]
  addresses: [{vip}]
  resolution: DNS
  ports: [{port}]
"
    )
}

/// An entry with `resolution: DNS` is reached at what the waypoint itself
/// resolves its host to (the test resolver, outside the mesh); a host that
/// does not resolve is 503 flagged DF, said in the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_entry_resolved_by_the_waypoint() {
    let entry = |name: &str, host: &str, vip: &str| {
        dns_entry(
            name,
            host,
            vip,
            "",
            "{number: 80, name: http, protocol: HTTP, targetPort: 8080}",
        )
    };
    let m = mesh("egd", |_| {
        entry("outside", "outside.test", "240.240.0.6")
            + &entry("missing", "missing.test", "240.240.0.7")
    })
    .await;
    let counts = m.dns_server("resolver");
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8080"], 8080);

    assert_eq!(
        curl(&m, "http://outside.test/x"),
        "GET /x host=outside.test sni=-\n 200"
    );
    // The answer is cached for its TTL (1234 s): asked once for two requests.
    let asked = counts.udp.load(std::sync::atomic::Ordering::Relaxed);
    assert!(curl(&m, "http://outside.test/y").ends_with(" 200"));
    assert_eq!(
        counts.udp.load(std::sync::atomic::Ordering::Relaxed),
        asked,
        "a cached answer was asked for again"
    );
    assert_eq!(
        curl(&m, "http://missing.test/x"),
        "upstream name did not resolve\n 503"
    );
    let log = access_log(&m);
    assert!(
        log.iter()
            .any(|l| l["authority"] == "outside.test" && l["upstream_host"] == "192.0.2.1:8080"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l["authority"] == "missing.test" && l["response_flags"] == "DF"),
        "{log:?}"
    );
    drop(peers);
}

/// A DNS server in `pod` answering `moving.test A` with the address `at`
/// holds, TTL 1 s (anything else: NXDOMAIN). Counts the queries.
fn moving_dns(m: &Mesh, pod: &str, at: Arc<AtomicU32>) -> Arc<AtomicU32> {
    use testbed::hickory_proto::op::{Message, ResponseCode};
    use testbed::hickory_proto::rr::{RData, Record, RecordType};
    let udp = in_ns(&m.pod_ns(pod), || {
        std::net::UdpSocket::bind("0.0.0.0:53").unwrap()
    });
    let asked = Arc::new(AtomicU32::new(0));
    let n = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((len, peer)) = udp.recv_from(&mut buf) {
            let Ok(req) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut r = Message::response(req.metadata.id, req.metadata.op_code);
            r.metadata.recursion_available = true;
            r.add_queries(req.queries.iter().cloned());
            match req.queries.first() {
                Some(q) if q.name().to_ascii().eq_ignore_ascii_case("moving.test.") => {
                    n.fetch_add(1, Ordering::Relaxed);
                    if q.query_type() == RecordType::A {
                        let ip = std::net::Ipv4Addr::from(at.load(Ordering::Relaxed));
                        r.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(ip.into())));
                    }
                }
                _ => r.metadata.response_code = ResponseCode::NXDomain,
            }
            let _ = udp.send_to(&r.to_vec().unwrap(), peer);
        }
    });
    asked
}

/// A changed record is followed once its TTL has run out: requests go to
/// the old address while it is cached, to the new one after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_entry_follows_a_changed_record_after_its_ttl() {
    let m = mesh("egm", |_| {
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: moving, namespace: app}
spec:
  hosts: [moving.test]
  addresses: [240.240.0.10]
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
"
        .to_string()
    })
    .await;
    let at = Arc::new(AtomicU32::new(u32::from(std::net::Ipv4Addr::new(
        192, 0, 2, 1,
    ))));
    let asked = moving_dns(&m, "resolver", at.clone());
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8080"], 8080);
    let upstreams = |m: &Mesh| -> Vec<String> {
        access_log(m)
            .iter()
            .filter(|l| l["authority"] == "moving.test")
            .map(|l| l["upstream_host"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    assert!(curl(&m, "http://moving.test/a").ends_with(" 200"));
    at.store(
        u32::from(std::net::Ipv4Addr::new(192, 0, 2, 2)),
        Ordering::Relaxed,
    );
    // Within the TTL: still the cached address.
    assert!(curl(&m, "http://moving.test/b").ends_with(" 200"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(curl(&m, "http://moving.test/c").ends_with(" 200"));
    assert_eq!(
        upstreams(&m),
        ["192.0.2.1:8080", "192.0.2.1:8080", "192.0.2.2:8080"]
    );
    assert!(asked.load(Ordering::Relaxed) >= 2);
    drop(peers);
}

/// A DNS ServiceEntry that no waypoint serves: ztunnel routes its VIP at
/// L4 to what ztunnel itself resolves the host to (its own resolver, the
/// answer kept for its TTL: two connections, one query); the telemetry
/// names the entry's host. A host that does not resolve resets the
/// connection, flagged DF with the reason in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_entry_without_a_waypoint_is_resolved_by_ztunnel() {
    let entry = |name: &str, host: &str, vip: &str| {
        dns_entry(
            name,
            host,
            vip,
            ", labels: {istio.io/use-waypoint: none}",
            "{number: 7000, name: tcp, protocol: TCP, targetPort: 9000}",
        )
    };
    let m = mesh("egz", |_| {
        entry("l4dns", "outside.test", "240.240.0.12")
            + &entry("l4missing", "missing.test", "240.240.0.13")
    })
    .await;
    let counts = m.dns_server("resolver");
    m.echo_server("origin", 9000);

    let s = m.connect("client", "240.240.0.12:7000").unwrap();
    echo_roundtrip(s, &pattern(64 << 10, 3));
    let asked = counts.udp.load(Ordering::Relaxed);
    assert!(asked >= 1, "ztunnel never asked the resolver");
    let s = m.connect("client", "240.240.0.12:7000").unwrap();
    echo_roundtrip(s, &pattern(1 << 10, 4));
    assert_eq!(
        counts.udp.load(Ordering::Relaxed),
        asked,
        "a cached answer was asked for again"
    );

    let mut s = m.connect("client", "240.240.0.13:7000").unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    let metrics = m.metrics("node1");
    let closed = |host: &str, flag: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains(&format!("destination_service=\"{host}\""))
                && l.contains(&format!("response_flags=\"{flag}\""))
        })
    };
    assert!(closed("outside.test", "-"), "{metrics}");
    assert!(closed("missing.test", "DF"), "{metrics}");
    let log = m.log("node1");
    assert!(
        log.lines()
            .any(|l| l.contains("endpoint missing.test did not resolve")),
        "{log}"
    );
}

/// Gateway API for ServiceEntries: an HTTPRoute whose parent is an entry
/// binds to it at its waypoint (a path no rule matches is 404 NR there, not
/// passed to the entry's endpoints), and `Hostname` backends send to
/// entries by host: one to a DNS entry the waypoint resolves, one back to
/// the parent's own host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_attached_to_an_entry_sends_to_hostname_backends() {
    let m = mesh("egh", |_| {
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: gwapi, namespace: app}
spec:
  hosts: [gwapi.example.com]
  addresses: [240.240.0.16]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints: [{address: 10.244.3.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: outside, namespace: app}
spec:
  hosts: [outside.test]
  addresses: [240.240.0.17]
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gwapi, namespace: app}
spec:
  parentRefs: [{kind: ServiceEntry, group: networking.istio.io, name: gwapi}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /dns}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /resolved}}}]
    backendRefs: [{kind: Hostname, group: networking.istio.io, name: outside.test, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /static}}]
    backendRefs: [{kind: Hostname, group: networking.istio.io, name: gwapi.example.com, port: 80}]
"
        .to_string()
    })
    .await;
    let _counts = m.dns_server("resolver");
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8080"], 8080);

    assert_eq!(
        curl(&m, "http://gwapi.example.com/dns/x"),
        "GET /resolved/x host=gwapi.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://gwapi.example.com/static/y"),
        "GET /static/y host=gwapi.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://gwapi.example.com/elsewhere"),
        "no route matched\n 404"
    );
    let log = access_log(&m);
    let took = |upstream: &str| {
        log.iter().any(|l| {
            l["authority"] == "gwapi.example.com"
                && l["upstream_host"] == upstream
                && l["route_name"]
                    .as_str()
                    .is_some_and(|r| r.contains("app/gwapi"))
        })
    };
    assert!(took("192.0.2.1:8080"), "{log:?}");
    assert!(took("10.244.3.5:8080"), "{log:?}");
    drop(peers);
}
