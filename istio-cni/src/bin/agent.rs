//! `istio-cni-agent`: the node agent (a DaemonSet).
//!
//! Run as `install-cni` (Istio's cni chart: `command: [install-cni]`, the
//! image links that name to this binary; or `istio-cni-agent install-cni`)
//! it takes the chart's contract: settings from the chart's environment
//! (`istio_cni::settings`), the node's dirs under `/host` as the chart
//! mounts them, membership from the Kubernetes API. Flags beat the env
//! either way.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use istio_cni::settings::{log_filter, ChartEnv};
use istio_cni::status::{self, Status};
use istio_cni::{agent, api, host, install};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

const CHART_COMMAND: &str = "install-cni";

#[derive(Parser, Debug)]
#[command(
    name = "istio-cni-agent",
    about = "Captures ambient pods' traffic and hands them to ztunnel over ZDS"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// This node (pods of other nodes are never touched).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
    /// Standalone mesh config that decides membership; watched.
    #[arg(long, conflicts_with = "from_kube")]
    config: Option<PathBuf>,
    /// Decide membership from the Kubernetes API (in-cluster credentials, or
    /// KUBECONFIG): namespaces and this node's pods. The default as
    /// install-cni.
    #[arg(long)]
    from_kube: bool,
    #[arg(long, default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// [env ZTUNNEL_UDS_ADDRESS]
    #[arg(long)]
    zds_socket: Option<PathBuf>,
    /// Where the CNI plugin reaches this agent [default: <CNI_AGENT_RUN_DIR>/pluginevent.sock].
    #[arg(long)]
    plugin_socket: Option<PathBuf>,
    /// Which pods this agent captured (kept across restarts) and the
    /// membership answer the plugin falls back to [env CNI_AGENT_RUN_DIR].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Redirect pods' DNS (port 53) to ztunnel's proxy; a pod annotation
    /// `ambient.istio.io/dns-capture` overrides it [env AMBIENT_DNS_CAPTURE; default true].
    #[arg(long, action = clap::ArgAction::Set)]
    dns_capture: Option<bool>,
    /// Namespaces never captured [env EXCLUDE_NAMESPACES; default kube-system].
    #[arg(long, value_delimiter = ',')]
    exclude_namespaces: Option<Vec<String>>,
    /// Keep the node rule that lets kubelet probes bypass ztunnel.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    probe_snat: bool,
    /// Install the plugin into this CNI config dir and keep it installed
    /// [env MOUNTED_CNI_NET_DIR; as install-cni default <host-root>/etc/cni/net.d].
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// [default /opt/cni/bin; as install-cni <host-root>/opt/cni/bin]
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
    /// The plugin binary to install (default: `istio-cni` next to this agent).
    #[arg(long)]
    plugin_binary: Option<PathBuf>,
    /// Where the node's root filesystem is mounted [as install-cni /host,
    /// as the chart mounts it; else /]: the plugin's netns paths and the
    /// node's /proc are read under it.
    #[arg(long)]
    host_root: Option<PathBuf>,
    /// The node's /proc [default <host-root>/proc].
    #[arg(long)]
    proc_root: Option<PathBuf>,
    /// The runtime's pod netns dir [default <host-root>/var/run/netns].
    #[arg(long)]
    netns_dir: Option<PathBuf>,
    /// Readiness (`GET /readyz`), as Istio's chart probes it.
    #[arg(long, default_value_t = 8000)]
    readiness_port: u16,
    /// Prometheus `/metrics` [env MONITORING_PORT; default 15014].
    #[arg(long)]
    metrics_port: Option<u16>,
    #[arg(long, alias = "log_as_json")]
    log_json: bool,
    /// Istio's log level spelling (`info`, `default:debug,...`); RUST_LOG
    /// when not given.
    #[arg(long = "log_output_level")]
    log_output_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Take the plugin out of the CNI config and bin dirs, then exit.
    Uninstall,
}

