use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use identity::Identity;
use serde::Serialize;

use crate::authz::AuthorizationPolicy;
use crate::intern::Str;
pub use crate::keyed::Keyed;
pub use crate::policy_index::PolicyIndex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TunnelProtocol {
    /// In the mesh: reached over HBONE on port 15008.
    Hbone,
    /// Outside the mesh: plain TCP.
    None,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    /// What owns the pod across rollouts (a Deployment, CronJob...), the
    /// name telemetry reports: `owner::workload_name`, or WDS's.
    pub workload_name: Str,
    pub workload_kind: crate::owner::WorkloadKind,
    /// Set only when the source says (WDS); None is this proxy's cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<Str>,
    // Shared with every workload that has the same value (`intern`).
    pub namespace: Str,
    pub service_account: Str,
    pub trust_domain: Str,
    pub node: Str,
    /// Unspecified for a hostname workload. On a dual-stack pod the first
    /// of its addresses (`status.podIP`, WDS's first address).
    pub ip: IpAddr,
    /// The pod's further addresses (the other family on a dual-stack pod):
    /// found by each, and the one of a destination's family is dialled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_ips: Vec<IpAddr>,
    /// A name the proxy resolves itself instead of an address (an endpoint
    /// of a DNS ServiceEntry): reached through its service only, never
    /// indexed by address or name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Str>,
    /// Shared with the source's copy of the pod (a B-tree map costs half a
    /// kilobyte even for one label).
    pub labels: Labels,
    /// Pod annotations (capture options such as `ambient.istio.io/dns-capture`).
    #[serde(skip_serializing_if = "no_labels")]
    pub annotations: Labels,
    /// The waypoint its namespace or pod label asks for.
    pub waypoint: Option<crate::routes::WaypointRef>,
    /// Named container ports, for services whose targetPort is a name.
    pub named_ports: BTreeMap<String, u16>,
    pub protocol: TunnelProtocol,
    pub canonical_name: Str,
    pub canonical_revision: Str,
    /// `<ns>/<name>` of the selector-scoped policies istiod says apply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// Where it runs (its node's topology labels, or WDS's); shared by the
    /// workloads of a node. None: not known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<Arc<crate::locality::Locality>>,
    /// Ready to serve (the pod's Ready condition, WDS's status): a service
    /// lists only healthy endpoints unless it allows all.
    pub healthy: bool,
}

pub type Labels = Arc<crate::labels::LabelMap>;

/// Workloads by (namespace, name), keyed by a hash of the pair so the index
/// keeps no copy of the names; a bucket holds the rare pairs that hash
/// alike. The hasher's keys are cloned with the map, so every snapshot
/// hashes alike.
#[derive(Clone, Default, Debug)]
struct NameIndex {
    map: imbl::HashMap<u64, smallvec::SmallVec<[Arc<Workload>; 1]>>,
    hasher: std::hash::RandomState,
}

impl NameIndex {
    fn hash(&self, namespace: &str, name: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((namespace, name))
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.map
            .get(&self.hash(namespace, name))?
            .iter()
            .find(|w| &*w.namespace == namespace && w.name == name)
    }

    /// `w` now holds its name (replacing whoever held it).
    fn insert(&mut self, w: Arc<Workload>) {
        let h = self.hash(&w.namespace, &w.name);
        let bucket = self.map.entry(h).or_default();
        bucket.retain(|x| !(x.namespace == w.namespace && x.name == w.name));
        bucket.push(w);
    }

    /// Takes `w` out, unless another entry has since taken its name.
    fn remove(&mut self, w: &Arc<Workload>) {
        let h = self.hash(&w.namespace, &w.name);
        if let Some(bucket) = self.map.get_mut(&h) {
            bucket.retain(|x| !Arc::ptr_eq(x, w));
            if bucket.is_empty() {
                self.map.remove(&h);
            }
        }
    }
}

