use super::*;

fn translate(spec: &str) -> (RequestAuthentication, Vec<Rejected>) {
    let doc = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: ns}}\nspec:\n{spec}"
    );
    let mut out = Vec::new();
    let ra = request_authentication(serde_yaml::from_str(&doc).unwrap(), &mut out);
    (ra, out)
}

const JWKS: &str = r#"{"keys": []}"#;

#[test]
fn every_field_translates() {
    let (ra, rejected) = translate(&format!(
        "  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}, {{kind: Service, name: echo}}]
  jwtRules:
  - issuer: https://idp.example
    audiences: [a, b]
    jwksUri: https://idp.example/jwks.json
    fromHeaders: [{{name: X-Token, prefix: 'Tok '}}, {{name: x-raw}}]
    fromParams: [tok]
    fromCookies: [session]
    outputPayloadToHeader: X-Payload
    outputClaimToHeaders: [{{header: x-sub, claim: sub}}, {{header: x-b, claim: a.b}}]
    forwardOriginalToken: true
    timeout: 2s
  - issuer: other
    jwks: '{JWKS}'
"
    ));
    assert!(rejected.is_empty(), "{rejected:#?}");
    assert_eq!(ra.unreadable, None);
    assert_eq!(
        ra.targets
            .iter()
            .map(|t| (t.kind.as_str(), t.name.as_str()))
            .collect::<Vec<_>>(),
        [("Gateway", "waypoint"), ("Service", "echo")]
    );
    let r = &ra.rules[0];
    assert_eq!(r.issuer, "https://idp.example");
    assert_eq!(r.audiences, ["a", "b"]);
    assert_eq!(
        r.keys,
        KeySource::Uri("https://idp.example/jwks.json".into())
    );
    assert_eq!(
        r.from_headers,
        [
            FromHeader {
                name: "x-token".into(),
                prefix: "Tok ".into()
            },
            FromHeader {
                name: "x-raw".into(),
                prefix: String::new()
            }
        ]
    );
    assert_eq!(r.from_params, ["tok"]);
    assert_eq!(r.from_cookies, ["session"]);
    assert_eq!(r.output_payload_to_header.as_deref(), Some("x-payload"));
    assert_eq!(
        r.output_claim_to_headers,
        [
            ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into()
            },
            ClaimToHeader {
                header: "x-b".into(),
                claim: "a.b".into()
            }
        ]
    );
    assert!(r.forward_original_token);
    assert_eq!(r.timeout, Duration::from_secs(2));
    assert_eq!(
        r.locations(),
        [
            Location::Header {
                name: "x-token",
                prefix: "Tok "
            },
            Location::Header {
                name: "x-raw",
                prefix: ""
            },
            Location::Param("tok"),
            Location::Cookie("session"),
        ]
    );
    // Istio's defaults: no locations given, the bearer header and
    // `access_token`; the token is not forwarded; a 5 s fetch timeout.
    let d = &ra.rules[1];
    assert_eq!(d.keys, KeySource::Inline(JWKS.into()));
    assert_eq!(
        d.locations(),
        [
            Location::Header {
                name: "authorization",
                prefix: "Bearer "
            },
            Location::Param("access_token")
        ]
    );
    assert!(!d.forward_original_token && d.unusable.is_none());
    assert_eq!(d.timeout, DEFAULT_TIMEOUT);
    let (ra, rejected) = translate("  selector: {matchLabels: {app: echo}}\n  jwtRules: []\n");
    assert!(rejected.is_empty() && ra.targets.is_empty());
    assert_eq!(
        ra.selector,
        Some([("app".to_string(), "echo".to_string())].into())
    );
}

