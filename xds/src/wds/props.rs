//! The incremental state equals a whole rebuild: any sequence of upserts and
//! removals, published at any points, ends in the state that the surviving
//! resources give when they arrive at once in any order; and removing every
//! resource leaves no index entry behind.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::entry::{host_of, per_endpoint_port, WorkloadEntry};
use super::*;

/// The last is `s0`'s hostname declared again in another namespace (as
/// a ServiceEntry may): keys differ, the per-endpoint port names do not.
const SERVICES: usize = 4;
const DEMO_SERVICES: usize = 3;
const WORKLOADS: usize = 6;

/// Resource `i` (workloads first, then services) in variant `v`.
fn resource(i: usize, v: u8) -> (String, wl::address::Type) {
    if i < WORKLOADS {
        let svc = |j: usize| format!("demo/s{j}.demo.svc.cluster.local");
        let mut services = std::collections::HashMap::new();
        // Each variant lists a different service, with or without a target.
        services.insert(
            svc((i + v as usize) % DEMO_SERVICES),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: if v.is_multiple_of(2) { 8080 } else { 0 },
                    app_protocol: 0,
                }],
            },
        );
        // Those listing `s0` may list the other namespace's too.
        if (i + v as usize).is_multiple_of(DEMO_SERVICES) && !(i + v as usize).is_multiple_of(2) {
            services.insert(
                "other/s0.demo.svc.cluster.local".into(),
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: 80,
                        target_port: if v == 0 { 7070 } else { 0 },
                        app_protocol: 0,
                    }],
                },
            );
        }
        let waypoint = match (i + v as usize) % 3 {
            0 => None,
            1 => Some(wl::GatewayAddress {
                destination: Some(wl::gateway_address::Destination::Hostname(
                    wl::NamespacedHostname {
                        namespace: "demo".into(),
                        hostname: "wp.demo.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            // By the VIP of a service that may or may not exist (yet).
            _ => Some(wl::GatewayAddress {
                destination: Some(wl::gateway_address::Destination::Address(
                    wl::NetworkAddress {
                        network: String::new(),
                        address: vec![172, 16, 0, (i % DEMO_SERVICES) as u8 + 1],
                    },
                )),
                hbone_mtls_port: 15008,
            }),
        };
        let w = wl::Workload {
            uid: format!("uid-{i}"),
            name: format!("w{i}"),
            namespace: "demo".into(),
            addresses: vec![vec![10, 0, 0, i as u8 + 1]],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: format!("sa{v}"),
            status: if v == 3 {
                wl::WorkloadStatus::Unhealthy as i32
            } else {
                wl::WorkloadStatus::Healthy as i32
            },
            services,
            waypoint,
            ..Default::default()
        };
        (format!("demo/w{i}"), wl::address::Type::Workload(w))
    } else {
        let j = i - WORKLOADS;
        let (ns, host) = match j {
            3 => ("other", "s0".to_string()),
            _ => ("demo", format!("s{j}")),
        };
        let s = wl::Service {
            name: host.clone(),
            namespace: ns.into(),
            hostname: format!("{host}.demo.svc.cluster.local"),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                // Variants 0 and 1 share the VIP; 2 and 3 move it.
                address: vec![172, 16, (v / 2), j as u8 + 1],
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: match v {
                    0 => 9090,
                    2 if j == 3 => 6060,
                    2 => 9090,
                    _ => 0,
                },
                app_protocol: 0,
            }],
            ..Default::default()
        };
        (
            format!("{ns}/{}", s.hostname),
            wl::address::Type::Service(s),
        )
    }
}

fn upsert(r: &mut Resources, i: usize, v: u8) {
    let (name, a) = resource(i, v);
    let body = wl::Address { r#type: Some(a) }.encode_to_vec();
    r.upsert(ADDRESS_TYPE, &name, &format!("v{v}"), &body)
        .unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Upsert(usize, u8),
    Remove(usize),
    Publish,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..WORKLOADS + SERVICES, 0..4u8).prop_map(|(i, v)| Op::Upsert(i, v)),
        1 => (0..WORKLOADS + SERVICES).prop_map(Op::Remove),
        1 => Just(Op::Publish),
    ]
}

