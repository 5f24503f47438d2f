use super::verify::tests::{ec, sign, Key};
use super::*;
use jsonwebtoken::Algorithm;
use mesh::request_authn::{ClaimToHeader, FromHeader, DEFAULT_TIMEOUT};
use serde_json::json;

fn jwks_text(k: &Key) -> String {
    json!({"keys": [k.jwk]}).to_string()
}

fn rule(issuer: &str, k: &Key) -> JwtRule {
    JwtRule {
        issuer: issuer.into(),
        keys: KeySource::Inline(jwks_text(k)),
        ..super::verify::tests::rule(&[])
    }
}

fn ra(rules: Vec<JwtRule>) -> RequestAuthentication {
    RequestAuthentication {
        name: "ra".into(),
        namespace: "app".into(),
        targets: vec![],
        selector: None,
        rules,
        unreadable: None,
    }
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn jwks() -> Jwks {
    Jwks::new(None, Duration::from_secs(1200), Duration::from_secs(5)).unwrap()
}

use std::time::Duration;

fn tok(k: &Key, iss: &str, sub: &str) -> String {
    sign(
        k,
        Some(k.jwk["kid"].as_str().unwrap()),
        json!({"iss": iss, "sub": sub, "org": {"team": "core"}, "n": 7}),
    )
}

#[tokio::test]
async fn tokens_are_found_where_the_rule_says_and_taken_out() {
    let k = ec(Algorithm::ES256, "a");
    let t = tok(&k, "https://a", "alice");
    let j = jwks();
    let bearer = format!("Bearer {t}");
    // (rule locations, request) → the principal, and what is left of it.
    let custom = JwtRule {
        from_headers: vec![FromHeader {
            name: "x-token".into(),
            prefix: "Tok ".into(),
        }],
        from_params: vec!["tok".into()],
        from_cookies: vec!["session".into()],
        ..rule("https://a", &k)
    };
    let cases: Vec<(JwtRule, Parts, Option<&str>)> = vec![
        (
            rule("https://a", &k),
            request("/p", &[("authorization", &bearer)]),
            Some("https://a/alice"),
        ),
        (
            rule("https://a", &k),
            request(&format!("/p?a=1&access_token={t}&b=2"), &[]),
            Some("https://a/alice"),
        ),
        // Not where a rule with its own locations looks.
        (
            custom.clone(),
            request("/p", &[("authorization", &bearer)]),
            None,
        ),
        (
            custom.clone(),
            request("/p", &[("x-token", &format!("Tok {t}"))]),
            Some("https://a/alice"),
        ),
        // The prefix is required.
        (custom.clone(), request("/p", &[("x-token", &t)]), None),
        (
            custom.clone(),
            request(&format!("/p?tok={t}"), &[]),
            Some("https://a/alice"),
        ),
        (
            custom.clone(),
            request("/p", &[("cookie", &format!("a=b; session={t}"))]),
            Some("https://a/alice"),
        ),
    ];
    for (r, mut parts, want) in cases {
        let ras = [ra(vec![r])];
        let applying: Vec<_> = ras.iter().collect();
        let got = authenticate(&j, &applying, &mut parts).await.unwrap();
        assert_eq!(
            got.as_ref().map(|a| a.principal.as_str()),
            want,
            "{}",
            parts.uri
        );
        if want.is_some() {
            // Not forwarded: header and parameter gone, the rest kept.
            assert!(
                parts.headers.get("authorization").is_none()
                    && parts.headers.get("x-token").is_none()
            );
            assert!(
                !parts.uri.to_string().contains(&t) || parts.headers.contains_key("cookie"),
                "{}",
                parts.uri
            );
        }
    }
    let mut parts = request(&format!("/p?a=1&access_token={t}&b=2"), &[]);
    let ras = [ra(vec![rule("https://a", &k)])];
    authenticate(&j, &ras.iter().collect::<Vec<_>>(), &mut parts)
        .await
        .unwrap();
    assert_eq!(parts.uri, "/p?a=1&b=2");
    // forwardOriginalToken keeps it.
    let ras = [ra(vec![JwtRule {
        forward_original_token: true,
        ..rule("https://a", &k)
    }])];
    let mut parts = request("/p", &[("authorization", &bearer)]);
    authenticate(&j, &ras.iter().collect::<Vec<_>>(), &mut parts)
        .await
        .unwrap();
    assert_eq!(parts.headers["authorization"], bearer.as_str());
}

#[tokio::test]
async fn the_issuer_picks_the_rule_and_bad_tokens_are_rejected() {
    let (ka, kb) = (ec(Algorithm::ES256, "a"), ec(Algorithm::ES256, "b"));
    let j = jwks();
    let ras = [
        ra(vec![rule("https://a", &ka)]),
        ra(vec![rule("https://b", &kb)]),
    ];
    let applying: Vec<_> = ras.iter().collect();
    let run = |t: String| {
        let applying = applying.clone();
        let j = &j;
        async move {
            let mut parts = request("/", &[("authorization", &format!("Bearer {t}"))]);
            authenticate(j, &applying, &mut parts)
                .await
                .map(|a| a.map(|a| a.principal))
        }
    };
    assert_eq!(
        run(tok(&ka, "https://a", "x")).await,
        Ok(Some("https://a/x".into()))
    );
    assert_eq!(
        run(tok(&kb, "https://b", "y")).await,
        Ok(Some("https://b/y".into()))
    );
    // b's issuer, a's key: b's rule checks it, with b's keys.
    assert_eq!(
        run(sign(
            &ka,
            Some("b"),
            json!({"iss": "https://b", "sub": "z"})
        ))
        .await,
        Err(JwtReject::Signature)
    );
    assert_eq!(
        run(tok(&ka, "https://c", "x")).await,
        Err(JwtReject::UnknownIssuer)
    );
    assert_eq!(run("nope".into()).await, Err(JwtReject::Malformed));
    // A second, bad token next to a good one: rejected.
    let mut parts = request(
        &format!("/?access_token={}", tok(&kb, "https://c", "y")),
        &[(
            "authorization",
            &format!("Bearer {}", tok(&ka, "https://a", "x")),
        )],
    );
    assert_eq!(
        authenticate(&j, &applying, &mut parts).await,
        Err(JwtReject::UnknownIssuer)
    );
    // A second token at the same location, forged next to a good one:
    // verified too, so rejected (never forwarded unchecked).
    let good = format!("Bearer {}", tok(&ka, "https://a", "x"));
    let forged = format!("Bearer {}", tok(&kb, "https://a", "root"));
    let mut parts = request("/", &[("authorization", &good), ("authorization", &forged)]);
    assert_eq!(
        authenticate(&j, &applying, &mut parts).await,
        Err(JwtReject::NoKey)
    );
    let (t1, t2) = (tok(&ka, "https://a", "x"), tok(&kb, "https://a", "root"));
    let mut parts = request(&format!("/?access_token={t1}&access_token={t2}"), &[]);
    assert_eq!(
        authenticate(&j, &applying, &mut parts).await,
        Err(JwtReject::NoKey)
    );
    // No token: passes, with no principal.
    let mut parts = request("/", &[]);
    assert_eq!(authenticate(&j, &applying, &mut parts).await, Ok(None));
}

#[tokio::test]
async fn outputs_are_written_and_cannot_be_forged() {
    let k = ec(Algorithm::ES256, "a");
    let t = tok(&k, "https://a", "alice");
    let r = JwtRule {
        output_payload_to_header: Some("x-payload".into()),
        output_claim_to_headers: vec![
            ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into(),
            },
            ClaimToHeader {
                header: "x-team".into(),
                claim: "org.team".into(),
            },
            ClaimToHeader {
                header: "x-n".into(),
                claim: "n".into(),
            },
            ClaimToHeader {
                header: "x-org".into(),
                claim: "org".into(),
            },
        ],
        ..rule("https://a", &k)
    };
    let ras = [ra(vec![r])];
    let applying: Vec<_> = ras.iter().collect();
    let j = jwks();
    let mut parts = request(
        "/",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("x-org", "forged"),
        ],
    );
    authenticate(&j, &applying, &mut parts).await.unwrap();
    let h = |n: &str| {
        parts
            .headers
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(h("x-sub").as_deref(), Some("alice"));
    assert_eq!(h("x-team").as_deref(), Some("core"));
    assert_eq!(h("x-n").as_deref(), Some("7"));
    // An object claim is not written, and the forged value is gone.
    assert_eq!(h("x-org"), None);
    assert_eq!(h("x-payload").as_deref(), t.split('.').nth(1));
    let mut parts = request("/", &[("x-sub", "admin")]);
    assert_eq!(authenticate(&j, &applying, &mut parts).await, Ok(None));
    assert!(parts.headers.get("x-sub").is_none());
}

