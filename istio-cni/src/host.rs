//! Node-side rule: kubelet probes to an ambient pod are SNATed
//! to 169.254.7.127 (IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff, as
//! upstream) so the in-pod rules let them bypass ztunnel (a probe must reach
//! the app even under STRICT mTLS). The ambient pod IPs are an ipset per
//! family the agent keeps.
//!
//! The rule goes into the node's netns: the agent's own when it runs with
//! host networking, else the one it is told to switch to (Istio's chart:
//! `ALLOW_SWITCH_TO_HOST_NS`, PID 1's through the host's /proc). It is
//! written with the iptables backend the node already uses: a node whose
//! kube-proxy writes legacy rules would not evaluate ours if they went to
//! nf_tables (and the reverse), so the backend with existing rules wins, as
//! Istio's own agent decides.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const IPSET: &str = "istio-inpod-probes-v4";
pub const IPSET6: &str = "istio-inpod-probes-v6";
const SNAT_TO: &str = "169.254.7.127";
const SNAT_TO6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

#[derive(Debug, thiserror::Error)]
#[error("`{cmd}` on the node: {reason}")]
pub struct HostError {
    cmd: String,
    reason: String,
}

/// The two iptables backends Debian's iptables package ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    pub fn ip6tables(self) -> &'static str {
        match self {
            Backend::Legacy => "ip6tables-legacy",
            Backend::Nft => "ip6tables-nft",
        }
    }
}

/// What one backend's `-save` showed in the node's netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The binary is missing or fails.
    Unusable,
    Empty,
    /// At least one rule (kube-proxy's chains, a CNI's, anyone's).
    HasRules,
}

/// The backend to write with: legacy only where legacy rules exist (they
/// are what the node evaluates), else nft, the default of current
/// distributions; legacy when it is all that works. None: neither works.
pub fn choose(legacy: Probe, nft: Probe) -> Option<Backend> {
    match (legacy, nft) {
        (Probe::HasRules, _) => Some(Backend::Legacy),
        (_, Probe::Empty | Probe::HasRules) => Some(Backend::Nft),
        (Probe::Empty, Probe::Unusable) => Some(Backend::Legacy),
        (Probe::Unusable, Probe::Unusable) => None,
    }
}

/// Where and how node rules are written.
#[derive(Debug, Clone)]
pub struct Host {
    /// The node's netns, when it is not the agent's own.
    netns: Option<PathBuf>,
    backend: Backend,
}

