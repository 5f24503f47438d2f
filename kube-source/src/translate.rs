//! The Kubernetes source's translator: watch events in, objects of the
//! incremental translator updated, a state published after each burst.
//! Runs on a thread of its own (translation is CPU work).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{mpsc, Arc};

use kube::api::DynamicObject;
use kube::core::ApiResource;
use mesh::objects::{ObjectKey, Objects};
use mesh::MeshStore;
use serde_json::Value;

use crate::Dropped;

/// Which watch an event came from: a relist is complete for its watch only,
/// and a pod two watches see stays while either still holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Watch {
    /// Every object of a kind (for pods: all, or one node's).
    Kind(String),
    /// One namespace's pods (a waypoint's view).
    PodsIn(String),
    /// Pods anywhere that carry a waypoint label of their own.
    BoundPods,
}

/// What a watch task tells the translator.
pub(crate) enum Change {
    Apply(Watch, ApiResource, DynamicObject),
    Delete(Watch, ApiResource, DynamicObject),
    /// The watch is listing again: what the list does not name is gone.
    Relist(Watch),
    Listed(Watch),
    /// Every watch has listed once (or its kind is not served).
    Synced,
}

/// A waypoint's pod scope: the translator decides the namespaces from what
/// it sees bound, and the watches follow `tx`.
pub(crate) struct Scope {
    pub me: mesh::routes::WaypointRef,
    pub tx: tokio::sync::watch::Sender<BTreeSet<String>>,
}

/// Applies changes as they come and publishes after each burst: what is
/// queued is drained first, so a relist of thousands of objects lands as a
/// few states, and a single change as one.
pub(crate) fn translate_loop(
    rx: mpsc::Receiver<Change>,
    trust_domain: String,
    dropped: Dropped,
    first: tokio::sync::oneshot::Sender<Arc<MeshStore>>,
    scope: Option<Scope>,
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
        // Nothing to publish (a Node's heartbeat): readers keep their state
        // and live connections are not judged again for nothing.
        if store.is_some() && !t.objects.changed() {
            continue;
        }
        let mut state = t.objects.publish();
        if let Some(sc) = &scope {
            let want = mesh::scope::waypoint_namespaces(&state, &sc.me);
            if t.pod_namespaces.as_ref() != Some(&want) {
                if t.set_pod_namespaces(want.clone()) {
                    state = t.objects.publish();
                }
                sc.tx.send_replace(want);
            }
            // The first view waits for the pods of what it serves: without
            // them every bound service would have no endpoints.
            if store.is_none() && !t.unlisted.is_empty() {
                continue;
            }
        }
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
    /// Per watch being relisted: the keys listed so far.
    relisting: BTreeMap<Watch, HashSet<ObjectKey>>,
    left_out: BTreeMap<ObjectKey, mesh::Rejected>,
    dropped: Dropped,
    /// The pods the `BoundPods` watch holds (a namespace watch may hold
    /// them too).
    bound_pods: HashSet<ObjectKey>,
    /// A waypoint's pod namespaces; None when pods are not scoped so.
    pod_namespaces: Option<BTreeSet<String>>,
    /// Namespaces of `pod_namespaces` whose pods have not listed yet.
    unlisted: BTreeSet<String>,
}

