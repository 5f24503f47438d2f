//! What a waypoint applies: the waypoints themselves (Gateway API `Gateway`
//! of class `istio-waypoint`), HTTP routing for a service (Gateway API
//! `HTTPRoute` with a Service parent, or Istio `VirtualService`), and traffic
//! policy (`DestinationRule`). Both route APIs become one `HttpRoute` shape.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::standalone::{err, typed, ConfigError};
use crate::CLUSTER_DOMAIN;

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NS_LABEL: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

#[derive(Clone, Debug, Serialize)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// The Service hostname the waypoint is reached at (manual deployment:
    /// `spec.addresses[0]` of type Hostname), else `<name>.<ns>.svc.<domain>`.
    pub hostname: String,
    pub for_traffic: WaypointFor,
    /// Which namespaces may bind their services and pods to it (the HBONE
    /// listener's `allowedRoutes.namespaces`; Gateway API's default: Same).
    pub allowed_namespaces: AllowedNamespaces,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AllowedNamespaces {
    Same,
    All,
    /// Namespaces whose labels hold all of these.
    Selector(BTreeMap<String, String>),
}

impl Waypoint {
    /// Whether objects in `namespace` (labelled `labels`) may use this waypoint.
    pub fn admits(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        namespace == self.namespace
            || match &self.allowed_namespaces {
                AllowedNamespaces::Same => false,
                AllowedNamespaces::All => true,
                AllowedNamespaces::Selector(sel) => {
                    labels.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))
                }
            }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaypointRef {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    #[serde(serialize_with = "ser_regex")]
    Regex(regex::Regex),
}

