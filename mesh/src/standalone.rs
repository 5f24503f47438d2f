//! The standalone config file: multi-document YAML of Kubernetes-style objects
//! (the shapes users write in a cluster), translated into a `MeshState`.
//! Every error names the object and the field at fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::model::*;
use crate::routes::{WaypointRef, USE_WAYPOINT_LABEL, USE_WAYPOINT_NS_LABEL};
use crate::security::{self, ParsedPolicy};
use crate::DATAPLANE_MODE_LABEL;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// e.g. `Pod default/client`, or `document 3` before the kind is known.
    pub object: String,
    /// The field path, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err(
    object: &str,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError {
        object: object.to_string(),
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Deserialize, Default)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Object<S, T = serde::de::IgnoredAny> {
    metadata: Meta,
    #[serde(default = "Option::default")]
    spec: Option<S>,
    #[serde(default = "Option::default")]
    status: Option<T>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    node_name: String,
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Deserialize, Default)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    /// Empty while the pod is scheduled but not yet networked (the CNI ADD
    /// is what gives it an address).
    #[serde(rename = "podIP", default)]
    pod_ip: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "clusterIP")]
    cluster_ip: String,
    ports: Vec<SvcPort>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SvcPort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<IntOrString>,
    #[serde(default)]
    protocol: Option<String>,
}

struct Pod {
    object: String,
    meta: Meta,
    namespace: String,
    spec: PodSpec,
    ip: Option<IpAddr>,
}

/// Deserialize `value` as `T`, reporting the failing field path.
pub(crate) fn typed<T: DeserializeOwned>(
    object: &str,
    value: serde_yaml::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        err(
            object,
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

pub fn parse(text: &str, trust_domain: &str) -> Result<MeshState, ConfigError> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let docname = format!("document {}", i + 1);
        docs.push(
            serde_yaml::Value::deserialize(doc)
                .map_err(|e| err(&docname, "", format!("YAML: {e}")))?,
        );
    }
    parse_values(docs, trust_domain)
}

