//! The Kubernetes source's translator: watch events in, objects of the
//! incremental translator updated, a state published after each burst.
//! Runs on a thread of its own (translation is CPU work).

use std::collections::{BTreeMap, HashSet};
use std::sync::{mpsc, Arc};

use kube::api::DynamicObject;
use kube::core::ApiResource;
use mesh::objects::{ObjectKey, Objects};
use mesh::MeshStore;
use serde_json::Value;

use crate::Dropped;

/// What a watch task tells the translator.
pub(crate) enum Change {
    Apply(ApiResource, DynamicObject),
    Delete(ApiResource, DynamicObject),
    /// The kind is being listed again: what the list does not name is gone.
    Relist(String),
    Listed(String),
    /// Every kind has listed once (or is not served).
    Synced,
}

/// Applies changes as they come and publishes after each burst: what is
/// queued is drained first, so a relist of thousands of objects lands as a
/// few states, and a single change as one.
pub(crate) fn translate_loop(
    rx: mpsc::Receiver<Change>,
    trust_domain: String,
    dropped: Dropped,
    first: tokio::sync::oneshot::Sender<Arc<MeshStore>>,
) {
    let mut t = Translator::new(&trust_domain, dropped);
    let mut store: Option<Arc<MeshStore>> = None;
    let mut first = Some(first);
    let mut synced = false;
    while let Ok(c) = rx.recv() {
        let mut next = Some(c);
        while let Some(c) = next.take() {
            synced |= matches!(c, Change::Synced);
            t.apply(c);
            next = rx.try_recv().ok();
        }
        if !synced {
            continue;
        }
        let state = t.objects.publish();
        match &store {
            Some(s) => s.replace(state),
            None => {
                tracing::info!(
                    workloads = state.workloads.len(),
                    services = state.services.len(),
                    "cluster view complete"
                );
                let s = MeshStore::new(state, "kubernetes");
                if let Some(f) = first.take() {
                    let _ = f.send(s.clone());
                }
                store = Some(s);
            }
        }
    }
}

struct Translator {
    objects: Objects,
    /// Per kind being relisted: the keys listed so far.
    relisting: BTreeMap<String, HashSet<ObjectKey>>,
    left_out: BTreeMap<ObjectKey, mesh::Rejected>,
    dropped: Dropped,
}

impl Translator {
    fn new(trust_domain: &str, dropped: Dropped) -> Self {
        Translator {
            objects: Objects::new(trust_domain),
            relisting: BTreeMap::new(),
            left_out: BTreeMap::new(),
            dropped,
        }
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Apply(ar, o) => {
                let key = key_of(&ar, &o);
                if let Some(seen) = self.relisting.get_mut(&ar.kind) {
                    seen.insert(key.clone());
                }
                self.upsert(key, &ar, &o);
            }
            Change::Delete(ar, o) => {
                let key = key_of(&ar, &o);
                self.objects.remove(&key);
                self.set_left_out(&key, None);
            }
            Change::Relist(kind) => {
                self.relisting.insert(kind, HashSet::new());
            }
            Change::Listed(kind) => {
                let Some(seen) = self.relisting.remove(&kind) else {
                    return;
                };
                let gone: Vec<_> = self
                    .objects
                    .keys()
                    .into_iter()
                    .chain(self.left_out.keys().cloned())
                    .filter(|k| k.kind == kind && !seen.contains(k))
                    .collect();
                for k in gone {
                    self.objects.remove(&k);
                    self.set_left_out(&k, None);
                }
            }
            Change::Synced => {}
        }
    }

    fn upsert(&mut self, key: ObjectKey, ar: &ApiResource, o: &DynamicObject) {
        // An object the mesh does not hold (a finished pod, a headless
        // service) is as good as deleted.
        let Some(v) = clean(ar, o) else {
            self.objects.remove(&key);
            self.set_left_out(&key, None);
            return;
        };
        let value = serde_yaml::to_value(&v).expect("JSON values convert to YAML values");
        match mesh::standalone::translate(value, &key.to_string()) {
            Ok(Some(t)) if t.key == key => {
                self.objects.upsert(t);
                self.set_left_out(&key, None);
            }
            Ok(_) => unreachable!("an object with a kind and name translates under its key"),
            Err(e) => {
                self.objects.remove(&key);
                self.set_left_out(
                    &key,
                    Some(mesh::Rejected {
                        kind: key.kind.clone(),
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        field: e.field,
                        reason: e.message,
                        effect: "left out of the mesh config".into(),
                    }),
                );
            }
        }
    }

    fn set_left_out(&mut self, key: &ObjectKey, r: Option<mesh::Rejected>) {
        let changed = match r {
            Some(r) => self.left_out.insert(key.clone(), r.clone()).as_ref() != Some(&r),
            None => self.left_out.remove(key).is_some(),
        };
        if changed {
            let now: Vec<_> = self.left_out.values().cloned().collect();
            let mut d = self.dropped.lock().unwrap();
            mesh::report_rejected(&d, &now);
            *d = now;
        }
    }
}

fn key_of(ar: &ApiResource, o: &DynamicObject) -> ObjectKey {
    ObjectKey {
        kind: ar.kind.clone(),
        namespace: if ar.kind == "Namespace" {
            String::new()
        } else {
            o.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into())
        },
        name: o.metadata.name.clone().unwrap_or_default(),
    }
}

