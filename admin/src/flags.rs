//! The command-line flags every proxy binary shares (ztunnel, waypoint):
//! where the three endpoints listen, how logs look, how long a drain lasts.
//! Each flag may also come from the environment variable Istio's charts set
//! for it (clap's `env`): a flag on the command line beats the variable, the
//! variable beats the default. Values that do not parse are refused, naming
//! the variable (the `value_name` is the variable's name, so clap's error
//! says `--log-format <LOG_FORMAT>`).

use std::net::SocketAddr;
use std::time::Duration;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (upstream calls it `plain`).
    #[value(alias = "plain")]
    Text,
    /// One JSON object per line, every field a key.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProcessFlags {
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Log as JSON lines (the same as --log-format json; beats LOG_FORMAT).
    #[arg(long)]
    pub log_json: bool,
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax (`info,hbone=debug`).
    #[arg(long, env = "RUST_LOG", value_name = "RUST_LOG", default_value = "info", value_parser = parse_filter)]
    pub log_level: String,
    /// How long SIGTERM waits for live connections before closing them.
    /// Default: derived from TERMINATION_GRACE_PERIOD_SECONDS, else 30s.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_name = "CONNECTION_TERMINATION_DEADLINE", value_parser = mesh::routes::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// The pod's terminationGracePeriodSeconds: the drain ends a little
    /// before it, so connections close cleanly before the kubelet's SIGKILL.
    #[arg(
        long,
        env = "TERMINATION_GRACE_PERIOD_SECONDS",
        value_name = "TERMINATION_GRACE_PERIOD_SECONDS"
    )]
    pub termination_grace_period_seconds: Option<u64>,
}

/// Default drain when neither a deadline nor a grace period is given.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

impl ProcessFlags {
    pub fn addrs(&self) -> crate::Addrs {
        crate::Addrs {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }

    pub fn log_json(&self) -> bool {
        self.log_json || self.log_format == LogFormat::Json
    }

    /// Installs the global subscriber with these flags' format and filter.
    pub fn init_logging(&self) {
        crate::init_logging_with(self.log_json(), &self.log_level);
    }

    /// The drain deadline: an explicit one, else the grace period less a
    /// margin (5s, or 1s for grace periods of 10s and less; at least 1s),
    /// leaving the last seconds for closing what is left before the SIGKILL.
    pub fn drain_timeout(&self) -> Duration {
        if let Some(d) = self.drain_timeout {
            return d;
        }
        match self.termination_grace_period_seconds {
            Some(secs) => {
                let margin = if secs > 10 { 5 } else { 1 };
                Duration::from_secs(secs.saturating_sub(margin).max(1))
            }
            None => DEFAULT_DRAIN,
        }
    }
}

fn parse_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a log filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        p: ProcessFlags,
    }

    // The env-backed args are parsed by clap from the process environment;
    // these tests keep to flags and defaults, and the binaries' tests set
    // variables in child processes.
    fn parse(args: &[&str]) -> Result<ProcessFlags, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.p)
    }

    #[test]
    fn drain_from_grace_period() {
        let p = parse(&["--termination-grace-period-seconds", "30"]).unwrap();
        assert_eq!(p.drain_timeout(), Duration::from_secs(25));
        let p = parse(&["--termination-grace-period-seconds", "5"]).unwrap();
        assert_eq!(p.drain_timeout(), Duration::from_secs(4));
        let p = parse(&["--termination-grace-period-seconds", "1"]).unwrap();
        assert_eq!(p.drain_timeout(), Duration::from_secs(1));
        let p = parse(&[
            "--termination-grace-period-seconds",
            "30",
            "--drain-timeout",
            "3s",
        ])
        .unwrap();
        assert_eq!(p.drain_timeout(), Duration::from_secs(3));
        assert!(parse(&["--termination-grace-period-seconds", "soon"]).is_err());
    }

    #[test]
    fn log_format_and_filter() {
        assert!(!parse(&[]).unwrap().log_json());
        assert!(parse(&["--log-json"]).unwrap().log_json());
        assert!(parse(&["--log-format", "json"]).unwrap().log_json());
        assert!(!parse(&["--log-format", "plain"]).unwrap().log_json());
        let e = parse(&["--log-format", "xml"]).unwrap_err().to_string();
        assert!(e.contains("LOG_FORMAT"), "{e}");
        let e = parse(&["--log-level", "info,==="]).unwrap_err().to_string();
        assert!(e.contains("RUST_LOG"), "{e}");
    }
}
