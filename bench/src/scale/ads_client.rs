//! The measured side, run as its own process (`scale-bench --xds-client
//! ADDRESS ROOT_CERT`) so that its RSS and CPU time are the client's alone:
//! the real `xds::Ads` feeding a `mesh::MeshStore`, on a runtime shaped like
//! ztunnel's (multi-threaded, 2 workers), with nothing else in it.
//!
//! It talks to the bench over stdio, one line per message:
//! - on every publish of the store it prints `published GEN MONO_NS
//!   WORKLOADS SERVICES POLICIES` (the generation, when the subscriber saw
//!   it, and the published state's sizes for the bench to check);
//! - for `sample` on stdin it prints `sample CPU_NS RSS_KB PEAK_RSS_KB`;
//! - `quit` (or EOF) ends it.

use std::io::BufRead;
use std::path::PathBuf;

use tokio::sync::watch;

use crate::ads_server::SERVER_NAME;
use crate::sys::{cpu, mono_ns, peak_rss_kb, rss_kb};

pub fn run(address: String, root_cert: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = mesh::MeshStore::new(mesh::MeshState::default(), &format!("xds://{address}"));
    let (stop_tx, stop) = watch::channel(false);
    let ads = xds::Ads {
        cp: xds::ControlPlane {
            address,
            server_name: SERVER_NAME.into(),
            root_cert,
            token: None,
            cluster_id: "Kubernetes".into(),
        },
        proxy: xds::ProxyInfo {
            ip: "127.0.0.1".parse().unwrap(),
            pod_name: "ztunnel-bench".into(),
            pod_namespace: "istio-system".into(),
            node_name: "node-0".into(),
            service_account: "ztunnel".into(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            metadata: Default::default(),
        },
        store: store.clone(),
        status: watch::channel(xds::AdsStatus::default()).0,
    };
    rt.spawn(ads.run(stop));
    // What a proxy reacting to a change would see: the watch fires after
    // the new state is in force. The time is taken on wake-up, so it
    // includes that wake-up, as a real subscriber's reaction would.
    let mut changed = store.subscribe();
    let watched = store.clone();
    rt.spawn(async move {
        while changed.changed().await.is_ok() {
            let at = mono_ns();
            let generation = *changed.borrow_and_update();
            let s = watched.load();
            println!(
                "published {generation} {at} {} {} {}",
                s.workloads.len(),
                s.services.len(),
                s.policies.len()
            );
        }
    });
    // Commands on a plain thread: stdin is blocking, and a runtime worker
    // must not be.
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "sample" => println!("sample {} {} {}", cpu().as_nanos(), rss_kb(), peak_rss_kb()),
            "quit" => break,
            other => tracing::warn!(command = other, "unknown bench command"),
        }
    }
    let _ = stop_tx.send(true);
    rt.shutdown_background();
    Ok(())
}
