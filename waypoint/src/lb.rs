//! Choosing an endpoint of a backend (service + subset): the DestinationRule's
//! load balancer, outlier ejection, and connection-pool limits. State lives per
//! backend and is touched under short, await-free locks.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mesh::locality::LoadBalancing;
use mesh::routes::{LoadBalancer, OutlierDetection, TrafficPolicy};
use mesh::Workload;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Default)]
struct EpState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// One backend's balancing state.
pub struct Backend {
    rr: AtomicUsize,
    /// Requests in flight per endpoint (LEAST_REQUEST).
    active: Mutex<HashMap<IpAddr, usize>>,
    health: Mutex<HashMap<IpAddr, EpState>>,
    /// Requests admitted at once (connectionPool), None = unlimited.
    limit: Option<Arc<Semaphore>>,
    limit_n: Option<u32>,
}

/// What the request brings for hashing.
pub struct HashInput<'a> {
    pub header: &'a (dyn Fn(&str) -> Option<String> + Sync),
    pub cookie: &'a (dyn Fn(&str) -> Option<String> + Sync),
    pub source_ip: IpAddr,
}

pub struct Lease {
    backend: Arc<Backend>,
    ip: IpAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(n) = self.backend.active.lock().unwrap().get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
    }
}

pub enum Outcome {
    Success,
    /// A 5xx from the endpoint (502/503/504 also count as gateway errors).
    Status(u16),
    /// Connect failure, reset, timeout: a gateway error.
    Failure,
}

impl Backend {
    pub fn new(policy: &TrafficPolicy) -> Backend {
        let limit_n = limit_of(policy);
        Backend {
            rr: AtomicUsize::new(0),
            active: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            limit: limit_n.map(|n| Arc::new(Semaphore::new(n as usize))),
            limit_n,
        }
    }

