//! AuthorizationPolicy and PeerAuthentication from their Kubernetes shapes.
//!
//! Security objects are never refused or left out: an object that vanished
//! would allow what it was written to deny. What we cannot evaluate is
//! reported (`Rejected`) and made to fail closed, following Istio:
//! - a field we cannot evaluate makes its rule unevaluable: an ALLOW rule
//!   then matches nothing, a DENY rule matches on the rest (denies more);
//! - an unknown action, a CUSTOM one without a provider name, or a provider
//!   with another action, is a DENY for its scope (a CUSTOM policy naming a
//!   provider the waypoint does not know denies there, at request time);
//! - a CUSTOM policy with a selector is not enforced, as Istio's ztunnel
//!   does not enforce CUSTOM (reported; attach it to a waypoint);
//! - a selector or target we cannot read widens to the policy's namespace;
//! - a policy we cannot read at all denies everything in its scope (DENY,
//!   CUSTOM, unknown) or allows nothing there (ALLOW);
//! - a PeerAuthentication we cannot read is STRICT for its scope.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::Value;

use crate::authz::{
    Action, AuthKey, AuthorizationPolicy, Clause, L7Match, Match, Rule, Scope, StringMatch,
    TargetRef, TargetedPolicy,
};
use crate::model::{MtlsMode, PeerAuthentication};
use crate::rejected::Rejected;
use crate::standalone::typed;
use crate::ROOT_NAMESPACE;

/// Fields a newer API (or a typo) added: kept so they can be reported.
type Unknown = BTreeMap<String, Value>;

/// Name and namespace are read before the spec, leniently.
#[derive(Deserialize)]
struct Object<S> {
    #[serde(default = "Option::default")]
    spec: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AuthzSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_refs: Vec<Value>,
    #[serde(default)]
    target_ref: Option<Value>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Vec<AuthzRule>,
    #[serde(default)]
    provider: Option<Value>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
struct AuthzRule {
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    to: Vec<To>,
    #[serde(default)]
    when: Vec<Condition>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
struct From {
    #[serde(default)]
    source: Source,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
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
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
struct To {
    #[serde(default)]
    operation: Operation,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u64),
    Str(String),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
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
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

/// Where an object's findings go.
pub(crate) struct Report<'a> {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub out: &'a mut Vec<Rejected>,
}

impl Report<'_> {
    pub(crate) fn add(
        &mut self,
        field: impl Into<String>,
        reason: impl Into<String>,
        effect: &str,
    ) {
        self.out.push(Rejected {
            kind: self.kind.to_string(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
            effect: effect.to_string(),
        });
    }

    fn unknown(&mut self, base: &str, unknown: &Unknown, effect: &str) {
        for k in unknown.keys() {
            let field = if base.is_empty() {
                k.clone()
            } else {
                format!("{base}.{k}")
            };
            self.add(field, "unknown field", effect);
        }
    }
}

/// Who enforces a policy: selector-scoped ones ztunnel, targeted ones a waypoint.
pub(crate) enum ParsedPolicy {
    Ztunnel(AuthorizationPolicy),
    Waypoint(TargetedPolicy),
}

fn rule_effect(action: Action) -> &'static str {
    match action {
        Action::Deny => "the DENY rule ignores it and denies more",
        Action::Custom => "the CUSTOM rule ignores it and sends more requests to the authorizer",
        Action::Allow | Action::Audit => "the rule matches nothing",
    }
}

/// Istio's `istio.io/dry-run: "true"`: the policy is evaluated and logged,
/// never enforced.
fn dry_run(value: &Value) -> bool {
    value
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get("istio.io/dry-run"))
        .and_then(Value::as_str)
        == Some("true")
}

pub(crate) fn name_and_namespace(value: &Value) -> (String, String) {
    let meta = value.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    (
        get("name").unwrap_or_default().to_string(),
        get("namespace").unwrap_or("default").to_string(),
    )
}

