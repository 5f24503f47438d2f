//! AuthorizationPolicies by where they can apply, so a new connection looks
//! only at those that may select its destination — O(its labels + the
//! candidates), not O(all policies): a namespace with 1,500 selector
//! policies costs a connection what the few that match it cost.

use std::collections::HashMap;
use std::sync::Arc;

use crate::authz::{AuthorizationPolicy, Scope};
use crate::model::Workload;

type Policies = Vec<Arc<AuthorizationPolicy>>;

#[derive(Default, Debug)]
pub struct PolicyIndex {
    global: Policies,
    /// Namespace-wide policies, by namespace.
    namespace: HashMap<String, Policies>,
    /// Selector policies by namespace, then by one of their labels (the
    /// first): a workload without that label cannot be selected.
    label: HashMap<String, HashMap<String, HashMap<String, Policies>>>,
    /// Policies istiod lists on workloads, by `<ns>/<name>`.
    listed: HashMap<String, Arc<AuthorizationPolicy>>,
}

impl PolicyIndex {
    pub fn new(policies: &[Arc<AuthorizationPolicy>]) -> Self {
        let mut ix = PolicyIndex::default();
        for p in policies {
            let ns = || p.namespace.clone();
            match &p.scope {
                Scope::Global => ix.global.push(p.clone()),
                Scope::WorkloadSelector(sel) if !sel.is_empty() => {
                    let (k, v) = sel.iter().next().expect("non-empty");
                    ix.label
                        .entry(ns())
                        .or_default()
                        .entry(k.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default()
                        .push(p.clone());
                }
                Scope::Namespace | Scope::WorkloadSelector(_) => {
                    ix.namespace.entry(ns()).or_default().push(p.clone())
                }
                Scope::Listed => {
                    ix.listed
                        .insert(format!("{}/{}", p.namespace, p.name), p.clone());
                }
            }
        }
        ix
    }

    /// Every policy that may select `w`, each once (callers still check
    /// `selects`).
    pub fn candidates<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        let namespace = self.namespace.get(&w.namespace).into_iter().flatten();
        let by_label = self.label.get(&w.namespace);
        let labelled = w.labels.iter().flat_map(move |(k, v)| {
            by_label
                .and_then(|l| l.get(k))
                .and_then(|vals| vals.get(v))
                .into_iter()
                .flatten()
        });
        let listed = w
            .authorization_policies
            .iter()
            .filter_map(|k| self.listed.get(k));
        self.global
            .iter()
            .chain(namespace)
            .chain(labelled)
            .chain(listed)
            .map(|p| &**p)
    }
}
