//! The standalone config file: multi-document YAML of Kubernetes-style objects
//! (the shapes users write in a cluster), translated into a `MeshState`.
//! Every error names the object and the field at fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::authz::{
    Action, AuthorizationPolicy, Clause, L7Match, Match, Rule, Scope, StringMatch, TargetRef,
    TargetedPolicy,
};
use crate::model::*;
use crate::routes::{WaypointRef, USE_WAYPOINT_LABEL, USE_WAYPOINT_NS_LABEL};
use crate::{DATAPLANE_MODE_LABEL, ROOT_NAMESPACE};

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

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthzSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_refs: Vec<serde_yaml::Value>,
    #[serde(default)]
    target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Vec<AuthzRule>,
    #[serde(default)]
    provider: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuthzRule {
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    to: Vec<To>,
    #[serde(default)]
    when: Vec<Condition>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct From {
    source: Source,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Source {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct To {
    operation: Operation,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Operation {
    #[serde(default)]
    ports: Vec<IntOrString>,
    #[serde(default)]
    not_ports: Vec<IntOrString>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: BTreeMap<u16, MtlsSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    #[serde(default)]
    mode: Option<String>,
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
                match authz(&object, value)? {
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
                peer_auths.push(peer_auth(&object, value)?)
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
            Some(sel) if !sel.is_empty() => workloads
                .iter()
                .filter(|w| {
                    w.namespace == namespace && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
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

fn nets(object: &str, field: String, v: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        object,
                        format!("{field}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR"),
                    )
                })
        })
        .collect()
}

fn ports(object: &str, field: String, v: &[IntOrString]) -> Result<Vec<u16>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, p)| match p {
            IntOrString::Int(n) => Ok(*n),
            IntOrString::Str(s) => s.parse().map_err(|_| {
                err(
                    object,
                    format!("{field}[{i}]"),
                    format!("{s:?} is not a port number"),
                )
            }),
        })
        .collect()
}

fn strs(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

/// Translates an AuthorizationPolicy for ztunnel. Policies attached with
/// targetRefs belong to a waypoint and are not ztunnel's (None). L7-only
/// attributes cannot be checked at L4, so, as Istio does, an ALLOW rule using
/// them matches nothing (fail closed) and a DENY rule ignores them (denies more).
fn authz(object: &str, value: serde_yaml::Value) -> Result<ParsedPolicy, ConfigError> {
    let o: Object<AuthzSpec> = typed(object, value)?;
    let namespace = o
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = o.spec.unwrap_or_default();
    let mut targets = Vec::new();
    for (i, t) in spec
        .target_refs
        .iter()
        .chain(spec.target_ref.iter())
        .enumerate()
    {
        let field = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let (kind, name) = (field("kind"), field("name"));
        if !matches!(kind.as_str(), "Gateway" | "Service") || name.is_empty() {
            return Err(err(
                object,
                format!("spec.targetRefs[{i}]"),
                "a waypoint policy targets a Gateway or a Service by name",
            ));
        }
        targets.push(TargetRef { kind, name });
    }
    let for_waypoint = !targets.is_empty();
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" if for_waypoint => Action::Audit,
        other => {
            return Err(err(
                object,
                "spec.action",
                format!(
                    "{other:?} is not supported {}",
                    if for_waypoint {
                        "(ALLOW, DENY or AUDIT)"
                    } else {
                        "by ztunnel (ALLOW or DENY; AUDIT needs targetRefs to a waypoint)"
                    }
                ),
            ))
        }
    };
    if spec.provider.is_some() {
        return Err(err(
            object,
            "spec.provider",
            "CUSTOM providers are not supported",
        ));
    }
    let scope = match (&spec.selector, namespace.as_str()) {
        (Some(sel), _) if !sel.match_labels.is_empty() => {
            Scope::WorkloadSelector(sel.match_labels.clone())
        }
        (_, ROOT_NAMESPACE) => Scope::Global,
        _ => Scope::Namespace,
    };
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().enumerate() {
        let mut l7 = Vec::new();
        let mut rule = Rule::default();
        if !r.from.is_empty() {
            let mut clause = Clause::default();
            for (fi, f) in r.from.iter().enumerate() {
                let s = &f.source;
                let base = format!("spec.rules[{ri}].from[{fi}].source");
                if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                    if for_waypoint {
                        return Err(err(object, format!("{base}.requestPrincipals"), "request principals need RequestAuthentication (JWT), which is not supported"));
                    }
                    l7.push(format!("{base}.requestPrincipals"));
                }
                let mut src = nets(object, format!("{base}.ipBlocks"), &s.ip_blocks)?;
                src.extend(nets(
                    object,
                    format!("{base}.remoteIpBlocks"),
                    &s.remote_ip_blocks,
                )?);
                let mut not_src = nets(object, format!("{base}.notIpBlocks"), &s.not_ip_blocks)?;
                not_src.extend(nets(
                    object,
                    format!("{base}.notRemoteIpBlocks"),
                    &s.not_remote_ip_blocks,
                )?);
                clause.matches.push(Match {
                    principals: strs(&s.principals),
                    not_principals: strs(&s.not_principals),
                    namespaces: strs(&s.namespaces),
                    not_namespaces: strs(&s.not_namespaces),
                    source_ips: src,
                    not_source_ips: not_src,
                    ..Default::default()
                });
            }
            rule.clauses.push(clause);
        }
        if !r.to.is_empty() {
            let mut clause = Clause::default();
            for (ti, t) in r.to.iter().enumerate() {
                let op = &t.operation;
                let base = format!("spec.rules[{ri}].to[{ti}].operation");
                for (name, v) in [
                    ("hosts", &op.hosts),
                    ("notHosts", &op.not_hosts),
                    ("methods", &op.methods),
                    ("notMethods", &op.not_methods),
                    ("paths", &op.paths),
                    ("notPaths", &op.not_paths),
                ] {
                    if !v.is_empty() {
                        l7.push(format!("{base}.{name}"));
                    }
                }
                clause.matches.push(Match {
                    destination_ports: ports(object, format!("{base}.ports"), &op.ports)?,
                    not_destination_ports: ports(
                        object,
                        format!("{base}.notPorts"),
                        &op.not_ports,
                    )?,
                    l7: L7Match {
                        methods: strs(&op.methods),
                        not_methods: strs(&op.not_methods),
                        paths: strs(&op.paths),
                        not_paths: strs(&op.not_paths),
                        hosts: op
                            .hosts
                            .iter()
                            .map(|h| StringMatch::parse(&h.to_ascii_lowercase()))
                            .collect(),
                        not_hosts: op
                            .not_hosts
                            .iter()
                            .map(|h| StringMatch::parse(&h.to_ascii_lowercase()))
                            .collect(),
                        headers: vec![],
                    },
                    ..Default::default()
                });
            }
            rule.clauses.push(clause);
        }
        for (ci, c) in r.when.iter().enumerate() {
            let base = format!("spec.rules[{ri}].when[{ci}]");
            match condition(object, &base, c)? {
                Some(m) => {
                    if !m.l7.is_empty() {
                        l7.push(format!("{base} ({})", c.key));
                    }
                    rule.clauses.push(Clause { matches: vec![m] })
                }
                None if for_waypoint => {
                    return Err(err(
                        object,
                        format!("{base}.key"),
                        format!("{:?} is not supported by the waypoint", c.key),
                    ))
                }
                None => l7.push(format!("{base} ({})", c.key)),
            }
        }
        if !l7.is_empty() && !for_waypoint {
            tracing::warn!(object, fields = ?l7, action = ?action, "L7 attributes cannot be enforced by ztunnel; {}", if action == Action::Allow { "this ALLOW rule will match nothing" } else { "this DENY rule ignores them and denies more" });
        }
        rules.push(rule);
    }
    let policy = AuthorizationPolicy {
        name: o.metadata.name,
        namespace,
        scope,
        action,
        rules,
        dry_run: false,
    };
    Ok(if for_waypoint {
        ParsedPolicy::Waypoint(TargetedPolicy { targets, policy })
    } else {
        ParsedPolicy::Ztunnel(policy.l4_only())
    })
}

