//! The in-pod rules, as iptables (Debian's iptables uses the
//! nf_tables backend; iptables-restore applies a table atomically). Install
//! is idempotent (our chains are flushed and rewritten, jumps added once);
//! removal deletes exactly what install added, so a pod is left as it was.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ZTUNNEL_MARK: &str = "0x539/0xfff";
pub const INBOUND_MARK: &str = "0x111/0xfff";
pub const PROBE_SNAT_IP: &str = "169.254.7.127/32";
const ROUTE_TABLE: &str = "100";
const RULE_PREF: &str = "32764";
const PRERT: &str = "ISTIO_PRERT";
const OUTPUT: &str = "ISTIO_OUTPUT";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("netns {0}: does not exist")]
    NoNetns(PathBuf),
    #[error("`{cmd}` in netns {netns}: {reason}")]
    Command {
        cmd: String,
        netns: PathBuf,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// Redirect UDP and TCP port 53 to ztunnel's DNS proxy on 15053.
    pub dns: bool,
    /// Redirect inbound TCP to 15006 (off for `ambient.istio.io/bypass-inbound-capture`).
    pub inbound: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dns: false,
            inbound: true,
        }
    }
}

/// (table, built-in chain, our chain) jumps that install adds.
fn jumps(opts: Options) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut j = vec![
        ("mangle", "PREROUTING", PRERT),
        ("mangle", "OUTPUT", OUTPUT),
        ("nat", "PREROUTING", PRERT),
        ("nat", "OUTPUT", OUTPUT),
    ];
    if opts.dns {
        j.push(("raw", "PREROUTING", PRERT));
        j.push(("raw", "OUTPUT", OUTPUT));
    }
    j
}