/// Translates an AuthorizationPolicy; never fails (see the module comment).
pub(crate) fn authorization_policy(value: Value, out: &mut Vec<Rejected>) -> ParsedPolicy {
    let (name, namespace) = name_and_namespace(&value);
    let object = format!("AuthorizationPolicy {namespace}/{name}");
    let mut report = Report {
        kind: "AuthorizationPolicy",
        namespace: namespace.clone(),
        name: name.clone(),
        out,
    };
    let o: Object<AuthzSpec> = match typed(&object, value.clone()) {
        Ok(o) => o,
        Err(e) => return unreadable_policy(&value, name, namespace, &e.field, &e.message, report),
    };
    let spec = o.spec.unwrap_or_default();
    let targets = targets(&spec.target_refs, spec.target_ref.as_ref(), &mut report);
    let for_waypoint = !targets.is_empty();
    let (action, provider) = action(spec.action.as_deref(), spec.provider.as_ref(), &mut report);
    if action == Action::Custom && !for_waypoint {
        report.add(
            "spec.action",
            "ztunnel does not enforce the CUSTOM action (neither does Istio's); a waypoint does, for a policy with targetRefs",
            "not enforced",
        );
    }
    let scope = scope(spec.selector.as_ref(), &namespace, &mut report);
    let mut rules = Vec::new();
    if !spec.unknown.is_empty() {
        // A spec-level field could change the meaning of every rule.
        report.unknown(
            "spec",
            &spec.unknown,
            "the policy denies all it covers (DENY) or allows nothing (ALLOW)",
        );
        rules.push(Rule {
            clauses: Vec::new(),
            unevaluable: spec.unknown.keys().map(|k| format!("spec.{k}")).collect(),
        });
    } else {
        for (ri, r) in spec.rules.iter().enumerate() {
            rules.push(rule(ri, r, action, for_waypoint, &mut report));
        }
    }
    let policy = AuthorizationPolicy {
        name,
        namespace,
        scope,
        action,
        rules,
        dry_run: dry_run(&value),
    };
    if for_waypoint {
        ParsedPolicy::Waypoint(TargetedPolicy {
            targets,
            policy,
            provider,
        })
    } else {
        ParsedPolicy::Ztunnel(policy.l4_only())
    }
}

/// A policy whose shape we cannot read: read what scope we can and make it
/// deny everything there (or, for ALLOW, allow nothing there).
fn unreadable_policy(
    value: &Value,
    name: String,
    namespace: String,
    field: &str,
    message: &str,
    mut report: Report,
) -> ParsedPolicy {
    let spec = value.get("spec");
    let get = |k: &str| spec.and_then(|s| s.get(k));
    let action = match get("action").and_then(Value::as_str) {
        Some("ALLOW") | None => Action::Allow,
        Some("AUDIT") => Action::Audit,
        Some(_) => Action::Deny,
    };
    let effect = if action == Action::Deny {
        "the policy denies all it covers"
    } else {
        "the policy allows nothing it covers"
    };
    report.add(field, message, effect);
    let mut scratch = Vec::new();
    let mut quiet = Report {
        kind: report.kind,
        namespace: namespace.clone(),
        name: name.clone(),
        out: &mut scratch,
    };
    let refs: Vec<Value> = get("targetRefs")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let targets = targets(&refs, get("targetRef"), &mut quiet);
    let selector: Option<Selector> = get("selector").map(|s| {
        let labels = s.get("matchLabels").and_then(Value::as_mapping);
        let match_labels: BTreeMap<String, String> = labels
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        // Labels we could not read all widen to the namespace.
        let complete = labels.is_some_and(|m| m.len() == match_labels.len());
        Selector {
            unknown: if complete {
                Unknown::new()
            } else {
                [("matchLabels".to_string(), Value::Null)].into()
            },
            match_labels,
        }
    });
    let scope = scope(selector.as_ref(), &namespace, &mut quiet);
    let policy = AuthorizationPolicy {
        name,
        namespace,
        scope,
        action,
        rules: vec![Rule {
            clauses: Vec::new(),
            unevaluable: vec![if field.is_empty() {
                "spec".into()
            } else {
                field.to_string()
            }],
        }],
        dry_run: false,
    };
    if targets.is_empty() {
        ParsedPolicy::Ztunnel(policy)
    } else {
        ParsedPolicy::Waypoint(TargetedPolicy {
            targets,
            policy,
            provider: None,
        })
    }
}

pub(crate) fn targets(
    refs: &[Value],
    single: Option<&Value>,
    report: &mut Report,
) -> Vec<TargetRef> {
    let mut out = Vec::new();
    for (i, t) in refs.iter().chain(single).enumerate() {
        let field = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (kind, name) = (field("kind"), field("name"));
        let path = if i < refs.len() {
            format!("spec.targetRefs[{i}]")
        } else {
            "spec.targetRef".to_string()
        };
        match kind.as_str() {
            "Gateway" | "Service" | "ServiceEntry" | "GatewayClass" if !name.is_empty() => {}
            _ => report.add(
                path,
                format!("target kind {kind:?} name {name:?}: want a Gateway, Service, ServiceEntry or GatewayClass by name"),
                "applied to every waypoint in the policy's namespace",
            ),
        }
        out.push(TargetRef { kind, name });
    }
    out
}

