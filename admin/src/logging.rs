//! Log levels changed at run time through the admin port's `/logging`, as
//! upstream ztunnel serves it (and `istioctl ztunnel-config log` calls it):
//! `GET` (or a `POST` without a level) shows the filter; `POST
//! ?level=<level>` sets every target, `?level=<target>:<level>,...` (or
//! `<target>=<level>`) one target each, `?<target>=<level>` likewise, and
//! `?reset` goes back to the filter the process started with.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use http::{Method, StatusCode};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::Reply;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LevelError {
    #[error("unknown level {0:?} (want trace, debug, info, warn, error or off)")]
    Level(String),
    #[error("empty target in {0:?}")]
    Target(String),
}

/// A filter as default level plus per-target levels: what `/logging` edits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Levels {
    default: String,
    targets: BTreeMap<String, String>,
}

fn level(s: &str) -> Result<String, LevelError> {
    let s = s.trim().to_ascii_lowercase();
    // istioctl's names for two of them.
    let s = match s.as_str() {
        "warning" => "warn".to_string(),
        "critical" => "error".to_string(),
        _ => s,
    };
    s.parse::<LevelFilter>()
        .map(|_| s.clone())
        .map_err(|_| LevelError::Level(s))
}

impl Levels {
    /// From an `EnvFilter` string such as `info,hbone=debug`; directives it
    /// cannot split into target and level (span filters) count as targets
    /// kept verbatim, so a reset brings them back unchanged.
    pub fn parse(filter: &str) -> Levels {
        let mut l = Levels {
            default: "info".into(),
            targets: BTreeMap::new(),
        };
        for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.rsplit_once('=') {
                Some((t, v)) => l.targets.insert(t.to_string(), v.to_string()),
                None => match level(d) {
                    Ok(v) => Some(std::mem::replace(&mut l.default, v)),
                    Err(_) => l.targets.insert(d.to_string(), String::new()),
                },
            };
        }
        l
    }

    /// Applies `spec` (`level=` of the query): a bare level sets every target
    /// (per-target levels go), then each `target:level` sets that target.
    pub fn apply(&mut self, spec: &str) -> Result<(), LevelError> {
        let mut next = self.clone();
        let parts: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        for p in parts.iter().filter(|p| !p.contains([':', '='])) {
            next.default = level(p)?;
            next.targets.clear();
        }
        for p in parts.iter().filter(|p| p.contains([':', '='])) {
            // Targets are module paths (`ztunnel::proxy:debug`): the last
            // `:` or `=` splits target from level.
            let at = p.rfind([':', '=']).expect("filtered on it");
            let (t, v) = (&p[..at], &p[at + 1..]);
            if t.is_empty() {
                return Err(LevelError::Target(p.to_string()));
            }
            next.targets.insert(t.to_string(), level(v)?);
        }
        *self = next;
        Ok(())
    }

    /// The `EnvFilter` string (`info,h2=debug`).
    pub fn filter(&self) -> String {
        let mut s = self.default.clone();
        for (t, v) in &self.targets {
            s.push(',');
            s.push_str(t);
            if !v.is_empty() {
                s.push('=');
                s.push_str(v);
            }
        }
        s
    }
}

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

struct State {
    initial: Levels,
    now: Mutex<Levels>,
    reload: Reload,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Called once by `init_logging` with the subscriber's reload handle.
pub(crate) fn install(initial: &str, reload: Reload) {
    let initial = Levels::parse(initial);
    let _ = STATE.set(State {
        now: Mutex::new(initial.clone()),
        initial,
        reload,
    });
}

/// Query pairs, percent-decoded (istioctl sends `:` and `,` either way).
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = || std::str::from_utf8(b.get(i + 1..i + 3)?).ok();
            match (b[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// `/logging` on the admin port.
pub(crate) fn handle(method: &Method, query: Option<&str>) -> Reply {
    let text = |code, body: String| (code, "text/plain", body);
    let Some(st) = STATE.get() else {
        return text(
            StatusCode::NOT_FOUND,
            "log levels are fixed in this process\n".into(),
        );
    };
    let shown = |l: &Levels| format!("current log level is {}\n", l.filter());
    if method == Method::GET {
        return text(StatusCode::OK, shown(&st.now.lock().unwrap()));
    }
    if method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET shows the log level; POST ?level=<level> or ?level=<target>:<level>,... changes it, ?reset restores it\n".into(),
        );
    }
    let pairs = query_pairs(query.unwrap_or_default());
    let mut now = st.now.lock().unwrap();
    let mut next = if pairs.iter().any(|(k, _)| k == "reset") {
        st.initial.clone()
    } else {
        now.clone()
    };
    for (k, v) in pairs.iter().filter(|(k, _)| k != "reset") {
        let spec = if k == "level" {
            v.clone()
        } else {
            format!("{k}={v}")
        };
        if let Err(e) = next.apply(&spec) {
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    }
    if next != *now {
        let filter = next.filter();
        let parsed = EnvFilter::try_new(&filter)
            .map_err(|e| e.to_string())
            .and_then(|f| (st.reload)(f));
        if let Err(e) = parsed {
            return text(StatusCode::BAD_REQUEST, format!("{filter}: {e}\n"));
        }
        tracing::info!(from = %now.filter(), to = %filter, "log level changed");
        *now = next;
    }
    text(StatusCode::OK, shown(&now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_sets_everything_a_target_only_itself() {
        let mut l = Levels::parse("info,hbone=debug");
        assert_eq!(l.filter(), "info,hbone=debug");
        l.apply("h2:trace").unwrap();
        assert_eq!(l.filter(), "info,h2=trace,hbone=debug");
        l.apply("access:debug,warning").unwrap();
        assert_eq!(l.filter(), "warn,access=debug");
        l.apply("ztunnel::proxy:error").unwrap();
        assert_eq!(l.filter(), "warn,access=debug,ztunnel::proxy=error");
    }

    #[test]
    fn bad_levels_and_targets_change_nothing() {
        let mut l = Levels::parse("info");
        assert_eq!(
            l.apply("h2:debug,loud"),
            Err(LevelError::Level("loud".into()))
        );
        assert_eq!(l.apply(":debug"), Err(LevelError::Target(":debug".into())));
        assert_eq!(l.filter(), "info");
    }

    #[test]
    fn span_directives_survive_as_written() {
        let l = Levels::parse("warn,[conn]=debug,mycrate");
        assert_eq!(l.filter(), "warn,[conn]=debug,mycrate");
    }

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(
            query_pairs("level=access%3Adebug%2Cinfo&reset"),
            vec![
                ("level".into(), "access:debug,info".into()),
                ("reset".into(), String::new())
            ]
        );
    }
}
