//! WDS resources (istio.workload.Address, istio.security.Authorization) into
//! the mesh model. Resources are kept by name as istiod last sent them, with
//! their translations; each push publishes one consistent `MeshState` (the
//! data path never sees half a push), re-translating only what it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh::authz::AuthorizationPolicy;
use mesh::routes::{AllowedNamespaces, Waypoint, WaypointFor, WaypointRef};
use mesh::{
    Endpoint, MeshState, Rejected, Service, ServicePort, TargetPort, TunnelProtocol, Workload,
};
use prost::Message;

use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;
use crate::wds_policy::{translate_policy, undecodable_policy};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{name}: not a valid {type_url}: {source}")]
    Decode {
        name: String,
        type_url: String,
        source: prost::DecodeError,
    },
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("unsupported resource type {0}")]
    UnknownType(String),
}

/// What istiod has told us, by resource name, kept translated: a push
/// re-translates only the resources it changed and those that read them
/// (a service's endpoints read its member workloads; a workload's ports and
/// address-form waypoint read services), so its cost follows the change, not
/// the mesh. Publishing a state then copies per-entry `Arc`s.
#[derive(Default, Debug)]
pub struct Resources {
    pub workloads: BTreeMap<String, wl::Workload>,
    pub services: BTreeMap<String, wl::Service>,
    /// Translated on arrival; one we cannot read fully is kept in its
    /// fail-closed form with what was wrong, never refused.
    pub policies: BTreeMap<String, (Arc<AuthorizationPolicy>, Vec<Rejected>)>,
    /// name -> version, for `initial_resource_versions` on reconnect.
    pub versions: HashMap<String, HashMap<String, String>>,
    index: Index,
}

/// What `build` derives from the raw resources, maintained per change.
#[derive(Default, Debug)]
struct Index {
    /// Translated workloads and services by resource name.
    workloads: BTreeMap<String, Arc<Workload>>,
    services: BTreeMap<String, Arc<Service>>,
    /// What a published state holds, kept as persistent maps so publishing
    /// shares them instead of rebuilding them.
    published: mesh::model::Indexes,
    /// The published policy list, its index and what could not be read of
    /// it; None after a policy change.
    policies: Option<Policies>,
    /// Waypoints named by some workload or service, with how many name
    /// each; the published list is rebuilt only when the set changes.
    waypoint_refs: BTreeMap<(String, String), usize>,
    waypoints: Option<Arc<Vec<Waypoint>>>,
    /// Service key (`<ns>/<hostname>`) -> its healthy member workloads, by
    /// workload resource name (the endpoint order).
    members: HashMap<String, BTreeMap<String, (String, IpAddr)>>,
    /// Service key -> the resource names of services with that key.
    service_names: HashMap<String, BTreeSet<String>>,
    /// Service VIP -> (namespace, hostname), for waypoints named by address.
    vip_hosts: HashMap<IpAddr, (String, String)>,
    /// Waypoint VIP -> resources (workloads and services) naming it.
    by_waypoint_vip: HashMap<IpAddr, BTreeSet<String>>,
    /// Resources to translate again at the next `build`.
    dirty: BTreeSet<String>,
}

type Policies = (
    Arc<Vec<Arc<AuthorizationPolicy>>>,
    Arc<mesh::model::PolicyIndex>,
    Arc<Vec<Rejected>>,
);

impl Index {
    fn publish_workload(&mut self, w: &Arc<Workload>) {
        self.published.insert_workload(w.clone());
        self.count_waypoint(w.waypoint.as_ref(), true);
    }

    /// Takes out the entries `w` made, unless another entry has since taken
    /// the same key.
    fn unpublish_workload(&mut self, w: &Arc<Workload>) {
        self.published.remove_workload(w);
        self.count_waypoint(w.waypoint.as_ref(), false);
    }

    fn publish_service(&mut self, s: &Arc<Service>) {
        self.published.insert_service(s.clone());
        self.count_waypoint(s.waypoint.as_ref(), true);
    }

