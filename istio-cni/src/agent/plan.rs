//! What a pod needs done, from what is recorded of it and what the mesh now
//! decides: pure, so a mesh change costs a decision per known pod and work
//! (process spawns, ZDS messages) only for the pods whose decision or its
//! inputs changed.
//!
//! Each side effect has its own inputs: the in-pod rules depend on the
//! capture options only, the probe SNAT set on the address, ztunnel on the
//! uid and the service account (name and namespace are the record's key).
//! A new uid is a new pod behind the same name: nothing installed for the
//! old one is trusted, it is enrolled afresh.

use std::collections::BTreeMap;

use super::records::{Enrolled, Record};
use super::{pod_name, Key};
use crate::membership::Membership;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// In the mesh with `to`: each flag says what to (re)do for it. All set
    /// for a pod entering the mesh; none when only a recorded refusal is
    /// cleared.
    Enrol {
        to: Enrolled,
        rules: bool,
        address: bool,
        ztunnel: bool,
    },
    /// Out of the mesh: rules out and ztunnel told, if it was in. `refused`
    /// when being out is an error the plugin reports (an ambient namespace's
    /// pod the mesh does not know has no identity).
    Release { why: String, refused: bool },
    /// The mesh's declaration of it cannot be applied (another node, no or
    /// a conflicting address): left exactly as it is, and reported.
    Refuse(String),
}

/// Every known pod with the decision made for it now → what must be done.
/// Pods already as decided are left out.
pub(super) fn plan(
    node: &str,
    records: &BTreeMap<Key, Record>,
    decisions: impl IntoIterator<Item = (Key, Membership)>,
) -> Vec<(Key, Action)> {
    decisions
        .into_iter()
        .filter_map(|(key, decision)| {
            let r = records.get(&key)?;
            let action = plan_pod(node, &key, r, decision, false)?;
            Some((key, action))
        })
        .collect()
}

/// One pod. `repair` distrusts what is recorded as installed (a new
/// sandbox's ADD, an agent starting, which repairs rules someone removed):
/// rules and address are redone, and an action is always returned, so the
/// caller learns where the pod stands. ztunnel is told only of a change
/// even then: it already holds the pod (or gets it in its next snapshot).
pub(super) fn plan_pod(
    node: &str,
    key: &Key,
    r: &Record,
    decision: Membership,
    repair: bool,
) -> Option<Action> {
    let pod = pod_name(key);
    let action = match decision {
        Membership::Outside(why) => Action::Release {
            why,
            refused: false,
        },
        Membership::Undeclared => Action::Release {
            why: format!("{pod} is in an ambient namespace but not in the mesh config"),
            refused: true,
        },
        Membership::Ambient {
            uid,
            ip,
            node: at,
            service_account,
            options,
        } => {
            if at != node {
                Action::Refuse(format!(
                    "the mesh config places {pod} on node {at}, but it runs on {node}"
                ))
            } else {
                // Not yet addressed in the mesh: the CNI's address is the one.
                let ip = match r.ips.first() {
                    Some(cni) if ip.is_unspecified() => *cni,
                    _ => ip,
                };
                if ip.is_unspecified() {
                    Action::Refuse(format!(
                        "{pod} has no address yet (neither CNI nor the API reported one)"
                    ))
                } else if !r.ips.is_empty() && !r.ips.contains(&ip) {
                    Action::Refuse(format!(
                        "{pod} got {:?} from the CNI, but the mesh config declares podIP {ip}",
                        r.ips
                    ))
                } else {
                    // An IPv6 address either source knows gets the v6 rules:
                    // its v6 traffic must not pass by ztunnel.
                    let ipv6 = options.ipv6 || r.ips.iter().any(std::net::IpAddr::is_ipv6);
                    let to = Enrolled {
                        uid,
                        ip,
                        service_account,
                        options: crate::redirect::Options { ipv6, ..options },
                    };
                    enrol(r.enrolled.as_ref(), to, repair)
                }
            }
        }
    };
    if repair || !unchanged(r, &action) {
        Some(action)
    } else {
        None
    }
}

fn enrol(have: Option<&Enrolled>, to: Enrolled, repair: bool) -> Action {
    let (rules, address, ztunnel) = match have {
        Some(h) if h.uid == to.uid => (
            repair || h.options != to.options,
            repair || h.ip != to.ip,
            h.service_account != to.service_account,
        ),
        // Entering the mesh, or a new pod under the same name.
        _ => (true, true, true),
    };
    Action::Enrol {
        to,
        rules,
        address,
        ztunnel,
    }
}

