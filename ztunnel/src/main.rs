//! ztunnel: the per-node L4 proxy of the ambient mesh.

mod dns;
mod dump;
mod flags;
mod metrics;
mod netns;
mod pods;
mod proxy;
mod trim;

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use flags::Args;
use identity::{BuiltinCa, CertificateAuthority, SecretManager};
use mesh::MeshStore;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

// jemalloc by default, as upstream ztunnel: the data path's large,
// short-lived read chunks made glibc map, fault in and trim pages over and
// over (bench/README.md).
#[cfg(feature = "jemalloc")]
admin::jemalloc_global_allocator!();

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.process.init_logging();
    // Before any other thread exists: the netns every thread returns to.
    netns::init_host_netns().context("open own network namespace")?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads())
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
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

    let cluster_id = args.cluster_id();
    mesh::owner::set_local_cluster(&cluster_id);
    let drain_timeout = args.process.drain_timeout();
    tracing::info!(
        cluster_id,
        network = args.network,
        worker_threads = args.worker_threads(),
        cpu_limit = args.cpu_limit,
        resource_cpu_limit = args.resource_cpu_limit,
        resource_cpu_request = args.resource_cpu_request,
        dns_proxy = args.dns_proxy(),
        drain_timeout_s = drain_timeout.as_secs_f64(),
        "configuration"
    );
    let (drain_tx, drain) = watch::channel(false);
    admin::drain_histograms(prom.clone(), drain.clone());
    let control_plane = |address: &str| xds::ControlPlane {
        address: address.to_string(),
        server_name: args.xds_server_name.clone(),
        root_cert: args.xds_root_cert.clone(),
        token: Some(args.token_path.clone()),
        cluster_id: cluster_id.clone(),
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
                    cluster_id: cluster_id.clone(),
                    network: args.network.clone(),
                    metadata: flags::proxy_metadata(std::env::vars()),
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
        dns_proxy: args.dns_proxy(),
    });
    proxy::watch_live(&px);
    // jemalloc gives memory back itself.
    if cfg!(not(feature = "jemalloc")) {
        trim::spawn(metrics::live_connections);
    }
    let pods = pods::Pods::new(px.clone());

    tokio::spawn(pods.clone().run_zds(args.zds_socket.clone(), drain.clone()));

    let dump = {
        let sources = dump::Sources {
            node: args.node.clone(),
            cluster_id: cluster_id.clone(),
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
    admin::endpoints(args.process.addrs(), dump, scrape, not_ready, drain.clone()).await?;
    tracing::info!(node = %args.node, zds = %args.zds_socket.display(), "ztunnel started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let live = px.tasks.len();
    tracing::info!(
        live_connections = live,
        deadline_s = drain_timeout.as_secs(),
        "draining: no new connections"
    );
    drain_tx.send_replace(true);
    pods.stop_all();
    px.tasks.close();
    if tokio::time::timeout(drain_timeout, px.tasks.wait())
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
