//! The Kubernetes-shaped sources: the standalone file (`mesh::FileSource`:
//! the file re-read whole, only changed documents translated again) and
//! Kubernetes watch events (each object cleaned to JSON, converted and
//! translated alone, then `mesh::objects::Objects`, as kube-source's
//! translator thread does, without the API server). Each size runs in a
//! child process (`scale-bench --objects-child N`), so RSS is its own.

use std::time::Duration;

use crate::gen;
use crate::sys::{cpu, rss_mb};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pod_doc(i: usize, extra: &str) -> String {
    let [_, b, c, d] = [0, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8];
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}{extra}}}}}\nspec: {{serviceAccountName: sa-{}, nodeName: node-{}}}\nstatus: {{podIP: 10.{b}.{c}.{d}}}\n", i / 100, i / 5, i / 10, i % 50)
}

/// A pod as kube-source hands it to the translator (what `clean` keeps).
fn pod_json(i: usize, generation: usize) -> serde_json::Value {
    let [_, b, c, d] = [0, (i >> 16) as u8 + 1, (i >> 8) as u8, i as u8];
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i / 100),
            "uid": format!("uid-{i}"),
            "labels": {"app": format!("app-{}", i / 5), "pod-template-hash": format!("h{generation}")}},
        "spec": {"serviceAccountName": format!("sa-{}", i / 10), "nodeName": format!("node-{}", i % 50)},
        "status": {"podIP": format!("10.{b}.{c}.{d}")},
    })
}

fn policy_json(k: usize, generation: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{k}"), "namespace": format!("ns-{}", k * 10 / 100)},
        "spec": {"selector": {"matchLabels": {"app": format!("app-{}", k * 2)}},
            "rules": [{"from": [{"source": {"namespaces": [format!("ns-{generation}")]}}]}]},
    })
}

fn translated(v: serde_json::Value) -> mesh::objects::Translated {
    let v = serde_yaml::to_value(&v).expect("JSON converts to YAML");
    mesh::standalone::translate(v, "bench").unwrap().unwrap()
}

/// Runs in the child: measures one source at one size and prints one
/// JSON line.
pub fn child(n: usize, source: &str) -> anyhow::Result<()> {
    let empty = rss_mb();
    let row = match source {
        "file" => file(n)?,
        "kube" => kube(n),
        other => anyhow::bail!("unknown source {other:?} (file or kube)"),
    };
    println!(
        "{}",
        serde_json::json!({"pods": n, "rss_empty_mb": empty, source: row})
    );
    Ok(())
}

fn file(n: usize) -> anyhow::Result<serde_json::Value> {
    let mut text = gen::standalone_yaml(n);
    let mut src = mesh::FileSource::new(std::path::Path::new("bench.yaml"), "cluster.local");
    let t = cpu();
    let store = mesh::MeshStore::new(src.apply(&text)?, "bench");
    let file_load = ms(cpu() - t);
    let file_rss = rss_mb();
    let mut file = serde_json::Map::new();
    let mut change = |name: &str, text: &str, src: &mut mesh::FileSource| -> anyhow::Result<()> {
        let t = cpu();
        src.apply_into(text, &store)?;
        file.insert(name.into(), ms(cpu() - t).into());
        Ok(())
    };
    let victim = pod_doc(n / 2, "");
    anyhow::ensure!(text.contains(&victim), "the generator's pod text");
    text = text.replace(&victim, &pod_doc(n / 2, ", v: two"));
    change("update_pod", &text, &mut src)?;
    text.push_str(&pod_doc(n + 1, ""));
    change("add_pod", &text, &mut src)?;
    text = text.replace(&pod_doc(n + 1, ""), "");
    change("delete_pod", &text, &mut src)?;
    let p = "namespaces: [ns-0]}}]}]\n";
    let at = text.find(p).expect("a policy of ns-0");
    text.replace_range(at..at + p.len(), "namespaces: [ns-1]}}]}]\n");
    change("change_policy", &text, &mut src)?;
    let churn = 100;
    let t = cpu();
    for e in 0..churn {
        let i = e * 13 % n;
        let (old, new) = (pod_doc(i, ""), pod_doc(i, &format!(", v: c{e}")));
        let changed = text.replacen(&old, &new, 1);
        src.apply_into(&changed, &store)?;
        // Back to the original document so the next event finds its text.
        src.apply_into(&text, &store)?;
    }
    let file_churn = ms(cpu() - t) / (2 * churn) as f64;
    Ok(
        serde_json::json!({"load_cpu_ms": file_load, "rss_after_load_mb": file_rss, "changes_cpu_ms": file,
        "churn_events": 2 * churn, "churn_cpu_ms_per_event": file_churn, "rss_after_churn_mb": rss_mb()}),
    )
}