/// Whether `action` would leave `r` as it is: nothing to install, remove or
/// tell, and the same refusal (or none) recorded.
fn unchanged(r: &Record, action: &Action) -> bool {
    match action {
        Action::Enrol {
            rules,
            address,
            ztunnel,
            ..
        } => !(rules | address | ztunnel) && r.refused.is_none(),
        Action::Release { why, refused } => {
            r.enrolled.is_none() && r.refused.as_deref() == refused.then_some(why.as_str())
        }
        Action::Refuse(why) => r.refused.as_deref() == Some(why.as_str()),
    }
}

impl Action {
    /// The record once `self` has been carried out.
    pub(super) fn settle(&self, r: &mut Record) {
        match self {
            Action::Enrol { to, .. } => {
                r.enrolled = Some(to.clone());
                r.refused = None;
            }
            Action::Release { why, refused } => {
                r.enrolled = None;
                r.refused = refused.then(|| why.clone());
            }
            Action::Refuse(why) => r.refused = Some(why.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Op, Request};
    use crate::membership::decide;

    const NODE: &str = "n1";

    fn ns(name: &str, ambient: bool) -> String {
        let labels = if ambient {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
        )
    }

    /// A pod on NODE at `ip`; `extra` goes into its metadata.
    fn pod(ns: &str, name: &str, ip: &str, extra: &str) -> String {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra}}}\nspec: {{serviceAccountName: {name}, nodeName: {NODE}}}\nstatus: {{podIP: {ip}}}\n")
    }

    /// `app` ambient with a and b; `plain` not, with c; uids given so a
    /// case can recreate a pod.
    fn base() -> String {
        ns("app", true)
            + &ns("plain", false)
            + &pod("app", "a", "10.0.0.1", ", uid: a-1")
            + &pod("app", "b", "10.0.0.2", ", uid: b-1")
            + &pod("plain", "c", "10.0.0.3", ", uid: c-1")
    }

    fn decisions(
        state: &mesh::MeshState,
        records: &BTreeMap<Key, Record>,
    ) -> Vec<(Key, Membership)> {
        records
            .keys()
            .map(|k| (k.clone(), decide(state, &k.0, &k.1, &[], true)))
            .collect()
    }

    /// The records an agent holds once it has reconciled every pod's ADD
    /// against `yaml` (pods with the CNI's address).
    fn settled(yaml: &str) -> BTreeMap<Key, Record> {
        let state = mesh::standalone::parse(yaml, "cluster.local").unwrap();
        let mut records = BTreeMap::new();
        for (ns, name, ip) in [
            ("app", "a", "10.0.0.1"),
            ("app", "b", "10.0.0.2"),
            ("plain", "c", "10.0.0.3"),
        ] {
            let req = Request {
                op: Op::Add,
                namespace: ns.into(),
                name: name.into(),
                container_id: format!("ctr-{name}"),
                netns: None,
                ips: vec![ip.parse().unwrap()],
            };
            let key = (ns.to_string(), name.to_string());
            let mut r = Record::of(req, format!("/run/netns/{name}").into());
            let d = decide(&state, ns, name, &[], true);
            plan_pod(NODE, &key, &r, d, true)
                .expect("repair always acts")
                .settle(&mut r);
            records.insert(key, r);
        }
        records
    }

    /// Each action in short: which pod, and what is done to it.
    fn short(actions: &[(Key, Action)]) -> Vec<String> {
        actions
            .iter()
            .map(|(k, a)| {
                let what = match a {
                    Action::Enrol {
                        rules,
                        address,
                        ztunnel,
                        to,
                    } => {
                        let mut w = vec!["enrol"];
                        w.extend(rules.then_some("rules"));
                        w.extend(address.then_some("address"));
                        w.extend(ztunnel.then_some("ztunnel"));
                        format!("{} uid={} dns={}", w.join("+"), to.uid, to.options.dns)
                    }
                    Action::Release { refused: false, .. } => "release".into(),
                    Action::Release { refused: true, .. } => "release, refused".into(),
                    Action::Refuse(why) => format!("refuse: {why}"),
                };
                format!("{}: {what}", pod_name(k))
            })
            .collect()
    }

    #[test]
    fn a_change_acts_only_on_what_it_changes() {
        let dns_off = ", annotations: {ambient.istio.io/dns-capture: \"false\"}";
        let opt_out = ", labels: {istio.io/dataplane-mode: none}";
        let a = pod("app", "a", "10.0.0.1", ", uid: a-1");
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            ("unchanged", base(), vec![]),
            (
                "another pod's labels and a service change",
                base().replace(&pod("plain", "c", "10.0.0.3", ", uid: c-1"), &pod("plain", "c", "10.0.0.3", ", uid: c-1, labels: {tier: web}"))
                    + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: app}\nspec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}\n",
                vec![],
            ),
            (
                "pod label opts out",
                base().replace(&a, &pod("app", "a", "10.0.0.1", &format!(", uid: a-1{opt_out}"))),
                vec!["app/a: release"],
            ),
            (
                "namespace label removed",
                base().replace(&ns("app", true), &ns("app", false)),
                vec!["app/a: release", "app/b: release"],
            ),
            (
                "namespace labelled",
                base().replace(&ns("plain", false), &ns("plain", true)),
                vec!["plain/c: enrol+rules+address+ztunnel uid=c-1 dns=true"],
            ),
            (
                "dns-capture annotation flipped",
                base().replace(&a, &pod("app", "a", "10.0.0.1", &format!(", uid: a-1{dns_off}"))),
                vec!["app/a: enrol+rules uid=a-1 dns=false"],
            ),
            (
                "pod recreated under the same name",
                base().replace("uid: a-1", "uid: a-2"),
                vec!["app/a: enrol+rules+address+ztunnel uid=a-2 dns=true"],
            ),
            (
                "service account changed",
                base().replace("serviceAccountName: b,", "serviceAccountName: other,"),
                vec!["app/b: enrol+ztunnel uid=b-1 dns=true"],
            ),
            // Gone from the mesh, netns still there: an ambient namespace's
            // pod without identity is released and refused, as before.
            (
                "pod gone from the mesh",
                base().replace(&a, ""),
                vec!["app/a: release, refused"],
            ),
            (
                "mesh moves the pod to another node",
                base().replace(&a, &a.replace("nodeName: n1", "nodeName: n2")),
                vec!["app/a: refuse: the mesh config places app/a on node n2, but it runs on n1"],
            ),
            (
                "mesh address disagrees with the CNI's",
                base().replace("podIP: 10.0.0.2", "podIP: 10.0.0.9"),
                vec!["app/b: refuse: app/b got [10.0.0.2] from the CNI, but the mesh config declares podIP 10.0.0.9"],
            ),
        ];
        for (what, yaml, want) in cases {
            let records = settled(&base());
            let state = mesh::standalone::parse(&yaml, "cluster.local").unwrap();
            let got = plan(NODE, &records, decisions(&state, &records));
            assert_eq!(short(&got), want, "{what}");
            // Once carried out, the same state asks for nothing more.
            let mut after = records.clone();
            for (k, a) in &got {
                a.settle(after.get_mut(k).unwrap());
            }
            let again = plan(NODE, &after, decisions(&state, &after));
            assert_eq!(short(&again), Vec::<String>::new(), "{what}, repeated");
        }
    }

    #[test]
    fn a_refusal_is_acted_on_once_and_cleared_when_it_goes() {
        let records = settled(&base());
        let key = ("app".to_string(), "a".to_string());
        let elsewhere = base().replace(
            &pod("app", "a", "10.0.0.1", ", uid: a-1"),
            &pod("app", "a", "10.0.0.1", ", uid: a-1").replace("nodeName: n1", "nodeName: n2"),
        );
        let state = mesh::standalone::parse(&elsewhere, "cluster.local").unwrap();
        let mut after = records.clone();
        for (k, a) in plan(NODE, &records, decisions(&state, &records)) {
            a.settle(after.get_mut(&k).unwrap());
        }
        // Refused, still enrolled as before (the rules stay: fail closed).
        assert!(after[&key].refused.is_some());
        assert_eq!(after[&key].enrolled, records[&key].enrolled);
        // Back where it was: nothing to redo but the refusal to forget.
        let state = mesh::standalone::parse(&base(), "cluster.local").unwrap();
        let got = plan(NODE, &after, decisions(&state, &after));
        assert_eq!(short(&got), ["app/a: enrol uid=a-1 dns=true"]);
    }

    /// Repairing (an ADD, a start) redoes the rules and address of a pod
    /// whose record says they are in, but tells ztunnel nothing new.
    #[test]
    fn repair_redoes_rules_not_ztunnel() {
        let records = settled(&base());
        let state = mesh::standalone::parse(&base(), "cluster.local").unwrap();
        let key = ("app".to_string(), "a".to_string());
        let d = decide(&state, "app", "a", &[], true);
        let got = plan_pod(NODE, &key, &records[&key], d, true).unwrap();
        assert_eq!(
            short(&[(key, got)]),
            ["app/a: enrol+rules+address uid=a-1 dns=true"]
        );
        let key = ("plain".to_string(), "c".to_string());
        let d = decide(&state, "plain", "c", &[], true);
        assert!(matches!(
            plan_pod(NODE, &key, &records[&key], d, true),
            Some(Action::Release { refused: false, .. })
        ));
    }
}
