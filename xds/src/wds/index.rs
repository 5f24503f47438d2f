//! What `Resources` derives from its entries, maintained per change: the
//! published lookups and the reverse dependencies that say what a change
//! must re-translate. Names and service keys are `Arc<str>`s shared with
//! the entries, never copied per map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh::authz::AuthorizationPolicy;
use mesh::routes::{Waypoint, WaypointRef};
use mesh::{Rejected, Service, Workload};

#[derive(Default, Debug)]
pub(super) struct Index {
    /// What a published state holds, kept as persistent maps so publishing
    /// shares them instead of rebuilding them.
    pub published: mesh::model::Indexes,
    /// The published policy list, its index and what could not be read of
    /// it; None after a policy change.
    pub policies: Option<Policies>,
    /// The last policy index built, and the namespaces whose policies
    /// changed since: a policy change rebuilds its namespace's part only.
    pub policy_index: Option<Arc<mesh::model::PolicyIndex>>,
    pub policy_namespaces: std::collections::BTreeSet<String>,
    /// Waypoints named by some workload or service, with how many name
    /// each; the published list is rebuilt only when the set changes.
    pub waypoint_refs: BTreeMap<(String, String), usize>,
    pub waypoints: Option<Arc<Vec<Waypoint>>>,
    /// By service key (`<ns>/<hostname>`): its healthy member workloads and
    /// the services declaring it, by resource name.
    pub keys: HashMap<Arc<str>, Key>,
    /// Service VIP -> the service resource holding it, for waypoints named
    /// by address.
    pub vip_hosts: HashMap<IpAddr, Arc<str>>,
    /// Waypoint VIP -> resources (workloads and services) naming it.
    pub by_waypoint_vip: HashMap<IpAddr, Names>,
    /// Resources to translate again at the next `build`.
    pub dirty: BTreeSet<Arc<str>>,
}

#[derive(Default, Debug)]
pub(super) struct Key {
    /// Healthy workloads listing the key, by resource name (the endpoint
    /// order).
    pub members: Names,
    /// Services with that key, by resource name.
    pub services: Names,
}

/// A set of resource names as a sorted vector: most hold one to a few
/// names, where a B-tree node would cost ~200 bytes; a change costs what
/// re-translating the set's dependants costs anyway.
#[derive(Default, Debug)]
pub(super) struct Names(Vec<Arc<str>>);

impl Names {
    pub fn insert(&mut self, name: &Arc<str>) {
        if let Err(i) = self.0.binary_search(name) {
            self.0.insert(i, name.clone());
        }
    }

    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.0.binary_search_by(|n| (**n).cmp(name)) {
            self.0.remove(i);
            if self.0.len() * 2 < self.0.capacity() {
                self.0.shrink_to_fit();
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter()
    }
}

pub(super) type Policies = (
    Arc<Vec<Arc<AuthorizationPolicy>>>,
    Arc<mesh::model::PolicyIndex>,
    Arc<Vec<Rejected>>,
);

impl Index {
    /// The shared form of service key `k`.
    pub fn key(&self, k: &str) -> Arc<str> {
        match self.keys.get_key_value(k) {
            Some((k, _)) => k.clone(),
            None => Arc::from(k),
        }
    }

    /// Applies `f` to the entry for `k`, made if missing and dropped once
    /// empty (an index entry never outlives what made it).
    pub fn with_key(&mut self, k: &Arc<str>, f: impl FnOnce(&mut Key)) {
        let e = self.keys.entry(k.clone()).or_default();
        f(e);
        if e.members.is_empty() && e.services.is_empty() {
            self.keys.remove(k);
        }
    }

    /// Marks the services declaring `k` for re-translation.
    pub fn dirty_services_of(&mut self, k: &str) {
        if let Some(e) = self.keys.get(k) {
            self.dirty.extend(e.services.iter().cloned());
        }
    }

    /// Marks the healthy members of `k` for re-translation.
    pub fn dirty_members_of(&mut self, k: &str) {
        if let Some(e) = self.keys.get(k) {
            self.dirty.extend(e.members.iter().cloned());
        }
    }

    /// Marks what names a waypoint by `vip` for re-translation.
    pub fn dirty_waypoint_users(&mut self, vip: &IpAddr) {
        if let Some(users) = self.by_waypoint_vip.get(vip) {
            self.dirty.extend(users.iter().cloned());
        }
    }

    pub fn add_waypoint_user(&mut self, vip: IpAddr, name: &Arc<str>) {
        self.by_waypoint_vip.entry(vip).or_default().insert(name);
    }

    pub fn remove_waypoint_user(&mut self, vip: &IpAddr, name: &str) {
        if let Some(set) = self.by_waypoint_vip.get_mut(vip) {
            set.remove(name);
            if set.is_empty() {
                self.by_waypoint_vip.remove(vip);
            }
        }
    }

    pub fn publish_workload(&mut self, w: &Arc<Workload>) {
        self.published.insert_workload(w.clone());
        self.count_waypoint(w.waypoint.as_ref(), true);
    }

    /// Takes out the entries `w` made, unless another entry has since taken
    /// the same key.
    pub fn unpublish_workload(&mut self, w: &Arc<Workload>) {
        self.published.remove_workload(w);
        self.count_waypoint(w.waypoint.as_ref(), false);
    }

    pub fn publish_service(&mut self, s: &Arc<Service>) {
        self.published.insert_service(s.clone());
        self.count_waypoint(s.waypoint.as_ref(), true);
    }

    pub fn unpublish_service(&mut self, s: &Arc<Service>) {
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
