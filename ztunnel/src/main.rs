//! ztunnel: the per-node L4 proxy of the ambient mesh.

mod dns;
mod dump;
mod metrics;
mod netns;
mod pods;
mod proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use identity::{BuiltinCa, CertificateAuthority, SecretManager};
use mesh::MeshStore;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel",
    about = "Per-node L4 proxy of the ambient mesh (HBONE, mTLS, L4 policy)"
)]
struct Args {
    /// The node whose pods this ztunnel serves.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Standalone mesh config (multi-document Kubernetes-style YAML); watched.
    #[arg(
        long,
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    config: Option<PathBuf>,
    /// istiod's secure xDS address (host:port): the mesh comes from istiod's
    /// WDS instead of --config, and certificates from istiod's CA.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// The name istiod's certificate carries.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    xds_server_name: String,
    /// PEM root that istiod's serving certificate chains to.
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    xds_root_cert: PathBuf,
    /// Istio CA address; defaults to --xds-address. Setting it (or
    /// --xds-address) replaces the built-in CA.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// Projected service-account token (audience istio-ca) sent to istiod.
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    token_path: PathBuf,
    /// This ztunnel's own pod, as istiod identifies its xDS clients.
    #[arg(long, env = "INSTANCE_IP")]
    pod_ip: Option<std::net::IpAddr>,
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "ztunnel")]
    service_account: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Built-in CA state: the root is created here on first start.
    #[arg(long, default_value = "/var/lib/ztunnel/ca")]
    ca_dir: PathBuf,
    /// Use this root certificate (PEM) instead of --ca-dir; needs --ca-key.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Workload certificate lifetime (e.g. 24h, 30m, 10s); renewed at half life.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// The node agent's ZDS socket (ztunnel connects to it).
    #[arg(long, default_value = zds::DEFAULT_SOCKET)]
    zds_socket: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// How long SIGTERM waits for live connections before exiting.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Data-path threads (the runtime's workers).
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh::routes::parse_duration(s)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    admin::init_logging(args.log_json);
    // Before any other thread exists: the netns every thread returns to.
    netns::init_host_netns().context("open own network namespace")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    mesh::owner::set_local_cluster(&args.cluster_id);
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Prefix("istio_dns_".into()),
            dns::BUCKETS,
        )
        .context("metric buckets")?
        .install_recorder()
        .context("install metrics recorder")?;
    ::metrics::gauge!("istio_build", "component" => "ztunnel", "tag" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    xds::register_metrics();

    let (drain_tx, drain) = watch::channel(false);
    admin::drain_histograms(prom.clone(), drain.clone());
    let control_plane = |address: &str| xds::ControlPlane {
        address: address.to_string(),
        server_name: args.xds_server_name.clone(),
        root_cert: args.xds_root_cert.clone(),
        token: Some(args.token_path.clone()),
        cluster_id: args.cluster_id.clone(),
    };
    // Cluster mode starts empty and fails closed until istiod's first full
    // sync; standalone starts from the file or not at all.
    let (ads_tx, ads_status) = watch::channel(xds::AdsStatus::default());
    let store = match (&args.config, &args.xds_address) {
        (Some(path), _) => {
            let store = mesh::open_file(path, &args.trust_domain, drain.clone())?;
            ads_tx.send_replace(xds::AdsStatus {
                connected: true,
                synced: true,
            });
            store
        }
        (None, Some(address)) => {
            let store = MeshStore::new(mesh::MeshState::default(), &format!("xds://{address}"));
            let ip = args
                .pod_ip
                .context("--pod-ip (INSTANCE_IP) is required with --xds-address")?;
            let ads = xds::Ads {
                cp: control_plane(address),
                proxy: xds::ProxyInfo {
                    ip,
                    pod_name: args.pod_name.clone(),
                    pod_namespace: args.pod_namespace.clone(),
                    node_name: args.node.clone(),
                    service_account: args.service_account.clone(),
                    cluster_id: args.cluster_id.clone(),
                },
                store: store.clone(),
                status: ads_tx,
            };
            tokio::spawn(ads.run(drain.clone()));
            store
        }
        (None, None) => unreachable!("clap requires --config or --xds-address"),
    };

    let ca: Arc<dyn CertificateAuthority> =
        match args.ca_address.as_ref().or(args.xds_address.as_ref()) {
            Some(address) => Arc::new(
                xds::IstioCa::new(control_plane(address), true).context("Istio CA client")?,
            ),
            None => Arc::new(match (&args.ca_cert, &args.ca_key) {
                (Some(c), Some(k)) => BuiltinCa::from_files(c, k)?,
                _ => BuiltinCa::load_or_create(&args.ca_dir, &args.trust_domain)?,
            }),
        };
    let certs = SecretManager::new(ca, args.cert_ttl);

    let px = Arc::new(proxy::Proxy {
        store: store.clone(),
        certs: certs.clone(),
        pool: hbone::Pool::new(),
        trust_domain: args.trust_domain.clone(),
        node: args.node.clone(),
        tasks: TaskTracker::new(),
        drain: drain.clone(),
        live: Default::default(),
    });
    proxy::watch_live(&px);
    let pods = pods::Pods::new(px.clone());

    tokio::spawn(pods.clone().run_zds(args.zds_socket.clone(), drain.clone()));

    let dump = {
        let sources = dump::Sources {
            node: args.node.clone(),
            cluster_id: args.cluster_id.clone(),
            store: store.clone(),
            certs: certs.clone(),
            pods: pods.clone(),
            px: px.clone(),
        };
        move || dump::config_dump(&sources)
    };
    let process = admin::ProcessMetrics::new();
    let scrape = {
        let (certs, zds, ads) = (
            certs.clone(),
            pods.zds_connected.subscribe(),
            ads_status.clone(),
        );
        let cluster = args.xds_address.is_some();
        move || {
            // Point-in-time values are refreshed at scrape time.
            process.collect();
            ::metrics::gauge!("ztunnel_zds_connected").set(if *zds.borrow() { 1.0 } else { 0.0 });
            if cluster {
                ::metrics::gauge!("ztunnel_xds_connected").set(if ads.borrow().connected {
                    1.0
                } else {
                    0.0
                });
            }
            for c in certs.snapshot().into_iter().flatten() {
                let exp = c
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                ::metrics::gauge!("ztunnel_certificate_expiration_timestamp_seconds", "identity" => c.identity.to_string()).set(exp);
            }
            prom.render()
        }
    };
    let zds = pods.zds_connected.subscribe();
    let not_ready = move || {
        if !ads_status.borrow().synced {
            Some("waiting for istiod's first full xDS sync")
        } else {
            (!*zds.borrow()).then_some("waiting for the node agent (ZDS)")
        }
    };
    let addrs = admin::Addrs {
        admin: args.admin_addr,
        metrics: args.metrics_addr,
        readiness: args.readiness_addr,
    };
    admin::endpoints(addrs, dump, scrape, not_ready, drain.clone()).await?;
    tracing::info!(node = %args.node, zds = %args.zds_socket.display(), "ztunnel started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let live = px.tasks.len();
    tracing::info!(
        live_connections = live,
        deadline_s = args.drain_timeout.as_secs(),
        "draining: no new connections"
    );
    drain_tx.send_replace(true);
    pods.stop_all();
    px.tasks.close();
    if tokio::time::timeout(args.drain_timeout, px.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = px.tasks.len(),
            "drain deadline passed; closing remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    Ok(())
}
