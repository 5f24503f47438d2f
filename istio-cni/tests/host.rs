//! The node's probe SNAT rule on real network namespaces (root): it is
//! written with the iptables backend the node's existing rules use.

use std::path::PathBuf;
use std::process::Command;

use istio_cni::host::{Backend, Host};

/// A scratch netns standing for a node, deleted (with its rules) on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("cni-host-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
    fn sh(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn snat_rules(save: &str) -> usize {
    save.lines()
        .filter(|l| l.contains("istio-inpod-probes-v4") && l.contains("SNAT"))
        .count()
}

#[test]
fn a_node_with_only_legacy_rules_gets_legacy_rules() {
    let ns = Netns::new("legacy");
    // What a legacy kube-proxy leaves: rules in the legacy tables only.
    ns.sh("iptables-legacy -w -t nat -N KUBE-SERVICES && iptables-legacy -w -t nat -A PREROUTING -j KUBE-SERVICES");
    assert!(!ns.sh("iptables-nft-save").contains("-A "));
    let host = Host::detect(Some(ns.path())).unwrap();
    assert_eq!(host.backend(), Backend::Legacy);
    host.install().unwrap();
    host.install().unwrap();
    assert_eq!(snat_rules(&ns.sh("iptables-legacy-save -t nat")), 1);
    assert_eq!(snat_rules(&ns.sh("iptables-nft-save")), 0);
    host.add_pod("10.244.1.10".parse().unwrap()).unwrap();
    assert_eq!(host.members().unwrap(), ["10.244.1.10"]);
}

#[test]
fn a_node_without_rules_gets_nft_rules() {
    let ns = Netns::new("nft");
    let host = Host::detect(Some(ns.path())).unwrap();
    assert_eq!(host.backend(), Backend::Nft);
    host.install().unwrap();
    assert_eq!(snat_rules(&ns.sh("iptables-nft-save -t nat")), 1);
    assert_eq!(snat_rules(&ns.sh("iptables-legacy-save")), 0);
    // Its own rules (an agent restarted) keep it on nft.
    assert_eq!(
        Host::detect(Some(ns.path())).unwrap().backend(),
        Backend::Nft
    );
}
