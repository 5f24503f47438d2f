//! WDS resources (istio.workload.Address, istio.security.Authorization) into
//! the mesh model. Resources are kept by name, translated, with only the few
//! inputs re-translation reads (not the decoded protos); each push publishes
//! one consistent `MeshState` (the data path never sees half a push),
//! re-translating only what it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh::authz::AuthorizationPolicy;
use mesh::routes::{AllowedNamespaces, Waypoint, WaypointFor, WaypointRef};
use mesh::{Endpoint, MeshState, Rejected};
use prost::Message;

use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;
use crate::wds_policy::{translate_policy, undecodable_policy};

mod entry;
mod index;
mod ports;

pub(crate) use entry::ip_of;
use entry::{load_balancing, service_entry, service_key, workload_entry, workload_ip, Address};
use index::Index;
use ports::same_targets;

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
    /// Workloads and services by resource name: each its translation (the
    /// `Arc` published states share) and what re-translating it reads.
    addresses: BTreeMap<Arc<str>, Address>,
    /// Translated on arrival; one we cannot read fully is kept in its
    /// fail-closed form with what was wrong, never refused.
    policies: BTreeMap<String, PolicyEntry>,
    index: Index,
    /// The last version string received: resources of one push usually
    /// carry the same one, and share it.
    last_version: Option<Arc<str>>,
    /// The labels of every WDS workload (istiod sends none).
    no_labels: mesh::model::Labels,
    /// The strings workloads share (namespace, service account, node...).
    strings: mesh::intern::Interner,
    /// The localities workloads share (a few per cluster: never pruned).
    localities: std::collections::HashSet<Arc<mesh::locality::Locality>>,
}