/// The translation itself, over already-decoded objects: the standalone file
/// and the Kubernetes API source both come through here, so a file and a
/// live cluster behave alike.
pub fn parse_values(
    docs: impl IntoIterator<Item = serde_yaml::Value>,
    trust_domain: &str,
) -> Result<MeshState, ConfigError> {
    let mut namespaces: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut pods = Vec::new();
    let mut services = Vec::new();
    let mut policies = Vec::new();
    let mut peer_auths = Vec::new();
    let mut service_entries = Vec::new();
    let mut waypoint_policies = Vec::new();
    let mut waypoints = Vec::new();
    let mut http_routes = Vec::new();
    let mut destination_rules = Vec::new();
    let mut seen = HashMap::new();
    let mut rejected = Vec::new();

    for (i, value) in docs.into_iter().enumerate() {
        let docname = format!("document {}", i + 1);
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let kind = field("kind").ok_or_else(|| err(&docname, "kind", "missing"))?;
        let api = field("apiVersion").ok_or_else(|| err(&docname, "apiVersion", "missing"))?;
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let ns = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let object = if kind == "Namespace" {
            format!("Namespace {name}")
        } else {
            format!("{kind} {ns}/{name}")
        };
        if name.is_empty() {
            return Err(err(&object, "metadata.name", "missing"));
        }
        if seen.insert(object.clone(), ()).is_some() {
            return Err(err(&object, "metadata.name", "defined twice"));
        }
        match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                let o: Object<serde::de::IgnoredAny> = typed(&object, value)?;
                namespaces.insert(o.metadata.name, o.metadata.labels);
            }
            ("v1", "Pod") => pods.push(pod(&object, value)?),
            ("v1", "Service") => services.push((object.clone(), typed::<Object<ServiceSpec>>(&object, value)?)),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                match security::authorization_policy(value, &mut rejected) {
                    ParsedPolicy::Ztunnel(p) => policies.push(p),
                    ParsedPolicy::Waypoint(p) => waypoint_policies.push(p),
                }
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
                waypoints.extend(crate::routes::gateway(&object, value)?)
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                http_routes.push(crate::routes::http_route(&object, value)?)
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2", "GRPCRoute") => {
                http_routes.push(crate::routes::grpc_route(&object, value)?)
            }
            ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "VirtualService") => {
                http_routes.push(crate::routes::virtual_service(&object, value)?)
            }
            ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "DestinationRule") => {
                destination_rules.push(crate::routes::destination_rule(&object, value)?)
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                peer_auths.push(security::peer_authentication(value, &mut rejected))
            }
            ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "ServiceEntry") => {
                service_entries.push(crate::service_entry::parse(&object, value)?)
            }
            (api, kind) => {
                return Err(err(&object, "kind", format!("unsupported kind {kind} (apiVersion {api}); supported: v1 Namespace/Pod/Service, security.istio.io/v1 AuthorizationPolicy/PeerAuthentication, networking.istio.io/v1 ServiceEntry/VirtualService/DestinationRule, gateway.networking.k8s.io/v1 Gateway/HTTPRoute/GRPCRoute")))
            }
        }
    }

    let mut ips: HashMap<IpAddr, String> = HashMap::new();
    let mut workloads = Vec::new();
    let mut unaddressed = Vec::new();
    for p in pods {
        if let Some(ip) = p.ip {
            if let Some(other) = ips.insert(ip, p.object.clone()) {
                return Err(err(
                    &p.object,
                    "status.podIP",
                    format!("{ip} is already used by {other}"),
                ));
            }
        }
        let ns_labels = namespaces.get(&p.namespace);
        let in_mesh = match p.meta.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some("ambient") => true,
            Some("none") => false,
            _ => ns_labels
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|m| m == "ambient"),
        };
        let waypoint = waypoint_ref(&p.meta.labels, ns_labels, &p.namespace);
        let label = |keys: &[&str]| keys.iter().find_map(|k| p.meta.labels.get(*k).cloned());
        let list = if p.ip.is_some() {
            &mut workloads
        } else {
            &mut unaddressed
        };
        list.push(Workload {
            uid: p
                .meta
                .uid
                .clone()
                .unwrap_or_else(|| format!("{}/{}", p.namespace, p.meta.name)),
            canonical_name: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| p.meta.name.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            authorization_policies: Vec::new(),
            name: p.meta.name,
            namespace: p.namespace,
            service_account: p
                .spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            trust_domain: trust_domain.to_string(),
            node: p.spec.node_name,
            ip: p.ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            labels: p.meta.labels,
            annotations: p.meta.annotations,
            waypoint,
            named_ports: p
                .spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .filter_map(|cp| Some((cp.name.clone()?, cp.container_port)))
                .collect(),
            protocol: if in_mesh {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            },
        });
    }

    // Pods by namespace: a selector only looks at its own namespace's pods
    // (scanning every pod for every service was quadratic in the mesh).
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        by_namespace
            .entry(w.namespace.as_str())
            .or_default()
            .push(i);
    }
    let mut out_services = Vec::new();
    for (object, o) in services {
        let spec = o.spec.ok_or_else(|| err(&object, "spec", "missing"))?;
        let namespace = o.metadata.namespace.unwrap_or_else(|| "default".into());
        let mut vips = Vec::new();
        if spec.cluster_ip != "None" {
            let vip: IpAddr = spec.cluster_ip.parse().map_err(|e| {
                err(
                    &object,
                    "spec.clusterIP",
                    format!("{:?}: {e}", spec.cluster_ip),
                )
            })?;
            if let Some(other) = ips.insert(vip, object.clone()) {
                return Err(err(
                    &object,
                    "spec.clusterIP",
                    format!("{vip} is already used by {other}"),
                ));
            }
            vips.push(vip);
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.into_iter().enumerate() {
            if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
                tracing::warn!(
                    object,
                    port = p.port,
                    "only TCP service ports are proxied; ignoring this one"
                );
                continue;
            }
            let target = match p.target_port {
                None => TargetPort::Number(p.port),
                Some(IntOrString::Int(n)) => TargetPort::Number(n),
                Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) if !s.is_empty() => TargetPort::Named(s),
                    Err(_) => {
                        return Err(err(&object, format!("spec.ports[{i}].targetPort"), "empty"))
                    }
                },
            };
            ports.push(ServicePort {
                name: p.name,
                port: p.port,
                target,
            });
        }
        let endpoints = match &spec.selector {
            Some(sel) if !sel.is_empty() => by_namespace
                .get(namespace.as_str())
                .into_iter()
                .flatten()
                .map(|i| &workloads[*i])
                .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .map(|w| Endpoint {
                    workload_uid: w.uid.clone(),
                    ip: w.ip,
                })
                .collect(),
            _ => Vec::new(),
        };
        let waypoint = waypoint_ref(&o.metadata.labels, namespaces.get(&namespace), &namespace);
        out_services.push(Service {
            waypoint,
            hostname: format!(
                "{}.{}.svc.{}",
                o.metadata.name,
                namespace,
                crate::CLUSTER_DOMAIN
            ),
            name: o.metadata.name,
            namespace,
            vips,
            ports,
            endpoints,
        });
    }
    let mut state = MeshState::new(workloads, out_services, policies, peer_auths);
    state.namespace_labels = namespaces.into_iter().collect();
    state.unaddressed = unaddressed.into_iter().map(std::sync::Arc::new).collect();
    state.service_entries = service_entries;
    state.waypoint_policies = waypoint_policies;
    state.waypoints = waypoints;
    state.http_routes = http_routes;
    state.destination_rules = destination_rules;
    state.rejected = rejected;
    Ok(state)
}

/// `istio.io/use-waypoint` on the object, else on its namespace; `none` on
/// the object opts out of a namespace's waypoint.
fn waypoint_ref(
    labels: &BTreeMap<String, String>,
    ns_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
) -> Option<WaypointRef> {
    let own = labels
        .get(USE_WAYPOINT_LABEL)
        .map(|n| (n, labels.get(USE_WAYPOINT_NS_LABEL)));
    let (name, ns) = own.or_else(|| {
        let l = ns_labels?;
        Some((l.get(USE_WAYPOINT_LABEL)?, l.get(USE_WAYPOINT_NS_LABEL)))
    })?;
    (name != "none").then(|| WaypointRef {
        name: name.clone(),
        namespace: ns.cloned().unwrap_or_else(|| namespace.to_string()),
    })
}

fn pod(object: &str, value: serde_yaml::Value) -> Result<Pod, ConfigError> {
    let o: Object<PodSpec, PodStatus> = typed(object, value)?;
    let spec = o
        .spec
        .ok_or_else(|| err(object, "spec", "missing (needs spec.nodeName)"))?;
    let status = o
        .status
        .ok_or_else(|| err(object, "status", "missing (needs status.podIP)"))?;
    let ip = match status.pod_ip.as_str() {
        "" => None,
        s => Some(
            s.parse::<IpAddr>()
                .map_err(|e| err(object, "status.podIP", format!("{s:?}: {e}")))?,
        ),
    };
    if spec.node_name.is_empty() {
        return Err(err(object, "spec.nodeName", "empty"));
    }
    let namespace = o
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    Ok(Pod {
        object: object.to_string(),
        meta: o.metadata,
        namespace,
        spec,
        ip,
    })
}
