//! The mesh model that every config source feeds (standalone file now, the
//! Kubernetes API and istiod's WDS later) and the L4 policy it implies.

pub mod authz;
pub mod ext_authz;
mod families;
pub mod file;
pub mod intern;
mod keyed;
pub mod labels;
pub mod live;
pub mod locality;
pub mod memory;
pub mod model;
pub mod objects;
pub mod owner;
mod policy_index;
mod rejected;
pub mod request_authn;
pub mod resolve;
pub mod routes;
pub mod scope;
pub mod secret;
mod security;
mod service_entry;
pub mod standalone;
mod store;
pub mod upstream_tls;

pub use file::{open_file, FileError, FileSource};
pub use model::{
    Endpoint, MeshState, MtlsMode, PeerAuthentication, Service, ServicePort, TargetPort,
    TunnelProtocol, Workload,
};
pub use rejected::{report_new as report_rejected, Rejected};
pub use service_entry::{DnsEndpoint, Resolution, ServiceEntry};
pub use standalone::ConfigError;
pub use store::MeshStore;

/// Istio's root namespace: policies here without a selector apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// The Kubernetes cluster DNS domain service hostnames live under.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