fn kube(n: usize) -> serde_json::Value {
    let mut objects = mesh::objects::Objects::new("cluster.local");
    let t = cpu();
    for ns in 0..n.div_ceil(100) {
        objects.upsert(translated(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"istio.io/dataplane-mode": "ambient"}}})));
    }
    for i in 0..n {
        objects.upsert(translated(pod_json(i, 0)));
    }
    for j in 0..gen::services(n) {
        objects.upsert(translated(serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{j}"), "namespace": format!("ns-{}", j * 5 / 100)},
            "spec": {"clusterIP": format!("172.{}.{}.{}", 16 + (j >> 16), (j >> 8) & 255, j & 255),
                "selector": {"app": format!("app-{j}")}, "ports": [{"port": 80, "targetPort": 8080}]}})));
    }
    for k in 0..gen::policies(n) {
        objects.upsert(translated(policy_json(k, 0)));
    }
    let store = mesh::MeshStore::new(objects.publish(), "bench");
    let kube_load = ms(cpu() - t);
    let kube_rss = rss_mb();
    let mut kube = serde_json::Map::new();
    let rounds = 10;
    let mut timed = |name: &str, f: &mut dyn FnMut(&mut mesh::objects::Objects, usize)| {
        let t = cpu();
        for r in 0..rounds {
            f(&mut objects, r);
            store.replace(objects.publish());
        }
        kube.insert(name.into(), (ms(cpu() - t) / rounds as f64).into());
    };
    timed("update_pod", &mut |o, r| {
        o.upsert(translated(pod_json(r * 7 % n, r + 1)))
    });
    timed("add_pod", &mut |o, r| {
        o.upsert(translated(pod_json(n + 1 + r, 0)))
    });
    timed("delete_pod", &mut |o, r| {
        o.remove(&mesh::objects::ObjectKey {
            kind: "Pod".into(),
            namespace: format!("ns-{}", (n + 1 + r) / 100),
            name: format!("pod-{}", n + 1 + r),
        })
    });
    timed("change_policy", &mut |o, r| {
        o.upsert(translated(policy_json(r % 10, r + 1)))
    });
    let churn_k = 1000;
    let t = cpu();
    for e in 0..churn_k {
        objects.upsert(translated(pod_json(e * 13 % n, 100 + e)));
        store.replace(objects.publish());
    }
    let kube_churn = ms(cpu() - t) / churn_k as f64;
    serde_json::json!({"load_cpu_ms": kube_load, "rss_after_load_mb": kube_rss,
        "changes_cpu_ms": kube, "churn_events": churn_k, "churn_cpu_ms_per_event": kube_churn,
        "rss_after_churn_mb": rss_mb()})
}

/// Runs each size in a child and prints the tables.
pub fn measure(sizes: &[usize]) -> anyhow::Result<Vec<serde_json::Value>> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &n in sizes {
        let mut row = serde_json::Map::new();
        for source in ["file", "kube"] {
            let out = std::process::Command::new(&exe)
                .args(["--objects-child", &n.to_string(), source])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{source} child for {n} pods: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            row.extend(v.as_object().cloned().unwrap_or_default());
        }
        rows.push(serde_json::Value::Object(row));
    }
    println!("The file and Kubernetes events, through the incremental translator (a fresh process per size):");
    println!();
    println!("| pods | source | full load (CPU ms) | RSS after load (MB) | update a pod | add a pod | delete a pod | change a policy (CPU ms each) | churn, CPU per event (ms) | RSS after churn (MB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        for src in ["file", "kube"] {
            let s = &r[src];
            let c = &s["changes_cpu_ms"];
            println!(
                "| {} | {src} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} ({} events) | {:.1} |",
                r["pods"], s["load_cpu_ms"].as_f64().unwrap_or(0.0),
                s["rss_after_load_mb"].as_f64().unwrap_or(0.0),
                c["update_pod"].as_f64().unwrap_or(0.0), c["add_pod"].as_f64().unwrap_or(0.0),
                c["delete_pod"].as_f64().unwrap_or(0.0), c["change_policy"].as_f64().unwrap_or(0.0),
                s["churn_cpu_ms_per_event"].as_f64().unwrap_or(0.0), s["churn_events"],
                s["rss_after_churn_mb"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!();
    Ok(rows)
}