/// The action, and for CUSTOM the provider it names.
fn action(
    action: Option<&str>,
    provider: Option<&Value>,
    report: &mut Report,
) -> (Action, Option<String>) {
    const AS_DENY: &str = "treated as DENY for the policy's scope";
    let name = provider
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let deny = |report: &mut Report, field: &str, why: String| {
        report.add(field, why, AS_DENY);
        (Action::Deny, None)
    };
    match action.unwrap_or("ALLOW") {
        "CUSTOM" if !name.is_empty() => (Action::Custom, Some(name.to_string())),
        "CUSTOM" => deny(
            report,
            "spec.provider.name",
            "a CUSTOM policy must name its provider".into(),
        ),
        other if provider.is_some() => deny(
            report,
            "spec.provider",
            format!("a provider is only for action CUSTOM, not {other:?}"),
        ),
        "ALLOW" => (Action::Allow, None),
        "DENY" => (Action::Deny, None),
        "AUDIT" => (Action::Audit, None),
        other => deny(
            report,
            "spec.action",
            format!("action {other:?} is not supported"),
        ),
    }
}

fn scope(selector: Option<&Selector>, namespace: &str, report: &mut Report) -> Scope {
    let widest = if namespace == ROOT_NAMESPACE {
        Scope::Global
    } else {
        Scope::Namespace
    };
    match selector {
        Some(sel) if !sel.unknown.is_empty() => {
            report.unknown(
                "spec.selector",
                &sel.unknown,
                "the policy applies to its whole namespace",
            );
            widest
        }
        Some(sel) if !sel.match_labels.is_empty() => {
            Scope::WorkloadSelector(sel.match_labels.clone())
        }
        _ => widest,
    }
}

