//! Capture for ambient pods: the chained CNI plugin (`istio-cni`), the node
//! agent (`istio-cni-agent`) that installs the in-pod rules and
//! hands pods to ztunnel over ZDS, and the install mode that chains the
//! plugin into the node's CNI config.

pub mod agent;
pub mod api;
pub mod cni;
pub mod fallback;
pub mod host;
pub mod install;
pub mod membership;
pub mod plugin;
pub mod redirect;
