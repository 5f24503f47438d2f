//! Who claims which address. Almost every address has one claimant (a pod
//! or a service); when two claim one, the smaller key holds it and the other
//! is left out, whatever order they arrived in.

use std::net::IpAddr;

use super::{pod_key, service_key, Name, ObjectKey, Objects};

/// A pod or service claiming an address; ordered as their keys are (pods
/// before services, then by namespace and name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Owner {
    service: bool,
    name: Name,
}

impl Owner {
    fn of(key: &ObjectKey) -> Option<Owner> {
        let service = match key.kind.as_str() {
            "Pod" => false,
            "Service" => true,
            _ => return None,
        };
        Some(Owner {
            service,
            name: (key.namespace.clone(), key.name.clone()),
        })
    }

    pub(super) fn key(&self) -> ObjectKey {
        let (ns, name) = &self.name;
        if self.service {
            service_key(ns, name)
        } else {
            pod_key(ns, name)
        }
    }
}

impl Objects {
    /// Records `key` as a claimant of `ip`; whoever held it is re-derived.
    pub(super) fn claim(&mut self, key: &ObjectKey, ip: Option<IpAddr>) {
        let (Some(ip), Some(me)) = (ip, Owner::of(key)) else {
            return;
        };
        self.entry_address_changed(ip);
        let owners = self.ip_owners.entry(ip).or_default();
        if let Err(at) = owners.binary_search(&me) {
            owners.insert(at, me);
        }
        let owners = owners.clone();
        self.mark_owners(&owners);
    }

    /// Drops every address claim `key` made; the other claimants are
    /// re-derived (one of them may hold the address now).
    pub(super) fn remove_claims(&mut self, key: &ObjectKey) {
        let Some(me) = Owner::of(key) else { return };
        let ips: Vec<IpAddr> = if me.service {
            self.services
                .get(&me.name)
                .map(|s| s.vips.clone())
                .unwrap_or_default()
        } else {
            self.pods
                .get(&me.name)
                .and_then(|w| super::address(w))
                .into_iter()
                .collect()
        };
        for ip in ips {
            self.entry_address_changed(ip);
            let Some(owners) = self.ip_owners.get_mut(&ip) else {
                continue;
            };
            owners.retain(|o| *o != me);
            let rest = owners.clone();
            if rest.is_empty() {
                self.ip_owners.remove(&ip);
            }
            self.mark_owners(&rest);
        }
    }

    /// A pod or Service claims, or gives up, an address: an entry on it may
    /// lose or regain its VIP.
    fn entry_address_changed(&mut self, ip: IpAddr) {
        if self
            .published
            .service_entries
            .iter()
            .any(|se| se.addresses.contains(&ip))
        {
            self.lists_dirty.insert(super::List::ServiceEntries);
        }
    }

    fn mark_owners(&mut self, owners: &[Owner]) {
        for o in owners {
            if o.service {
                self.dirty_services.insert(o.name.clone());
            } else {
                self.dirty_pods.insert(o.name.clone());
            }
        }
    }

    /// Whether `key` holds `ip`; if not, who does.
    pub(super) fn holder(&self, key: &ObjectKey, ip: IpAddr) -> Result<(), ObjectKey> {
        match self.ip_owners.get(&ip).and_then(|o| o.first()) {
            Some(first) if Some(first) != Owner::of(key).as_ref() => Err(first.key()),
            _ => Ok(()),
        }
    }
}
