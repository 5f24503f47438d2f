//! Properties of the fail-closed translation over generated policies that
//! mix fields we evaluate with fields we cannot (unknown, JWT, bad values,
//! CUSTOM, unknown actions, unreadable selectors):
//! - a security object never refuses the config;
//! - it is reported exactly when something in it could not be evaluated;
//! - a DENY-like policy (DENY, CUSTOM, a provider, an unknown action) only
//!   ever takes access away;
//! - an ALLOW policy never allows more than the same policy without its
//!   unevaluable rules.

use std::net::IpAddr;

use identity::Identity;
use mesh::authz::{evaluate, evaluate_selected, Connection, Decision};
use mesh::{standalone, MeshState};
use proptest::prelude::*;

const BASE: &str = "apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: a}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns, labels: {app: b}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
";

/// A rule fragment: its YAML (a `from`, `to` or `when` entry) and whether
/// ztunnel can evaluate it.
#[derive(Clone, Debug)]
struct Fragment {
    yaml: &'static str,
    ok: bool,
}

const FRAGMENTS: &[Fragment] = &[
    Fragment {
        yaml: "from: [{source: {principals: [cluster.local/ns/ns/sa/client]}}]",
        ok: true,
    },
    Fragment {
        yaml: "from: [{source: {notPrincipals: [cluster.local/ns/ns/sa/client]}}]",
        ok: true,
    },
    Fragment {
        yaml: "from: [{source: {ipBlocks: [10.1.0.0/16]}}]",
        ok: true,
    },
    Fragment {
        yaml: "from: [{source: {namespaces: [ns]}}]",
        ok: true,
    },
    Fragment {
        yaml: "to: [{operation: {ports: [\"80\"]}}]",
        ok: true,
    },
    Fragment {
        yaml: "to: [{operation: {notPorts: [\"80\"]}}]",
        ok: true,
    },
    Fragment {
        yaml: "when: [{key: destination.port, values: [\"81\"]}]",
        ok: true,
    },
    Fragment {
        yaml: "when: [{key: source.ip, notValues: [192.168.0.0/16]}]",
        ok: true,
    },
    Fragment {
        yaml: "from: [{source: {requestPrincipals: [\"*\"]}}]",
        ok: false,
    },
    Fragment {
        yaml: "from: [{source: {notRequestPrincipals: [\"*\"]}}]",
        ok: false,
    },
    Fragment {
        yaml: "from: [{source: {principals: [cluster.local/ns/ns/sa/other], futureField: [x]}}]",
        ok: false,
    },
    Fragment {
        yaml: "from: [{source: {ipBlocks: [10.1.0.0/16, not-an-ip]}}]",
        ok: false,
    },
    Fragment {
        yaml: "to: [{operation: {ports: [http]}}]",
        ok: false,
    },
    Fragment {
        yaml: "to: [{operation: {methods: [GET]}}]",
        ok: false,
    },
    Fragment {
        yaml: "when: [{key: \"request.auth.claims[iss]\", values: [x]}]",
        ok: false,
    },
    Fragment {
        yaml: "when: [{key: \"request.headers[x-a]\", values: [b]}]",
        ok: false,
    },
    Fragment {
        yaml: "when: [{key: destination.port, values: [eighty]}]",
        ok: false,
    },
];

#[derive(Clone, Debug)]
struct Policy {
    /// `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`, an unknown one, or none (ALLOW).
    action: Option<&'static str>,
    provider: bool,
    selector: u8,
    spec_unknown: bool,
    rules: Vec<Vec<usize>>,
}

impl Policy {
    fn deny_like(&self) -> bool {
        self.provider || !matches!(self.action, None | Some("ALLOW") | Some("AUDIT"))
    }

    fn bad_rule(&self, r: &[usize]) -> bool {
        r.iter().any(|f| !FRAGMENTS[*f].ok)
    }

    fn has_unevaluable(&self) -> bool {
        self.provider
            || matches!(self.action, Some(a) if !matches!(a, "ALLOW" | "DENY" | "AUDIT"))
            || self.selector == 2
            || self.spec_unknown
            || self.rules.iter().any(|r| self.bad_rule(r))
    }

