//! Node-side rule: kubelet probes to an ambient pod are SNATed
//! to 169.254.7.127 so the in-pod rules let them bypass ztunnel (a probe
//! must reach the app even under STRICT mTLS). The set of ambient pod IPs is
//! an ipset the agent keeps; the rule runs in the agent's own (node) netns.

use std::process::Command;

pub const IPSET: &str = "istio-inpod-probes-v4";
const SNAT_TO: &str = "169.254.7.127";

#[derive(Debug, thiserror::Error)]
#[error("`{cmd}` on the node: {reason}")]
pub struct HostError {
    cmd: String,
    reason: String,
}

fn run(args: &[&str], may_fail: bool) -> Result<bool, HostError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| HostError {
            cmd: args.join(" "),
            reason: e.to_string(),
        })?;
    if !out.status.success() && !may_fail {
        return Err(HostError {
            cmd: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.status.success())
}

fn snat_rule(op: &str) -> [&str; 18] {
    [
        "iptables",
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
        IPSET,
        "dst",
        "-j",
        "SNAT",
    ]
}

/// Creates the ipset and the SNAT rule once; safe to repeat.
pub fn install() -> Result<(), HostError> {
    run(&["ipset", "create", IPSET, "hash:ip", "-exist"], false)?;
    let check = [&snat_rule("-C")[..], &["--to-source", SNAT_TO]].concat();
    if !run(&check, true)? {
        run(
            &[&snat_rule("-A")[..], &["--to-source", SNAT_TO]].concat(),
            false,
        )?;
    }
    Ok(())
}

pub fn add_pod(ip: std::net::IpAddr) -> Result<(), HostError> {
    run(&["ipset", "add", IPSET, &ip.to_string(), "-exist"], false).map(drop)
}

/// Removing an IP that is not there succeeds.
pub fn del_pod(ip: std::net::IpAddr) -> Result<(), HostError> {
    run(&["ipset", "del", IPSET, &ip.to_string(), "-exist"], false).map(drop)
}

/// The IPs in the set now (for reconcile and tests).
pub fn members() -> Result<Vec<String>, HostError> {
    let out = Command::new("ipset")
        .args(["list", IPSET])
        .output()
        .map_err(|e| HostError {
            cmd: format!("ipset list {IPSET}"),
            reason: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_once("Members:")
        .map(|(_, m)| m.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default())
}
