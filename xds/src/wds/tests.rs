//! The WDS source on small meshes: translation, refusals, policies that
//! fail closed, waypoints by hostname and by VIP.

use std::collections::HashMap;

use mesh::authz::{self, Connection, Decision};
use mesh::Workload;
use prost::Message;

use super::*;
use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;

fn workload(
    name: &str,
    ip: [u8; 4],
    svc: Option<(&str, u32, u32)>,
    policies: &[&str],
) -> wl::Workload {
    let mut services = HashMap::new();
    if let Some((key, sp, tp)) = svc {
        services.insert(
            key.to_string(),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: sp,
                    target_port: tp,
                    app_protocol: 0,
                }],
            },
        );
    }
    wl::Workload {
        uid: format!("Kubernetes//Pod/demo/{name}"),
        name: name.into(),
        namespace: "demo".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: name.into(),
        node: "node1".into(),
        services: services.into_iter().collect(),
        authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn put(r: &mut Resources, name: &str, a: wl::address::Type) {
    let body = wl::Address { r#type: Some(a) }.encode_to_vec();
    r.upsert(ADDRESS_TYPE, name, "v1", &body).unwrap();
}

#[test]
fn workloads_services_and_listed_policies() {
    let mut r = Resources::default();
    let key = "demo/echo.demo.svc.cluster.local";
    put(
        &mut r,
        "a",
        wl::address::Type::Workload(workload(
            "echo",
            [10, 244, 1, 2],
            Some((key, 80, 8080)),
            &["demo/only-client"],
        )),
    );
    put(
        &mut r,
        "b",
        wl::address::Type::Workload(workload("client", [10, 244, 1, 3], None, &[])),
    );
    put(
        &mut r,
        "svc",
        wl::address::Type::Service(wl::Service {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            }],
            waypoint: None,
            ip_families: 0,
            load_balancing: None,
        }),
    );
    let allow = sec::Authorization {
        name: "only-client".into(),
        namespace: "demo".into(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        groups: vec![sec::Group {
            rules: vec![sec::Rules {
                matches: vec![sec::Match {
                    service_accounts: vec![sec::ServiceAccountMatch {
                        namespace: "demo".into(),
                        service_account: "client".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    r.upsert(
        AUTHORIZATION_TYPE,
        "demo/only-client",
        "v1",
        &allow.encode_to_vec(),
    )
    .unwrap();

    let st = r.build();
    let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    let eps = st.endpoints_for(svc, 80);
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].0.name.as_str(), eps[0].1), ("echo", 8080));
    let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
    let client = st.workload_by_ip("10.244.1.3".parse().unwrap()).unwrap();
    fn conn<'a>(id: &'a identity::Identity, echo: &Workload) -> Connection<'a> {
        Connection {
            src_identity: Some(id),
            src_ip: "10.244.1.3".parse().unwrap(),
            dst_ip: echo.ip,
            dst_port: 8080,
            request: None,
        }
    }
    let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
    assert_eq!(
        authz::evaluate(
            policies.iter().copied(),
            echo,
            &conn(&client.identity(), echo)
        ),
        Decision::Allow
    );
    let other = identity::Identity::new("cluster.local", "demo", "intruder");
    assert!(matches!(
        authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
        Decision::Deny(_)
    ));
    // The index a connection uses finds the listed policy too.
    assert!(matches!(
        authz::evaluate_selected(st.policies_selecting(echo), &conn(&other, echo)),
        Decision::Deny(_)
    ));
    assert_eq!(st.policies_selecting(client).count(), 0);
    // The policy is listed on echo only: client has no ALLOW selecting it.
    assert!(
        authz::evaluate(policies.iter().copied(), client, &conn(&other, echo)) == Decision::Allow
    );

    r.remove(AUTHORIZATION_TYPE, "demo/only-client");
    let st = r.build();
    let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
    assert_eq!(
        authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
        Decision::Allow
    );
}

#[test]
fn bad_resources_are_refused_by_name_and_keep_the_old_version() {
    let mut r = Resources::default();
    put(
        &mut r,
        "a",
        wl::address::Type::Workload(workload("echo", [10, 244, 1, 2], None, &[])),
    );
    let mut bad = workload("echo", [10, 244, 1, 2], None, &[]);
    bad.addresses = vec![vec![1, 2, 3]];
    let body = wl::Address {
        r#type: Some(wl::address::Type::Workload(bad)),
    }
    .encode_to_vec();
    let e = r
        .upsert(ADDRESS_TYPE, "a", "v2", &body)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a: workload demo/echo address of 3 bytes"),
        "{e}"
    );
    let e = r
        .upsert(ADDRESS_TYPE, "junk", "v1", &[0xff, 0xff])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("junk: not a valid type.googleapis.com/istio.workload.Address"),
        "{e}"
    );
    assert_eq!(r.versions(ADDRESS_TYPE)["a"], "v1");
    assert!(r
        .build()
        .workload_by_ip("10.244.1.2".parse().unwrap())
        .is_some());
}

/// Policies we cannot read fully are kept, fail closed, and reported.
#[test]
fn unreadable_policies_fail_closed() {
    let echo = workload("echo", [10, 244, 1, 2], None, &[]);
    let principal = |p: &str| sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(p.into())),
    };
    let deny_client = |name: &str| sec::Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        groups: vec![sec::Group {
            rules: vec![sec::Rules {
                matches: vec![sec::Match {
                    principals: vec![principal("cluster.local/ns/demo/sa/client")],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    let decide = |body: &[u8], name: &str, src: &str| {
        let mut r = Resources::default();
        put(&mut r, "echo", wl::address::Type::Workload(echo.clone()));
        r.upsert(AUTHORIZATION_TYPE, name, "v1", body).unwrap();
        let st = r.build();
        let w = st
            .workload_by_ip("10.244.1.2".parse().unwrap())
            .unwrap()
            .clone();
        let src = identity::Identity::new("cluster.local", "demo", src);
        let c = Connection {
            src_identity: Some(&src),
            src_ip: "10.244.2.9".parse().unwrap(),
            dst_ip: w.ip,
            dst_port: 8080,
            request: None,
        };
        let d = authz::evaluate(st.policies.iter().map(|p| p.as_ref()), &w, &c);
        (d == Decision::Allow, st.rejected.to_vec())
    };
    // Sound: only the named client is denied, nothing reported.
    let ok = deny_client("demo/p").encode_to_vec();
    assert_eq!(decide(&ok, "demo/p", "client"), (false, vec![]));
    assert!(decide(&ok, "demo/p", "other").0);

    // Unknown scope: widens to the namespace; unknown action: a DENY.
    let mut p = deny_client("p");
    p.scope = 7;
    p.action = 9;
    let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "client");
    assert!(!allowed);
    let fields: Vec<_> = rejected.iter().map(|r| r.field.as_str()).collect();
    assert_eq!(fields, ["scope", "action"]);
    assert!(
        decide(&p.encode_to_vec(), "demo/p", "other").0,
        "the rest of the rule still decides"
    );

    // A match with no type: the DENY rule ignores it and denies more.
    let mut p = deny_client("p");
    p.groups[0].rules[0].matches[0].principals = vec![sec::StringMatch { match_type: None }];
    let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "other");
    assert!(!allowed, "{rejected:?}");
    assert_eq!(
        rejected[0].field,
        "groups[0].rules[0].matches[0].principals"
    );
    // ...and the same field in an ALLOW matches nothing.
    p.action = sec::Action::Allow as i32;
    assert!(!decide(&p.encode_to_vec(), "demo/p", "client").0);

    // Fields this build does not know (field 99, varint 1): DENY all.
    let mut body = deny_client("p").encode_to_vec();
    body.extend([0x98, 0x06, 0x01]);
    let (allowed, rejected) = decide(&body, "demo/p", "other");
    assert!(!allowed);
    assert_eq!(
        (rejected[0].kind.as_str(), rejected[0].name.as_str()),
        ("Authorization", "p")
    );
    assert!(rejected[0].reason.contains("does not know"), "{rejected:?}");

    // Undecodable: denies everything in the namespace the name gives.
    let (allowed, rejected) = decide(&[0xff, 0xff], "demo/broken", "other");
    assert!(!allowed);
    assert_eq!(
        (rejected[0].namespace.as_str(), rejected[0].name.as_str()),
        ("demo", "broken")
    );
    let mut r = Resources::default();
    assert!(r
        .upsert(AUTHORIZATION_TYPE, "nonamespace", "v1", &[0xff, 0xff])
        .is_err());
}

#[test]
fn waypoint_by_hostname_and_by_vip() {
    let mut r = Resources::default();
    let mut w = workload("echo", [10, 244, 1, 2], None, &[]);
    w.waypoint = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 99],
            },
        )),
        hbone_mtls_port: 15008,
    });
    put(&mut r, "a", wl::address::Type::Workload(w));
    put(
        &mut r,
        "wp",
        wl::address::Type::Service(wl::Service {
            name: "waypoint".into(),
            namespace: "demo".into(),
            hostname: "waypoint.demo.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 99],
            }],
            ports: vec![],
            waypoint: None,
            ip_families: 0,
            load_balancing: None,
        }),
    );
    let st = r.build();
    let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
    let wref = st.workload_waypoint(echo).expect("waypoint");
    assert_eq!(wref.name, "waypoint.demo.svc.cluster.local");
}

