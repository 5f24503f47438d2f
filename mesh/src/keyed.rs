//! A list the data path looks up by key (routes by host, policies by
//! namespace): the list in its order, plus where each key's entries are, so
//! a request reads the entries for its key, not every entry.

use std::collections::HashMap;
use std::ops::Deref;

use serde::Serialize;

#[derive(Debug)]
pub struct Keyed<T> {
    list: Vec<T>,
    index: HashMap<String, Vec<usize>>,
}

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed {
            list: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T> Keyed<T> {
    /// Indexes `list` under the keys `keys` gives each entry.
    pub fn new(list: Vec<T>, keys: impl Fn(&T) -> Vec<String>) -> Self {
        let mut index: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, t) in list.iter().enumerate() {
            for k in keys(t) {
                let at = index.entry(k).or_default();
                // An entry naming a key twice is listed once.
                if at.last() != Some(&i) {
                    at.push(i);
                }
            }
        }
        Keyed { list, index }
    }

    /// The entries under `key`, in list order.
    pub fn get<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a T> + 'a {
        self.index
            .get(key)
            .into_iter()
            .flatten()
            .map(|i| &self.list[*i])
    }
}

impl<T> Deref for Keyed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.list
    }
}

impl<T: Serialize> Serialize for Keyed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_by_key_in_list_order() {
        let k = Keyed::new(
            vec![
                ("a", vec!["x", "y"]),
                ("b", vec!["y"]),
                ("c", vec!["x", "x"]),
            ],
            |t| t.1.iter().map(|s| s.to_string()).collect(),
        );
        let names = |key| k.get(key).map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(names("x"), ["a", "c"]);
        assert_eq!(names("y"), ["a", "b"]);
        assert!(names("z").is_empty());
        assert_eq!(k.len(), 3);
    }
}
