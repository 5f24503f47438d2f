//! The in-pod rules on a real network namespace (root): install is
//! idempotent, removal leaves the namespace exactly as it was. And the
//! node's probe SNAT rule, written with the iptables backend the node's
//! existing rules use.

use std::path::PathBuf;
use std::process::Command;

use istio_cni::host::{Backend, Host};
use istio_cni::redirect::{install, remove, Options};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("cni-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
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
        String::from_utf8_lossy(&out.stdout).to_string()
    }
    /// Everything install may touch: every rule and every non-built-in chain
    /// (the first use of iptables instantiates empty tables with ACCEPT
    /// policies, which changes no behaviour), ip rules and all routes.
    fn state(&self) -> String {
        const BUILTIN: [&str; 5] = [
            ":PREROUTING ",
            ":INPUT ",
            ":FORWARD ",
            ":OUTPUT ",
            ":POSTROUTING ",
        ];
        let rules = |save: &str| -> String {
            self.sh(save)
                .lines()
                .filter(|l| {
                    l.starts_with("-A")
                        || (l.starts_with(':') && !BUILTIN.iter().any(|b| l.starts_with(b)))
                        || (l.starts_with(':') && !l.contains("ACCEPT"))
                })
                .map(|l| l.split(" [").next().unwrap().to_string() + "\n")
                .collect()
        };
        rules("iptables-save")
            + &self.sh("ip -4 rule show")
            + &self.sh("ip -4 route show table all")
    }

    /// The same for IPv6.
    fn state6(&self) -> String {
        let rules: String = self
            .sh("ip6tables-save")
            .lines()
            .filter(|l| l.starts_with("-A") || l.contains("ISTIO"))
            .map(|l| l.split(" [").next().unwrap().to_string() + "\n")
            .collect();
        rules + &self.sh("ip -6 rule show") + &self.sh("ip -6 route show table all")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn install_is_idempotent_and_removal_is_exact() {
    let ns = Netns::new("idem");
    let before = ns.state();
    for opts in [
        Options::default(),
        Options {
            dns: true,
            inbound: true,
            ipv6: false,
        },
        Options {
            dns: false,
            inbound: false,
            ipv6: false,
        },
    ] {
        install(&ns.path(), opts).unwrap();
        let once = ns.state();
        install(&ns.path(), opts).unwrap();
        assert_eq!(ns.state(), once, "second install changed state ({opts:?})");
        assert!(once.contains("--to-ports 15001"), "{once}");
        assert_eq!(once.contains("--to-ports 15006"), opts.inbound, "{once}");
        assert_eq!(once.contains("--to-ports 15053"), opts.dns, "{once}");
        assert_eq!(once.contains("CT --zone 1"), opts.dns, "{once}");
        assert!(once.contains("fwmark 0x111/0xfff lookup 100"), "{once}");
        assert!(once.contains("local default dev lo table 100"), "{once}");
        assert_eq!(
            once.matches("-A OUTPUT -j ISTIO_OUTPUT").count(),
            if opts.dns { 3 } else { 2 },
            "{once}"
        );
        remove(&ns.path()).unwrap();
        assert_eq!(
            ns.state(),
            before,
            "removal left something behind ({opts:?})"
        );
    }
    remove(&ns.path()).unwrap();
    assert_eq!(ns.state(), before, "second removal");
}

/// A pod with an IPv6 address gets the same chains with ip6tables; an
/// install without `ipv6` takes them out again, and removal is exact for
/// both families.
#[test]
fn ipv6_rules_install_idempotently_and_go_with_the_option() {
    let ns = Netns::new("v6");
    // As in a pod (the loopback plugin): IPv6 routes need lo up.
    ns.sh("ip link set lo up");
    let (before, before6) = (ns.state(), ns.state6());
    let dual = Options {
        dns: true,
        inbound: true,
        ipv6: true,
    };
    install(&ns.path(), dual).unwrap();
    let (once, once6) = (ns.state(), ns.state6());
    install(&ns.path(), dual).unwrap();
    assert_eq!(
        (ns.state(), ns.state6()),
        (once.clone(), once6.clone()),
        "second install"
    );
    for port in ["15001", "15006", "15053"] {
        assert!(once6.contains(&format!("--to-ports {port}")), "{once6}");
    }
    assert!(once6.contains("! -d ::1/128"), "{once6}");
    assert!(
        once6.contains("-s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128"),
        "{once6}"
    );
    assert!(once6.contains("fwmark 0x111/0xfff lookup 100"), "{once6}");
    assert!(once6.contains("local default dev lo table 100"), "{once6}");
    assert_eq!(
        once6.matches("-A OUTPUT -j ISTIO_OUTPUT").count(),
        3,
        "{once6}"
    );
    assert!(
        !once6.contains("127.0.0.1") && !once6.contains("169.254"),
        "{once6}"
    );
    // The v4 rules are what a v4-only install writes.
    assert!(
        once.contains("--to-ports 15001") && !once.contains("fd16:"),
        "{once}"
    );
    assert!(istio_cni::redirect::installed(&ns.path(), dual).unwrap());

    // The pod loses its v6 address: its v6 rules go, the v4 ones stay.
    let v4 = Options {
        ipv6: false,
        ..dual
    };
    install(&ns.path(), v4).unwrap();
    assert_eq!(
        ns.state6(),
        before6,
        "v6 rules left after a v4-only install"
    );
    assert_eq!(ns.state(), once);

    install(&ns.path(), dual).unwrap();
    remove(&ns.path()).unwrap();
    assert_eq!(
        (ns.state(), ns.state6()),
        (before, before6),
        "removal left something"
    );
}

#[test]
fn missing_netns_is_an_error_for_install_and_nothing_for_remove() {
    let gone = PathBuf::from("/run/netns/cni-never-existed");
    let err = install(&gone, Options::default()).unwrap_err();
    assert!(err.to_string().contains("cni-never-existed"), "{err}");
    remove(&gone).unwrap();
}

fn snat_rules(save: &str) -> usize {
    save.lines()
        .filter(|l| l.contains("istio-inpod-probes-v4") && l.contains("SNAT"))
        .count()
}

fn snat_rules6(save: &str) -> usize {
    save.lines()
        .filter(|l| {
            l.contains("istio-inpod-probes-v6")
                && l.contains("SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
        })
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
    host.install(true).unwrap();
    host.install(true).unwrap();
    assert_eq!(snat_rules(&ns.sh("iptables-legacy-save -t nat")), 1);
    assert_eq!(snat_rules(&ns.sh("iptables-nft-save")), 0);
    host.add_pod("10.244.1.10".parse().unwrap()).unwrap();
    assert_eq!(host.members(false).unwrap(), ["10.244.1.10"]);
    // IPv6 the same way, with ip6tables of the same backend.
    assert_eq!(snat_rules6(&ns.sh("ip6tables-legacy-save -t nat")), 1);
    assert_eq!(snat_rules6(&ns.sh("ip6tables-nft-save")), 0);
    host.add_pod("fd00:10:244::1:10".parse().unwrap()).unwrap();
    assert_eq!(host.members(true).unwrap(), ["fd00:10:244::1:10"]);
    assert_eq!(host.members(false).unwrap(), ["10.244.1.10"]);
    host.del_pod("fd00:10:244::1:10".parse().unwrap()).unwrap();
    assert!(host.members(true).unwrap().is_empty());
}

#[test]
fn a_node_without_rules_gets_nft_rules() {
    let ns = Netns::new("nft");
    let host = Host::detect(Some(ns.path())).unwrap();
    assert_eq!(host.backend(), Backend::Nft);
    host.install(true).unwrap();
    assert_eq!(snat_rules(&ns.sh("iptables-nft-save -t nat")), 1);
    assert_eq!(snat_rules(&ns.sh("iptables-legacy-save")), 0);
    assert_eq!(snat_rules6(&ns.sh("ip6tables-nft-save -t nat")), 1);
    assert_eq!(snat_rules6(&ns.sh("ip6tables-legacy-save")), 0);
    // Its own rules (an agent restarted) keep it on nft.
    assert_eq!(
        Host::detect(Some(ns.path())).unwrap().backend(),
        Backend::Nft
    );
}