fn is_any_family(f: &IpFamilies) -> bool {
    *f == IpFamilies::Any
}

fn no_labels(l: &Labels) -> bool {
    l.is_empty()
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Every address of the workload, the primary first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.extra_ips.iter().copied())
    }

    pub fn has_address(&self, ip: IpAddr) -> bool {
        self.addresses().any(|a| a == ip)
    }

    /// The address to reach it at from a connection addressed in `like`'s
    /// family (a v6 VIP goes to the endpoint's v6 address); the primary when
    /// it has none of that family.
    pub fn address_like(&self, like: IpAddr) -> IpAddr {
        self.addresses()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .unwrap_or(self.ip)
    }
}

#[derive(Clone, Debug, Serialize)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub workload_uid: String,
    pub ip: IpAddr,
}

/// The address families a Service serves (`spec.ipFamilies`, WDS
/// `ip_families`). Its VIPs say it for a Service that has them; a headless
/// one answers DNS with its endpoints' addresses of these families only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum IpFamilies {
    /// Both, or not said.
    #[default]
    Any,
    V4Only,
    V6Only,
}

impl IpFamilies {
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            IpFamilies::Any => true,
            IpFamilies::V4Only => ip.is_ipv4(),
            IpFamilies::V6Only => ip.is_ipv6(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Service {
    /// The waypoint its own or its namespace's label asks for.
    pub waypoint: Option<crate::routes::WaypointRef>,
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "is_any_family")]
    pub ip_families: IpFamilies,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// How a client picks among the endpoints (None: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<crate::locality::LoadBalancing>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// Workloads by uid, and the address indexes: persistent maps (structural
/// sharing), so a source that keeps them can publish a new state in O(1) and
/// change one entry in O(log n), instead of copying the whole mesh. Entries
/// are `Arc`s: a workload is stored once, whatever indexes it.
pub type Workloads = imbl::OrdMap<String, Arc<Workload>>;
pub type ByIp = imbl::HashMap<IpAddr, Arc<Workload>>;
pub type ByVip = imbl::HashMap<IpAddr, Arc<Service>>;
/// Services by `<namespace>/<hostname>` (a hostname may be declared in two
/// namespaces by ServiceEntries).
pub type Services = imbl::OrdMap<String, Arc<Service>>;

/// The lookups the data path makes per connection or request, kept by the
/// source as persistent maps and handed to each published state as is:
/// workloads by uid, address and name; services by key, VIP and hostname.
#[derive(Clone, Default, Debug)]
pub struct Indexes {
    workloads: Workloads,
    by_ip: ByIp,
    by_name: NameIndex,
    services: Services,
    by_vip: ByVip,
    /// A hostname declared in several namespaces (ServiceEntries) resolves
    /// to the one with the smallest key, whatever order they came in;
    /// `host_count` says when another is left to take over on removal.
    by_host: imbl::HashMap<String, Arc<Service>>,
    host_count: imbl::HashMap<String, u32>,
}

impl Indexes {
    pub fn workloads(&self) -> &Workloads {
        &self.workloads
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The addressed workload `namespace/name`.
    pub fn workload_named(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_name.get(namespace, name)
    }

    /// Adds `w` under its uid, address and name; a key another entry held
    /// now points at `w`.
    pub fn insert_workload(&mut self, w: Arc<Workload>) {
        // A hostname workload has no address of its own to be found by.
        if w.hostname.is_none() {
            for ip in w.addresses() {
                self.by_ip.insert(ip, w.clone());
            }
            self.by_name.insert(w.clone());
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    /// Adds `w` under its uid only: a ServiceEntry endpoint, reached through
    /// its service, whose address is not the mesh's to capture or name.
    pub fn insert_external_workload(&mut self, w: Arc<Workload>) {
        self.workloads.insert(w.uid.clone(), w);
    }

    /// Takes out the entries `w` made, unless another entry has since taken
    /// the same key (an update publishes the new entry before removing the
    /// old one).
    pub fn remove_workload(&mut self, w: &Arc<Workload>) {
        let mine = |x: Option<&Arc<Workload>>| x.is_some_and(|x| Arc::ptr_eq(x, w));
        if mine(self.workloads.get(&w.uid)) {
            self.workloads.remove(&w.uid);
        }
        for ip in w.addresses() {
            if mine(self.by_ip.get(&ip)) {
                self.by_ip.remove(&ip);
            }
        }
        self.by_name.remove(w);
    }

    pub fn insert_service(&mut self, s: Arc<Service>) {
        for vip in &s.vips {
            self.by_vip.insert(*vip, s.clone());
        }
        *self.host_count.entry(s.hostname.clone()).or_default() += 1;
        let key = service_key(&s);
        let keep = self
            .by_host
            .get(&s.hostname)
            .is_some_and(|h| service_key(h) < key);
        if !keep {
            self.by_host.insert(s.hostname.clone(), s.clone());
        }
        self.services.insert(key, s);
    }

    pub fn remove_service(&mut self, s: &Arc<Service>) {
        let mine = |x: Option<&Arc<Service>>| x.is_some_and(|x| Arc::ptr_eq(x, s));
        for vip in &s.vips {
            if mine(self.by_vip.get(vip)) {
                self.by_vip.remove(vip);
            }
        }
        let key = service_key(s);
        if mine(self.services.get(&key)) {
            self.services.remove(&key);
        }
        let left = match self.host_count.get_mut(&s.hostname) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            self.host_count.remove(&s.hostname);
        }
        if mine(self.by_host.get(&s.hostname)) {
            self.by_host.remove(&s.hostname);
            // Another namespace declares it too: the next smallest key
            // resolves it now (rare: scanning is fine).
            if left > 0 {
                let next = self
                    .services
                    .values()
                    .filter(|x| x.hostname == s.hostname && !Arc::ptr_eq(x, s))
                    .min_by_key(|x| service_key(x));
                if let Some(next) = next {
                    self.by_host.insert(s.hostname.clone(), next.clone());
                }
            }
        }
    }
}

fn service_key(s: &Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

fn service_values<S: serde::Serializer>(services: &Services, ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_seq(services.values())
}

/// One consistent view of the mesh, published by a config source and
/// swapped atomically, so the data path reads it without locks. What a
/// source rebuilds only when it changes is behind an `Arc`, so publishing a
/// state after a one-pod change copies none of it.
#[derive(Default, Debug, Serialize)]
pub struct MeshState {
    pub workloads: Workloads,
    #[serde(serialize_with = "service_values")]
    pub services: Services,
    pub policies: Arc<Vec<Arc<AuthorizationPolicy>>>,
    /// By namespace (each applies in its own namespace, or mesh-wide from
    /// the root namespace).
    pub peer_authentications: Arc<Keyed<PeerAuthentication>>,
    /// Labels of the namespaces the source declared (enrolment is decided
    /// from them and the pod's own label).
    pub namespace_labels: Arc<BTreeMap<String, BTreeMap<String, String>>>,
    pub service_entries: Arc<Vec<crate::ServiceEntry>>,
    pub waypoints: Arc<Vec<crate::routes::Waypoint>>,
    /// By the hosts they route.
    pub http_routes: Arc<Keyed<crate::routes::HttpRoute>>,
    /// By host.
    pub destination_rules: Arc<Keyed<crate::routes::DestinationRule>>,
    /// TLS Secrets by (namespace, name), for `credentialName`; never in a
    /// dump.
    #[serde(skip)]
    pub secrets: Arc<BTreeMap<(String, String), crate::secret::TlsSecret>>,
    /// AuthorizationPolicies with targetRefs: enforced by waypoints. By the
    /// policy's namespace (a target is in the policy's own namespace).
    pub waypoint_policies: Arc<Keyed<crate::authz::TargetedPolicy>>,
    /// RequestAuthentications (JWT), by namespace: a waypoint enforces
    /// those attached to it or to a service it serves.
    pub request_authentications: Arc<Keyed<crate::request_authn::RequestAuthentication>>,
    /// meshConfig's extension providers by name: the external authorizers
    /// CUSTOM policies name.
    pub extension_providers: Arc<crate::ext_authz::Providers>,
    /// Pods scheduled but not yet given an address (`status: {}`): the node
    /// agent decides their capture at CNI ADD, before the kubelet reports
    /// the IP. Their `ip` is unspecified; nothing routes to them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unaddressed: Vec<Arc<Workload>>,
    /// Objects the source held that could not be translated as written, and
    /// what applies instead (security objects fail closed).
    pub rejected: Arc<Vec<crate::Rejected>>,
    #[serde(skip)]
    by_ip: ByIp,
    #[serde(skip)]
    by_name: NameIndex,
    #[serde(skip)]
    by_vip: ByVip,
    #[serde(skip)]
    by_host: imbl::HashMap<String, Arc<Service>>,
    #[serde(skip)]
    policy_index: Arc<PolicyIndex>,
}

impl MeshState {
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<AuthorizationPolicy>,
        peer_authentications: Vec<PeerAuthentication>,
    ) -> Self {
        let mut ix = Indexes::default();
        for w in workloads {
            ix.insert_workload(Arc::new(w));
        }
        for s in services {
            ix.insert_service(Arc::new(s));
        }
        let policies: Vec<_> = policies.into_iter().map(Arc::new).collect();
        let index = Arc::new(PolicyIndex::new(&policies));
        MeshState {
            peer_authentications: Arc::new(Keyed::new(peer_authentications, |pa| {
                vec![pa.namespace.clone()]
            })),
            ..Self::from_indexes(ix, Arc::new(policies), index)
        }
    }

    /// A state from indexes the source maintains itself (cloning persistent
    /// maps is O(1)). `policy_index` must index exactly `policies`.
    pub fn from_indexes(
        ix: Indexes,
        policies: Arc<Vec<Arc<AuthorizationPolicy>>>,
        policy_index: Arc<PolicyIndex>,
    ) -> Self {
        MeshState {
            workloads: ix.workloads,
            by_ip: ix.by_ip,
            by_name: ix.by_name,
            services: ix.services,
            by_vip: ix.by_vip,
            by_host: ix.by_host,
            policy_index,
            policies,
            ..Default::default()
        }
    }

    /// The policies that select `w`, found through the index.
    pub fn policies_selecting<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        self.policy_index
            .candidates(w)
            .filter(move |p| p.selects(w))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.by_name.get(namespace, name)
    }

    /// Like `workload_by_name`, also finding pods not yet addressed.
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workload_by_name(namespace, name).or_else(|| {
            self.unaddressed
                .iter()
                .find(|w| &*w.namespace == namespace && w.name == name)
        })
    }

