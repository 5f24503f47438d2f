//! Strings that repeat across many workloads — namespace, service account,
//! trust domain, node, canonical name and revision — kept once and shared:
//! at 10k pods in 100 namespaces an owned copy of each per workload is six
//! heap blocks per pod for perhaps a few thousand distinct values.

use std::collections::HashSet;
use std::sync::Arc;

/// A shared immutable string.
pub type Str = Arc<str>;

/// A pool of shared strings. Values no workload holds any more are dropped
/// when the pool has doubled since it was last pruned, so churn through
/// short-lived values (pod-named canonical names) does not grow it for ever.
#[derive(Debug)]
pub struct Interner {
    set: HashSet<Str>,
    prune_at: usize,
}

const MIN_PRUNE: usize = 1024;

impl Default for Interner {
    fn default() -> Self {
        Interner {
            set: HashSet::new(),
            prune_at: MIN_PRUNE,
        }
    }
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Str {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= self.prune_at {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.prune_at = (self.set.len() * 2).max(MIN_PRUNE);
        }
        let a: Str = Arc::from(s);
        self.set.insert(a.clone());
        a
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_prunes() {
        let mut i = Interner::default();
        let a = i.get("ns");
        assert!(Arc::ptr_eq(&a, &i.get("ns")), "one copy per value");
        // Values nobody holds go once the pool has doubled.
        for n in 0..MIN_PRUNE * 3 {
            let _ = i.get(&format!("short-lived-{n}"));
        }
        assert!(i.len() < MIN_PRUNE * 2 + 1, "{}", i.len());
        assert!(
            Arc::ptr_eq(&a, &i.get("ns")),
            "a held value survives pruning"
        );
    }
}
