//! `/config_dump`: upstream ztunnel's sections (`workloads`, `services`,
//! `policies`, `certificates`, `workloadState`, with the camelCase field
//! names upstream serializes) so `istioctl ztunnel-config` reads us, and our
//! own sections beside them (`node`, `config`, `mesh`, `pods`, `hbone_pool`,
//! `live_connections`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use identity::{describe_chain, rfc3339, Identity, SecretManager};
use mesh::authz::{Action, AuthorizationPolicy, Match, Scope, StringMatch};
use mesh::{MeshState, MeshStore, Service, TargetPort, TunnelProtocol, Workload};
use serde::Serialize;
use serde_json::{json, Value};

use crate::pods::Pods;
use crate::proxy::Proxy;

/// What the dump reads; all shared handles, so the closure the admin server
/// calls holds one of these.
pub struct Sources {
    pub node: String,
    pub cluster_id: String,
    pub store: Arc<MeshStore>,
    pub certs: Arc<SecretManager>,
    pub pods: Arc<Pods>,
    pub px: Arc<Proxy>,
}

/// The port a waypoint's HBONE listener takes mTLS on.
const HBONE_PORT: u16 = 15008;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayAddress {
    /// `<namespace>/<hostname>`: istioctl names the waypoint by finding the
    /// service with that namespace and hostname.
    destination: String,
    hbone_mtls_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadOut<'a> {
    uid: &'a str,
    workload_ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<GatewayAddress>,
    protocol: &'static str,
    name: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    workload_name: &'a str,
    workload_type: mesh::owner::WorkloadKind,
    canonical_name: &'a str,
    canonical_revision: &'a str,
    cluster_id: &'a str,
    trust_domain: &'a str,
    node: &'a str,
    /// The pod's readiness (WDS's status): an unready workload is kept,
    /// but no service lists it unless the service allows all.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    locality: Option<&'a mesh::locality::Locality>,
    hostname: &'a str,
    capacity: u32,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    authorization_policies: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointOut {
    workload_uid: String,
    service: String,
    address: String,
    /// Service port → the port on this endpoint (a named targetPort
    /// resolved against the pod's container ports).
    port: BTreeMap<u16, u16>,
    status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceOut<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: &'a str,
    /// `<network>/<ip>`; we run one network, whose name is empty.
    vips: Vec<String>,
    /// Service port → target port; 0 for a named target (per endpoint).
    ports: BTreeMap<u16, u16>,
    endpoints: BTreeMap<String, EndpointOut>,
    subject_alt_names: [&'static str; 0],
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<GatewayAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_families: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancer: Option<LoadBalancerOut>,
}

/// A service's balancing as upstream ztunnel names it in its dump.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancerOut {
    routing_preferences: Vec<&'static str>,
    mode: &'static str,
    health_policy: &'static str,
}

fn load_balancer(lb: &mesh::locality::LoadBalancing) -> LoadBalancerOut {
    use mesh::locality::{HealthPolicy, Mode, Scope};
    LoadBalancerOut {
        routing_preferences: lb
            .routing_preferences
            .iter()
            .map(|s| match s {
                Scope::Region => "Region",
                Scope::Zone => "Zone",
                Scope::Subzone => "Subzone",
                Scope::Node => "Node",
                Scope::Cluster => "Cluster",
                Scope::Network => "Network",
            })
            .collect(),
        mode: match lb.mode {
            Mode::Unspecified => "Standard",
            Mode::Strict => "Strict",
            Mode::Failover => "Failover",
            Mode::Passthrough => "Passthrough",
        },
        health_policy: match lb.health_policy {
            HealthPolicy::OnlyHealthy => "OnlyHealthy",
            HealthPolicy::AllowAll => "AllowAll",
        },
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertOut {
    pem: String,
    serial_number: String,
    valid_from: String,
    expiration_time: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertsOut {
    identity: String,
    /// `Available`, `Initializing`, or `Unavailable: <why>` (istioctl
    /// shortens the last to `Unavailable`).
    state: String,
    cert_chain: Vec<CertOut>,
    root_certs: Vec<CertOut>,
}

pub fn config_dump(s: &Sources) -> String {
    let state = s.store.load();
    let certificates = certificates(&s.certs);
    let pool: Vec<_> = s
        .px
        .pool
        .stats()
        .into_iter()
        .map(|(k, conns, streams)| json!({"source": k.source, "destination": k.dst.to_string(), "identity": k.dst_identity.to_string(), "connections": conns, "streams": streams}))
        .collect();
    serde_json::to_string_pretty(&json!({
        "workloads": workloads(&state, &s.cluster_id),
        "services": services(&state),
        "policies": state.policies.iter().map(|p| policy(p)).collect::<Vec<_>>(),
        "certificates": certificates,
        "workloadState": workload_state(s),
        "node": s.node,
        "config": s.store.status(),
        "mesh": &*state,
        "pods": s.pods.list(),
        "hbone_pool": pool,
        "live_connections": s.px.tasks.len(),
    }))
    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn waypoint_address(state: &MeshState, wp: &mesh::routes::WaypointRef) -> GatewayAddress {
    let hostname = state
        .waypoints
        .iter()
        .find(|w| w.name == wp.name && w.namespace == wp.namespace)
        .map(|w| w.hostname.clone())
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", wp.name, wp.namespace));
    GatewayAddress {
        destination: format!("{}/{hostname}", wp.namespace),
        hbone_mtls_port: HBONE_PORT,
    }
}

fn workload<'a>(state: &MeshState, w: &'a Workload, cluster_id: &'a str) -> WorkloadOut<'a> {
    WorkloadOut {
        uid: &w.uid,
        workload_ips: if w.ip.is_unspecified() {
            Vec::new()
        } else {
            w.addresses().map(|ip| ip.to_string()).collect()
        },
        waypoint: w.waypoint.as_ref().map(|wp| waypoint_address(state, wp)),
        protocol: match w.protocol {
            TunnelProtocol::Hbone => "HBONE",
            TunnelProtocol::None => "TCP",
        },
        name: &w.name,
        namespace: &w.namespace,
        service_account: &w.service_account,
        workload_name: &w.workload_name,
        workload_type: w.workload_kind,
        canonical_name: &w.canonical_name,
        canonical_revision: &w.canonical_revision,
        cluster_id: w.cluster_id.as_deref().unwrap_or(cluster_id),
        trust_domain: &w.trust_domain,
        node: &w.node,
        status: health(w),
        locality: w.locality.as_deref(),
        hostname: w.hostname.as_deref().unwrap_or(""),
        capacity: 1,
        authorization_policies: &w.authorization_policies,
    }
}

fn health(w: &Workload) -> &'static str {
    if w.healthy {
        "Healthy"
    } else {
        "Unhealthy"
    }
}

fn workloads(state: &MeshState, cluster_id: &str) -> Vec<Value> {
    state
        .workloads
        .values()
        .chain(state.unaddressed.iter())
        .map(|w| serde_json::to_value(workload(state, w, cluster_id)).unwrap_or_default())
        .collect()
}

fn net_addr(ip: IpAddr) -> String {
    format!("/{ip}")
}

fn service<'a>(state: &MeshState, svc: &'a Service) -> ServiceOut<'a> {
    let ports = svc
        .ports
        .iter()
        .map(|p| match p.target {
            TargetPort::Number(n) => (p.port, n),
            TargetPort::Named(_) => (p.port, 0),
        })
        .collect();
    let key = format!("{}/{}", svc.namespace, svc.hostname);
    let endpoints = svc
        .endpoints
        .iter()
        .map(|e| {
            let pod = state.workloads.get(&e.workload_uid);
            let port = svc
                .ports
                .iter()
                .filter_map(|p| match &p.target {
                    TargetPort::Number(n) => Some((p.port, *n)),
                    TargetPort::Named(name) => pod
                        .and_then(|w| w.named_ports.get(name))
                        .map(|n| (p.port, *n)),
                })
                .collect();
            let out = EndpointOut {
                workload_uid: e.workload_uid.clone(),
                service: key.clone(),
                address: net_addr(e.ip),
                port,
                status: pod.map_or("Healthy", |w| health(w)),
            };
            (format!("{}:{}", e.workload_uid, out.address), out)
        })
        .collect();
    let (v4, v6) = (
        svc.vips.iter().any(IpAddr::is_ipv4),
        svc.vips.iter().any(IpAddr::is_ipv6),
    );
    ServiceOut {
        name: &svc.name,
        namespace: &svc.namespace,
        hostname: &svc.hostname,
        vips: svc.vips.iter().map(|ip| net_addr(*ip)).collect(),
        ports,
        endpoints,
        subject_alt_names: [],
        waypoint: svc.waypoint.as_ref().map(|wp| waypoint_address(state, wp)),
        // From the VIPs; a headless service's from what its source said.
        ip_families: match (v4, v6, svc.ip_families) {
            (true, true, _) => Some("Dual"),
            (true, false, _) | (false, false, mesh::model::IpFamilies::V4Only) => Some("IPv4"),
            (false, true, _) | (false, false, mesh::model::IpFamilies::V6Only) => Some("IPv6"),
            (false, false, mesh::model::IpFamilies::Any) => None,
        },
        load_balancer: svc.load_balancing.as_ref().map(load_balancer),
    }
}

fn services(state: &MeshState) -> Vec<Value> {
    state
        .services
        .values()
        .map(|svc| serde_json::to_value(service(state, svc)).unwrap_or_default())
        .collect()
}

/// Upstream's `StringMatch` as serde writes an externally tagged enum.
fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({"Exact": s}),
        StringMatch::Prefix(s) => json!({"Prefix": s}),
        StringMatch::Suffix(s) => json!({"Suffix": s}),
        StringMatch::Presence => json!({"Presence": []}),
    }
}

