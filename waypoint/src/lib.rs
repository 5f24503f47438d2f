//! The waypoint's request path as a library: the binary wires it to
//! listeners and sources; the fuzz targets drive it directly.

pub mod binding;
pub mod body;
pub mod dns;
pub mod error;
pub mod ext_authz;
pub mod grpc;
pub mod jwt;
pub mod l4;
pub mod lb;
pub mod listen;
pub mod origin_tls;
pub mod peer;
pub mod plan;
pub mod proxy;
pub mod replay;
pub mod route;
pub mod send;
pub mod telemetry;
pub mod trace;
pub mod tunnel;
pub mod upstream;
