//! What `Resources` keeps of an address: its translation (the `Arc` the
//! published state shares) and only the inputs that re-translating it reads
//! when a related resource changes, not the decoded proto.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use mesh::locality::{HealthPolicy, LoadBalancing, Locality, Mode, Scope};
use mesh::model::Labels;
use mesh::owner::WorkloadKind;
use mesh::routes::WaypointRef;
use mesh::{Service, ServicePort, TargetPort, TunnelProtocol, Workload};

use crate::pb::istio::workload as wl;

/// (service port, target port) pairs.
pub(super) type Ports = Box<[(u16, u16)]>;

/// A workload as last received.
#[derive(Debug)]
pub(super) struct WorkloadEntry {
    /// Its translation. Until the next `build` (`published` false) it lacks
    /// what other resources give: the named ports filled in from services
    /// and a waypoint named by VIP.
    pub w: Arc<Workload>,
    /// The services it lists (sorted by key, `<ns>/<hostname>`, the key
    /// shared with the index), each with its own fixed target ports
    /// (service port, target port; only those with a target).
    pub services: Box<[(Arc<str>, Ports)]>,
    /// The VIP its waypoint is named by (resolved through the services).
    pub waypoint_vip: Option<IpAddr>,
    pub healthy: bool,
    pub published: bool,
    pub version: Arc<str>,
}

/// A service as last received.
#[derive(Debug)]
pub(super) struct ServiceEntry {
    /// Its translation; until the next `build`, without endpoints and a
    /// waypoint named by VIP.
    pub s: Arc<Service>,
    /// `<ns>/<hostname>`, shared with the index.
    pub key: Arc<str>,
    /// Service ports with a fixed target (service port, target port): they
    /// fill in the named ports of its healthy members.
    pub targets: Box<[(u16, u16)]>,
    pub waypoint_vip: Option<IpAddr>,
    pub published: bool,
    pub version: Arc<str>,
}

#[derive(Debug)]
pub(super) enum Address {
    Workload(WorkloadEntry),
    /// Boxed: services are few beside workloads, and larger.
    Service(Box<ServiceEntry>),
}

impl Address {
    pub fn version(&self) -> &str {
        match self {
            Address::Workload(w) => &w.version,
            Address::Service(s) => &s.version,
        }
    }
}

/// How a resource names its waypoint: fixed (by hostname, or nothing we can
/// read), or by an address that a service's VIP resolves.
enum WaypointName {
    Fixed(Option<WaypointRef>),
    Vip(IpAddr),
}

fn waypoint_name(g: &Option<wl::GatewayAddress>) -> WaypointName {
    match g.as_ref().and_then(|g| g.destination.as_ref()) {
        Some(wl::gateway_address::Destination::Hostname(h)) => {
            WaypointName::Fixed(Some(WaypointRef {
                name: h.hostname.clone(),
                namespace: h.namespace.clone(),
            }))
        }
        Some(wl::gateway_address::Destination::Address(a)) => match ip_of(&a.address) {
            Ok(ip) => WaypointName::Vip(ip),
            Err(_) => WaypointName::Fixed(None),
        },
        None => WaypointName::Fixed(None),
    }
}

fn port_pair(p: &wl::Port) -> Option<(u16, u16)> {
    let sp = u16::try_from(p.service_port).ok()?;
    let tp = u16::try_from(p.target_port).ok()?;
    (tp != 0).then_some((sp, tp))
}