/// A match with upstream's names; empty fields left out as upstream does.
fn rbac_match(m: &Match) -> Value {
    let mut o = serde_json::Map::new();
    let mut strings = |key: &str, v: &[StringMatch]| {
        if !v.is_empty() {
            o.insert(key.into(), v.iter().map(string_match).collect());
        }
    };
    strings("namespaces", &m.namespaces);
    strings("notNamespaces", &m.not_namespaces);
    strings("principals", &m.principals);
    strings("notPrincipals", &m.not_principals);
    let nets = [
        ("sourceIps", &m.source_ips),
        ("notSourceIps", &m.not_source_ips),
        ("destinationIps", &m.destination_ips),
        ("notDestinationIps", &m.not_destination_ips),
    ];
    for (key, v) in nets {
        if !v.is_empty() {
            o.insert(key.into(), v.iter().map(|n| n.to_string()).collect());
        }
    }
    for (key, v) in [
        ("destinationPorts", &m.destination_ports),
        ("notDestinationPorts", &m.not_destination_ports),
    ] {
        if !v.is_empty() {
            o.insert(key.into(), json!(v));
        }
    }
    Value::Object(o)
}

/// Upstream's `Authorization`: rules OR-ed, a rule's clauses AND-ed, a
/// clause's matches OR-ed.
fn policy(p: &AuthorizationPolicy) -> Value {
    let rules: Vec<Vec<Vec<Value>>> = p
        .rules
        .iter()
        .map(|r| {
            let mut clauses: Vec<Vec<Value>> = r
                .clauses
                .iter()
                .map(|c| c.matches.iter().map(rbac_match).collect())
                .collect();
            // An ALLOW (or AUDIT) rule with fields we cannot evaluate
            // matches nothing: an empty clause says so in upstream's terms
            // (no match in it can hold). A DENY rule matches on the rest.
            if !r.unevaluable.is_empty() && p.action != Action::Deny {
                clauses.push(Vec::new());
            }
            clauses
        })
        .collect();
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": match p.scope {
            Scope::Global => "Global",
            Scope::Namespace => "Namespace",
            // istiod resolves selectors into per-workload lists: still a
            // workload-selector policy as Istio names it.
            Scope::WorkloadSelector(_) | Scope::Listed => "WorkloadSelector",
        },
        "action": match p.action {
            Action::Allow => "Allow",
            Action::Deny => "Deny",
            Action::Audit => "Audit",
            Action::Custom => "Custom",
        },
        "rules": rules,
        "dryRun": p.dry_run,
    })
}

