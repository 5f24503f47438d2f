//! The plugin ⇄ node agent exchange: one JSON request line, one JSON answer
//! line, over a unix stream socket. Internal to istio-cni (nothing outside it
//! speaks it, so it may differ from upstream's); kept tiny so the plugin
//! stays a short-lived, runtime-free program.
//!
//! The agent decides, the plugin asks. The plugin sends every pod's ADD;
//! the agent remembers the pod's netns (so a later namespace label captures
//! it), decides membership from its live mesh state and answers:
//!
//! - `{"answer":"enrolled"}`: ambient, rules installed, handed to ztunnel (or
//!   queued for its next snapshot);
//! - `{"answer":"outside","reason":"..."}`: not a mesh pod, nothing installed;
//! - `{"answer":"refused","error":"..."}`: ambient (or possibly so) but it
//!   cannot be captured: the pod must not start.
//!
//! CHECK gets the same answers (`enrolled` = its rules are in place). DEL is
//! answered `outside`: the pod is not captured any more.
//!
//! When the agent does not answer, the plugin falls back to the small
//! membership answer the agent keeps on disk (`crate::fallback`).

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/var/run/istio-cni/pluginevent.sock";
/// Where the agent keeps its pod records and the plugin's fallback answer.
pub const DEFAULT_STATE_DIR: &str = "/var/run/istio-cni";
/// Enrolment waits on ztunnel's ack (5 s per ZDS message) plus rule installs.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new pod sandbox: enrol it if it is ambient, remember it either way.
    Add,
    /// Is this pod captured as it should be?
    Check,
    /// The pod is going away.
    Del,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The agent's answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "lowercase")]
pub enum Response {
    Enrolled,
    Outside { reason: String },
    Refused { error: String },
}

/// What the agent decided, when it did not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Enrolled,
    Outside(String),
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

impl CallError {
    /// The agent said no (as opposed to: the agent did not answer).
    pub fn is_refusal(&self) -> bool {
        matches!(self, CallError::Refused(_))
    }
}

/// The plugin's side: blocking, bounded by CALL_TIMEOUT.
pub fn call(socket: &Path, req: &Request) -> Result<Verdict, CallError> {
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
    match resp {
        Response::Enrolled => Ok(Verdict::Enrolled),
        Response::Outside { reason } => Ok(Verdict::Outside(reason)),
        Response::Refused { error } => Err(CallError::Refused(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_the_documented_lines() {
        for (resp, line) in [
            (Response::Enrolled, r#"{"answer":"enrolled"}"#),
            (
                Response::Outside { reason: "r".into() },
                r#"{"answer":"outside","reason":"r"}"#,
            ),
            (
                Response::Refused { error: "e".into() },
                r#"{"answer":"refused","error":"e"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&resp).unwrap(), line);
            assert_eq!(serde_json::from_str::<Response>(line).unwrap(), resp);
        }
        // An answer we do not know is not taken for a yes.
        assert!(serde_json::from_str::<Response>(r#"{"error":null}"#).is_err());
    }
}
