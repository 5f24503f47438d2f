//! ztunnel's command line. Our flags are the explicit interface; each that
//! Istio's ztunnel chart (or upstream ztunnel) configures by environment
//! also reads that variable, with upstream's meaning, so the chart's
//! container (`args: [proxy, ztunnel]` plus its env) runs as it is. A flag
//! beats its variable, a variable beats the default; a value that does not
//! parse is refused naming the variable (each `value_name` is the
//! variable's name, so clap's error reads `--pod-ip <INSTANCE_IP>`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Prefix of the variables upstream collects as proxy metadata (sent to
/// istiod with the xDS node, `DNS_CAPTURE` read by ztunnel itself).
const META_PREFIX: &str = "ISTIO_META_";

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel",
    about = "Per-node L4 proxy of the ambient mesh (HBONE, mTLS, L4 policy)"
)]
pub struct Args {
    /// Upstream's subcommand, as Istio's chart passes it (`proxy ztunnel`);
    /// optional, and the only one there is.
    #[arg(value_parser = ["proxy"], hide = true)]
    pub command: Option<String>,
    #[arg(value_parser = ["ztunnel"], requires = "command", hide = true)]
    pub proxy_mode: Option<String>,
    /// The node whose pods this ztunnel serves.
    #[arg(long, env = "NODE_NAME", value_name = "NODE_NAME")]
    pub node: String,
    /// Standalone mesh config (multi-document Kubernetes-style YAML); watched.
    #[arg(
        long,
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    pub config: Option<PathBuf>,
    /// istiod's secure xDS address (`host:port`, or `https://host:port` as
    /// upstream writes it): the mesh comes from istiod's WDS instead of
    /// --config, and certificates from istiod's CA.
    #[arg(long, env = "XDS_ADDRESS", value_name = "XDS_ADDRESS", value_parser = parse_address)]
    pub xds_address: Option<String>,
    /// The name istiod's certificate carries.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub xds_server_name: String,
    /// PEM root that istiod's serving certificate chains to.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        value_name = "XDS_ROOT_CA",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_cert: PathBuf,
    /// Istio CA address; defaults to --xds-address. Setting it (or
    /// --xds-address) replaces the built-in CA.
    #[arg(long, env = "CA_ADDRESS", value_name = "CA_ADDRESS", value_parser = parse_address)]
    pub ca_address: Option<String>,
    /// Projected service-account token (audience istio-ca) sent to istiod.
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    pub token_path: PathBuf,
    /// This ztunnel's own pod, as istiod identifies its xDS clients.
    #[arg(long, env = "INSTANCE_IP", value_name = "INSTANCE_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    #[arg(
        long,
        env = "POD_NAME",
        value_name = "POD_NAME",
        default_value = "ztunnel"
    )]
    pub pod_name: String,
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "POD_NAMESPACE",
        default_value = "istio-system"
    )]
    pub pod_namespace: String,
    #[arg(
        long,
        env = "SERVICE_ACCOUNT",
        value_name = "SERVICE_ACCOUNT",
        default_value = "ztunnel"
    )]
    pub service_account: String,
    /// The cluster's id (ISTIO_META_CLUSTER_ID, else CLUSTER_ID, else
    /// `Kubernetes`).
    #[arg(
        long,
        env = "ISTIO_META_CLUSTER_ID",
        value_name = "ISTIO_META_CLUSTER_ID"
    )]
    cluster_id: Option<String>,
    /// The network this node is on (empty: the single default network).
    #[arg(long, env = "NETWORK", value_name = "NETWORK", default_value = "")]
    pub network: String,
    #[arg(long, env = "TRUST_DOMAIN", value_name = "TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Built-in CA state: the root is created here on first start.
    #[arg(long, default_value = "/var/lib/ztunnel/ca")]
    pub ca_dir: PathBuf,
    /// Use this root certificate (PEM) instead of --ca-dir; needs --ca-key.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Workload certificate lifetime (e.g. 24h, 30m, 10s); renewed at half life.
    #[arg(long, env = "SECRET_TTL", value_name = "SECRET_TTL", default_value = "24h", value_parser = mesh::routes::parse_duration)]
    pub cert_ttl: Duration,
    /// The node agent's ZDS socket (ztunnel connects to it).
    #[arg(long, env = "INPOD_UDS", value_name = "INPOD_UDS", default_value = zds::DEFAULT_SOCKET)]
    pub zds_socket: PathBuf,
    /// Pods are served in their own network namespaces, handed over by the
    /// node agent: the only mode there is, so only `true` is accepted.
    #[arg(long, env = "INPOD_ENABLED", value_name = "INPOD_ENABLED", value_parser = parse_inpod)]
    pub inpod_enabled: Option<bool>,
    /// Serve DNS in each pod (port 15053) for the capture rules to send
    /// queries to. Default on, as upstream: ISTIO_META_DNS_CAPTURE=false
    /// turns it off.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", value_name = "ISTIO_META_DNS_CAPTURE", value_parser = parse_bool)]
    dns_proxy: Option<bool>,
    /// Data-path threads: a number, or a percentage of the CPU limit (`50%`).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", value_name = "ZTUNNEL_WORKER_THREADS", default_value = "2", value_parser = parse_threads)]
    worker_threads: Threads,
    /// CPUs this container may use (the downward API's limits.cpu; it
    /// gives the node's count when no limit is set): what percentages of
    /// --worker-threads are of. Default: the CPUs this process may run on.
    #[arg(long, env = "ZTUNNEL_CPU_LIMIT", value_name = "ZTUNNEL_CPU_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    pub cpu_limit: Option<u32>,
    /// The container's CPU limit and request as the chart passes them
    /// (only when resources are set): checked, and shown at start.
    #[arg(
        long,
        env = "ZTUNNEL_RESOURCE_CPU_LIMIT",
        value_name = "ZTUNNEL_RESOURCE_CPU_LIMIT"
    )]
    pub resource_cpu_limit: Option<u32>,
    #[arg(
        long,
        env = "ZTUNNEL_RESOURCE_CPU_REQUEST",
        value_name = "ZTUNNEL_RESOURCE_CPU_REQUEST"
    )]
    pub resource_cpu_request: Option<u32>,
    /// A certificate revocation list for peer certificates. Not supported
    /// yet: setting it is refused rather than running without the checks
    /// it asks for.
    #[arg(long, env = "CRL_PATH", value_name = "CRL_PATH", value_parser = refuse_crl)]
    pub crl_path: Option<PathBuf>,
    #[command(flatten)]
    pub process: admin::flags::ProcessFlags,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Threads {
    Count(usize),
    Percent(f64),
}

