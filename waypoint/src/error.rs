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
}
