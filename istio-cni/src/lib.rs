//! Capture for ambient pods: the chained CNI plugin (`istio-cni`), the node
//! agent (`istio-cni-agent`) that installs the in-pod rules and
//! hands pods to ztunnel over ZDS, and the install mode that chains the
//! plugin into the node's CNI config.
//!
//! Without the `agent` feature only the plugin's side is built (`cni`,
//! `plugin`, `api`, the plugin's half of `fallback`): that is what the static
//! musl plugin is made of.

#[cfg(feature = "agent")]
pub mod agent;
pub mod api;
pub mod cni;
pub mod fallback;
#[cfg(feature = "agent")]
pub mod host;
#[cfg(feature = "agent")]
pub mod install;
#[cfg(feature = "agent")]
pub mod membership;
pub mod plugin;
#[cfg(feature = "agent")]
pub mod redirect;
#[cfg(feature = "agent")]
pub mod settings;
#[cfg(feature = "agent")]
pub mod status;
