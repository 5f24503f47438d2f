//! The incremental translator the Kubernetes-shaped sources feed (the
//! standalone file and the Kubernetes API): objects arrive and leave one at
//! a time, each translated alone (`standalone::translate`), and `publish`
//! derives only what those changes touch. What derives from what:
//!
//! - a workload from its pod and its namespace's labels (enrolment, waypoint);
//! - a service from its declaration, its namespace's labels and the pods of
//!   its namespace its selector matches (endpoints);
//! - the lists (policies, routes, waypoints, ...) from their objects, rebuilt
//!   only when one of them changed.
//!
//! So a pod change re-derives that pod and the services of its namespace
//! that select it (before or after); a namespace change its pods and
//! services. The published indexes are persistent maps shared with every
//! state published before, so publishing costs O(what changed).
//!
//! Two objects claiming one address: the smaller key keeps it, the other is
//! left out and reported — decided by key, not arrival order, so the result
//! does not depend on the order objects arrive in. (The file refuses such a
//! set whole before it gets here.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use smallvec::SmallVec;

mod claims;
mod entries;
mod lists;
use claims::Owner;
use lists::{list_of, List};

use crate::authz::{AuthorizationPolicy, TargetedPolicy};
use crate::labels::LabelMap;
use crate::locality::Locality;
use crate::model::{
    Endpoint, Indexes, Keyed, Labels, MeshState, PeerAuthentication, PolicyIndex, Service,
    ServicePort, TunnelProtocol, Workload,
};
use crate::routes::{DestinationRule, HttpRoute, Waypoint, WaypointRef};
use crate::{Rejected, ServiceEntry, DATAPLANE_MODE_LABEL};

/// An object's identity in its source: kind, namespace (empty for a
/// Namespace) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == "Namespace" || self.kind == "Node" {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A pod as declared, before its namespace says whether it is in the mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct PodDecl {
    pub uid: Option<String>,
    /// `metadata.ownerReferences` with `controller: true`.
    pub owner: Option<crate::owner::Owner>,
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub node: String,
    /// None while scheduled but not yet networked.
    pub ip: Option<IpAddr>,
    /// `status.podIPs` after the first (the other family, dual-stack).
    pub extra_ips: Vec<IpAddr>,
    pub named_ports: BTreeMap<String, u16>,
    /// Its Ready condition (a pod without conditions is taken as ready: the
    /// file need not spell them out).
    pub ready: bool,
}

/// A Service as declared, before its endpoints are known.
#[derive(Clone, Debug)]
pub struct ServiceDecl {
    pub labels: BTreeMap<String, String>,
    /// None or empty: no endpoints are derived (they are managed elsewhere).
    pub selector: Option<crate::labels::LabelMap>,
    pub vips: Vec<IpAddr>,
    pub ip_families: crate::model::IpFamilies,
    pub ports: Vec<ServicePort>,
    /// What decides its balancing; its namespace's annotation joins when
    /// it is derived.
    pub balancing: crate::locality::KubeService,
}

impl ServiceDecl {
    fn selects(&self, labels: &crate::labels::LabelMap) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// What one object translates to on its own.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Labels, and Istio's traffic-distribution annotation, which its
    /// services inherit.
    Namespace(BTreeMap<String, String>, Option<String>),
    /// A node's locality (its topology labels).
    Node(Option<Arc<Locality>>),
    Pod(PodDecl),
    Service(ServiceDecl),
    Policy(Arc<AuthorizationPolicy>),
    WaypointPolicy(TargetedPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(crate::request_authn::RequestAuthentication),
    Gateway(Option<Waypoint>),
    Route(HttpRoute),
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
    /// For DestinationRule `credentialName` (the standalone file only).
    Secret(crate::secret::TlsSecret),
    /// meshConfig (the `istio` ConfigMap of `istio-system`): its extension
    /// providers.
    MeshConfig(crate::ext_authz::Providers),
}

impl Kind {
    /// The addresses the object claims, with the field that claims each.
    pub fn addresses(&self) -> Vec<(&'static str, IpAddr)> {
        match self {
            Kind::Pod(p) => {
                p.ip.map(|ip| ("status.podIP", ip))
                    .into_iter()
                    .chain(p.extra_ips.iter().map(|ip| ("status.podIPs", *ip)))
                    .collect()
            }
            Kind::Service(s) => s.vips.iter().map(|v| ("spec.clusterIP", *v)).collect(),
            Kind::ServiceEntry(s) => s.addresses.iter().map(|a| ("spec.addresses", *a)).collect(),
            _ => Vec::new(),
        }
    }
}

/// One translated object, and what of it could not be evaluated.
#[derive(Clone, Debug)]
pub struct Translated {
    pub key: ObjectKey,
    pub object: Kind,
    pub rejected: Vec<Rejected>,
}

type Name = (String, String);

/// Every object a source holds, translated, and the state derived from
/// them, kept up to date per change.
#[derive(Default)]
pub struct Objects {
    trust_domain: String,
    /// The strings workloads share (namespace, service account, node...).
    strings: crate::intern::Interner,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Namespaces annotated with a traffic distribution.
    ns_distribution: HashMap<String, String>,
    /// The nodes that say where they are.
    nodes: HashMap<String, Arc<Locality>>,
    /// Each pod as last derived: a pod is stored once, as the workload it
    /// publishes, and re-derived from it when its namespace changes.
    pods: BTreeMap<Name, Arc<Workload>>,
    services: BTreeMap<Name, ServiceDecl>,
    /// Everything published as a list, in key order.
    lists: BTreeMap<ObjectKey, Kind>,
    /// Per object: what could not be evaluated, or why it was left out.
    rejected: BTreeMap<ObjectKey, Vec<Rejected>>,
    /// Who claims each address, sorted; the first (smallest key) holds it.
    /// Almost every address has one claimant: a short vector, not a set.
    ip_owners: HashMap<IpAddr, SmallVec<[Owner; 1]>>,

