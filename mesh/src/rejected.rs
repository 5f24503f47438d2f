//! What a config source held that we could not translate as written. Every
//! such object is named here, with the field and what was done instead, so
//! an operator finds it in `/config_dump`, the log and a counter; nothing is
//! dropped silently.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Rejected {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The field path, e.g. `spec.rules[0].from[0].source.requestPrincipals`;
    /// empty when the whole object is at fault.
    pub field: String,
    pub reason: String,
    /// What applies instead: for security objects always something that
    /// allows less than the object would have (fail closed).
    pub effect: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {} ({})", self.reason, self.effect)
    }
}

/// Logs and counts the entries of `now` that `before` did not hold, so an
/// object is reported once when it appears, not on every later change.
pub fn report_new(before: &[Rejected], now: &[Rejected]) {
    for r in now.iter().filter(|r| !before.contains(r)) {
        tracing::warn!(kind = %r.kind, namespace = %r.namespace, name = %r.name, field = %r.field, reason = %r.reason, effect = %r.effect, "config object not translatable as written");
        metrics::counter!("mesh_config_rejected_objects_total", "kind" => r.kind.clone())
            .increment(1);
    }
}
