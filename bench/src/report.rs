//! The benches' results as JSON beside their tables: one line per table
//! row, `JSON {"bench": "...", ...}`, printed after the table, so a script
//! compares runs with `sed -n 's/^JSON //p' | jq`. A number that was not
//! measured (NaN) is `null`.

use serde_json::{Map, Value};

pub struct Row(Map<String, Value>);

impl Row {
    /// A row of `bench` (`waypoint`, `ztunnel`).
    pub fn new(bench: &str) -> Row {
        let mut m = Map::new();
        m.insert("bench".into(), bench.into());
        Row(m)
    }

    pub fn text(mut self, key: &str, value: &str) -> Row {
        self.0.insert(key.into(), value.into());
        self
    }

    pub fn num(mut self, key: &str, value: f64) -> Row {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(key.into(), v);
        self
    }

    pub fn emit(&self) {
        println!("JSON {}", Value::Object(self.0.clone()));
    }
}