/// `w` as far as it translates alone; `at` is its checked address, or the
/// unspecified one and its hostname; `key` interns a service key.
pub(super) fn workload_entry(
    w: wl::Workload,
    at: (IpAddr, Vec<IpAddr>, Option<String>),
    version: Arc<str>,
    no_labels: &Labels,
    strings: &mut mesh::intern::Interner,
    localities: &mut std::collections::HashSet<Arc<Locality>>,
    mut key: impl FnMut(&str) -> Arc<str>,
) -> WorkloadEntry {
    let mut services: Vec<_> = w
        .services
        .iter()
        .map(|(k, ports)| (key(k), ports.ports.iter().filter_map(port_pair).collect()))
        .collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    let (waypoint, waypoint_vip) = match waypoint_name(&w.waypoint) {
        WaypointName::Fixed(r) => (r, None),
        WaypointName::Vip(ip) => (None, Some(ip)),
    };
    let healthy = w.status == wl::WorkloadStatus::Healthy as i32;
    let t = Workload {
        service_account: strings.get(non_empty(&w.service_account, "default")),
        trust_domain: strings.get(non_empty(&w.trust_domain, identity::DEFAULT_TRUST_DOMAIN)),
        canonical_name: strings.get(non_empty(&w.canonical_name, &w.name)),
        canonical_revision: strings.get(non_empty(&w.canonical_revision, "latest")),
        namespace: strings.get(&w.namespace),
        node: strings.get(&w.node),
        workload_name: strings.get(non_empty(&w.workload_name, &w.name)),
        workload_kind: match wl::WorkloadType::try_from(w.workload_type) {
            Ok(wl::WorkloadType::Deployment) => WorkloadKind::Deployment,
            Ok(wl::WorkloadType::Cronjob) => WorkloadKind::CronJob,
            Ok(wl::WorkloadType::Job) => WorkloadKind::Job,
            // Pod, or a kind newer than this proto: the name still stands.
            _ => WorkloadKind::Pod,
        },
        cluster_id: (!w.cluster_id.is_empty()).then(|| strings.get(&w.cluster_id)),
        uid: w.uid,
        name: w.name,
        ip: at.0,
        extra_ips: at.1,
        hostname: at.2.map(|h| strings.get(&h)),
        // WDS carries neither: one empty map shared by all.
        labels: no_labels.clone(),
        annotations: no_labels.clone(),
        waypoint,
        named_ports: BTreeMap::new(),
        protocol: if w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        authorization_policies: exact(w.authorization_policies),
        locality: w.locality.and_then(|l| {
            let l = Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            };
            if l == Locality::default() {
                return None;
            }
            // Shared by the workloads of a node, as the file source shares it.
            Some(match localities.get(&l) {
                Some(a) => a.clone(),
                None => {
                    let a = Arc::new(l);
                    localities.insert(a.clone());
                    a
                }
            })
        }),
        healthy,
    };
    WorkloadEntry {
        w: Arc::new(t),
        services: services.into(),
        waypoint_vip,
        healthy,
        published: false,
        version,
    }
}

