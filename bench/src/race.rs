//! Repeated rounds and their medians. On a shared 2-core machine one
//! proxy's req/s moves more between two runs a minute apart (Envoy's
//! 6.5k–10.8k) than the proxies differ, so a single run per proxy decides
//! the race by when each ran. The two waypoints run alternately for
//! `BENCH_ROUNDS` rounds; each table row is the median of its rounds and
//! each round's ratio is printed beside the median one.

/// One measurement of one path and protocol.
#[derive(Clone)]
pub struct Sample {
    pub path: &'static str,
    pub proto: &'static str,
    pub round: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Failed requests (non-2xx, socket errors, h2load failures).
    pub errors: f64,
    /// CPU the path's L7 proxy used per request, µs; NaN without one.
    pub cpu_us: f64,
    /// The L7 proxy's context switches per request; NaN without one.
    pub ctx_sw: f64,
}

/// A table row: the median of a path's rounds for one protocol.
pub struct Row {
    pub path: &'static str,
    pub proto: &'static str,
    pub rounds: usize,
    pub rps: f64,
    pub rps_min: f64,
    pub rps_max: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us: f64,
    pub ctx_sw: f64,
    /// Summed over the rounds: one failed request in any round shows.
    pub errors: f64,
}

/// How many rounds the two waypoints race (BENCH_ROUNDS, default 3).
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

/// The median of the non-NaN values; NaN when there are none. Of an even
/// count, the mean of the middle two.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// One row per (path, protocol), in the order they were first measured.
pub fn rows(samples: &[Sample]) -> Vec<Row> {
    let mut keys: Vec<(&'static str, &'static str)> = Vec::new();
    for s in samples {
        if !keys.contains(&(s.path, s.proto)) {
            keys.push((s.path, s.proto));
        }
    }
    keys.into_iter()
        .map(|(path, proto)| {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.path == path && s.proto == proto)
                .collect();
            let rps = || of.iter().map(|s| s.rps);
            Row {
                path,
                proto,
                rounds: of.len(),
                rps: median(rps()),
                rps_min: rps().fold(f64::INFINITY, f64::min),
                rps_max: rps().fold(f64::NEG_INFINITY, f64::max),
                p50_ms: median(of.iter().map(|s| s.p50_ms)),
                p99_ms: median(of.iter().map(|s| s.p99_ms)),
                cpu_us: median(of.iter().map(|s| s.cpu_us)),
                ctx_sw: median(of.iter().map(|s| s.ctx_sw)),
                errors: of.iter().map(|s| s.errors).sum(),
            }
        })
        .collect()
}

/// `a`'s req/s over `b`'s for `proto`, round by round (rounds where both
/// ran), in round order.
pub fn ratios(samples: &[Sample], proto: &str, a: &str, b: &str) -> Vec<f64> {
    let find = |path: &str, round: usize| {
        samples
            .iter()
            .find(|s| s.path == path && s.proto == proto && s.round == round)
            .map(|s| s.rps)
    };
    let last = samples.iter().map(|s| s.round).max().unwrap_or(0);
    (0..=last)
        .filter_map(|r| Some(find(a, r)? / find(b, r)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(path: &'static str, proto: &'static str, round: usize, rps: f64) -> Sample {
        Sample {
            path,
            proto,
            round,
            rps,
            p50_ms: rps / 1000.0,
            p99_ms: f64::NAN,
            errors: round as f64,
            cpu_us: rps * 2.0,
            ctx_sw: rps / 100.0,
        }
    }

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median([f64::NAN, 5.0]), 5.0);
        assert!(median([f64::NAN]).is_nan());
        assert!(median([]).is_nan());
    }

    #[test]
    fn rows_are_medians_in_first_seen_order_with_errors_summed() {
        let samples = [
            s("ours", "h1", 0, 10.0),
            s("envoy", "h1", 0, 8.0),
            s("plain", "h1", 0, 9.0),
            s("ours", "h1", 1, 30.0),
            s("envoy", "h1", 1, 4.0),
            s("ours", "h1", 2, 20.0),
            s("envoy", "h1", 2, 6.0),
        ];
        let rows = rows(&samples);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.path, r.rounds, r.rps, r.rps_min, r.rps_max, r.errors))
            .collect();
        assert_eq!(
            got,
            [
                ("ours", 3, 20.0, 10.0, 30.0, 3.0),
                ("envoy", 3, 6.0, 4.0, 8.0, 3.0),
                ("plain", 1, 9.0, 9.0, 9.0, 0.0),
            ]
        );
        assert_eq!(rows[0].p50_ms, 0.02);
        assert_eq!(rows[1].cpu_us, 12.0);
        assert_eq!(rows[1].ctx_sw, 0.06);
        assert!(rows[0].p99_ms.is_nan());
    }

    #[test]
    fn ratios_pair_rounds_and_skip_unpaired() {
        let samples = [
            s("ours", "h1", 0, 10.0),
            s("envoy", "h1", 0, 5.0),
            s("ours", "h2", 0, 99.0),
            s("ours", "h1", 1, 12.0),
            s("ours", "h1", 2, 9.0),
            s("envoy", "h1", 2, 3.0),
        ];
        assert_eq!(ratios(&samples, "h1", "ours", "envoy"), [2.0, 3.0]);
        assert!(ratios(&samples, "h2", "ours", "envoy").is_empty());
    }
}
