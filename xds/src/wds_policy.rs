//! istio.security.Authorization into the mesh's policy model, failing
//! closed on what cannot be read (see `translate_policy`).

use ipnet::IpNet;
use mesh::authz::{self, AuthorizationPolicy, StringMatch};
use mesh::Rejected;
use prost::Message;

use crate::pb::istio::security as sec;
use crate::wds::ip_of;

/// What we cannot read of an Authorization fails closed, as for the
/// Kubernetes objects: an unknown scope widens to the namespace, an unknown
/// action is a DENY, a match field we cannot evaluate makes its rule match
/// nothing (ALLOW) or match on the rest (DENY), and fields this build does
/// not know (the message re-encodes shorter than it arrived) make the whole
/// policy deny everything in scope (DENY) or allow nothing (ALLOW).
pub(crate) fn translate_policy(
    p: &sec::Authorization,
    wire_len: usize,
) -> (AuthorizationPolicy, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut report = |field: &str, reason: String, effect: &str| {
        rejected.push(Rejected {
            kind: POLICY_KIND.into(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            field: field.into(),
            reason,
            effect: effect.into(),
        })
    };
    let widest = if p.namespace == mesh::ROOT_NAMESPACE {
        authz::Scope::Global
    } else {
        authz::Scope::Namespace
    };
    let scope = match sec::Scope::try_from(p.scope) {
        Ok(sec::Scope::Global) => authz::Scope::Global,
        Ok(sec::Scope::Namespace) => authz::Scope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => authz::Scope::Listed,
        Err(_) => {
            report(
                "scope",
                format!("unknown scope {}", p.scope),
                "applied to the policy's namespace",
            );
            widest
        }
    };
    let action = match sec::Action::try_from(p.action) {
        Ok(sec::Action::Allow) => authz::Action::Allow,
        Ok(sec::Action::Deny) => authz::Action::Deny,
        Err(_) => {
            report(
                "action",
                format!("unknown action {}", p.action),
                "treated as DENY",
            );
            authz::Action::Deny
        }
    };
    let rule_effect = if action == authz::Action::Deny {
        "the DENY rule ignores it and denies more"
    } else {
        "the rule matches nothing"
    };
    let strings = |ms: &[sec::StringMatch]| -> Result<Vec<StringMatch>, String> {
        ms.iter()
            .map(|m| match &m.match_type {
                Some(sec::string_match::MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
                Some(sec::string_match::MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
                Some(sec::string_match::MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
                Some(sec::string_match::MatchType::Presence(_)) => Ok(StringMatch::Presence),
                None => Err("string match with no match type".to_string()),
            })
            .collect()
    };
    // A service account match is any trust domain's principal for it; a
    // principal is `<td>/ns/<ns>/sa/<sa>` and neither part may hold a '/'.
    let accounts = |ms: &[sec::ServiceAccountMatch]| -> Vec<StringMatch> {
        ms.iter()
            .map(|m| StringMatch::Suffix(format!("/ns/{}/sa/{}", m.namespace, m.service_account)))
            .collect()
    };
    let nets = |addrs: &[sec::Address]| -> Result<Vec<IpNet>, String> {
        addrs
            .iter()
            .map(|a| {
                let ip = ip_of(&a.address)?;
                IpNet::new(ip, a.length as u8)
                    .map_err(|_| format!("prefix length {} for {ip}", a.length))
            })
            .collect()
    };
    let ports = |ps: &[u32]| -> Result<Vec<u16>, String> {
        ps.iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("port {p}")))
            .collect()
    };
    // Sized up front: a policy lives as long as istiod keeps it, and a
    // `Match` is large (a vector grown by push keeps room for four).
    let mut rules = Vec::with_capacity(p.groups.len());
    for (gi, g) in p.groups.iter().enumerate() {
        let mut rule = authz::Rule::default();
        rule.clauses.reserve_exact(g.rules.len());
        for (ri, r) in g.rules.iter().enumerate() {
            let mut matches = Vec::with_capacity(r.matches.len());
            for (mi, m) in r.matches.iter().enumerate() {
                let base = format!("groups[{gi}].rules[{ri}].matches[{mi}]");
                // Each field either evaluates or is left out and named.
                let mut bad = |field: &str, why: String| {
                    let field = format!("{base}.{field}");
                    report(&field, why, rule_effect);
                    rule.unevaluable.push(field);
                };
                fn take<T>(
                    field: &str,
                    v: Result<Vec<T>, String>,
                    bad: &mut dyn FnMut(&str, String),
                ) -> Vec<T> {
                    let mut v = v.unwrap_or_else(|why| {
                        bad(field, why);
                        Vec::new()
                    });
                    v.shrink_to_fit();
                    v
                }
                let mut principals = take("principals", strings(&m.principals), &mut bad);
                principals.extend(accounts(&m.service_accounts));
                let mut not_principals =
                    take("not_principals", strings(&m.not_principals), &mut bad);
                not_principals.extend(accounts(&m.not_service_accounts));
                matches.push(authz::Match {
                    namespaces: take("namespaces", strings(&m.namespaces), &mut bad),
                    not_namespaces: take("not_namespaces", strings(&m.not_namespaces), &mut bad),
                    principals,
                    not_principals,
                    source_ips: take("source_ips", nets(&m.source_ips), &mut bad),
                    not_source_ips: take("not_source_ips", nets(&m.not_source_ips), &mut bad),
                    destination_ips: take("destination_ips", nets(&m.destination_ips), &mut bad),
                    not_destination_ips: take(
                        "not_destination_ips",
                        nets(&m.not_destination_ips),
                        &mut bad,
                    ),
                    destination_ports: take(
                        "destination_ports",
                        ports(&m.destination_ports),
                        &mut bad,
                    ),
                    not_destination_ports: take(
                        "not_destination_ports",
                        ports(&m.not_destination_ports),
                        &mut bad,
                    ),
                    l7: Default::default(),
                });
            }
            rule.clauses.push(authz::Clause { matches });
        }
        rules.push(rule);
    }
    if p.encoded_len() != wire_len {
        let effect = if action == authz::Action::Deny {
            "the policy denies all it covers"
        } else {
            "the policy allows nothing it covers"
        };
        report("", "fields this build does not know".into(), effect);
        rules = vec![authz::Rule {
            clauses: Vec::new(),
            unevaluable: vec!["unknown fields".into()],
        }];
    }
    let policy = AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: p.dry_run,
    };
    (policy, rejected)
}

/// How a policy is named in reports: the resource type istiod sends.
const POLICY_KIND: &str = "Authorization";

pub(crate) fn undecodable_policy(
    namespace: &str,
    name: &str,
    e: &prost::DecodeError,
) -> (AuthorizationPolicy, Vec<Rejected>) {
    let scope = if namespace == mesh::ROOT_NAMESPACE {
        authz::Scope::Global
    } else {
        authz::Scope::Namespace
    };
    let policy = AuthorizationPolicy {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action: authz::Action::Deny,
        rules: vec![authz::Rule {
            clauses: Vec::new(),
            unevaluable: vec!["undecodable".into()],
        }],
        dry_run: false,
    };
    let rejected = Rejected {
        kind: POLICY_KIND.into(),
        namespace: namespace.into(),
        name: name.into(),
        field: String::new(),
        reason: format!("cannot decode: {e}"),
        effect: "denies everything in its namespace".into(),
    };
    (policy, vec![rejected])
}