    /// The policy as YAML; `clean` leaves out what cannot be evaluated.
    fn yaml(&self, clean: bool) -> String {
        let mut s = String::from("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n");
        match (self.selector, clean) {
            (1, _) => s.push_str("  selector: {matchLabels: {app: a}}\n"),
            (2, false) => s.push_str(
                "  selector: {matchExpressions: [{key: app, operator: In, values: [a]}]}\n",
            ),
            _ => {}
        }
        if let Some(a) = self.action {
            s.push_str(&format!("  action: {a}\n"));
        }
        if self.provider && !clean {
            s.push_str("  provider: {name: ext}\n");
        }
        if self.spec_unknown && !clean {
            s.push_str("  futureSpecField: true\n");
        }
        s.push_str("  rules:\n");
        let rules: Vec<_> = self
            .rules
            .iter()
            .filter(|r| !(clean && self.bad_rule(r)))
            .collect();
        if rules.is_empty() {
            s.push_str("  - {from: [{source: {principals: [nobody]}}]}\n");
        }
        for r in rules {
            if r.is_empty() {
                s.push_str("  - {}\n");
                continue;
            }
            for (i, f) in r.iter().enumerate() {
                s.push_str(if i == 0 { "  - " } else { "    " });
                s.push_str(FRAGMENTS[*f].yaml);
                s.push('\n');
            }
        }
        s
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    let actions = prop::sample::select(vec![
        None,
        Some("ALLOW"),
        Some("DENY"),
        Some("AUDIT"),
        Some("CUSTOM"),
        Some("LOG"),
    ]);
    // A rule holds each kind of entry (from/to/when) at most once.
    let rule = prop::collection::btree_map(0..3usize, 0..FRAGMENTS.len(), 0..3).prop_map(|m| {
        let mut seen = std::collections::BTreeSet::new();
        m.into_values()
            .filter(|f| seen.insert(FRAGMENTS[*f].yaml.split(':').next().unwrap()))
            .collect::<Vec<_>>()
    });
    (
        actions,
        any::<bool>(),
        0..3u8,
        prop::bool::weighted(0.1),
        prop::collection::vec(rule, 0..3),
    )
        .prop_map(|(action, provider, selector, spec_unknown, rules)| Policy {
            action,
            provider: provider && action == Some("CUSTOM"),
            selector,
            spec_unknown,
            rules,
        })
}

/// Every connection the probes try: (sa, source, port, pod).
fn allowed(m: &MeshState) -> Vec<bool> {
    let mut out = Vec::new();
    for sa in ["client", "other"] {
        let id = Identity::new("cluster.local", "ns", sa);
        for src in ["10.1.0.5", "192.168.1.1"] {
            for port in [80, 81] {
                for pod in ["a", "b"] {
                    let w = m.workload_by_name("ns", pod).unwrap();
                    let c = Connection {
                        src_identity: Some(&id),
                        src_ip: src.parse::<IpAddr>().unwrap(),
                        dst_ip: w.ip,
                        dst_port: port,
                        request: None,
                    };
                    let d = evaluate(m.policies.iter().map(|p| &**p), w, &c);
                    // The index a connection uses finds the same policies.
                    assert_eq!(d, evaluate_selected(m.policies_selecting(w), &c));
                    out.push(d == Decision::Allow);
                }
            }
        }
    }
    out
}

fn load(docs: &str) -> MeshState {
    standalone::parse(&format!("{BASE}{docs}"), "cluster.local")
        .unwrap_or_else(|e| panic!("a security object refused the config: {e}\n{docs}"))
}

fn subset(a: &[bool], b: &[bool]) -> bool {
    a.iter().zip(b).all(|(x, y)| !x || *y)
}

/// Something already in force that a new policy could widen.
const BASELINE: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: base, namespace: ns}\nspec:\n  selector: {matchLabels: {app: a}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/ns/sa/client, cluster.local/ns/ns/sa/other]}}]}]\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn untranslatable_never_allows_more(p in policy()) {
        let with = load(&format!("{BASELINE}---\n{}", p.yaml(false)));
        // Reported exactly when something could not be evaluated.
        prop_assert_eq!(!with.rejected.is_empty(), p.has_unevaluable(), "{}\n{:#?}", p.yaml(false), with.rejected);
        if p.deny_like() {
            let without = load(BASELINE);
            prop_assert!(subset(&allowed(&with), &allowed(&without)), "a DENY-like policy allowed more:\n{}", p.yaml(false));
        } else if p.action != Some("AUDIT") {
            let clean = load(&format!("{BASELINE}---\n{}", p.yaml(true)));
            prop_assert!(subset(&allowed(&with), &allowed(&clean)), "an ALLOW allowed more than its evaluable rules:\n{}", p.yaml(false));
        }
    }
}
