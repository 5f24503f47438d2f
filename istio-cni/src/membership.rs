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
        node: w.node.to_string(),
        service_account: w.service_account.to_string(),
        options: Options {
            dns: flag(DNS_CAPTURE).unwrap_or(dns_default),
            inbound: !flag(BYPASS_INBOUND).unwrap_or(false),
            // From the mesh's addresses; the agent adds the CNI's.
            ipv6: w.ip.is_ipv6() || w.extra_ips.iter().any(IpAddr::is_ipv6),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: amb, annotations: {ambient.istio.io/dns-capture: \"false\", ambient.istio.io/bypass-inbound-capture: \"true\"}}\nspec: {serviceAccountName: sa, nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: out, namespace: amb, labels: {istio.io/dataplane-mode: none}}\nspec: {serviceAccountName: sa, nodeName: n1}\nstatus: {podIP: 10.0.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: in, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}\nspec: {serviceAccountName: sa, nodeName: n1}\nstatus: {}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: plain}\nspec: {serviceAccountName: sa, nodeName: n1}\nstatus: {podIP: 10.0.0.4}\n";

    /// What each pod gets: Some((ip, dns, inbound)) for Ambient, else the
    /// variant's name.
    #[test]
    fn decide_table() {
        let s = mesh::standalone::parse(MESH, "cluster.local").unwrap();
        let excluded = ["amb-excluded".to_string(), "plain".to_string()];
        let short = |m: Membership| match m {
            Membership::Ambient { ip, options, .. } => {
                format!(
                    "ambient {ip} dns={} inbound={}",
                    options.dns, options.inbound
                )
            }
            Membership::Outside(why) => format!("outside: {why}"),
            Membership::Undeclared => "undeclared".into(),
        };
        for (ns, name, excl, want) in [
            // Annotations override the node's DNS default and inbound capture.
            (
                "amb",
                "a",
                &[][..],
                "ambient 10.0.0.1 dns=false inbound=false",
            ),
            (
                "amb",
                "out",
                &[],
                "outside: pod label istio.io/dataplane-mode=none",
            ),
            ("amb", "ghost", &[], "undeclared"),
            // Not yet addressed: the CNI's address will be the one.
            ("plain", "in", &[], "ambient 0.0.0.0 dns=true inbound=true"),
            (
                "plain",
                "p",
                &[],
                "outside: namespace plain is not labelled istio.io/dataplane-mode=ambient",
            ),
            (
                "plain",
                "ghost",
                &[],
                "outside: namespace plain is not labelled istio.io/dataplane-mode=ambient",
            ),
            // Exclusion beats a pod's own opt-in.
            (
                "plain",
                "in",
                &excluded[..],
                "outside: namespace plain is excluded from capture",
            ),
        ] {
            assert_eq!(short(decide(&s, ns, name, excl, true)), want, "{ns}/{name}");
        }
    }
}
