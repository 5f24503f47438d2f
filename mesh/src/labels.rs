//! Labels and annotations as a workload carries them: a sorted vector, not
//! a B-tree map. Pods carry a handful of labels and there are tens of
//! thousands of pods; a B-tree leaf costs ~540 bytes even for one entry,
//! this costs its entries.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelMap(Box<[(String, String)]>);

impl LabelMap {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Either shape of labels, for code that reads both (a pod's and its
/// namespace's).
pub trait Lookup {
    fn label(&self, key: &str) -> Option<&String>;
}

impl Lookup for LabelMap {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl Lookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl From<BTreeMap<String, String>> for LabelMap {
    fn from(m: BTreeMap<String, String>) -> Self {
        // A B-tree map iterates in key order: already sorted, no duplicates.
        LabelMap(m.into_iter().collect())
    }
}

impl FromIterator<(String, String)> for LabelMap {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let m: BTreeMap<String, String> = iter.into_iter().collect();
        m.into()
    }
}

impl Serialize for LabelMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_order() {
        let l: LabelMap = [("b", "2"), ("a", "1"), ("c", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(l.get("a").map(String::as_str), Some("1"));
        assert_eq!(l.get("c").map(String::as_str), Some("3"));
        assert!(l.get("d").is_none() && l.contains_key("b"));
        let keys: Vec<_> = l.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"a":"1","b":"2","c":"3"}"#
        );
    }
}