    fn unpublish_service(&mut self, s: &Arc<Service>) {
        self.published.remove_service(s);
        self.count_waypoint(s.waypoint.as_ref(), false);
    }

    fn count_waypoint(&mut self, r: Option<&WaypointRef>, add: bool) {
        let Some(r) = r else { return };
        let key = (r.namespace.clone(), r.name.clone());
        let n = self.waypoint_refs.entry(key.clone()).or_default();
        if add {
            *n += 1;
            if *n == 1 {
                self.waypoints = None;
            }
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.waypoint_refs.remove(&key);
                self.waypoints = None;
            }
        }
    }
}

fn service_key(s: &wl::Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

fn waypoint_vip(g: &Option<wl::GatewayAddress>) -> Option<IpAddr> {
    match g.as_ref()?.destination.as_ref()? {
        wl::gateway_address::Destination::Address(a) => ip_of(&a.address).ok(),
        wl::gateway_address::Destination::Hostname(_) => None,
    }
}

fn service_vips(s: &wl::Service) -> impl Iterator<Item = IpAddr> + '_ {
    s.addresses.iter().filter_map(|a| ip_of(&a.address).ok())
}

impl Resources {
    /// Decodes and stores one resource. On error nothing is stored and the
    /// previous version of that resource (if any) stays.
    pub fn upsert(
        &mut self,
        type_url: &str,
        name: &str,
        version: &str,
        body: &[u8],
    ) -> Result<(), ResourceError> {
        let decode_err = |source| ResourceError::Decode {
            name: name.to_string(),
            type_url: type_url.to_string(),
            source,
        };
        match type_url {
            ADDRESS_TYPE => {
                let addr = wl::Address::decode(body).map_err(decode_err)?;
                match addr.r#type {
                    Some(wl::address::Type::Workload(w)) => {
                        workload_ip(&w).map_err(|reason| invalid(name, reason))?;
                        self.forget_address(name);
                        self.learn_workload(name, &w);
                        self.workloads.insert(name.to_string(), w);
                    }
                    Some(wl::address::Type::Service(s)) => {
                        for a in &s.addresses {
                            ip_of(&a.address)
                                .map_err(|r| invalid(name, format!("service address: {r}")))?;
                        }
                        self.forget_address(name);
                        self.learn_service(name, &s);
                        self.services.insert(name.to_string(), s);
                    }
                    None => {
                        return Err(invalid(
                            name,
                            "Address with neither workload nor service".into(),
                        ))
                    }
                }
            }
            AUTHORIZATION_TYPE => {
                let (policy, rejected) = match sec::Authorization::decode(body) {
                    Ok(p) => translate_policy(&p, body.len()),
                    // A policy we cannot decode still says which namespace
                    // it covers (resources are named `<ns>/<name>`): it
                    // denies everything there rather than vanish.
                    Err(e) => match name.split_once('/') {
                        Some((ns, n)) => undecodable_policy(ns, n, &e),
                        None => return Err(decode_err(e)),
                    },
                };
                self.policies
                    .insert(name.to_string(), (Arc::new(policy), rejected));
                self.index.policies = None;
            }
            other => return Err(ResourceError::UnknownType(other.to_string())),
        }
        self.versions
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), version.to_string());
        Ok(())
    }

    pub fn remove(&mut self, type_url: &str, name: &str) {
        if type_url == ADDRESS_TYPE {
            self.forget_address(name);
        } else {
            self.policies.remove(name);
            self.index.policies = None;
        }
        if let Some(v) = self.versions.get_mut(type_url) {
            v.remove(name);
        }
    }

    /// Takes out every index entry the address `name` made, and marks what
    /// read it.
    fn forget_address(&mut self, name: &str) {
        let ix = &mut self.index;
        if let Some(w) = self.workloads.remove(name) {
            if let Some(old) = ix.workloads.remove(name) {
                ix.unpublish_workload(&old);
            }
            for key in w.services.keys() {
                let emptied = ix.members.get_mut(key).is_some_and(|m| {
                    m.remove(name);
                    m.is_empty()
                });
                if emptied {
                    ix.members.remove(key);
                }
                ix.dirty
                    .extend(ix.service_names.get(key).into_iter().flatten().cloned());
            }
            if let Some(vip) = waypoint_vip(&w.waypoint) {
                remove_from(&mut ix.by_waypoint_vip, &vip, name);
            }
        }
        if let Some(s) = self.services.remove(name) {
            if let Some(old) = ix.services.remove(name) {
                ix.unpublish_service(&old);
            }
            let key = service_key(&s);
            remove_from(&mut ix.service_names, &key, name);
            // Its members' ports came from it; what named it by VIP resolves
            // differently now.
            ix.dirty.extend(
                ix.members
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .map(|(n, _)| n.clone()),
            );
            for vip in service_vips(&s) {
                if ix.vip_hosts.get(&vip) == Some(&(s.namespace.clone(), s.hostname.clone())) {
                    ix.vip_hosts.remove(&vip);
                }
                ix.dirty
                    .extend(ix.by_waypoint_vip.get(&vip).into_iter().flatten().cloned());
            }
            if let Some(vip) = waypoint_vip(&s.waypoint) {
                remove_from(&mut ix.by_waypoint_vip, &vip, name);
            }
        }
        ix.dirty.remove(name);
    }

    fn learn_workload(&mut self, name: &str, w: &wl::Workload) {
        let ix = &mut self.index;
        let Ok(ip) = workload_ip(w) else { return };
        for key in w.services.keys() {
            if w.status == wl::WorkloadStatus::Healthy as i32 {
                ix.members
                    .entry(key.clone())
                    .or_default()
                    .insert(name.to_string(), (w.uid.clone(), ip));
            }
            ix.dirty
                .extend(ix.service_names.get(key).into_iter().flatten().cloned());
        }
        if let Some(vip) = waypoint_vip(&w.waypoint) {
            ix.by_waypoint_vip
                .entry(vip)
                .or_default()
                .insert(name.to_string());
        }
        ix.dirty.insert(name.to_string());
    }

    fn learn_service(&mut self, name: &str, s: &wl::Service) {
        let ix = &mut self.index;
        let key = service_key(s);
        ix.service_names
            .entry(key.clone())
            .or_default()
            .insert(name.to_string());
        ix.dirty.extend(
            ix.members
                .get(&key)
                .into_iter()
                .flatten()
                .map(|(n, _)| n.clone()),
        );
        for vip in service_vips(s) {
            ix.vip_hosts
                .insert(vip, (s.namespace.clone(), s.hostname.clone()));
            ix.dirty
                .extend(ix.by_waypoint_vip.get(&vip).into_iter().flatten().cloned());
        }
        if let Some(vip) = waypoint_vip(&s.waypoint) {
            ix.by_waypoint_vip
                .entry(vip)
                .or_default()
                .insert(name.to_string());
        }
        ix.dirty.insert(name.to_string());
    }

    /// The mesh as istiod currently describes it: what changed since the
    /// last call is translated again; the rest is shared.
    pub fn build(&mut self) -> MeshState {
        for name in std::mem::take(&mut self.index.dirty) {
            if let Some(w) = self.workloads.get(&name) {
                if let Some(t) = self.translate_workload(w) {
                    let t = Arc::new(t);
                    self.index.publish_workload(&t);
                    // Keys the old entry shared with the new one now point
                    // at the new one and stay.
                    if let Some(old) = self.index.workloads.insert(name, t) {
                        self.index.unpublish_workload(&old);
                    }
                }
            } else if let Some(s) = self.services.get(&name) {
                let t = Arc::new(self.translate_service(s));
                self.index.publish_service(&t);
                if let Some(old) = self.index.services.insert(name, t) {
                    self.index.unpublish_service(&old);
                }
            }
        }
        // istiod has already resolved `istio.io/use-waypoint` and the
        // Gateway's `waypoint-for`: the waypoints are those named.
        let ix = &mut self.index;
        let waypoints = ix
            .waypoints
            .get_or_insert_with(|| {
                let list = ix.waypoint_refs.keys().map(|(namespace, name)| Waypoint {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    hostname: name.clone(),
                    for_traffic: WaypointFor::All,
                    // istiod sends a waypoint only where the Gateway admits it.
                    allowed_namespaces: AllowedNamespaces::All,
                });
                Arc::new(list.collect())
            })
            .clone();
        // Policies change far less often than workloads: their list and
        // index are rebuilt only when they did.
        let (policies, policy_index, rejected) = ix
            .policies
            .get_or_insert_with(|| {
                let list: Vec<_> = self.policies.values().map(|(p, _)| p.clone()).collect();
                let index = Arc::new(mesh::model::PolicyIndex::new(&list));
                let rejected = self.policies.values().flat_map(|(_, r)| r.iter().cloned());
                (Arc::new(list), index, Arc::new(rejected.collect()))
            })
            .clone();
        let mut state = MeshState::from_indexes(ix.published.clone(), policies, policy_index);
        state.waypoints = waypoints;
        state.rejected = rejected;
        state
    }

    /// A waypoint named by hostname, or by the VIP of a service we know.
    fn waypoint_ref(&self, g: &Option<wl::GatewayAddress>) -> Option<WaypointRef> {
        let (namespace, name) = match g.as_ref()?.destination.as_ref()? {
            wl::gateway_address::Destination::Hostname(h) => {
                (h.namespace.clone(), h.hostname.clone())
            }
            wl::gateway_address::Destination::Address(a) => {
                self.index.vip_hosts.get(&ip_of(&a.address).ok()?)?.clone()
            }
        };
        Some(WaypointRef { name, namespace })
    }

    fn translate_workload(&self, w: &wl::Workload) -> Option<Workload> {
        let ip = workload_ip(w).ok()?;
        let mut named_ports = BTreeMap::new();
        for (key, ports) in &w.services {
            let host = key.split_once('/').map_or(key.as_str(), |(_, h)| h);
            for p in &ports.ports {
                if let (Ok(sp), Ok(tp)) =
                    (u16::try_from(p.service_port), u16::try_from(p.target_port))
                {
                    if tp != 0 {
                        named_ports.insert(per_endpoint_port(host, sp), tp);
                    }
                }
            }
        }
        // A service port with a fixed target reaches its (healthy) members
        // even where their own entry did not list it.
        if w.status == wl::WorkloadStatus::Healthy as i32 {
            for key in w.services.keys() {
                let names = self.index.service_names.get(key).into_iter().flatten();
                for s in names.filter_map(|n| self.services.get(n)) {
                    for p in &s.ports {
                        if let (Ok(sp), Ok(tp)) =
                            (u16::try_from(p.service_port), u16::try_from(p.target_port))
                        {
                            if tp != 0 {
                                named_ports
                                    .entry(per_endpoint_port(&s.hostname, sp))
                                    .or_insert(tp);
                            }
                        }
                    }
                }
            }
        }
        Some(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: non_empty(&w.service_account, "default"),
            trust_domain: non_empty(&w.trust_domain, identity::DEFAULT_TRUST_DOMAIN),
            node: w.node.clone(),
            ip,
            labels: Default::default(),
            annotations: Default::default(),
            waypoint: self.waypoint_ref(&w.waypoint),
            named_ports,
            protocol: if w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            },
            canonical_name: non_empty(&w.canonical_name, &w.name),
            canonical_revision: non_empty(&w.canonical_revision, "latest"),
            authorization_policies: w.authorization_policies.clone(),
        })
    }

    fn translate_service(&self, s: &wl::Service) -> Service {
        let endpoints = self
            .index
            .members
            .get(&service_key(s))
            .map(|m| {
                m.values()
                    .map(|(uid, ip)| Endpoint {
                        workload_uid: uid.clone(),
                        ip: *ip,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Service {
            waypoint: self.waypoint_ref(&s.waypoint),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips: service_vips(s).collect(),
            ports: s
                .ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.service_port).ok()?;
                    // The target port may differ per endpoint (named
                    // targetPort): each workload's own map wins.
                    Some(ServicePort {
                        name: None,
                        port,
                        target: TargetPort::Named(per_endpoint_port(&s.hostname, port)),
                    })
                })
                .collect(),
            endpoints,
        }
    }

    /// Index entries left (for the no-leak tests): all zero once every
    /// address is removed.
    #[cfg(test)]
    fn index_sizes(&self) -> [usize; 9] {
        let ix = &self.index;
        [
            ix.workloads.len(),
            ix.services.len(),
            ix.published.workloads().len(),
            ix.published.services().len(),
            ix.waypoint_refs.len(),
            ix.members.len(),
            ix.service_names.len(),
            ix.vip_hosts.len(),
            ix.by_waypoint_vip.len(),
        ]
    }
}

