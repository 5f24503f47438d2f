//! ServiceEntries with addresses, published as services: the VIP is what
//! ztunnel captures and what a waypoint is asked to CONNECT to, so an entry
//! needs a service behind its VIP for ztunnel to route it (to the waypoint
//! its `istio.io/use-waypoint` label or namespace names, or to its
//! endpoints) and for that waypoint to admit, route and name it.
//!
//! STATIC endpoints become workloads outside the mesh (plain TCP), indexed
//! by uid only: an endpoint address is not a pod address, so traffic sent
//! to it directly is none of the mesh's business, and it can never shadow a
//! pod. DNS endpoints (or, without endpoints, each host itself) become
//! hostname workloads, which the proxy resolves when it connects, as the
//! ones istiod sends over WDS. An entry without addresses is left to DNS
//! alone, as before.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{ObjectKey, Objects};
use crate::model::{Endpoint, Service, ServicePort, TargetPort, TunnelProtocol, Workload};
use crate::service_entry::{EntryPort, Resolution};
use crate::ServiceEntry;

/// What one entry put in the indexes, to take out on the next rebuild.
#[derive(Default)]
pub(super) struct Published {
    services: Vec<Arc<Service>>,
    workloads: Vec<Arc<Workload>>,
}

fn entry_key(se: &ServiceEntry) -> ObjectKey {
    ObjectKey {
        kind: "ServiceEntry".into(),
        namespace: se.namespace.clone(),
        name: se.name.clone(),
    }
}

/// The port name the waypoint reads the upstream protocol from (as for a
/// Service port's name): the declared protocol wins over the name.
fn port_name(p: &EntryPort) -> String {
    match p.protocol.as_str() {
        "http2" | "grpc" if !p.name.starts_with(p.protocol.as_str()) => {
            format!("{}-{}", p.protocol, p.name)
        }
        _ => p.name.clone(),
    }
}

impl Objects {
    /// Replaces what the entries published before with what they publish
    /// now (entries are few: all of them are re-derived on any change).
    pub(super) fn derive_service_entries(&mut self, entries: &[ServiceEntry]) {
        for s in std::mem::take(&mut self.entries_out.services) {
            self.ix.remove_service(&s);
        }
        for w in std::mem::take(&mut self.entries_out.workloads) {
            self.ix.remove_workload(&w);
        }
        // A VIP goes to the first entry (in key order) that claims it, and
        // never to an entry when a pod or Service claims it.
        let mut taken: BTreeMap<std::net::IpAddr, ObjectKey> = BTreeMap::new();
        for se in entries.iter().filter(|se| !se.addresses.is_empty()) {
            let key = entry_key(se);
            let clash = se.addresses.iter().find_map(|a| {
                let holder = self
                    .ip_owners
                    .get(a)
                    .and_then(|o| o.first())
                    .map(|o| o.key())
                    .or_else(|| taken.get(a).cloned());
                holder.map(|h| (*a, h))
            });
            if let Some((a, holder)) = clash {
                self.left_out(
                    &key,
                    "spec.addresses",
                    format!("{a} is already used by {holder}"),
                );
                continue;
            }
            self.clear_left_out(&key);
            for a in &se.addresses {
                taken.insert(*a, key.clone());
            }
            self.publish_entry(se);
        }
    }

    fn publish_entry(&mut self, se: &ServiceEntry) {
        let ports: Vec<ServicePort> = se
            .ports
            .iter()
            .map(|p| ServicePort {
                name: Some(port_name(p)),
                port: p.number,
                // Each endpoint says where it listens for this port name.
                target: TargetPort::Named(p.name.clone()),
            })
            .collect();
        // Where an endpoint listens for each port name: its own port, else
        // the entry port's target, else the entry port.
        let named_ports = |own: &BTreeMap<String, u16>| -> BTreeMap<String, u16> {
            se.ports
                .iter()
                .map(|p| {
                    let at = own.get(&p.name).copied();
                    (p.name.clone(), at.or(p.target_port).unwrap_or(p.number))
                })
                .collect()
        };
        let no_ip = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        // The endpoints shared by every host, or (DNS without endpoints)
        // each host's own name.
        let mut shared = Vec::new();
        let mut own_name = false;
        match se.resolution {
            Resolution::Static => {
                for e in &se.static_endpoints {
                    let w = self.external_workload(
                        se,
                        e.address.to_string(),
                        (e.address, None),
                        Arc::new(e.labels.clone().into()),
                        named_ports(&e.ports),
                    );
                    shared.push(w);
                }
            }
            Resolution::Dns | Resolution::DnsRoundRobin if se.dns_endpoints.is_empty() => {
                own_name = true;
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                for e in &se.dns_endpoints {
                    let w = self.external_workload(
                        se,
                        e.host.clone(),
                        (no_ip, Some(&e.host)),
                        Default::default(),
                        named_ports(&e.ports),
                    );
                    shared.push(w);
                }
            }
            Resolution::None => {}
        }
        let waypoint = crate::standalone::waypoint_ref(
            &se.labels,
            self.namespaces.get(&se.namespace),
            &se.namespace,
        );
        // One service per host, all on the entry's addresses; inserted last
        // first, so that the first host holds the VIPs.
        let mut workloads = shared.clone();
        for host in se.hosts.iter().rev() {
            let mine = if own_name {
                let w = self.external_workload(
                    se,
                    host.clone(),
                    (no_ip, Some(host)),
                    Default::default(),
                    named_ports(&BTreeMap::new()),
                );
                workloads.push(w.clone());
                vec![w]
            } else {
                shared.clone()
            };
            let endpoints = mine
                .iter()
                .map(|w| Endpoint {
                    workload_uid: w.uid.clone(),
                    ip: w.ip,
                })
                .collect();
            let svc = Arc::new(Service {
                waypoint: waypoint.clone(),
                name: se.name.clone(),
                namespace: se.namespace.clone(),
                hostname: host.clone(),
                vips: se.addresses.clone(),
                ip_families: Default::default(),
                ports: ports.clone(),
                endpoints,
                load_balancing: None,
            });
            self.ix.insert_service(svc.clone());
            self.entries_out.services.push(svc);
        }
        for w in workloads {
            self.ix.insert_external_workload(w.clone());
            self.entries_out.workloads.push(w);
        }
    }

    /// An endpoint of `se` outside the mesh (plain TCP), at an address or a
    /// name (`at`) the proxy resolves; `id` tells it from its siblings.
    fn external_workload(
        &mut self,
        se: &ServiceEntry,
        id: String,
        at: (IpAddr, Option<&String>),
        labels: crate::model::Labels,
        named_ports: BTreeMap<String, u16>,
    ) -> Arc<Workload> {
        let s = &mut self.strings;
        Arc::new(Workload {
            uid: format!("{}/ServiceEntry/{}/{id}", se.namespace, se.name),
            name: se.name.clone(),
            workload_name: s.get(&se.name),
            workload_kind: Default::default(),
            cluster_id: None,
            namespace: s.get(&se.namespace),
            service_account: s.get("default"),
            trust_domain: s.get(&self.trust_domain),
            node: s.get(""),
            ip: at.0,
            extra_ips: Vec::new(),
            hostname: at.1.map(|h| s.get(h)),
            labels,
            annotations: Default::default(),
            waypoint: None,
            named_ports,
            // Outside ambient whatever `location` says: nothing tells us
            // the endpoint speaks HBONE.
            protocol: TunnelProtocol::None,
            canonical_name: s.get(&se.name),
            canonical_revision: s.get("latest"),
            authorization_policies: Vec::new(),
            locality: None,
            healthy: true,
        })
    }
}
