//! What the agent tells kubelet and Prometheus: readiness (`GET /readyz`,
//! ready once the plugin and its config are installed and the ZDS server is
//! up, as Istio's cni chart probes it) and a few counters and gauges under
//! the names Istio's own agent uses. Atomics: the installer, the agent task
//! and the HTTP handlers each update or read them without a lock.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use http::StatusCode;
use tokio::sync::watch;

use crate::api::Op;

#[derive(Debug, Default)]
pub struct Status {
    /// No installer runs (no CNI conf dir): nothing to wait for.
    install_not_required: bool,
    installed: AtomicBool,
    zds_serving: AtomicBool,
    installs_ok: AtomicU64,
    copy_failures: AtomicU64,
    config_failures: AtomicU64,
    ztunnel_connected: AtomicBool,
    /// ADD, CHECK, DEL.
    plugin_requests: [AtomicU64; 3],
}

/// Why an install attempt failed, as `istio_cni_installs_total{result}` says.
#[derive(Debug, Clone, Copy)]
pub enum InstallFailure {
    CopyBinary,
    Config,
}

impl Status {
    pub fn new(installs: bool) -> Status {
        Status {
            install_not_required: !installs,
            ..Status::default()
        }
    }

    /// An install pass that left the plugin and config in place.
    pub fn installed(&self, changed: bool) {
        if changed {
            self.installs_ok.fetch_add(1, Relaxed);
        }
        self.installed.store(true, Relaxed);
    }

    /// A pass that could not: not ready until one succeeds again (the
    /// runtime may be reading a config without us).
    pub fn install_failed(&self, why: InstallFailure) {
        match why {
            InstallFailure::CopyBinary => &self.copy_failures,
            InstallFailure::Config => &self.config_failures,
        }
        .fetch_add(1, Relaxed);
        self.installed.store(false, Relaxed);
    }

    pub fn zds_serving(&self, up: bool) {
        self.zds_serving.store(up, Relaxed);
    }

    pub fn ztunnel_connected(&self, up: bool) {
        self.ztunnel_connected.store(up, Relaxed);
    }

    pub fn plugin_request(&self, op: Op) {
        let i = match op {
            Op::Add => 0,
            Op::Check => 1,
            Op::Del => 2,
        };
        self.plugin_requests[i].fetch_add(1, Relaxed);
    }

    /// None when ready, else why not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.install_not_required && !self.installed.load(Relaxed) {
            Some("CNI plugin and config not installed yet")
        } else if !self.zds_serving.load(Relaxed) {
            Some("ZDS server not up yet")
        } else {
            None
        }
    }

    /// The Prometheus text exposition of everything above.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let ready = u64::from(self.not_ready().is_none());
        let install_ready = u64::from(self.install_not_required || self.installed.load(Relaxed));
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        family(
            "istio_cni_install_ready",
            "gauge",
            "Whether the CNI plugin installation is ready or not",
            &[("", install_ready)],
        );
        family(
            "istio_cni_installs_total",
            "counter",
            "Total number of CNI plugins installed by the Istio CNI installer",
            &[
                (r#"{result="SUCCESS"}"#, self.installs_ok.load(Relaxed)),
                (
                    r#"{result="COPY_BINARIES_FAILURE"}"#,
                    self.copy_failures.load(Relaxed),
                ),
                (
                    r#"{result="CREATE_CNI_CONFIG_FAILURE"}"#,
                    self.config_failures.load(Relaxed),
                ),
            ],
        );
        family(
            "istio_cni_plugin_requests_total",
            "counter",
            "The total number of CNI plugin requests handled by the node agent.",
            &[
                (r#"{type="add"}"#, self.plugin_requests[0].load(Relaxed)),
                (r#"{type="check"}"#, self.plugin_requests[1].load(Relaxed)),
                (r#"{type="del"}"#, self.plugin_requests[2].load(Relaxed)),
            ],
        );
        family(
            "ztunnel_connected",
            "gauge",
            "number of connections to ztunnel",
            &[("", u64::from(self.ztunnel_connected.load(Relaxed)))],
        );
        family(
            "istio_cni_agent_ready",
            "gauge",
            "Whether the node agent answers ready on /readyz",
            &[("", ready)],
        );
        out
    }
}

/// Serves `/readyz` (and `/healthz`, alive whenever it answers) on
/// `readiness` and `/metrics` on `metrics` until `stop`.
pub async fn serve(
    status: Arc<Status>,
    readiness: SocketAddr,
    metrics: SocketAddr,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let named = |what: &'static str, addr: SocketAddr| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}"))
    };
    let s = status.clone();
    admin::serve(
        readiness,
        move |_, uri| match uri.path() {
            "/readyz" => match s.not_ready() {
                None => (StatusCode::OK, "text/plain", "ready\n".into()),
                Some(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n"),
                ),
            },
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
            _ => (StatusCode::NOT_FOUND, "text/plain", "try /readyz\n".into()),
        },
        stop.clone(),
    )
    .await
    .map_err(named("readiness", readiness))?;
    admin::serve(
        metrics,
        move |_, uri| match uri.path() {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                status.prometheus(),
            ),
            _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
        },
        stop,
    )
    .await
    .map_err(named("metrics", metrics))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_install_and_the_zds_server() {
        let s = Status::new(true);
        assert_eq!(
            s.not_ready(),
            Some("CNI plugin and config not installed yet")
        );
        s.zds_serving(true);
        assert!(s.not_ready().unwrap().contains("not installed"));
        s.installed(true);
        assert_eq!(s.not_ready(), None);
        s.install_failed(InstallFailure::Config);
        assert!(s.not_ready().is_some());
        let text = s.prometheus();
        assert!(text.contains("istio_cni_install_ready 0\n"), "{text}");
        assert!(
            text.contains(r#"istio_cni_installs_total{result="SUCCESS"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"istio_cni_installs_total{result="CREATE_CNI_CONFIG_FAILURE"} 1"#),
            "{text}"
        );
        // Without an installer only the ZDS server counts.
        let s = Status::new(false);
        assert_eq!(s.not_ready(), Some("ZDS server not up yet"));
        s.zds_serving(true);
        assert_eq!(s.not_ready(), None);
        s.plugin_request(Op::Add);
        assert!(s
            .prometheus()
            .contains(r#"istio_cni_plugin_requests_total{type="add"} 1"#));
    }
}