fn certificates(certs: &SecretManager) -> Vec<CertsOut> {
    let out = |d: identity::CertDetails| CertOut {
        pem: d.pem,
        serial_number: d.serial,
        valid_from: rfc3339(d.not_before),
        expiration_time: rfc3339(d.not_after),
    };
    certs
        .snapshot()
        .into_iter()
        .map(|c| match c {
            Ok(c) => match describe_chain(&c.chain_pem) {
                Ok(mut chain) => {
                    // The CA's chain ends with its root: upstream lists roots apart.
                    let root = chain.pop();
                    CertsOut {
                        identity: c.identity.to_string(),
                        state: "Available".into(),
                        cert_chain: chain.into_iter().map(out).collect(),
                        root_certs: root.into_iter().map(out).collect(),
                    }
                }
                Err(e) => CertsOut {
                    identity: c.identity.to_string(),
                    state: format!("Available (chain unreadable: {e})"),
                    cert_chain: Vec::new(),
                    root_certs: Vec::new(),
                },
            },
            Err((id, why)) => CertsOut {
                identity: id.to_string(),
                state: if why == "pending" {
                    "Initializing".into()
                } else {
                    format!("Unavailable: {why}")
                },
                cert_chain: Vec::new(),
                root_certs: Vec::new(),
            },
        })
        .collect()
}