/// The iptables-restore input that (re)writes our chains.
pub fn rules(opts: Options) -> String {
    let mut r = vec![
        "*mangle".to_string(),
        format!(":{PRERT} - [0:0]"),
        format!(":{OUTPUT} - [0:0]"),
        format!("-A {PRERT} -m mark --mark {ZTUNNEL_MARK} -j CONNMARK --set-xmark {INBOUND_MARK}"),
        format!("-A {OUTPUT} -m connmark --mark {INBOUND_MARK} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
        "COMMIT".into(),
        "*nat".into(),
        format!(":{PRERT} - [0:0]"),
        format!(":{OUTPUT} - [0:0]"),
        format!("-A {PRERT} -s {PROBE_SNAT_IP} -p tcp -j ACCEPT"),
    ];
    if opts.inbound {
        r.push(format!("-A {PRERT} ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15006"));
    }
    r.push(format!("-A {OUTPUT} -d {PROBE_SNAT_IP} -p tcp -j ACCEPT"));
    if opts.dns {
        r.push(format!("-A {OUTPUT} ! -o lo -p udp -m mark ! --mark {ZTUNNEL_MARK} -m udp --dport 53 -j REDIRECT --to-ports 15053"));
        r.push(format!("-A {OUTPUT} ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15053"));
    }
    r.push(format!(
        "-A {OUTPUT} -p tcp -m mark --mark {INBOUND_MARK} -j ACCEPT"
    ));
    r.push(format!("-A {OUTPUT} ! -d 127.0.0.1/32 -o lo -j ACCEPT"));
    r.push(format!("-A {OUTPUT} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15001"));
    r.push("COMMIT".into());
    if opts.dns {
        r.extend([
            "*raw".to_string(),
            format!(":{PRERT} - [0:0]"),
            format!(":{OUTPUT} - [0:0]"),
            format!("-A {OUTPUT} -p udp -m mark --mark {ZTUNNEL_MARK} -m udp --dport 53 -j CT --zone 1"),
            format!("-A {PRERT} -p udp -m mark ! --mark {ZTUNNEL_MARK} -m udp --sport 53 -j CT --zone 1"),
            "COMMIT".into(),
        ]);
    }
    r.join("\n") + "\n"
}

/// `ip rule <op>` for the rule that routes inbound replies to the local stack.
fn ip_rule(op: &str) -> [&str; 9] {
    [
        "ip",
        "rule",
        op,
        "fwmark",
        INBOUND_MARK,
        "pref",
        RULE_PREF,
        "lookup",
        ROUTE_TABLE,
    ]
}

/// `ip route <op>` for table 100's local default route.
fn ip_route(op: &str) -> [&str; 9] {
    [
        "ip",
        "route",
        op,
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        ROUTE_TABLE,
    ]
}

/// Runs `args` inside the netns at `netns`; Ok(false) when it exits non-zero
/// and `may_fail` (a check, or deleting what is already gone).
fn run(
    netns: &Path,
    args: &[&str],
    stdin: Option<&str>,
    may_fail: bool,
) -> Result<bool, RedirectError> {
    let err = |reason: String| RedirectError::Command {
        cmd: args.join(" "),
        netns: netns.to_path_buf(),
        reason,
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() && !may_fail {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(out.status.success())
}

/// Installs (or refreshes) the capture rules in the pod netns at `netns`.
pub fn install(netns: &Path, opts: Options) -> Result<(), RedirectError> {
    if !netns.exists() {
        return Err(RedirectError::NoNetns(netns.to_path_buf()));
    }
    // Stale jumps from an earlier install with other options go first.
    remove_jumps(netns)?;
    run(
        netns,
        &["iptables-restore", "--noflush", "-w"],
        Some(&rules(opts)),
        false,
    )?;
    for (table, chain, ours) in jumps(opts) {
        run(
            netns,
            &["iptables", "-w", "-t", table, "-A", chain, "-j", ours],
            None,
            false,
        )?;
    }
    if !run(
        netns,
        &[
            "sh",
            "-c",
            &format!("ip rule show pref {RULE_PREF} | grep -q 'fwmark {INBOUND_MARK}'"),
        ],
        None,
        true,
    )? {
        run(netns, &ip_rule("add"), None, false)?;
    }
    run(netns, &ip_route("replace"), None, false)?;
    Ok(())
}

/// Whether the jumps into our chains are in place (CHECK, reconcile).
pub fn installed(netns: &Path) -> Result<bool, RedirectError> {
    if !netns.exists() {
        return Err(RedirectError::NoNetns(netns.to_path_buf()));
    }
    run(
        netns,
        &["iptables", "-w", "-t", "nat", "-C", "OUTPUT", "-j", OUTPUT],
        None,
        true,
    )
}

/// Deletes every jump install can add, whatever options it was given.
fn remove_jumps(netns: &Path) -> Result<(), RedirectError> {
    // Reverse of install: redirects stop before the mangle/connmark rules
    // that carry already-redirected connections' replies go.
    for (table, chain, ours) in jumps(Options {
        dns: true,
        inbound: true,
    })
    .into_iter()
    .rev()
    {
        // -D removes one copy per call; loop until none is left.
        while run(
            netns,
            &["iptables", "-w", "-t", table, "-D", chain, "-j", ours],
            None,
            true,
        )? {}
    }
    Ok(())
}

/// Removes everything `install` added. Removing twice, or from a pod that
/// never had the rules, succeeds. A netns that is already gone has nothing
/// left to remove.
pub fn remove(netns: &Path) -> Result<(), RedirectError> {
    if !netns.exists() {
        return Ok(());
    }
    remove_jumps(netns)?;
    for table in ["mangle", "nat", "raw"] {
        for ours in [PRERT, OUTPUT] {
            if run(
                netns,
                &["iptables", "-w", "-t", table, "-F", ours],
                None,
                true,
            )? {
                run(
                    netns,
                    &["iptables", "-w", "-t", table, "-X", ours],
                    None,
                    false,
                )?;
            }
        }
    }
    while run(netns, &ip_rule("del"), None, true)? {}
    run(netns, &ip_route("del"), None, true)?;
    Ok(())
}