/// Removes `name` from the set at `key`, and the set once empty (an index
/// entry never outlives what made it).
fn remove_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, BTreeSet<String>>,
    key: &K,
    name: &str,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// The synthetic named port under which a workload records the target of a
/// service port (WDS gives target ports per workload, not per service).
fn per_endpoint_port(host: &str, port: u16) -> String {
    format!("wds:{host}:{port}")
}

fn invalid(name: &str, reason: String) -> ResourceError {
    ResourceError::Invalid {
        name: name.to_string(),
        reason,
    }
}

fn non_empty(s: &str, default: &str) -> String {
    if s.is_empty() { default } else { s }.to_string()
}

pub(crate) fn ip_of(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap())),
        n => Err(format!("address of {n} bytes")),
    }
}

fn workload_ip(w: &wl::Workload) -> Result<IpAddr, String> {
    // Our pods are single-stack; the first address is the one traffic uses.
    match w.addresses.first() {
        Some(a) => ip_of(a).map_err(|r| format!("workload {}/{} {r}", w.namespace, w.name)),
        None => Err(format!(
            "workload {}/{} has no address",
            w.namespace, w.name
        )),
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::authz::{self, Connection, Decision};

    fn workload(
        name: &str,
        ip: [u8; 4],
        svc: Option<(&str, u32, u32)>,
        policies: &[&str],
    ) -> wl::Workload {
        let mut services = HashMap::new();
        if let Some((key, sp, tp)) = svc {
            services.insert(
                key.to_string(),
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: sp,
                        target_port: tp,
                        app_protocol: 0,
                    }],
                },
            );
        }
        wl::Workload {
            uid: format!("Kubernetes//Pod/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            node: "node1".into(),
            services: services.into_iter().collect(),
            authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn put(r: &mut Resources, name: &str, a: wl::address::Type) {
        let body = wl::Address { r#type: Some(a) }.encode_to_vec();
        r.upsert(ADDRESS_TYPE, name, "v1", &body).unwrap();
    }

    #[test]
    fn workloads_services_and_listed_policies() {
        let mut r = Resources::default();
        let key = "demo/echo.demo.svc.cluster.local";
        put(
            &mut r,
            "a",
            wl::address::Type::Workload(workload(
                "echo",
                [10, 244, 1, 2],
                Some((key, 80, 8080)),
                &["demo/only-client"],
            )),
        );
        put(
            &mut r,
            "b",
            wl::address::Type::Workload(workload("client", [10, 244, 1, 3], None, &[])),
        );
        put(
            &mut r,
            "svc",
            wl::address::Type::Service(wl::Service {
                name: "echo".into(),
                namespace: "demo".into(),
                hostname: "echo.demo.svc.cluster.local".into(),
                addresses: vec![wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 10],
                }],
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: 0,
                }],
                waypoint: None,
            }),
        );
        let allow = sec::Authorization {
            name: "only-client".into(),
            namespace: "demo".into(),
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Allow as i32,
            groups: vec![sec::Group {
                rules: vec![sec::Rules {
                    matches: vec![sec::Match {
                        service_accounts: vec![sec::ServiceAccountMatch {
                            namespace: "demo".into(),
                            service_account: "client".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        r.upsert(
            AUTHORIZATION_TYPE,
            "demo/only-client",
            "v1",
            &allow.encode_to_vec(),
        )
        .unwrap();

        let st = r.build();
        let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        let eps = st.endpoints_for(svc, 80);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].0.name.as_str(), eps[0].1), ("echo", 8080));
        let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
        let client = st.workload_by_ip("10.244.1.3".parse().unwrap()).unwrap();
        fn conn<'a>(id: &'a identity::Identity, echo: &Workload) -> Connection<'a> {
            Connection {
                src_identity: Some(id),
                src_ip: "10.244.1.3".parse().unwrap(),
                dst_ip: echo.ip,
                dst_port: 8080,
                request: None,
            }
        }
        let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
        assert_eq!(
            authz::evaluate(
                policies.iter().copied(),
                echo,
                &conn(&client.identity(), echo)
            ),
            Decision::Allow
        );
        let other = identity::Identity::new("cluster.local", "demo", "intruder");
        assert!(matches!(
            authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
            Decision::Deny(_)
        ));
        // The index a connection uses finds the listed policy too.
        assert!(matches!(
            authz::evaluate_selected(st.policies_selecting(echo), &conn(&other, echo)),
            Decision::Deny(_)
        ));
        assert_eq!(st.policies_selecting(client).count(), 0);
        // The policy is listed on echo only: client has no ALLOW selecting it.
        assert!(
            authz::evaluate(policies.iter().copied(), client, &conn(&other, echo))
                == Decision::Allow
        );

        r.remove(AUTHORIZATION_TYPE, "demo/only-client");
        let st = r.build();
        let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
        assert_eq!(
            authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
            Decision::Allow
        );
    }

    #[test]
    fn bad_resources_are_refused_by_name_and_keep_the_old_version() {
        let mut r = Resources::default();
        put(
            &mut r,
            "a",
            wl::address::Type::Workload(workload("echo", [10, 244, 1, 2], None, &[])),
        );
        let mut bad = workload("echo", [10, 244, 1, 2], None, &[]);
        bad.addresses = vec![vec![1, 2, 3]];
        let body = wl::Address {
            r#type: Some(wl::address::Type::Workload(bad)),
        }
        .encode_to_vec();
        let e = r
            .upsert(ADDRESS_TYPE, "a", "v2", &body)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a: workload demo/echo address of 3 bytes"),
            "{e}"
        );
        let e = r
            .upsert(ADDRESS_TYPE, "junk", "v1", &[0xff, 0xff])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("junk: not a valid type.googleapis.com/istio.workload.Address"),
            "{e}"
        );
        assert_eq!(r.versions[ADDRESS_TYPE]["a"], "v1");
        assert!(r
            .build()
            .workload_by_ip("10.244.1.2".parse().unwrap())
            .is_some());
    }

    /// Policies we cannot read fully are kept, fail closed, and reported.
    #[test]
    fn unreadable_policies_fail_closed() {
        let echo = workload("echo", [10, 244, 1, 2], None, &[]);
        let principal = |p: &str| sec::StringMatch {
            match_type: Some(sec::string_match::MatchType::Exact(p.into())),
        };
        let deny_client = |name: &str| sec::Authorization {
            name: name.into(),
            namespace: "demo".into(),
            scope: sec::Scope::Namespace as i32,
            action: sec::Action::Deny as i32,
            groups: vec![sec::Group {
                rules: vec![sec::Rules {
                    matches: vec![sec::Match {
                        principals: vec![principal("cluster.local/ns/demo/sa/client")],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        let decide = |body: &[u8], name: &str, src: &str| {
            let mut r = Resources::default();
            put(&mut r, "echo", wl::address::Type::Workload(echo.clone()));
            r.upsert(AUTHORIZATION_TYPE, name, "v1", body).unwrap();
            let st = r.build();
            let w = st
                .workload_by_ip("10.244.1.2".parse().unwrap())
                .unwrap()
                .clone();
            let src = identity::Identity::new("cluster.local", "demo", src);
            let c = Connection {
                src_identity: Some(&src),
                src_ip: "10.244.2.9".parse().unwrap(),
                dst_ip: w.ip,
                dst_port: 8080,
                request: None,
            };
            let d = authz::evaluate(st.policies.iter().map(|p| p.as_ref()), &w, &c);
            (d == Decision::Allow, st.rejected.to_vec())
        };
        // Sound: only the named client is denied, nothing reported.
        let ok = deny_client("demo/p").encode_to_vec();
        assert_eq!(decide(&ok, "demo/p", "client"), (false, vec![]));
        assert!(decide(&ok, "demo/p", "other").0);

        // Unknown scope: widens to the namespace; unknown action: a DENY.
        let mut p = deny_client("p");
        p.scope = 7;
        p.action = 9;
        let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "client");
        assert!(!allowed);
        let fields: Vec<_> = rejected.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["scope", "action"]);
        assert!(
            decide(&p.encode_to_vec(), "demo/p", "other").0,
            "the rest of the rule still decides"
        );

        // A match with no type: the DENY rule ignores it and denies more.
        let mut p = deny_client("p");
        p.groups[0].rules[0].matches[0].principals = vec![sec::StringMatch { match_type: None }];
        let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "other");
        assert!(!allowed, "{rejected:?}");
        assert_eq!(
            rejected[0].field,
            "groups[0].rules[0].matches[0].principals"
        );
        // ...and the same field in an ALLOW matches nothing.
        p.action = sec::Action::Allow as i32;
        assert!(!decide(&p.encode_to_vec(), "demo/p", "client").0);

        // Fields this build does not know (field 99, varint 1): DENY all.
        let mut body = deny_client("p").encode_to_vec();
        body.extend([0x98, 0x06, 0x01]);
        let (allowed, rejected) = decide(&body, "demo/p", "other");
        assert!(!allowed);
        assert_eq!(
            (rejected[0].kind.as_str(), rejected[0].name.as_str()),
            ("Authorization", "p")
        );
        assert!(rejected[0].reason.contains("does not know"), "{rejected:?}");

        // Undecodable: denies everything in the namespace the name gives.
        let (allowed, rejected) = decide(&[0xff, 0xff], "demo/broken", "other");
        assert!(!allowed);
        assert_eq!(
            (rejected[0].namespace.as_str(), rejected[0].name.as_str()),
            ("demo", "broken")
        );
        let mut r = Resources::default();
        assert!(r
            .upsert(AUTHORIZATION_TYPE, "nonamespace", "v1", &[0xff, 0xff])
            .is_err());
    }

    #[test]
    fn waypoint_by_hostname_and_by_vip() {
        let mut r = Resources::default();
        let mut w = workload("echo", [10, 244, 1, 2], None, &[]);
        w.waypoint = Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 99],
                },
            )),
            hbone_mtls_port: 15008,
        });
        put(&mut r, "a", wl::address::Type::Workload(w));
        put(
            &mut r,
            "wp",
            wl::address::Type::Service(wl::Service {
                name: "waypoint".into(),
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
                addresses: vec![wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 99],
                }],
                ports: vec![],
                waypoint: None,
            }),
        );
        let st = r.build();
        let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
        let wref = st.workload_waypoint(echo).expect("waypoint");
        assert_eq!(wref.name, "waypoint.demo.svc.cluster.local");
    }
}
