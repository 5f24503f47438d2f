//! Every way a request can fail at the waypoint, in one type: each case
//! knows the status the client gets, the Envoy-style response flag the
//! telemetry records, the text of the local reply and which retry
//! conditions cover it.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh::routes::RetryOn;

use crate::telemetry::flag;
use crate::upstream::Body;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("denied by L7 policy: {0}")]
    Denied(String),
    /// The request carried a JWT that does not verify (RequestAuthentication).
    #[error("JWT rejected: {0}")]
    Unauthenticated(JwtReject),
    /// Pod-addressed traffic to an address the mesh does not know.
    #[error("no such destination")]
    NoDestination,
    #[error("routes exist for the host but none matches")]
    NoRoute,
    #[error("route has no backend with weight > 0")]
    NoBackend,
    #[error("route reference does not resolve: {0}")]
    Unresolved(String),
    #[error("no healthy upstream: {0}")]
    NoHealthy(String),
    /// A DNS ServiceEntry's name did not resolve to an address.
    #[error("dns resolution failed: {0}")]
    Dns(String),
    #[error("connection pool overflow")]
    Overflow,
    /// No tunnel: ztunnel refused (policy), unreachable, TLS.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke before a response.
    #[error("reset: {0}")]
    Reset(String),
    #[error("per-try timeout")]
    PerTryTimeout,
    #[error("upstream request timeout")]
    Timeout,
    /// A CUSTOM policy's external authorizer could not decide.
    #[error("external authorization: {0}")]
    ExtAuthz(ExtAuthzError),
}

/// Why external authorization answered the client itself (the
/// authorizer's own denials are its answers, not ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtAuthzError {
    /// Unreachable, timed out, 5xx, unreadable: `statusOnError`.
    #[error("check failed: {why}")]
    Failed { status: u16, why: String },
    /// The body the check needs is over its `maxRequestBytes` (or the
    /// replay buffer that keeps it for the upstream).
    #[error("request body too large for the check")]
    BodyTooLarge,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            Denied(_) => StatusCode::FORBIDDEN,
            Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            NoRoute => StatusCode::NOT_FOUND,
            NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
            Timeout => StatusCode::GATEWAY_TIMEOUT,
            ExtAuthz(ExtAuthzError::Failed { status, .. }) => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN)
            }
            ExtAuthz(ExtAuthzError::BodyTooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
            NoDestination | Unresolved(_) | NoHealthy(_) | Dns(_) | Overflow | Connect(_)
            | Reset(_) | PerTryTimeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn flag(&self) -> &'static str {
        use ProxyError::*;
        match self {
            Denied(_) => flag::RBAC,
            Unauthenticated(_) => flag::JWT,
            NoRoute => flag::NO_ROUTE,
            NoDestination | NoBackend | Unresolved(_) => flag::NO_CLUSTER,
            NoHealthy(_) => flag::NO_HEALTHY,
            Dns(_) => flag::DNS_FAILURE,
            Overflow => flag::OVERFLOW,
            Connect(_) => flag::CONNECT_FAILURE,
            Reset(_) | PerTryTimeout => flag::RESET,
            Timeout => flag::TIMEOUT,
            ExtAuthz(_) => flag::EXT_AUTHZ,
        }
    }

    /// The local reply's body, worded as Envoy words it where clients or
    /// tests may look for it.
    pub fn text(&self) -> &'static str {
        use ProxyError::*;
        match self {
            Denied(_) => "RBAC: access denied",
            Unauthenticated(r) => r.text(),
            NoDestination => "no such destination\n",
            NoRoute => "no route matched\n",
            NoBackend => "route has no backend\n",
            Unresolved(_) => "route backend does not resolve\n",
            NoHealthy(_) => "no healthy upstream",
            Dns(_) => "upstream name did not resolve\n",
            Overflow => "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            Connect(_) => "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            Reset(_) | PerTryTimeout => "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            Timeout => "upstream request timeout",
            ExtAuthz(ExtAuthzError::Failed { .. }) => "",
            ExtAuthz(ExtAuthzError::BodyTooLarge) => "Payload Too Large",
        }
    }

    /// Envoy's `response_code_details` for a local reply that policy made,
    /// so a JWT rejection and an RBAC denial read apart in the access log.
    pub fn details(&self) -> Option<&'static str> {
        match self {
            ProxyError::Denied(_) => Some("rbac_access_denied_matched_policy[none]"),
            ProxyError::Unauthenticated(r) => Some(r.details()),
            ProxyError::ExtAuthz(ExtAuthzError::Failed { .. }) => Some("ext_authz_error"),
            ProxyError::ExtAuthz(ExtAuthzError::BodyTooLarge) => Some("request_payload_too_large"),
            _ => None,
        }
    }

    /// Whether an attempt that failed this way is covered by `on`. Only
    /// failures of an attempt qualify: policy and routing answers are the
    /// same on every try.
    pub fn retryable_by(&self, on: &RetryOn) -> bool {
        use ProxyError::*;
        matches!(
            (self, on),
            (
                Connect(_) | Reset(_) | PerTryTimeout,
                RetryOn::FiveXx | RetryOn::GatewayError
            ) | (Connect(_), RetryOn::ConnectFailure)
                | (
                    Reset(_) | PerTryTimeout,
                    RetryOn::Reset | RetryOn::RefusedStream
                )
        )
    }

    /// The local reply. A gRPC client gets it as a trailers-only response
    /// (HTTP 200 with grpc-status), as Envoy sends local replies to gRPC.
    pub fn response(&self, grpc: bool) -> Response<Body> {
        if grpc {
            return crate::grpc::trailers_only(
                crate::grpc::status_for_http(self.status()),
                self.text(),
            );
        }
        local(self.status(), self.text())
    }
}

