//! AuthorizationPolicies by where they can apply, so a new connection looks
//! only at those that may select its destination — O(its labels + the
//! candidates), not O(all policies): a namespace with 1,500 selector
//! policies costs a connection what the few that match it cost.
//!
//! Kept per namespace in a persistent map: a policy change rebuilds its own
//! namespace's part (`with_namespace`) and shares the rest, so its cost is
//! the policies of that namespace, not of the mesh.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::authz::{AuthorizationPolicy, Scope};
use crate::model::Workload;

type Policies = Vec<Arc<AuthorizationPolicy>>;

#[derive(Default, Debug, Clone)]
pub struct PolicyIndex {
    /// Mesh-wide policies (from the root namespace).
    global: Arc<Policies>,
    namespaces: imbl::HashMap<String, Arc<InNamespace>>,
}

/// One namespace's policies that apply within it.
#[derive(Default, Debug)]
struct InNamespace {
    /// Namespace-wide policies.
    wide: Policies,
    /// Selector policies by one of their labels (the first): a workload
    /// without that label cannot be selected.
    label: HashMap<String, HashMap<String, Policies>>,
    /// Policies istiod lists on workloads, by name.
    listed: HashMap<String, Arc<AuthorizationPolicy>>,
}

impl InNamespace {
    fn add(&mut self, p: &Arc<AuthorizationPolicy>) {
        match &p.scope {
            Scope::Global => {}
            Scope::WorkloadSelector(sel) if !sel.is_empty() => {
                let (k, v) = sel.iter().next().expect("non-empty");
                self.label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(p.clone());
            }
            Scope::Namespace | Scope::WorkloadSelector(_) => self.wide.push(p.clone()),
            Scope::Listed => {
                self.listed.insert(p.name.clone(), p.clone());
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.wide.is_empty() && self.label.is_empty() && self.listed.is_empty()
    }
}

impl PolicyIndex {
    pub fn new(policies: &[Arc<AuthorizationPolicy>]) -> Self {
        let mut global = Vec::new();
        let mut by_ns: HashMap<&str, InNamespace> = HashMap::new();
        for p in policies {
            if matches!(p.scope, Scope::Global) {
                global.push(p.clone());
            } else {
                by_ns.entry(&p.namespace).or_default().add(p);
            }
        }
        PolicyIndex {
            global: Arc::new(global),
            namespaces: by_ns
                .into_iter()
                .map(|(ns, ix)| (ns.to_string(), Arc::new(ix)))
                .collect(),
        }
    }

    /// This index with namespace `ns`'s part rebuilt from `in_ns` (every
    /// policy of that namespace) and, when `global` is given, the mesh-wide
    /// list replaced. Equal to `new` over the whole set.
    pub fn with_namespace(
        &self,
        ns: &str,
        in_ns: &[Arc<AuthorizationPolicy>],
        global: Option<Policies>,
    ) -> Self {
        let mut ix = InNamespace::default();
        for p in in_ns.iter().filter(|p| !matches!(p.scope, Scope::Global)) {
            ix.add(p);
        }
        let mut namespaces = self.namespaces.clone();
        if ix.is_empty() {
            namespaces.remove(ns);
        } else {
            namespaces.insert(ns.to_string(), Arc::new(ix));
        }
        PolicyIndex {
            global: global.map(Arc::new).unwrap_or_else(|| self.global.clone()),
            namespaces,
        }
    }

    /// The index for `policies`: built whole when `dirty` is None, else this
    /// one with only the changed namespaces' parts rebuilt (a policy change
    /// costs its namespace, not the mesh).
    pub fn updated(
        &self,
        policies: &[Arc<AuthorizationPolicy>],
        dirty: Option<BTreeSet<String>>,
    ) -> PolicyIndex {
        let Some(dirty) = dirty else {
            return PolicyIndex::new(policies);
        };
        let of = |keep: &dyn Fn(&AuthorizationPolicy) -> bool| -> Vec<_> {
            policies.iter().filter(|p| keep(p)).cloned().collect()
        };
        dirty.into_iter().fold(self.clone(), |ix, ns| {
            // Mesh-wide policies live in the root namespace.
            let global =
                (ns == crate::ROOT_NAMESPACE).then(|| of(&|p| matches!(p.scope, Scope::Global)));
            ix.with_namespace(&ns, &of(&|p| p.namespace == ns), global)
        })
    }

    /// Every policy that may select `w`, each once (callers still check
    /// `selects`).
    pub fn candidates<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        let own = self.namespaces.get(&*w.namespace);
        let wide = own.into_iter().flat_map(|ix| ix.wide.iter());
        let labelled = w.labels.iter().flat_map(move |(k, v)| {
            own.and_then(|ix| ix.label.get(k))
                .and_then(|vals| vals.get(v))
                .into_iter()
                .flatten()
        });
        let listed = w.authorization_policies.iter().filter_map(|k| {
            let (ns, name) = k.split_once('/')?;
            self.namespaces.get(ns)?.listed.get(name)
        });
        self.global
            .iter()
            .chain(wide)
            .chain(labelled)
            .chain(listed)
            .map(|p| &**p)
    }
}
