//! The CNI 1.0.0 plugin protocol: what the runtime hands us (environment and
//! network config on stdin) and what we answer (a result or an error object).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Versions whose result format we pass through untouched.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Error codes of the CNI spec (§ "Error"); 100+ are ours.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The pod is ambient but could not be enrolled.
    pub const ENROL_FAILED: u32 = 100;
}

/// The error object the spec asks for on stdout, with a non-zero exit.
#[derive(Debug, Serialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Our entry in the conflist. Unknown keys (runtimeConfig, args...) are
/// allowed: runtimes add their own.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// The node agent's enrolment socket.
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// The node agent's state dir: the membership answer the plugin judges
    /// from when the agent does not answer, and where it leaves the pods it
    /// started meanwhile.
    #[serde(default = "default_state_dir")]
    pub agent_state_dir: PathBuf,
    /// Namespaces never captured (the node's own system pods); they start
    /// even when the agent never answered.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
}

fn default_agent_socket() -> PathBuf {
    crate::api::DEFAULT_SOCKET.into()
}

fn default_state_dir() -> PathBuf {
    crate::api::DEFAULT_STATE_DIR.into()
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The runtime's environment variables, checked.
#[derive(Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (K8S_POD_NAME, K8S_POD_NAMESPACE, ...).
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let invalid = |var: &str, why: &str| {
            CniError::new(
                code::INVALID_ENV,
                format!("{var} {why}"),
                "set by the container runtime",
            )
        };
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not one of ADD, DEL, CHECK, VERSION",
                    other.to_string(),
                ))
            }
            None => return Err(invalid("CNI_COMMAND", "is not set")),
        };
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut env = Env {
            command,
            container_id: nonempty("CNI_CONTAINERID").unwrap_or_default(),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: nonempty("CNI_IFNAME").unwrap_or_default(),
            args: BTreeMap::new(),
        };
        if command == Command::Version {
            return Ok(env);
        }
        if env.container_id.is_empty() {
            return Err(invalid("CNI_CONTAINERID", "is not set"));
        }
        if env.ifname.is_empty() {
            return Err(invalid("CNI_IFNAME", "is not set"));
        }
        // DEL may come after the netns is gone; ADD and CHECK need it.
        if command != Command::Del && env.netns.is_none() {
            return Err(invalid("CNI_NETNS", "is not set"));
        }
        for kv in get("CNI_ARGS").unwrap_or_default().split(';') {
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    "CNI_ARGS entry is not KEY=VALUE",
                    kv.to_string(),
                )
            })?;
            env.args.insert(k.to_string(), v.to_string());
        }
        Ok(env)
    }

    /// (namespace, name) of the Kubernetes pod, when the runtime said.
    pub fn pod(&self) -> Option<(String, String)> {
        Some((
            self.args.get("K8S_POD_NAMESPACE")?.clone(),
            self.args.get("K8S_POD_NAME")?.clone(),
        ))
    }
}

/// Parses stdin and checks the version, so that every command fails the
/// same way on a bad config.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "network config on stdin is not valid JSON for istio-cni",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {:?}", conf.cni_version),
            format!("istio-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.plugin_type != "istio-cni" {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("plugin type {:?} is not istio-cni", conf.plugin_type),
            "the conflist entry names another plugin",
        ));
    }
    Ok(conf)
}

/// The VERSION answer.
pub fn version_result() -> String {
    serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// IPs the earlier plugins assigned, from `prevResult.ips[].address`.
pub fn prev_ips(prev: &Value) -> Vec<std::net::IpAddr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn env_is_checked_per_command() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=app;K8S_POD_NAME=a",
            ),
        ];
        let e = env(&full).unwrap();
        assert_eq!(e.pod(), Some(("app".into(), "a".into())));
        assert_eq!(env(&full[..3]).unwrap_err().msg, "CNI_IFNAME is not set");
        // DEL may lack the netns; ADD may not.
        let mut del = full;
        del[0].1 = "DEL";
        del[2].1 = "";
        assert!(env(&del).unwrap().netns.is_none());
        let mut add = full;
        add[2].1 = "";
        assert_eq!(env(&add).unwrap_err().msg, "CNI_NETNS is not set");
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        let mut bad = full;
        bad[4].1 = "K8S_POD_NAME";
        let e = env(&bad).unwrap_err();
        assert!(
            e.msg.contains("KEY=VALUE") && e.details == "K8S_POD_NAME",
            "{e}"
        );
    }

    #[test]
    fn conf_checks_version_and_type_and_error_object_is_the_spec_shape() {
        let e = parse_conf(br#"{"cniVersion":"0.2.0","type":"istio-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = parse_conf(br#"{"cniVersion":"1.0.0","type":"bridge"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = parse_conf(br#"{"cniVersion":"0.4.0","type":"istio-cni","runtimeConfig":{"x":1}}"#)
            .unwrap();
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        let v: Value = serde_json::to_value(CniError::new(7, "m", "d")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":7,"msg":"m","details":"d"})
        );
        let prev = serde_json::json!({"ips":[{"address":"10.0.0.5/24"},{"address":"fd00::5/64"}]});
        assert_eq!(prev_ips(&prev).len(), 2);
    }
}