/// Every target port a workload's entry and its services give, by
/// per-endpoint name: its own entries, then (if healthy) the services'
/// fixed targets where it gave none (what WDS means, computed directly).
fn listed_ports(r: &Resources, w: &WorkloadEntry) -> BTreeMap<String, u16> {
    let mut named = BTreeMap::new();
    for (key, ports) in w.services.iter() {
        for &(sp, tp) in ports.iter() {
            named.insert(per_endpoint_port(host_of(key), sp), tp);
        }
    }
    if w.healthy {
        for (key, _) in w.services.iter() {
            let names = r.index.keys.get(key).into_iter();
            for n in names.flat_map(|k| k.services.iter()) {
                if let Some(Address::Service(s)) = r.addresses.get(n) {
                    for &(sp, tp) in s.targets.iter() {
                        named
                            .entry(per_endpoint_port(&s.s.hostname, sp))
                            .or_insert(tp);
                    }
                }
            }
        }
    }
    named
}

fn json(s: &MeshState) -> serde_json::Value {
    serde_json::to_value(s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn incremental_equals_whole_and_leaves_nothing_behind(
        ops in prop::collection::vec(op(), 1..40),
        order in any::<prop::sample::Index>(),
    ) {
        let mut r = Resources::default();
        let mut alive: BTreeMap<usize, u8> = BTreeMap::new();
        for op in &ops {
            match op {
                Op::Upsert(i, v) => {
                    upsert(&mut r, *i, *v);
                    alive.insert(*i, *v);
                }
                Op::Remove(i) => {
                    r.remove(ADDRESS_TYPE, &resource(*i, 0).0);
                    alive.remove(i);
                }
                Op::Publish => {
                    r.build();
                }
            }
        }
        let published = r.build();
        let incremental = json(&published);

        // The same resources at once, in a rotated order.
        let mut survivors: Vec<_> = alive.iter().map(|(i, v)| (*i, *v)).collect();
        if !survivors.is_empty() {
            let k = order.index(survivors.len());
            survivors.rotate_left(k);
        }
        let mut whole = Resources::default();
        for (i, v) in &survivors {
            upsert(&mut whole, *i, *v);
        }
        let fresh = whole.build();
        prop_assert_eq!(&incremental, &json(&fresh));
        prop_assert_eq!(r.versions(ADDRESS_TYPE), whole.versions(ADDRESS_TYPE));
        // What is kept besides the published state is what the survivors
        // alone make: no entry outlives what made it.
        prop_assert_eq!(r.index_sizes(), whole.index_sizes());
        // The address indexes (not part of the dump) agree too.
        for w in fresh.workloads.values() {
            let got = published.workload_by_ip(w.ip).map(|x| x.uid.clone());
            prop_assert_eq!(got, fresh.workload_by_ip(w.ip).map(|x| x.uid.clone()));
        }
        for s in fresh.services.values() {
            for vip in &s.vips {
                let got = published.service_by_vip(*vip).map(|x| x.hostname.clone());
                prop_assert_eq!(got, Some(s.hostname.clone()));
            }
            // A hostname two namespaces declare resolves to the same one
            // (the smallest key), however the declarations came and went.
            let key = |x: &mesh::Service| format!("{}/{}", x.namespace, x.hostname);
            let got = published.service_by_host(&s.hostname).map(|x| key(x));
            prop_assert_eq!(got, fresh.service_by_host(&s.hostname).map(|x| key(x)));
            let smallest = fresh
                .services
                .values()
                .filter(|x| x.hostname == s.hostname)
                .map(|x| key(x))
                .min();
            prop_assert_eq!(fresh.service_by_host(&s.hostname).map(|x| key(x)), smallest);
        }

        // Where each endpoint serves each service port is what the per
        // workload entries and the services' fixed targets say (numbers
        // where the endpoints agree are only a shorter form of it).
        for st in [&published, &fresh] {
            for svc in st.services.values() {
                for p in &svc.ports {
                    let got: Vec<_> = st
                        .endpoints_for(svc, p.port)
                        .into_iter()
                        .map(|(w, t)| (w.uid.clone(), t))
                        .collect();
                    let want: Vec<_> = svc
                        .endpoints
                        .iter()
                        .filter_map(|e| {
                            let w = whole.addresses.values().find_map(|a| match a {
                                Address::Workload(w) if w.w.uid == e.workload_uid => Some(w),
                                _ => None,
                            })?;
                            let ports = listed_ports(&whole, w);
                            let t = ports.get(&per_endpoint_port(&svc.hostname, p.port))?;
                            Some((e.workload_uid.clone(), *t))
                        })
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
        }

        // Removing everything leaves no index entry.
        for i in 0..WORKLOADS + SERVICES {
            r.remove(ADDRESS_TYPE, &resource(i, 0).0);
        }
        let empty = r.build();
        prop_assert!(empty.workloads.is_empty() && empty.services.is_empty());
        prop_assert_eq!(r.index_sizes(), [0; 7]);
        prop_assert!(r.versions(ADDRESS_TYPE).is_empty());
    }
}

/// Policy `j` in variant `v`: namespace, scope (mesh-wide only from the
/// root namespace, as istiod sends them) and selector label vary.
fn policy(j: usize, v: u8) -> (String, Vec<u8>) {
    use crate::pb::istio::security as sec;
    let ns = ["ns-0", "ns-1", mesh::ROOT_NAMESPACE][(j + v as usize) % 3];
    let scope = match (v % 3, ns == mesh::ROOT_NAMESPACE) {
        (0, true) => sec::Scope::Global,
        (0, false) | (1, _) => sec::Scope::Namespace,
        _ => sec::Scope::WorkloadSelector,
    };
    let p = sec::Authorization {
        name: format!("p{j}"),
        namespace: ns.into(),
        scope: scope as i32,
        action: sec::Action::Deny as i32,
        groups: vec![],
        dry_run: false,
    };
    (format!("{ns}/p{j}"), p.encode_to_vec())
}

/// A workload per namespace, each listing a few policy names (how istiod
/// names the selector-scoped policies that apply).
fn policy_workloads(r: &mut Resources) {
    for (i, ns) in ["ns-0", "ns-1", mesh::ROOT_NAMESPACE].iter().enumerate() {
        let w = wl::Workload {
            uid: format!("Kubernetes//Pod/{ns}/w"),
            name: "w".into(),
            namespace: ns.to_string(),
            addresses: vec![vec![10, 9, 0, i as u8 + 1]],
            authorization_policies: (0..4).map(|j| format!("{ns}/p{j}")).collect(),
            ..Default::default()
        };
        let body = wl::Address {
            r#type: Some(wl::address::Type::Workload(w)),
        }
        .encode_to_vec();
        r.upsert(ADDRESS_TYPE, &format!("{ns}/w"), "v1", &body)
            .unwrap();
    }
}

/// The policies the index gives each workload, by name.
fn selecting(s: &MeshState) -> BTreeMap<String, Vec<String>> {
    s.workloads
        .values()
        .map(|w| {
            let mut p: Vec<_> = s
                .policies_selecting(w)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            p.sort();
            (w.uid.clone(), p)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// A policy change rebuilds only its namespace's part of the index:
    /// whatever the sequence, every workload gets the policies a whole
    /// rebuild gives it.
    #[test]
    fn policy_index_updated_per_namespace_equals_whole(
        ops in prop::collection::vec((0..6usize, 0..6u8, any::<bool>(), any::<bool>()), 1..30),
    ) {
        let mut r = Resources::default();
        policy_workloads(&mut r);
        let mut alive: BTreeMap<usize, u8> = BTreeMap::new();
        for (j, v, remove, publish) in ops {
            // A policy keeps its resource name; a new variant may move it
            // to another namespace (the old part must be rebuilt too).
            if let Some(old) = alive.get(&j) {
                r.remove(AUTHORIZATION_TYPE, &policy(j, *old).0);
            }
            if remove {
                alive.remove(&j);
            } else {
                let (name, body) = policy(j, v);
                r.upsert(AUTHORIZATION_TYPE, &name, "v1", &body).unwrap();
                alive.insert(j, v);
            }
            if publish {
                r.build();
            }
        }
        let mut whole = Resources::default();
        policy_workloads(&mut whole);
        for (j, v) in &alive {
            let (name, body) = policy(*j, *v);
            whole.upsert(AUTHORIZATION_TYPE, &name, "v1", &body).unwrap();
        }
        let (got, want) = (r.build(), whole.build());
        prop_assert_eq!(selecting(&got), selecting(&want));
    }
}