fn parse_address(s: &str) -> Result<String, String> {
    // Upstream takes a URI and adds https:// when the scheme is missing; we
    // only speak TLS to istiod, so any other scheme is refused.
    let rest = match s.split_once("://") {
        Some(("https", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "scheme {scheme}:// (want host:port or https://host:port)"
            ))
        }
        None => s,
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(format!("{s:?} is not host:port")),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{s:?} (want true or false)")),
    }
}

fn parse_inpod(s: &str) -> Result<bool, String> {
    match parse_bool(s)? {
        true => Ok(true),
        false => {
            Err("false: only in-pod mode (pods handed over by the node agent) is supported".into())
        }
    }
}

fn parse_threads(s: &str) -> Result<Threads, String> {
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!("{s:?}: a percentage is in (0, 100]"));
        }
        return Ok(Threads::Percent(p));
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Threads::Count(n)),
        _ => Err(format!("{s:?} (want a positive number or a percentage)")),
    }
}

fn refuse_crl(s: &str) -> Result<PathBuf, String> {
    Err(format!(
        "{s}: certificate revocation lists are not supported yet (unset it, e.g. peerCaCrl.enabled=false in Istio's chart)"
    ))
}

impl Args {
    /// ISTIO_META_CLUSTER_ID (or --cluster-id), else CLUSTER_ID, else
    /// upstream's default.
    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .clone()
            .or_else(|| std::env::var("CLUSTER_ID").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "Kubernetes".into())
    }

    pub fn dns_proxy(&self) -> bool {
        self.dns_proxy.unwrap_or(true)
    }

    /// The runtime's worker threads: a percentage is of the CPU limit,
    /// rounded up, at least one.
    pub fn worker_threads(&self) -> usize {
        match self.worker_threads {
            Threads::Count(n) => n,
            Threads::Percent(p) => {
                let cpus = self
                    .cpu_limit
                    .map(|c| c as usize)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                ((cpus as f64 * p / 100.0).ceil() as usize).max(1)
            }
        }
    }
}

