//! The incremental translator against a whole translation: whatever order
//! objects arrive in, with publishes in between, updates to earlier
//! versions and objects that come and go, the published state equals the
//! one built from the final objects at once; and removing everything leaves
//! nothing behind in any index.

use std::net::IpAddr;

use mesh::objects::{ObjectKey, Objects, Translated};
use mesh::MeshState;
use proptest::prelude::*;

const NS: [&str; 3] = ["a", "b", "c"];
/// Policies may also be mesh-wide, from the root namespace.
const POLICY_NS: [&str; 4] = ["a", "b", "c", "istio-system"];

fn translate(yaml: &str) -> Translated {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    mesh::standalone::translate(v, "generated")
        .unwrap()
        .unwrap()
}

fn namespace(i: usize, ambient: bool, waypoint: bool) -> String {
    let mut labels = vec![];
    if ambient {
        labels.push("istio.io/dataplane-mode: ambient".to_string());
    }
    if waypoint {
        labels.push("istio.io/use-waypoint: wp".to_string());
    }
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{}}}}}\n",
        NS[i],
        labels.join(", ")
    )
}

/// Pods share a small address pool and label set, so that conflicts, and
/// services gaining and losing endpoints, are common.
fn pod(i: usize, ns: usize, app: usize, ip: Option<u8>, mode: usize) -> String {
    let status = match ip {
        Some(ip) => format!("{{podIP: 10.0.0.{ip}}}"),
        None => "{}".into(),
    };
    let mode = [
        "",
        ", istio.io/dataplane-mode: none",
        ", istio.io/dataplane-mode: ambient",
    ][mode];
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {}, labels: {{app: x{app}{mode}}}}}\nspec: {{nodeName: n{}, containers: [{{ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {status}\n",
        NS[ns],
        i % 2
    )
}

fn service(j: usize, ns: usize, app: usize, vip: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{j}, namespace: {}}}\nspec: {{clusterIP: 10.96.0.{vip}, selector: {{app: x{app}}}, ports: [{{port: 80, targetPort: http}}]}}\n",
        NS[ns]
    )
}

fn policy(k: usize, ns: usize, app: usize, bad: bool) -> String {
    let extra = if bad {
        ", requestPrincipals: [\"*\"]"
    } else {
        ""
    };
    // Every third policy has no selector: namespace-wide, or mesh-wide.
    let selector = if k % 3 == 2 {
        String::new()
    } else {
        format!("selector: {{matchLabels: {{app: x{app}}}}}, ")
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{k}, namespace: {}}}\nspec: {{{selector}rules: [{{from: [{{source: {{namespaces: [a]{extra}}}}}]}}]}}\n",
        POLICY_NS[ns]
    )
}

fn gateway(ns: usize) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: {}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n",
        NS[ns]
    )
}

fn object() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..3usize, any::<bool>(), any::<bool>()).prop_map(|(i, a, w)| namespace(i, a, w)),
        (
            0..12usize,
            0..3usize,
            0..3usize,
            proptest::option::of(0..8u8),
            0..3usize
        )
            .prop_map(|(i, ns, app, ip, mode)| pod(i, ns, app, ip, mode)),
        (0..5usize, 0..3usize, 0..3usize, 0..4u8)
            .prop_map(|(j, ns, app, vip)| service(j, ns, app, vip)),
        (0..6usize, 0..4usize, 0..3usize, any::<bool>())
            .prop_map(|(k, ns, app, bad)| policy(k, ns, app, bad)),
        (0..3usize).prop_map(gateway),
    ]
}

/// What a state says, as its dump shows it, plus what its lookups answer.
fn view(s: &MeshState) -> serde_json::Value {
    let mut ips = serde_json::Map::new();
    for last in 0..8u8 {
        let ip: IpAddr = format!("10.0.0.{last}").parse().unwrap();
        let vip: IpAddr = format!("10.96.0.{last}").parse().unwrap();
        ips.insert(
            format!("{ip} {vip}"),
            serde_json::json!([
                s.workload_by_ip(ip).map(|w| &w.uid),
                s.service_by_vip(vip).map(|x| &x.hostname),
            ]),
        );
    }
    let mut names = serde_json::Map::new();
    for ns in NS {
        for i in 0..12 {
            let n = format!("p{i}");
            names.insert(
                format!("{ns}/{n}"),
                serde_json::json!(s.pod_by_name(ns, &n).map(|w| &w.uid)),
            );
        }
        for j in 0..5 {
            let host = format!("s{j}.{ns}.svc.cluster.local");
            names.insert(
                host.clone(),
                serde_json::json!(s.service_by_host(&host).map(|x| x.vips.clone())),
            );
        }
    }
    // What the policy index gives each workload (not part of the dump).
    let mut selecting = serde_json::Map::new();
    for w in s.workloads.values() {
        let mut p: Vec<String> = s
            .policies_selecting(w)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        p.sort();
        selecting.insert(w.uid.clone(), p.into());
    }
    serde_json::json!({ "state": s, "ips": ips, "names": names, "selecting": selecting })
}

