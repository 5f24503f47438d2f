//! istiod as the control plane: the WDS delta-ADS client that feeds the mesh
//! model (the same `MeshStore` the standalone file feeds) and the Istio CA
//! client that replaces the built-in CA.

pub mod ads;
pub mod ca;
pub mod channel;
pub mod pb;
pub mod wds;
mod wds_policy;

pub use ads::{register_metrics, Ads, AdsStatus, ProxyInfo};
pub use ca::IstioCa;
pub use channel::ControlPlane;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("control plane settings: {0}")]
    Config(String),
    #[error("service-account token {0}")]
    Token(String),
    #[error("xDS stream: {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
}