enum ParsedPolicy {
    Ztunnel(AuthorizationPolicy),
    Waypoint(TargetedPolicy),
}

fn condition(object: &str, base: &str, c: &Condition) -> Result<Option<Match>, ConfigError> {
    let mut m = Match::default();
    let (vals, nots) = (&c.values, &c.not_values);
    match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            m.source_ips = nets(object, format!("{base}.values"), vals)?;
            m.not_source_ips = nets(object, format!("{base}.notValues"), nots)?;
        }
        "destination.ip" => {
            m.destination_ips = nets(object, format!("{base}.values"), vals)?;
            m.not_destination_ips = nets(object, format!("{base}.notValues"), nots)?;
        }
        "destination.port" => {
            let to_ports = |v: &Vec<String>| {
                v.iter()
                    .map(|s| IntOrString::Str(s.clone()))
                    .collect::<Vec<_>>()
            };
            m.destination_ports = ports(object, format!("{base}.values"), &to_ports(vals))?;
            m.not_destination_ports = ports(object, format!("{base}.notValues"), &to_ports(nots))?;
        }
        "source.namespace" => {
            m.namespaces = strs(vals);
            m.not_namespaces = strs(nots);
        }
        "source.principal" => {
            m.principals = strs(vals);
            m.not_principals = strs(nots);
        }
        key if key.starts_with("request.headers[") && key.ends_with(']') => {
            let name = key["request.headers[".len()..key.len() - 1].to_ascii_lowercase();
            m.l7.headers.push((name, strs(vals), strs(nots)));
        }
        _ => return Ok(None),
    }
    Ok(Some(m))
}

fn peer_auth(object: &str, value: serde_yaml::Value) -> Result<PeerAuthentication, ConfigError> {
    let o: Object<PeerAuthSpec> = typed(object, value)?;
    let spec = o.spec.unwrap_or_default();
    let mode = |field: String, m: &Option<MtlsSpec>| -> Result<MtlsMode, ConfigError> {
        match m
            .as_ref()
            .and_then(|m| m.mode.as_deref())
            .unwrap_or("UNSET")
        {
            "UNSET" => Ok(MtlsMode::Unset),
            "DISABLE" => Ok(MtlsMode::Disable),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            other => Err(err(
                object,
                field,
                format!("{other:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"),
            )),
        }
    };
    let selector = spec
        .selector
        .map(|s| s.match_labels)
        .filter(|l| !l.is_empty());
    if selector.is_none() && !spec.port_level_mtls.is_empty() {
        return Err(err(
            object,
            "spec.portLevelMtls",
            "requires a workload selector",
        ));
    }
    let mut port_level = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        port_level.insert(
            *port,
            mode(
                format!("spec.portLevelMtls.{port}.mode"),
                &Some(MtlsSpec {
                    mode: m.mode.clone(),
                }),
            )?,
        );
    }
    Ok(PeerAuthentication {
        name: o.metadata.name,
        namespace: o.metadata.namespace.unwrap_or_else(|| "default".into()),
        mode: mode("spec.mtls.mode".into(), &spec.mtls)?,
        selector,
        port_level,
    })
}