    ix: Indexes,
    svc_out: HashMap<Name, Arc<Service>>,
    unaddressed: BTreeMap<Name, Arc<Workload>>,
    dirty_pods: BTreeSet<Name>,
    dirty_services: BTreeSet<Name>,
    /// The list kinds (`list_of`) changed since the last publish.
    lists_dirty: BTreeSet<List>,
    /// Namespaces whose ztunnel-enforced policies changed: only their part
    /// of the policy index is rebuilt (None: all of it, at the first build).
    policy_namespaces_dirty: Option<BTreeSet<String>>,
    namespaces_dirty: bool,
    rejected_dirty: bool,
    published: Lists,
    /// What the ServiceEntries put in `ix`.
    entries_out: entries::Published,
    /// CUSTOM policies naming a provider meshConfig cannot give (derived
    /// from both).
    unresolved_custom: Vec<Rejected>,
}

/// What `publish` rebuilds only when its inputs changed.
#[derive(Default, Clone)]
struct Lists {
    policies: Arc<Vec<Arc<AuthorizationPolicy>>>,
    policy_index: Arc<PolicyIndex>,
    waypoint_policies: Arc<Keyed<TargetedPolicy>>,
    peer_authentications: Arc<Keyed<PeerAuthentication>>,
    request_authentications: Arc<Keyed<crate::request_authn::RequestAuthentication>>,
    waypoints: Arc<Vec<Waypoint>>,
    http_routes: Arc<Keyed<HttpRoute>>,
    destination_rules: Arc<Keyed<DestinationRule>>,
    secrets: Arc<BTreeMap<(String, String), crate::secret::TlsSecret>>,
    extension_providers: Arc<crate::ext_authz::Providers>,
    service_entries: Arc<Vec<ServiceEntry>>,
    namespace_labels: Arc<BTreeMap<String, BTreeMap<String, String>>>,
    rejected: Arc<Vec<Rejected>>,
}

/// A pod's address, None while it has none.
fn address(w: &Workload) -> Option<IpAddr> {
    (!w.ip.is_unspecified()).then_some(w.ip)
}

fn in_namespace<'a, V>(
    map: &'a BTreeMap<Name, V>,
    ns: &'a str,
) -> impl Iterator<Item = (&'a Name, &'a V)> + 'a {
    map.range((
        Bound::Included((ns.to_string(), String::new())),
        Bound::Unbounded,
    ))
    .take_while(move |((n, _), _)| n == ns)
}

fn pod_key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: "Pod".into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

fn service_key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: "Service".into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

