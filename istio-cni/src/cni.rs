//! The CNI plugin protocol, versions 0.3.0 to 1.1.0: what the runtime hands
//! us (environment and network config on stdin) and what we answer (a result
//! in the version the config asked for, or an error object).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Versions we answer in. Older ones (0.1.0, 0.2.0) have another result
/// shape (`ip4`/`ip6`) that no runtime we chain into still sends.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

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

    /// The same error, in the version the config asked for (the runtime
    /// decodes it in that version).
    pub fn in_version(mut self, version: &str) -> Self {
        if SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_string();
        }
        self
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
    /// 1.1.0: is the plugin ready to take ADDs.
    Status,
    /// 1.1.0: release what is held for attachments that no longer exist.
    Gc,
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
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not one of ADD, DEL, CHECK, VERSION, STATUS, GC",
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
        // These concern the plugin (or the network), not one container.
        if matches!(command, Command::Version | Command::Status | Command::Gc) {
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
    let latest = SUPPORTED_VERSIONS.last().expect("not empty");
    serde_json::json!({"cniVersion": latest, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// Whether `v` is 1.0.0 or later, where `ips[]` lost its `version` field.
fn is_v1(v: &str) -> bool {
    !v.starts_with("0.")
}

/// The earlier plugins' result, as a result of `version`: a chained plugin
/// answers in the config's version, whatever version the result it was
/// handed is in. Between 0.3.0 and 1.1.0 the result differs only in
/// `ips[].version` ("4"/"6" before 1.0.0, absent from 1.0.0 on).
pub fn result_for(prev: &Value, version: &str) -> Result<Value, CniError> {
    let mut out = prev.clone();
    let obj = out.as_object_mut().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult is not a JSON object",
            prev.to_string(),
        )
    })?;
    if let Some(v) = obj.get("cniVersion").and_then(Value::as_str) {
        if !SUPPORTED_VERSIONS.contains(&v) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("prevResult has unsupported cniVersion {v:?}"),
                format!(
                    "istio-cni converts results of {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
    }
    obj.insert("cniVersion".into(), Value::String(version.into()));
    for ip in obj
        .get_mut("ips")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
    {
        if is_v1(version) {
            ip.remove("version");
        } else if !ip.contains_key("version") {
            let family = match ip.get("address").and_then(Value::as_str) {
                Some(a) if a.contains(':') => "6",
                Some(_) => "4",
                None => {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        "prevResult ips[] entry has no address",
                        Value::Object(ip.clone()).to_string(),
                    ))
                }
            };
            ip.insert("version".into(), Value::String(family.into()));
        }
    }
    Ok(out)
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
        // 1.1.0's verbs name no container.
        assert_eq!(
            env(&[("CNI_COMMAND", "STATUS")]).unwrap().command,
            Command::Status
        );
        assert_eq!(env(&[("CNI_COMMAND", "GC")]).unwrap().command, Command::Gc);
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

    #[test]
    fn every_supported_version_is_accepted_and_others_are_named() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let c = parse_conf(format!(r#"{{"cniVersion":"{v}","type":"istio-cni"}}"#).as_bytes())
                .unwrap();
            assert_eq!(c.cni_version, v);
        }
        for v in ["0.1.0", "0.2.0", "1.2.0", ""] {
            let e = parse_conf(format!(r#"{{"cniVersion":"{v}","type":"istio-cni"}}"#).as_bytes())
                .unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
            assert!(e.msg.contains(&format!("{v:?}")), "{e}");
        }
        let v: Value = serde_json::from_str(&version_result()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let e = CniError::new(7, "m", "d").in_version("0.4.0");
        assert_eq!(e.cni_version, "0.4.0");
        assert_eq!(
            CniError::new(7, "m", "d").in_version("9.9").cni_version,
            "1.0.0"
        );
    }

    #[test]
    fn results_take_the_shape_of_the_version_asked() {
        let v1 = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.0.0.5/24", "interface": 0}, {"address": "fd00::5/64"}],
            "routes": [{"dst": "0.0.0.0/0"}],
        });
        let old = result_for(&v1, "0.3.1").unwrap();
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][0]["interface"], 0);
        assert_eq!(old["routes"], v1["routes"]);
        // And back: 1.x has no ips[].version.
        let new = result_for(&old, "1.1.0").unwrap();
        assert_eq!(new["cniVersion"], "1.1.0");
        assert!(new["ips"][0].get("version").is_none(), "{new}");
        assert_eq!(new["ips"], v1["ips"]);
        let e = result_for(
            &serde_json::json!({"cniVersion": "0.2.0", "ip4": {}}),
            "1.0.0",
        )
        .unwrap_err();
        assert!(e.msg.contains("0.2.0"), "{e}");
        assert!(result_for(&serde_json::json!([]), "1.0.0").is_err());
    }
}
