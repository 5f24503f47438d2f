//! Bodies, trailers and upgrades through the waypoint: pods as network
//! namespaces, real ztunnels, our waypoint in its own pod, real peers
//! (curl, Python `websockets` and `grpcio`, installed by scripts/deps.sh).

use std::time::Duration;

use testbed::*;

mod common;
use common::{access_log, Peers};

const WP: &str = env!("CARGO_BIN_EXE_waypoint");
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

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
metadata: {name: backend, namespace: app, labels: {app: backend}}
spec: {serviceAccountName: backend, nodeName: node2}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: upload, namespace: app}
spec: {clusterIP: 10.96.0.40, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: app}
spec: {clusterIP: 10.96.0.41, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8090}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: app}
spec: {clusterIP: 10.96.0.42, selector: {app: backend}, ports: [{name: grpc, port: 9090, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: app}
spec: {clusterIP: 10.96.0.43, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: h2echo, namespace: app}
spec: {clusterIP: 10.96.0.44, selector: {app: backend}, ports: [{name: http2, port: 80, targetPort: 8082}]}
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
";

async fn mesh(tag: &str, extra: &str, wp_args: &[&str]) -> (Mesh, u32) {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("backend", "app", "backend", "10.244.2.11", "node2", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.write_config(&format!("{BASE}{extra}"));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    let pid = m.start_waypoint_with(WP, "waypoint", "waypoint", "app", "waypoint", wp_args);
    (m, pid)
}

/// Runs `cmd` inside `pod`; returns its output, trailing newline cut.
fn run_in(m: &Mesh, pod: &str, cmd: &str) -> String {
    let out = sh_out(&format!("ip netns exec {} {cmd}", m.pod_ns(pod))).1;
    out.trim_end().to_string()
}

/// A Python client in the client pod: stdout only (its stderr goes to a
/// log in the test's directory).
fn py(m: &Mesh, script: &str, args: &str) -> String {
    run_in(
        m,
        "client",
        &format!(
            "timeout 60 python3 {PEERS}/{script} {args} 2>>{}",
            m.dir.join("clients.log").display()
        ),
    )
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A file of `len` random bytes in the test's directory, and its SHA-256.
fn random_file(m: &Mesh, name: &str, len: usize) -> (std::path::PathBuf, String) {
    let p = m.dir.join(name);
    sh(&format!("head -c {len} /dev/urandom > {}", p.display()));
    let (_, sum) = sh_out(&format!("sha256sum {}", p.display()));
    (p, sum.split_whitespace().next().unwrap().to_string())
}

fn upload(m: &Mesh, file: &std::path::Path, url: &str) -> String {
    run_in(
        m,
        "client",
        &format!(
            "curl -s -m 300 -w ' %{{http_code}}' -T {} -X POST {url}",
            file.display()
        ),
    )
}

/// 256 MiB through the waypoint arrive whole (checksummed), up and then
/// down, and each time the waypoint's peak RSS grows by at most 16 MiB: the
/// body was never held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_waypoint_memory() {
    const LEN: usize = 256 << 20;
    let (m, wp) = mesh("wsu", "", &[]).await;
    let mut peers = Peers::default();
    peers.start(&m, "backend", "upload_server.py", &["8080"], 8080);
    // Warm certificates, pools and allocator arenas into the baseline.
    let (small, small_sum) = random_file(&m, "small", 1 << 20);
    for _ in 0..3 {
        assert_eq!(
            upload(&m, &small, "http://10.96.0.40/warm"),
            format!("{} {small_sum}\n 200", 1 << 20)
        );
    }
    let (big, sum) = random_file(&m, "big", LEN);
    let before = status_kib(wp, "VmHWM:");
    let start = std::time::Instant::now();
    assert_eq!(
        upload(&m, &big, "http://10.96.0.40/upload"),
        format!("{LEN} {sum}\n 200")
    );
    let took = start.elapsed();
    let after = status_kib(wp, "VmHWM:");
    eprintln!(
        "256 MiB upload in {took:?}; waypoint VmHWM {before} kB -> {after} kB (+{} kB)",
        after - before
    );
    assert!(
        after - before <= 16 * 1024,
        "waypoint peak RSS grew {} kB for a 256 MiB body",
        after - before
    );

    // And back: the same file as a response body.
    let before = after;
    let got = run_in(
        &m,
        "client",
        &format!(
            "sh -c 'curl -s -m 300 http://10.96.0.40/file{} | sha256sum'",
            big.display()
        ),
    );
    let after = status_kib(wp, "VmHWM:");
    eprintln!(
        "256 MiB download: waypoint VmHWM {before} kB -> {after} kB (+{} kB)",
        after - before
    );
    assert_eq!(got.split_whitespace().next(), Some(sum.as_str()));
    assert!(
        after - before <= 16 * 1024,
        "waypoint peak RSS grew {} kB for a 256 MiB response",
        after - before
    );
    let log = access_log(&m);
    let line = log.iter().find(|l| l["path"] == "/upload").unwrap();
    assert_eq!(line["bytes_received"], LEN as u64, "{line}");
    assert_eq!(line["response_code"], 200);
    let line = log
        .iter()
        .find(|l| l["path"].as_str().is_some_and(|p| p.starts_with("/file/")))
        .unwrap();
    assert_eq!(line["bytes_sent"], LEN as u64, "{line}");
    drop(peers);
}

/// A retry resends a body that fit the replay buffer (the backend checks
/// it whole); a body larger than the buffer is sent once, not retried, and
/// the access log says why. Mirroring likewise: the copy of a body that
/// fit arrives whole, a larger body is not mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_replayed_and_mirrored_large_ones_are_sent_once() {
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: upload, namespace: app}
spec:
  hosts: [upload]
  http:
  - match: [{uri: {prefix: /flaky}}]
    retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: upload}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: upload}}]
    mirror: {host: shadow}
    mirrorPercentage: {value: 100}
  - match: [{uri: {prefix: /slow}}]
    timeout: 1s
    route: [{destination: {host: upload}}]
  - route: [{destination: {host: upload}}]
