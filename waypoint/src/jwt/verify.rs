//! Verifying one token against one rule and a key set: pure (the clock is
//! the crate's, the keys are passed in), so the cases are a table.

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use mesh::request_authn::JwtRule;
use serde_json::{Map, Value};

use crate::error::JwtReject;

/// Envoy's jwt_authn default clock skew for `exp` and `nbf`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The algorithms Envoy verifies with public keys; HMAC (shared secrets)
/// is never accepted from a JWKS.
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A token's header fields and its `iss`, read before anything is
/// verified: they only choose the rule and the key.
pub struct Unverified {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub issuer: String,
}

pub fn peek(token: &str) -> Result<Unverified, JwtReject> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtReject::Malformed)?;
    let payload = token.split('.').nth(1).ok_or(JwtReject::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtReject::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| JwtReject::Malformed)?;
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Unverified {
        alg: header.alg,
        kid: header.kid,
        issuer,
    })
}

/// Whether `keys` holds a key the token could name (by `kid`, or any key
/// when the token names none; a key without a kid fits any token).
pub fn has_key(keys: &JwkSet, kid: Option<&str>) -> bool {
    kid.is_none_or(|k| {
        keys.find(k).is_some() || keys.keys.iter().any(|j| j.common.key_id.is_none())
    })
}

fn times_are_numbers(claims: &Map<String, Value>) -> bool {
    ["exp", "nbf"]
        .iter()
        .all(|c| claims.get(*c).is_none_or(|v| v.as_u64().is_some()))
}

/// Verifies the signature with a key of `keys` (the one its `kid` names,
/// else any that fits), then the time window with Envoy's skew, the issuer
/// and the audiences; returns the verified claims.
pub fn verify(token: &str, rule: &JwtRule, keys: &JwkSet) -> Result<Map<String, Value>, JwtReject> {
    let u = peek(token)?;
    if !ALGORITHMS.contains(&u.alg) {
        return Err(JwtReject::NoKey);
    }
    let fits = |k: &&Jwk| {
        // As Envoy: a key is skipped only when both name a kid and differ.
        u.kid
            .as_deref()
            .is_none_or(|kid| k.common.key_id.as_deref().is_none_or(|id| id == kid))
            && k.common
                .key_algorithm
                .is_none_or(|a| a.to_string() == format!("{:?}", u.alg))
    };
    let mut v = Validation::new(u.alg);
    v.leeway = CLOCK_SKEW_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    // Envoy does not require `exp` unless told to.
    v.required_spec_claims.clear();
    v.set_issuer(&[rule.issuer.as_str()]);
    if rule.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rule.audiences);
        // A token without `aud` has none of the listed audiences.
        v.required_spec_claims.insert("aud".into());
    }
    let mut last = JwtReject::NoKey;
    for jwk in keys.keys.iter().filter(fits) {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v) {
            // jsonwebtoken skips an `exp`/`nbf` that is not a non-negative
            // number (such a token would never expire); Envoy refuses it.
            Ok(data) if !times_are_numbers(&data.claims) => return Err(JwtReject::Malformed),
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::ExpiredSignature => JwtReject::Expired,
                    ErrorKind::ImmatureSignature => JwtReject::NotYetValid,
                    ErrorKind::InvalidAudience => JwtReject::Audience,
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtReject::Audience,
                    ErrorKind::InvalidIssuer => JwtReject::UnknownIssuer,
                    ErrorKind::InvalidAlgorithm => JwtReject::NoKey,
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => JwtReject::Malformed,
                    _ => JwtReject::Signature,
                };
                // A claim error means the signature held: no other key
                // would change it.
                if !matches!(last, JwtReject::Signature | JwtReject::NoKey) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

#[cfg(test)]
#[path = "verify_tests.rs"]
pub(crate) mod tests;
