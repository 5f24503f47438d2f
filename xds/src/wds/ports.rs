//! Target ports. WDS gives them per workload (its entry for each service it
//! lists) with the service's own fixed target as the fallback, so a service
//! port's target may differ per endpoint. A service port whose endpoints
//! all agree is published with that number; only one whose endpoints differ
//! names a per-endpoint port (`wds:<hostname>:<port>`), which the members
//! then carry. Most services agree, and a per-workload map of named ports
//! is one B-tree node (~300 bytes) per workload.

use std::collections::BTreeMap;

use mesh::{ServicePort, TargetPort};

use super::entry::{host_of, per_endpoint_port, Address, ServiceEntry, WorkloadEntry};
use super::Resources;

impl Resources {
    /// The port that workload `w` serves service port `sp` of a service
    /// named `host` on: its own entry for a service key of that hostname
    /// (the last listed), else (if healthy) the first fixed target that a
    /// service it lists with that hostname gives.
    pub(super) fn target_of(&self, w: &WorkloadEntry, host: &str, sp: u16) -> Option<u16> {
        let mut own = None;
        for (key, ports) in w.services.iter() {
            if host_of(key) == host {
                for &(p, t) in ports.iter() {
                    if p == sp {
                        own = Some(t);
                    }
                }
            }
        }
        if own.is_some() || !w.healthy {
            return own;
        }
        for (key, _) in w.services.iter() {
            let names = self.index.keys.get(key).into_iter();
            for n in names.flat_map(|k| k.services.iter()) {
                let Some(Address::Service(s)) = self.addresses.get(n) else {
                    continue;
                };
                if s.s.hostname != host {
                    continue;
                }
                if let Some(&(_, t)) = s.targets.iter().find(|(p, _)| *p == sp) {
                    return Some(t);
                }
            }
        }
        None
    }

    /// The ports of service `s`: a number where all its endpoints (healthy
    /// members) serve the port on the same one, else the per-endpoint name.
    pub(super) fn service_ports(&self, s: &ServiceEntry) -> Vec<ServicePort> {
        let members: Vec<&WorkloadEntry> = self
            .index
            .keys
            .get(&s.key)
            .into_iter()
            .flat_map(|k| k.members.iter())
            .filter_map(|n| match self.addresses.get(n) {
                Some(Address::Workload(w)) => Some(w),
                _ => None,
            })
            .collect();
        let host = s.s.hostname.as_str();
        let mut ports = Vec::with_capacity(s.s.ports.len());
        for p in &s.s.ports {
            let mut targets = members.iter().map(|w| self.target_of(w, host, p.port));
            let first = targets.next().flatten();
            let agreed = first.filter(|t| targets.all(|x| x == Some(*t)));
            let target = match (agreed, &p.target) {
                (Some(t), _) => TargetPort::Number(t),
                (None, TargetPort::Named(name)) => TargetPort::Named(name.clone()),
                (None, TargetPort::Number(_)) => TargetPort::Named(per_endpoint_port(host, p.port)),
            };
            ports.push(ServicePort {
                name: p.name.clone(),
                port: p.port,
                target,
            });
        }
        ports
    }

    /// The named ports workload `w` must carry: those of the services it is
    /// an endpoint of whose endpoints disagree. None unless healthy: only
    /// endpoints are looked up.
    pub(super) fn named_ports(&self, w: &WorkloadEntry) -> BTreeMap<String, u16> {
        let mut named_ports = BTreeMap::new();
        if !w.healthy {
            return named_ports;
        }
        for (key, _) in w.services.iter() {
            let names = self.index.keys.get(key).into_iter();
            for n in names.flat_map(|k| k.services.iter()) {
                let Some(Address::Service(s)) = self.addresses.get(n) else {
                    continue;
                };
                for p in &s.s.ports {
                    if let TargetPort::Named(name) = &p.target {
                        if let Some(t) = self.target_of(w, &s.s.hostname, p.port) {
                            named_ports.insert(name.clone(), t);
                        }
                    }
                }
            }
        }
        named_ports
    }
}

/// Whether two port lists resolve their targets the same way.
pub(super) fn same_targets(a: &[ServicePort], b: &[ServicePort]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.port == y.port
                && match (&x.target, &y.target) {
                    (TargetPort::Number(m), TargetPort::Number(n)) => m == n,
                    (TargetPort::Named(m), TargetPort::Named(n)) => m == n,
                    _ => false,
                }
        })
}
