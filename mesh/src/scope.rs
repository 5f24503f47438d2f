//! What a waypoint needs to watch. A waypoint serves the services bound to
//! it, not the cluster: it needs the pods behind those services (their
//! endpoints), behind the backends its routes send to, and the pods of
//! namespaces bound to it as a whole (traffic addressed to a pod there comes
//! to it). Everything else in the cluster is never looked at by its data
//! path, so a source can watch pods in these namespaces only. Pods bound by
//! a label of their own, in any namespace, are the source's other watch
//! (a label selector), not a namespace of this set.

use std::collections::BTreeSet;

use crate::routes::WaypointRef;
use crate::MeshState;

/// The namespaces whose pods the waypoint `me` must know: its own, those of
/// the services bound to it, of the backends (and mirrors) of the routes of
/// those services, and the namespaces labelled to use it. Over-inclusion
/// only costs memory; leaving one out would make its endpoints unknown, so
/// whatever may route here is in.
pub fn waypoint_namespaces(state: &MeshState, me: &WaypointRef) -> BTreeSet<String> {
    let mut out = BTreeSet::from([me.namespace.clone()]);
    for (ns, labels) in state.namespace_labels.iter() {
        let none = std::collections::BTreeMap::new();
        if crate::standalone::waypoint_ref(&none, Some(labels), ns).as_ref() == Some(me) {
            out.insert(ns.clone());
        }
    }
    for svc in state.services.values() {
        if state.service_waypoint(svc) != Some(me) {
            continue;
        }
        out.insert(svc.namespace.clone());
        for route in state.http_routes.get(&svc.hostname) {
            for rule in &route.rules {
                let mirror = rule.mirror.as_ref().map(|(b, _)| b);
                for b in rule.backends.iter().chain(mirror) {
                    if let Some(s) = state.service_by_host(&b.host) {
                        out.insert(s.namespace.clone());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: edge, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
";

    fn ns(name: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"
        )
    }

    fn svc(name: &str, ns: &str, vip: &str, labels: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{port: 80}}]}}\n")
    }

    fn route(ns: &str, parent: &str, backend: &str, backend_ns: &str) -> String {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r-{parent}, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}}}]\n  rules: [{{backendRefs: [{{name: {backend}, namespace: {backend_ns}, port: 80}}]}}]\n")
    }

    fn scope(docs: &[String]) -> Vec<String> {
        let text = [GATEWAY.to_string()]
            .iter()
            .chain(docs)
            .cloned()
            .collect::<Vec<_>>()
            .join("---\n");
        let state = crate::standalone::parse(&text, "cluster.local").unwrap();
        let me = WaypointRef {
            name: "wp".into(),
            namespace: "edge".into(),
        };
        waypoint_namespaces(&state, &me).into_iter().collect()
    }

    #[test]
    fn namespaces_a_waypoint_needs() {
        let bind = "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: edge";
        let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
            (
                "nothing bound: its own namespace",
                vec![ns("edge", ""), ns("other", "")],
                vec!["edge"],
            ),
            (
                "a namespace labelled to use it",
                vec![ns("edge", ""), ns("app", bind), ns("other", "")],
                vec!["app", "edge"],
            ),
            (
                "a namespace naming another waypoint is not",
                vec![ns("edge", ""), ns("app", "istio.io/use-waypoint: wp")],
                vec!["edge"],
            ),
            (
                "a service bound by its own label",
                vec![
                    ns("edge", ""),
                    ns("app", ""),
                    svc("a", "app", "10.96.0.1", bind),
                    svc("b", "other", "10.96.0.2", ""),
                ],
                vec!["app", "edge"],
            ),
            (
                "a bound service's route backend in a third namespace",
                vec![
                    ns("edge", ""),
                    svc("a", "app", "10.96.0.1", bind),
                    svc("c", "backend", "10.96.0.3", ""),
                    svc("d", "unrelated", "10.96.0.4", ""),
                    route("app", "a", "c", "backend"),
                ],
                vec!["app", "backend", "edge"],
            ),
            (
                "routes of services not bound to it do not count",
                vec![
                    ns("edge", ""),
                    svc("a", "app", "10.96.0.1", ""),
                    svc("c", "backend", "10.96.0.3", ""),
                    route("app", "a", "c", "backend"),
                ],
                vec!["edge"],
            ),
            (
                "a service opting out of its namespace's waypoint still leaves the namespace in",
                vec![
                    ns("app", bind),
                    svc("a", "app", "10.96.0.1", "istio.io/use-waypoint: none"),
                ],
                vec!["app", "edge"],
            ),
        ];
        for (what, docs, want) in cases {
            assert_eq!(scope(&docs), want, "{what}");
        }
    }
}
