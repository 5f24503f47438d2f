//! Config scale: how the mesh state copes with cluster-sized meshes. Meshes
//! of N pods: 100 per namespace, one Service per 5 pods, one
//! AuthorizationPolicy per 10 pods (`gen`), fed three ways:
//! - in process into the WDS source (`xds::wds::Resources`) and as a
//!   standalone file (`inproc`);
//! - as the standalone file and as Kubernetes watch events through the
//!   incremental translator, one change at a time (`objects`);
//! - over a real delta-ADS gRPC stream from the bench's own xDS server
//!   (`ads_server`) into the real client (`xds::Ads` and a `MeshStore`) in
//!   a separate process (`ads_client`), measured by `ads_bench`.
//!
//! Prints tables, and JSON with `--json`. `--only-ads` skips the in-process
//! rows, `--no-ads` the delta-ADS ones; `--components` adds the waypoint's
//! and the node agent's own binaries holding the file (`components`; build
//! them first: `cargo build --release -p waypoint -p istio-cni`). Build with `--features jemalloc` or
//! `--features mimalloc` to measure another allocator.
//!
//!     cargo run --release -p bench --bin scale-bench -- 1000 10000 50000

mod ads_bench;
mod ads_client;
mod ads_server;
mod components;
mod gen;
mod inproc;
mod objects;
mod sys;

use anyhow::Context;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Both features on (e.g. `--all-features` in a lint run) builds jemalloc
// rather than failing.
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--xds-client") {
        let [_, address, root] = &args[..] else {
            anyhow::bail!("usage: scale-bench --xds-client ADDRESS ROOT_CERT");
        };
        return ads_client::run(address.clone(), root.into());
    }
    if args.first().map(String::as_str) == Some("--objects-child") {
        let usage = "usage: scale-bench --objects-child PODS file|kube";
        let n = args.get(1).and_then(|n| n.parse().ok()).context(usage)?;
        return objects::child(n, args.get(2).context(usage)?);
    }
    let json = args.iter().any(|a| a == "--json");
    let only_ads = args.iter().any(|a| a == "--only-ads");
    let no_ads = args.iter().any(|a| a == "--no-ads");
    let components = args.iter().any(|a| a == "--components");
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let mut out = serde_json::Map::new();
    out.insert("allocator".into(), sys::allocator().into());
    println!("allocator: {}", sys::allocator());
    println!();
    if !only_ads {
        out.insert("in_process".into(), in_process(&sizes).into());
        out.insert("objects".into(), objects::measure(&sizes)?.into());
    }
    if !no_ads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        out.insert("delta_ads".into(), rt.block_on(delta_ads(&sizes))?.into());
    }
    if components {
        out.insert("components".into(), components::measure(&sizes)?.into());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn in_process(sizes: &[usize]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    println!("| pods | WDS full load (CPU ms) | RSS after load (MB) | one changed pod, upsert + publish (CPU ms) | RSS after churn (MB) | churn events | file parse, whole (CPU ms) |");
    println!("|---|---|---|---|---|---|---|");
    for &n in sizes {
        // Sizes run in increasing order in this one process, so the
        // allocator's high-water mark from a smaller run is below the next
        // one's. (The delta-ADS rows use a fresh client process per size.)
        let r = inproc::measure(n);
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.1} | {} | {:.0} |",
            r.pods, r.load_ms, r.rss_load, r.change_ms, r.rss_churn, r.churn, r.file_parse_ms
        );
        rows.push(serde_json::json!({
            "pods": r.pods, "wds_load_cpu_ms": r.load_ms, "rss_after_load_mb": r.rss_load,
            "one_change_cpu_ms": r.change_ms, "rss_after_churn_mb": r.rss_churn,
            "churn_events": r.churn, "file_parse_cpu_ms": r.file_parse_ms,
        }));
    }
    let (empty, busy) = (inproc::decision_ns(0), inproc::decision_ns(1_500));
    println!();
    println!("| admission decision (CPU ns) | empty namespace | 1,500 policies in the namespace |");
    println!("|---|---|---|");
    println!("| per new connection | {empty:.0} | {busy:.0} |");
    println!();
    rows.push(serde_json::json!({"decision_ns_empty": empty, "decision_ns_1500_policies": busy}));
    rows
}