/// Why a request's JWT was rejected (401), worded as Envoy's jwt_authn
/// filter words it (clients and log pipelines match on these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtReject {
    Malformed,
    UnknownIssuer,
    Expired,
    NotYetValid,
    Audience,
    Signature,
    NoKey,
    JwksFetch,
    /// The issuer's rule (or the whole RequestAuthentication) could not be
    /// read: its tokens are never accepted.
    Unusable,
}

impl std::fmt::Display for JwtReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

impl std::error::Error for JwtReject {}

impl JwtReject {
    pub fn text(&self) -> &'static str {
        use JwtReject::*;
        match self {
            Malformed => "Jwt is not in the form of Header.Payload.Signature",
            UnknownIssuer => "Jwt issuer is not configured",
            Expired => "Jwt is expired",
            NotYetValid => "Jwt not yet valid",
            Audience => "Audiences in Jwt are not allowed",
            Signature => "Jwt verification fails",
            NoKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwksFetch => "Jwks remote fetch is failed",
            Unusable => "Jwt issuer's rule is not usable",
        }
    }

    /// `response_code_details`: Envoy's `jwt_authn_access_denied{<text
    /// with underscores>}`.
    pub fn details(&self) -> &'static str {
        use JwtReject::*;
        match self {
            Malformed => {
                "jwt_authn_access_denied{Jwt_is_not_in_the_form_of_Header.Payload.Signature}"
            }
            UnknownIssuer => "jwt_authn_access_denied{Jwt_issuer_is_not_configured}",
            Expired => "jwt_authn_access_denied{Jwt_is_expired}",
            NotYetValid => "jwt_authn_access_denied{Jwt_not_yet_valid}",
            Audience => "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}",
            Signature => "jwt_authn_access_denied{Jwt_verification_fails}",
            NoKey => "jwt_authn_access_denied{Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt}",
            JwksFetch => "jwt_authn_access_denied{Jwks_remote_fetch_is_failed}",
            Unusable => "jwt_authn_access_denied{Jwt_issuer's_rule_is_not_usable}",
        }
    }
}

pub fn local(code: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_knows_its_status_flag_and_retry_conditions() {
        use ProxyError::*;
        let table: &[(ProxyError, u16, &str, &[RetryOn])] = &[
            (Denied("x".into()), 403, "-", &[]),
            (Unauthenticated(JwtReject::Expired), 401, "-", &[]),
            (NoRoute, 404, "NR", &[]),
            (NoBackend, 500, "NC", &[]),
            (Unresolved("x".into()), 503, "NC", &[]),
            (NoHealthy("x".into()), 503, "UH", &[]),
            (Overflow, 503, "UO", &[]),
            (Dns("x".into()), 503, "DF", &[]),
            (
                Connect("x".into()),
                503,
                "UF",
                &[
                    RetryOn::FiveXx,
                    RetryOn::GatewayError,
                    RetryOn::ConnectFailure,
                ],
            ),
            (
                Reset("x".into()),
                503,
                "UR",
                &[
                    RetryOn::FiveXx,
                    RetryOn::GatewayError,
                    RetryOn::Reset,
                    RetryOn::RefusedStream,
                ],
            ),
            (Timeout, 504, "UT", &[]),
            (
                ExtAuthz(ExtAuthzError::Failed {
                    status: 403,
                    why: "x".into(),
                }),
                403,
                "UAEX",
                &[],
            ),
            (
                ExtAuthz(ExtAuthzError::Failed {
                    status: 503,
                    why: "x".into(),
                }),
                503,
                "UAEX",
                &[],
            ),
            (ExtAuthz(ExtAuthzError::BodyTooLarge), 413, "UAEX", &[]),
        ];
        let all = [
            RetryOn::FiveXx,
            RetryOn::GatewayError,
            RetryOn::Reset,
            RetryOn::ConnectFailure,
            RetryOn::RefusedStream,
            RetryOn::RetriableStatusCodes,
        ];
        for (e, code, f, on) in table {
            assert_eq!(e.status().as_u16(), *code, "{e}");
            assert_eq!(e.flag(), *f, "{e}");
            for r in &all {
                let want = on
                    .iter()
                    .any(|o| std::mem::discriminant(o) == std::mem::discriminant(r));
                assert_eq!(e.retryable_by(r), want, "{e} under {r:?}");
            }
        }
    }

    #[test]
    fn jwt_rejections_read_apart_from_rbac_denials() {
        use JwtReject::*;
        for r in [
            Malformed,
            UnknownIssuer,
            Expired,
            NotYetValid,
            Audience,
            Signature,
            NoKey,
            JwksFetch,
            Unusable,
        ] {
            let e = ProxyError::Unauthenticated(r);
            assert_eq!(e.text(), r.to_string());
            // Envoy's form: the text, spaces as underscores, in braces.
            let want = format!("jwt_authn_access_denied{{{}}}", r.text().replace(' ', "_"));
            assert_eq!(e.details(), Some(want.as_str()));
        }
        assert_eq!(
            ProxyError::Denied("p".into()).details(),
            Some("rbac_access_denied_matched_policy[none]")
        );
        assert_eq!(ProxyError::NoRoute.details(), None);
    }
}