fn ser_regex<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl StrMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RouteMatch {
    pub path: Option<StrMatch>,
    pub method: Option<String>,
    pub headers: Vec<(String, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    /// Service hostname.
    pub host: String,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RetryOn {
    /// Any 5xx.
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    Reset,
    ConnectFailure,
    RefusedStream,
    RetriableStatusCodes,
    /// A response whose headers carry this `grpc-status` (a trailers-only
    /// gRPC answer): Istio's `cancelled` (1), `deadline-exceeded` (4),
    /// `resource-exhausted` (8), `internal` (13), `unavailable` (14).
    Grpc(u32),
}

#[derive(Clone, Debug, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub enum Rewrite {
    /// Replace the matched prefix.
    Prefix(String),
    Full(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Redirect {
    pub path: Option<String>,
    pub authority: Option<String>,
    pub code: u16,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RouteRule {
    /// Empty: matches everything.
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub redirect: Option<Redirect>,
    /// A copy of the request goes here (percent of requests); its answer is dropped.
    pub mirror: Option<(Backend, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RouteApi {
    HttpRoute,
    VirtualService,
}

/// The routing for one service hostname.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    pub api: RouteApi,
    /// Service hostnames this routing is for.
    pub hosts: Vec<String>,
    /// ServiceEntries (namespace, name) it is attached to: it is for their
    /// hosts as well, whatever those are when the state is published.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entry_parents: Vec<(String, String)>,
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Debug, Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
    HashHeader(String),
    HashCookie(String),
    HashSourceIp,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    pub http1_max_pending: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrafficPolicy {
    pub lb: LoadBalancer,
    pub pool: PoolLimits,
    pub outlier: Option<OutlierDetection>,
    /// TLS to originate to endpoints outside the mesh.
    pub tls: Option<crate::upstream_tls::UpstreamTls>,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            lb: LoadBalancer::RoundRobin,
            pool: PoolLimits::default(),
            outlier: None,
            tls: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    pub host: String,
    pub subsets: Vec<Subset>,
    pub policy: TrafficPolicy,
}

/// Go-style durations as Istio and Gateway API write them: `1.5s`, `100ms`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (e.g. 1.5s, 100ms)"))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            u => return Err(format!("{s:?}: unknown unit {u:?} (h, m, s, ms, us, ns)")),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// `name` as a service hostname, relative to `ns` when short.
pub fn qualify(name: &str, ns: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match name.matches('.').count() {
        0 => format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        1 => format!("{name}.svc.{CLUSTER_DOMAIN}"),
        _ => name,
    }
}

// ---- Gateway (waypoint) -------------------------------------------------

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Object<S> {
    metadata: Meta,
    spec: Option<S>,
}

impl<S> Object<S> {
    fn ns(&self) -> String {
        self.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec {
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<serde_yaml::Value>,
    #[serde(default)]
    addresses: Vec<GatewayAddress>,
}

#[derive(Deserialize)]
struct GatewayAddress {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    value: String,
}

/// The most permissive `allowedRoutes.namespaces` among the HBONE listeners
/// (all listeners when none says HBONE). A selector we cannot read admits no
/// other namespace.
fn allowed_namespaces(
    object: &str,
    listeners: &[serde_yaml::Value],
) -> Result<AllowedNamespaces, ConfigError> {
    let hbone: Vec<_> = listeners
        .iter()
        .filter(|l| l.get("protocol").and_then(|p| p.as_str()) == Some("HBONE"))
        .collect();
    let chosen = if hbone.is_empty() {
        listeners.iter().collect()
    } else {
        hbone
    };
    let mut best = AllowedNamespaces::Same;
    for (i, l) in chosen.into_iter().enumerate() {
        let ns = l.get("allowedRoutes").and_then(|a| a.get("namespaces"));
        let from = ns.and_then(|n| n.get("from")).and_then(|f| f.as_str());
        let this = match from.unwrap_or("Same") {
            "Same" => AllowedNamespaces::Same,
            "All" => AllowedNamespaces::All,
            "Selector" => {
                let sel = ns.and_then(|n| n.get("selector"));
                let labels = sel.and_then(|s| s.get("matchLabels")).and_then(|m| {
                    serde_yaml::from_value::<BTreeMap<String, String>>(m.clone()).ok()
                });
                let only_labels = sel
                    .and_then(|s| s.as_mapping())
                    .is_some_and(|m| m.len() == 1);
                match labels {
                    Some(l) if only_labels && !l.is_empty() => AllowedNamespaces::Selector(l),
                    _ => {
                        tracing::warn!(object, listener = i, "allowedRoutes selector is not plain matchLabels; no other namespace admitted");
                        AllowedNamespaces::Same
                    }
                }
            }
            other => {
                return Err(err(
                    object,
                    format!("spec.listeners[{i}].allowedRoutes.namespaces.from"),
                    format!("{other:?}: want Same, All or Selector"),
                ))
            }
        };
        best = match (best, this) {
            (AllowedNamespaces::All, _) | (_, AllowedNamespaces::All) => AllowedNamespaces::All,
            (AllowedNamespaces::Selector(s), _) | (_, AllowedNamespaces::Selector(s)) => {
                AllowedNamespaces::Selector(s)
            }
            _ => AllowedNamespaces::Same,
        };
    }
    Ok(best)
}

/// A Gateway of class istio-waypoint; other classes are not ours (None).
pub(crate) fn gateway(
    object: &str,
    value: serde_yaml::Value,
) -> Result<Option<Waypoint>, ConfigError> {
    let o: Object<GatewaySpec> = typed(object, value)?;
    let ns = o.ns();
    let spec = o.spec.ok_or_else(|| err(object, "spec", "missing"))?;
    if spec.gateway_class_name != WAYPOINT_CLASS {
        tracing::info!(
            object,
            class = spec.gateway_class_name,
            "Gateway of another class; ignored"
        );
        return Ok(None);
    }
    if spec.listeners.is_empty() {
        return Err(err(
            object,
            "spec.listeners",
            "a waypoint needs its HBONE listener {name: mesh, port: 15008, protocol: HBONE}",
        ));
    }
    let hostname = match spec.addresses.as_slice() {
        [] => format!("{}.{ns}.svc.{CLUSTER_DOMAIN}", o.metadata.name),
        [a] if a.kind.as_deref().unwrap_or("IPAddress") == "Hostname" => {
            a.value.trim_end_matches('.').to_string()
        }
        _ => {
            return Err(err(
                object,
                "spec.addresses",
                "a manual waypoint has exactly one address of type Hostname",
            ))
        }
    };
    let for_traffic = match o
        .metadata
        .labels
        .get(WAYPOINT_FOR_LABEL)
        .map(String::as_str)
    {
        None | Some("service") => WaypointFor::Service,
        Some("workload") => WaypointFor::Workload,
        Some("all") => WaypointFor::All,
        Some("none") => WaypointFor::None,
        Some(other) => {
            return Err(err(
                object,
                format!("metadata.labels.{WAYPOINT_FOR_LABEL}"),
                format!("{other:?}: want service, workload, all or none"),
            ))
        }
    };
    let allowed_namespaces = allowed_namespaces(object, &spec.listeners)?;
    Ok(Some(Waypoint {
        name: o.metadata.name,
        namespace: ns,
        hostname,
        for_traffic,
        allowed_namespaces,
    }))
}

// ---- HTTPRoute ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<HrRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<HrMatch>,
    #[serde(default)]
    filters: Vec<HrFilter>,
    #[serde(default)]
    backend_refs: Vec<HrBackend>,
    #[serde(default)]
    timeouts: Option<HrTimeouts>,
    #[serde(default)]
    retry: Option<HrRetry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrMatch {
    #[serde(default)]
    path: Option<TypedValue>,
    #[serde(default)]
    headers: Vec<NamedTypedValue>,
    #[serde(default)]
    query_params: Vec<NamedTypedValue>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedValue {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedTypedValue {
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrFilter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    request_header_modifier: Option<HrHeaderMod>,
    #[serde(default)]
    response_header_modifier: Option<HrHeaderMod>,
    #[serde(default)]
    url_rewrite: Option<HrRewrite>,
    #[serde(default)]
    request_redirect: Option<HrRedirect>,
    #[serde(default)]
    request_mirror: Option<HrMirror>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrMirror {
    backend_ref: HrBackend,
    #[serde(default)]
    percent: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HrHeaderMod {
    #[serde(default)]
    set: Vec<NameValue>,
    #[serde(default)]
    add: Vec<NameValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrRewrite {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<HrPathMod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrPathMod {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrRedirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<HrPathMod>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrBackend {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrRetry {
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
}

fn str_match(
    object: &str,
    field: &str,
    kind: Option<&str>,
    value: &str,
    default: &str,
) -> Result<StrMatch, ConfigError> {
    match kind.unwrap_or(default) {
        "Exact" => Ok(StrMatch::Exact(value.to_string())),
        "PathPrefix" => Ok(StrMatch::Prefix(value.to_string())),
        "RegularExpression" => regex(object, field, value),
        other => Err(err(
            object,
            format!("{field}.type"),
            format!("unsupported match type {other:?}"),
        )),
    }
}

fn regex(object: &str, field: &str, value: &str) -> Result<StrMatch, ConfigError> {
    // Anchored: Istio and Gateway API match the whole value.
    regex::Regex::new(&format!("^(?:{value})$"))
        .map(StrMatch::Regex)
        .map_err(|e| err(object, field, format!("bad regex {value:?}: {e}")))
}

fn duration(object: &str, field: &str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).map_err(|e| err(object, field, e))
}

fn header_ops(m: HrHeaderMod) -> HeaderOps {
    let pairs = |v: Vec<NameValue>| {
        v.into_iter()
            .map(|p| (p.name.to_ascii_lowercase(), p.value))
            .collect()
    };
    HeaderOps {
        set: pairs(m.set),
        add: pairs(m.add),
        remove: m
            .remove
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    }
}

/// The group of Istio's networking kinds (ServiceEntry, and the `Hostname`
/// backend that names a ServiceEntry host).
const ISTIO_NETWORKING: &str = "networking.istio.io";

/// The host a backendRef names: a Service's cluster hostname, or (kind
/// `Hostname`) a ServiceEntry host as written.
fn backend_host(object: &str, field: &str, b: &HrBackend, ns: &str) -> Result<String, ConfigError> {
    match (b.kind.as_deref().unwrap_or("Service"), b.group.as_deref()) {
        ("Service", None | Some("") | Some("core")) => Ok(format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            b.name,
            b.namespace.as_deref().unwrap_or(ns)
        )),
        ("Hostname", Some(ISTIO_NETWORKING)) => {
            if b.namespace.is_some() {
                return Err(err(
                    object,
                    format!("{field}.namespace"),
                    "a Hostname backend names a host, which has no namespace",
                ));
            }
            let h = b.name.trim_end_matches('.').to_ascii_lowercase();
            if h.is_empty() || h.split('.').any(|l| l.is_empty() || l.len() > 63) {
                return Err(err(
                    object,
                    format!("{field}.name"),
                    format!("{:?} is not a DNS name", b.name),
                ));
            }
            Ok(h)
        }
        (kind, group) => Err(err(
            object,
            field,
            format!(
                "backend kind {kind} (group {:?}): only Service backends and Hostname \
                 (group {ISTIO_NETWORKING}) backends are supported",
                group.unwrap_or("")
            ),
        )),
    }
}

pub(crate) fn http_route(object: &str, value: serde_yaml::Value) -> Result<HttpRoute, ConfigError> {
    let o: Object<HttpRouteSpec> = typed(object, value)?;
    let ns = o.ns();
    let spec = o.spec.ok_or_else(|| err(object, "spec", "missing"))?;
    let mut hosts = Vec::new();
    let mut entry_parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let parent_ns = p.namespace.as_deref().unwrap_or(&ns);
        match (kind, p.group.as_deref()) {
            ("Service", None | Some("") | Some("core")) => {
                hosts.push(format!("{}.{parent_ns}.svc.{CLUSTER_DOMAIN}", p.name))
            }
            // Bound to the entry at its waypoint, as Istio does: the route
            // is for the entry's hosts.
            ("ServiceEntry", Some(ISTIO_NETWORKING)) => {
                entry_parents.push((parent_ns.to_string(), p.name.clone()))
            }
            _ => {
                return Err(err(
                    object,
                    format!("spec.parentRefs[{i}]"),
                    format!(
                        "parent kind {kind} (group {:?}): waypoint routes attach to a Service \
                         (GAMMA) or a ServiceEntry (group {ISTIO_NETWORKING})",
                        p.group.as_deref().unwrap_or("")
                    ),
                ))
            }
        }
    }
    if hosts.is_empty() && entry_parents.is_empty() {
        return Err(err(
            object,
            "spec.parentRefs",
            "empty: name the Service or ServiceEntry this route is for",
        ));
    }
    if !spec.hostnames.is_empty() {
        tracing::info!(
            object,
            "spec.hostnames is ignored for Service parents (as in GAMMA)"
        );
    }
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.into_iter().enumerate() {
        let base = format!("spec.rules[{ri}]");
        let _ = r.name;
        let mut rule = RouteRule::default();
        for (mi, m) in r.matches.into_iter().enumerate() {
            let mb = format!("{base}.matches[{mi}]");
            let mut rm = RouteMatch::default();
            if let Some(p) = m.path {
                rm.path = Some(str_match(
                    object,
                    &format!("{mb}.path"),
                    p.kind.as_deref(),
                    &p.value,
                    "PathPrefix",
                )?);
            }
            for (hi, h) in m.headers.into_iter().enumerate() {
                let f = format!("{mb}.headers[{hi}]");
                rm.headers.push((
                    h.name.to_ascii_lowercase(),
                    str_match(object, &f, h.kind.as_deref(), &h.value, "Exact")?,
                ));
            }
            for (qi, q) in m.query_params.into_iter().enumerate() {
                let f = format!("{mb}.queryParams[{qi}]");
                rm.query.push((
                    q.name,
                    str_match(object, &f, q.kind.as_deref(), &q.value, "Exact")?,
                ));
            }
            rm.method = m.method;
            rule.matches.push(rm);
        }
        for (fi, f) in r.filters.into_iter().enumerate() {
            let fb = format!("{base}.filters[{fi}]");
            match f.kind.as_str() {
                "RequestHeaderModifier" => {
                    rule.request_headers = header_ops(f.request_header_modifier.unwrap_or_default())
                }
                "ResponseHeaderModifier" => {
                    rule.response_headers =
                        header_ops(f.response_header_modifier.unwrap_or_default())
                }
                "URLRewrite" => {
                    let rw = f
                        .url_rewrite
                        .ok_or_else(|| err(object, format!("{fb}.urlRewrite"), "missing"))?;
                    if let Some(p) = rw.path {
                        rule.rewrite = Some(
                            match (p.kind.as_str(), p.replace_full_path, p.replace_prefix_match) {
                                ("ReplaceFullPath", Some(v), _) => Rewrite::Full(v),
                                ("ReplacePrefixMatch", _, Some(v)) => Rewrite::Prefix(v),
                                (k, _, _) => {
                                    return Err(err(
                                        object,
                                        format!("{fb}.urlRewrite.path"),
                                        format!("{k}: needs its replace value"),
                                    ))
                                }
                            },
                        );
                    }
                    if rw.hostname.is_some() {
                        return Err(err(
                            object,
                            format!("{fb}.urlRewrite.hostname"),
                            "not supported",
                        ));
                    }
                }
                "RequestRedirect" => {
                    let rd = f
                        .request_redirect
                        .ok_or_else(|| err(object, format!("{fb}.requestRedirect"), "missing"))?;
                    if rd.scheme.is_some() || rd.port.is_some() {
                        return Err(err(
                            object,
                            format!("{fb}.requestRedirect"),
                            "scheme and port redirects are not supported",
                        ));
                    }
                    rule.redirect = Some(Redirect {
                        path: rd.path.and_then(|p| p.replace_full_path),
                        authority: rd.hostname,
                        code: rd.status_code.unwrap_or(302),
                    });
                }
                "RequestMirror" => {
                    let mr = f
                        .request_mirror
                        .ok_or_else(|| err(object, format!("{fb}.requestMirror"), "missing"))?;
                    let b = mr.backend_ref;
                    rule.mirror = Some((
                        Backend {
                            host: format!(
                                "{}.{}.svc.{CLUSTER_DOMAIN}",
                                b.name,
                                b.namespace.as_deref().unwrap_or(&ns)
                            ),
                            port: b.port,
                            subset: None,
                            weight: 1,
                        },
                        mr.percent.unwrap_or(100.0).clamp(0.0, 100.0),
                    ));
                }
                other => {
                    return Err(err(
                        object,
                        format!("{fb}.type"),
                        format!("filter {other} is not supported"),
                    ))
                }
            }
        }
        for (bi, b) in r.backend_refs.into_iter().enumerate() {
            let field = format!("{base}.backendRefs[{bi}]");
            rule.backends.push(Backend {
                host: backend_host(object, &field, &b, &ns)?,
                port: b.port,
                subset: None,
                weight: b.weight.unwrap_or(1),
            });
        }
        if let Some(t) = r.timeouts {
            let t = t
                .request
                .map(|v| (v, "request"))
                .or(t.backend_request.map(|v| (v, "backendRequest")));
            if let Some((v, f)) = t {
                rule.timeout = Some(duration(object, &format!("{base}.timeouts.{f}"), &v)?);
            }
        }
        if let Some(rt) = r.retry {
            rule.retries = Some(RetryPolicy {
                attempts: rt.attempts.unwrap_or(1),
                per_try_timeout: None,
                retry_on: if rt.codes.is_empty() {
                    vec![
                        RetryOn::GatewayError,
                        RetryOn::ConnectFailure,
                        RetryOn::Reset,
                    ]
                } else {
                    vec![RetryOn::RetriableStatusCodes, RetryOn::ConnectFailure]
                },
                codes: rt.codes,
                backoff: rt
                    .backoff
                    .map(|b| duration(object, &format!("{base}.retry.backoff"), &b))
                    .transpose()?
                    .unwrap_or(Duration::from_millis(25)),
            });
        }
        rules.push(rule);
    }
    Ok(HttpRoute {
        name: o.metadata.name,
        namespace: ns,
        api: RouteApi::HttpRoute,
        hosts,
        entry_parents,
        rules,
    })
}

/// GRPCRoute is HTTPRoute over HTTP/2 with `/<service>/<method>` paths: its
/// method matches become path matches and the rest is read as an HTTPRoute.
pub(crate) fn grpc_route(
    object: &str,
    mut value: serde_yaml::Value,
) -> Result<HttpRoute, ConfigError> {
    use serde_yaml::Value;
    let rules = value
        .get_mut("spec")
        .and_then(|s| s.get_mut("rules"))
        .and_then(Value::as_sequence_mut);
    for (ri, rule) in rules.into_iter().flatten().enumerate() {
        let matches = rule.get_mut("matches").and_then(Value::as_sequence_mut);
        for (mi, m) in matches.into_iter().flatten().enumerate() {
            let Some(map) = m.as_mapping_mut() else {
                continue;
            };
            let Some(method) = map.remove("method") else {
                continue;
            };
            let field = |k: &str| method.get(k).and_then(Value::as_str).map(str::to_string);
            let regex = field("type").as_deref() == Some("RegularExpression");
            let (kind, path) = match (field("service"), field("method"), regex) {
                (Some(s), Some(m), false) => ("Exact", format!("/{s}/{m}")),
                (Some(s), None, false) => ("PathPrefix", format!("/{s}/")),
                (None, Some(m), false) => {
                    ("RegularExpression", format!("/[^/]+/{}", regex::escape(&m)))
                }
                (s, m, true) => (
                    "RegularExpression",
                    format!(
                        "/{}/{}",
                        s.unwrap_or("[^/]+".into()),
                        m.unwrap_or("[^/]+".into())
                    ),
                ),
                (None, None, _) => {
                    return Err(err(
                        object,
                        format!("spec.rules[{ri}].matches[{mi}].method"),
                        "needs service or method",
                    ))
                }
            };
            let mut p = serde_yaml::Mapping::new();
            p.insert("type".into(), kind.into());
            p.insert("value".into(), path.into());
            map.insert("path".into(), Value::Mapping(p));
        }
    }
    http_route(object, value)
}

/// Gateway API precedence across all rules of one route: exact path, then
/// longer prefix, then method, then more headers, then more query params;
/// declaration order breaks ties.
pub fn precedence(m: &RouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(StrMatch::Exact(p)) => (3, p.len()),
        Some(StrMatch::Regex(r)) => (2, r.as_str().len()),
        Some(StrMatch::Prefix(p)) => (1, p.len()),
        // No path: Gateway API's default, PathPrefix "/".
        None => (1, 1),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

// ---- VirtualService ------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsSpec {
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<VsHttp>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsHttp {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<VsMatch>,
    #[serde(default)]
    route: Vec<VsRoute>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<VsRetries>,
    #[serde(default)]
    fault: Option<VsFault>,
    #[serde(default)]
    headers: Option<VsHeaders>,
    #[serde(default)]
    rewrite: Option<VsRewrite>,
    #[serde(default)]
    redirect: Option<VsRedirect>,
    #[serde(default)]
    mirror: Option<VsDestination>,
    #[serde(default)]
    mirror_percentage: Option<VsPercent>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsMatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<VsStr>,
    #[serde(default)]
    method: Option<VsStr>,
    #[serde(default)]
    headers: BTreeMap<String, VsStr>,
    #[serde(default)]
    query_params: BTreeMap<String, VsStr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsStr {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsRoute {
    destination: VsDestination,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    headers: Option<VsHeaders>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsDestination {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<VsPort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsPort {
    number: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsRetries {
    attempts: u32,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsFault {
    #[serde(default)]
    delay: Option<VsDelay>,
    #[serde(default)]
    abort: Option<VsAbort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsDelay {
    fixed_delay: String,
    #[serde(default)]
    percentage: Option<VsPercent>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsAbort {
    #[serde(default)]
    http_status: Option<u16>,
    #[serde(default)]
    grpc_status: Option<String>,
    #[serde(default)]
    percentage: Option<VsPercent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsPercent {
    value: f64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VsHeaders {
    #[serde(default)]
    request: Option<VsHeaderOps>,
    #[serde(default)]
    response: Option<VsHeaderOps>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VsHeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsRewrite {
    uri: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsRedirect {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    redirect_code: Option<u16>,
}

fn vs_str(object: &str, field: &str, v: VsStr) -> Result<StrMatch, ConfigError> {
    match (v.exact, v.prefix, v.regex) {
        (Some(e), None, None) => Ok(StrMatch::Exact(e)),
        (None, Some(p), None) => Ok(StrMatch::Prefix(p)),
        (None, None, Some(r)) => regex(object, field, &r),
        _ => Err(err(object, field, "exactly one of exact, prefix, regex")),
    }
}

fn vs_header_ops(h: Option<VsHeaderOps>) -> HeaderOps {
    let h = h.unwrap_or_default();
    HeaderOps {
        set: h
            .set
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        add: h
            .add
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        remove: h
            .remove
            .into_iter()
            .map(|k| k.to_ascii_lowercase())
            .collect(),
    }
}

fn retry_on(object: &str, field: &str, s: &str) -> Result<(Vec<RetryOn>, Vec<u16>), ConfigError> {
    let (mut on, mut codes) = (Vec::new(), Vec::new());
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "5xx" => on.push(RetryOn::FiveXx),
            "gateway-error" => on.push(RetryOn::GatewayError),
            "reset" => on.push(RetryOn::Reset),
            "connect-failure" => on.push(RetryOn::ConnectFailure),
            "refused-stream" => on.push(RetryOn::RefusedStream),
            "retriable-status-codes" => on.push(RetryOn::RetriableStatusCodes),
            // Envoy's gRPC conditions: the status of a trailers-only answer.
            "cancelled" => on.push(RetryOn::Grpc(1)),
            "deadline-exceeded" => on.push(RetryOn::Grpc(4)),
            "resource-exhausted" => on.push(RetryOn::Grpc(8)),
            "internal" => on.push(RetryOn::Grpc(13)),
            "unavailable" => on.push(RetryOn::Grpc(14)),
            code => match code.parse::<u16>() {
                Ok(c) if (100..600).contains(&c) => {
                    codes.push(c);
                    on.push(RetryOn::RetriableStatusCodes);
                }
                _ => {
                    return Err(err(
                        object,
                        field,
                        format!("unknown retry condition {code:?}"),
                    ))
                }
            },
        }
    }
    Ok((on, codes))
}

fn grpc_code(object: &str, field: &str, s: &str) -> Result<u32, ConfigError> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    s.parse()
        .ok()
        .or_else(|| NAMES.iter().position(|n| *n == s).map(|p| p as u32))
        .ok_or_else(|| err(object, field, format!("{s:?} is not a gRPC status")))
}

pub(crate) fn virtual_service(
    object: &str,
    value: serde_yaml::Value,
) -> Result<HttpRoute, ConfigError> {
    let o: Object<VsSpec> = typed(object, value)?;
    let ns = o.ns();
    let spec = o.spec.ok_or_else(|| err(object, "spec", "missing"))?;
    if spec.hosts.is_empty() {
        return Err(err(object, "spec.hosts", "empty"));
    }
    if spec.gateways.iter().any(|g| g != "mesh") {
        tracing::info!(
            object,
            "gateways other than `mesh` are not the waypoint's; only mesh routing applies"
        );
    }
    let _ = spec.export_to;
    let hosts = spec.hosts.iter().map(|h| qualify(h, &ns)).collect();
    let mut rules = Vec::new();
    for (i, h) in spec.http.into_iter().enumerate() {
        let base = format!("spec.http[{i}]");
        let _ = h.name;
        let mut rule = RouteRule::default();
        for (mi, m) in h.matches.into_iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            let _ = m.name;
            let mut rm = RouteMatch::default();
            if let Some(u) = m.uri {
                rm.path = Some(vs_str(object, &format!("{mb}.uri"), u)?);
            }
            if let Some(mm) = m.method {
                match vs_str(object, &format!("{mb}.method"), mm)? {
                    StrMatch::Exact(e) => rm.method = Some(e),
                    _ => {
                        return Err(err(
                            object,
                            format!("{mb}.method"),
                            "only exact method matches are supported",
                        ))
                    }
                }
            }
            for (k, v) in m.headers {
                let f = format!("{mb}.headers.{k}");
                rm.headers
                    .push((k.to_ascii_lowercase(), vs_str(object, &f, v)?));
            }
            for (k, v) in m.query_params {
                let f = format!("{mb}.queryParams.{k}");
                rm.query.push((k.clone(), vs_str(object, &f, v)?));
            }
            rule.matches.push(rm);
        }
        let mut response_from_routes = None;
        for (ri, r) in h.route.into_iter().enumerate() {
            if r.headers.is_some() && response_from_routes.is_none() {
                response_from_routes = r.headers;
            }
            rule.backends.push(Backend {
                host: qualify(&r.destination.host, &ns),
                port: r.destination.port.map(|p| p.number),
                subset: r.destination.subset,
                weight: r.weight.unwrap_or(if ri == 0 { 100 } else { 0 }),
            });
        }
        if let Some(t) = h.timeout {
            rule.timeout = Some(duration(object, &format!("{base}.timeout"), &t)?);
        }
        if let Some(r) = h.retries {
            let (on, codes) = retry_on(
                object,
                &format!("{base}.retries.retryOn"),
                r.retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,503"),
            )?;
            rule.retries = Some(RetryPolicy {
                attempts: r.attempts,
                per_try_timeout: r
                    .per_try_timeout
                    .map(|t| duration(object, &format!("{base}.retries.perTryTimeout"), &t))
                    .transpose()?,
                retry_on: on,
                codes,
                backoff: Duration::from_millis(25),
            });
        }
        if let Some(f) = h.fault {
            let pct = |p: Option<VsPercent>| p.map(|p| p.value).unwrap_or(100.0).clamp(0.0, 100.0);
            let mut fault = Fault::default();
            if let Some(d) = f.delay {
                fault.delay = Some((
                    duration(
                        object,
                        &format!("{base}.fault.delay.fixedDelay"),
                        &d.fixed_delay,
                    )?,
                    pct(d.percentage),
                ));
            }
            if let Some(a) = f.abort {
                let code = match (a.http_status, a.grpc_status) {
                    (Some(c), None) if (200..600).contains(&c) => Abort::Http(c),
                    (None, Some(g)) => Abort::Grpc(grpc_code(
                        object,
                        &format!("{base}.fault.abort.grpcStatus"),
                        &g,
                    )?),
                    _ => {
                        return Err(err(
                            object,
                            format!("{base}.fault.abort"),
                            "exactly one of httpStatus (200-599) or grpcStatus",
                        ))
                    }
                };
                fault.abort = Some((code, pct(a.percentage)));
            }
            rule.fault = Some(fault);
        }
        let headers = h.headers.or(response_from_routes).unwrap_or_default();
        rule.request_headers = vs_header_ops(headers.request);
        rule.response_headers = vs_header_ops(headers.response);
        if let Some(rw) = h.rewrite {
            rule.rewrite = Some(Rewrite::Prefix(rw.uri));
        }
        if let Some(m) = h.mirror {
            let pct = h
                .mirror_percentage
                .map(|p| p.value)
                .unwrap_or(100.0)
                .clamp(0.0, 100.0);
            rule.mirror = Some((
                Backend {
                    host: qualify(&m.host, &ns),
                    port: m.port.map(|p| p.number),
                    subset: m.subset,
                    weight: 1,
                },
                pct,
            ));
        }
        if let Some(rd) = h.redirect {
            rule.redirect = Some(Redirect {
                path: rd.uri,
                authority: rd.authority,
                code: rd.redirect_code.unwrap_or(301),
            });
        }
        if rule.backends.is_empty()
            && rule.redirect.is_none()
            && rule.fault.as_ref().is_none_or(|f| f.abort.is_none())
        {
            return Err(err(
                object,
                format!("{base}.route"),
                "empty: a rule needs a route, a redirect or an abort",
            ));
        }
        rules.push(rule);
    }
    Ok(HttpRoute {
        name: o.metadata.name,
        namespace: ns,
        api: RouteApi::VirtualService,
        hosts,
        entry_parents: Vec::new(),
        rules,
    })
}

// ---- DestinationRule -----------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrSpec {
    host: String,
    #[serde(default)]
    subsets: Vec<DrSubset>,
    #[serde(default)]
    traffic_policy: Option<DrPolicy>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<DrPolicy>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrPolicy {
    #[serde(default)]
    load_balancer: Option<DrLb>,
    #[serde(default)]
    connection_pool: Option<DrPool>,
    #[serde(default)]
    outlier_detection: Option<DrOutlier>,
    #[serde(default)]
    tls: Option<crate::upstream_tls::TlsSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrLb {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<DrHash>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrHash {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<DrCookie>,
    #[serde(default)]
    use_source_ip: Option<bool>,
}

#[derive(Deserialize)]
struct DrCookie {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrPool {
    #[serde(default)]
    tcp: Option<DrTcp>,
    #[serde(default)]
    http: Option<DrHttp>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrTcp {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    connect_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrHttp {
    #[serde(default)]
    http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    http2_max_requests: Option<u32>,
    #[serde(default)]
    max_requests_per_connection: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DrOutlier {
    #[serde(default)]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
}

fn dr_policy(
    object: &str,
    namespace: &str,
    base: &str,
    p: DrPolicy,
) -> Result<TrafficPolicy, ConfigError> {
    let mut t = TrafficPolicy::default();
    if let Some(tls) = p.tls {
        t.tls = crate::upstream_tls::parse(object, namespace, &format!("{base}.tls"), tls)?;
    }
    if let Some(lb) = p.load_balancer {
        t.lb = match (lb.simple.as_deref(), lb.consistent_hash) {
            (Some("ROUND_ROBIN") | Some("UNSPECIFIED"), None) => LoadBalancer::RoundRobin,
            (Some("LEAST_REQUEST") | Some("LEAST_CONN"), None) => LoadBalancer::LeastRequest,
            (Some("RANDOM"), None) => LoadBalancer::Random,
            (None, Some(h)) => match (h.http_header_name, h.http_cookie, h.use_source_ip) {
                (Some(hd), None, None) => LoadBalancer::HashHeader(hd.to_ascii_lowercase()),
                (None, Some(c), None) => LoadBalancer::HashCookie(c.name),
                (None, None, Some(true)) => LoadBalancer::HashSourceIp,
                _ => {
                    return Err(err(
                        object,
                        format!("{base}.loadBalancer.consistentHash"),
                        "exactly one of httpHeaderName, httpCookie, useSourceIp",
                    ))
                }
            },
            (s, _) => {
                return Err(err(
                    object,
                    format!("{base}.loadBalancer"),
                    format!("unsupported load balancer {s:?}"),
                ))
            }
        };
    }
    if let Some(pool) = p.connection_pool {
        let tcp = pool.tcp.unwrap_or_default();
        let http = pool.http.unwrap_or_default();
        let _ = tcp.connect_timeout;
        t.pool = PoolLimits {
            max_connections: tcp.max_connections,
            http1_max_pending: http.http1_max_pending_requests,
            http2_max_requests: http.http2_max_requests,
            max_requests_per_connection: http.max_requests_per_connection,
        };
    }
    if let Some(o) = p.outlier_detection {
        let d = |v: Option<String>, f: &str, def: u64| -> Result<Duration, ConfigError> {
            v.map(|v| duration(object, &format!("{base}.outlierDetection.{f}"), &v))
                .transpose()
                .map(|x| x.unwrap_or(Duration::from_secs(def)))
        };
        t.outlier = Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx_errors.or(
                if o.consecutive_gateway_errors.is_none() {
                    Some(5)
                } else {
                    None
                },
            ),
            consecutive_gateway: o.consecutive_gateway_errors,
            interval: d(o.interval, "interval", 10)?,
            base_ejection: d(o.base_ejection_time, "baseEjectionTime", 30)?,
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10).min(100),
        });
    }
    Ok(t)
}

pub(crate) fn destination_rule(
    object: &str,
    value: serde_yaml::Value,
) -> Result<DestinationRule, ConfigError> {
    let o: Object<DrSpec> = typed(object, value)?;
    let ns = o.ns();
    let spec = o.spec.ok_or_else(|| err(object, "spec", "missing"))?;
    let _ = spec.export_to;
    let policy = dr_policy(
        object,
        &ns,
        "spec.trafficPolicy",
        spec.traffic_policy.unwrap_or_default(),
    )?;
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.into_iter().enumerate() {
        let p = s
            .traffic_policy
            .map(|p| dr_policy(object, &ns, &format!("spec.subsets[{i}].trafficPolicy"), p))
            .transpose()?;
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
            policy: p,
        });
    }
    Ok(DestinationRule {
        name: o.metadata.name,
        host: qualify(&spec.host, &ns),
        namespace: ns,
        subsets,
        policy,
    })
}
