use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{EncodingKey, Header};
use mesh::request_authn::{KeySource, DEFAULT_TIMEOUT};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use serde_json::json;

/// A signing key made here with ring, and its public JWK.
pub(crate) struct Key {
    alg: Algorithm,
    enc: EncodingKey,
    pub(crate) jwk: serde_json::Value,
}

pub(crate) fn ec(alg: Algorithm, kid: &str) -> Key {
    let (ring_alg, crv) = match alg {
        Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256"),
        _ => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384"),
    };
    let rng = SystemRandom::new();
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).unwrap();
    let pair = signature::EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).unwrap();
    // Uncompressed point: 0x04, x, y.
    let point = pair.public_key().as_ref();
    let n = (point.len() - 1) / 2;
    Key {
        alg,
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": crv, "kid": kid, "use": "sig",
            "x": B64.encode(&point[1..1 + n]), "y": B64.encode(&point[1 + n..])}),
    }
}

fn ed(kid: &str) -> Key {
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Key {
        alg: Algorithm::EdDSA,
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": B64.encode(pair.public_key().as_ref())}),
    }
}

pub(crate) fn sign(k: &Key, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut h = Header::new(k.alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, &claims, &k.enc).unwrap()
}

pub(crate) fn set(keys: &[&Key]) -> JwkSet {
    serde_json::from_value(json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}))
        .unwrap()
}

