//! The three small HTTP endpoints every proxy serves: admin (localhost
//! 15000), metrics (15020), readiness (15021).

#[cfg(feature = "jemalloc")]
pub mod allocator;
pub mod flags;
mod logging;
mod process;

pub use process::ProcessMetrics;

pub use logging::{LevelError, Levels};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Reply = (StatusCode, &'static str, String);

/// Serves `route` on `addr` until `drain` flips; each request gets its
/// method and URI.
pub async fn serve<F>(
    addr: SocketAddr,
    route: F,
    drain: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    F: Fn(&http::Method, &http::Uri) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let route = Arc::new(route);
    Ok(tokio::spawn(async move {
        let mut drain = drain;
        loop {
            let (s, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                _ = drain.wait_for(|d| *d) => return,
            };
            let route = route.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let route = route.clone();
                    let (method, uri) = (req.method().clone(), req.uri().clone());
                    async move {
                        // Off the runtime's workers: a dump serializes the
                        // whole mesh state and a scrape reads /proc, while
                        // those workers carry the proxied traffic.
                        let (status, ctype, body) =
                            tokio::task::spawn_blocking(move || route(&method, &uri))
                                .await
                                .unwrap_or_else(|_| {
                                    (
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "text/plain",
                                        "handler failed\n".into(),
                                    )
                                });
                        let resp = Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts");
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    }))
}

/// Where the three endpoints listen.
pub struct Addrs {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Starts the standard endpoints of a proxy: `/config_dump` (admin, JSON from
/// `dump`), `/metrics` and `/stats/prometheus` (text from `scrape`), and
/// `/healthz/ready` (503 with the reason `not_ready` gives, else 200), and
/// `/logging` (admin: the log level, changed at run time).
/// Admin and metrics stop with `drain`; readiness keeps answering 503 through
/// the drain, until the process exits.
pub async fn endpoints(
    addrs: Addrs,
    dump: impl Fn() -> String + Send + Sync + 'static,
    scrape: impl Fn() -> String + Send + Sync + 'static,
    not_ready: impl Fn() -> Option<&'static str> + Send + Sync + 'static,
    drain: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let named = |what: &'static str, addr: SocketAddr| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}"))
    };
    serve(
        addrs.admin,
        move |method, uri| match uri.path() {
            "/config_dump" => (StatusCode::OK, "application/json", dump()),
            "/logging" => logging::handle(method, uri.query()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /config_dump or /logging\n".into(),
            ),
        },
        drain.clone(),
    )
    .await
    .map_err(named("admin", addrs.admin))?;
    serve(
        addrs.metrics,
        move |_, uri| match uri.path() {
            "/metrics" | "/stats/prometheus" => {
                (StatusCode::OK, "text/plain; version=0.0.4", scrape())
            }
            _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
        },
        drain.clone(),
    )
    .await
    .map_err(named("metrics", addrs.metrics))?;
    let ready = move |_: &http::Method, uri: &http::Uri| match uri.path() {
        "/healthz/ready" => match (*drain.borrow(), not_ready()) {
            (true, _) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            ),
            (false, Some(why)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
            (false, None) => (StatusCode::OK, "text/plain", "ready\n".into()),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /healthz/ready\n".into(),
        ),
    };
    // Its stop signal is one nobody sends: it lives as long as the process.
    let (never_tx, never) = watch::channel(false);
    std::mem::forget(never_tx);
    serve(addrs.readiness, ready, never)
        .await
        .map_err(named("readiness", addrs.readiness))?;
    Ok(())
}

/// Structured logs on stderr (stdout stays free for access logs), text or
/// JSON lines, filtered by RUST_LOG (default info); `/logging` on the admin
/// port changes the filter at run time.
pub fn init_logging(json: bool) {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| tracing_subscriber::EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "info".into());
    init_logging_with(json, &initial)
}

/// As `init_logging`, with the filter given (`flags::ProcessFlags` has
/// validated it).
pub fn init_logging_with(json: bool, initial: &str) {
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(initial))
        .with_writer(std::io::stderr)
        // Colour only for a terminal: in a file or `kubectl logs` the escape
        // codes would sit between every field name and its value.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The two builders' handles have different types: each is wrapped in
    // the same closure.
    if json {
        // Fields at the top level, beside level and message, as upstream
        // ztunnel writes them: log pipelines index `src.addr` directly.
        let fmt = fmt.json().flatten_event(true).with_filter_reloading();
        let handle = fmt.reload_handle();
        logging::install(
            initial,
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
        );
        fmt.init();
    } else {
        let fmt = fmt.with_filter_reloading();
        let handle = fmt.reload_handle();
        logging::install(
            initial,
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
        );
        fmt.init();
    }
}

/// Drains the recorder's histogram buckets every few seconds. They hold raw
/// samples until drained, and only a scrape drains them otherwise: a proxy
/// nobody scrapes would grow by every sample it ever recorded (the soak in
/// bench/ showed the waypoint gaining ~0.6 MiB a minute at 200 req/s).
pub fn drain_histograms(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                _ = stop.changed() => return,
            }
        }
    });
}
