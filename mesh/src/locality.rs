//! Locality-aware endpoint choice, as upstream ztunnel makes it.
//!
//! A workload runs somewhere (its node's region, zone and subzone, its
//! node, its cluster); a service may ask for its endpoints to be chosen by
//! closeness (WDS `load_balancing`; from Kubernetes, `spec.trafficDistribution`,
//! `spec.internalTrafficPolicy: Local` or Istio's
//! `networking.istio.io/traffic-distribution` annotation, mapped as istiod
//! maps them). `tiers` orders a service's endpoints for one client: an
//! endpoint's rank is how many of the service's routing preferences, in
//! order, it shares with the client (the first it does not share ends the
//! count). FAILOVER tries the highest rank first and falls back rank by
//! rank; STRICT keeps only endpoints that share every preference. Pure: the
//! proxies pick at random within a tier and move on when a dial fails.

use std::sync::Arc;

use serde::Serialize;

use crate::model::Workload;

/// The node label Kubernetes puts a node's region in.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Istio's own label for the level below a zone.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Istio's service (or namespace) annotation for `trafficDistribution`.
pub const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";

/// Where a workload runs; the empty string is "not known" and, as upstream
/// compares, equals another unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// From a node's labels; None when it carries none of them.
    pub fn of_node(labels: &std::collections::BTreeMap<String, String>) -> Option<Arc<Locality>> {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let l = Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            subzone: get(SUBZONE_LABEL),
        };
        (l != Locality::default()).then(|| Arc::new(l))
    }
}

/// What a routing preference compares (WDS `LoadBalancing.Scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    /// The mesh model has one network: every endpoint shares it.
    Network,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// No preference: any endpoint.
    Unspecified,
    /// Only endpoints sharing every preference; none is a failure.
    Strict,
    /// The closest first, falling back rank by rank.
    Failover,
    /// No endpoint choice: to the address the client dialled.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    /// Unready endpoints are endpoints too (`publishNotReadyAddresses`).
    AllowAll,
}

/// A service's balancing, in upstream's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    pub routing_preferences: Vec<Scope>,
    pub mode: Mode,
    pub health_policy: HealthPolicy,
}

impl LoadBalancing {
    /// PreferClose / PreferSameZone: network, region, zone, failing over.
    pub fn prefer_same_zone() -> Self {
        LoadBalancing {
            routing_preferences: vec![Scope::Network, Scope::Region, Scope::Zone],
            mode: Mode::Failover,
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }

    /// PreferSameNode: down to the node, failing over.
    pub fn prefer_same_node() -> Self {
        LoadBalancing {
            routing_preferences: vec![
                Scope::Network,
                Scope::Region,
                Scope::Zone,
                Scope::Subzone,
                Scope::Node,
            ],
            mode: Mode::Failover,
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }

    /// `internalTrafficPolicy: Local`: this node only.
    pub fn node_local() -> Self {
        LoadBalancing {
            routing_preferences: vec![Scope::Node],
            mode: Mode::Strict,
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }

    pub fn allows_unhealthy(lb: Option<&LoadBalancing>) -> bool {
        lb.is_some_and(|l| l.health_policy == HealthPolicy::AllowAll)
    }
}

/// A Kubernetes Service's fields that decide its balancing, as istiod reads
/// them: `internalTrafficPolicy: Local` first, then `trafficDistribution`,
/// then the annotation on the service, then on its namespace (which the
/// source passes in when it derives the service).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeService {
    pub internal_traffic_policy: Option<String>,
    pub traffic_distribution: Option<String>,
    pub annotation: Option<String>,
    pub publish_not_ready_addresses: bool,
}

impl KubeService {
    pub fn load_balancing(&self, namespace_annotation: Option<&str>) -> Option<LoadBalancing> {
        let mut lb = if self.internal_traffic_policy.as_deref() == Some("Local") {
            Some(LoadBalancing::node_local())
        } else {
            self.distribution(namespace_annotation)
        };
        if self.publish_not_ready_addresses {
            let l = lb.get_or_insert(LoadBalancing {
                routing_preferences: Vec::new(),
                mode: Mode::Unspecified,
                health_policy: HealthPolicy::AllowAll,
            });
            l.health_policy = HealthPolicy::AllowAll;
        }
        lb
    }

    fn distribution(&self, namespace_annotation: Option<&str>) -> Option<LoadBalancing> {
        // An unknown spec value falls through to the annotations; an
        // unknown annotation value means no preference (istiod warns).
        match self.traffic_distribution.as_deref() {
            Some("PreferClose" | "PreferSameZone") => {
                return Some(LoadBalancing::prefer_same_zone())
            }
            Some("PreferSameNode") => return Some(LoadBalancing::prefer_same_node()),
            _ => {}
        }
        let annotated = self
            .annotation
            .as_deref()
            .filter(|a| !a.is_empty())
            .or(namespace_annotation.filter(|a| !a.is_empty()))?;
        match annotated.to_ascii_lowercase().as_str() {
            "preferclose" | "prefersamezone" => Some(LoadBalancing::prefer_same_zone()),
            "prefersamenode" => Some(LoadBalancing::prefer_same_node()),
            _ => None,
        }
    }
}

fn shares(src: &Workload, dst: &Workload, scope: Scope) -> bool {
    let empty = Locality::default();
    let (a, b) = (
        src.locality.as_deref().unwrap_or(&empty),
        dst.locality.as_deref().unwrap_or(&empty),
    );
    match scope {
        Scope::Region => a.region == b.region,
        Scope::Zone => a.zone == b.zone,
        Scope::Subzone => a.subzone == b.subzone,
        Scope::Node => src.node == dst.node,
        Scope::Cluster => src.cluster_id == dst.cluster_id,
        Scope::Network => true,
    }
}

/// How many of `prefs`, in order, `dst` shares with `src`.
pub fn rank(src: &Workload, dst: &Workload, prefs: &[Scope]) -> usize {
    prefs.iter().take_while(|s| shares(src, dst, **s)).count()
}

/// The endpoints `eps` (by index) in the order a client `src` should try
/// them: tiers, closest first; any order within a tier. Without a source
/// workload or a preference, one tier of all. STRICT may leave none.
pub fn tiers<'a>(
    src: Option<&Workload>,
    lb: Option<&LoadBalancing>,
    eps: impl ExactSizeIterator<Item = &'a Workload>,
) -> Vec<Vec<usize>> {
    let n = eps.len();
    let all = || {
        let t: Vec<usize> = (0..n).collect();
        if t.is_empty() {
            Vec::new()
        } else {
            vec![t]
        }
    };
    let (Some(src), Some(lb)) = (src, lb) else {
        return all();
    };
    let prefs = &lb.routing_preferences;
    let strict = match lb.mode {
        Mode::Strict => true,
        Mode::Failover => false,
        Mode::Unspecified | Mode::Passthrough => return all(),
    };
    let mut by_rank: Vec<Vec<usize>> = vec![Vec::new(); prefs.len() + 1];
    for (i, ep) in eps.enumerate() {
        let r = rank(src, ep, prefs);
        if strict && r != prefs.len() {
            continue;
        }
        by_rank[r].push(i);
    }
    by_rank.reverse();
    by_rank.retain(|t| !t.is_empty());
    by_rank
}

#[cfg(test)]
#[path = "locality_tests.rs"]
mod tests;