/// One rule: every field we cannot evaluate is left out and named in
/// `unevaluable` (and the report).
fn rule(ri: usize, r: &AuthzRule, action: Action, for_waypoint: bool, report: &mut Report) -> Rule {
    let effect = rule_effect(action);
    let mut rule = Rule::default();
    let bad = |rule: &mut Rule, field: String, reason: String, report: &mut Report| {
        report.add(field.clone(), reason, effect);
        rule.unevaluable.push(field);
    };
    let unknown = |rule: &mut Rule, base: &str, fields: &Unknown, report: &mut Report| {
        for k in fields.keys() {
            bad(rule, format!("{base}.{k}"), "unknown field".into(), report);
        }
    };
    let base = format!("spec.rules[{ri}]");
    unknown(&mut rule, &base, &r.unknown, report);
    if !r.from.is_empty() {
        let mut clause = Clause::default();
        for (fi, f) in r.from.iter().enumerate() {
            let base = format!("{base}.from[{fi}]");
            unknown(&mut rule, &base, &f.unknown, report);
            let s = &f.source;
            let base = format!("{base}.source");
            unknown(&mut rule, &base, &s.unknown, report);
            // Request principals come from a verified JWT: a waypoint
            // checks them; for ztunnel `l4_only` makes them unevaluable.
            for (field, v) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if !v.is_empty() && !for_waypoint {
                    let why = "request principals (JWT) need a waypoint; ztunnel enforces L4 only";
                    report.add(format!("{base}.{field}"), why, effect);
                }
            }
            let net_field = |field: &str, v: &[String], rule: &mut Rule, report: &mut Report| {
                nets(v).unwrap_or_else(|why| {
                    bad(
                        rule,
                        format!("{base}.{field}{why}"),
                        "not an IP address or CIDR".into(),
                        report,
                    );
                    Vec::new()
                })
            };
            let mut src = net_field("ipBlocks", &s.ip_blocks, &mut rule, report);
            src.extend(net_field(
                "remoteIpBlocks",
                &s.remote_ip_blocks,
                &mut rule,
                report,
            ));
            let mut not_src = net_field("notIpBlocks", &s.not_ip_blocks, &mut rule, report);
            not_src.extend(net_field(
                "notRemoteIpBlocks",
                &s.not_remote_ip_blocks,
                &mut rule,
                report,
            ));
            clause.matches.push(Match {
                principals: strs(&s.principals),
                not_principals: strs(&s.not_principals),
                namespaces: strs(&s.namespaces),
                not_namespaces: strs(&s.not_namespaces),
                source_ips: src,
                not_source_ips: not_src,
                l7: L7Match {
                    request_principals: strs(&s.request_principals),
                    not_request_principals: strs(&s.not_request_principals),
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        rule.clauses.push(clause);
    }
    if !r.to.is_empty() {
        let mut clause = Clause::default();
        for (ti, t) in r.to.iter().enumerate() {
            let base = format!("{base}.to[{ti}]");
            unknown(&mut rule, &base, &t.unknown, report);
            let op = &t.operation;
            let base = format!("{base}.operation");
            unknown(&mut rule, &base, &op.unknown, report);
            let port_field =
                |field: &str, v: &[IntOrString], rule: &mut Rule, report: &mut Report| {
                    ports(v).unwrap_or_else(|why| {
                        bad(
                            rule,
                            format!("{base}.{field}{why}"),
                            "not a port number".into(),
                            report,
                        );
                        Vec::new()
                    })
                };
            let lower = |v: &[String]| -> Vec<StringMatch> {
                v.iter()
                    .map(|h| StringMatch::parse(&h.to_ascii_lowercase()))
                    .collect()
            };
            clause.matches.push(Match {
                destination_ports: port_field("ports", &op.ports, &mut rule, report),
                not_destination_ports: port_field("notPorts", &op.not_ports, &mut rule, report),
                l7: L7Match {
                    methods: strs(&op.methods),
                    not_methods: strs(&op.not_methods),
                    paths: strs(&op.paths),
                    not_paths: strs(&op.not_paths),
                    hosts: lower(&op.hosts),
                    not_hosts: lower(&op.not_hosts),
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        rule.clauses.push(clause);
    }
    for (ci, c) in r.when.iter().enumerate() {
        let base = format!("{base}.when[{ci}]");
        unknown(&mut rule, &base, &c.unknown, report);
        match condition(c) {
            Ok(m) => {
                if !for_waypoint && !m.l7.auth.is_empty() {
                    let why = format!(
                        "{:?}: JWT claims need a waypoint; ztunnel enforces L4 only",
                        c.key
                    );
                    report.add(format!("{base}.key"), why, effect);
                }
                rule.clauses.push(Clause { matches: vec![m] })
            }
            Err(why) => bad(
                &mut rule,
                format!("{base}.key"),
                format!("{:?}: {why}", c.key),
                report,
            ),
        }
    }
    // Request attributes in a ztunnel policy are reported here; `l4_only`
    // turns them into unevaluable fields.
    if !for_waypoint
        && rule
            .clauses
            .iter()
            .flat_map(|c| &c.matches)
            .any(|m| !m.l7.is_empty_but_auth())
    {
        report.add(base, "request attributes (methods, paths, hosts, headers) need a waypoint; ztunnel enforces L4 only", effect);
    }
    rule
}

/// A `when` condition; Err says why it cannot be evaluated here.
fn condition(c: &Condition) -> Result<Match, String> {
    let mut m = Match::default();
    let (vals, nots) = (&c.values, &c.not_values);
    let bad_value = |what: &str| format!("a value is not {what}");
    match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            m.source_ips = nets(vals).map_err(|_| bad_value("an IP address or CIDR"))?;
            m.not_source_ips = nets(nots).map_err(|_| bad_value("an IP address or CIDR"))?;
        }
        "destination.ip" => {
            m.destination_ips = nets(vals).map_err(|_| bad_value("an IP address or CIDR"))?;
            m.not_destination_ips = nets(nots).map_err(|_| bad_value("an IP address or CIDR"))?;
        }
        "destination.port" => {
            let as_ports = |v: &[String]| {
                ports(
                    &v.iter()
                        .map(|s| IntOrString::Str(s.clone()))
                        .collect::<Vec<_>>(),
                )
                .map_err(|_| bad_value("a port number"))
            };
            m.destination_ports = as_ports(vals)?;
            m.not_destination_ports = as_ports(nots)?;
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
        "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
            let key = match c.key.as_str() {
                "request.auth.principal" => AuthKey::Principal,
                "request.auth.audiences" => AuthKey::Audiences,
                _ => AuthKey::Presenter,
            };
            m.l7.auth.push((key, strs(vals), strs(nots)));
        }
        key if key.starts_with("request.auth.claims[") => {
            let path = claim_path(&key["request.auth.claims".len()..])
                .ok_or("want request.auth.claims[name], or [a][b] for a nested claim")?;
            m.l7.auth
                .push((AuthKey::Claim(path), strs(vals), strs(nots)));
        }
        _ => return Err("this condition key is not supported".into()),
    }
    Ok(m)
}

/// `[a][b]` as its names; None when it is not that shape.
fn claim_path(mut s: &str) -> Option<Vec<String>> {
    let mut path = Vec::new();
    while let Some(rest) = s.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        path.push(name.to_string());
        s = after;
    }
    (s.is_empty() && !path.is_empty()).then_some(path)
}

/// Err holds the failing index as a field suffix, e.g. `[1]`.
fn nets(v: &[String]) -> Result<Vec<IpNet>, String> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("[{i}]"))
        })
        .collect()
}

