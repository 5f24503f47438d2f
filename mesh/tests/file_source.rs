//! The file source applies edits document by document: every edit must
//! leave exactly the state a whole parse of the new text gives, and a
//! refused edit must leave nothing of itself behind.

use mesh::FileSource;

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n";

fn pod(name: &str, ip: u8, app: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: {app}}}}}\nspec: {{nodeName: n}}\nstatus: {{podIP: 10.0.0.{ip}}}\n")
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {clusterIP: 10.96.0.1, selector: {app: x}, ports: [{port: 80}]}\n";

fn file(docs: &[&str]) -> String {
    docs.iter().map(|d| format!("---\n{d}")).collect()
}

fn dump(s: &mesh::MeshState) -> serde_json::Value {
    serde_json::to_value(s).unwrap()
}

fn whole(text: &str) -> serde_json::Value {
    dump(&mesh::standalone::parse(text, "cluster.local").unwrap())
}

#[test]
fn each_edit_equals_a_whole_parse_and_a_refused_edit_leaves_nothing() {
    let mut src = FileSource::new(std::path::Path::new("t.yaml"), "cluster.local");
    let (p1, p2) = (pod("p1", 1, "x"), pod("p2", 2, "x"));
    let v1 = file(&[NS, &p1, &p2, SVC]);
    assert_eq!(dump(&src.apply(&v1).unwrap()), whole(&v1));

    // p2 leaves the service; a bad document in the same edit refuses it all.
    let p2_moved = pod("p2", 2, "y");
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: a}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n";
    let err = src
        .apply(&file(&[NS, &p1, &p2_moved, SVC, bad]))
        .unwrap_err();
    assert_eq!(err.object, "Service a/broken");
    assert_eq!(err.field, "spec.clusterIP");

    // The same edit without the bad document: p2's change must apply even
    // though its text was seen (and translated) by the refused edit.
    let v2 = file(&[NS, &p1, &p2_moved, SVC]);
    let s2 = src.apply(&v2).unwrap();
    assert_eq!(dump(&s2), whole(&v2));
    let svc = s2.service_by_host("s.a.svc.cluster.local").unwrap();
    assert_eq!(svc.endpoints.len(), 1, "only p1 backs the service now");

    // A rename removes the old object; a removed document its object.
    let v3 = file(&[NS, &pod("p1-renamed", 1, "x"), SVC]);
    let s3 = src.apply(&v3).unwrap();
    assert_eq!(dump(&s3), whole(&v3));
    assert!(s3.workload_by_name("a", "p1").is_none());
    assert!(s3.workload_by_name("a", "p2").is_none());

    // The same document twice, or two objects on one address, are refused.
    let twice = src.apply(&file(&[NS, SVC, SVC])).unwrap_err();
    assert_eq!(
        (twice.object.as_str(), twice.message.as_str()),
        ("Service a/s", "defined twice")
    );
    let clash = src
        .apply(&file(&[NS, &pod("q", 9, "x"), &pod("r", 9, "x")]))
        .unwrap_err();
    assert_eq!(clash.field, "status.podIP");
    assert!(
        clash.message.contains("already used by Pod a/q"),
        "{}",
        clash.message
    );
    // Two pods with one uid, or a uid another pod is known by by default.
    let with_uid = |name: &str, ip: u8, uid: &str| {
        pod(name, ip, "x").replace("labels:", &format!("uid: \"{uid}\", labels:"))
    };
    let dup = src
        .apply(&file(&[
            NS,
            &with_uid("q", 7, "u1"),
            &with_uid("r", 8, "u1"),
        ]))
        .unwrap_err();
    assert_eq!(
        (dup.object.as_str(), dup.field.as_str()),
        ("Pod a/r", "metadata.uid")
    );
    let shadow = src
        .apply(&file(&[NS, &pod("q", 7, "x"), &with_uid("r", 8, "a/q")]))
        .unwrap_err();
    assert_eq!(
        (shadow.object.as_str(), shadow.field.as_str()),
        ("Pod a/r", "metadata.uid")
    );
    // And after every refusal the last good text still applies as it was.
    assert_eq!(dump(&src.apply(&v3).unwrap()), whole(&v3));
}

#[test]
fn documents_split_where_yaml_does() {
    // A marker with content on its line, comments, a leading marker and an
    // empty trailing document.
    let text = format!(
        "# comment\n--- {{apiVersion: v1, kind: Namespace, metadata: {{name: b}}}}\n---\n{}---\n",
        pod("p", 3, "x")
    );
    let s = mesh::standalone::parse(&text, "cluster.local").unwrap();
    assert_eq!(s.workloads.len(), 1);
    assert!(s.namespace_labels.contains_key("b"));
    let e = mesh::standalone::parse("---\nkind: Pod\n", "cluster.local").unwrap_err();
    assert_eq!(
        (e.object.as_str(), e.field.as_str()),
        ("document 1", "apiVersion")
    );
}