/// The pods handed to us over ZDS, by uid, with their live inbound
/// connections. Outbound connections are not tracked per pod: listed empty.
fn workload_state(s: &Sources) -> BTreeMap<String, Value> {
    let mut inbound: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    s.px.live.for_each(|c| {
        inbound.entry(c.pod.uid.clone()).or_default().push(json!({
            "src": c.peer.to_string(),
            "originalDst": c.target.to_string(),
            "actualDst": c.target.to_string(),
            "protocol": if c.src.is_some() { "HBONE" } else { "TCP" },
        }))
    });
    s.pods
        .list()
        .into_iter()
        .map(|p| {
            let id: Option<Identity> = p.identity.parse().ok();
            let v = json!({
                "state": "Up",
                "connections": {
                    "inbound": inbound.remove(&p.uid).unwrap_or_default(),
                    "outbound": [],
                },
                "info": {
                    "name": p.name,
                    "namespace": p.namespace,
                    "trustDomain": id.as_ref().map(|i| i.trust_domain.as_str()).unwrap_or_default(),
                    "serviceAccount": id.as_ref().map(|i| i.service_account.as_str()).unwrap_or_default(),
                },
            });
            (p.uid, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: za}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-5d9c7b-x2x7q, namespace: app, labels: {app: web, pod-template-hash: 5d9c7b, service.istio.io/canonical-revision: v2}}
spec: {serviceAccountName: web, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec:
  clusterIP: 10.96.0.10
  trafficDistribution: PreferClose
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: app}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/app/sa/client], notNamespaces: [\"kube-*\"]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

    fn state() -> MeshState {
        mesh::standalone::parse(YAML, "cluster.local").unwrap()
    }

    #[test]
    fn workloads_carry_upstream_names_and_the_deployment() {
        let st = state();
        let w = workloads(&st, "Kubernetes");
        assert_eq!(w.len(), 1, "{w:?}");
        let w = &w[0];
        assert_eq!(w["name"], "web-5d9c7b-x2x7q");
        assert_eq!(w["workloadName"], "web");
        assert_eq!(w["workloadType"], "deployment");
        assert_eq!(w["workloadIps"], json!(["10.244.1.10"]));
        assert_eq!(w["serviceAccount"], "web");
        assert_eq!(w["canonicalName"], "web");
        assert_eq!(w["canonicalRevision"], "v2");
        assert_eq!(w["protocol"], "HBONE");
        assert_eq!(w["node"], "node1");
        assert_eq!(w["clusterId"], "Kubernetes");
        assert_eq!(w["trustDomain"], "cluster.local");
        assert_eq!(w["status"], "Healthy");
        assert_eq!(
            w["locality"],
            json!({"region": "r1", "zone": "za", "subzone": ""})
        );
    }

    #[test]
    fn services_list_vips_ports_and_endpoints_by_workload() {
        let st = state();
        let uid = st.workloads.keys().next().unwrap().clone();
        let s = services(&st);
        assert_eq!(s.len(), 1, "{s:?}");
        let s = &s[0];
        assert_eq!(s["hostname"], "web.app.svc.cluster.local");
        assert_eq!(s["vips"], json!(["/10.96.0.10"]));
        assert_eq!(s["ports"], json!({"80": 8080}));
        assert_eq!(s["ipFamilies"], "IPv4");
        let ep = &s["endpoints"][format!("{uid}:/10.244.1.10")];
        assert_eq!(ep["workloadUid"], uid.as_str());
        assert_eq!(ep["service"], "app/web.app.svc.cluster.local");
        assert_eq!(ep["port"], json!({"80": 8080}));
        assert_eq!(
            s["loadBalancer"],
            json!({
                "routingPreferences": ["Network", "Region", "Zone"],
                "mode": "Failover",
                "healthPolicy": "OnlyHealthy",
            })
        );
    }

    /// Dual-stack: every address of a workload, the families of a
    /// service from its VIPs, a headless one's from its ipFamilies.
    #[test]
    fn dual_stack_addresses_and_families() {
        let yaml = YAML
            .replace(
                "status: {podIP: 10.244.1.10}",
                "status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: 'fd00::10'}]}",
            )
            .replace(
                "  clusterIP: 10.96.0.10\n",
                "  clusterIPs: [10.96.0.10, 'fd00:96::10']\n",
            )
            + "---\napiVersion: v1\nkind: Service\nmetadata: {name: hl, namespace: app}\nspec:\n  clusterIP: None\n  ipFamilies: [IPv6]\n  selector: {app: web}\n  ports: [{port: 80}]\n";
        let st = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let w = workloads(&st, "Kubernetes");
        assert_eq!(w[0]["workloadIps"], json!(["10.244.1.10", "fd00::10"]));
        let s = services(&st);
        let family = |host: &str| {
            s.iter()
                .find(|x| x["hostname"] == host)
                .map(|x| x["ipFamilies"].clone())
        };
        assert_eq!(family("web.app.svc.cluster.local"), Some(json!("Dual")));
        assert_eq!(family("hl.app.svc.cluster.local"), Some(json!("IPv6")));
    }

    #[test]
    fn policies_are_upstream_authorizations() {
        let st = state();
        let p = policy(&st.policies[0]);
        assert_eq!(p["name"], "only-client");
        assert_eq!(p["namespace"], "app");
        assert_eq!(p["scope"], "Namespace");
        assert_eq!(p["action"], "Allow");
        let rule = &p["rules"][0];
        let all = rule.to_string();
        assert!(
            all.contains(r#"{"Exact":"cluster.local/ns/app/sa/client"}"#),
            "{all}"
        );
        assert!(
            all.contains(r#""notNamespaces":[{"Prefix":"kube-"}]"#),
            "{all}"
        );
        assert!(all.contains(r#""destinationPorts":[8080]"#), "{all}");
    }
}
