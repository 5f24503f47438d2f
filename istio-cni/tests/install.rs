//! Install mode on plain directories: chaining into the primary config,
//! wrapping a plain .conf, idempotency, and exact removal.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use istio_cni::install::{
    insert, insert_into, install_binary, is_dynamic, primary_conf, uninstall, ConfTarget,
};
use serde_json::{json, Value};

/// A scratch dir, removed when the test ends.
struct Tmp(PathBuf);

impl std::ops::Deref for Tmp {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    let d = std::env::temp_dir().join(format!("cni-install-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Tmp(d)
}

fn entry() -> Value {
    json!({"type": "istio-cni", "agent_socket": "/run/x.sock", "agent_state_dir": "/run/istio-cni"})
}

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"#;

#[test]
fn chains_last_keeps_others_and_mode_and_is_idempotent() {
    let d = tmp("chain");
    let path = d.join("10-calico.conflist");
    std::fs::write(&path, CALICO).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Not the first by name: untouched.
    std::fs::write(d.join("99-other.conflist"), CALICO).unwrap();

    let (p, changed) = insert(&d, &entry()).unwrap();
    assert_eq!((p.clone(), changed), (path.clone(), true));
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let before: Value = serde_json::from_str(CALICO).unwrap();
    let plugins = v["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[..2], before["plugins"].as_array().unwrap()[..]);
    assert_eq!(plugins[2], entry());
    // Key order kept, so a diff of the file shows only our entry.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.find("\"name\"").unwrap() < text.find("\"cniVersion\"").unwrap());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(d.join("99-other.conflist")).unwrap(),
        CALICO
    );

    // Again: nothing to do. A changed entry replaces ours, never duplicates it.
    assert!(!insert(&d, &entry()).unwrap().1);
    let mut e2 = entry();
    e2["agent_state_dir"] = json!("/other");
    assert!(insert(&d, &e2).unwrap().1);
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["plugins"].as_array().unwrap().len(), 3);

    // Uninstall: the others' entries exactly as before.
    let bin = tmp("chain-bin");
    std::fs::write(bin.join("istio-cni"), b"x").unwrap();
    assert_eq!(uninstall(&d, &bin).unwrap(), vec![path.clone()]);
    let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v, before);
    assert!(!bin.join("istio-cni").exists());
    assert!(
        uninstall(&d, &bin).unwrap().is_empty(),
        "second uninstall has nothing to do"
    );
}

#[test]
fn plain_conf_is_wrapped_into_a_conflist() {
    let d = tmp("wrap");
    let conf = r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0"}"#;
    std::fs::write(d.join("10-bridge.conf"), conf).unwrap();
    let (p, changed) = insert(&d, &entry()).unwrap();
    assert!(changed);
    assert_eq!(p, d.join("10-bridge.conflist"));
    assert!(
        !d.join("10-bridge.conf").exists(),
        "the .conf would shadow nothing but confuse readers"
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["name"], "mynet");
    assert_eq!(
        v["plugins"][0],
        serde_json::from_str::<Value>(conf).unwrap()
    );
    assert_eq!(v["plugins"][1]["type"], "istio-cni");
    assert_eq!(primary_conf(&d).unwrap(), p);
}

#[test]
fn empty_or_broken_config_dirs_are_named_errors() {
    let d = tmp("empty");
    let e = insert(&d, &entry()).unwrap_err().to_string();
    assert!(
        e.contains("no CNI network config yet") && e.contains(d.to_str().unwrap()),
        "{e}"
    );
    std::fs::write(d.join("05-bad.conflist"), "{nope").unwrap();
    let e = insert(&d, &entry()).unwrap_err().to_string();
    assert!(
        e.contains("05-bad.conflist") && e.contains("not JSON"),
        "{e}"
    );
    std::fs::write(d.join("05-bad.conflist"), r#"{"plugins": 3}"#).unwrap();
    let e = insert(&d, &entry()).unwrap_err().to_string();
    assert!(e.contains("`plugins` is not a list"), "{e}");
}

#[test]
fn binary_copy_is_atomic_and_skipped_when_identical() {
    let src_dir = tmp("bin-src");
    let src = src_dir.join("istio-cni");
    std::fs::write(&src, b"plugin v1").unwrap();
    let bin = tmp("bin-dst");
    assert!(install_binary(&src, &bin).unwrap());
    assert!(!install_binary(&src, &bin).unwrap());
    let dst = bin.join("istio-cni");
    assert_eq!(
        std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o755
    );
    std::fs::write(&src, b"plugin v2").unwrap();
    assert!(install_binary(&src, &bin).unwrap());
    assert_eq!(std::fs::read(&dst).unwrap(), b"plugin v2");
    assert_eq!(
        std::fs::read_dir(&*bin).unwrap().count(),
        1,
        "no temporary files left"
    );
}

/// Istio's `CNI_CONF_NAME`: that file, not the first by name; one that does
/// not exist yet is an error naming the variable, and nothing is written.
#[test]
fn a_named_config_is_chained_instead_of_the_first() {
    let d = tmp("named");
    std::fs::write(d.join("05-first.conflist"), CALICO).unwrap();
    std::fs::write(d.join("10-named.conflist"), CALICO).unwrap();
    let target = |name: &str| ConfTarget {
        dir: d.to_path_buf(),
        name: Some(name.into()),
    };
    let (p, changed) = insert_into(&target("10-named.conflist"), &entry()).unwrap();
    assert_eq!((p, changed), (d.join("10-named.conflist"), true));
    let named = std::fs::read_to_string(d.join("10-named.conflist")).unwrap();
    assert!(named.contains("\"istio-cni\""), "{named}");
    assert_eq!(
        std::fs::read_to_string(d.join("05-first.conflist")).unwrap(),
        CALICO
    );
    let e = insert_into(&target("20-missing.conflist"), &entry()).unwrap_err();
    assert!(
        e.to_string().contains("CNI_CONF_NAME") && e.to_string().contains("20-missing"),
        "{e}"
    );
    assert!(!d.join("20-missing.conflist").exists());
}

/// The plugin the agent installs is checked for a dynamic loader: the musl
/// build has none, a glibc build (this test itself) has one.
#[test]
fn static_and_dynamic_plugins_are_told_apart() {
    assert!(!is_dynamic(std::path::Path::new(&testbed::static_plugin())).unwrap());
    assert!(is_dynamic(&std::env::current_exe().unwrap()).unwrap());
    let d = tmp("elf");
    std::fs::write(d.join("script"), "#!/bin/sh\n").unwrap();
    let e = is_dynamic(&d.join("script")).unwrap_err();
    assert!(e.to_string().contains("not a 64-bit"), "{e}");
}
