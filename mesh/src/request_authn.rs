//! RequestAuthentication (JWT) from its Kubernetes shape, for the waypoint.
//!
//! Istio's meaning: a request carrying a token that does not verify is
//! rejected (401); a request without one passes authentication with no
//! request principal, and AuthorizationPolicy decides (`requestPrincipals:
//! ["*"]` requires one). So what cannot be read fails closed by never
//! producing a principal: an object we cannot read rejects every token in
//! its scope, a rule we cannot read rejects the tokens of its issuer. Like
//! the other security objects it is never refused or left out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::authz::TargetRef;
use crate::rejected::Rejected;
use crate::security::{name_and_namespace, targets, Report};
use crate::standalone::typed;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    /// What it is attached to, as an AuthorizationPolicy's `targetRefs`;
    /// empty: selected by workload labels (sidecars and gateways), which no
    /// waypoint enforces.
    pub targets: Vec<TargetRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<JwtRule>,
    /// Why the object could not be read: every token in its scope is
    /// rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: the token's audience is not checked.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub from_headers: Vec<FromHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    pub forward_original_token: bool,
    /// How long a request waits for the JWKS to be fetched.
    pub timeout: Duration,
    /// Why this rule cannot verify tokens: its issuer's tokens are rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// Where the rule's public keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum KeySource {
    /// A JWKS document, inline.
    Inline(String),
    /// An `https` URL the waypoint fetches.
    Uri(String),
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FromHeader {
    /// Lower case.
    pub name: String,
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClaimToHeader {
    pub header: String,
    /// Dotted for a nested claim (`a.b`).
    pub claim: String,
}

impl RequestAuthentication {
    /// Whether it applies to traffic through waypoint
    /// `wp_namespace/wp_name` to `service`, as a targeted policy would.
    pub fn applies(
        &self,
        wp_namespace: &str,
        wp_name: &str,
        service: Option<crate::authz::Destination<'_>>,
    ) -> bool {
        crate::authz::targets_apply(
            &self.targets,
            &self.namespace,
            wp_namespace,
            wp_name,
            service,
        )
    }
}

/// Istio's default fetch timeout for a JWKS.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a token may be, in the order the rule lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location<'a> {
    Header { name: &'a str, prefix: &'a str },
    Param(&'a str),
    Cookie(&'a str),
}

impl JwtRule {
    /// The rule's token locations; with none given, Istio's defaults:
    /// `Authorization: Bearer <token>` and the `access_token` parameter.
    pub fn locations(&self) -> Vec<Location<'_>> {
        if self.from_headers.is_empty()
            && self.from_params.is_empty()
            && self.from_cookies.is_empty()
        {
            return vec![
                Location::Header {
                    name: "authorization",
                    prefix: "Bearer ",
                },
                Location::Param("access_token"),
            ];
        }
        let h = self.from_headers.iter().map(|h| Location::Header {
            name: &h.name,
            prefix: &h.prefix,
        });
        let p = self.from_params.iter().map(|p| Location::Param(p));
        let c = self.from_cookies.iter().map(|c| Location::Cookie(c));
        h.chain(p).chain(c).collect()
    }
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    spec: Option<Spec>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    // Read above, leniently: a bad target still scopes the object.
    #[serde(default, rename = "targetRefs")]
    _target_refs: serde::de::IgnoredAny,
    #[serde(default, rename = "targetRef")]
    _target_ref: serde::de::IgnoredAny,
    #[serde(default)]
    jwt_rules: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    from_headers: Vec<HeaderSpec>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    output_claim_to_headers: Vec<ClaimSpec>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimSpec {
    header: String,
    claim: String,
}

const ALL_REJECTED: &str = "every token in its scope is rejected (401)";
const ISSUER_REJECTED: &str = "tokens of this rule's issuer are rejected (401)";

/// Translates a RequestAuthentication; never fails (see the module comment).
pub(crate) fn request_authentication(
    value: Value,
    out: &mut Vec<Rejected>,
) -> RequestAuthentication {
    let (name, namespace) = name_and_namespace(&value);
    let object = format!("RequestAuthentication {namespace}/{name}");
    let mut report = Report {
        kind: "RequestAuthentication",
        namespace: namespace.clone(),
        name: name.clone(),
        out,
    };
    let spec = value.get("spec");
    let refs: Vec<Value> = spec
        .and_then(|s| s.get("targetRefs"))
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let single = spec.and_then(|s| s.get("targetRef")).cloned();
    let mut ra = RequestAuthentication {
        name,
        namespace,
        targets: targets(&refs, single.as_ref(), &mut report),
        selector: None,
        rules: Vec::new(),
        unreadable: None,
    };
    let o: Object = match typed(&object, value.clone()) {
        Ok(o) => o,
        Err(e) => {
            report.add(e.field.clone(), e.message.clone(), ALL_REJECTED);
            ra.unreadable = Some(format!("{}: {}", e.field, e.message));
            return ra;
        }
    };
    let spec = o.spec.unwrap_or_default();
    ra.selector = spec
        .selector
        .map(|s| s.match_labels)
        .filter(|l| !l.is_empty());
    for (i, r) in spec.jwt_rules.into_iter().enumerate() {
        ra.rules.push(rule(&object, i, r, &mut report));
    }
    ra
}

fn rule(object: &str, i: usize, value: Value, report: &mut Report) -> JwtRule {
    let base = format!("spec.jwtRules[{i}]");
    let issuer = value
        .get("issuer")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut out = JwtRule {
        issuer,
        audiences: Vec::new(),
        keys: KeySource::None,
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        forward_original_token: false,
        timeout: DEFAULT_TIMEOUT,
        unusable: None,
    };
    let mut bad = |out: &mut JwtRule, field: String, why: String| {
        report.add(field.clone(), why.clone(), ISSUER_REJECTED);
        out.unusable.get_or_insert(format!("{field}: {why}"));
    };
    let r: RuleSpec = match typed(object, value) {
        Ok(r) => r,
        Err(e) => {
            bad(&mut out, format!("{base}.{}", e.field), e.message);
            return out;
        }
    };
    if r.issuer.is_empty() {
        bad(&mut out, format!("{base}.issuer"), "empty".into());
    }
    out.keys = match (r.jwks, r.jwks_uri) {
        // Istio: inline keys win over a URI.
        (Some(j), _) => match serde_json::from_str::<serde_json::Value>(&j) {
            Ok(v) if v.get("keys").is_some_and(|k| k.is_array()) => KeySource::Inline(j),
            _ => {
                bad(
                    &mut out,
                    format!("{base}.jwks"),
                    "not a JWKS document (JSON with a \"keys\" list)".into(),
                );
                KeySource::None
            }
        },
        (None, Some(u)) if u.starts_with("https://") => KeySource::Uri(u),
        (None, Some(u)) => {
            bad(
                &mut out,
                format!("{base}.jwksUri"),
                format!("{u:?}: only https URLs are fetched"),
            );
            KeySource::None
        }
        (None, None) => {
            bad(&mut out, format!("{base}.jwksUri"), "neither jwks nor jwksUri is set (OpenID discovery from the issuer is not supported)".into());
            KeySource::None
        }
    };
    for (hi, h) in r.from_headers.into_iter().enumerate() {
        match http::HeaderName::try_from(h.name.as_str()) {
            Ok(n) => out.from_headers.push(FromHeader {
                name: n.as_str().to_string(),
                prefix: h.prefix,
            }),
            Err(_) => bad(
                &mut out,
                format!("{base}.fromHeaders[{hi}].name"),
                format!("{:?}: not a header name", h.name),
            ),
        }
    }
    out.from_params = r.from_params;
    out.from_cookies = r.from_cookies;
    let header = |field: String, h: &str| {
        http::HeaderName::try_from(h)
            .map(|n| n.as_str().to_string())
            .map_err(|_| (field, format!("{h:?}: not a header name")))
    };
    if let Some(h) = r.output_payload_to_header {
        match header(format!("{base}.outputPayloadToHeader"), &h) {
            Ok(h) => out.output_payload_to_header = Some(h),
            Err((f, why)) => bad(&mut out, f, why),
        }
    }
    for (ci, c) in r.output_claim_to_headers.into_iter().enumerate() {
        match header(
            format!("{base}.outputClaimToHeaders[{ci}].header"),
            &c.header,
        ) {
            Ok(h) if !c.claim.is_empty() => out.output_claim_to_headers.push(ClaimToHeader {
                header: h,
                claim: c.claim,
            }),
            Ok(_) => bad(
                &mut out,
                format!("{base}.outputClaimToHeaders[{ci}].claim"),
                "empty".into(),
            ),
            Err((f, why)) => bad(&mut out, f, why),
        }
    }
    out.audiences = r.audiences;
    out.forward_original_token = r.forward_original_token;
    if let Some(t) = r.timeout {
        match crate::routes::parse_duration(&t) {
            Ok(d) if !d.is_zero() => out.timeout = d,
            Ok(_) => bad(
                &mut out,
                format!("{base}.timeout"),
                "must be positive".into(),
            ),
            Err(e) => bad(&mut out, format!("{base}.timeout"), format!("{t:?}: {e}")),
        }
    }
    out
}

#[cfg(test)]
#[path = "request_authn_tests.rs"]
mod tests;
