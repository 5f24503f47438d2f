//! The standalone demo: builds a small mesh from a config file on network
//! namespaces, runs one ztunnel per node, sends traffic, shows what happened
//! and cleans up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use mesh::TunnelProtocol;
use testbed::Mesh;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// The waypoint part: its pod runs our waypoint, the routed service's
/// backends serve HTTP, the client sends requests through it.
fn waypoint_demo(m: &Mesh, state: &mesh::MeshState, wp: &mesh::routes::Waypoint, bin: &str) {
    let Some(pod) = state.workloads.values().find(|w| {
        *w.namespace == *wp.namespace
            && w.labels.get("gateway.networking.k8s.io/gateway-name") == Some(&wp.name)
    }) else {
        return println!(
            "\n== waypoint {}/{}: no pod runs it in the config",
            wp.namespace, wp.name
        );
    };
    m.start_waypoint(
        bin,
        &pod.name,
        &wp.name,
        &wp.namespace,
        &pod.service_account,
    );
    let Some(route) = state.http_routes.first() else {
        return;
    };
    let Some(svc) = state.service_by_host(&route.hosts[0]) else {
        return;
    };
    for w in state
        .workloads
        .values()
        .filter(|w| svc.endpoints.iter().any(|e| e.workload_uid == w.uid))
    {
        let port = state
            .endpoints_for(svc, svc.ports[0].port)
            .first()
            .map(|(_, p)| *p)
            .unwrap_or(8080);
        m.http_server(&w.name, port);
    }
    let url = format!("http://{}:{}", svc.vips[0], svc.ports[0].port);
    println!(
        "\n== client -> {} through waypoint {}/{} (route {}/{})",
        svc.hostname, wp.namespace, wp.name, route.namespace, route.name
    );
    let (_, out) = testbed::sh_out(&format!(
        "ip netns exec {} curl -s '{url}/shop?i=[1-50]'",
        m.pod_ns("client")
    ));
    let mut spread = std::collections::BTreeMap::<String, u32>::new();
    for l in out.lines() {
        *spread.entry(l.to_string()).or_default() += 1;
    }
    println!("   50 requests answered by: {spread:?}");
    let (_, code) = testbed::sh_out(&format!(
        "ip netns exec {} curl -s -o /dev/null -w %{{http_code}} {url}/admin",
        m.pod_ns("client")
    ));
    println!("   GET /admin -> {code} (L7 AuthorizationPolicy on the waypoint)");
    println!("   waypoint metrics (istio_requests_total, reporter=waypoint):");
    for l in m
        .pod_http(&pod.name, 15020, "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let pick = |k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|x| x.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        println!(
            "     destination_workload={} response_code={} response_flags={} {}",
            pick("destination_workload"),
            pick("response_code"),
            pick("response_flags"),
            l.rsplit(' ').next().unwrap_or("")
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = PathBuf::from(arg("--config", "examples/mesh.yaml"));
    let ztunnel = arg("--ztunnel", "target/release/ztunnel");
    let yaml =
        std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    let state = mesh::standalone::parse(&yaml, "cluster.local")
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()));

    let agent = arg("--agent", "target/release/istio-cni-agent");
    let plugin = arg("--plugin", "target/release/istio-cni");
    println!("== building the mesh from {}", config.display());
    let mut m = Mesh::new("demo", &ztunnel);
    m.write_config(&yaml);
    let nodes: std::collections::BTreeSet<String> = state
        .workloads
        .values()
        .map(|w| w.node.to_string())
        .collect();
    let ca = m.dir.join("ca");
    for (i, n) in nodes.iter().enumerate() {
        // Node i owns 10.244.i.0/24 (host-local IPAM of its bridge CNI).
        m.cni_node(n, i as u8 + 1);
        m.start_cni_agent(n, &agent, &plugin, &[]);
        m.start_ztunnel(n, &ca);
        println!("   {n}: bridge CNI + istio-cni chained by its node agent, ztunnel ready");
    }
    for w in state.workloads.values() {
        // Kubernetes-style resolver settings; the nameserver is never reached
        // for mesh names (ztunnel answers them in the pod).
        m.resolv_conf(&w.name, &format!("nameserver 10.96.0.53\nsearch {}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:1\n", w.namespace));
        // The runtime's part: a sandbox netns, then the node's CNI chain.
        let r = m.cni_pod(
            &w.node,
            &w.name,
            &w.namespace,
            &w.service_account,
            &w.ip.to_string(),
        );
        if let Err(e) = r {
            panic!("CNI ADD of {}/{} failed: {e:?}", w.namespace, w.name);
        }
        println!(
            "   pod {:<10} {:<12} node {}  {}",
            w.name,
            w.ip,
            w.node,
            if w.protocol == TunnelProtocol::Hbone {
                "ambient: captured by istio-cni, served by ztunnel"
            } else {
                "not in mesh: untouched"
            }
        );
    }

    let svc = state
        .services
        .values()
        .next()
        .expect("the demo config has a Service");
    let vip: IpAddr = svc.vips[0];
    let port = svc.ports[0].port;
    for (w, target) in state.endpoints_for(svc, port) {
        m.greet_echo_server(&w.name, target);
    }
    let addr = format!("{vip}:{port}");

    println!("\n== DNS in the client pod (its stub resolver, captured to ztunnel)");
    let short = svc
        .hostname
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    for name in [short.as_str(), svc.hostname.as_str()] {
        let (_, out) = testbed::sh_out(&format!(
            "ip netns exec {} getent ahostsv4 {name}",
            m.pod_ns("client")
        ));
        let ip = out.split_whitespace().next().unwrap_or("(no answer)");
        println!("   {name:<32} -> {ip}");
    }

    println!("\n== client -> {} ({addr}), 10 connections", svc.hostname);
    let mut hits = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..10 {
        let s = m.connect("client", &addr).expect("connect");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("greeting");
        let mut it = line.split_whitespace();
        let (who, seen_ip) = (
            it.next().unwrap_or("?").to_string(),
            it.next().unwrap_or("?").to_string(),
        );
        println!("   answered by {who:<8} which saw client ip {seen_ip}");
        *hits.entry(who).or_default() += 1;
    }
    println!("   spread: {hits:?}");

    println!("\n== client -> {addr}: 4 MiB echoed back");
    let data = testbed::pattern(4 << 20, 42);
    let mut s = m.connect("client", &addr).expect("connect");
    let mut greeting = String::new();
    let mut r = BufReader::new(s.try_clone().unwrap());
    r.read_line(&mut greeting).unwrap();
    let send = data.clone();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&send).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    println!("   {} bytes back, identical: {}", got.len(), got == data);
    let _ = s.flush();

    println!("\n== intruder -> {addr} (policy admits only sa/client)");
    match m.whoami("intruder", &addr) {
        Ok(line) => println!("   UNEXPECTED: admitted ({line})"),
        Err(e) => println!("   refused: {e}"),
    }

    if let Some(wp) = state.waypoints.first() {
        waypoint_demo(
            &m,
            &state,
            wp,
            &arg("--waypoint", "target/release/waypoint"),
        );
    }

    // Totals over both nodes, as the destination side reported them.
    let (mut hbone_bytes, mut denied) = (0.0, 0.0);
    for n in &nodes {
        for l in m
            .metrics(n)
            .lines()
            .filter(|l| l.contains("reporter=\"destination\""))
        {
            let v: f64 = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let mtls = l.contains("connection_security_policy=\"mutual_tls\"");
            if mtls
                && (l.starts_with("istio_tcp_received_bytes_total")
                    || l.starts_with("istio_tcp_sent_bytes_total"))
            {
                hbone_bytes += v;
            }
            if l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("response_flags=\"DENY\"")
            {
                denied += v;
            }
        }
    }
    println!("\n== summary: {hbone_bytes} bytes carried over HBONE (mTLS), {denied} connection(s) denied by policy");

    println!("\n== metrics excerpt (istio_tcp_*, reporter=destination)");
    for n in &nodes {
        for l in m
            .metrics(n)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_") && l.contains("reporter=\"destination\""))
        {
            let name = l.split('{').next().unwrap_or("");
            let pick = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|x| x.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            let value = l.rsplit(' ').next().unwrap_or("");
            println!("   {n} {name}{{source_principal={}, destination_workload={}, response_flags={}}} {value}", pick("source_principal"), pick("destination_workload"), pick("response_flags"));
        }
    }
    println!(
        "\n== certificates held by ztunnel on {}",
        nodes.first().unwrap()
    );
    for c in m.config_dump(nodes.first().unwrap())["certificates"]
        .as_array()
        .unwrap()
    {
        // The leaf is the first of the chain (upstream ztunnel's shape).
        println!(
            "   {} {}, expires {}",
            c["identity"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["certChain"][0]["expirationTime"].as_str().unwrap_or("?")
        );
    }
    println!("\n== cleaning up");
    drop(m);
    println!("   done");
}
