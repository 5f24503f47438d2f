//! L4 authorization, shaped like Istio's `istio.security.Authorization` so the
//! xDS source maps onto it directly: rules are OR-ed, a rule's clauses AND-ed,
//! a clause's matches OR-ed, a match's non-empty fields AND-ed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use identity::Identity;
use ipnet::IpNet;
use serde::Serialize;

use crate::model::Workload;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Waypoint only: logged, never changes the decision.
    Audit,
    /// The request goes to an external authorizer first (the waypoint
    /// decides these before DENY and ALLOW; `evaluate` skips them). ztunnel
    /// does not enforce them, as Istio's does not.
    Custom,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector(BTreeMap<String, String>),
    /// Selected by the workload naming it (istiod resolves selectors and
    /// lists the policies on each workload).
    Listed,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

/// What a waypoint policy is attached to (in the policy's namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetRef {
    /// `Gateway` (all traffic through that waypoint), `Service`,
    /// `ServiceEntry`, or `GatewayClass` (from the root namespace: every
    /// waypoint of the class).
    /// Any other kind could not be read and covers every waypoint in the
    /// policy's namespace, so what it says fails closed.
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetedPolicy {
    pub targets: Vec<TargetRef>,
    pub policy: AuthorizationPolicy,
    /// `provider.name` of a CUSTOM policy: the extension provider asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Where a request through a waypoint goes, as a policy can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Declared by a ServiceEntry, not a Service (a policy names the kind).
    pub entry: bool,
}

impl TargetedPolicy {
    /// Whether the policy applies to traffic through waypoint
    /// `wp_namespace/wp_name` to `service`, if any.
    pub fn applies(
        &self,
        wp_namespace: &str,
        wp_name: &str,
        service: Option<Destination<'_>>,
    ) -> bool {
        targets_apply(
            &self.targets,
            &self.policy.namespace,
            wp_namespace,
            wp_name,
            service,
        )
    }
}