/// What the translator reads of an object: identity, labels, annotations,
/// spec, and for pods the address the kubelet reported. Finished pods are not
/// part of the mesh.
fn clean(ar: &ApiResource, obj: &DynamicObject) -> Option<Value> {
    let m = &obj.metadata;
    let mut meta = serde_json::Map::new();
    meta.insert("name".into(), m.name.clone()?.into());
    if let Some(ns) = &m.namespace {
        meta.insert("namespace".into(), ns.clone().into());
    }
    if let Some(uid) = &m.uid {
        meta.insert("uid".into(), uid.clone().into());
    }
    for (k, v) in [("labels", &m.labels), ("annotations", &m.annotations)] {
        if let Some(v) = v {
            let v: BTreeMap<_, _> = v
                .iter()
                .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/"))
                .collect();
            meta.insert(k.into(), serde_json::to_value(v).unwrap());
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("apiVersion".into(), ar.api_version.clone().into());
    out.insert("kind".into(), ar.kind.clone().into());
    out.insert("metadata".into(), Value::Object(meta));
    if let Some(spec) = obj.data.get("spec") {
        out.insert("spec".into(), spec.clone());
    }
    if ar.kind == "Pod" {
        let status = obj.data.get("status");
        let phase = status
            .and_then(|s| s.get("phase"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        // Unscheduled pods belong to no node yet.
        let spec = obj.data.get("spec")?;
        spec.get("nodeName")?;
        // A host-network pod shares its node's address and is never
        // captured: it is no workload of the mesh (as istiod decides).
        if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        // A scheduled pod without an IP is still rendered (`status: {}`): its
        // CNI ADD, which gives it the IP, is where capture is decided.
        let ip = status
            .and_then(|s| s.get("podIP"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let status = if ip.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::json!({ "podIP": ip })
        };
        out.insert("status".into(), status);
    }
    if ar.kind == "Service" {
        // Headless and ExternalName services have no VIP for ztunnel to match.
        let ip = obj
            .data
            .get("spec")?
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ip.is_empty() || ip == "None" {
            return None;
        }
    }
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::GroupVersionKind;

    fn ar(group: &str, version: &str, kind: &str) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
    }

    fn pod(name: &str, ip: &str, extra: Value) -> DynamicObject {
        let mut spec = serde_json::json!({"nodeName": "n1"});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        DynamicObject::new(name, &ar("", "v1", "Pod"))
            .within("a")
            .data(serde_json::json!({"spec": spec, "status": {"podIP": ip, "phase": "Running"}}))
    }

    fn ns() -> DynamicObject {
        DynamicObject::new("a", &ar("", "v1", "Namespace")).data(serde_json::json!({}))
    }

    fn apply(t: &mut Translator, o: DynamicObject) {
        let kind = o.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
        let r = match kind.as_str() {
            "Pod" => ar("", "v1", "Pod"),
            "Namespace" => ar("", "v1", "Namespace"),
            _ => ar("", "v1", "Service"),
        };
        t.apply(Change::Apply(r, o));
    }

    #[test]
    fn events_relists_and_bad_objects() {
        let dropped = Dropped::default();
        let mut t = Translator::new("cluster.local", dropped.clone());
        apply(&mut t, ns());
        apply(&mut t, pod("p1", "10.0.0.1", Value::Null));
        apply(&mut t, pod("p2", "10.0.0.2", Value::Null));
        // Host-network pods are no workloads; a bad address is left out
        // alone, reported by name, and the rest stays.
        apply(
            &mut t,
            pod("host", "10.0.0.9", serde_json::json!({"hostNetwork": true})),
        );
        apply(&mut t, pod("bad", "not-an-ip", Value::Null));
        let s = t.objects.publish();
        assert_eq!(s.workloads.len(), 2);
        let d = dropped.lock().unwrap().clone();
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].name.as_str(), d[0].field.as_str()),
            ("bad", "status.podIP")
        );

        // Fixed: no longer reported.
        apply(&mut t, pod("bad", "10.0.0.3", Value::Null));
        assert!(dropped.lock().unwrap().is_empty());
        assert_eq!(t.objects.publish().workloads.len(), 3);

        // A relist that no longer names p2 (or the once-bad pod) removes them.
        t.apply(Change::Relist("Pod".into()));
        apply(&mut t, pod("p1", "10.0.0.1", Value::Null));
        t.apply(Change::Listed("Pod".into()));
        let s = t.objects.publish();
        let names: Vec<_> = s.workloads.values().map(|w| w.name.clone()).collect();
        assert_eq!(names, ["p1"]);

        // A delete, and a finished pod, are both gone.
        t.apply(Change::Delete(
            ar("", "v1", "Pod"),
            pod("p1", "10.0.0.1", Value::Null),
        ));
        let mut done = pod("p4", "10.0.0.4", Value::Null);
        done.data["status"]["phase"] = "Succeeded".into();
        apply(&mut t, done);
        assert!(t.objects.publish().workloads.is_empty());
        assert!(dropped.lock().unwrap().is_empty());
    }
}
