//! Istio's cni chart configures its agent through the environment (the
//! `istio-cni-config` ConfigMap, envFrom, plus the DaemonSet's own env).
//! This reads those variables with the meaning Istio's `install-cni` gives
//! them. A value we cannot honour is an error naming the variable, never a
//! silent default; the agent's own flags, where given, beat the env.
//!
//! Variables that only concern what this agent does not do (sidecar-mode
//! race repair, the kubeconfig Istio's plugin needs to reach the API, Go
//! runtime limits) are still checked for well-formed values, so that a typo
//! is reported rather than ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}={value:?}: {reason}")]
pub struct SettingsError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

/// What the chart's env says; None where it says nothing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChartEnv {
    /// MOUNTED_CNI_NET_DIR: the node's CNI config dir as mounted here.
    pub cni_conf_dir: Option<PathBuf>,
    /// CNI_CONF_NAME: the config file to chain into.
    pub cni_conf_name: Option<String>,
    /// EXCLUDE_NAMESPACES: never captured.
    pub exclude_namespaces: Option<Vec<String>>,
    /// AMBIENT_DNS_CAPTURE.
    pub dns_capture: Option<bool>,
    /// AMBIENT_IPV6: write the IPv6 in-pod rules for pods with an IPv6
    /// address (default true, as Istio's chart); false refuses such pods.
    pub ipv6: Option<bool>,
    /// ZTUNNEL_UDS_ADDRESS: where ztunnel connects for ZDS.
    pub zds_socket: Option<PathBuf>,
    /// CNI_AGENT_RUN_DIR: the plugin's socket and the agent's state live here.
    pub run_dir: Option<PathBuf>,
    /// MONITORING_PORT: Prometheus metrics.
    pub monitoring_port: Option<u16>,
    /// ALLOW_SWITCH_TO_HOST_NS: the agent's pod is not in the host netns, so
    /// node rules go into the host's (PID 1's, through the host's /proc).
    pub switch_to_host_netns: bool,
}

/// The enablement selectors Istio's chart renders by default: pods labelled
/// ambient, or pods of a namespace labelled ambient that do not opt out.
/// That is the rule membership decides by; another is refused.
const DEFAULT_SELECTORS: &str = r#"
- podSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
- podSelector:
    matchExpressions:
    - {key: istio.io/dataplane-mode, operator: NotIn, values: [none]}
  namespaceSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
"#;

fn err(var: &str, value: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        var: var.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Go's `strconv.ParseBool`, which Istio's agent reads booleans with.
fn parse_bool(var: &str, v: &str) -> Result<bool, SettingsError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(err(var, v, "not a boolean (true or false)")),
    }
}