impl Objects {
    pub fn new(trust_domain: &str) -> Self {
        Objects {
            trust_domain: trust_domain.to_string(),
            lists_dirty: List::ALL.into_iter().collect(),
            namespaces_dirty: true,
            rejected_dirty: true,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.nodes.len()
            + self.pods.len()
            + self.services.len()
            + self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or replaces one object. Nothing is derived until `publish`.
    pub fn upsert(&mut self, t: Translated) {
        let Translated {
            key,
            object,
            rejected,
        } = t;
        self.remove_claims(&key);
        self.set_rejected(&key, rejected);
        match object {
            Kind::Namespace(labels, distribution) => {
                let moved = self.ns_distribution.get(&key.name) != distribution.as_ref();
                match distribution {
                    Some(d) => self.ns_distribution.insert(key.name.clone(), d),
                    None => self.ns_distribution.remove(&key.name),
                };
                if self.namespaces.get(&key.name) != Some(&labels) || moved {
                    self.namespaces.insert(key.name.clone(), labels);
                    self.namespace_changed(&key.name);
                }
            }
            Kind::Node(locality) => self.set_node(&key.name, locality),
            Kind::Pod(p) => {
                let name = (key.namespace.clone(), key.name.clone());
                // Deriving it marks the services it leaves and joins.
                self.claim(&key, p.ip);
                let w = Arc::new(self.workload(&name, p));
                self.pods.insert(name.clone(), w);
                self.dirty_pods.insert(name);
            }
            Kind::Service(s) => {
                for vip in &s.vips {
                    self.claim(&key, Some(*vip));
                }
                self.services
                    .insert((key.namespace.clone(), key.name.clone()), s);
                self.dirty_services
                    .insert((key.namespace.clone(), key.name.clone()));
            }
            other => {
                self.list_changed(&key, &other);
                if let Some(old) = self.lists.insert(key.clone(), other) {
                    self.list_changed(&key, &old);
                }
            }
        }
    }

    /// Takes one object out, with everything derived from it.
    pub fn remove(&mut self, key: &ObjectKey) {
        self.remove_claims(key);
        self.set_rejected(key, Vec::new());
        let name = (key.namespace.clone(), key.name.clone());
        match key.kind.as_str() {
            "Namespace" => {
                self.ns_distribution.remove(&key.name);
                if self.namespaces.remove(&key.name).is_some() {
                    self.namespace_changed(&key.name);
                }
            }
            "Node" => self.set_node(&key.name, None),
            "Pod" => {
                if self.pods.remove(&name).is_some() {
                    self.dirty_pods.insert(name);
                }
            }
            "Service" => {
                if self.services.remove(&name).is_some() {
                    self.dirty_services.insert(name);
                }
            }
            _ => {
                if let Some(old) = self.lists.remove(key) {
                    self.list_changed(key, &old);
                }
            }
        }
    }

    /// The keys of every object held, for a source that must replace its
    /// whole view (a relist) and remove what is no longer there.
    pub fn keys(&self) -> Vec<ObjectKey> {
        let ns = self.namespaces.keys().map(|n| ObjectKey {
            kind: "Namespace".into(),
            namespace: String::new(),
            name: n.clone(),
        });
        let nodes = self.nodes.keys().map(|n| ObjectKey {
            kind: "Node".into(),
            namespace: String::new(),
            name: n.clone(),
        });
        let pods = self.pods.keys().map(|(ns, n)| pod_key(ns, n));
        let svcs = self.services.keys().map(|(ns, n)| service_key(ns, n));
        ns.chain(nodes)
            .chain(pods)
            .chain(svcs)
            .chain(self.lists.keys().cloned())
            .collect()
    }

    fn list_changed(&mut self, key: &ObjectKey, k: &Kind) {
        let list = list_of(k);
        if list == List::Policies {
            if let Some(d) = &mut self.policy_namespaces_dirty {
                d.insert(key.namespace.clone());
            }
        }
        self.lists_dirty.insert(list);
    }

    fn set_rejected(&mut self, key: &ObjectKey, r: Vec<Rejected>) {
        let changed = if r.is_empty() {
            self.rejected.remove(key).is_some()
        } else {
            self.rejected.insert(key.clone(), r.clone()) != Some(r)
        };
        self.rejected_dirty |= changed;
    }

    fn namespace_changed(&mut self, ns: &str) {
        self.namespaces_dirty = true;
        let pods: Vec<_> = in_namespace(&self.pods, ns)
            .map(|(k, _)| k.clone())
            .collect();
        let svcs: Vec<_> = in_namespace(&self.services, ns)
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty_pods.extend(pods);
        self.dirty_services.extend(svcs);
        // Its label may bind its entries to a waypoint.
        if self
            .published
            .service_entries
            .iter()
            .any(|se| se.namespace == ns)
        {
            self.lists_dirty.insert(List::ServiceEntries);
        }
    }

    /// A node's locality changed (a node's status is updated every few
    /// seconds in a cluster: only a change of its labels costs anything):
    /// its pods are derived again.
    fn set_node(&mut self, node: &str, locality: Option<Arc<Locality>>) {
        let changed = match locality {
            Some(l) if self.nodes.get(node) != Some(&l) => {
                self.nodes.insert(node.to_string(), l);
                true
            }
            Some(_) => false,
            None => self.nodes.remove(node).is_some(),
        };
        if !changed {
            return;
        }
        let on_node: Vec<_> = self
            .pods
            .iter()
            .filter(|(_, w)| &*w.node == node)
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty_pods.extend(on_node);
    }

    /// Marks the services of `ns` whose selector matches `labels`.
    fn mark_selecting(&mut self, ns: &str, labels: &crate::labels::LabelMap) {
        let hit: Vec<_> = in_namespace(&self.services, ns)
            .filter(|(_, s)| s.selects(labels))
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty_services.extend(hit);
    }

    /// Whether anything changed since the last `publish`: a source need not
    /// publish a state equal to the last (a Node's status update, whose
    /// labels stayed, changes nothing).
    pub fn changed(&self) -> bool {
        !(self.dirty_pods.is_empty()
            && self.dirty_services.is_empty()
            && self.lists_dirty.is_empty()
            && !self.namespaces_dirty
            && !self.rejected_dirty)
    }

    /// Derives what changed since the last call and returns the new state;
    /// everything else is shared with the previous one.
    pub fn publish(&mut self) -> MeshState {
        for name in std::mem::take(&mut self.dirty_pods) {
            self.derive_pod(name);
        }
        for name in std::mem::take(&mut self.dirty_services) {
            self.derive_service(name);
        }
        let mut custom_dirty = false;
        for list in std::mem::take(&mut self.lists_dirty) {
            custom_dirty |= matches!(list, List::WaypointPolicies | List::MeshConfig);
            self.rebuild(list);
        }
        if custom_dirty {
            let p = &self.published;
            let r = crate::ext_authz::unresolved(&p.waypoint_policies, &p.extension_providers);
            if r != self.unresolved_custom {
                self.unresolved_custom = r;
                self.rejected_dirty = true;
            }
        }
        if self.namespaces_dirty {
            self.published.namespace_labels = Arc::new(self.namespaces.clone());
            self.namespaces_dirty = false;
        }
        if self.rejected_dirty {
            let all = self
                .rejected
                .values()
                .flatten()
                .chain(&self.unresolved_custom);
            self.published.rejected = Arc::new(all.cloned().collect());
            self.rejected_dirty = false;
        }
        let l = self.published.clone();
        let mut state = MeshState::from_indexes(self.ix.clone(), l.policies, l.policy_index);
        state.peer_authentications = l.peer_authentications;
        state.namespace_labels = l.namespace_labels;
        state.service_entries = l.service_entries;
        state.waypoints = l.waypoints;
        state.http_routes = l.http_routes;
        state.destination_rules = l.destination_rules;
        state.secrets = l.secrets;
        state.waypoint_policies = l.waypoint_policies;
        state.request_authentications = l.request_authentications;
        state.extension_providers = l.extension_providers;
        state.unaddressed = self.unaddressed.values().cloned().collect();
        state.rejected = l.rejected;
        state
    }

    fn derive_pod(&mut self, name: Name) {
        // The services that listed it list it no more, or differently.
        if let Some(old) = self.ix.workload_named(&name.0, &name.1).cloned() {
            self.ix.remove_workload(&old);
            self.mark_selecting(&name.0, &old.labels);
        }
        self.unaddressed.remove(&name);
        let key = pod_key(&name.0, &name.1);
        let Some(w) = self.pods.get(&name).cloned() else {
            return;
        };
        if address(&w).is_some() {
            for ip in w.addresses() {
                if let Err(holder) = self.holder(&key, ip) {
                    self.left_out(
                        &key,
                        "status.podIP",
                        format!("{ip} is already used by {holder}"),
                    );
                    return;
                }
            }
        }
        self.clear_left_out(&key);
        // What its namespace decides may have changed since it was stored.
        let (protocol, waypoint) = self.enrolment(&name.0, &w.labels);
        let locality = self.nodes.get(&*w.node).cloned();
        let w = if w.protocol == protocol && w.waypoint == waypoint && w.locality == locality {
            w
        } else {
            let w = Arc::new(Workload {
                protocol,
                waypoint,
                locality,
                ..(*w).clone()
            });
            self.pods.insert(name.clone(), w.clone());
            w
        };
        if address(&w).is_some() {
            self.ix.insert_workload(w.clone());
        } else {
            self.unaddressed.insert(name.clone(), w.clone());
        }
        // Its services read it (an address or uid change, or it now holds
        // an address it did not before).
        self.mark_selecting(&name.0, &w.labels);
    }

    /// What the pod's own labels and its namespace's say: in the mesh or
    /// not, and through which waypoint.
    fn enrolment(
        &self,
        namespace: &str,
        labels: &LabelMap,
    ) -> (TunnelProtocol, Option<WaypointRef>) {
        let ns_labels = self.namespaces.get(namespace);
        let in_mesh = match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some("ambient") => true,
            Some("none") => false,
            _ => ns_labels
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|m| m == "ambient"),
        };
        let protocol = if in_mesh {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        };
        (
            protocol,
            crate::standalone::waypoint_ref(labels, ns_labels, namespace),
        )
    }