/// `s` as far as it translates alone (its addresses are checked).
/// The service's balancing; a scope, mode or health policy this proto does
/// not know refuses the resource (as upstream does), rather than guessing
/// where traffic may go.
pub(super) fn load_balancing(s: &wl::Service) -> Result<Option<LoadBalancing>, String> {
    use wl::load_balancing as lb;
    let Some(l) = &s.load_balancing else {
        return Ok(None);
    };
    let mut routing_preferences = Vec::with_capacity(l.routing_preference.len());
    for r in &l.routing_preference {
        routing_preferences.push(match lb::Scope::try_from(*r) {
            Ok(lb::Scope::Region) => Scope::Region,
            Ok(lb::Scope::Zone) => Scope::Zone,
            Ok(lb::Scope::Subzone) => Scope::Subzone,
            Ok(lb::Scope::Node) => Scope::Node,
            Ok(lb::Scope::Cluster) => Scope::Cluster,
            Ok(lb::Scope::Network) => Scope::Network,
            Ok(lb::Scope::UnspecifiedScope) | Err(_) => {
                return Err(format!("load_balancing: routing preference {r} unknown"))
            }
        });
    }
    let mode = match lb::Mode::try_from(l.mode) {
        Ok(lb::Mode::UnspecifiedMode) => Mode::Unspecified,
        Ok(lb::Mode::Strict) => Mode::Strict,
        Ok(lb::Mode::Failover) => Mode::Failover,
        Ok(lb::Mode::Passthrough) => Mode::Passthrough,
        Err(_) => return Err(format!("load_balancing: mode {} unknown", l.mode)),
    };
    let health_policy = match lb::HealthPolicy::try_from(l.health_policy) {
        Ok(lb::HealthPolicy::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(lb::HealthPolicy::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => {
            return Err(format!(
                "load_balancing: health policy {} unknown",
                l.health_policy
            ))
        }
    };
    Ok(Some(LoadBalancing {
        routing_preferences,
        mode,
        health_policy,
    }))
}

/// `s` as far as it translates alone (its addresses and balancing are
/// checked; `load_balancing` is what `load_balancing` made of it).
pub(super) fn service_entry(
    s: wl::Service,
    load_balancing: Option<LoadBalancing>,
    key: Arc<str>,
    version: Arc<str>,
) -> ServiceEntry {
    let (waypoint, waypoint_vip) = match waypoint_name(&s.waypoint) {
        WaypointName::Fixed(r) => (r, None),
        WaypointName::Vip(ip) => (None, Some(ip)),
    };
    let ports: Vec<_> = s
        .ports
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p.service_port).ok()?;
            // The target port may differ per endpoint (named targetPort):
            // each workload's own map wins.
            Some(ServicePort {
                name: None,
                port,
                target: TargetPort::Named(per_endpoint_port(&s.hostname, port)),
            })
        })
        .collect();
    let t = Service {
        waypoint,
        vips: exact(
            s.addresses
                .iter()
                .filter_map(|a| ip_of(&a.address).ok())
                .collect(),
        ),
        ports: exact(ports),
        endpoints: Vec::new(),
        ip_families: match wl::IpFamilies::try_from(s.ip_families) {
            Ok(wl::IpFamilies::Ipv4Only) => mesh::model::IpFamilies::V4Only,
            Ok(wl::IpFamilies::Ipv6Only) => mesh::model::IpFamilies::V6Only,
            // Automatic, dual, or a value newer than this proto: the
            // addresses say.
            _ => mesh::model::IpFamilies::Any,
        },
        load_balancing,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
    };
    ServiceEntry {
        s: Arc::new(t),
        key,
        targets: s.ports.iter().filter_map(port_pair).collect(),
        waypoint_vip,
        published: false,
        version,
    }
}

/// `v` without spare capacity (decoding and collecting leave some; these
/// vectors live as long as the resource).
fn exact<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

pub(super) fn service_key(s: &wl::Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

/// The hostname of a service key.
pub(super) fn host_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(_, h)| h)
}

/// The synthetic named port under which a workload records the target of a
/// service port (WDS gives target ports per workload, not per service).
pub(super) fn per_endpoint_port(host: &str, port: u16) -> String {
    format!("wds:{host}:{port}")
}

fn non_empty<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.is_empty() {
        default
    } else {
        s
    }
}

pub(crate) fn ip_of(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap())),
        n => Err(format!("address of {n} bytes")),
    }
}

/// Where traffic for `w` goes: its addresses (a dual-stack pod has one per
/// family, the first is its primary), or (no address) the hostname istiod
/// gives a DNS ServiceEntry's endpoints, which the proxy resolves when it
/// connects; the address is then the unspecified one.
pub(super) fn workload_ip(
    w: &wl::Workload,
) -> Result<(IpAddr, Vec<IpAddr>, Option<String>), String> {
    let bad = |r: String| format!("workload {}/{} {r}", w.namespace, w.name);
    match w.addresses.split_first() {
        Some((first, rest)) => {
            let ip = ip_of(first).map_err(bad)?;
            let extra = rest
                .iter()
                .map(|a| ip_of(a).map_err(bad))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((ip, extra, None))
        }
        None if w.hostname.is_empty() => Err(format!(
            "workload {}/{} has neither an address nor a hostname",
            w.namespace, w.name
        )),
        None => {
            let h = w.hostname.trim_end_matches('.').to_ascii_lowercase();
            if h.split('.').any(|l| l.is_empty() || l.len() > 63) {
                return Err(format!(
                    "workload {}/{} hostname {:?} is not a DNS name",
                    w.namespace, w.name, w.hostname
                ));
            }
            Ok((
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                Vec::new(),
                Some(h),
            ))
        }
    }
}
