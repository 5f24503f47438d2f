//! The standalone config file: multi-document YAML of Kubernetes-style objects
//! (the shapes users write in a cluster), translated into a `MeshState`.
//! Every error names the object and the field at fault.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use std::sync::Arc;

use crate::model::*;
use crate::objects::{Kind, ObjectKey, PodDecl, ServiceDecl, Translated};
use crate::routes::{WaypointRef, USE_WAYPOINT_LABEL, USE_WAYPOINT_NS_LABEL};
use crate::security::{self, ParsedPolicy};

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

/// Name and namespace are read before the kind is known (the object's key).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    owner_references: Vec<OwnerReference>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
    #[serde(default)]
    controller: Option<bool>,
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
    /// Both families' addresses on a dual-stack pod, `podIP` first.
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<crate::families::PodIp>,
    #[serde(default)]
    conditions: Vec<PodCondition>,
}

#[derive(Deserialize)]
struct PodCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    families: crate::families::ServiceFamilies,
    ports: Vec<SvcPort>,
    #[serde(default)]
    traffic_distribution: Option<String>,
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    #[serde(default)]
    publish_not_ready_addresses: bool,
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

/// The whole file as one state: every object translated alone, then
/// checked as a set (no object twice, no address twice), then derived. A
/// file with any error is refused whole, naming the object and field.
pub fn parse(text: &str, trust_domain: &str) -> Result<MeshState, ConfigError> {
    crate::file::FileSource::new(std::path::Path::new(""), trust_domain).apply(text)
}

/// One YAML document of the file, as text: unchanged text need not be
/// parsed again.
pub(crate) struct Doc<'a> {
    pub index: usize,
    pub text: &'a str,
}

/// The documents of a multi-document YAML text. A line that starts with
/// `---` (alone or followed by a space) always begins a new document in
/// YAML, even inside a block scalar, so splitting on it is exact; what
/// follows the marker on its line belongs to the new document.
pub(crate) fn split(text: &str) -> impl Iterator<Item = Doc<'_>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push(&text[start..at]);
            start = at + 3;
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    // A file may open with `---`: the empty text before it is no document.
    let skip_first = docs.first().is_some_and(|d| d.trim().is_empty()) && docs.len() > 1;
    docs.into_iter()
        .skip(skip_first as usize)
        .enumerate()
        .map(|(index, text)| Doc { index, text })
}

/// Parses and translates one document; `Ok(None)` for an empty one.
pub(crate) fn translate_doc(index: usize, text: &str) -> Result<Option<Translated>, ConfigError> {
    let docname = format!("document {}", index + 1);
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| err(&docname, "", format!("YAML: {e}")))?;
    translate(value, &docname)
}

/// Translates one object alone: what it says, before what other objects
/// (its namespace, the pods a Service selects) make of it. `Ok(None)` for an
/// empty document. Security objects never fail here: what cannot be
/// evaluated fails closed and is reported in `rejected`.
pub fn translate(
    value: serde_yaml::Value,
    docname: &str,
) -> Result<Option<Translated>, ConfigError> {
    if value.is_null() {
        return Ok(None); // empty document, e.g. a trailing `---`
    }
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let kind = field("kind").ok_or_else(|| err(docname, "kind", "missing"))?;
    let api = field("apiVersion").ok_or_else(|| err(docname, "apiVersion", "missing"))?;
    let meta = |k: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let name = meta("name").unwrap_or_default();
    let key = ObjectKey {
        namespace: if kind == "Namespace" || kind == "Node" {
            String::new()
        } else {
            meta("namespace").unwrap_or_else(|| "default".into())
        },
        kind,
        name,
    };
    let object = key.to_string();
    if key.name.is_empty() {
        return Err(err(&object, "metadata.name", "missing"));
    }
    let mut rejected = Vec::new();
    let translated = match (api.as_str(), key.kind.as_str()) {
        ("v1", "Namespace") => {
            let o: Object<serde::de::IgnoredAny> = typed(&object, value)?;
            let mut annotations = o.metadata.annotations;
            let distribution = annotations.remove(crate::locality::TRAFFIC_DISTRIBUTION_ANNOTATION);
            Kind::Namespace(o.metadata.labels, distribution)
        }
        ("v1", "Node") => {
            let o: Object<serde::de::IgnoredAny> = typed(&object, value)?;
            Kind::Node(crate::locality::Locality::of_node(&o.metadata.labels))
        }
        ("v1", "Pod") => Kind::Pod(pod(&object, value)?),
        ("v1", "Service") => Kind::Service(service(&object, value)?),
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            match security::authorization_policy(value, &mut rejected) {
                ParsedPolicy::Ztunnel(p) => Kind::Policy(Arc::new(p)),
                ParsedPolicy::Waypoint(p) => Kind::WaypointPolicy(p),
            }
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
            Kind::Gateway(crate::routes::gateway(&object, value)?)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            Kind::Route(crate::routes::http_route(&object, value)?)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2", "GRPCRoute") => {
            Kind::Route(crate::routes::grpc_route(&object, value)?)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "VirtualService") => {
            Kind::Route(crate::routes::virtual_service(&object, value)?)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "DestinationRule") => {
            Kind::DestinationRule(crate::routes::destination_rule(&object, value)?)
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "RequestAuthentication") => {
            Kind::RequestAuthentication(crate::request_authn::request_authentication(
                value,
                &mut rejected,
            ))
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            Kind::PeerAuthentication(security::peer_authentication(value, &mut rejected))
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "ServiceEntry") => {
            Kind::ServiceEntry(crate::service_entry::parse(&object, value)?)
        }
        ("v1", "Secret") => Kind::Secret(crate::secret::parse(&object, value)?),
        ("v1", "ConfigMap")
            if key.namespace == crate::ROOT_NAMESPACE
                && key.name == crate::ext_authz::MESH_CONFIG_NAME =>
        {
            Kind::MeshConfig(crate::ext_authz::mesh_config(&object, value, &mut rejected)?)
        }
        ("v1", "ConfigMap") => {
            return Err(err(&object, "metadata", format!("only the ConfigMap {}/{} (meshConfig) is read", crate::ROOT_NAMESPACE, crate::ext_authz::MESH_CONFIG_NAME)))
        }
        (api, kind) => {
            return Err(err(&object, "kind", format!("unsupported kind {kind} (apiVersion {api}); supported: v1 Namespace/Node/Pod/Service/Secret/ConfigMap (istio-system/istio), security.istio.io/v1 AuthorizationPolicy/PeerAuthentication/RequestAuthentication, networking.istio.io/v1 ServiceEntry/VirtualService/DestinationRule, gateway.networking.k8s.io/v1 Gateway/HTTPRoute/GRPCRoute")))
        }
    };
    Ok(Some(Translated {
        key,
        object: translated,
        rejected,
    }))
}

