use super::*;

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, labels: {app: echo, version: v1}}
spec: {nodeName: n, serviceAccountName: echo}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: app, labels: {app: echo, version: v2}}
spec: {nodeName: n, serviceAccountName: echo}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 10.96.0.1, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: app}
spec: {clusterIP: 10.96.0.2, selector: {app: echo, version: v2}, ports: [{name: grpc, port: 90, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app}
spec: {clusterIP: 10.96.0.3, selector: {app: nobody}, ports: [{name: http, port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: app}
spec:
  targetRefs: [{kind: Service, group: \"\", name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 301}
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 50}}}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 2s, percentage: {value: 50}}}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /nosubset}}]
    route: [{destination: {host: echo, subset: nope}}]
  - match: [{uri: {prefix: /nothing}}]
    route: [{destination: {host: empty}}]
  - match: [{uri: {prefix: /api/v1}}]
    rewrite: {uri: /v2}
    route: [{destination: {host: echo}}]
  - match: [{uri: {prefix: /split}}]
    route: [{destination: {host: echo}, weight: 75}, {destination: {host: grpc}, weight: 25}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: echo}}]
    mirror: {host: grpc}
    mirrorPercentage: {value: 50}
  - match: [{uri: {exact: /only}}]
    route: [{destination: {host: echo}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: app}
spec:
  hosts: [ext.example.com]
  addresses: [240.0.0.1]
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints: [{address: a.origin.test}, {address: b.origin.test, ports: {http: 9090}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bare, namespace: app}
spec: {hosts: [bare.example.com], addresses: [240.0.0.2], resolution: DNS, ports: [{number: 80, name: http}]}
";

/// Fixed dice: every percentage roll and index draw is the given value.
struct Fixed(f64, u64);

impl Dice for Fixed {
    fn percent(&mut self) -> f64 {
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.1.min(n - 1)
    }
}

#[derive(Debug, PartialEq)]
enum Got {
    Respond(u16, &'static str),
    Forward {
        host: String,
        h2: bool,
        eps: usize,
        path: String,
        mirror: bool,
    },
    Fail(ProxyError),
}

/// The plan's kind and delay, and the names a forward resolves when sending.
type Run = (Got, Option<Duration>, Vec<(String, u16)>);

fn run(target: &str, path: &str, dice: (f64, u64)) -> Run {
    let state = mesh::standalone::parse(MESH, "cluster.local").unwrap();
    let src = Identity::new("cluster.local", "app", "client");
    let target: SocketAddr = target.parse().unwrap();
    let c = Caller {
        src: &src,
        peer: "10.0.0.9:40000".parse().unwrap(),
        target,
        waypoint: ("app", "wp"),
        auth: None,
    };
    let (mut parts, ()) = http::Request::get(path).body(()).unwrap().into_parts();
    let svc = state.service_by_vip(target.ip()).cloned();
    let p = plan(
        &c,
        &state,
        svc.as_deref(),
        &mut parts,
        "echo",
        &mut Fixed(dice.0, dice.1),
    );
    let mut dns = Vec::new();
    let got = match p.action {
        Ok(Action::Respond(r, f)) => Got::Respond(r.status().as_u16(), f),
        Ok(Action::Forward(f)) => Got::Forward {
            host: f.host.clone(),
            h2: f.target.h2,
            eps: {
                dns.clone_from(&f.target.dns);
                f.target.eps.len()
            },
            path: parts.uri.to_string(),
            mirror: f.mirror.is_some(),
        },
        Err(e) => Got::Fail(e),
    };
    (got, p.delay, dns)
}

fn fwd(host: &str, h2: bool, eps: usize, path: &str, mirror: bool) -> Got {
    Got::Forward {
        host: host.into(),
        h2,
        eps,
        path: path.into(),
        mirror,
    }
}

#[test]
fn plans_by_table() {
    const SVC: &str = "10.96.0.1:80";
    type Row = (
        &'static str,
        &'static str,
        (f64, u64),
        Got,
        Option<Duration>,
    );
    let table: Vec<Row> = vec![
        // L7 DENY before any routing.
        (
            SVC,
            "/admin/x",
            (99.0, 0),
            Got::Fail(ProxyError::Denied(String::new())),
            None,
        ),
        // Redirect answered here.
        (SVC, "/old/a", (99.0, 0), Got::Respond(301, "-"), None),
        // Abort at 50%: a roll of 10 aborts, 60 does not.
        (SVC, "/abort", (10.0, 0), Got::Respond(418, "FI"), None),
        (
            SVC,
            "/abort",
            (60.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/abort", false),
            None,
        ),
        // Delay at 50%.
        (
            SVC,
            "/delay",
            (10.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/delay", false),
            Some(Duration::from_secs(2)),
        ),
        (
            SVC,
            "/delay",
            (60.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/delay", false),
            None,
        ),
        // References that do not resolve; a service without endpoints.
        (
            SVC,
            "/nosubset",
            (99.0, 0),
            Got::Fail(ProxyError::Unresolved(String::new())),
            None,
        ),
        (
            SVC,
            "/nothing",
            (99.0, 0),
            Got::Fail(ProxyError::NoHealthy(String::new())),
            None,
        ),
        // A prefix rewrite keeps the rest of the path and the query.
        (
            SVC,
            "/api/v1/x?q=1",
            (99.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/v2/x?q=1", false),
            None,
        ),
        // Weighted split: draws 0..75 are echo, 75..100 the gRPC port (HTTP/2).
        (
            SVC,
            "/split",
            (99.0, 74),
            fwd("echo.app.svc.cluster.local", false, 2, "/split", false),
            None,
        ),
        (
            SVC,
            "/split",
            (99.0, 75),
            fwd("grpc.app.svc.cluster.local", true, 1, "/split", false),
            None,
        ),
        // Mirror at 50%.
        (
            SVC,
            "/mirrored",
            (10.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/mirrored", true),
            None,
        ),
        (
            SVC,
            "/mirrored",
            (60.0, 0),
            fwd("echo.app.svc.cluster.local", false, 2, "/mirrored", false),
            None,
        ),
        // Routes exist for the host, none matches.
        (
            SVC,
            "/unrouted",
            (99.0, 0),
            Got::Fail(ProxyError::NoRoute),
            None,
        ),
        // Pod-addressed: straight to the pod; an unknown address fails.
        (
            "10.0.0.1:8080",
            "/x",
            (99.0, 0),
            fwd("pod", false, 1, "/x", false),
            None,
        ),
        (
            "10.0.0.7:8080",
            "/x",
            (99.0, 0),
            Got::Fail(ProxyError::NoDestination),
            None,
        ),
    ];
    for (target, path, dice, want, delay) in table {
        let (mut got, d, _) = run(target, path, dice);
        // The reasons are for logs; the table compares the kind.
        if let Got::Fail(
            ProxyError::Denied(w) | ProxyError::Unresolved(w) | ProxyError::NoHealthy(w),
        ) = &mut got
        {
            assert!(!w.is_empty(), "{path}: a failure without a reason");
            w.clear();
        }
        assert_eq!(got, want, "{target}{path} with {dice:?}");
        assert_eq!(d, delay, "{target}{path} with {dice:?}");
    }
}

/// A DNS ServiceEntry's endpoints are names (its endpoints', on the port
/// each declares, or without endpoints its host), left for the sending step
/// to resolve: the plan holds no address for them.
#[test]
fn dns_entries_forward_to_names_resolved_when_sending() {
    let names = |v: &[(&str, u16)]| -> Vec<(String, u16)> {
        v.iter().map(|(n, p)| (n.to_string(), *p)).collect()
    };
    for (target, host, want) in [
        (
            "240.0.0.1:80",
            "ext.example.com",
            names(&[("a.origin.test", 8080), ("b.origin.test", 9090)]),
        ),
        (
            "240.0.0.2:80",
            "bare.example.com",
            names(&[("bare.example.com", 80)]),
        ),
    ] {
        let (got, _, dns) = run(target, "/x", (99.0, 0));
        assert_eq!(got, fwd(host, false, 0, "/x", false), "{target}");
        let mut dns = dns;
        dns.sort();
        assert_eq!(dns, want, "{target}");
    }
}
