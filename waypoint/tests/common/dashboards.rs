//! Checks a Grafana dashboard against a live scrape: every series a query
//! selects and every label it matches, groups by or lists exists in what
//! ztunnel and the waypoint export. A panel whose query names a series we
//! do not export is an empty panel for the operator.

use std::collections::{BTreeMap, BTreeSet};

/// Labels Prometheus adds from the scrape target, not the proxy.
pub const TARGET_LABELS: &[&str] = &[
    "node",
    "pod",
    "app",
    "instance",
    "job",
    "namespace",
    "container",
];

pub type Exported = BTreeMap<String, BTreeSet<String>>;

/// metric name -> label names, from a Prometheus text exposition.
pub fn exposition(text: &str, into: &mut Exported) {
    let series = regex::Regex::new(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ").unwrap();
    let label = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="#).unwrap();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(c) = series.captures(l) {
            let e = into.entry(c[1].to_string()).or_default();
            if let Some(ls) = c.get(2) {
                e.extend(label.captures_iter(ls.as_str()).map(|m| m[1].to_string()));
            }
        }
    }
}

/// Every query string of a dashboard, in panels nested in rows as well as
/// in template variables (`definition`, or `query` as a string or object).
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// Panics naming the dashboard, series and label that is missing. Series in
/// `not_ours` come from elsewhere (the kubelet's cAdvisor, istiod) and are
/// skipped. Returns how many selectors were checked.
pub fn check(
    name: &str,
    dashboard: &serde_json::Value,
    exported: &Exported,
    not_ours: &[&str],
) -> usize {
    let selector = regex::Regex::new(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}").unwrap();
    let matcher = regex::Regex::new(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)").unwrap();
    let by = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let listed = regex::Regex::new(
        r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)[^,]*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)",
    )
    .unwrap();
    let bare =
        regex::Regex::new(r"\b((?:istio|workload_manager|process)_[a-zA-Z0-9_]+)\b").unwrap();
    let mut exprs = Vec::new();
    queries(dashboard, &mut exprs);
    let mut checked = 0;
    for e in exprs {
        let mut in_expr = BTreeSet::new();
        let mut foreign = false;
        // The labels of a series the query names, None for others' series.
        let mut series = |metric: &str| -> Option<&BTreeSet<String>> {
            if not_ours.contains(&metric) {
                foreign = true;
                return None;
            }
            let labels = exported.get(metric).unwrap_or_else(|| {
                panic!("{name}: `{metric}` is not exported by ztunnel or the waypoint (in {e})")
            });
            in_expr.extend(labels.iter().cloned());
            Some(labels)
        };
        for s in selector.captures_iter(&e) {
            let Some(labels) = series(&s[1]) else {
                continue;
            };
            for l in matcher.captures_iter(&s[2]) {
                assert!(
                    labels.contains(&l[1]) || TARGET_LABELS.contains(&&l[1]),
                    "{name}: `{}` has no label `{}` (in {e})",
                    &s[1],
                    &l[1]
                );
            }
            checked += 1;
        }
        // Series named without a selector (`sum(istio_requests_total) by
        // (...)`): ours by their prefixes, which must exist too.
        for b in bare.captures_iter(&e) {
            if series(&b[1]).is_some() {
                checked += 1;
            }
        }
        for l in listed.captures_iter(&e) {
            let labels = exported
                .get(&l[1])
                .unwrap_or_else(|| panic!("{name}: `{}` is not exported (in {e})", &l[1]));
            assert!(
                labels.contains(&l[2]) || TARGET_LABELS.contains(&&l[2]),
                "{name}: `{}` has no label `{}` (in {e})",
                &l[1],
                &l[2]
            );
            checked += 1;
        }
        // A query mixing in series from elsewhere groups by their labels too.
        if foreign {
            continue;
        }
        for b in by.captures_iter(&e) {
            for l in b[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
                assert!(
                    in_expr.contains(l) || TARGET_LABELS.contains(&l),
                    "{name}: nothing in `{e}` has label `{l}`"
                );
            }
        }
    }
    checked
}
