//! The in-pod rules, as iptables (Debian's iptables uses the
//! nf_tables backend; iptables-restore applies a table atomically), and the
//! same chains and marks with ip6tables for a pod with an IPv6 address. Install
//! is idempotent (our chains are flushed and rewritten, jumps added once);
//! removal deletes exactly what install added, so a pod is left as it was.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ZTUNNEL_MARK: &str = "0x539/0xfff";
pub const INBOUND_MARK: &str = "0x111/0xfff";
pub const PROBE_SNAT_IP: &str = "169.254.7.127/32";
/// Upstream's IPv6 probe source (the v4 one's digits in a ULA).
pub const PROBE_SNAT_IP6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128";
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
    /// Write the IPv6 rules too (the pod has an IPv6 address). Records of
    /// agents before dual-stack lack it: their pods were IPv4-only.
    #[serde(default)]
    pub ipv6: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dns: false,
            inbound: true,
            ipv6: false,
        }
    }
}

/// The address family a set of rules is for: the same chains, marks and
/// ports, with each family's tools, loopback and probe source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn probe_snat(self) -> &'static str {
        match self {
            Family::V4 => PROBE_SNAT_IP,
            Family::V6 => PROBE_SNAT_IP6,
        }
    }

    /// `ip`'s family flag.
    fn ip(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    /// The families `opts` installs.
    pub fn of(opts: Options) -> &'static [Family] {
        match opts.ipv6 {
            true => &[Family::V4, Family::V6],
            false => &[Family::V4],
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

/// The iptables-restore (ip6tables-restore) input that (re)writes our chains.
pub fn rules(opts: Options, f: Family) -> String {
    let (lo, probe) = (f.loopback(), f.probe_snat());
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
        format!("-A {PRERT} -s {probe} -p tcp -j ACCEPT"),
    ];
    if opts.inbound {
        r.push(format!("-A {PRERT} ! -d {lo} -p tcp ! --dport 15008 -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15006"));
    }
    r.push(format!("-A {OUTPUT} -d {probe} -p tcp -j ACCEPT"));
    if opts.dns {
        r.push(format!("-A {OUTPUT} ! -o lo -p udp -m mark ! --mark {ZTUNNEL_MARK} -m udp --dport 53 -j REDIRECT --to-ports 15053"));
        r.push(format!("-A {OUTPUT} ! -d {lo} -p tcp -m tcp --dport 53 -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15053"));
    }
    r.push(format!(
        "-A {OUTPUT} -p tcp -m mark --mark {INBOUND_MARK} -j ACCEPT"
    ));
    r.push(format!("-A {OUTPUT} ! -d {lo} -o lo -j ACCEPT"));
    r.push(format!(
        "-A {OUTPUT} ! -d {lo} -p tcp -m mark ! --mark {ZTUNNEL_MARK} -j REDIRECT --to-ports 15001"
    ));
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
fn ip_rule(op: &str, f: Family) -> [&str; 10] {
    [
        "ip",
        f.ip(),
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
fn ip_route(op: &str, f: Family) -> [&str; 10] {
    [
        "ip",
        f.ip(),
        "route",
        op,
        "local",
        f.default_route(),
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

/// Installs (or refreshes) the capture rules in the pod netns at `netns`,
/// for IPv4 and, with `opts.ipv6`, IPv6. Without `opts.ipv6`, IPv6 rules an
/// earlier install wrote are removed.
pub fn install(netns: &Path, opts: Options) -> Result<(), RedirectError> {
    if !netns.exists() {
        return Err(RedirectError::NoNetns(netns.to_path_buf()));
    }
    for f in [Family::V4, Family::V6] {
        match Family::of(opts).contains(&f) {
            true => install_family(netns, opts, f)?,
            false => remove_family(netns, f)?,
        }
    }
    Ok(())
}

fn install_family(netns: &Path, opts: Options, f: Family) -> Result<(), RedirectError> {
    // Stale jumps from an earlier install with other options go first.
    remove_jumps(netns, f)?;
    run(
        netns,
        &[f.restore(), "--noflush", "-w"],
        Some(&rules(opts, f)),
        false,
    )?;
    for (table, chain, ours) in jumps(opts) {
        run(
            netns,
            &[f.iptables(), "-w", "-t", table, "-A", chain, "-j", ours],
            None,
            false,
        )?;
    }
    if !run(
        netns,
        &[
            "sh",
            "-c",
            &format!(
                "ip {} rule show pref {RULE_PREF} | grep -q 'fwmark {INBOUND_MARK}'",
                f.ip()
            ),
        ],
        None,
        true,
    )? {
        run(netns, &ip_rule("add", f), None, false)?;
    }
    run(netns, &ip_route("replace", f), None, false)?;
    Ok(())
}

/// Whether the jumps into our chains are in place (CHECK, reconcile), for
/// every family `opts` installs.
pub fn installed(netns: &Path, opts: Options) -> Result<bool, RedirectError> {
    if !netns.exists() {
        return Err(RedirectError::NoNetns(netns.to_path_buf()));
    }
    for f in Family::of(opts) {
        let args = [
            f.iptables(),
            "-w",
            "-t",
            "nat",
            "-C",
            "OUTPUT",
            "-j",
            OUTPUT,
        ];
        if !run(netns, &args, None, true)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes every jump install can add, whatever options it was given.
fn remove_jumps(netns: &Path, f: Family) -> Result<(), RedirectError> {
    // Reverse of install: redirects stop before the mangle/connmark rules
    // that carry already-redirected connections' replies go.
    for (table, chain, ours) in jumps(Options {
        dns: true,
        inbound: true,
        ipv6: true,
    })
    .into_iter()
    .rev()
    {
        // -D removes one copy per call; loop until none is left.
        while run(
            netns,
            &[f.iptables(), "-w", "-t", table, "-D", chain, "-j", ours],
            None,
            true,
        )? {}
    }
    Ok(())
}

/// Removes everything `install` added, both families. Removing twice, or
/// from a pod that never had the rules, succeeds. A netns that is already
/// gone has nothing left to remove.
pub fn remove(netns: &Path) -> Result<(), RedirectError> {
    if !netns.exists() {
        return Ok(());
    }
    for f in [Family::V4, Family::V6] {
        remove_family(netns, f)?;
    }
    Ok(())
}

fn remove_family(netns: &Path, f: Family) -> Result<(), RedirectError> {
    // A v4-only pod never had v6 rules: one check instead of a dozen
    // deletions (install writes every chain before any jump or route).
    let probe = [f.iptables(), "-w", "-t", "nat", "-S", OUTPUT];
    if f == Family::V6 && !run(netns, &probe, None, true)? {
        return Ok(());
    }
    remove_jumps(netns, f)?;
    for table in ["mangle", "nat", "raw"] {
        for ours in [PRERT, OUTPUT] {
            if run(
                netns,
                &[f.iptables(), "-w", "-t", table, "-F", ours],
                None,
                true,
            )? {
                run(
                    netns,
                    &[f.iptables(), "-w", "-t", table, "-X", ours],
                    None,
                    false,
                )?;
            }
        }
    }
    while run(netns, &ip_rule("del", f), None, true)? {}
    run(netns, &ip_route("del", f), None, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v6 rules are the v4 rules with the family's loopback and probe
    /// source: same chains, marks and ports.
    #[test]
    fn v6_rules_mirror_v4() {
        for dns in [false, true] {
            for inbound in [false, true] {
                let opts = Options {
                    dns,
                    inbound,
                    ipv6: true,
                };
                let (v4, v6) = (rules(opts, Family::V4), rules(opts, Family::V6));
                let mapped = v4
                    .replace("127.0.0.1/32", "::1/128")
                    .replace(PROBE_SNAT_IP, PROBE_SNAT_IP6);
                assert_eq!(v6, mapped, "dns={dns} inbound={inbound}");
                assert!(!v6.contains("127.0.0.1") && !v6.contains("169.254"), "{v6}");
                assert!(
                    v6.contains(&format!("-s {PROBE_SNAT_IP6} -p tcp -j ACCEPT")),
                    "{v6}"
                );
                assert_eq!(v6.contains("--to-ports 15006"), inbound, "{v6}");
                assert_eq!(v6.contains("--to-ports 15053"), dns, "{v6}");
            }
        }
    }

    #[test]
    fn families_follow_the_ipv6_option() {
        let v4 = Options::default();
        assert_eq!(Family::of(v4), &[Family::V4]);
        let dual = Options { ipv6: true, ..v4 };
        assert_eq!(Family::of(dual), &[Family::V4, Family::V6]);
        assert_eq!(
            ip_route("replace", Family::V6).join(" "),
            "ip -6 route replace local ::/0 dev lo table 100"
        );
        assert_eq!(
            ip_rule("add", Family::V6).join(" "),
            "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100"
        );
    }

    /// Records an agent wrote before `ipv6` existed read as IPv4-only.
    #[test]
    fn old_records_are_ipv4_only() {
        let o: Options = serde_json::from_str(r#"{"dns":true,"inbound":true}"#).unwrap();
        assert!(!o.ipv6 && o.dns && o.inbound);
    }
}