async fn delta_ads(sizes: &[usize]) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = std::env::temp_dir().join(format!("scale-bench-{}", std::process::id()));
    let mut server = ads_server::Server::start(&dir)
        .await
        .context("start the bench xDS server")?;
    let mut rows = Vec::new();
    for &n in sizes {
        let r = ads_bench::measure(&mut server, n)
            .await
            .with_context(|| format!("delta-ADS run with {n} pods"))?;
        rows.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "delta-ADS into the real client (a fresh client process per size; its CPU and RSS only):"
    );
    println!();
    println!("| pods | RSS connected, empty (MB) | initial push (MB) | full load, client CPU (ms) | full load, wall (ms) | RSS after load (MB) | peak RSS in load (MB) | churn events | churn, client CPU per event (ms) | churn, wall (s) | RSS after churn (MB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.3} | {:.1} | {:.1} |",
            r.pods,
            r.rss_connected_mb,
            r.initial_push_mb,
            r.load_cpu_ms,
            r.load_wall_ms,
            r.rss_load_mb,
            r.peak_rss_load_mb,
            r.churn_events,
            r.churn_cpu_ms_per_event,
            r.churn_wall_s,
            r.rss_churn_mb
        );
    }
    println!();
    println!(
        "| pods | single change | client CPU, median (max) ms | push to publish, median (max) ms |"
    );
    println!("|---|---|---|---|");
    for r in &rows {
        for c in &r.changes {
            println!(
                "| {} | {} | {:.3} ({:.3}) | {:.3} ({:.3}) |",
                r.pods,
                c.kind,
                ads_bench::median(&c.cpu_ms),
                ads_bench::max(&c.cpu_ms),
                ads_bench::median(&c.wall_ms),
                ads_bench::max(&c.wall_ms)
            );
        }
    }
    println!();
    let floor: Vec<f64> = rows.iter().map(|r| r.floor_cpu_ms).collect();
    println!(
        "(measurement floor, two samples with nothing pushed: {:.3} ms client CPU, included above)",
        ads_bench::median(&floor)
    );
    println!();
    Ok(rows
        .iter()
        .map(|r| {
            let changes: serde_json::Map<String, serde_json::Value> = r
                .changes
                .iter()
                .map(|c| {
                    (
                        c.kind.replace(' ', "_"),
                        serde_json::json!({
                            "cpu_ms_median": ads_bench::median(&c.cpu_ms),
                            "cpu_ms_max": ads_bench::max(&c.cpu_ms),
                            "wall_ms_median": ads_bench::median(&c.wall_ms),
                            "wall_ms_max": ads_bench::max(&c.wall_ms),
                            "cpu_ms": c.cpu_ms, "wall_ms": c.wall_ms,
                        }),
                    )
                })
                .collect();
            serde_json::json!({
                "pods": r.pods, "rss_connected_empty_mb": r.rss_connected_mb,
                "load_cpu_ms": r.load_cpu_ms, "load_wall_ms": r.load_wall_ms,
                "rss_after_load_mb": r.rss_load_mb, "peak_rss_load_mb": r.peak_rss_load_mb,
                "initial_push_mb": r.initial_push_mb, "changes": changes,
                "measurement_floor_cpu_ms": r.floor_cpu_ms,
                "churn_events": r.churn_events,
                "churn_cpu_ms_per_event": r.churn_cpu_ms_per_event,
                "churn_wall_s": r.churn_wall_s, "rss_after_churn_mb": r.rss_churn_mb,
            })
        })
        .collect())
}
