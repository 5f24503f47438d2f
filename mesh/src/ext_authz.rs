//! External authorizers: Istio's meshConfig `extensionProviders` of type
//! `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`, which CUSTOM
//! AuthorizationPolicies name by `provider.name`.
//!
//! meshConfig comes from the ConfigMap `istio` in `istio-system`, key `mesh`
//! (YAML), as istiod reads it: from the cluster, or the same object in the
//! standalone file, so both sources share this translation. Other meshConfig
//! fields are not the data plane's business and are ignored.
//!
//! A provider we cannot read is kept by name as `Unusable` with the reason
//! and reported: a CUSTOM policy naming it then denies what it matches
//! (fail closed), never lets it through unchecked.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::rejected::Rejected;
use crate::standalone::{err, typed, ConfigError};

/// The ConfigMap istiod reads meshConfig from, and its key.
pub const MESH_CONFIG_NAME: &str = "istio";
pub const MESH_CONFIG_KEY: &str = "mesh";

/// Istio's default when a provider gives no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The extension providers by name.
pub type Providers = BTreeMap<String, Provider>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Provider {
    Http(HttpAuthorizer),
    Grpc(Authorizer),
    /// Not an authorizer (a tracer, an access log, ...) or not readable:
    /// why a CUSTOM policy naming it denies.
    Unusable(String),
}

