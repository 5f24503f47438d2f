//! waypoint: the namespace-scoped L7 proxy of the ambient mesh. ztunnels send
//! it the traffic of services (or pods) labelled `istio.io/use-waypoint`; it
//! terminates HBONE, applies routes and L7 policy, and tunnels on to the
//! chosen endpoint's ztunnel.

use waypoint::{lb, listen, proxy, telemetry, upstream};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use identity::{BuiltinCa, CertificateAuthority, Identity, SecretManager};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

// jemalloc by default, as ztunnel: with glibc, malloc/free (and its
// fastbin consolidation) were ~11% of the waypoint's samples on the bench;
// jemalloc gave ~8% more requests/s for ~1 MiB more peak RSS.
#[cfg(feature = "jemalloc")]
admin::jemalloc_global_allocator!();

#[derive(Parser, Debug)]
#[command(
    name = "waypoint",
    about = "Namespace-scoped L7 proxy of the ambient mesh"
)]
struct Args {
    /// The Gateway (class istio-waypoint) this process serves.
    #[arg(long, env = "WAYPOINT_NAME")]
    name: String,
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// This waypoint's pod (in --namespace): endpoints of a service that
    /// prefers close ones are chosen by its node's locality.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// The waypoint's service account (its SPIFFE identity); default: --name.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Standalone mesh config (the same file as ztunnel's); watched.
    #[arg(
        long,
        required_unless_present = "from_kube",
        conflicts_with = "from_kube"
    )]
    config: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster credentials, or KUBECONFIG) for
    /// Gateways, routes, policies, Services and Pods instead of --config.
    #[arg(long)]
    from_kube: bool,
    /// istiod's CA (host:port): the waypoint's certificate comes from it
    /// instead of the built-in CA.
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    #[arg(long, default_value = "istiod.istio-system.svc")]
    ca_server_name: String,
    /// PEM root istiod's serving certificate chains to.
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    ca_root_cert: PathBuf,
    /// Projected service-account token (audience istio-ca).
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    token_path: PathBuf,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "/var/lib/ztunnel/ca")]
    ca_dir: PathBuf,
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    #[arg(long, default_value = "24h", value_parser = mesh::routes::parse_duration)]
    cert_ttl: Duration,
    /// HBONE listener; an unspecified address (the default) listens on
    /// both families, IPv6 skipped when the pod has none.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// A client must send a request's whole header block within this, and an
    /// idle keep-alive connection closes after it (slow-loris bound).
    #[arg(long, default_value = "30s", value_parser = mesh::routes::parse_duration)]
    request_header_timeout: Duration,
    /// Request bodies stream through; the first this many bytes of each are
    /// also kept so that a retry or a mirror can send the body again. A body
    /// that outgrows it is sent once, never retried nor mirrored (the access
    /// log's `not_retried` says so). A bound per request, as Envoy's
    /// per-request buffer limit: memory stays this times the concurrent
    /// requests at most, whatever the bodies' sizes.
    #[arg(long, default_value_t = 64 * 1024)]
    request_replay_buffer: usize,
    /// PEM CA certificates trusted for RequestAuthentication `jwksUri`
    /// servers, besides the system's (`/etc/ssl/certs`).
    #[arg(long, env = "JWKS_CA_FILE")]
    jwks_ca_file: Option<PathBuf>,
    /// A fetched JWKS is fetched again after this (Istio's
    /// PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default).
    #[arg(long, default_value = "20m", value_parser = mesh::routes::parse_duration)]
    jwks_refresh_interval: Duration,
    /// A token naming a key the JWKS lacks (a rotation) fetches it again,
    /// at most once per this per URI.
    #[arg(long, default_value = "5s", value_parser = mesh::routes::parse_duration)]
    jwks_min_refetch_interval: Duration,
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    #[command(flatten)]
    process: admin::flags::ProcessFlags,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs on stderr; stdout carries the access log.
    args.process.init_logging();
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
            metrics_exporter_prometheus::Matcher::Full(
                "istio_request_duration_milliseconds".into(),
            ),
            telemetry::DURATION_BUCKETS_MS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_bytes".into()),
            telemetry::SIZE_BUCKETS,
        )?
        .install_recorder()
        .context("install metrics recorder")?;
    ::metrics::gauge!("istio_build", "component" => "waypoint", "tag" => env!("CARGO_PKG_VERSION"))
        .set(1.0);

    let (drain_tx, drain) = watch::channel(false);
    admin::drain_histograms(prom.clone(), drain.clone());
    let kube_source::Source { store, dropped } = kube_source::open(
        args.config.as_deref(),
        kube_source::Selection::waypoint(&args.name, &args.namespace),
        &args.trust_domain,
        drain.clone(),
    )
    .await?;
    let state = store.load();
    if !state
        .waypoints
        .iter()
        .any(|w| w.name == args.name && w.namespace == args.namespace)
    {
        tracing::warn!(name = args.name, namespace = args.namespace, "no Gateway of class istio-waypoint by this name in the config (yet): policies targeting it will not match");
    }
    let ca: Arc<dyn CertificateAuthority> = match &args.ca_address {
        Some(address) => Arc::new(
            xds::IstioCa::new(
                xds::ControlPlane {
                    address: address.clone(),
                    server_name: args.ca_server_name.clone(),
                    root_cert: args.ca_root_cert.clone(),
                    token: Some(args.token_path.clone()),
                    cluster_id: args.cluster_id.clone(),
                },
                false,
            )
            .context("Istio CA client")?,
        ),
        None => Arc::new(match (&args.ca_cert, &args.ca_key) {
            (Some(c), Some(k)) => BuiltinCa::from_files(c, k)?,
            _ => BuiltinCa::load_or_create(&args.ca_dir, &args.trust_domain)?,
        }),
    };
    let certs = SecretManager::new(ca, args.cert_ttl);
    let id = Identity::new(
        &args.trust_domain,
        &args.namespace,
        args.service_account.as_deref().unwrap_or(&args.name),
    );
    certs.retain(&id);
    certs
        .fetch(&id)
        .await
        .with_context(|| format!("certificate for {id}"))?;

    let wp = Arc::new(proxy::Waypoint {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        store: store.clone(),
        certs: certs.clone(),
        identity: id.clone(),
        upstreams: upstream::Upstreams::new(certs.clone(), id.clone()),
        backends: lb::Backends::default(),
        drain: drain.clone(),
        header_timeout: args.request_header_timeout,
        live: Default::default(),
        upgraded: Default::default(),
        replay_buffer: args.request_replay_buffer,
        jwks: Arc::new(
            waypoint::jwt::Jwks::new(
                args.jwks_ca_file.as_deref(),
                args.jwks_refresh_interval,
                args.jwks_min_refetch_interval,
            )
            .context("JWKS client")?,
        ),
        pod: args.pod_name.clone(),
    });
    wp.watch_live();

    let listeners =
        listen::bind(args.listen).with_context(|| format!("listen on {}", args.listen))?;
    let tasks = TaskTracker::new();
    telemetry::start_access_log_flusher();
    for l in listeners {
        tokio::spawn(accept(wp.clone(), l, tasks.clone()));
    }

    let dump = {
        let wp = wp.clone();
        move || config_dump(&wp, &dropped.lock().unwrap())
    };
    let process = admin::ProcessMetrics::new();
    let scrape = move || {
        process.collect();
        prom.render()
    };
    admin::endpoints(args.process.addrs(), dump, scrape, || None, drain.clone()).await?;
    tracing::info!(name = args.name, namespace = args.namespace, identity = %id, listen = %args.listen, "waypoint started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(live = tasks.len(), "draining");
    drain_tx.send_replace(true);
    tasks.close();
    if tokio::time::timeout(args.process.drain_timeout(), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(left = tasks.len(), "drain deadline passed");
    }
    telemetry::flush_access_log();
    Ok(())
}

