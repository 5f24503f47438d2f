//! Which destinations this waypoint may serve. A waypoint forwards under its
//! own identity, so serving a destination that is not bound to it would make
//! it a confused deputy: whoever can reach it could reach any pod whose
//! policy trusts the waypoint. Only a service VIP (on one of its ports) or a
//! workload address whose `istio.io/use-waypoint` binding resolves here —
//! and whose namespace the Gateway admits — is served.

use std::net::SocketAddr;

use mesh::routes::WaypointRef;
use mesh::MeshState;

/// Why a CONNECT target is refused; every case is a 403 with the "no route"
/// flag: this waypoint has no route to it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unbound {
    #[error("{0} is not a service or workload address the mesh knows")]
    Unknown(SocketAddr),
    #[error("service {host} has no port {port}")]
    NoSuchPort { host: String, port: u16 },
    #[error("service {host} is bound to {bound}, not this waypoint")]
    Service { host: String, bound: String },
    #[error("workload {workload} is bound to {bound}, not this waypoint")]
    Workload { workload: String, bound: String },
}

fn describe(r: Option<&WaypointRef>) -> String {
    r.map_or_else(
        || "no waypoint (or one that does not admit its namespace)".into(),
        |r| format!("waypoint {}/{}", r.namespace, r.name),
    )
}

/// Ok when `target` is a destination bound to waypoint `me`.
pub fn check(state: &MeshState, me: &WaypointRef, target: SocketAddr) -> Result<(), Unbound> {
    if let Some(svc) = state.service_by_vip(target.ip()) {
        if !svc.ports.iter().any(|p| p.port == target.port()) {
            return Err(Unbound::NoSuchPort {
                host: svc.hostname.clone(),
                port: target.port(),
            });
        }
        return match state.service_waypoint(svc) {
            Some(r) if r == me => Ok(()),
            other => Err(Unbound::Service {
                host: svc.hostname.clone(),
                bound: describe(other),
            }),
        };
    }
    if let Some(w) = state.workload_by_ip(target.ip()) {
        return match state.workload_waypoint(w) {
            Some(r) if r == me => Ok(()),
            other => Err(Unbound::Workload {
                workload: format!("{}/{}", w.namespace, w.name),
                bound: describe(other),
            }),
        };
    }
    Err(Unbound::Unknown(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/use-waypoint: wp-a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/use-waypoint: wp-a, istio.io/use-waypoint-namespace: a, team: friends}}
---
apiVersion: v1
kind: Namespace
metadata: {name: c, labels: {istio.io/use-waypoint: wp-a, istio.io/use-waypoint-namespace: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: d, labels: {istio.io/use-waypoint: wp-d}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-a, namespace: a, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: friends}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-d, namespace: d}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

    fn pod(ns: &str, ip: &str) -> String {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: {ns}}}\nspec: {{nodeName: n}}\nstatus: {{podIP: {ip}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\nspec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}\n", &ip[ip.rfind('.').unwrap() + 1..])
    }

    #[test]
    fn only_destinations_bound_here_are_served() {
        let yaml = format!(
            "{MESH}{}{}{}{}",
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2"),
            pod("c", "10.0.0.3"),
            pod("d", "10.0.0.4")
        );
        let state = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let me = WaypointRef {
            name: "wp-a".into(),
            namespace: "a".into(),
        };
        let t = |s: &str| s.parse::<SocketAddr>().unwrap();
        let bound = |s| check(&state, &me, t(s));
        // Same namespace: service and workload.
        assert_eq!(bound("10.96.0.1:80"), Ok(()));
        assert_eq!(bound("10.0.0.1:8080"), Ok(()));
        // Another namespace that the Gateway's selector admits.
        assert_eq!(bound("10.96.0.2:80"), Ok(()));
        assert_eq!(bound("10.0.0.2:8080"), Ok(()));
        // A namespace that asks for wp-a but is not admitted.
        assert!(matches!(
            bound("10.96.0.3:80"),
            Err(Unbound::Service { .. })
        ));
        assert!(matches!(
            bound("10.0.0.3:8080"),
            Err(Unbound::Workload { .. })
        ));
        // Bound to another waypoint entirely (the confused-deputy case).
        let e = bound("10.96.0.4:80").unwrap_err();
        assert!(e.to_string().contains("waypoint d/wp-d"), "{e}");
        assert!(matches!(
            bound("10.0.0.4:8080"),
            Err(Unbound::Workload { .. })
        ));
        // Not a port of the service; not an address at all.
        assert!(matches!(
            bound("10.96.0.1:81"),
            Err(Unbound::NoSuchPort { .. })
        ));
        assert_eq!(
            bound("10.9.9.9:80"),
            Err(Unbound::Unknown(t("10.9.9.9:80")))
        );
        // The admission also steers ztunnel: c's service has no waypoint.
        let c = state.service_by_vip("10.96.0.3".parse().unwrap()).unwrap();
        assert_eq!(state.service_waypoint(c), None);
    }

    /// Dual-stack and IPv6-only destinations: either family's VIP or pod
    /// address is the same destination, bound or not alike.
    #[test]
    fn v6_addresses_bind_like_v4_ones() {
        let dual = |ns: &str, n: u8| {
            format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: {ns}}}\nspec: {{nodeName: n}}\nstatus: {{podIP: 10.0.0.{n}, podIPs: [{{ip: 10.0.0.{n}}}, {{ip: 'fd00::{n}'}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\nspec: {{clusterIP: 10.96.0.{n}, clusterIPs: [10.96.0.{n}, 'fd00:96::{n}'], ipFamilies: [IPv4, IPv6], ports: [{{port: 80}}]}}\n")
        };
        let v6_only = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: q, namespace: a}\nspec: {nodeName: n}\nstatus: {podIP: 'fd00::9', podIPs: [{ip: 'fd00::9'}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: six, namespace: a}\nspec: {clusterIP: 'fd00:96::9', clusterIPs: ['fd00:96::9'], ipFamilies: [IPv6], ports: [{port: 80}]}\n";
        let yaml = format!("{MESH}{}{}{v6_only}", dual("a", 1), dual("d", 4));
        let state = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let me = WaypointRef {
            name: "wp-a".into(),
            namespace: "a".into(),
        };
        let t = |s: &str| s.parse::<SocketAddr>().unwrap();
        let bound = |s| check(&state, &me, t(s));
        for ok in [
            "10.96.0.1:80",
            "[fd00:96::1]:80",
            "10.0.0.1:8080",
            "[fd00::1]:8080",
            "[fd00:96::9]:80",
            "[fd00::9]:8080",
        ] {
            assert_eq!(bound(ok), Ok(()), "{ok}");
        }
        let e = bound("[fd00:96::4]:80").unwrap_err();
        assert!(e.to_string().contains("waypoint d/wp-d"), "{e}");
        assert!(matches!(
            bound("[fd00::4]:8080"),
            Err(Unbound::Workload { .. })
        ));
        assert!(matches!(
            bound("[fd00:96::1]:81"),
            Err(Unbound::NoSuchPort { .. })
        ));
        assert_eq!(
            bound("[fd00:96::99]:80"),
            Err(Unbound::Unknown(t("[fd00:96::99]:80")))
        );
    }
}