    /// The addresses `host` (lowercase, no trailing dot) has in the mesh: a
    /// Service hostname's VIPs or a ServiceEntry host's addresses. None when
    /// the mesh does not own the name.
    pub fn addresses_of_host(&self, host: &str) -> Option<Vec<IpAddr>> {
        if let Some(s) = self.service_by_host(host) {
            // Headless: the endpoints themselves, as Kubernetes DNS does.
            return Some(if s.vips.is_empty() {
                // Hostname endpoints have no address to answer with; a
                // dual-stack endpoint answers with both its addresses.
                let ips =
                    s.endpoints
                        .iter()
                        .flat_map(|e| match self.workloads.get(&e.workload_uid) {
                            Some(w) => w.addresses().collect(),
                            None => vec![e.ip],
                        });
                ips.filter(|ip| !ip.is_unspecified() && s.ip_families.admits(*ip))
                    .collect()
            } else {
                s.vips.clone()
            });
        }
        self.service_entries
            .iter()
            .find(|se| se.hosts.iter().any(|h| h == host) && !se.dns_addresses().is_empty())
            .map(|se| se.dns_addresses().to_vec())
    }

    /// The waypoint `r` names and the pods that serve it (its Service's
    /// endpoints). None when the Gateway does not exist.
    pub fn waypoint(
        &self,
        r: &crate::routes::WaypointRef,
    ) -> Option<(&crate::routes::Waypoint, Vec<Arc<Workload>>)> {
        let wp = self
            .waypoints
            .iter()
            .find(|w| w.name == r.name && w.namespace == r.namespace)?;
        let pods = self
            .service_by_host(&wp.hostname)
            .map(|s| {
                s.endpoints
                    .iter()
                    .filter_map(|e| self.workloads.get(&e.workload_uid).cloned())
                    .collect()
            })
            .unwrap_or_default();
        Some((wp, pods))
    }