#[tokio::test]
async fn what_cannot_be_read_or_fetched_accepts_no_token() {
    let k = ec(Algorithm::ES256, "a");
    let t = tok(&k, "https://a", "alice");
    let j = jwks();
    let bearer = format!("Bearer {t}");
    let unreadable = RequestAuthentication {
        unreadable: Some("spec: bad".into()),
        ..ra(vec![])
    };
    let unusable = ra(vec![JwtRule {
        unusable: Some("timeout: bad".into()),
        ..rule("https://a", &k)
    }]);
    // Nothing listens on port 1 of loopback: the fetch fails.
    let down = ra(vec![JwtRule {
        keys: KeySource::Uri("https://127.0.0.1:1/jwks".into()),
        timeout: DEFAULT_TIMEOUT,
        ..rule("https://a", &k)
    }]);
    for (what, r, want) in [
        ("unreadable object", &unreadable, JwtReject::Unusable),
        ("unusable rule", &unusable, JwtReject::Unusable),
        ("JWKS not fetched", &down, JwtReject::JwksFetch),
    ] {
        let mut parts = request("/", &[("authorization", &bearer)]);
        assert_eq!(
            authenticate(&j, &[r], &mut parts).await,
            Err(want),
            "{what}"
        );
        // A request without a token still passes (policy decides).
        let mut parts = request("/", &[]);
        assert_eq!(authenticate(&j, &[r], &mut parts).await, Ok(None), "{what}");
    }
}