/// Whether an object of namespace `ns` attached to `targets` applies to
/// traffic through waypoint `wp_namespace/wp_name` to `service`, if any.
pub fn targets_apply(
    targets: &[TargetRef],
    ns: &str,
    wp_namespace: &str,
    wp_name: &str,
    service: Option<Destination<'_>>,
) -> bool {
    let named = |t: &TargetRef, entry: bool| {
        service.is_some_and(|d| d.entry == entry && d.namespace == ns && d.name == t.name)
    };
    targets.iter().any(|t| match t.kind.as_str() {
        "Gateway" => ns == wp_namespace && t.name == wp_name,
        "Service" => named(t, false),
        "ServiceEntry" => named(t, true),
        "GatewayClass" => ns == crate::ROOT_NAMESPACE && t.name == crate::routes::WAYPOINT_CLASS,
        _ => ns == wp_namespace || ns == crate::ROOT_NAMESPACE,
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
    /// Fields of this rule the source held but we cannot evaluate (left out
    /// of `clauses`). Istio's fail-closed rule: an ALLOW (or AUDIT) rule with
    /// any matches nothing; a DENY rule matches on the rest, so denies more.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unevaluable: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// Request attributes: only a waypoint can check them.
    #[serde(skip_serializing_if = "L7Match::is_empty")]
    pub l7: L7Match,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct L7Match {
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    /// `when: request.headers[name]`: (name, values, notValues).
    pub headers: Vec<(String, Vec<StringMatch>, Vec<StringMatch>)>,
    /// `requestPrincipals` (`iss/sub` of the request's verified JWT).
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    /// `when: request.auth.*`: (what, values, notValues).
    pub auth: Vec<(AuthKey, Vec<StringMatch>, Vec<StringMatch>)>,
}

/// What of a verified JWT a `when` condition reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AuthKey {
    /// `request.auth.principal`: `iss/sub`.
    Principal,
    /// `request.auth.audiences`: each `aud`.
    Audiences,
    /// `request.auth.presenter`: `azp`.
    Presenter,
    /// `request.auth.claims[a][b]`: the path into the payload.
    Claim(Vec<String>),
}

/// What the request's verified JWT says, as policy reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`.
    pub principal: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl RequestAuth {
    /// The string values `key` has: a string, or each string of a list
    /// (as Istio matches a list claim by any of its elements).
    pub fn values(&self, key: &AuthKey) -> Vec<&str> {
        fn strings(v: Option<&serde_json::Value>) -> Vec<&str> {
            match v {
                Some(serde_json::Value::String(s)) => vec![s.as_str()],
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
                _ => Vec::new(),
            }
        }
        match key {
            AuthKey::Principal => vec![self.principal.as_str()],
            AuthKey::Audiences => strings(self.claims.get("aud")),
            AuthKey::Presenter => strings(self.claims.get("azp")),
            AuthKey::Claim(path) => {
                let mut v = None;
                for (i, k) in path.iter().enumerate() {
                    v = if i == 0 {
                        self.claims.get(k)
                    } else {
                        v.and_then(|x: &serde_json::Value| x.get(k))
                    };
                }
                strings(v)
            }
        }
    }
}

impl L7Match {
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.headers.is_empty()
            && self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.auth.is_empty()
    }

    /// Whether it holds no request attribute besides the JWT ones.
    pub fn is_empty_but_auth(&self) -> bool {
        L7Match {
            request_principals: Vec::new(),
            not_request_principals: Vec::new(),
            auth: Vec::new(),
            ..self.clone()
        }
        .is_empty()
    }

    fn matches(&self, r: &HttpRequest) -> bool {
        let any = |ms: &[StringMatch], v: &str| ms.iter().any(|m| m.matches(v));
        // Hosts compare without the port, case-insensitively.
        let host = r.host.rsplit_once(':').map_or(r.host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                r.host
            }
        });
        let host = host.to_ascii_lowercase();
        let path = r.path.split('?').next().unwrap_or("");
        (self.methods.is_empty() || any(&self.methods, r.method))
            && !any(&self.not_methods, r.method)
            && (self.paths.is_empty() || any(&self.paths, path))
            && !any(&self.not_paths, path)
            && (self.hosts.is_empty() || any(&self.hosts, &host))
            && !any(&self.not_hosts, &host)
            && self.headers.iter().all(|(name, vals, nots)| {
                let v = r.headers.get(name.as_str()).and_then(|v| v.to_str().ok());
                (vals.is_empty() || v.is_some_and(|v| any(vals, v)))
                    && !v.is_some_and(|v| any(nots, v))
            })
            && self.auth_matches(r.auth)
    }

    /// Without a verified token a positive matcher fails and a negative
    /// one holds, as for peer identities.
    fn auth_matches(&self, auth: Option<&RequestAuth>) -> bool {
        let any =
            |ms: &[StringMatch], vs: &[&str]| vs.iter().any(|v| ms.iter().any(|m| m.matches(v)));
        let principal: Vec<&str> = auth.map(|a| vec![a.principal.as_str()]).unwrap_or_default();
        (self.request_principals.is_empty() || any(&self.request_principals, &principal))
            && !any(&self.not_request_principals, &principal)
            && self.auth.iter().all(|(key, vals, nots)| {
                let vs = auth.map(|a| a.values(key)).unwrap_or_default();
                (vals.is_empty() || any(vals, &vs)) && !any(nots, &vs)
            })
    }
}

/// The request a waypoint decides on.
#[derive(Clone, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Path with any query string.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The verified JWT, if the request carried one (RequestAuthentication).
    pub auth: Option<&'a RequestAuth>,
}

/// Istio's string forms: exact, `prefix*`, `*suffix`, and `*` (present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