impl Host {
    /// Probes both backends in the node's netns (`netns`, or the agent's).
    pub fn detect(netns: Option<PathBuf>) -> Result<Host, HostError> {
        let probe = |b: Backend| {
            let save = format!("{}-save", b.iptables());
            let h = Host {
                netns: netns.clone(),
                backend: b,
            };
            match h.output(&[&save]) {
                Ok(out) if out.lines().any(|l| l.starts_with("-A ")) => Probe::HasRules,
                Ok(_) => Probe::Empty,
                Err(_) => Probe::Unusable,
            }
        };
        let (legacy, nft) = (probe(Backend::Legacy), probe(Backend::Nft));
        let backend = choose(legacy, nft).ok_or_else(|| HostError {
            cmd: "iptables-legacy-save, iptables-nft-save".into(),
            reason: "neither iptables backend works in the node's netns".into(),
        })?;
        tracing::info!(?legacy, ?nft, iptables = backend.iptables(), netns = ?netns, "node iptables backend chosen");
        Ok(Host { netns, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn command(&self, args: &[&str]) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .args(args);
                c
            }
            None => {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        }
    }

    fn err(&self, args: &[&str], reason: String) -> HostError {
        let mut cmd = args.join(" ");
        if let Some(ns) = &self.netns {
            cmd = format!("{cmd} (in netns {})", ns.display());
        }
        HostError { cmd, reason }
    }

    /// Stdout of a command that must succeed.
    fn output(&self, args: &[&str]) -> Result<String, HostError> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| self.err(args, e.to_string()))?;
        if !out.status.success() {
            return Err(self.err(
                args,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, args: &[&str], may_fail: bool) -> Result<bool, HostError> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| self.err(args, e.to_string()))?;
        if !out.status.success() && !may_fail {
            return Err(self.err(
                args,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(out.status.success())
    }

    fn snat_rule(&self, op: &'static str, v6: bool) -> Vec<&'static str> {
        let (iptables, set, to) = match v6 {
            false => (self.backend.iptables(), IPSET, SNAT_TO),
            true => (self.backend.ip6tables(), IPSET6, SNAT_TO6),
        };
        vec![
            iptables,
            "-w",
            "-t",
            "nat",
            op,
            "POSTROUTING",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--socket-exists",
            "-m",
            "set",
            "--match-set",
            set,
            "dst",
            "-j",
            "SNAT",
            "--to-source",
            to,
        ]
    }

    /// Creates the ipset and the SNAT rule once, for IPv4 and with `ipv6`
    /// IPv6 too; safe to repeat.
    pub fn install(&self, ipv6: bool) -> Result<(), HostError> {
        self.install_family(false)?;
        if ipv6 {
            self.install_family(true)?;
        }
        Ok(())
    }

    fn install_family(&self, v6: bool) -> Result<(), HostError> {
        let create = match v6 {
            false => vec!["ipset", "create", IPSET, "hash:ip", "-exist"],
            true => vec![
                "ipset", "create", IPSET6, "hash:ip", "family", "inet6", "-exist",
            ],
        };
        self.run(&create, false)?;
        if !self.run(&self.snat_rule("-C", v6), true)? {
            self.run(&self.snat_rule("-A", v6), false)?;
        }
        Ok(())
    }

    fn set_of(ip: std::net::IpAddr) -> &'static str {
        if ip.is_ipv6() {
            IPSET6
        } else {
            IPSET
        }
    }

    pub fn add_pod(&self, ip: std::net::IpAddr) -> Result<(), HostError> {
        let set = Self::set_of(ip);
        self.run(&["ipset", "add", set, &ip.to_string(), "-exist"], false)
            .map(drop)
    }

    /// Removing an IP that is not there succeeds.
    pub fn del_pod(&self, ip: std::net::IpAddr) -> Result<(), HostError> {
        let set = Self::set_of(ip);
        self.run(&["ipset", "del", set, &ip.to_string(), "-exist"], false)
            .map(drop)
    }

    /// The IPs in the family's set now (for reconcile and tests).
    pub fn members(&self, v6: bool) -> Result<Vec<String>, HostError> {
        let set = if v6 { IPSET6 } else { IPSET };
        let text = self.output(&["ipset", "list", set])?;
        Ok(text
            .split_once("Members:")
            .map(|(_, m)| m.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default())
    }
}

/// The node's netns as seen through its /proc mounted at `proc_root`.
pub fn host_netns(proc_root: &Path) -> PathBuf {
    proc_root.join("1/ns/net")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Probe::*;

    #[test]
    fn the_backend_with_rules_wins_else_nft() {
        for (legacy, nft, want) in [
            // kube-proxy (or anyone) on legacy: legacy, whatever nft shows.
            (HasRules, Empty, Some(Backend::Legacy)),
            (HasRules, HasRules, Some(Backend::Legacy)),
            (HasRules, Unusable, Some(Backend::Legacy)),
            // Rules only in nft, or none anywhere: nft.
            (Empty, HasRules, Some(Backend::Nft)),
            (Empty, Empty, Some(Backend::Nft)),
            (Unusable, Empty, Some(Backend::Nft)),
            (Unusable, HasRules, Some(Backend::Nft)),
            // Only legacy works.
            (Empty, Unusable, Some(Backend::Legacy)),
            (Unusable, Unusable, None),
        ] {
            assert_eq!(choose(legacy, nft), want, "legacy {legacy:?}, nft {nft:?}");
        }
    }
}