    /// A slot under the pool limit; None = overflow (503, flag UO).
    pub fn admit(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match &self.limit {
            None => Some(None),
            Some(s) => s.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// Picks among `eps` (never empty) by the policy, skipping ejected
    /// endpoints unless that would leave none; with `near` (this proxy's
    /// workload and the service's preference), among the closest tier of
    /// those (`mesh::locality::tiers`), so an ejected local endpoint fails
    /// over outward.
    pub fn pick(
        self: &Arc<Self>,
        eps: &[(Arc<Workload>, u16)],
        policy: &TrafficPolicy,
        h: &HashInput,
        near: Option<(&Workload, &LoadBalancing)>,
    ) -> (Arc<Workload>, u16, Lease) {
        let now = Instant::now();
        let healthy: Vec<usize> = {
            let health = self.health.lock().unwrap();
            (0..eps.len())
                .filter(|i| {
                    health
                        .get(&eps[*i].0.ip)
                        .and_then(|s| s.ejected_until)
                        .is_none_or(|t| t <= now)
                })
                .collect()
        };
        let all: Vec<usize> = (0..eps.len()).collect();
        let closest = |set: &[usize]| -> Vec<usize> {
            let Some((src, lb)) = near else {
                return set.to_vec();
            };
            let tiers = mesh::locality::tiers(Some(src), Some(lb), set.iter().map(|i| &*eps[*i].0));
            let first = tiers.into_iter().next().unwrap_or_default();
            first.into_iter().map(|j| set[j]).collect()
        };
        let mut cand = closest(&healthy);
        if cand.is_empty() {
            cand = closest(&all);
        }
        if cand.is_empty() {
            // Nothing close enough (STRICT): the caller refuses first.
            cand = all;
        }
        let i = match &policy.lb {
            LoadBalancer::RoundRobin => cand[self.rr.fetch_add(1, Ordering::Relaxed) % cand.len()],
            LoadBalancer::Random => cand[rand::random_range(0..cand.len())],
            LoadBalancer::LeastRequest => {
                // Power of two choices.
                let active = self.active.lock().unwrap();
                let (a, b) = (
                    cand[rand::random_range(0..cand.len())],
                    cand[rand::random_range(0..cand.len())],
                );
                let load = |i: usize| active.get(&eps[i].0.ip).copied().unwrap_or(0);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            LoadBalancer::HashHeader(name) => cand[hash((h.header)(name)) % cand.len()],
            LoadBalancer::HashCookie(name) => cand[hash((h.cookie)(name)) % cand.len()],
            LoadBalancer::HashSourceIp => cand[hash(Some(h.source_ip)) % cand.len()],
        };
        let (w, port) = eps[i].clone();
        *self.active.lock().unwrap().entry(w.ip).or_default() += 1;
        let lease = Lease {
            backend: self.clone(),
            ip: w.ip,
        };
        (w, port, lease)
    }

    /// Feeds outlier detection. Returns true when this result ejected the endpoint.
    pub fn record(
        &self,
        ip: IpAddr,
        outcome: Outcome,
        od: Option<&OutlierDetection>,
        endpoints: usize,
    ) -> bool {
        let Some(od) = od else { return false };
        let mut health = self.health.lock().unwrap();
        let now = Instant::now();
        let ejected_now = health
            .values()
            .filter(|s| s.ejected_until.is_some_and(|t| t > now))
            .count();
        let s = health.entry(ip).or_default();
        let (five, gw) = match outcome {
            Outcome::Success => {
                s.consecutive_5xx = 0;
                s.consecutive_gateway = 0;
                return false;
            }
            Outcome::Status(c) => (true, matches!(c, 502..=504)),
            Outcome::Failure => (true, true),
        };
        if five {
            s.consecutive_5xx += 1;
        }
        if gw {
            s.consecutive_gateway += 1;
        }
        let tripped = od
            .consecutive_5xx
            .is_some_and(|n| n > 0 && s.consecutive_5xx >= n)
            || od
                .consecutive_gateway
                .is_some_and(|n| n > 0 && s.consecutive_gateway >= n);
        let already = s.ejected_until.is_some_and(|t| t > now);
        // maxEjectionPercent, but always at least one endpoint may go.
        let cap = ((endpoints as u32 * od.max_ejection_percent) / 100).max(1) as usize;
        if !tripped || already || ejected_now >= cap {
            return false;
        }
        s.ejections += 1;
        s.ejected_until = Some(now + od.base_ejection * s.ejections);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        tracing::warn!(endpoint = %ip, ejections = s.ejections, for_s = (od.base_ejection * s.ejections).as_secs_f64(), "outlier ejected");
        metrics::counter!("istio_waypoint_outlier_ejections_total").increment(1);
        true
    }

    pub fn ejected(&self) -> Vec<IpAddr> {
        let now = Instant::now();
        self.health
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.ejected_until.is_some_and(|t| t > now))
            .map(|(ip, _)| *ip)
            .collect()
    }
}

/// Istio's pool knobs all bound concurrency at the waypoint: the tightest wins.
fn limit_of(policy: &TrafficPolicy) -> Option<u32> {
    let p = &policy.pool;
    [
        p.max_connections,
        p.http2_max_requests,
        p.http1_max_pending.map(|n| n.max(1)),
    ]
    .into_iter()
    .flatten()
    .min()
}

fn hash(v: Option<impl Hash>) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish() as usize
}

/// Balancing state per (service host, subset). Outlier state survives config
/// changes; a changed pool limit starts a fresh backend.
#[derive(Default)]
pub struct Backends(Mutex<HashMap<BackendKey, Arc<Backend>>>);

/// (service host, subset)
type BackendKey = (String, Option<String>);

impl Backends {
    pub fn get(&self, host: &str, subset: Option<&str>, policy: &TrafficPolicy) -> Arc<Backend> {
        let mut m = self.0.lock().unwrap();
        let key = (host.to_string(), subset.map(str::to_string));
        match m.get(&key) {
            Some(b) if b.limit_n == limit_of(policy) => b.clone(),
            _ => {
                let b = Arc::new(Backend::new(policy));
                m.insert(key, b.clone());
                b
            }
        }
    }

