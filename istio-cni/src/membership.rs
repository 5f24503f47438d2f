//! Which pods are captured, and how: the pod label
//! `istio.io/dataplane-mode` wins (`ambient` enrols, `none` opts out), else
//! the namespace label; excluded namespaces never are.

use std::net::IpAddr;

use mesh::{MeshState, DATAPLANE_MODE_LABEL};

use crate::redirect::Options;

pub const BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
pub const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Capture it: ztunnel knows it by this uid. `ip` is unspecified when the
    /// pod is not addressed yet: the CNI's address is the one.
    Ambient {
        uid: String,
        ip: IpAddr,
        node: String,
        service_account: String,
        options: Options,
    },
    /// Leave it alone, and why.
    Outside(String),
    /// Its namespace is ambient but the mesh does not know the pod, so it has
    /// no identity: starting it would leave it uncaptured or unreachable.
    Undeclared,
}

/// Decides for the pod `namespace/name`. `dns_default` is the node-wide DNS
/// capture setting a pod annotation may override.
pub fn decide(
    state: &MeshState,
    namespace: &str,
    name: &str,
    excluded: &[String],
    dns_default: bool,
) -> Membership {
    if excluded.iter().any(|n| n == namespace) {
        return Membership::Outside(format!("namespace {namespace} is excluded from capture"));
    }
    let ns_ambient = state
        .namespace_labels
        .get(namespace)
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .is_some_and(|m| m == "ambient");
    let Some(w) = state.pod_by_name(namespace, name) else {
        return if ns_ambient {
            Membership::Undeclared
        } else {
            Membership::Outside(format!(
                "namespace {namespace} is not labelled {DATAPLANE_MODE_LABEL}=ambient"
            ))
        };
    };
    match w.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("ambient") => {}
        Some("none") => {
            return Membership::Outside(format!("pod label {DATAPLANE_MODE_LABEL}=none"))
        }
        _ if ns_ambient => {}
        _ => {
            return Membership::Outside(format!(
                "namespace {namespace} is not labelled {DATAPLANE_MODE_LABEL}=ambient"
            ))
        }
    }
    let flag = |k: &str| w.annotations.get(k).map(|v| v == "true");
    Membership::Ambient {
        uid: w.uid.clone(),
        ip: w.ip,
        node: w.node.clone(),
        service_account: w.service_account.clone(),
        options: Options {
            dns: flag(DNS_CAPTURE).unwrap_or(dns_default),
            inbound: !flag(BYPASS_INBOUND).unwrap_or(false),
        },
    }
}