fn service(object: &str, value: serde_yaml::Value) -> Result<ServiceDecl, ConfigError> {
    let o: Object<ServiceSpec> = typed(object, value)?;
    let spec = o.spec.ok_or_else(|| err(object, "spec", "missing"))?;
    let vips = crate::families::service_vips(&spec.families)
        .map_err(|e| err(object, e.field, e.message))?;
    let itp = spec.internal_traffic_policy.as_deref();
    if let Some(v) = itp.filter(|v| !matches!(*v, "Cluster" | "Local")) {
        return Err(err(
            object,
            "spec.internalTrafficPolicy",
            format!("{v:?}: must be Cluster or Local"),
        ));
    }
    let balancing = crate::locality::KubeService {
        internal_traffic_policy: spec.internal_traffic_policy.clone(),
        traffic_distribution: spec.traffic_distribution.clone(),
        annotation: o
            .metadata
            .annotations
            .get(crate::locality::TRAFFIC_DISTRIBUTION_ANNOTATION)
            .cloned(),
        publish_not_ready_addresses: spec.publish_not_ready_addresses,
    };
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
                Err(_) => return Err(err(object, format!("spec.ports[{i}].targetPort"), "empty")),
            },
        };
        ports.push(ServicePort {
            name: p.name,
            port: p.port,
            target,
        });
    }
    Ok(ServiceDecl {
        labels: o.metadata.labels,
        selector: spec.selector.filter(|s| !s.is_empty()).map(Into::into),
        vips,
        ip_families: crate::families::service_families(&spec.families),
        ports,
        balancing,
    })
}

/// `istio.io/use-waypoint` on the object, else on its namespace; `none` on
/// the object opts out of a namespace's waypoint.
pub(crate) fn waypoint_ref(
    labels: &impl crate::labels::Lookup,
    ns_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
) -> Option<WaypointRef> {
    let own = labels
        .label(USE_WAYPOINT_LABEL)
        .map(|n| (n, labels.label(USE_WAYPOINT_NS_LABEL)));
    let (name, ns) = own.or_else(|| {
        let l = ns_labels?;
        Some((l.get(USE_WAYPOINT_LABEL)?, l.get(USE_WAYPOINT_NS_LABEL)))
    })?;
    (name != "none").then(|| WaypointRef {
        name: name.clone(),
        namespace: ns.cloned().unwrap_or_else(|| namespace.to_string()),
    })
}

fn pod(object: &str, value: serde_yaml::Value) -> Result<PodDecl, ConfigError> {
    let o: Object<PodSpec, PodStatus> = typed(object, value)?;
    let spec = o
        .spec
        .ok_or_else(|| err(object, "spec", "missing (needs spec.nodeName)"))?;
    let status = o
        .status
        .ok_or_else(|| err(object, "status", "missing (needs status.podIP)"))?;
    let (ip, extra_ips) = crate::families::pod_addresses(&status.pod_ip, &status.pod_ips)
        .map_err(|e| err(object, e.field, e.message))?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .is_none_or(|c| c.status == "True");
    if spec.node_name.is_empty() {
        return Err(err(object, "spec.nodeName", "empty"));
    }
    let owner = o
        .metadata
        .owner_references
        .into_iter()
        .find(|r| r.controller == Some(true))
        .map(|r| crate::owner::Owner {
            kind: r.kind,
            name: r.name,
        });
    Ok(PodDecl {
        uid: o.metadata.uid,
        owner,
        labels: Arc::new(o.metadata.labels.into()),
        annotations: Arc::new(o.metadata.annotations.into()),
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name,
        ip,
        extra_ips,
        named_ports: spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|cp| Some((cp.name.clone()?, cp.container_port)))
            .collect(),
        ready,
    })
}