impl Translator {
    fn new(trust_domain: &str, dropped: Dropped) -> Self {
        Translator {
            objects: Objects::new(trust_domain),
            relisting: BTreeMap::new(),
            left_out: BTreeMap::new(),
            dropped,
            bound_pods: HashSet::new(),
            pod_namespaces: None,
            unlisted: BTreeSet::new(),
        }
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Apply(w, ar, o) if self.current(&w) => {
                let key = key_of(&ar, &o);
                if let Some(seen) = self.relisting.get_mut(&w) {
                    seen.insert(key.clone());
                }
                if w == Watch::BoundPods {
                    self.bound_pods.insert(key.clone());
                }
                self.upsert(key, &ar, &o);
            }
            Change::Delete(w, ar, o) if self.current(&w) => self.release(&w, &key_of(&ar, &o)),
            Change::Relist(w) if self.current(&w) => {
                self.relisting.insert(w, HashSet::new());
            }
            Change::Listed(w) if self.current(&w) => {
                if let Watch::PodsIn(ns) = &w {
                    self.unlisted.remove(ns);
                }
                let Some(seen) = self.relisting.remove(&w) else {
                    return;
                };
                let gone: Vec<_> = self
                    .keys_of(&w)
                    .into_iter()
                    .filter(|k| !seen.contains(k))
                    .collect();
                for k in gone {
                    self.release(&w, &k);
                }
            }
            // Events of a namespace watch stopped since they were queued.
            Change::Apply(..) | Change::Delete(..) | Change::Relist(_) | Change::Listed(_) => {}
            Change::Synced => {}
        }
    }

    /// Whether `w` is still a watch of ours: a namespace left out of a
    /// waypoint's scope may still have events queued.
    fn current(&self, w: &Watch) -> bool {
        match w {
            Watch::PodsIn(ns) => self.pod_namespaces.as_ref().is_some_and(|s| s.contains(ns)),
            _ => true,
        }
    }

    /// The keys `w` holds now.
    fn keys_of(&self, w: &Watch) -> Vec<ObjectKey> {
        if *w == Watch::BoundPods {
            return self.bound_pods.iter().cloned().collect();
        }
        self.objects
            .keys()
            .into_iter()
            .chain(self.left_out.keys().cloned())
            .filter(|k| match w {
                Watch::Kind(kind) => k.kind == *kind,
                Watch::PodsIn(ns) => k.kind == "Pod" && k.namespace == *ns,
                Watch::BoundPods => unreachable!(),
            })
            .collect()
    }

    /// `w` no longer holds `key`: it is gone unless the other watch that
    /// may see it still does.
    fn release(&mut self, w: &Watch, key: &ObjectKey) {
        let held_elsewhere = match w {
            Watch::Kind(_) => false,
            Watch::PodsIn(_) => self.bound_pods.contains(key),
            Watch::BoundPods => {
                self.bound_pods.remove(key);
                self.current(&Watch::PodsIn(key.namespace.clone()))
            }
        };
        if !held_elsewhere {
            self.objects.remove(key);
            self.set_left_out(key, None);
        }
    }

    /// Sets a waypoint's pod namespaces; the pods of a namespace that left
    /// are released at once. True when some were.
    fn set_pod_namespaces(&mut self, want: BTreeSet<String>) -> bool {
        let old = self
            .pod_namespaces
            .replace(want.clone())
            .unwrap_or_default();
        let mut released = false;
        for ns in old.difference(&want) {
            let w = Watch::PodsIn(ns.clone());
            self.relisting.remove(&w);
            self.unlisted.remove(ns);
            for k in self.keys_of(&w) {
                released = true;
                self.release(&w, &k);
            }
        }
        self.unlisted.extend(want.difference(&old).cloned());
        released
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
        namespace: if ar.kind == "Namespace" || ar.kind == "Node" {
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
    // A pod's controller names its workload in telemetry (`mesh::owner`);
    // the other owner references are not read.
    if let Some(owner) = m
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
    {
        meta.insert(
            "ownerReferences".into(),
            serde_json::json!([{ "kind": owner.kind, "name": owner.name, "controller": true }]),
        );
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
    // A node says where it is by its labels; its spec and status (updated
    // every few seconds) are not read.
    if ar.kind == "Node" {
        return Some(Value::Object(out));
    }
    if let Some(spec) = obj.data.get("spec") {
        out.insert("spec".into(), spec.clone());
    }
    // meshConfig (the `istio` ConfigMap) lives in `data`.
    if ar.kind == "ConfigMap" {
        if let Some(data) = obj.data.get("data") {
            out.insert("data".into(), data.clone());
        }
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
        // Ready as istiod judges it: the Ready condition, and not being
        // deleted (a terminating pod takes no new connections).
        let ready = m.deletion_timestamp.is_none()
            && status
                .and_then(|s| s.get("conditions"))
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                })
                .is_none_or(|c| c.get("status").and_then(Value::as_str) == Some("True"));
        let conditions = serde_json::json!([{
            "type": "Ready",
            "status": if ready { "True" } else { "False" },
        }]);
        let status = if ip.is_empty() {
            serde_json::json!({ "conditions": conditions })
        } else {
            // A dual-stack pod's addresses of both families, podIP first;
            // its conditions say whether it is ready.
            match status.and_then(|s| s.get("podIPs")) {
                Some(ips) => {
                    serde_json::json!({ "podIP": ip, "podIPs": ips, "conditions": conditions })
                }
                None => serde_json::json!({ "podIP": ip, "conditions": conditions }),
            }
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
            "Node" => ar("", "v1", "Node"),
            _ => ar("", "v1", "Service"),
        };
        t.apply(Change::Apply(Watch::Kind(r.kind.clone()), r, o));
    }

    /// A dual-stack cluster's pod (status.podIPs) and Service (clusterIPs,
    /// ipFamilies, ipFamilyPolicy as the API server fills them) keep both
    /// families through the translator.
    #[test]
    fn dual_stack_pod_and_service() {
        let mut t = Translator::new("cluster.local", Dropped::default());
        apply(&mut t, ns());
        let mut p = pod("p", "10.0.0.1", serde_json::json!({}));
        p.data["status"]["podIPs"] = serde_json::json!([{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]);
        p.metadata.labels = Some([("app".to_string(), "p".to_string())].into());
        apply(&mut t, p);
        let svc = DynamicObject::new("s", &ar("", "v1", "Service"))
            .within("a")
            .data(serde_json::json!({"spec": {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1", "fd00:96::1"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "selector": {"app": "p"},
                "ports": [{"port": 80, "protocol": "TCP"}],
                "type": "ClusterIP",
            }}));
        apply(&mut t, svc);
        let s = t.objects.publish();
        let w = s.workload_by_ip("fd00::1".parse().unwrap()).unwrap();
        assert_eq!(w.ip, "10.0.0.1".parse::<std::net::IpAddr>().unwrap());
        let svc = s.service_by_vip("fd00:96::1".parse().unwrap()).unwrap();
        assert_eq!(svc.vips.len(), 2);
        assert_eq!(s.endpoints_for(svc, 80).len(), 1);
    }

    #[test]
    fn node_labels_and_readiness() {
        let mut t = Translator::new("cluster.local", Dropped::default());
        apply(&mut t, ns());
        let node = |zone: &str| {
            let mut n = DynamicObject::new("n1", &ar("", "v1", "Node"))
                .data(serde_json::json!({"spec": {"podCIDR": "10.0.0.0/24"}, "status": {}}));
            n.metadata.labels = Some([(mesh::locality::ZONE_LABEL.into(), zone.into())].into());
            n
        };
        apply(&mut t, pod("p1", "10.0.0.1", Value::Null));
        apply(&mut t, node("za"));
        let mut unready = pod("p2", "10.0.0.2", Value::Null);
        unready.data["status"]["conditions"] =
            serde_json::json!([{"type": "Ready", "status": "False"}]);
        apply(&mut t, unready);
        let s = t.objects.publish();
        let w = |s: &mesh::MeshState, n: &str| {
            s.workloads.values().find(|w| w.name == n).unwrap().clone()
        };
        // A pod that came before its node learns the node's zone.
        assert_eq!(w(&s, "p1").locality.as_ref().unwrap().zone, "za");
        assert!(w(&s, "p1").healthy && !w(&s, "p2").healthy);
        // A status update of the node (same labels) changes nothing: no
        // state to publish.
        apply(&mut t, node("za"));
        assert!(!t.objects.changed());
        apply(&mut t, node("zb"));
        assert!(t.objects.changed());
        let s = t.objects.publish();
        assert_eq!(w(&s, "p2").locality.as_ref().unwrap().zone, "zb");
        t.apply(Change::Delete(
            Watch::Kind("Node".into()),
            ar("", "v1", "Node"),
            node("zb"),
        ));
        assert!(w(&t.objects.publish(), "p1").locality.is_none());
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
        t.apply(Change::Relist(Watch::Kind("Pod".into())));
        apply(&mut t, pod("p1", "10.0.0.1", Value::Null));
        t.apply(Change::Listed(Watch::Kind("Pod".into())));
        let s = t.objects.publish();
        let names: Vec<_> = s.workloads.values().map(|w| w.name.clone()).collect();
        assert_eq!(names, ["p1"]);

        // A delete, and a finished pod, are both gone.
        t.apply(Change::Delete(
            Watch::Kind("Pod".into()),
            ar("", "v1", "Pod"),
            pod("p1", "10.0.0.1", Value::Null),
        ));
        let mut done = pod("p4", "10.0.0.4", Value::Null);
        done.data["status"]["phase"] = "Succeeded".into();
        apply(&mut t, done);
        assert!(t.objects.publish().workloads.is_empty());
        assert!(dropped.lock().unwrap().is_empty());
    }

    #[test]
    fn a_pods_controller_names_its_workload() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut t = Translator::new("cluster.local", Dropped::default());
        apply(&mut t, ns());
        let mut p = pod("web-5d9c7b-x2x", "10.0.0.1", Value::Null);
        p.metadata.labels = Some([("pod-template-hash".to_string(), "5d9c7b".to_string())].into());
        let owner = |kind: &str, name: &str, controller| OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            controller,
            ..Default::default()
        };
        // Only the controller counts, wherever it is in the list.
        p.metadata.owner_references = Some(vec![
            owner("ConfigMap", "other", None),
            owner("ReplicaSet", "frontend-5d9c7b", Some(true)),
        ]);
        apply(&mut t, p);
        let s = t.objects.publish();
        let w = s.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(&*w.workload_name, "frontend");
        assert_eq!(w.workload_kind, mesh::owner::WorkloadKind::Deployment);
    }

    #[test]
    fn a_waypoints_pod_watches() {
        let mut t = Translator::new("cluster.local", Dropped::default());
        let pods = ar("", "v1", "Pod");
        let in_ns = |name: &str, ns: &str, ip: &str| {
            let mut p = pod(name, ip, Value::Null);
            p.metadata.namespace = Some(ns.into());
            p
        };
        let names = |t: &mut Translator| {
            let s = t.objects.publish();
            let mut n: Vec<_> = s.workloads.values().map(|w| w.name.clone()).collect();
            n.sort();
            n
        };
        let a = Watch::PodsIn("a".into());
        assert!(!t.set_pod_namespaces(BTreeSet::from(["a".to_string()])));
        assert_eq!(t.unlisted, BTreeSet::from(["a".to_string()]));
        t.apply(Change::Relist(a.clone()));
        t.apply(Change::Apply(
            a.clone(),
            pods.clone(),
            in_ns("p1", "a", "10.0.0.1"),
        ));
        t.apply(Change::Apply(
            a.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));
        t.apply(Change::Listed(a.clone()));
        assert!(t.unlisted.is_empty(), "the namespace has listed");
        // The label watch sees a pod of a namespace not in scope, and one
        // the namespace watch holds too.
        let b = Watch::BoundPods;
        t.apply(Change::Apply(
            b.clone(),
            pods.clone(),
            in_ns("x", "far", "10.0.0.3"),
        ));
        t.apply(Change::Apply(
            b.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));
        assert_eq!(names(&mut t), ["both", "p1", "x"]);

        // Its label removed, a pod the namespace watch holds stays.
        t.apply(Change::Delete(
            b.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));
        assert_eq!(names(&mut t), ["both", "p1", "x"]);
        t.apply(Change::Apply(
            b.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));

        // The namespace leaves the scope: its pods go at once, but for the
        // one the label watch holds; its queued events are ignored.
        assert!(t.set_pod_namespaces(BTreeSet::new()));
        assert_eq!(names(&mut t), ["both", "x"]);
        t.apply(Change::Apply(
            a.clone(),
            pods.clone(),
            in_ns("late", "a", "10.0.0.4"),
        ));
        assert_eq!(names(&mut t), ["both", "x"]);

        // A relist of the label watch that no longer names x removes it;
        // "both" is out of every namespace watch now, so it goes with its label.
        t.apply(Change::Relist(b.clone()));
        t.apply(Change::Apply(
            b.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));
        t.apply(Change::Listed(b.clone()));
        assert_eq!(names(&mut t), ["both"]);
        t.apply(Change::Delete(
            b.clone(),
            pods.clone(),
            in_ns("both", "a", "10.0.0.2"),
        ));
        assert!(names(&mut t).is_empty());
        assert!(t.bound_pods.is_empty());
    }
}
