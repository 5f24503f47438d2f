//! `/logging` on the admin port changes a running ztunnel's log filter, the
//! way `istioctl ztunnel-config log --level ...` calls it.

use std::io::{Read, Write};
use std::time::Duration;

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

/// `POST /logging?<query>` on `node`'s admin port: (status, body).
fn post(m: &Mesh, node: &str, query: &str) -> (u16, String) {
    let (ok, out) = sh_out(&format!(
        "ip netns exec {} curl -s -X POST -w '\\n%{{http_code}}' 'http://127.0.0.1:15000/logging?{query}'",
        m.nodes[node].ns
    ));
    assert!(ok, "curl: {out}");
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

fn shown(m: &Mesh, node: &str) -> String {
    let (code, body) = m.http(node, 15000, "/logging").expect("admin answers");
    assert_eq!(code, 200, "{body}");
    body
}

/// One HBONE round trip from client (node1) to server-2 (node2).
fn traffic(m: &Mesh) {
    let mut s = m.connect("client", "10.244.2.11:8080").unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
}

/// The log without terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            it.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

fn debug_lines(m: &Mesh, node: &str) -> usize {
    plain(&m.log(node)).matches(" DEBUG ").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_shows_and_changes_levels_at_run_time() {
    let m = two_nodes("logs", ZT, "").await;
    m.echo_server("server-2", 8080);
    assert_eq!(shown(&m, "node1"), "current log level is info\n");
    traffic(&m);
    assert_eq!(debug_lines(&m, "node1"), 0, "{}", m.log("node1"));
    // The access log in text: upstream's field names as key=value pairs.
    eventually("text access log line", Duration::from_secs(5), || {
        plain(&m.log("node1")).lines().any(|l| {
            l.contains("connection complete")
                && l.contains("src.workload=client")
                && l.contains("dst.addr=10.244.2.11:15008")
                && l.contains("dst.hbone_addr=10.244.2.11:8080")
                && l.contains("direction=\"outbound\"")
                && l.contains("bytes_sent=4")
        })
    })
    .await;

    // One target, istioctl's `target:level` form: h2 speaks at debug on
    // every HBONE stream, the rest stays at info.
    let (code, body) = post(&m, "node1", "level=h2:debug");
    assert_eq!(
        (code, body.as_str()),
        (200, "current log level is info,h2=debug\n")
    );
    assert_eq!(shown(&m, "node1"), "current log level is info,h2=debug\n");
    traffic(&m);
    eventually("h2 debug lines", Duration::from_secs(5), || {
        plain(&m.log("node1"))
            .lines()
            .any(|l| l.contains(" DEBUG ") && l.contains("h2::"))
    })
    .await;
    let log = plain(&m.log("node1"));
    assert!(
        log.lines()
            .filter(|l| l.contains(" DEBUG "))
            .all(|l| l.contains("h2::")),
        "only h2 was raised:\n{log}"
    );

    // `?<target>=<level>` adds to it; a bad level changes nothing.
    let (code, body) = post(&m, "node1", "hbone=trace");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "current log level is info,h2=debug,hbone=trace\n");
    let (code, body) = post(&m, "node1", "level=loud");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("loud"), "{body}");
    assert_eq!(
        shown(&m, "node1"),
        "current log level is info,h2=debug,hbone=trace\n"
    );

    // istioctl's reset (`level=info&reset`), then no more debug lines.
    let (code, body) = post(&m, "node1", "level=info&reset");
    assert_eq!((code, body.as_str()), (200, "current log level is info\n"));
    let before = debug_lines(&m, "node1");
    traffic(&m);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(debug_lines(&m, "node1"), before, "{}", m.log("node1"));
    assert!(m.log("node1").contains("log level changed"));
}