/// The `ISTIO_META_*` variables, prefix stripped: the proxy metadata
/// istiod gets with this ztunnel's xDS node.
pub fn proxy_metadata(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter_map(|(k, v)| Some((k.strip_prefix(META_PREFIX)?.to_string(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    // clap reads the process environment while parsing, and one test sets
    // variables: every test that parses holds this lock.
    static ENV: Mutex<()> = Mutex::new(());

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            ["ztunnel", "--node", "n1", "--config", "m.yaml"]
                .iter()
                .chain(args),
        )
    }

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn flags_beat_env_and_env_beats_defaults() {
        let _g = lock();
        let vars = [
            ("NODE_NAME", "env-node"),
            ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
            ("CA_ADDRESS", "https://ca.example:15012"),
            ("INSTANCE_IP", "10.1.1.1"),
            ("POD_NAME", "ztunnel-abc"),
            ("ISTIO_META_CLUSTER_ID", "c-meta"),
            ("CLUSTER_ID", "c-plain"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "debug"),
            ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
            ("ZTUNNEL_WORKER_THREADS", "50%"),
            ("ZTUNNEL_CPU_LIMIT", "6"),
            ("INPOD_ENABLED", "true"),
            ("NETWORK", "net-a"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let from_env = Args::try_parse_from(["ztunnel", "proxy", "ztunnel"]);
        let from_flags = Args::try_parse_from([
            "ztunnel",
            "--node",
            "flag-node",
            "--xds-address",
            "10.0.0.1:15012",
            "--pod-ip",
            "10.2.2.2",
            "--cluster-id",
            "c-flag",
            "--log-format",
            "text",
            "--log-level",
            "warn",
            "--drain-timeout",
            "2s",
            "--worker-threads",
            "5",
        ]);
        std::env::remove_var("ISTIO_META_CLUSTER_ID");
        let plain_cluster = Args::try_parse_from(["ztunnel"]).map(|a| a.cluster_id());
        std::env::set_var("INSTANCE_IP", "not-an-ip");
        let bad = Args::try_parse_from(["ztunnel"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }

        let a = from_env.unwrap();
        assert_eq!(a.node, "env-node");
        assert_eq!(
            a.xds_address.as_deref(),
            Some("istiod.istio-system.svc:15012")
        );
        assert_eq!(a.ca_address.as_deref(), Some("ca.example:15012"));
        assert_eq!(a.pod_ip, Some("10.1.1.1".parse().unwrap()));
        assert_eq!(a.pod_name, "ztunnel-abc");
        assert_eq!(a.cluster_id(), "c-meta");
        assert_eq!(a.network, "net-a");
        assert!(a.process.log_json());
        assert_eq!(a.process.log_level, "debug");
        assert_eq!(a.process.drain_timeout(), Duration::from_secs(25));
        assert_eq!(a.worker_threads(), 3);

        let a = from_flags.unwrap();
        assert_eq!(a.node, "flag-node");
        assert_eq!(a.xds_address.as_deref(), Some("10.0.0.1:15012"));
        assert_eq!(a.pod_ip, Some("10.2.2.2".parse().unwrap()));
        assert_eq!(a.cluster_id(), "c-flag");
        assert!(!a.process.log_json());
        assert_eq!(a.process.log_level, "warn");
        assert_eq!(a.process.drain_timeout(), Duration::from_secs(2));
        assert_eq!(a.worker_threads(), 5);

        assert_eq!(plain_cluster.unwrap(), "c-plain");
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("INSTANCE_IP"), "{e}");
    }

    #[test]
    fn upstream_positionals_are_accepted() {
        let _g = lock();
        let a = Args::try_parse_from([
            "ztunnel", "proxy", "ztunnel", "--node", "n", "--config", "c",
        ])
        .unwrap();
        assert_eq!(a.command.as_deref(), Some("proxy"));
        assert!(Args::try_parse_from(["ztunnel", "--node", "n", "--config", "c"]).is_ok());
        assert!(Args::try_parse_from([
            "ztunnel", "proxy", "waypoint", "--node", "n", "--config", "c"
        ])
        .is_err());
        assert!(
            Args::try_parse_from(["ztunnel", "serve", "--node", "n", "--config", "c"]).is_err()
        );
    }

    #[test]
    fn addresses_take_upstream_forms() {
        let _g = lock();
        assert_eq!(
            parse_address("istiod.istio-system.svc:15012").unwrap(),
            "istiod.istio-system.svc:15012"
        );
        assert_eq!(
            parse_address("https://10.0.0.1:15012").unwrap(),
            "10.0.0.1:15012"
        );
        assert!(parse_address("http://10.0.0.1:15012").is_err());
        assert!(parse_address("istiod").is_err());
        let e = Args::try_parse_from(["ztunnel", "--node", "n", "--xds-address", "nowhere"])
            .unwrap_err();
        assert!(e.to_string().contains("XDS_ADDRESS"), "{e}");
    }

    #[test]
    fn inpod_only_true_and_dns_capture_bool() {
        let _g = lock();
        assert_eq!(
            parse(&["--inpod-enabled", "true"]).unwrap().inpod_enabled,
            Some(true)
        );
        let e = parse(&["--inpod-enabled", "false"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("INPOD_ENABLED") && e.contains("in-pod"), "{e}");
        assert!(parse(&[]).unwrap().dns_proxy());
        assert!(!parse(&["--dns-proxy", "FALSE"]).unwrap().dns_proxy());
        let e = parse(&["--dns-proxy", "yes"]).unwrap_err().to_string();
        assert!(e.contains("ISTIO_META_DNS_CAPTURE"), "{e}");
    }

    #[test]
    fn worker_threads_count_or_share_of_cpu_limit() {
        let _g = lock();
        assert_eq!(parse(&[]).unwrap().worker_threads(), 2);
        assert_eq!(
            parse(&["--worker-threads", "4"]).unwrap().worker_threads(),
            4
        );
        let a = parse(&["--worker-threads", "50%", "--cpu-limit", "8"]).unwrap();
        assert_eq!(a.worker_threads(), 4);
        let a = parse(&["--worker-threads", "30%", "--cpu-limit", "16"]).unwrap();
        assert_eq!(a.worker_threads(), 5);
        let a = parse(&["--worker-threads", "10%", "--cpu-limit", "4"]).unwrap();
        assert_eq!(a.worker_threads(), 1);
        for bad in ["0", "150%", "many"] {
            let e = parse(&["--worker-threads", bad]).unwrap_err().to_string();
            assert!(e.contains("ZTUNNEL_WORKER_THREADS"), "{bad}: {e}");
        }
        let e = parse(&["--cpu-limit", "0"]).unwrap_err().to_string();
        assert!(e.contains("ZTUNNEL_CPU_LIMIT"), "{e}");
    }

    #[test]
    fn crl_is_refused_naming_it() {
        let _g = lock();
        let e = parse(&["--crl-path", "/var/run/secrets/istio/crl/ca-crl.pem"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CRL_PATH"), "{e}");
    }

    #[test]
    fn metadata_keeps_only_istio_meta() {
        let m = proxy_metadata(
            [
                ("ISTIO_META_DNS_CAPTURE", "true"),
                ("ISTIO_META_CLUSTER_ID", "c1"),
                ("NODE_NAME", "n"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m["DNS_CAPTURE"], "true");
        assert_eq!(m["CLUSTER_ID"], "c1");
    }
}
