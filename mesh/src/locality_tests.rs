use std::sync::Arc;

use super::*;
use crate::model::TunnelProtocol;

/// A workload on `node` in `region/zone/subzone` ("" = not known).
fn w(name: &str, node: &str, at: &str) -> Workload {
    let mut parts = at.split('/').map(str::to_string);
    let mut next = || parts.next().unwrap_or_default();
    let locality = Locality {
        region: next(),
        zone: next(),
        subzone: next(),
    };
    Workload {
        uid: name.into(),
        name: name.into(),
        workload_name: name.into(),
        workload_kind: Default::default(),
        cluster_id: None,
        namespace: "ns".into(),
        service_account: "sa".into(),
        trust_domain: "cluster.local".into(),
        node: node.into(),
        ip: std::net::IpAddr::from([10, 0, 0, 1]),
        extra_ips: Vec::new(),
        hostname: None,
        labels: Default::default(),
        annotations: Default::default(),
        waypoint: None,
        named_ports: Default::default(),
        protocol: TunnelProtocol::Hbone,
        canonical_name: name.into(),
        canonical_revision: "latest".into(),
        authorization_policies: Vec::new(),
        locality: (locality != Locality::default()).then(|| Arc::new(locality)),
        healthy: true,
    }
}

fn names(eps: &[Workload], t: Vec<Vec<usize>>) -> Vec<Vec<&str>> {
    t.into_iter()
        .map(|tier| tier.into_iter().map(|i| eps[i].name.as_str()).collect())
        .collect()
}

fn lb(prefs: &[Scope], mode: Mode) -> LoadBalancing {
    LoadBalancing {
        routing_preferences: prefs.to_vec(),
        mode,
        health_policy: HealthPolicy::OnlyHealthy,
    }
}

#[test]
fn tiers_follow_the_mode() {
    let src = w("client", "n1", "r1/za/s1");
    let eps = vec![
        w("same-node", "n1", "r1/za/s1"),
        w("same-subzone", "n2", "r1/za/s1"),
        w("same-zone", "n3", "r1/za/s2"),
        w("same-region", "n4", "r1/zb/s1"),
        w("elsewhere", "n5", "r2/za/s1"),
        w("unknown", "n6", ""),
    ];
    use Scope::*;
    let zone = LoadBalancing::prefer_same_zone();
    let node = LoadBalancing::prefer_same_node();
    type Case = (&'static str, Option<LoadBalancing>, Vec<Vec<&'static str>>);
    let cases: Vec<Case> = vec![
        (
            "no balancing: one tier of all",
            None,
            vec![vec![
                "same-node",
                "same-subzone",
                "same-zone",
                "same-region",
                "elsewhere",
                "unknown",
            ]],
        ),
        (
            "PreferSameZone: the zone, then the region, then the rest",
            Some(zone),
            vec![
                vec!["same-node", "same-subzone", "same-zone"],
                vec!["same-region"],
                // A different region ends the count even with the same zone name.
                vec!["elsewhere", "unknown"],
            ],
        ),
        (
            "PreferSameNode: node, subzone, zone, region, rest",
            Some(node),
            vec![
                vec!["same-node"],
                vec!["same-subzone"],
                vec!["same-zone"],
                vec!["same-region"],
                vec!["elsewhere", "unknown"],
            ],
        ),
        (
            "STRICT zone: only endpoints sharing every preference",
            Some(lb(&[Region, Zone], Mode::Strict)),
            vec![vec!["same-node", "same-subzone", "same-zone"]],
        ),
        (
            "internalTrafficPolicy Local: this node only",
            Some(LoadBalancing::node_local()),
            vec![vec!["same-node"]],
        ),
        (
            "UNSPECIFIED mode ignores the preferences",
            Some(lb(&[Zone], Mode::Unspecified)),
            vec![vec![
                "same-node",
                "same-subzone",
                "same-zone",
                "same-region",
                "elsewhere",
                "unknown",
            ]],
        ),
        (
            // Each scope compares its own label only: a subzone name shared
            // across regions counts, as upstream counts it.
            "order of preferences matters: subzone, then zone",
            Some(lb(&[Subzone, Zone], Mode::Failover)),
            vec![
                vec!["same-node", "same-subzone", "elsewhere"],
                vec!["same-region"],
                vec!["same-zone", "unknown"],
            ],
        ),
    ];
    for (what, lb, want) in cases {
        let got = tiers(Some(&src), lb.as_ref(), eps.iter());
        assert_eq!(names(&eps, got), want, "{what}");
    }
}

#[test]
fn strict_with_nothing_close_leaves_nothing() {
    let src = w("client", "n1", "r1/za");
    let eps = vec![w("far", "n2", "r1/zb"), w("farther", "n3", "r2/zc")];
    let strict = lb(&[Scope::Region, Scope::Zone], Mode::Strict);
    assert!(tiers(Some(&src), Some(&strict), eps.iter()).is_empty());
    // FAILOVER still reaches them, the same region first.
    let failover = lb(&[Scope::Region, Scope::Zone], Mode::Failover);
    assert_eq!(
        names(&eps, tiers(Some(&src), Some(&failover), eps.iter())),
        vec![vec!["far"], vec!["farther"]]
    );
}

