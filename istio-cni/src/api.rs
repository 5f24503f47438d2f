//! The plugin ⇄ node agent exchange: one JSON request line, one JSON answer
//! line, over a unix stream socket. Internal to istio-cni (nothing outside it
//! speaks it, so it may differ from upstream's); kept tiny so the plugin stays a short-lived,
//! runtime-free program.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/var/run/istio-cni/pluginevent.sock";
/// Enrolment waits on ztunnel's ack (5 s per ZDS message) plus rule installs.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Enrol this ambient pod (fails if it cannot be).
    Add,
    /// Remember a non-ambient pod's netns, so that labelling its namespace
    /// later captures it without a restart.
    Observe,
    /// Is this pod enrolled as it should be?
    Check,
    /// The pod is going away.
    Del,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub op: Op,
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// None = done; Some = why not.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("node agent unreachable at {0}: {1}")]
    Unreachable(PathBuf, std::io::Error),
    #[error("node agent at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("node agent refused: {0}")]
    Refused(String),
}

/// The plugin's side: blocking, bounded by CALL_TIMEOUT.
pub fn call(socket: &Path, req: &Request) -> Result<(), CallError> {
    let s = UnixStream::connect(socket).map_err(|e| CallError::Unreachable(socket.into(), e))?;
    let io = |e| CallError::Io(socket.into(), e);
    s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    (&s).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer {answer:?}: {e}"),
        ))
    })?;
    match resp.error {
        None => Ok(()),
        Some(e) => Err(CallError::Refused(e)),
    }
}