/// What both authorizer kinds share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authorizer {
    /// `[<namespace>/]<hostname>`: the namespace, when given, must be the
    /// service's.
    pub namespace: Option<String>,
    pub host: String,
    pub port: u16,
    pub timeout: Duration,
    /// Allow the request when the authorizer cannot be reached, times out
    /// or answers 5xx.
    pub fail_open: bool,
    /// The status for a failed check (default 403).
    pub status_on_error: u16,
    pub body: Option<BodySettings>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BodySettings {
    pub max_request_bytes: u32,
    /// Send the first `max_request_bytes` of a larger body rather than
    /// answering 413.
    pub allow_partial: bool,
    /// gRPC only: the body as `raw_body` bytes, not the UTF-8 `body`.
    pub pack_as_bytes: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpAuthorizer {
    pub authorizer: Authorizer,
    /// Put before the original path in the check request.
    pub path_prefix: String,
    /// Client headers sent in the check, beyond those always sent.
    pub include_headers: Vec<HeaderMatch>,
    /// Fixed headers added to the check (they win over the client's).
    pub additional_headers: Vec<(String, String)>,
    /// Check-response headers set on the upstream request on allow.
    pub to_upstream_on_allow: Vec<HeaderMatch>,
    /// Check-response headers sent to the client on deny (empty: all).
    pub to_downstream_on_deny: Vec<HeaderMatch>,
    /// Check-response headers added to the client's response on allow.
    pub to_downstream_on_allow: Vec<HeaderMatch>,
}

/// Istio's header-name patterns: exact, `prefix*`, `*suffix`; names compare
/// case-insensitively (kept lowercase).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HeaderMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl HeaderMatch {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        if s == "*" || s.is_empty() {
            return Err(format!(
                "{s:?}: a lone wildcard (or empty name) is not supported; use a prefix or suffix match"
            ));
        }
        Ok(if let Some(p) = s.strip_suffix('*') {
            HeaderMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            HeaderMatch::Suffix(p.to_string())
        } else {
            HeaderMatch::Exact(s)
        })
    }

    /// `name` as http's `HeaderName` holds it: lowercase.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HeaderMatch::Exact(e) => name.eq_ignore_ascii_case(e),
            HeaderMatch::Prefix(p) => {
                name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p)
            }
            HeaderMatch::Suffix(s) => {
                name.len() >= s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

pub fn any_matches(list: &[HeaderMatch], name: &str) -> bool {
    list.iter().any(|m| m.matches(name))
}

#[derive(Deserialize)]
struct ConfigMap {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    #[serde(default)]
    extension_providers: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestBody {
    #[serde(default)]
    max_request_bytes: u32,
    #[serde(default)]
    allow_partial_message: bool,
    #[serde(default)]
    pack_as_bytes: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpSpec {
    service: String,
    port: u64,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    path_prefix: String,
    #[serde(default)]
    fail_open: bool,
    /// Accepted, and always in effect: the check runs before the route is
    /// chosen, so routing sees the authorizer's headers.
    #[serde(default, rename = "clearRouteCache")]
    _clear_route_cache: bool,
    #[serde(default)]
    status_on_error: Option<String>,
    #[serde(default)]
    include_headers_in_check: Vec<String>,
    #[serde(default)]
    include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    include_request_body_in_check: Option<RequestBody>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrpcSpec {
    service: String,
    port: u64,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default, rename = "clearRouteCache")]
    _clear_route_cache: bool,
    #[serde(default)]
    status_on_error: Option<String>,
    #[serde(default)]
    include_request_body_in_check: Option<RequestBody>,
}

/// Envoy's `envoy.type.v3.StatusCode` values, the only ones `statusOnError`
/// may name.
const ENVOY_STATUS_CODES: &[u16] = &[
    100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421,
    422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];

/// A field's finding: (path below the provider, reason).
type Bad = (String, String);

/// A protobuf JSON duration: seconds with up to nine decimals and `s`.
fn duration(s: &str) -> Option<Duration> {
    let n = s.strip_suffix('s')?;
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    Some(Duration::new(whole.parse().ok()?, nanos))
}

fn common(
    service: &str,
    port: u64,
    timeout: Option<&str>,
    fail_open: bool,
    status_on_error: Option<&str>,
    body: Option<&RequestBody>,
) -> Result<Authorizer, Bad> {
    let bad = |f: &str, why: String| (f.to_string(), why);
    let (namespace, host) = match service.split_once('/') {
        Some((ns, h)) => (Some(ns.to_string()), h),
        None => (None, service),
    };
    if host.is_empty() || namespace.as_deref() == Some("") || host.contains('/') {
        return Err(bad(
            "service",
            format!("{service:?}: want [<namespace>/]<hostname>"),
        ));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port", format!("{port}: must be in [1, 65535]")))?;
    let timeout = match timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
            bad(
                "timeout",
                format!("{t:?}: want a positive duration like \"0.5s\""),
            )
        })?,
    };
    let status_on_error = match status_on_error {
        None | Some("") => 403,
        Some(s) => s
            .parse::<u16>()
            .ok()
            .filter(|c| ENVOY_STATUS_CODES.contains(c))
            .ok_or_else(|| {
                bad(
                    "statusOnError",
                    format!("{s:?}: not an HTTP status Envoy can send"),
                )
            })?,
    };
    let body = match body {
        None => None,
        Some(b) if b.max_request_bytes == 0 => {
            return Err(bad(
                "includeRequestBodyInCheck.maxRequestBytes",
                "must be greater than 0".into(),
            ))
        }
        Some(b) => Some(BodySettings {
            max_request_bytes: b.max_request_bytes,
            allow_partial: b.allow_partial_message,
            pack_as_bytes: b.pack_as_bytes,
        }),
    };
    Ok(Authorizer {
        namespace,
        host: host.to_ascii_lowercase(),
        port,
        timeout,
        fail_open,
        status_on_error,
        body,
    })
}

fn headers(field: &str, v: &[String]) -> Result<Vec<HeaderMatch>, Bad> {
    v.iter()
        .enumerate()
        .map(|(i, h)| HeaderMatch::parse(h).map_err(|why| (format!("{field}[{i}]"), why)))
        .collect()
}