#[derive(Debug)]
struct PolicyEntry {
    policy: Arc<AuthorizationPolicy>,
    rejected: Vec<Rejected>,
    version: Arc<str>,
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
                        let at = workload_ip(&w).map_err(|reason| invalid(name, reason))?;
                        let version = self.version(version);
                        let name = self.forget_address(name);
                        let e = workload_entry(
                            w,
                            at,
                            version,
                            &self.no_labels,
                            &mut self.strings,
                            &mut self.localities,
                            |k| self.index.key(k),
                        );
                        self.learn_workload(&name, &e);
                        self.addresses.insert(name, Address::Workload(e));
                    }
                    Some(wl::address::Type::Service(s)) => {
                        for a in &s.addresses {
                            ip_of(&a.address)
                                .map_err(|r| invalid(name, format!("service address: {r}")))?;
                        }
                        let lb = load_balancing(&s).map_err(|r| invalid(name, r))?;
                        let version = self.version(version);
                        let name = self.forget_address(name);
                        let key = self.index.key(&service_key(&s));
                        let e = service_entry(s, lb, key, version);
                        self.learn_service(&name, &e);
                        self.addresses.insert(name, Address::Service(Box::new(e)));
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
                let version = self.version(version);
                self.policy_changed(&policy.namespace);
                let old = self.policies.insert(
                    name.to_string(),
                    PolicyEntry {
                        policy: Arc::new(policy),
                        rejected,
                        version,
                    },
                );
                if let Some(old) = old {
                    self.policy_changed(&old.policy.namespace);
                }
            }
            other => return Err(ResourceError::UnknownType(other.to_string())),
        }
        Ok(())
    }

    pub fn remove(&mut self, type_url: &str, name: &str) {
        if type_url == ADDRESS_TYPE {
            self.forget_address(name);
        } else if let Some(old) = self.policies.remove(name) {
            self.policy_changed(&old.policy.namespace);
        }
    }

    /// The policy list is rebuilt at the next publish, and the index's
    /// part for namespace `ns`.
    fn policy_changed(&mut self, ns: &str) {
        self.index.policies = None;
        if !self.index.policy_namespaces.contains(ns) {
            self.index.policy_namespaces.insert(ns.to_string());
        }
    }

    /// name -> version of what we hold of `type_url`, for
    /// `initial_resource_versions` on reconnect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        match type_url {
            ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(n, a)| pair(n, a.version()))
                .collect(),
            AUTHORIZATION_TYPE => self
                .policies
                .iter()
                .map(|(n, p)| pair(n, &p.version))
                .collect(),
            _ => HashMap::new(),
        }
    }

    /// How many workloads, services and policies we hold.
    pub fn counts(&self) -> (usize, usize, usize) {
        let workloads = self
            .addresses
            .values()
            .filter(|a| matches!(a, Address::Workload(_)))
            .count();
        (
            workloads,
            self.addresses.len() - workloads,
            self.policies.len(),
        )
    }

    fn version(&mut self, v: &str) -> Arc<str> {
        match &self.last_version {
            Some(last) if **last == *v => last.clone(),
            _ => self.last_version.insert(Arc::from(v)).clone(),
        }
    }

    /// Takes out every index entry the address `name` made, and marks what
    /// read it. Returns the name in its shared form.
    fn forget_address(&mut self, name: &str) -> Arc<str> {
        self.index.dirty.remove(name);
        let Some((name, old)) = self.addresses.remove_entry(name) else {
            return Arc::from(name);
        };
        match old {
            Address::Workload(w) => {
                if w.published {
                    self.index.unpublish_workload(&w.w);
                }
                for (key, _) in w.services.iter() {
                    self.index.with_key(key, |k| {
                        k.members.remove(&name);
                    });
                    self.index.dirty_services_of(key);
                }
                if let Some(vip) = w.waypoint_vip {
                    self.index.remove_waypoint_user(&vip, &name);
                }
            }
            Address::Service(s) => {
                if s.published {
                    self.index.unpublish_service(&s.s);
                }
                // Its members' ports came from it; what named it by VIP
                // resolves differently now.
                self.index.dirty_members_of(&s.key);
                self.index.with_key(&s.key, |k| {
                    k.services.remove(&name);
                });
                self.dirty_services_sharing(&s.key);
                for vip in &s.s.vips {
                    if self.index.vip_hosts.get(vip) == Some(&name) {
                        self.index.vip_hosts.remove(vip);
                    }
                    self.index.dirty_waypoint_users(vip);
                }
                if let Some(vip) = s.waypoint_vip {
                    self.index.remove_waypoint_user(&vip, &name);
                }
            }
        }
        self.index.dirty.remove(&name);
        name
    }

    fn learn_workload(&mut self, name: &Arc<str>, w: &entry::WorkloadEntry) {
        let ix = &mut self.index;
        for (key, _) in w.services.iter() {
            if w.healthy {
                ix.with_key(key, |k| {
                    k.members.insert(name);
                });
            }
            ix.dirty_services_of(key);
        }
        if let Some(vip) = w.waypoint_vip {
            ix.add_waypoint_user(vip, name);
        }
        ix.dirty.insert(name.clone());
    }

    fn learn_service(&mut self, name: &Arc<str>, s: &entry::ServiceEntry) {
        let ix = &mut self.index;
        ix.with_key(&s.key, |k| {
            k.services.insert(name);
        });
        ix.dirty_members_of(&s.key);
        self.dirty_services_sharing(&s.key);
        let ix = &mut self.index;
        for vip in &s.s.vips {
            ix.vip_hosts.insert(*vip, name.clone());
            ix.dirty_waypoint_users(vip);
        }
        if let Some(vip) = s.waypoint_vip {
            ix.add_waypoint_user(vip, name);
        }
        ix.dirty.insert(name.clone());
    }

    /// Marks the services that share a member with service key `key`: a
    /// change of its fixed targets changes where those members serve them
    /// too when the hostnames match, and so whether their endpoints agree.
    fn dirty_services_sharing(&mut self, key: &str) {
        let Some(k) = self.index.keys.get(key) else {
            return;
        };
        for m in k.members.iter() {
            if let Some(Address::Workload(w)) = self.addresses.get(m) {
                for (other, _) in w.services.iter() {
                    if let Some(o) = self.index.keys.get(other) {
                        self.index.dirty.extend(o.services.iter().cloned());
                    }
                }
            }
        }
    }

    /// The mesh as istiod currently describes it: what changed since the
    /// last call is translated again; the rest is shared.
    pub fn build(&mut self) -> MeshState {
        // Services first: whether a workload must carry a named port for a
        // service port depends on the service's members agreeing on it.
        let mut workloads = BTreeSet::new();
        for name in std::mem::take(&mut self.index.dirty) {
            match self.addresses.get(&name) {
                Some(Address::Service(s)) => {
                    let key = s.key.clone();
                    if self.retranslate_service(&name) {
                        let members = self.index.keys.get(&key).into_iter();
                        workloads.extend(members.flat_map(|k| k.members.iter()).cloned());
                    }
                }
                Some(Address::Workload(_)) => {
                    workloads.insert(name);
                }
                None => {}
            }
        }
        for name in workloads {
            self.retranslate_workload(&name);
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
                let list: Vec<_> = self.policies.values().map(|p| p.policy.clone()).collect();
                let dirty = std::mem::take(&mut ix.policy_namespaces);
                let index = Arc::new(match &ix.policy_index {
                    Some(last) => last.updated(&list, Some(dirty)),
                    None => mesh::model::PolicyIndex::new(&list),
                });
                ix.policy_index = Some(index.clone());
                let rejected = self
                    .policies
                    .values()
                    .flat_map(|p| p.rejected.iter().cloned());
                (Arc::new(list), index, Arc::new(rejected.collect()))
            })
            .clone();
        let mut state = MeshState::from_indexes(ix.published.clone(), policies, policy_index);
        state.waypoints = waypoints;
        state.rejected = rejected;
        state
    }

    /// Completes the translation of `name` from what other resources now
    /// say, and publishes it in place of the previous one. An entry not yet
    /// published is completed in place; a published one is copied (states
    /// already handed out keep theirs).
    fn retranslate_workload(&mut self, name: &str) {
        let Some(Address::Workload(e)) = self.addresses.get(name) else {
            return;
        };
        let named_ports = self.named_ports(e);
        let waypoint = e.waypoint_vip.map(|vip| self.waypoint_at(vip));
        let Some(Address::Workload(e)) = self.addresses.get_mut(name) else {
            unreachable!()
        };
        let old = e.published.then(|| e.w.clone());
        let w = match &old {
            Some(old) => {
                e.w = Arc::new(mesh::Workload::clone(old));
                Arc::get_mut(&mut e.w).expect("just made")
            }
            None => Arc::make_mut(&mut e.w),
        };
        w.named_ports = named_ports;
        if let Some(waypoint) = waypoint {
            w.waypoint = waypoint;
        }
        e.published = true;
        // Keys the old entry shared with the new one now point at the new
        // one and stay.
        self.index.publish_workload(&e.w);
        if let Some(old) = old {
            self.index.unpublish_workload(&old);
        }
    }

    /// As `retranslate_workload`, for a service; true when its port targets
    /// changed (its members' named ports follow them).
    fn retranslate_service(&mut self, name: &str) -> bool {
        match self.addresses.get(name) {
            Some(Address::Service(e)) => {
                let endpoints = self.endpoints(&e.key);
                let ports = self.service_ports(e);
                let changed = !e.published || !same_targets(&e.s.ports, &ports);
                let waypoint = e.waypoint_vip.map(|vip| self.waypoint_at(vip));
                let Some(Address::Service(e)) = self.addresses.get_mut(name) else {
                    unreachable!()
                };
                let old = e.published.then(|| e.s.clone());
                let s = match &old {
                    Some(old) => {
                        e.s = Arc::new(mesh::Service {
                            endpoints: Vec::new(),
                            ports: Vec::new(),
                            ..mesh::Service::clone(old)
                        });
                        Arc::get_mut(&mut e.s).expect("just made")
                    }
                    None => Arc::make_mut(&mut e.s),
                };
                s.endpoints = endpoints;
                s.ports = ports;
                if let Some(waypoint) = waypoint {
                    s.waypoint = waypoint;
                }
                e.published = true;
                self.index.publish_service(&e.s);
                if let Some(old) = old {
                    self.index.unpublish_service(&old);
                }
                changed
            }
            _ => false,
        }
    }

    /// A waypoint named by the VIP of a service we know.
    fn waypoint_at(&self, vip: IpAddr) -> Option<WaypointRef> {
        let name = self.index.vip_hosts.get(&vip)?;
        let Some(Address::Service(s)) = self.addresses.get(name) else {
            return None;
        };
        Some(WaypointRef {
            name: s.s.hostname.clone(),
            namespace: s.s.namespace.clone(),
        })
    }

    /// The healthy members of service key `key`, in resource name order.
    fn endpoints(&self, key: &str) -> Vec<Endpoint> {
        let Some(k) = self.index.keys.get(key) else {
            return Vec::new();
        };
        let mut endpoints = Vec::with_capacity(k.members.len());
        for n in k.members.iter() {
            if let Some(Address::Workload(w)) = self.addresses.get(n) {
                endpoints.push(Endpoint {
                    workload_uid: w.w.uid.clone(),
                    ip: w.w.ip,
                });
            }
        }
        endpoints
    }

    /// Index entries left (for the no-leak tests): all zero once every
    /// address is removed.
    #[cfg(test)]
    fn index_sizes(&self) -> [usize; 7] {
        let ix = &self.index;
        [
            self.addresses.len(),
            ix.published.workloads().len(),
            ix.published.services().len(),
            ix.waypoint_refs.len(),
            ix.keys.len(),
            ix.vip_hosts.len(),
            ix.by_waypoint_vip.len(),
        ]
    }
}

fn invalid(name: &str, reason: String) -> ResourceError {
    ResourceError::Invalid {
        name: name.to_string(),
        reason,
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests;