/// What policy knows of a connection. The identity comes only from the
/// verified peer certificate, never from headers.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Present at a waypoint; a match with request attributes fails without.
    pub request: Option<HttpRequest<'a>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl Match {
    fn matches(&self, c: &Connection) -> bool {
        let ns = c.src_identity.map(|i| i.namespace.as_str());
        let principal = c.src_identity.map(|i| i.principal());
        // No identity: a positive identity matcher fails, a negative one holds.
        let any_str = |ms: &[StringMatch], v: Option<&str>| {
            v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
        };
        let any_net = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        (self.namespaces.is_empty() || any_str(&self.namespaces, ns))
            && !any_str(&self.not_namespaces, ns)
            && (self.principals.is_empty() || any_str(&self.principals, principal.as_deref()))
            && !any_str(&self.not_principals, principal.as_deref())
            && (self.source_ips.is_empty() || any_net(&self.source_ips, c.src_ip))
            && !any_net(&self.not_source_ips, c.src_ip)
            && (self.destination_ips.is_empty() || any_net(&self.destination_ips, c.dst_ip))
            && !any_net(&self.not_destination_ips, c.dst_ip)
            && (self.destination_ports.is_empty() || self.destination_ports.contains(&c.dst_port))
            && !self.not_destination_ports.contains(&c.dst_port)
            && (self.l7.is_empty() || c.request.as_ref().is_some_and(|r| self.l7.matches(r)))
    }
}

impl Rule {
    /// The rule's clauses alone; `AuthorizationPolicy::matches` adds the
    /// fail-closed treatment of `unevaluable`.
    fn matches(&self, c: &Connection) -> bool {
        self.clauses
            .iter()
            .all(|cl| cl.matches.iter().any(|m| m.matches(c)))
    }
}

impl AuthorizationPolicy {
    pub fn selects(&self, w: &Workload) -> bool {
        match &self.scope {
            Scope::Global => true,
            Scope::Namespace => *self.namespace == *w.namespace,
            Scope::WorkloadSelector(sel) => {
                *self.namespace == *w.namespace
                    && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            }
            Scope::Listed => w
                .authorization_policies
                .iter()
                .any(|k| k.split_once('/') == Some((&self.namespace, &self.name))),
        }
    }

    /// The policy as it can be enforced without seeing requests (ztunnel, or
    /// a waypoint passing bytes through at L4): request attributes become
    /// unevaluable, so an ALLOW rule needing them matches nothing and a DENY
    /// rule ignores them and denies more, as Istio does.
    pub fn l4_only(&self) -> AuthorizationPolicy {
        let mut p = self.clone();
        for r in &mut p.rules {
            let mut uses_l7 = false;
            for m in r.clauses.iter_mut().flat_map(|c| &mut c.matches) {
                uses_l7 |= !m.l7.is_empty();
                m.l7 = L7Match::default();
            }
            if uses_l7 {
                r.unevaluable
                    .push("request attributes (need a waypoint)".into());
            }
        }
        p
    }

    /// Whether a rule matches. What a DENY or CUSTOM rule cannot evaluate
    /// is left out (it denies, or asks the authorizer, about more).
    pub fn matches(&self, c: &Connection) -> bool {
        let lenient = matches!(self.action, Action::Deny | Action::Custom);
        self.rules
            .iter()
            .any(|r| (lenient || r.unevaluable.is_empty()) && r.matches(c))
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Istio's order: dry-run policies only log; CUSTOM ones were decided before
/// (by the waypoint's authorizer call) and are skipped; any DENY match
/// denies; with no ALLOW policy selecting the workload, allow; any ALLOW
/// match allows; else deny.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    dst: &Workload,
    c: &Connection,
) -> Decision {
    evaluate_selected(policies.into_iter().filter(|p| p.selects(dst)), c)
}

/// `evaluate` over policies the caller already selected (a waypoint selects
/// by targetRefs).
pub fn evaluate_selected<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    c: &Connection,
) -> Decision {
    let mut allows = Vec::new();
    for p in policies {
        if p.dry_run {
            tracing::info!(policy = %p.key(), would_match = p.matches(c), "dry-run policy");
            continue;
        }
        match p.action {
            Action::Deny if p.matches(c) => {
                return Decision::Deny(format!("denied by DENY policy {}", p.key()))
            }
            Action::Deny => {}
            Action::Audit => {
                if p.matches(c) {
                    tracing::info!(policy = %p.key(), "AUDIT policy matched");
                }
            }
            Action::Allow => allows.push(p),
            Action::Custom => {}
        }
    }
    if allows.is_empty() || allows.iter().any(|p| p.matches(c)) {
        Decision::Allow
    } else {
        Decision::Deny(format!(
            "no ALLOW policy matched (selecting: {})",
            allows
                .iter()
                .map(|p| p.key())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}
