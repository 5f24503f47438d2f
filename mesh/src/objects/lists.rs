//! The lists a state publishes (policies, routes, waypoints, ...): each is
//! rebuilt from its objects only when one of them changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Kind, Objects};
use crate::model::Keyed;

/// The published lists, each rebuilt only when one of its objects changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum List {
    Policies,
    WaypointPolicies,
    PeerAuthentications,
    RequestAuthentications,
    Waypoints,
    Routes,
    DestinationRules,
    ServiceEntries,
    Secrets,
    MeshConfig,
}

impl List {
    pub(super) const ALL: [List; 10] = [
        List::Policies,
        List::WaypointPolicies,
        List::PeerAuthentications,
        List::RequestAuthentications,
        List::Waypoints,
        List::Routes,
        List::DestinationRules,
        List::ServiceEntries,
        List::Secrets,
        List::MeshConfig,
    ];
}

/// The list an object of `lists` is published in.
pub(super) fn list_of(k: &Kind) -> List {
    match k {
        Kind::Policy(_) => List::Policies,
        Kind::WaypointPolicy(_) => List::WaypointPolicies,
        Kind::PeerAuthentication(_) => List::PeerAuthentications,
        Kind::RequestAuthentication(_) => List::RequestAuthentications,
        Kind::Gateway(_) => List::Waypoints,
        Kind::Route(_) => List::Routes,
        Kind::DestinationRule(_) => List::DestinationRules,
        Kind::Secret(_) => List::Secrets,
        Kind::MeshConfig(_) => List::MeshConfig,
        // Namespaces, pods and services are not kept in `lists`.
        Kind::ServiceEntry(_)
        | Kind::Namespace(..)
        | Kind::Node(_)
        | Kind::Pod(_)
        | Kind::Service(_) => List::ServiceEntries,
    }
}

impl Objects {
    /// The objects of `lists` that `pick` takes, in key order.
    fn collect<T>(&self, pick: impl Fn(&Kind) -> Option<&T>) -> Vec<T>
    where
        T: Clone,
    {
        self.lists
            .values()
            .filter_map(|k| pick(k).cloned())
            .collect()
    }

    /// Rebuilds one published list from its objects (a route change does
    /// not rebuild the policy index).
    pub(super) fn rebuild(&mut self, list: List) {
        match list {
            List::Policies => {
                let policies = self.collect(|k| match k {
                    Kind::Policy(p) => Some(p),
                    _ => None,
                });
                let dirty = self.policy_namespaces_dirty.replace(BTreeSet::new());
                let p = &mut self.published;
                p.policy_index = Arc::new(p.policy_index.updated(&policies, dirty));
                p.policies = Arc::new(policies);
            }
            List::WaypointPolicies => {
                let list = self.collect(|k| match k {
                    Kind::WaypointPolicy(p) => Some(p),
                    _ => None,
                });
                self.published.waypoint_policies =
                    Arc::new(Keyed::new(list, |t| vec![t.policy.namespace.clone()]));
            }
            List::PeerAuthentications => {
                let list = self.collect(|k| match k {
                    Kind::PeerAuthentication(p) => Some(p),
                    _ => None,
                });
                self.published.peer_authentications =
                    Arc::new(Keyed::new(list, |pa| vec![pa.namespace.clone()]));
            }
            List::RequestAuthentications => {
                let list = self.collect(|k| match k {
                    Kind::RequestAuthentication(r) => Some(r),
                    _ => None,
                });
                self.published.request_authentications =
                    Arc::new(Keyed::new(list, |r| vec![r.namespace.clone()]));
            }
            List::Waypoints => {
                let list = self.collect(|k| match k {
                    Kind::Gateway(w) => w.as_ref(),
                    _ => None,
                });
                self.published.waypoints = Arc::new(list);
            }
            List::Routes => {
                let list = self.collect(|k| match k {
                    Kind::Route(r) => Some(r),
                    _ => None,
                });
                // A route attached to a ServiceEntry is for its hosts now.
                let entries = self.collect(|k| match k {
                    Kind::ServiceEntry(s) => Some(s),
                    _ => None,
                });
                let keys = |r: &crate::routes::HttpRoute| {
                    let mut hosts = r.hosts.clone();
                    for (ns, name) in &r.entry_parents {
                        let se = entries
                            .iter()
                            .find(|s| &s.namespace == ns && &s.name == name);
                        hosts.extend(se.into_iter().flat_map(|s| s.hosts.iter().cloned()));
                    }
                    hosts
                };
                self.published.http_routes = Arc::new(Keyed::new(list, keys));
            }
            List::DestinationRules => {
                let list = self.collect(|k| match k {
                    Kind::DestinationRule(d) => Some(d),
                    _ => None,
                });
                self.published.destination_rules =
                    Arc::new(Keyed::new(list, |d| vec![d.host.clone()]));
            }
            List::Secrets => {
                let list = self.lists.iter().filter_map(|(k, o)| match o {
                    Kind::Secret(s) => Some(((k.namespace.clone(), k.name.clone()), s.clone())),
                    _ => None,
                });
                self.published.secrets = Arc::new(list.collect());
            }
            List::MeshConfig => {
                // One object (the source reads only istio-system/istio).
                let providers = self.collect(|k| match k {
                    Kind::MeshConfig(p) => Some(p),
                    _ => None,
                });
                self.published.extension_providers =
                    Arc::new(providers.into_iter().next().unwrap_or_default());
            }
            List::ServiceEntries => {
                let list = self.collect(|k| match k {
                    Kind::ServiceEntry(s) => Some(s),
                    _ => None,
                });
                self.derive_service_entries(&list);
                self.published.service_entries = Arc::new(list);
                // Routes attached to entries follow their hosts.
                self.rebuild(List::Routes);
            }
        }
    }
}