fn ports(v: &[IntOrString]) -> Result<Vec<u16>, String> {
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            match p {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::Str(s) => s.parse().ok(),
            }
            .ok_or_else(|| format!("[{i}]"))
        })
        .collect()
}

fn strs(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PeerAuthSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    port_level_mtls: serde_yaml::Mapping,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Deserialize, Default)]
struct MtlsSpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(flatten)]
    unknown: Unknown,
}

/// Translates a PeerAuthentication; never fails: what cannot be read
/// makes the object STRICT for its scope.
pub(crate) fn peer_authentication(value: Value, out: &mut Vec<Rejected>) -> PeerAuthentication {
    const STRICT: &str = "STRICT for the object's scope";
    let (name, namespace) = name_and_namespace(&value);
    let object = format!("PeerAuthentication {namespace}/{name}");
    let mut report = Report {
        kind: "PeerAuthentication",
        namespace: namespace.clone(),
        name: name.clone(),
        out,
    };
    let strict = |selector| PeerAuthentication {
        name: name.clone(),
        namespace: namespace.clone(),
        selector,
        mode: MtlsMode::Strict,
        port_level: BTreeMap::new(),
    };
    let o: Object<PeerAuthSpec> = match typed(&object, value.clone()) {
        Ok(o) => o,
        Err(e) => {
            report.add(e.field, e.message, STRICT);
            // A selector we cannot read widens to the namespace.
            let selector = value
                .get("spec")
                .and_then(|s| s.get("selector"))
                .and_then(|s| serde_yaml::from_value::<Selector>(s.clone()).ok())
                .filter(|s| s.unknown.is_empty() && !s.match_labels.is_empty())
                .map(|s| s.match_labels);
            return strict(selector);
        }
    };
    let spec = o.spec.unwrap_or_default();
    let selector = match &spec.selector {
        Some(s) if !s.unknown.is_empty() => {
            report.unknown(
                "spec.selector",
                &s.unknown,
                "STRICT for the whole namespace",
            );
            return strict(None);
        }
        Some(s) if !s.match_labels.is_empty() => Some(s.match_labels.clone()),
        _ => None,
    };
    if !spec.unknown.is_empty() {
        report.unknown("spec", &spec.unknown, STRICT);
        return strict(selector);
    }
    let fail = std::cell::Cell::new(false);
    let mode = |field: String, m: Option<&MtlsSpec>, report: &mut Report| -> MtlsMode {
        let Some(m) = m else { return MtlsMode::Unset };
        if !m.unknown.is_empty() {
            report.unknown(&field, &m.unknown, STRICT);
            fail.set(true);
            return MtlsMode::Strict;
        }
        match m.mode.as_deref().unwrap_or("UNSET") {
            "UNSET" => MtlsMode::Unset,
            "DISABLE" => MtlsMode::Disable,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            other => {
                report.add(
                    format!("{field}.mode"),
                    format!("{other:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"),
                    STRICT,
                );
                MtlsMode::Strict
            }
        }
    };
    let top = mode("spec.mtls".into(), spec.mtls.as_ref(), &mut report);
    let mut port_level = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let key = match port {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let field = format!("spec.portLevelMtls.{key}");
        let port_mode = match serde_yaml::from_value::<MtlsSpec>(m.clone()) {
            Ok(m) => mode(field.clone(), Some(&m), &mut report),
            Err(e) => {
                report.add(field.clone(), e.to_string(), STRICT);
                fail.set(true);
                MtlsMode::Strict
            }
        };
        match key.parse::<u16>() {
            Ok(p) if selector.is_some() => {
                port_level.insert(p, port_mode);
            }
            Ok(_) => report.add(
                field,
                "port-level mTLS requires a workload selector",
                STRICT,
            ),
            Err(_) => report.add(field, "not a port number", STRICT),
        }
    }
    let unreadable_ports = port_level.len() != spec.port_level_mtls.len();
    if fail.get() || unreadable_ports {
        return strict(selector);
    }
    PeerAuthentication {
        name,
        namespace,
        selector,
        mode: top,
        port_level,
    }
}
