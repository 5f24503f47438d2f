//! The waypoint's request path as a library: the binary wires it to
//! listeners and sources; the fuzz targets drive it directly.

pub mod binding;
pub mod body;
pub mod lb;
pub mod proxy;
pub mod route;
pub mod telemetry;
pub mod upstream;