    /// The waypoint that must see traffic for `w` addressed to the pod itself
    /// (its own or its namespace's label, waypoint for `workload` or `all`).
    pub fn workload_waypoint<'a>(&self, w: &'a Workload) -> Option<&'a crate::routes::WaypointRef> {
        use crate::routes::WaypointFor;
        let r = w.waypoint.as_ref()?;
        let (wp, _) = self.waypoint(r)?;
        (matches!(wp.for_traffic, WaypointFor::Workload | WaypointFor::All)
            && wp.admits(&w.namespace, self.namespace_labels.get(&*w.namespace)))
        .then_some(r)
    }

    /// The waypoint for traffic addressed to `svc` (waypoint for `service` or
    /// `all`, admitting the service's namespace).
    pub fn service_waypoint<'a>(&self, svc: &'a Service) -> Option<&'a crate::routes::WaypointRef> {
        use crate::routes::WaypointFor;
        let r = svc.waypoint.as_ref()?;
        match self.waypoint(r) {
            // A Gateway that does not admit the service's namespace is not
            // its waypoint, as istiod decides: the binding is ignored.
            Some((wp, _))
                if matches!(wp.for_traffic, WaypointFor::Service | WaypointFor::All)
                    && wp.admits(&svc.namespace, self.namespace_labels.get(&svc.namespace)) =>
            {
                Some(r)
            }
            Some(_) => None,
            // A label naming a waypoint that does not exist still routes to
            // it (and fails closed there) rather than silently skipping L7.
            None => Some(r),
        }
    }

    /// The Service (or ServiceEntry) declaring `host`.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The endpoints of `svc` that serve `port`, with the port each listens on.
    pub fn endpoints_for(&self, svc: &Service, port: u16) -> Vec<(Arc<Workload>, u16)> {
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
            return Vec::new();
        };
        svc.endpoints
            .iter()
            .filter_map(|e| self.workloads.get(&e.workload_uid))
            .filter_map(|w| {
                let target = match &sp.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Named(name) => *w.named_ports.get(name)?,
                };
                Some((w.clone(), target))
            })
            .collect()
    }

    /// The effective mTLS mode for inbound traffic to `w` on `port`:
    /// workload selector beats namespace beats mesh-wide; UNSET inherits;
    /// nothing set means PERMISSIVE, as in Istio.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        let selects = |pa: &&PeerAuthentication| {
            pa.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        };
        let pas = &self.peer_authentications;
        let mut chain: Vec<MtlsMode> = Vec::new();
        if let Some(pa) = pas.get(&w.namespace).find(selects) {
            chain.push(pa.port_level.get(&port).copied().unwrap_or(pa.mode));
        }
        let ns_wide = |ns: &str| {
            pas.get(ns)
                .find(|pa| pa.selector.is_none())
                .map(|pa| pa.mode)
        };
        chain.extend(ns_wide(&w.namespace));
        chain.extend(ns_wide(crate::ROOT_NAMESPACE));
        chain
            .into_iter()
            .find(|m| *m != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }
}
