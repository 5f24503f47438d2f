//! `istio-cni-agent`: the node agent (a DaemonSet with host networking).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use istio_cni::{agent, api, install};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

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
    #[arg(
        long,
        required_unless_present = "from_kube",
        conflicts_with = "from_kube"
    )]
    config: Option<PathBuf>,
    /// Decide membership from the Kubernetes API (in-cluster credentials, or
    /// KUBECONFIG): namespaces and this node's pods.
    #[arg(long)]
    from_kube: bool,
    #[arg(long, default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = zds::DEFAULT_SOCKET)]
    zds_socket: PathBuf,
    /// Where the CNI plugin reaches this agent.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    plugin_socket: PathBuf,
    /// Which pods this agent captured (kept across restarts) and the
    /// membership answer the plugin falls back to.
    #[arg(long, default_value = api::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Redirect pods' DNS (port 53) to ztunnel's proxy; a pod annotation
    /// `ambient.istio.io/dns-capture` overrides it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    dns_capture: bool,
    /// Namespaces never captured.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    exclude_namespaces: Vec<String>,
    /// Keep the node rule that lets kubelet probes bypass ztunnel.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    probe_snat: bool,
    /// Install the plugin into this CNI config dir and keep it installed.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The plugin binary to install (default: `istio-cni` next to this agent).
    #[arg(long)]
    plugin_binary: Option<PathBuf>,
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Take the plugin out of the CNI config and bin dirs, then exit.
    Uninstall,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    admin::init_logging(args.log_json);
    if let Some(Cmd::Uninstall) = args.cmd {
        let dir = args
            .cni_conf_dir
            .context("uninstall needs --cni-conf-dir")?;
        let changed = install::uninstall(&dir, &args.cni_bin_dir)?;
        tracing::info!(?changed, "istio-cni plugin uninstalled");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!args.node.is_empty(), "--node (or NODE_NAME) is required");
    let (stop_tx, stop) = watch::channel(false);
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
    .context(if args.from_kube {
        "mesh config from the Kubernetes API"
    } else {
        "mesh config file"
    })?;
    let store = source.store;
    let mut installer = None;
    if let Some(conf_dir) = args.cni_conf_dir.clone() {
        let plugin = match &args.plugin_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("istio-cni"),
        };
        anyhow::ensure!(
            plugin.exists(),
            "plugin binary {} not found (--plugin-binary)",
            plugin.display()
        );
        let entry = serde_json::json!({
            "type": install::PLUGIN_TYPE,
            "agent_socket": args.plugin_socket,
            "agent_state_dir": args.state_dir,
            "exclude_namespaces": args.exclude_namespaces,
        });
        installer = Some(tokio::spawn(install::keep_installed(
            plugin,
            args.cni_bin_dir.clone(),
            conf_dir,
            entry,
            stop.clone(),
        )));
    }
    let cfg = agent::Config {
        node: args.node,
        store,
        zds_socket: args.zds_socket,
        plugin_socket: args.plugin_socket,
        state_dir: args.state_dir,
        dns_capture: args.dns_capture,
        exclude_namespaces: args.exclude_namespaces,
        probe_snat: args.probe_snat,
        annotator: if args.from_kube {
            Some(kube_source::PodAnnotator::new().await?)
        } else {
            None
        },
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut agent = tokio::spawn(agent::run(cfg, stop));
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