";
    let (m, _) = mesh("wsr", vs, &["--request-replay-buffer", "65536"]).await;
    let mut peers = Peers::default();
    peers.start(&m, "backend", "upload_server.py", &["8080"], 8080);
    peers.start(&m, "backend", "upload_server.py", &["8081"], 8081);
    let (small, small_sum) = random_file(&m, "small", 40_000);
    let (big, big_sum) = random_file(&m, "big", 1 << 20);
    // The backend answers 503 to the first try after reading it all; the
    // retry must carry the same 40 000 bytes.
    assert_eq!(
        upload(&m, &small, "http://10.96.0.40/flaky/small"),
        format!("40000 {small_sum}\n 200")
    );
    // 1 MiB does not fit 64 KiB: the 503 is the answer.
    let out = upload(&m, &big, "http://10.96.0.40/flaky/big");
    assert!(out.ends_with(" 503"), "{out}");
    // The backend saw one try only: its next one succeeds.
    assert_eq!(
        upload(&m, &big, "http://10.96.0.40/flaky/big"),
        format!("{} {big_sum}\n 200", 1 << 20)
    );
    let log = access_log(&m);
    let at = |p: &str| log.iter().filter(|l| l["path"] == p).collect::<Vec<_>>();
    let s = at("/flaky/small");
    assert_eq!(
        (s[0]["attempts"].clone(), s[0]["not_retried"].clone()),
        (2.into(), serde_json::Value::Null)
    );
    let b = at("/flaky/big");
    assert_eq!(b[0]["attempts"], 1, "{}", b[0]);
    assert_eq!(b[0]["not_retried"], "body_over_replay_buffer", "{}", b[0]);
    assert_eq!(b[0]["response_code"], 503);

    assert_eq!(
        upload(&m, &small, "http://10.96.0.40/mirrored/small"),
        format!("40000 {small_sum}\n 200")
    );
    assert_eq!(
        upload(&m, &big, "http://10.96.0.40/mirrored/big"),
        format!("{} {big_sum}\n 200", 1 << 20)
    );
    // The route timeout counts from the end of the request body, as
    // Envoy's: an upload that takes 3 s under a 1 s timeout is answered.
    let (slow, slow_sum) = random_file(&m, "slow", 300_000);
    let started = std::time::Instant::now();
    let out = run_in(
        &m,
        "client",
        &format!(
            "curl -s -m 30 --limit-rate 100k -w ' %{{http_code}}' -T {} -X POST http://10.96.0.40/slow/up",
            slow.display()
        ),
    );
    assert_eq!(out, format!("300000 {slow_sum}\n 200"));
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the upload was not slow"
    );
    let shadow = || run_in(&m, "backend", "curl -s http://127.0.0.1:8081/seen");
    eventually(
        "the mirror gets the small body whole",
        Duration::from_secs(5),
        || shadow().contains(&format!("/mirrored/small 40000 {small_sum}")),
    )
    .await;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !shadow().contains("/mirrored/big"),
        "a body over the replay buffer was mirrored: {}",
        shadow()
    );
    drop(peers);
}

