//! Workload identity for the mesh: SPIFFE names, the certificate authority
//! interface (built-in CA now, Istio's CA gRPC later), per-identity leaf
//! certificates with rotation, and the mTLS configurations HBONE uses.

mod ca;
mod describe;
mod manager;
mod spiffe;
mod tls;

pub use ca::{BuiltinCa, CaError, CertificateAuthority, SignFuture};
pub use describe::{describe_chain, rfc3339, CertDetails, DescribeError};
pub use manager::{CertError, SecretManager, WorkloadCert};
pub use spiffe::{Identity, ParseIdentityError, DEFAULT_TRUST_DOMAIN};
pub use tls::{peer_identity, spiffe_uri_of, TlsError};