pub(crate) fn rule(audiences: &[&str]) -> JwtRule {
    JwtRule {
        issuer: "https://idp".into(),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        keys: KeySource::None,
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec![],
        output_payload_to_header: None,
        output_claim_to_headers: vec![],
        forward_original_token: false,
        timeout: DEFAULT_TIMEOUT,
        unusable: None,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn each_algorithm_verifies_with_its_key_only() {
    let keys = [
        ec(Algorithm::ES256, "p256"),
        ec(Algorithm::ES384, "p384"),
        ed("ed"),
    ];
    let all = set(&keys.iter().collect::<Vec<_>>());
    let claims = json!({"iss": "https://idp", "sub": "alice", "aud": "api", "exp": now() + 600});
    for k in &keys {
        let kid = k.jwk["kid"].as_str().unwrap();
        let t = sign(k, Some(kid), claims.clone());
        let got = verify(&t, &rule(&["api"]), &all).unwrap_or_else(|e| panic!("{:?}: {e}", k.alg));
        assert_eq!(got["sub"], "alice");
        // Without a kid, the key that fits is found.
        assert!(
            verify(&sign(k, None, claims.clone()), &rule(&[]), &all).is_ok(),
            "{:?}",
            k.alg
        );
        // A set without its key: no key to match.
        let others = set(&keys
            .iter()
            .filter(|o| o.jwk["kid"] != kid)
            .collect::<Vec<_>>());
        assert_eq!(
            verify(&t, &rule(&[]), &others),
            Err(JwtReject::NoKey),
            "{:?}",
            k.alg
        );
    }
}

/// (what, token, audiences, outcome)
type Case<'a> = (&'a str, String, Vec<&'a str>, Result<(), JwtReject>);

#[test]
fn claims_and_signatures_fail_with_envoys_reasons() {
    let k = ec(Algorithm::ES256, "k");
    let keys = set(&[&k]);
    let t = |c: serde_json::Value| sign(&k, Some("k"), c);
    let base = |extra: serde_json::Value| {
        let mut c = json!({"iss": "https://idp", "sub": "s", "aud": ["api", "web"]});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let n = now();
    let good = t(base(json!({})));
    let sig_at = good.rfind('.').unwrap() + 5;
    let mut tampered = good.clone().into_bytes();
    tampered[sig_at] = if tampered[sig_at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // A payload swapped under a valid signature.
    let forged_payload = B64.encode(br#"{"iss":"https://idp","sub":"root","aud":"api"}"#);
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[1] = &forged_payload;
    let swapped = parts.join(".");
    let other_key = ec(Algorithm::ES256, "k");
    let cases: Vec<Case> = vec![
        (
            "exp that is not a number (would never expire)",
            t(base(json!({"exp": "1"}))),
            vec![],
            Err(JwtReject::Malformed),
        ),
        (
            "negative exp",
            t(base(json!({"exp": -5}))),
            vec![],
            Err(JwtReject::Malformed),
        ),
        (
            "nbf that is not a number",
            t(base(json!({"nbf": "soon"}))),
            vec![],
            Err(JwtReject::Malformed),
        ),
        (
            "valid, no exp (Envoy does not require one)",
            good.clone(),
            vec!["api"],
            Ok(()),
        ),
        (
            "any listed audience",
            good.clone(),
            vec!["other", "web"],
            Ok(()),
        ),
        (
            "audiences unchecked when none are listed",
            good.clone(),
            vec![],
            Ok(()),
        ),
        (
            "wrong audience",
            good.clone(),
            vec!["other"],
            Err(JwtReject::Audience),
        ),
        (
            "no aud claim but audiences listed",
            t(json!({"iss": "https://idp", "sub": "s"})),
            vec!["api"],
            Err(JwtReject::Audience),
        ),
        (
            "expired",
            t(base(json!({"exp": n - 3600}))),
            vec![],
            Err(JwtReject::Expired),
        ),
        (
            "expired within the 60 s skew",
            t(base(json!({"exp": n - 30}))),
            vec![],
            Ok(()),
        ),
        (
            "not yet valid",
            t(base(json!({"nbf": n + 3600}))),
            vec![],
            Err(JwtReject::NotYetValid),
        ),
        (
            "not yet valid within the skew",
            t(base(json!({"nbf": n + 30}))),
            vec![],
            Ok(()),
        ),
        (
            "another issuer",
            t(json!({"iss": "https://evil", "sub": "s"})),
            vec![],
            Err(JwtReject::UnknownIssuer),
        ),
        (
            "tampered signature",
            tampered,
            vec![],
            Err(JwtReject::Signature),
        ),
        (
            "payload swapped",
            swapped,
            vec![],
            Err(JwtReject::Signature),
        ),
        (
            "signed by another key with the same kid",
            sign(&other_key, Some("k"), base(json!({}))),
            vec![],
            Err(JwtReject::Signature),
        ),
        ("not a JWT", "a.b".into(), vec![], Err(JwtReject::Malformed)),
        (
            "HS256 is never accepted",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &base(json!({})),
                &EncodingKey::from_secret(b"s"),
            )
            .unwrap(),
            vec![],
            Err(JwtReject::NoKey),
        ),
    ];
    for (what, token, aud, want) in cases {
        let got = verify(&token, &rule(&aud), &keys).map(|_| ());
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn peek_reads_the_issuer_and_kid_unverified() {
    let k = ed("e1");
    let u = peek(&sign(&k, Some("e1"), json!({"iss": "https://idp"}))).unwrap();
    assert_eq!(
        (u.issuer.as_str(), u.kid.as_deref(), u.alg),
        ("https://idp", Some("e1"), Algorithm::EdDSA)
    );
    assert_eq!(peek("x.y.z").err(), Some(JwtReject::Malformed));
    let keys = set(&[&k]);
    assert!(has_key(&keys, Some("e1")) && has_key(&keys, None) && !has_key(&keys, Some("e2")));
}

#[test]
fn a_key_without_a_kid_fits_a_token_that_names_one() {
    let k = ec(Algorithm::ES256, "k");
    let mut jwk = k.jwk.clone();
    jwk.as_object_mut().unwrap().remove("kid");
    let keys: JwkSet = serde_json::from_value(json!({"keys": [jwk]})).unwrap();
    let token = sign(&k, Some("k"), json!({"iss": "https://idp", "sub": "s"}));
    assert!(has_key(&keys, Some("k")));
    assert_eq!(verify(&token, &rule(&[]), &keys).map(|_| ()), Ok(()));
    // Named kids that differ still do not fit.
    let other = sign(&k, Some("other"), json!({"iss": "https://idp", "sub": "s"}));
    assert_eq!(
        verify(&other, &rule(&[]), &set(&[&k])).map(|_| ()),
        Err(JwtReject::NoKey)
    );
}
