//! Capture for ambient pods. What exists so far: the in-pod redirection rules
//! (SPEC §4) with idempotent install and exact removal. The CNI plugin, the
//! node agent and its ZDS server (see the `zds` crate) are not built yet.

pub mod redirect;