/// The last version of each object, in the order they were first seen.
fn finals(objects: &[String]) -> Vec<Translated> {
    let mut by_key: Vec<(ObjectKey, Translated)> = Vec::new();
    for y in objects {
        let t = translate(y);
        match by_key.iter_mut().find(|(k, _)| *k == t.key) {
            Some(slot) => slot.1 = t,
            None => by_key.push((t.key.clone(), t)),
        }
    }
    by_key.into_iter().map(|(_, t)| t).collect()
}

fn whole(ts: &[Translated]) -> MeshState {
    let mut o = Objects::new("cluster.local");
    for t in ts {
        o.upsert(t.clone());
    }
    o.publish()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_arrival_order_gives_the_whole_translation(
        objects in proptest::collection::vec(object(), 1..40),
        noise in proptest::collection::vec(object(), 0..10),
        order in any::<u64>(),
        publish_every in 1..6usize,
    ) {
        // Every version in a shuffled order, noise objects added and later
        // removed unless the real set has them, publishes in between.
        let mut events: Vec<String> = objects.iter().chain(&noise).cloned().collect();
        let n = events.len();
        for i in 0..n {
            let j = (order.wrapping_mul(i as u64 + 7).rotate_left(i as u32) as usize) % n;
            events.swap(i, j);
        }
        let real = finals(&objects);
        let real: Vec<&ObjectKey> = real.iter().map(|t| &t.key).collect();
        let gone: Vec<ObjectKey> = noise
            .iter()
            .map(|y| translate(y).key)
            .filter(|k| !real.contains(&k))
            .collect();
        // What must result: the last version of each object that stays.
        let want: Vec<Translated> = finals(&events)
            .into_iter()
            .filter(|t| !gone.contains(&t.key))
            .collect();
        let expected = view(&whole(&want));

        let mut o = Objects::new("cluster.local");
        for (i, y) in events.iter().enumerate() {
            o.upsert(translate(y));
            if i % publish_every == 0 {
                let _ = o.publish();
            }
        }
        for k in &gone {
            o.remove(k);
        }
        prop_assert_eq!(view(&o.publish()), expected.clone());
        // The same objects sent again (a relist) change nothing.
        for t in &want {
            o.upsert(t.clone());
        }
        prop_assert_eq!(view(&o.publish()), expected);

        // Removing everything, in another order, leaves nothing.
        let mut keys = o.keys();
        let by = (order as usize) % keys.len().max(1);
        keys.rotate_left(by);
        for k in &keys {
            o.remove(k);
        }
        prop_assert!(o.is_empty());
        prop_assert_eq!(view(&o.publish()), view(&Objects::new("cluster.local").publish()));
    }

    #[test]
    fn add_then_delete_restores_the_state_before(
        objects in proptest::collection::vec(object(), 1..30),
        extra in object(),
    ) {
        let base = finals(&objects);
        let extra = translate(&extra);
        prop_assume!(base.iter().all(|t| t.key != extra.key));
        let mut o = Objects::new("cluster.local");
        for t in &base {
            o.upsert(t.clone());
        }
        let before = view(&o.publish());
        o.upsert(extra.clone());
        let _ = o.publish();
        o.remove(&extra.key);
        prop_assert_eq!(view(&o.publish()), before);
    }
}

#[test]
fn the_file_and_one_by_one_agree() {
    let text = [
        namespace(0, true, false),
        pod(1, 0, 0, Some(1), 0),
        pod(2, 0, 0, Some(2), 0),
        service(0, 0, 0, 1),
        policy(0, 0, 0, true),
    ]
    .join("---\n");
    let from_file = mesh::standalone::parse(&text, "cluster.local").unwrap();
    let objects: Vec<String> = text.split("---\n").map(str::to_string).collect();
    assert_eq!(view(&from_file), view(&whole(&finals(&objects))));
    let s = from_file.service_by_host("s0.a.svc.cluster.local").unwrap();
    assert_eq!(s.endpoints.len(), 2, "both pods back the service");
    assert_eq!(from_file.rejected.len(), 1, "the JWT rule is reported");
}