/// A WebSocket (Python `websockets` both ends) through the waypoint: the
/// upgrade is routed and authorized (a DENY on its path is a 403), then
/// messages echo both ways, across a pause longer than the route timeout.
/// A DENY added later closes a live tunnel it now refuses; one it does not
/// refuse lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_authorized_then_tunnelled() {
    let cfg = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: app}
spec:
  targetRefs: [{kind: Service, group: \"\", name: ws}]
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ws, namespace: app}
spec:
  hosts: [ws]
  http: [{timeout: 1s, route: [{destination: {host: ws}}]}]
";
    let (m, _) = mesh("wsw", cfg, &[]).await;
    let mut peers = Peers::default();
    peers.start(&m, "backend", "ws_echo.py", &["8090"], 8090);
    // 400 messages, up to ~16 KiB each, with a 2 s pause halfway (twice
    // the route's timeout: an upgraded connection is not bound by it).
    assert_eq!(
        py(&m, "ws_client.py", "ws://10.96.0.41/chat 400 2"),
        "echoed 400"
    );
    assert_eq!(
        py(&m, "ws_client.py", "ws://10.96.0.41/admin/chat 1"),
        "status 403"
    );

    // The same over HTTP/2 (RFC 8441 extended CONNECT), which the waypoint
    // sends on as an HTTP/1.1 upgrade.
    assert_eq!(h2_websocket(&m, "/h2chat", 200).await, Ok(200));
    assert_eq!(h2_websocket(&m, "/admin/h2chat", 1).await, Err(403));

    // Three live tunnels; then a DENY of one's path, and a CUSTOM policy on
    // another's naming a provider that cannot be asked (a new request
    // there would be denied, and its check never ran for the live one).
    let hold = |name: &'static str| {
        let (ns, dir) = (m.pod_ns("client"), m.dir.clone());
        std::thread::spawn(move || {
            sh(&format!(
                "ip netns exec {ns} timeout 60 python3 {PEERS}/ws_client.py ws://10.96.0.41/live/{name} 1 0 6 >{} 2>>{}",
                dir.join(name).display(),
                dir.join("clients.log").display()
            ));
            std::fs::read_to_string(dir.join(name)).unwrap()
        })
    };
    let (doomed, spared, custom) = (hold("doomed"), hold("spared"), hold("custom"));
    let connected = |name: &str| {
        std::fs::read_to_string(m.dir.join(name)).is_ok_and(|s| s.starts_with("echoed 1"))
    };
    eventually("both tunnels are up", Duration::from_secs(20), || {
        connected("doomed") && connected("spared") && connected("custom")
    })
    .await;
    m.write_config(&format!(
        "{BASE}{cfg}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-doomed, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: ws}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [\"/live/doomed\"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ask-custom, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: ws}}]
  action: CUSTOM
  provider: {{name: absent}}
  rules: [{{to: [{{operation: {{paths: [\"/live/custom\"]}}}}]}}]
"
    ));
    assert_eq!(doomed.join().unwrap().trim_end(), "echoed 1\nclosed");
    assert_eq!(custom.join().unwrap().trim_end(), "echoed 1\nclosed");
    assert_eq!(spared.join().unwrap().trim_end(), "echoed 1\nheld");

    let log = access_log(&m);
    // Logged when the tunnel closed: its whole life (past the 2 s pause)
    // and its bytes both ways (some kB: websockets compresses the
    // repetitive messages).
    let chat = log
        .iter()
        .find(|l| l["path"] == "/chat" && l["response_code"] == 101)
        .unwrap_or_else(|| panic!("{log:?}"));
    assert!(chat["duration"].as_u64().unwrap() >= 2000, "{chat}");
    let (up, down) = (
        chat["bytes_received"].as_u64().unwrap(),
        chat["bytes_sent"].as_u64().unwrap(),
    );
    assert!(up > 4096 && down > 4096, "{chat}");
    assert!(log
        .iter()
        .any(|l| l["path"] == "/admin/chat" && l["response_code"] == 403));
    assert!(log.iter().any(|l| l["path"] == "/h2chat"
        && l["method"] == "CONNECT"
        && l["response_code"] == 200
        && l["upstream_host"] == "10.244.2.11:8090"));
    drop(peers);
}

/// An RFC 8441 WebSocket from the client pod: hyper's HTTP/2 client opens
/// it, tungstenite speaks WebSocket over it; `n` messages echoed one by one.
/// The count echoed, or the status that refused the CONNECT.
async fn h2_websocket(m: &Mesh, path: &str, n: usize) -> Result<usize, u16> {
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};

    let tcp = m.connect("client", "10.96.0.41:80").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // One plain request first: the server's SETTINGS (which allow extended
    // CONNECT) have arrived once it is answered.
    let warm = http::Request::get("http://10.96.0.41/")
        .body(Empty::new())
        .unwrap();
    send.send_request(warm).await.unwrap();
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://10.96.0.41{path}"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    for i in 0..n {
        let msg = format!("h2-{i}-").repeat(1 + i * 37 % 500);
        ws.send(Message::text(msg.clone())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), msg, "message {i}");
    }
    Ok(n)
}

/// gRPC (grpcio both ends) through the waypoint over HTTP/2: a bidi stream
/// that sends each message only after the previous reply (it would stall if
/// the waypoint buffered the request stream), trailers passed back, and
/// the status of a failed call in `grpc_response_status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidi_streams_message_by_message_and_status_is_reported() {
    let (m, _) = mesh("wsg", "", &[]).await;
    let mut peers = Peers::default();
    peers.start(&m, "backend", "grpc_echo.py", &["server", "9090"], 9090);
    assert_eq!(
        py(&m, "grpc_echo.py", "client 10.96.0.42:9090 100"),
        "chat 100 trailer=yes\nfail NOT_FOUND"
    );
    // The client's grpc-timeout is the deadline (the route has none): a
    // call to a method that takes 3 s is answered at 500 ms, as a gRPC
    // trailers-only UNAVAILABLE flagged UT. (curl, so that the deadline is
    // not the client's own.)
    // One empty message: the 5-byte gRPC frame header with length 0.
    let msg = m.dir.join("empty.grpc");
    std::fs::write(&msg, [0u8; 5]).unwrap();
    let start = std::time::Instant::now();
    let head = run_in(
        &m,
        "client",
        &format!("curl -s -m 5 --http2-prior-knowledge -D - -o /dev/null -H 'content-type: application/grpc' -H 'te: trailers' -H 'grpc-timeout: 500m' --data-binary @{} http://10.96.0.42:9090/echo.Echo/Slow", msg.display()),
    );
    let took = start.elapsed();
    assert!(head.contains("grpc-status: 14"), "{head}");
    assert!(
        took < Duration::from_secs(2),
        "grpc-timeout not honoured: {took:?}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    let grpc = |status: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("destination_service=\"grpc.app.svc.cluster.local\"")
                && l.contains(&format!("grpc_response_status=\"{status}\""))
        })
    };
    assert!(grpc("0"), "{metrics}");
    assert!(grpc("5"), "{metrics}");
    let log = access_log(&m);
    assert!(log
        .iter()
        .any(|l| l["path"] == "/echo.Echo/Fail" && l["grpc_status"] == 5));
    assert!(log.iter().any(|l| l["path"] == "/echo.Echo/Slow"
        && l["response_flags"] == "UT"
        && l["grpc_status"] == 14));
    drop(peers);
}

/// A route's `retryOn: unavailable` retries a gRPC call answered
/// trailers-only with UNAVAILABLE (HTTP 200): the client sees the second
/// try's answer. A call to the same method on a service whose route does
/// not retry gRPC statuses gets the UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_per_retry_on() {
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: app}
spec:
  hosts: [grpc]
  http: [{retries: {attempts: 2, retryOn: \"unavailable\"}, route: [{destination: {host: grpc}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc2, namespace: app}
spec: {clusterIP: 10.96.0.45, selector: {app: backend}, ports: [{name: grpc, port: 9091, targetPort: 9090}]}
";
    let (m, _) = mesh("wsr", vs, &[]).await;
    let mut peers = Peers::default();
    peers.start(&m, "backend", "grpc_echo.py", &["server", "9090"], 9090);
    // The server fails every odd call: the 1st (retried: 2nd answers ok),
    // then the 3rd, through a service without the retry.
    assert_eq!(py(&m, "grpc_echo.py", "flaky 10.96.0.42:9090"), "flaky ok");
    assert_eq!(
        py(&m, "grpc_echo.py", "flaky 10.96.0.45:9091"),
        "flaky UNAVAILABLE"
    );
    let log = access_log(&m);
    assert!(
        log.iter().any(|l| l["path"] == "/echo.Echo/Flaky"
            && l["attempts"] == 2
            && l["grpc_status"] == 0),
        "{log:?}"
    );
    drop(peers);
}

/// An HTTP/2 server (hyper) in `pod` on `port` that answers each request
/// with its body and, as trailers, the request's trailers renamed `echo-*`.
fn trailer_echo_server(m: &Mesh, pod: &str, port: u16) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = in_ns(&m.pod_ns(pod), move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    l.set_nonblocking(true).unwrap();
    tokio::spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        while let Ok((s, _)) = l.accept().await {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let got = req.into_body().collect().await?;
                    let mut echo = http::HeaderMap::new();
                    for (k, v) in got.trailers().into_iter().flatten() {
                        let name = http::HeaderName::try_from(format!("echo-{k}")).unwrap();
                        echo.insert(name, v.clone());
                    }
                    let frames: Vec<Result<_, hyper::Error>> =
                        vec![Ok(Frame::data(got.to_bytes())), Ok(Frame::trailers(echo))];
                    Ok::<_, hyper::Error>(http::Response::new(StreamBody::new(
                        futures_util::stream::iter(frames),
                    )))
                },
            );
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
}

/// HTTP/2 trailers pass through the waypoint both ways: the client's reach
/// the backend (hyper both ends), the backend's reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_pass_both_ways() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (m, _) = mesh("wst", "", &[]).await;
    trailer_echo_server(&m, "backend", 8082);
    let tcp = m.connect("client", "10.96.0.44:80").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames: Vec<Result<_, std::io::Error>> = vec![
        Ok(Frame::data(bytes::Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post("http://10.96.0.44/t")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    let t = got.trailers().cloned().expect("response trailers");
    assert_eq!(
        t.get("echo-x-checksum").map(|v| v.to_str().unwrap()),
        Some("abc123")
    );
    assert_eq!(got.to_bytes(), "payload");
    assert!(access_log(&m)
        .iter()
        .any(|l| l["path"] == "/t" && l["upstream_host"] == "10.244.2.11:8082"));
}