    fn workload(&mut self, (namespace, name): &Name, p: PodDecl) -> Workload {
        let (protocol, waypoint) = self.enrolment(namespace, &p.labels);
        let label = |keys: &[&str]| keys.iter().find_map(|k| p.labels.get(k));
        let canonical_name = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or(name);
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .map_or("latest", String::as_str);
        let (workload_name, workload_kind) =
            crate::owner::workload_name(name, &*p.labels, p.owner.as_ref());
        let s = &mut self.strings;
        Workload {
            uid: p.uid.unwrap_or_else(|| format!("{namespace}/{name}")),
            workload_name: s.get(&workload_name),
            workload_kind,
            cluster_id: None,
            canonical_name: s.get(canonical_name),
            canonical_revision: s.get(canonical_revision),
            authorization_policies: Vec::new(),
            name: name.clone(),
            namespace: s.get(namespace),
            service_account: s.get(&p.service_account),
            trust_domain: s.get(&self.trust_domain),
            node: s.get(&p.node),
            // Unaddressed pods carry the unspecified address (`address`).
            ip: p.ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            extra_ips: p.extra_ips,
            hostname: None,
            labels: p.labels,
            annotations: p.annotations,
            waypoint,
            named_ports: p.named_ports,
            protocol,
            locality: self.nodes.get(&p.node).cloned(),
            healthy: p.ready,
        }
    }