fn http(s: HttpSpec) -> Result<HttpAuthorizer, Bad> {
    let authorizer = common(
        &s.service,
        s.port,
        s.timeout.as_deref(),
        s.fail_open,
        s.status_on_error.as_deref(),
        s.include_request_body_in_check.as_ref(),
    )?;
    if !s.path_prefix.is_empty() && !s.path_prefix.starts_with('/') {
        return Err((
            "pathPrefix".into(),
            format!("{:?}: must begin with /", s.path_prefix),
        ));
    }
    let query = s.path_prefix.contains(['?', '#']);
    if !s.path_prefix.is_empty()
        && (query || s.path_prefix.parse::<http::uri::PathAndQuery>().is_err())
    {
        return Err((
            "pathPrefix".into(),
            format!("{:?}: not a URL path", s.path_prefix),
        ));
    }
    // The deprecated field counts only when the new one is unset, as in Istio.
    let include = if s.include_request_headers_in_check.is_empty() {
        headers("includeHeadersInCheck", &s.include_headers_in_check)?
    } else {
        headers(
            "includeRequestHeadersInCheck",
            &s.include_request_headers_in_check,
        )?
    };
    let mut additional = Vec::new();
    for (k, v) in &s.include_additional_headers_in_check {
        let field = format!("includeAdditionalHeadersInCheck.{k}");
        http::HeaderName::try_from(k.as_str())
            .map_err(|_| (field.clone(), "not a header name".to_string()))?;
        http::HeaderValue::try_from(v.as_str())
            .map_err(|_| (field, "not a header value".to_string()))?;
        additional.push((k.to_ascii_lowercase(), v.clone()));
    }
    Ok(HttpAuthorizer {
        authorizer,
        path_prefix: s.path_prefix,
        include_headers: include,
        additional_headers: additional,
        to_upstream_on_allow: headers("headersToUpstreamOnAllow", &s.headers_to_upstream_on_allow)?,
        to_downstream_on_deny: headers(
            "headersToDownstreamOnDeny",
            &s.headers_to_downstream_on_deny,
        )?,
        to_downstream_on_allow: headers(
            "headersToDownstreamOnAllow",
            &s.headers_to_downstream_on_allow,
        )?,
    })
}

fn grpc(s: GrpcSpec) -> Result<Authorizer, Bad> {
    common(
        &s.service,
        s.port,
        s.timeout.as_deref(),
        s.fail_open,
        s.status_on_error.as_deref(),
        s.include_request_body_in_check.as_ref(),
    )
}

/// One `extensionProviders` entry: its name and what it is. Err only when
/// it has no name to be found by.
fn provider(base: &str, v: Value) -> Result<(String, Provider), Bad> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| (format!("{base}.name"), "missing".to_string()))?
        .to_string();
    let Value::Mapping(m) = v else {
        return Err((base.to_string(), "not a mapping".to_string()));
    };
    let kinds: Vec<(String, Value)> = m
        .into_iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
        .filter(|(k, _)| k != "name")
        .collect();
    let [(kind, spec)] = <[_; 1]>::try_from(kinds).map_err(|k| {
        let names: Vec<_> = k.into_iter().map(|(k, _)| k).collect();
        (
            base.to_string(),
            format!("want exactly one provider type, found {names:?}"),
        )
    })?;
    let field = format!("{base}.{kind}");
    let read = |r: Result<Provider, ConfigError>| -> Result<Provider, Bad> {
        r.map_err(|e| {
            let f = if e.field.is_empty() {
                field.clone()
            } else {
                format!("{field}.{}", e.field)
            };
            (f, e.message)
        })
    };
    let p = match kind.as_str() {
        "envoyExtAuthzHttp" => read(
            typed::<HttpSpec>(&field, spec)
                .and_then(|s| http(s).map_err(|(f, why)| err(&field, f, why)))
                .map(Provider::Http),
        )?,
        "envoyExtAuthzGrpc" => read(
            typed::<GrpcSpec>(&field, spec)
                .and_then(|s| grpc(s).map_err(|(f, why)| err(&field, f, why)))
                .map(Provider::Grpc),
        )?,
        other => Provider::Unusable(format!(
            "provider {name:?} is of type {other}, not an authorizer (envoyExtAuthzHttp or envoyExtAuthzGrpc)"
        )),
    };
    Ok((name, p))
}