async fn accept(wp: Arc<proxy::Waypoint>, l: TcpListener, tasks: TaskTracker) {
    let mut drain = wp.drain.clone();
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = drain.wait_for(|d| *d) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tasks.spawn(connection(wp.clone(), tcp, peer));
    }
}

/// One mTLS connection from a ztunnel: the peer's identity comes from its
/// verified certificate only.
async fn connection(wp: Arc<proxy::Waypoint>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let Ok(cert) = wp.certs.fetch(&wp.identity).await else {
        return;
    };
    let (tls, src) = match hbone::terminate(cert.server.clone(), tcp).await {
        Ok((tls, id)) => (tls, Arc::new(id)),
        Err(e) => return tracing::warn!(%peer, error = %e, "HBONE connection not terminated"),
    };
    let handler = {
        let wp = wp.clone();
        move |inb: hbone::Inbound| proxy::stream(wp.clone(), src.clone(), peer, inb)
    };
    hbone::log_end(peer, hbone::serve(tls, wp.drain.clone(), handler).await);
}

fn config_dump(wp: &proxy::Waypoint, dropped: &[mesh::Rejected]) -> String {
    let state = wp.store.load();
    let ejected: Vec<_> = wp
        .backends
        .ejected()
        .into_iter()
        .map(|(b, ips)| serde_json::json!({"backend": b, "ejected": ips}))
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "waypoint": {"name": wp.name, "namespace": wp.namespace, "identity": wp.identity.to_string()},
        "config": wp.store.status(),
        // The pods it holds: those of what it serves (a Kubernetes source
        // watches no others).
        "workloads": state.workloads.values().map(|w| format!("{}/{}", w.namespace, w.name)).collect::<Vec<_>>(),
        "routes": state.http_routes,
        "destination_rules": state.destination_rules,
        "policies": state.waypoint_policies,
        "request_authentications": state.request_authentications,
        // meshConfig's extension providers (CUSTOM policies' authorizers).
        "extension_providers": state.extension_providers,
        // Objects not translatable as written: policies kept fail-closed
        // (`rejected`) and other objects the Kubernetes source left out.
        "rejected": state.rejected.iter().chain(dropped).collect::<Vec<_>>(),
        "outlier_ejections": ejected,
        "hbone_pool": wp.upstreams.pool().stats().into_iter().map(|(k, c, s)| serde_json::json!({"destination": k.dst.to_string(), "connections": c, "streams": s})).collect::<Vec<_>>(),
    }))
    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
