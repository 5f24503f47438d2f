//! manifests/: every kustomization renders, every object validates against
//! the Kubernetes schemas for its kind (kubernetes-validate, offline, strict),
//! the Istio/Gateway API objects are accepted by our own translator (the one
//! every component reads them with), and every flag a manifest passes is one
//! the binary accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn kustomize() -> String {
    if let Ok(k) = std::env::var("KUSTOMIZE") {
        return k;
    }
    let go = format!(
        "{}/go/bin/kustomize",
        std::env::var("HOME").unwrap_or_default()
    );
    if Path::new(&go).exists() {
        return go;
    }
    "kustomize".into()
}

fn build(dir: &str) -> String {
    let out = Command::new(kustomize())
        .arg("build")
        .arg(root().join(dir))
        .output()
        .expect("kustomize (go install sigs.k8s.io/kustomize/kustomize/v5; scripts/deps.sh does)");
    assert!(
        out.status.success(),
        "kustomize build {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn split(yaml: &str) -> Vec<String> {
    yaml.split("\n---\n")
        .map(|d| d.trim().to_string())
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        })
        .collect()
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    split(yaml)
        .iter()
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect()
}

/// Validates core kinds against the Kubernetes 1.30 schemas (strict: unknown
/// fields fail); returns the documents of CRD kinds for the translator.
fn validate(name: &str, yaml: &str) -> Vec<String> {
    let tmp = std::env::temp_dir().join(format!("manifests-{}-{name}.yaml", std::process::id()));
    std::fs::write(&tmp, yaml).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.30.0"])
        .arg(&tmp)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/deps.sh does)");
    let _ = std::fs::remove_file(&tmp);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("ERROR"),
        "{name}:\n{text}"
    );
    let mut crds = Vec::new();
    for doc in split(yaml) {
        let v: serde_yaml::Value = serde_yaml::from_str(&doc).unwrap();
        let group = v["apiVersion"]
            .as_str()
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        if group.ends_with("istio.io") || group == "gateway.networking.k8s.io" {
            crds.push(doc);
        } else {
            let kind = v["kind"].as_str().unwrap().to_lowercase();
            assert!(
                text.contains(&format!("passed for resource {kind}/")),
                "{name}: {kind} was not validated:\n{text}"
            );
        }
    }
    crds
}

fn translate(name: &str, docs: &[String]) -> mesh::MeshState {
    mesh::standalone::parse(&docs.join("\n---\n"), "cluster.local")
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `<bin> --help` lists every `--flag` the manifest passes.
fn check_flags(args: &serde_yaml::Value, bin: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let path = target.join("debug").join(bin);
    let help = Command::new(&path)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --workspace --bins)", path.display()));
    let help = String::from_utf8_lossy(&help.stdout);
    for a in args.as_sequence().unwrap() {
        let flag = a.as_str().unwrap().split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{bin} has no {flag}:\n{help}"
        );
    }
}

#[test]
fn system_manifests_render_validate_and_match_the_binaries() {
    let yaml = build("manifests");
    assert!(validate("system", &yaml).is_empty());
    let all = docs(&yaml);
    let ds = |name: &str| {
        all.iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no DaemonSet {name}"))
            .clone()
    };
    let zt = ds("ztunnel");
    let c = &zt["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(
        zt["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    assert_eq!(
        zt["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert_eq!(
        zt["spec"]["template"]["spec"]["tolerations"][0]["operator"],
        "Exists"
    );
    assert!(serde_yaml::to_string(&zt)
        .unwrap()
        .contains("audience: istio-ca"));
    check_flags(&c["args"], "ztunnel");
    let cni = ds("istio-cni-node");
    assert_eq!(cni["spec"]["template"]["spec"]["hostNetwork"], true);
    check_flags(
        &cni["spec"]["template"]["spec"]["containers"][0]["args"],
        "istio-cni-agent",
    );
    let role = |name: &str| {
        let r = all
            .iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ClusterRole {name}"));
        r["rules"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r["verbs"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect::<Vec<_>>()
    };
    let verbs = role("istio-cni");
    assert!(
        verbs
            .iter()
            .all(|v| ["get", "list", "watch", "patch"].contains(&v.as_str())),
        "agent RBAC is not least privilege: {verbs:?}"
    );
    let verbs = role("waypoint-reader");
    assert!(
        verbs
            .iter()
            .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
        "waypoint RBAC is not read-only: {verbs:?}"
    );
    // istiod is the control plane: ztunnel asks it for config and
    // certificates, the agent watches the API; no mesh file, no CA key.
    let args = serde_yaml::to_string(&c["args"]).unwrap();
    assert!(
        args.contains("--xds-address=istiod.istio-system.svc:15012"),
        "{args}"
    );
    assert!(!all
        .iter()
        .any(|d| d["kind"] == "Secret" || d["kind"] == "ConfigMap"));
    let cni_args =
        serde_yaml::to_string(&cni["spec"]["template"]["spec"]["containers"][0]["args"]).unwrap();
    assert!(cni_args.contains("--from-kube"), "{cni_args}");
}

#[test]
fn waypoint_template_and_examples_render_validate_and_translate() {
    let yaml = build("manifests/examples/waypoint-overlay");
    let crds = validate("waypoint", &yaml);
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}".to_string();
    let state = translate("waypoint", &[vec![ns.clone()], crds].concat());
    let wp = &state.waypoints[0];
    assert_eq!(
        (
            wp.name.as_str(),
            wp.namespace.as_str(),
            wp.hostname.as_str()
        ),
        ("waypoint", "demo", "waypoint.demo.svc.cluster.local")
    );
    let all = docs(&yaml);
    let dep = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    check_flags(
        &dep["spec"]["template"]["spec"]["containers"][0]["args"],
        "waypoint",
    );
    assert_eq!(
        dep["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"],
        "none"
    );
    let binding = all
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["metadata"]["name"], "waypoint-reader-demo");
    assert_eq!(binding["subjects"][0]["namespace"], "demo");

    let app = std::fs::read_to_string(root().join("manifests/examples/ambient-app.yaml")).unwrap();
    assert!(validate("app", &app).is_empty());
    let canary =
        std::fs::read_to_string(root().join("manifests/examples/waypoint-canary.yaml")).unwrap();
    let state = translate("canary", &[vec![ns], split(&canary)].concat());
    assert_eq!(
        state.http_routes[0].hosts,
        ["server.demo.svc.cluster.local"]
    );
    assert_eq!(state.waypoint_policies.len(), 1);
}

#[test]
fn dashboards_render_and_are_importable() {
    let yaml = build("manifests/dashboards");
    assert!(validate("dashboards", &yaml).is_empty());
    for f in ["ztunnel.json", "waypoint.json"] {
        let text = std::fs::read_to_string(root().join("manifests/dashboards").join(f)).unwrap();
        let d: serde_json::Value = serde_json::from_str(&text).unwrap();
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            vars.contains(&"datasource") && vars.contains(&"node"),
            "{f}: {vars:?}"
        );
        for p in d["panels"].as_array().unwrap() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{f}: {}",
                p["title"]
            );
            assert!(!p["targets"].as_array().unwrap().is_empty());
        }
    }
}
