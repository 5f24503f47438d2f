//! The lists a state publishes (policies, routes, waypoints, ...): each is
//! rebuilt from its objects only when one of them changed.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Kind, Objects};
use crate::model::{Keyed, PolicyIndex};

/// The published lists, each rebuilt only when one of its objects changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum List {
    Policies,
    WaypointPolicies,
    PeerAuthentications,
    Waypoints,
    Routes,
    DestinationRules,
    ServiceEntries,
}

impl List {
    pub(super) const ALL: [List; 7] = [
        List::Policies,
        List::WaypointPolicies,
        List::PeerAuthentications,
        List::Waypoints,
        List::Routes,
        List::DestinationRules,
        List::ServiceEntries,
    ];
}

/// The list an object of `lists` is published in.
pub(super) fn list_of(k: &Kind) -> List {
    match k {
        Kind::Policy(_) => List::Policies,
        Kind::WaypointPolicy(_) => List::WaypointPolicies,
        Kind::PeerAuthentication(_) => List::PeerAuthentications,
        Kind::Gateway(_) => List::Waypoints,
        Kind::Route(_) => List::Routes,
        Kind::DestinationRule(_) => List::DestinationRules,
        // Namespaces, pods and services are not kept in `lists`.
        Kind::ServiceEntry(_) | Kind::Namespace(_) | Kind::Pod(_) | Kind::Service(_) => {
            List::ServiceEntries
        }
    }
}

impl Objects {
    /// Rebuilds one published list from its objects (a route change does
    /// not rebuild the policy index).
    pub(super) fn rebuild(&mut self, list: List) {
        let p = &mut self.published;
        match list {
            List::Policies => {
                let policies: Vec<_> = self
                    .lists
                    .values()
                    .filter_map(|k| match k {
                        Kind::Policy(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect();
                p.policy_index = Arc::new(
                    match self.policy_namespaces_dirty.replace(BTreeSet::new()) {
                        None => PolicyIndex::new(&policies),
                        Some(dirty) => {
                            let mut ix = (*p.policy_index).clone();
                            for ns in dirty {
                                let in_ns: Vec<_> = policies
                                    .iter()
                                    .filter(|x| x.namespace == ns)
                                    .cloned()
                                    .collect();
                                // Mesh-wide policies live in the root namespace.
                                let global = (ns == crate::ROOT_NAMESPACE).then(|| {
                                    policies
                                        .iter()
                                        .filter(|x| matches!(x.scope, crate::authz::Scope::Global))
                                        .cloned()
                                        .collect()
                                });
                                ix = ix.with_namespace(&ns, &in_ns, global);
                            }
                            ix
                        }
                    },
                );
                p.policies = Arc::new(policies);
            }
            List::WaypointPolicies => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::WaypointPolicy(p) => Some(p.clone()),
                    _ => None,
                });
                p.waypoint_policies = Arc::new(Keyed::new(list.collect(), |t| {
                    vec![t.policy.namespace.clone()]
                }));
            }
            List::PeerAuthentications => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::PeerAuthentication(p) => Some(p.clone()),
                    _ => None,
                });
                p.peer_authentications =
                    Arc::new(Keyed::new(list.collect(), |pa| vec![pa.namespace.clone()]));
            }
            List::Waypoints => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::Gateway(w) => w.clone(),
                    _ => None,
                });
                p.waypoints = Arc::new(list.collect());
            }
            List::Routes => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::Route(r) => Some(r.clone()),
                    _ => None,
                });
                p.http_routes = Arc::new(Keyed::new(list.collect(), |r| r.hosts.clone()));
            }
            List::DestinationRules => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::DestinationRule(d) => Some(d.clone()),
                    _ => None,
                });
                p.destination_rules =
                    Arc::new(Keyed::new(list.collect(), |d| vec![d.host.clone()]));
            }
            List::ServiceEntries => {
                let list = self.lists.values().filter_map(|k| match k {
                    Kind::ServiceEntry(s) => Some(s.clone()),
                    _ => None,
                });
                p.service_entries = Arc::new(list.collect());
            }
        }
    }
}