impl ChartEnv {
    /// Reads the chart's variables from `vars` (the process env in
    /// practice; empty values count as unset, as the chart renders some).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<ChartEnv, SettingsError> {
        let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let boolean = |k: &str| get(k).map(|v| parse_bool(k, v)).transpose();
        let must = |k: &str, want: bool, why: &str| -> Result<(), SettingsError> {
            match boolean(k)? {
                Some(v) if v != want => Err(err(k, get(k).unwrap_or(""), why)),
                _ => Ok(()),
            }
        };
        must(
            "AMBIENT_ENABLED",
            true,
            "this agent captures ambient pods only (set ambient.enabled=true)",
        )?;
        must(
            "CHAINED_CNI_PLUGIN",
            true,
            "istio-cni is always chained into the primary CNI's config",
        )?;
        must(
            "ISTIO_OWNED_CNI_CONFIG",
            false,
            "a separate Istio-owned config file is not supported; the plugin is chained into the primary config",
        )?;
        must(
            "NATIVE_NFTABLES",
            false,
            "native nftables rules are not supported; the agent writes iptables rules through the node's backend",
        )?;
        for k in ["CNI_NETWORK_CONFIG", "CNI_NETWORK_CONFIG_FILE"] {
            if let Some(v) = get(k) {
                return Err(err(
                    k,
                    v,
                    "a custom plugin config template is not supported",
                ));
            }
        }
        if let Some(v) = get("AMBIENT_ENABLEMENT_SELECTOR") {
            let want: serde_yaml::Value = serde_yaml::from_str(DEFAULT_SELECTORS).expect("valid");
            let got: serde_yaml::Value = serde_yaml::from_str(v)
                .map_err(|e| err("AMBIENT_ENABLEMENT_SELECTOR", v, format!("not YAML: {e}")))?;
            if got != want {
                return Err(err(
                    "AMBIENT_ENABLEMENT_SELECTOR",
                    v,
                    "only the chart's default selectors (istio.io/dataplane-mode on pods and namespaces) are supported",
                ));
            }
        }
        // Well-formed, though they change nothing here: sidecar-mode repair,
        // the plugin kubeconfig, startup rule reconciliation (always done),
        // plugin-side retries (the plugin always asks the runtime to retry a
        // pod that may be ambient).
        for k in [
            "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP",
            "AMBIENT_DISABLE_SAFE_UPGRADE",
            "ENABLE_AMBIENT_DETECTION_RETRY",
            "REPAIR_ENABLED",
            "REPAIR_LABEL_PODS",
            "REPAIR_DELETE_PODS",
            "REPAIR_REPAIR_PODS",
            "REPAIR_RUN_AS_DAEMON",
            "CNI_CONF_GROUP_READ",
            "SKIP_TLS_VERIFY",
        ] {
            boolean(k)?;
        }
        for k in ["REPAIR_INIT_CONTAINER_EXIT_CODE", "KUBECONFIG_MODE"] {
            if let Some(v) = get(k) {
                v.parse::<i64>().map_err(|_| err(k, v, "not an integer"))?;
            }
        }
        if let Some(v) = get("LOG_LEVEL") {
            log_filter(v).map_err(|reason| err("LOG_LEVEL", v, reason))?;
        }
        let monitoring_port = get("MONITORING_PORT")
            .map(|v| {
                v.parse::<u16>()
                    .map_err(|_| err("MONITORING_PORT", v, "not a port number"))
            })
            .transpose()?;
        let path = |k: &str| -> Result<Option<PathBuf>, SettingsError> {
            match get(k) {
                Some(v) if !v.starts_with('/') => Err(err(k, v, "not an absolute path")),
                v => Ok(v.map(PathBuf::from)),
            }
        };
        let cni_conf_name = match get("CNI_CONF_NAME") {
            Some(v) if v.contains('/') || v.starts_with('.') => {
                return Err(err(
                    "CNI_CONF_NAME",
                    v,
                    "not a file name in the CNI config dir",
                ))
            }
            v => v.map(str::to_string),
        };
        Ok(ChartEnv {
            cni_conf_dir: path("MOUNTED_CNI_NET_DIR")?,
            cni_conf_name,
            exclude_namespaces: get("EXCLUDE_NAMESPACES").map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            dns_capture: boolean("AMBIENT_DNS_CAPTURE")?,
            ipv6: boolean("AMBIENT_IPV6")?,
            zds_socket: path("ZTUNNEL_UDS_ADDRESS")?,
            run_dir: path("CNI_AGENT_RUN_DIR")?,
            monitoring_port,
            switch_to_host_netns: boolean("ALLOW_SWITCH_TO_HOST_NS")?.unwrap_or(false),
        })
    }
}