/// What istiod sends for a DNS ServiceEntry: its service (VIP, ports) and
/// workloads that carry a hostname instead of an address. They are kept
/// (indexed by uid only: never found by an address or a name) and are the
/// service's endpoints, with their target ports; removing them leaves no
/// index entry. A workload with neither is still refused, by name.
#[test]
fn hostname_workloads_are_endpoints_found_by_uid_only() {
    let mut r = Resources::default();
    let key = "egress/api.example.com";
    let hostname_workload = |host: &str| {
        let mut w = workload("api", [0, 0, 0, 0], Some((key, 443, 8443)), &[]);
        w.uid = format!("Kubernetes/networking.istio.io/ServiceEntry/egress/api/{host}");
        w.namespace = "egress".into();
        w.addresses.clear();
        w.hostname = host.into();
        w.tunnel_protocol = wl::TunnelProtocol::None as i32;
        w.status = wl::WorkloadStatus::Healthy as i32;
        w
    };
    put(
        &mut r,
        "h1",
        wl::address::Type::Workload(hostname_workload("A.origin.example.")),
    );
    put(
        &mut r,
        "h2",
        wl::address::Type::Workload(hostname_workload("b.origin.example")),
    );
    put(
        &mut r,
        "svc",
        wl::address::Type::Service(wl::Service {
            name: "api".into(),
            namespace: "egress".into(),
            hostname: "api.example.com".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![240, 240, 0, 1],
            }],
            ports: vec![wl::Port {
                service_port: 443,
                target_port: 8443,
                app_protocol: 0,
            }],
            waypoint: None,
            ip_families: 0,
            load_balancing: None,
        }),
    );
    let st = r.build();
    let svc = st.service_by_vip("240.240.0.1".parse().unwrap()).unwrap();
    let mut eps: Vec<_> = st
        .endpoints_for(svc, 443)
        .into_iter()
        .map(|(w, p)| (w.hostname.as_deref().map(str::to_string), w.ip, p))
        .collect();
    eps.sort();
    let none: IpAddr = "0.0.0.0".parse().unwrap();
    assert_eq!(
        eps,
        [
            (Some("a.origin.example".to_string()), none, 8443),
            (Some("b.origin.example".to_string()), none, 8443),
        ]
    );
    assert!(st.workload_by_ip(none).is_none());
    assert!(st.workload_by_name("egress", "api").is_none());
    assert_eq!(st.workloads.len(), 2);

    // Neither an address nor a hostname; a hostname that is no DNS name.
    for (host, what) in [
        ("", "neither an address nor a hostname"),
        ("a..b", "is not a DNS name"),
    ] {
        let mut bad = hostname_workload("x");
        bad.hostname = host.into();
        let body = wl::Address {
            r#type: Some(wl::address::Type::Workload(bad)),
        }
        .encode_to_vec();
        let e = r
            .upsert(ADDRESS_TYPE, "h1", "v2", &body)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("h1: workload egress/api") && e.contains(what),
            "{e}"
        );
    }
    assert_eq!(r.versions(ADDRESS_TYPE)["h1"], "v1");

    for n in ["h1", "h2", "svc"] {
        r.remove(ADDRESS_TYPE, n);
    }
    r.build();
    assert_eq!(r.index_sizes(), [0; 7]);
}

