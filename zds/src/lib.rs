//! ZDS: the node agent hands each captured pod's network namespace
//! to ztunnel over a SOCK_SEQPACKET unix socket, one protobuf per datagram,
//! the netns fd attached as SCM_RIGHTS. The agent listens; ztunnel connects.
//! Both ends live here so istio-cni and the tests speak the same code.

mod proto;
mod socket;

pub use proto::*;
pub use socket::{ZdsClient, ZdsConn, ZdsServer};

pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("zds socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("zds decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("zds protocol: {0}")]
    Protocol(String),
    #[error("zds peer closed the socket")]
    Closed,
    #[error("zds: no ack within {0:?}")]
    Timeout(std::time::Duration),
    #[error("ztunnel refused: {0}")]
    Nack(String),
}