/// Translates the `istio` ConfigMap of `istio-system`: the extension
/// providers of its meshConfig. A provider that cannot be read is kept as
/// `Unusable` (CUSTOM policies naming it deny) and reported in `out`; only
/// a ConfigMap whose `mesh` is not YAML at all is an error.
pub fn mesh_config(
    object: &str,
    value: Value,
    out: &mut Vec<Rejected>,
) -> Result<Providers, ConfigError> {
    let cm: ConfigMap = typed(object, value)?;
    let Some(text) = cm.data.get(MESH_CONFIG_KEY) else {
        return Ok(Providers::new());
    };
    let field = format!("data.{MESH_CONFIG_KEY}");
    let mesh: MeshConfig = match serde_yaml::from_str::<Option<Value>>(text) {
        Ok(None) => MeshConfig::default(),
        Ok(Some(v)) => {
            typed(object, v).map_err(|e| err(object, format!("{field}.{}", e.field), e.message))?
        }
        Err(e) => return Err(err(object, field, format!("YAML: {e}"))),
    };
    let mut providers = Providers::new();
    for (i, v) in mesh.extension_providers.into_iter().enumerate() {
        let base = format!("{field}.extensionProviders[{i}]");
        let name = v.get("name").and_then(Value::as_str).map(str::to_string);
        let report = |out: &mut Vec<Rejected>, f: String, why: String, effect: String| {
            out.push(Rejected {
                kind: "ConfigMap".into(),
                namespace: crate::ROOT_NAMESPACE.into(),
                name: MESH_CONFIG_NAME.into(),
                field: f,
                reason: why,
                effect,
            })
        };
        let (name, p) = match provider(&base, v) {
            Ok(np) => np,
            Err((f, why)) => {
                let Some(name) = name.filter(|n| !n.is_empty()) else {
                    report(
                        out,
                        f,
                        why,
                        "provider ignored (no name to be found by)".into(),
                    );
                    continue;
                };
                let effect =
                    format!("CUSTOM policies naming provider {name:?} deny what they match");
                let why = format!("{why} (provider {name:?})");
                report(out, f.clone(), why.clone(), effect);
                (name, Provider::Unusable(format!("{f}: {why}")))
            }
        };
        if providers.contains_key(&name) {
            report(
                out,
                format!("{base}.name"),
                format!("provider {name:?} is defined twice"),
                "the first definition applies".into(),
            );
            continue;
        }
        providers.insert(name, p);
    }
    Ok(providers)
}

/// CUSTOM policies whose provider cannot be asked (meshConfig has none by
/// that name, or it is unusable): reported as a policy field we cannot
/// evaluate. The waypoint denies what they match.
pub fn unresolved(
    policies: &[crate::authz::TargetedPolicy],
    providers: &Providers,
) -> Vec<Rejected> {
    policies
        .iter()
        .filter_map(|tp| {
            let name = tp.provider.as_deref()?;
            let reason = match providers.get(name) {
                Some(Provider::Unusable(why)) => format!("provider {name:?} cannot be used: {why}"),
                Some(_) => return None,
                None => format!(
                    "provider {name:?} is not among meshConfig's extensionProviders (ConfigMap {}/{MESH_CONFIG_NAME})",
                    crate::ROOT_NAMESPACE
                ),
            };
            Some(Rejected {
                kind: "AuthorizationPolicy".into(),
                namespace: tp.policy.namespace.clone(),
                name: tp.policy.name.clone(),
                field: "spec.provider.name".into(),
                reason,
                effect: "the waypoint denies what its rules match".into(),
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "ext_authz_tests.rs"]
mod tests;