/// The agent's settings once flags, the chart's env and the defaults of
/// the mode it runs in are merged.
#[derive(Debug)]
struct Resolved {
    chart: bool,
    zds_socket: PathBuf,
    plugin_socket: PathBuf,
    state_dir: PathBuf,
    dns_capture: bool,
    ipv6: bool,
    exclude_namespaces: Vec<String>,
    cni_conf_dir: Option<PathBuf>,
    cni_conf_name: Option<String>,
    cni_bin_dir: PathBuf,
    host_root: PathBuf,
    proc_root: PathBuf,
    netns_dir: PathBuf,
    host_netns: Option<PathBuf>,
    metrics_port: u16,
}

/// `/x/y` under `root`.
fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn resolve(args: &Args, env: &ChartEnv, chart: bool) -> Resolved {
    let host_root = args
        .host_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(if chart { "/host" } else { "/" }));
    let proc_root = args
        .proc_root
        .clone()
        .unwrap_or_else(|| under(&host_root, "/proc"));
    let run_dir = env.run_dir.clone();
    let cni_conf_dir = args
        .cni_conf_dir
        .clone()
        .or_else(|| env.cni_conf_dir.clone())
        .or_else(|| chart.then(|| under(&host_root, "/etc/cni/net.d")));
    Resolved {
        chart,
        zds_socket: args
            .zds_socket
            .clone()
            .or_else(|| env.zds_socket.clone())
            .unwrap_or_else(|| zds::DEFAULT_SOCKET.into()),
        plugin_socket: args
            .plugin_socket
            .clone()
            .or_else(|| run_dir.as_ref().map(|d| d.join("pluginevent.sock")))
            .unwrap_or_else(|| api::DEFAULT_SOCKET.into()),
        state_dir: args
            .state_dir
            .clone()
            .or(run_dir)
            .unwrap_or_else(|| api::DEFAULT_STATE_DIR.into()),
        dns_capture: args.dns_capture.or(env.dns_capture).unwrap_or(true),
        ipv6: env.ipv6.unwrap_or(true),
        exclude_namespaces: args
            .exclude_namespaces
            .clone()
            .or_else(|| env.exclude_namespaces.clone())
            .unwrap_or_else(|| vec!["kube-system".into()]),
        cni_conf_dir,
        cni_conf_name: env.cni_conf_name.clone(),
        cni_bin_dir: args.cni_bin_dir.clone().unwrap_or_else(|| {
            if chart {
                under(&host_root, "/opt/cni/bin")
            } else {
                "/opt/cni/bin".into()
            }
        }),
        host_netns: env
            .switch_to_host_netns
            .then(|| host::host_netns(&proc_root)),
        netns_dir: args
            .netns_dir
            .clone()
            .unwrap_or_else(|| under(&host_root, "/var/run/netns")),
        host_root,
        proc_root,
        metrics_port: args.metrics_port.or(env.monitoring_port).unwrap_or(15014),
    }
}

/// Whether we run as Istio's `install-cni` (by name, or as the first
/// argument, which is then taken out).
fn chart_mode(argv: &mut Vec<String>) -> bool {
    let by_name = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == CHART_COMMAND);
    let by_arg = argv.get(1).is_some_and(|a| a == CHART_COMMAND);
    if by_arg {
        argv.remove(1);
    }
    by_name || by_arg
}