/// Istio's log levels (`--log_output_level`, `LOG_LEVEL`): one level, or
/// `scope:level` pairs, comma-separated. As a tracing filter: the bare level
/// or the `default` scope's is the global one; Istio's scope names are not
/// our targets, so other scopes are checked but do not filter.
pub fn log_filter(spec: &str) -> Result<String, String> {
    let level = |l: &str| -> Result<&'static str, String> {
        Ok(match l {
            "debug" => "debug",
            "info" => "info",
            "warn" | "warning" => "warn",
            "error" | "fatal" => "error",
            "none" => "off",
            other => {
                return Err(format!(
                    "{other:?} is not one of debug, info, warn, error, fatal, none"
                ))
            }
        })
    };
    let mut global = "info";
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once(':') {
            None => global = level(part)?,
            Some(("default", l)) => global = level(l)?,
            Some((_, l)) => {
                level(l)?;
            }
        }
    }
    Ok(global.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<ChartEnv, SettingsError> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ChartEnv::from_vars(&m)
    }

    /// What Istio's chart renders with the ambient profile (the ConfigMap
    /// plus the DaemonSet's env).
    const RENDERED: &[(&str, &str)] = &[
        ("CURRENT_AGENT_VERSION", "latest"),
        ("AMBIENT_ENABLED", "true"),
        ("AMBIENT_ENABLEMENT_SELECTOR", "- podSelector:\n    matchLabels:\n      istio.io/dataplane-mode: ambient\n- namespaceSelector:\n    matchLabels:\n      istio.io/dataplane-mode: ambient\n  podSelector:\n    matchExpressions:\n    - key: istio.io/dataplane-mode\n      operator: NotIn\n      values:\n      - none"),
        ("AMBIENT_DNS_CAPTURE", "true"),
        ("AMBIENT_IPV6", "true"),
        ("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "true"),
        ("ENABLE_AMBIENT_DETECTION_RETRY", "false"),
        ("ISTIO_OWNED_CNI_CONFIG", "false"),
        ("CHAINED_CNI_PLUGIN", "true"),
        ("EXCLUDE_NAMESPACES", "kube-system"),
        ("REPAIR_ENABLED", "true"),
        ("REPAIR_LABEL_PODS", "false"),
        ("REPAIR_DELETE_PODS", "false"),
        ("REPAIR_REPAIR_PODS", "true"),
        ("REPAIR_INIT_CONTAINER_NAME", "istio-validation"),
        ("REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized"),
        ("REPAIR_BROKEN_POD_LABEL_VALUE", "true"),
        ("NATIVE_NFTABLES", "false"),
        ("REPAIR_NODE_NAME", "node1"),
        ("REPAIR_RUN_AS_DAEMON", "true"),
        ("REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status"),
        ("ALLOW_SWITCH_TO_HOST_NS", "true"),
        ("NODE_NAME", "node1"),
        ("GOMEMLIMIT", "104857600"),
        ("GOMAXPROCS", "1"),
        ("POD_NAME", "istio-cni-node-abc"),
        ("POD_NAMESPACE", "istio-system"),
    ];

    #[test]
    fn the_rendered_chart_env_is_accepted_with_upstream_meaning() {
        let e = env(RENDERED).unwrap();
        assert_eq!(e.exclude_namespaces, Some(vec!["kube-system".to_string()]));
        assert_eq!(e.dns_capture, Some(true));
        assert_eq!(e.ipv6, Some(true));
        assert!(e.switch_to_host_netns);
        // Not in the render: upstream's defaults apply (the caller's).
        assert_eq!(e.cni_conf_dir, None);
        assert_eq!(e.monitoring_port, None);
        let mut more = RENDERED.to_vec();
        more.extend([
            ("MOUNTED_CNI_NET_DIR", "/host/etc/cni/multus/net.d"),
            ("CNI_CONF_NAME", "05-cilium.conflist"),
            ("EXCLUDE_NAMESPACES", "kube-system, istio-system,"),
            ("AMBIENT_DNS_CAPTURE", "False"),
            ("MONITORING_PORT", "9999"),
            ("ZTUNNEL_UDS_ADDRESS", "/run/zt/zt.sock"),
            ("CNI_AGENT_RUN_DIR", "/run/cni"),
        ]);
        let e = env(&more).unwrap();
        assert_eq!(e.cni_conf_dir, Some("/host/etc/cni/multus/net.d".into()));
        assert_eq!(e.cni_conf_name.as_deref(), Some("05-cilium.conflist"));
        assert_eq!(
            e.exclude_namespaces,
            Some(vec!["kube-system".to_string(), "istio-system".to_string()])
        );
        assert_eq!(e.dns_capture, Some(false));
        assert_eq!(e.monitoring_port, Some(9999));
        assert_eq!(e.zds_socket, Some("/run/zt/zt.sock".into()));
        assert_eq!(e.run_dir, Some("/run/cni".into()));
        // Nothing set at all is upstream's defaults too.
        assert_eq!(env(&[]).unwrap(), ChartEnv::default());
    }

    #[test]
    fn values_we_cannot_honour_fail_naming_the_variable() {
        for (k, v, why) in [
            ("AMBIENT_ENABLED", "false", "ambient pods only"),
            ("AMBIENT_ENABLED", "yes", "not a boolean"),
            ("CHAINED_CNI_PLUGIN", "false", "always chained"),
            ("ISTIO_OWNED_CNI_CONFIG", "true", "not supported"),
            ("NATIVE_NFTABLES", "true", "not supported"),
            ("CNI_NETWORK_CONFIG", "{}", "template"),
            (
                "AMBIENT_ENABLEMENT_SELECTOR",
                "- podSelector: {matchLabels: {a: b}}",
                "default selectors",
            ),
            ("AMBIENT_ENABLEMENT_SELECTOR", "[", "not YAML"),
            ("REPAIR_DELETE_PODS", "maybe", "not a boolean"),
            ("REPAIR_INIT_CONTAINER_EXIT_CODE", "x", "not an integer"),
            ("MONITORING_PORT", "70000", "not a port"),
            ("MOUNTED_CNI_NET_DIR", "host/etc", "absolute"),
            ("CNI_CONF_NAME", "../x.conflist", "file name"),
            ("LOG_LEVEL", "loud", "not one of"),
        ] {
            let mut vars = RENDERED.to_vec();
            vars.retain(|(n, _)| *n != k);
            vars.push((k, v));
            let e = env(&vars).unwrap_err();
            assert_eq!((e.var.as_str(), e.value.as_str()), (k, v), "{e}");
            assert!(e.reason.contains(why), "{k}={v}: {e}");
            assert!(e.to_string().starts_with(&format!("{k}=")), "{e}");
        }
    }

    #[test]
    fn istio_log_levels_become_a_filter() {
        assert_eq!(log_filter("info").unwrap(), "info");
        assert_eq!(log_filter("default:debug,cni-agent:warn").unwrap(), "debug");
        assert_eq!(log_filter("none").unwrap(), "off");
        assert_eq!(log_filter("fatal").unwrap(), "error");
        assert!(log_filter("cni-agent:loud").unwrap_err().contains("loud"));
    }
}