#[test]
fn bad_rules_reject_their_issuers_tokens_and_name_the_field() {
    // (rule, field reported)
    let cases = [
        (
            "{issuer: i, jwksUri: https://x/j, audience: [a]}",
            "spec.jwtRules[0].audience",
        ),
        (
            "{issuer: i, jwksUri: http://x/j}",
            "spec.jwtRules[0].jwksUri",
        ),
        ("{issuer: i}", "spec.jwtRules[0].jwksUri"),
        (
            "{issuer: '', jwksUri: https://x/j}",
            "spec.jwtRules[0].issuer",
        ),
        ("{issuer: i, jwks: 'not json'}", "spec.jwtRules[0].jwks"),
        (
            "{issuer: i, jwks: '{\"nokeys\": 1}'}",
            "spec.jwtRules[0].jwks",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, fromHeaders: [{name: 'bad header'}]}",
            "spec.jwtRules[0].fromHeaders[0].name",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, fromHeaders: [{name: x, suffix: y}]}",
            "spec.jwtRules[0].fromHeaders[0].suffix",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, outputPayloadToHeader: 'a b'}",
            "spec.jwtRules[0].outputPayloadToHeader",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, outputClaimToHeaders: [{header: x, claim: ''}]}",
            "spec.jwtRules[0].outputClaimToHeaders[0].claim",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, outputClaimToHeaders: [{header: x}]}",
            "spec.jwtRules[0].outputClaimToHeaders[0]",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, timeout: soon}",
            "spec.jwtRules[0].timeout",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, timeout: 0s}",
            "spec.jwtRules[0].timeout",
        ),
        (
            "{issuer: i, jwksUri: https://x/j, forwardOriginalToken: maybe}",
            "spec.jwtRules[0].forwardOriginalToken",
        ),
    ];
    for (rule, field) in cases {
        let (ra, rejected) = translate(&format!(
            "  targetRefs: [{{kind: Gateway, name: w}}]\n  jwtRules: [{rule}]\n"
        ));
        assert!(ra.unreadable.is_none(), "{rule}");
        assert_eq!(ra.rules.len(), 1, "{rule}: the rule is kept");
        let r = &ra.rules[0];
        assert!(
            r.unusable.as_deref().is_some_and(|u| u.starts_with(field)),
            "{rule}: {:?}",
            r.unusable
        );
        assert!(
            rejected.iter().any(|x| x.field.starts_with(field)
                && x.effect.contains("rejected (401)")
                && x.kind == "RequestAuthentication"
                && x.name == "ra"),
            "{rule}: {rejected:#?}"
        );
    }
}

#[test]
fn an_unreadable_object_rejects_every_token_in_its_scope() {
    for (spec, field) in [
        ("  targetRefs: [{kind: Gateway, name: w}]\n  jwtRulez: []\n", "spec"),
        ("  targetRefs: [{kind: Gateway, name: w}]\n  selector: {matchLabels: {a: b}, matchExpressions: []}\n", "spec.selector"),
        ("  targetRefs: [{kind: Gateway, name: w}]\n  jwtRules: {issuer: i}\n", "spec.jwtRules"),
    ] {
        let (ra, rejected) = translate(spec);
        assert!(ra.unreadable.is_some(), "{spec}");
        // Its scope is still read: it covers the waypoint it names.
        assert!(ra.applies("ns", "w", None) && !ra.applies("ns", "other", None), "{spec}");
        assert!(
            rejected.iter().any(|r| r.field.starts_with(field) && r.effect == ALL_REJECTED),
            "{spec}: {rejected:#?}"
        );
    }
}

#[test]
fn the_file_carries_it_to_the_state_and_reports_what_it_cannot_read() {
    let text = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: good, namespace: app}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  jwtRules: [{issuer: i, jwksUri: 'https://idp/jwks'}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: bad, namespace: app}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  jwtRules: [{issuer: i, jwksUri: 'https://idp/jwks', fromHeader: [{name: x}]}]
";
    // A security object is never refused: the file loads.
    let state = crate::standalone::parse(text, "cluster.local").unwrap();
    let names: Vec<_> = state
        .request_authentications
        .get("app")
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["bad", "good"]);
    let r: Vec<_> = state.rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        r,
        ["RequestAuthentication app/bad: spec.jwtRules[0].fromHeader: unknown field `fromHeader`, expected one of `issuer`, `audiences`, `jwksUri`, `jwks`, `fromHeaders`, `fromParams`, `fromCookies`, `outputPayloadToHeader`, `outputClaimToHeaders`, `forwardOriginalToken`, `timeout` (tokens of this rule's issuer are rejected (401))"]
    );
}