fn main() -> anyhow::Result<()> {
    let mut argv: Vec<String> = std::env::args().collect();
    let chart = chart_mode(&mut argv);
    let args = Args::parse_from(argv);
    let vars = std::env::vars().collect();
    let env = ChartEnv::from_vars(&vars).context("the istio-cni chart's environment")?;
    if let Some(spec) = &args.log_output_level {
        let filter =
            log_filter(spec).map_err(|e| anyhow::anyhow!("--log_output_level={spec}: {e}"))?;
        std::env::set_var("RUST_LOG", filter);
    }
    admin::init_logging(args.log_json);
    let cfg = resolve(&args, &env, chart);
    if let Some(Cmd::Uninstall) = args.cmd {
        let dir = cfg.cni_conf_dir.context("uninstall needs --cni-conf-dir")?;
        let changed = install::uninstall(&dir, &cfg.cni_bin_dir)?;
        tracing::info!(?changed, "istio-cni plugin uninstalled");
        return Ok(());
    }
    if !cfg.ipv6 {
        tracing::warn!(
            "AMBIENT_IPV6=false: no IPv6 rules are written; ambient pods with an IPv6 address are refused (their ADD fails) rather than left half outside the mesh"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(args, cfg))
}

async fn run(args: Args, cfg: Resolved) -> anyhow::Result<()> {
    anyhow::ensure!(!args.node.is_empty(), "--node (or NODE_NAME) is required");
    // As install-cni the mesh is the cluster's, unless a file is given.
    let from_kube = args.from_kube || (cfg.chart && args.config.is_none());
    anyhow::ensure!(
        from_kube || args.config.is_some(),
        "membership needs --config <file> or --from-kube"
    );
    tracing::info!(chart = cfg.chart, ?cfg, "node agent starting");
    let (stop_tx, stop) = watch::channel(false);
    let status = Arc::new(Status::new(cfg.cni_conf_dir.is_some()));
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    status::serve(
        status.clone(),
        any(args.readiness_port),
        any(cfg.metrics_port),
        stop.clone(),
    )
    .await?;
    // The same opening the waypoint uses: the standalone file (parsed once,
    // a bad file is a startup error, then watched) or, with --from-kube,
    // namespaces and this node's pods watched through the API and complete
    // before the first decision (a view without the pods would release every
    // captured one).
    let source = kube_source::open(
        args.config.as_deref(),
        kube_source::Selection::node_agent(&args.node),
        &args.trust_domain,
        stop.clone(),
    )
    .await
    .context(if from_kube {
        "mesh config from the Kubernetes API"
    } else {
        "mesh config file"
    })?;
    let mut installer = None;
    if let Some(conf_dir) = cfg.cni_conf_dir.clone() {
        let plugin = match &args.plugin_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("istio-cni"),
        };
        anyhow::ensure!(
            plugin.exists(),
            "plugin binary {} not found (--plugin-binary)",
            plugin.display()
        );
        // Installed anyway (it works where the libc matches), but said.
        if install::is_dynamic(&plugin)? {
            tracing::warn!(plugin = %plugin.display(), "the CNI plugin is dynamically linked: on a node with another libc every pod ADD fails; install the static (musl) build");
        }
        let entry = serde_json::json!({
            "type": install::PLUGIN_TYPE,
            "agent_socket": cfg.plugin_socket,
            "agent_state_dir": cfg.state_dir,
            "exclude_namespaces": cfg.exclude_namespaces,
        });
        installer = Some(tokio::spawn(install::keep_installed(
            plugin,
            cfg.cni_bin_dir.clone(),
            install::ConfTarget {
                dir: conf_dir,
                name: cfg.cni_conf_name.clone(),
            },
            entry,
            status.clone(),
            stop.clone(),
        )));
    }
    let agent_cfg = agent::Config {
        node: args.node,
        store: source.store,
        zds_socket: cfg.zds_socket,
        plugin_socket: cfg.plugin_socket,
        state_dir: cfg.state_dir,
        dns_capture: cfg.dns_capture,
        ipv6: cfg.ipv6,
        exclude_namespaces: cfg.exclude_namespaces,
        probe_snat: args.probe_snat,
        host_netns: cfg.host_netns,
        host_root: cfg.host_root,
        proc_root: cfg.proc_root,
        netns_dir: cfg.netns_dir,
        annotator: if from_kube {
            Some(kube_source::PodAnnotator::new().await?)
        } else {
            None
        },
        status,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut agent = tokio::spawn(agent::run(agent_cfg, stop));
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = &mut agent => return r?,
    }
    tracing::info!("signal received; stopping (the plugin stays installed, pods stay captured)");
    stop_tx.send_replace(true);
    agent.await??;
    if let Some(i) = installer {
        let _ = i.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> (Args, bool) {
        let mut v: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let chart = chart_mode(&mut v);
        (Args::try_parse_from(v).unwrap(), chart)
    }

    fn env(pairs: &[(&str, &str)]) -> ChartEnv {
        ChartEnv::from_vars(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn install_cni_by_name_or_argument_takes_the_charts_defaults() {
        for argv in [
            &["/usr/local/bin/install-cni", "--log_output_level=info"][..],
            &[
                "istio-cni-agent",
                "install-cni",
                "--log_output_level=info",
                "--log_as_json",
            ],
        ] {
            let (args, chart) = parse(argv);
            assert!(chart, "{argv:?}");
            assert_eq!(args.log_output_level.as_deref(), Some("info"));
            let r = resolve(&args, &env(&[("ALLOW_SWITCH_TO_HOST_NS", "true")]), chart);
            assert_eq!(r.cni_conf_dir, Some("/host/etc/cni/net.d".into()));
            assert_eq!(r.cni_bin_dir, PathBuf::from("/host/opt/cni/bin"));
            assert_eq!(r.proc_root, PathBuf::from("/host/proc"));
            assert_eq!(r.netns_dir, PathBuf::from("/host/var/run/netns"));
            assert_eq!(r.host_netns, Some("/host/proc/1/ns/net".into()));
            assert_eq!(r.plugin_socket, PathBuf::from(api::DEFAULT_SOCKET));
            assert_eq!(r.metrics_port, 15014);
            assert!(r.dns_capture);
            assert!(r.ipv6, "IPv6 is captured unless AMBIENT_IPV6=false");
        }
        let r = resolve(
            &parse(&["x", "--node", "n"]).0,
            &env(&[("AMBIENT_IPV6", "false")]),
            false,
        );
        assert!(!r.ipv6);
        let (args, chart) = parse(&["istio-cni-agent", "--node", "n"]);
        assert!(!chart);
        let r = resolve(&args, &ChartEnv::default(), chart);
        assert_eq!(r.cni_conf_dir, None);
        assert_eq!(r.proc_root, PathBuf::from("/proc"));
        assert_eq!(r.host_netns, None);
    }

    #[test]
    fn flags_beat_the_env_and_the_env_beats_defaults() {
        let e = env(&[
            ("MOUNTED_CNI_NET_DIR", "/host/etc/cni/multus"),
            ("CNI_AGENT_RUN_DIR", "/run/cni"),
            ("AMBIENT_DNS_CAPTURE", "false"),
            ("EXCLUDE_NAMESPACES", "kube-system,istio-system"),
            ("MONITORING_PORT", "9015"),
            ("ZTUNNEL_UDS_ADDRESS", "/run/zt.sock"),
        ]);
        let (args, chart) = parse(&["install-cni"]);
        let r = resolve(&args, &e, chart);
        assert_eq!(r.cni_conf_dir, Some("/host/etc/cni/multus".into()));
        assert_eq!(r.plugin_socket, PathBuf::from("/run/cni/pluginevent.sock"));
        assert_eq!(r.state_dir, PathBuf::from("/run/cni"));
        assert!(!r.dns_capture);
        assert_eq!(r.exclude_namespaces, ["kube-system", "istio-system"]);
        assert_eq!(r.metrics_port, 9015);
        assert_eq!(r.zds_socket, PathBuf::from("/run/zt.sock"));
        let (args, chart) = parse(&[
            "install-cni",
            "--cni-conf-dir=/etc/cni/net.d",
            "--state-dir=/s",
            "--plugin-socket=/s/p.sock",
            "--dns-capture=true",
            "--exclude-namespaces=a",
            "--metrics-port=1",
            "--zds-socket=/z.sock",
            "--host-root=/tmp/h",
        ]);
        let r = resolve(&args, &e, chart);
        assert_eq!(r.cni_conf_dir, Some("/etc/cni/net.d".into()));
        assert_eq!(r.plugin_socket, PathBuf::from("/s/p.sock"));
        assert_eq!(r.state_dir, PathBuf::from("/s"));
        assert!(r.dns_capture);
        assert_eq!(r.exclude_namespaces, ["a"]);
        assert_eq!(r.metrics_port, 1);
        assert_eq!(r.zds_socket, PathBuf::from("/z.sock"));
        assert_eq!(r.cni_bin_dir, PathBuf::from("/tmp/h/opt/cni/bin"));
        assert_eq!(r.proc_root, PathBuf::from("/tmp/h/proc"));
    }
}