#[test]
fn unknown_client_or_no_endpoints() {
    let eps = vec![w("a", "n1", "r1/za"), w("b", "n2", "r1/zb")];
    let zone = LoadBalancing::prefer_same_zone();
    assert_eq!(
        names(&eps, tiers(None, Some(&zone), eps.iter())),
        vec![vec!["a", "b"]]
    );
    let src = w("client", "n1", "r1/za");
    assert!(tiers(Some(&src), Some(&zone), [].iter()).is_empty());
    assert!(tiers(Some(&src), None, [].iter()).is_empty());
    // Two workloads that both know nothing of where they run share it.
    let src = w("client", "n9", "");
    let eps = vec![w("known", "n1", "r1/za"), w("unknown", "n2", "")];
    assert_eq!(
        names(&eps, tiers(Some(&src), Some(&zone), eps.iter())),
        vec![vec!["unknown"], vec!["known"]]
    );
}

#[test]
fn cluster_scope_compares_cluster_ids() {
    let mut src = w("client", "n1", "");
    src.cluster_id = Some("east".into());
    let mut east = w("east", "n2", "");
    east.cluster_id = Some("east".into());
    let mut west = w("west", "n3", "");
    west.cluster_id = Some("west".into());
    let eps = vec![west, east];
    let l = lb(&[Scope::Cluster], Mode::Failover);
    assert_eq!(
        names(&eps, tiers(Some(&src), Some(&l), eps.iter())),
        vec![vec!["east"], vec!["west"]]
    );
}

#[test]
fn kubernetes_fields_map_as_istiod_maps_them() {
    let zone = Some(LoadBalancing::prefer_same_zone());
    let node = Some(LoadBalancing::prefer_same_node());
    let local = Some(LoadBalancing::node_local());
    let own = |v: Option<&str>| v.map(str::to_string);
    let k = |itp: Option<&str>, td: Option<&str>, ann: Option<&str>, ns: Option<&'static str>| {
        let svc = KubeService {
            internal_traffic_policy: own(itp),
            traffic_distribution: own(td),
            annotation: own(ann),
            publish_not_ready_addresses: false,
        };
        (svc, ns)
    };
    type KCase = (
        &'static str,
        (KubeService, Option<&'static str>),
        Option<LoadBalancing>,
    );
    let cases: Vec<KCase> = vec![
        ("nothing", k(None, None, None, None), None),
        (
            "PreferClose",
            k(None, Some("PreferClose"), None, None),
            zone.clone(),
        ),
        (
            "PreferSameZone",
            k(None, Some("PreferSameZone"), None, None),
            zone.clone(),
        ),
        (
            "PreferSameNode",
            k(None, Some("PreferSameNode"), None, None),
            node.clone(),
        ),
        (
            "internalTrafficPolicy Local beats trafficDistribution",
            k(Some("Local"), Some("PreferClose"), None, None),
            local,
        ),
        (
            "Cluster is no preference",
            k(Some("Cluster"), None, None, None),
            None,
        ),
        (
            "the spec beats the annotation",
            k(None, Some("PreferSameNode"), Some("PreferClose"), None),
            node.clone(),
        ),
        (
            "an unknown spec value falls to the annotation",
            k(None, Some("Elsewhere"), Some("PreferSameNode"), None),
            node.clone(),
        ),
        (
            "the annotation, case-insensitively",
            k(None, None, Some("prefersamezone"), None),
            zone.clone(),
        ),
        (
            "the namespace's annotation when the service has none",
            k(None, None, None, Some("PreferSameNode")),
            node.clone(),
        ),
        (
            "the service's annotation beats its namespace's",
            k(None, None, Some("PreferClose"), Some("PreferSameNode")),
            zone,
        ),
        (
            "an unknown annotation value is no preference",
            k(None, None, Some("Nearby"), Some("PreferSameNode")),
            None,
        ),
    ];
    for (what, (svc, ns), want) in cases {
        assert_eq!(svc.load_balancing(ns), want, "{what}");
    }
    let all = KubeService {
        publish_not_ready_addresses: true,
        traffic_distribution: Some("PreferClose".into()),
        ..Default::default()
    };
    let got = all.load_balancing(None).unwrap();
    assert_eq!(got.health_policy, HealthPolicy::AllowAll);
    assert_eq!(got.mode, Mode::Failover);
    let only = KubeService {
        publish_not_ready_addresses: true,
        ..Default::default()
    };
    assert_eq!(only.load_balancing(None).unwrap().mode, Mode::Unspecified);
}

#[test]
fn node_labels_give_the_locality() {
    let labels = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        Locality::of_node(&labels(&[("kubernetes.io/os", "linux")])),
        None
    );
    let l = Locality::of_node(&labels(&[
        (REGION_LABEL, "r1"),
        (ZONE_LABEL, "za"),
        (SUBZONE_LABEL, "s1"),
    ]))
    .unwrap();
    assert_eq!((&*l.region, &*l.zone, &*l.subzone), ("r1", "za", "s1"));
}