    fn derive_service(&mut self, name: Name) {
        if let Some(old) = self.svc_out.remove(&name) {
            self.ix.remove_service(&old);
        }
        let key = service_key(&name.0, &name.1);
        let Some(vips) = self.services.get(&name).map(|s| s.vips.clone()) else {
            return;
        };
        for vip in vips {
            if let Err(holder) = self.holder(&key, vip) {
                let why = format!("{vip} is already used by {holder}");
                self.left_out(&key, "spec.clusterIP", why);
                return;
            }
        }
        self.clear_left_out(&key);
        let s = &self.services[&name];
        let (namespace, svc_name) = &name;
        let load_balancing = s
            .balancing
            .load_balancing(self.ns_distribution.get(namespace).map(String::as_str));
        let all = crate::locality::LoadBalancing::allows_unhealthy(load_balancing.as_ref());
        let endpoints = if s.selector.is_some() {
            in_namespace(&self.pods, namespace)
                .filter(|(_, p)| s.selects(&p.labels) && (p.healthy || all))
                .filter_map(|((ns, name), _)| self.ix.workload_named(ns, name))
                .map(|w| Endpoint {
                    workload_uid: w.uid.clone(),
                    ip: w.ip,
                })
                .collect()
        } else {
            Vec::new()
        };
        let svc = Arc::new(Service {
            waypoint: crate::standalone::waypoint_ref(
                &s.labels,
                self.namespaces.get(namespace),
                namespace,
            ),
            hostname: format!("{svc_name}.{namespace}.svc.{}", crate::CLUSTER_DOMAIN),
            name: svc_name.clone(),
            namespace: namespace.clone(),
            vips: s.vips.clone(),
            ip_families: s.ip_families,
            ports: s.ports.clone(),
            endpoints,
            load_balancing,
        });
        self.ix.insert_service(svc.clone());
        self.svc_out.insert(name, svc);
    }

    const LEFT_OUT: &'static str = "left out of the mesh config";

    fn left_out(&mut self, key: &ObjectKey, field: &str, reason: String) {
        let r = Rejected {
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            field: field.into(),
            reason,
            effect: Self::LEFT_OUT.into(),
        };
        self.set_rejected(key, vec![r]);
    }

    fn clear_left_out(&mut self, key: &ObjectKey) {
        let ours = self
            .rejected
            .get(key)
            .is_some_and(|r| r.iter().all(|r| r.effect == Self::LEFT_OUT));
        if ours {
            self.set_rejected(key, Vec::new());
        }
    }
}