/// istiod on a dual-stack cluster: a workload with an address per family
/// and a service with a VIP per family. Both addresses find the workload,
/// both VIPs the service, and a bad second address refuses the resource.
#[test]
fn dual_stack_workloads_and_services() {
    let mut r = Resources::default();
    let key = "demo/echo.demo.svc.cluster.local";
    let v6: std::net::Ipv6Addr = "fd00:10:244::1:2".parse().unwrap();
    let mut echo = workload("echo", [10, 244, 1, 2], Some((key, 80, 8080)), &[]);
    echo.addresses.push(v6.octets().to_vec());
    let headless = "demo/hl.demo.svc.cluster.local";
    let ports = echo.services[key].clone();
    echo.services.insert(headless.into(), ports);
    put(&mut r, "a", wl::address::Type::Workload(echo.clone()));
    let vip6: std::net::Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    put(
        &mut r,
        "svc",
        wl::address::Type::Service(wl::Service {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            addresses: [vec![10, 96, 0, 10], vip6.octets().to_vec()]
                .into_iter()
                .map(|address| wl::NetworkAddress {
                    network: String::new(),
                    address,
                })
                .collect(),
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            }],
            waypoint: None,
            load_balancing: None,
            ip_families: wl::IpFamilies::Dual as i32,
        }),
    );
    // Headless, IPv6 only: DNS gives its endpoints' v6 addresses only.
    put(
        &mut r,
        "hl",
        wl::address::Type::Service(wl::Service {
            name: "hl".into(),
            namespace: "demo".into(),
            hostname: "hl.demo.svc.cluster.local".into(),
            addresses: vec![],
            ports: vec![],
            waypoint: None,
            load_balancing: None,
            ip_families: wl::IpFamilies::Ipv6Only as i32,
        }),
    );
    let st = r.build();
    assert_eq!(
        st.addresses_of_host("hl.demo.svc.cluster.local"),
        Some(vec![std::net::IpAddr::from(v6)])
    );
    let by4 = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
    let by6 = st.workload_by_ip(v6.into()).unwrap();
    assert!(Arc::ptr_eq(by4, by6));
    assert_eq!(by4.ip, "10.244.1.2".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(by4.address_like(vip6.into()), std::net::IpAddr::from(v6));
    let s4 = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    let s6 = st.service_by_vip(vip6.into()).unwrap();
    assert!(Arc::ptr_eq(s4, s6));
    assert_eq!(st.endpoints_for(s6, 80).len(), 1);

    // A second address that is no address: NACKed, the old one kept.
    echo.addresses[1] = vec![1, 2, 3];
    let body = wl::Address {
        r#type: Some(wl::address::Type::Workload(echo)),
    }
    .encode_to_vec();
    assert!(r.upsert(ADDRESS_TYPE, "a", "v2", &body).is_err());
    assert!(r.build().workload_by_ip(v6.into()).is_some());
}