    pub fn ejected(&self) -> Vec<(String, Vec<IpAddr>)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|((h, s), b)| {
                (
                    format!(
                        "{h}{}",
                        s.as_ref().map(|s| format!("/{s}")).unwrap_or_default()
                    ),
                    b.ejected(),
                )
            })
            .filter(|(_, e)| !e.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The waypoint on node1 (zone a); a1 on node1, a2 on node2 (zone a),
    /// b on node3 (zone b).
    fn mesh() -> (Arc<Workload>, Vec<(Arc<Workload>, u16)>) {
        let node = |n: &str, z: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}, labels: {{topology.kubernetes.io/zone: {z}}}}}\n---\n")
        };
        let pod = |n: &str, node: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: a}}\nspec: {{nodeName: {node}}}\nstatus: {{podIP: {ip}}}\n---\n")
        };
        let yaml = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n".to_string(),
            node("node1", "za"),
            node("node2", "za"),
            node("node3", "zb"),
            pod("wp", "node1", "10.0.0.1"),
            pod("a1", "node1", "10.0.0.2"),
            pod("a2", "node2", "10.0.0.3"),
            pod("b", "node3", "10.0.0.4"),
        ]
        .concat();
        let st = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
        let w = |n: &str| st.workload_by_name("a", n).unwrap().clone();
        (
            w("wp"),
            ["a1", "a2", "b"].iter().map(|n| (w(n), 8080)).collect(),
        )
    }

    fn policy(lb: LoadBalancer) -> TrafficPolicy {
        TrafficPolicy {
            lb,
            outlier: Some(OutlierDetection {
                consecutive_5xx: Some(1),
                consecutive_gateway: None,
                interval: Duration::from_secs(10),
                base_ejection: Duration::from_secs(60),
                max_ejection_percent: 100,
            }),
            ..TrafficPolicy::default()
        }
    }

    fn picks(
        b: &Arc<Backend>,
        eps: &[(Arc<Workload>, u16)],
        p: &TrafficPolicy,
        near: Option<(&Workload, &LoadBalancing)>,
    ) -> std::collections::BTreeSet<String> {
        let none = |_: &str| None;
        let h = HashInput {
            header: &none,
            cookie: &none,
            source_ip: [10, 0, 0, 9].into(),
        };
        (0..40)
            .map(|_| b.pick(eps, p, &h, near).0.name.clone())
            .collect()
    }

    #[test]
    fn closest_healthy_tier_by_the_waypoints_locality() {
        let (me, eps) = mesh();
        let zone = LoadBalancing::prefer_same_zone();
        let node = LoadBalancing::prefer_same_node();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        for lb in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
        ] {
            let p = policy(lb);
            let b = Arc::new(Backend::new(&p));
            // No preference: every endpoint.
            assert_eq!(picks(&b, &eps, &p, None), set(&["a1", "a2", "b"]));
            // The zone, then the node: only the closest tier.
            assert_eq!(picks(&b, &eps, &p, Some((&me, &zone))), set(&["a1", "a2"]));
            assert_eq!(picks(&b, &eps, &p, Some((&me, &node))), set(&["a1"]));
            // The node's endpoint ejected: the zone's other one.
            b.record(eps[0].0.ip, Outcome::Status(503), p.outlier.as_ref(), 3);
            assert_eq!(picks(&b, &eps, &p, Some((&me, &node))), set(&["a2"]));
            // The whole zone ejected: out to the other zone.
            b.record(eps[1].0.ip, Outcome::Status(503), p.outlier.as_ref(), 3);
            assert_eq!(picks(&b, &eps, &p, Some((&me, &zone))), set(&["b"]));
            // Everything ejected: the closest tier again rather than none.
            b.record(eps[2].0.ip, Outcome::Status(503), p.outlier.as_ref(), 3);
            assert_eq!(picks(&b, &eps, &p, Some((&me, &zone))), set(&["a1", "a2"]));
        }
    }
}