#[test]
fn locality_and_load_balancing() {
    use mesh::locality::{HealthPolicy, Mode, Scope};
    let mut r = Resources::default();
    let key = "demo/echo.demo.svc.cluster.local";
    let mut near = workload("near", [10, 244, 1, 2], Some((key, 80, 8080)), &[]);
    near.locality = Some(wl::Locality {
        region: "r1".into(),
        zone: "za".into(),
        subzone: String::new(),
    });
    let mut sibling = workload("sibling", [10, 244, 1, 4], Some((key, 80, 8080)), &[]);
    sibling.locality = near.locality.clone();
    let mut down = workload("down", [10, 244, 1, 3], Some((key, 80, 8080)), &[]);
    down.status = wl::WorkloadStatus::Unhealthy as i32;
    put(&mut r, "near", wl::address::Type::Workload(near));
    put(&mut r, "sibling", wl::address::Type::Workload(sibling));
    put(&mut r, "down", wl::address::Type::Workload(down));
    let svc = |lb| wl::Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 0,
            app_protocol: 0,
        }],
        waypoint: None,
        load_balancing: Some(lb),
        ip_families: 0,
    };
    let failover = wl::LoadBalancing {
        routing_preference: vec![
            wl::load_balancing::Scope::Network as i32,
            wl::load_balancing::Scope::Region as i32,
            wl::load_balancing::Scope::Zone as i32,
        ],
        mode: wl::load_balancing::Mode::Failover as i32,
        health_policy: 0,
    };
    put(&mut r, "svc", wl::address::Type::Service(svc(failover)));
    let st = r.build();
    let s = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    let lb = s.load_balancing.as_ref().unwrap();
    assert_eq!(
        lb.routing_preferences,
        [Scope::Network, Scope::Region, Scope::Zone]
    );
    assert_eq!(
        (lb.mode, lb.health_policy),
        (Mode::Failover, HealthPolicy::OnlyHealthy)
    );
    let by_name = |n: &str| st.workloads.values().find(|w| w.name == n).unwrap().clone();
    let (near, sibling) = (by_name("near"), by_name("sibling"));
    let l = near.locality.as_ref().unwrap();
    assert_eq!((l.region.as_str(), l.zone.as_str()), ("r1", "za"));
    // One locality value, shared.
    assert!(Arc::ptr_eq(l, sibling.locality.as_ref().unwrap()));
    assert!(near.healthy && !by_name("down").healthy);
    // The unhealthy member is no endpoint.
    assert_eq!(st.endpoints_for(s, 80).len(), 2);

    // A scope or mode this proto does not know refuses the resource and
    // keeps the version held.
    for bad in [
        wl::LoadBalancing {
            routing_preference: vec![42],
            ..Default::default()
        },
        wl::LoadBalancing {
            mode: 9,
            ..Default::default()
        },
    ] {
        let body = wl::Address {
            r#type: Some(wl::address::Type::Service(svc(bad))),
        }
        .encode_to_vec();
        let e = r.upsert(ADDRESS_TYPE, "svc", "v2", &body).unwrap_err();
        assert!(e.to_string().contains("load_balancing"), "{e}");
    }
    let st = r.build();
    let s = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(s.load_balancing.as_ref().unwrap().mode, Mode::Failover);
}
