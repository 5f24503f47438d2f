//! The waypoint and the node agent holding a mesh of N pods from the
//! standalone file: their real binaries (release builds next to this one),
//! on loopback ports and a scratch directory. Measured from outside: RSS
//! once the first state is in force, CPU (utime + stime of the process, all
//! threads, 10 ms ticks) per one-pod edit of the file, RSS after the edits.
//! The waypoint logs each config it puts in force ("config applied"); the
//! agent logs each re-decision.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use testbed::proc_cpu_ms;

use crate::gen;

const EDITS: usize = 20;

fn rss_mb(pid: u32) -> f64 {
    testbed::proc_status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !ok() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn generation(admin: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-s", "-m", "2", &format!("http://{admin}/config_dump")])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["config"]["generation"].as_u64()
}

/// The edit number `e` of pod `n / 2` (its labels gain `v: eN`).
fn edited(text: &str, n: usize, e: usize) -> String {
    let i = n / 2;
    let from = format!(
        "name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}}}",
        i / 100,
        i / 5
    );
    let to = format!(
        "name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}, v: e{e}}}",
        i / 100,
        i / 5
    );
    text.replacen(&from, &to, 1)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one(bin: &Path, dir: &Path, n: usize, which: &str) -> anyhow::Result<serde_json::Value> {
    let file = dir.join("mesh.yaml");
    let text = gen::standalone_yaml(n);
    std::fs::write(&file, &text)?;
    let log = dir.join(format!("{which}.log"));
    let mut cmd = Command::new(bin);
    let admin = "127.0.0.1:15990";
    match which {
        "waypoint" => cmd
            .args([
                "--name",
                "wp",
                "--namespace",
                "ns-0",
                "--listen",
                "127.0.0.1:15991",
            ])
            .args([
                "--admin-addr",
                admin,
                "--metrics-addr",
                "127.0.0.1:15992",
                "--readiness-addr",
                "127.0.0.1:15993",
            ])
            .arg("--ca-dir")
            .arg(dir.join("ca")),
        _ => cmd
            .args(["--node", "node-0", "--probe-snat", "false"])
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .arg("--zds-socket")
            .arg(dir.join("zds.sock"))
            .arg("--plugin-socket")
            .arg(dir.join("plugin.sock")),
    };
    cmd.arg("--config").arg(&file).env("RUST_LOG", "info");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let p = Proc(child);
    let pid = p.0.id();
    let log_count = |s: &str| std::fs::read_to_string(&log).map_or(0, |l| l.matches(s).count());
    let log_has = |s: &str, count: usize| log_count(s) >= count;
    let limit = Duration::from_secs(60);
    let t0 = Instant::now();
    if which == "waypoint" {
        wait_for("waypoint admin", limit, || generation(admin).is_some())?;
    } else {
        wait_for("agent serving", limit, || log_has("node agent serving", 1))?;
    }
    let start_s = t0.elapsed().as_secs_f64();
    let rss_load = rss_mb(pid);
    let cpu0 = proc_cpu_ms(pid);
    // Edits are seen in the log, not by polling `/config_dump`: a dump of
    // what the waypoint holds costs as much as an apply at this size, and
    // polling it would be counted as the edit's CPU.
    let applied0 = log_count("config applied");
    let mut applied_ms = Vec::new();
    for e in 1..=EDITS {
        let t = Instant::now();
        std::fs::write(&file, edited(&text, n, e))?;
        if which == "waypoint" {
            wait_for("edit in force", limit, || {
                log_has("config applied", applied0 + e)
            })?;
        } else {
            wait_for("edit re-decided", limit, || {
                log_has("capture re-decided", e)
            })?;
        }
        applied_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_per_edit = (proc_cpu_ms(pid) - cpu0) / EDITS as f64;
    applied_ms.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "component": which, "pods": n, "start_s": start_s, "rss_after_load_mb": rss_load,
        "cpu_ms_per_edit": cpu_per_edit, "edit_to_applied_ms_median": applied_ms[EDITS / 2],
        "rss_after_edits_mb": rss_mb(pid),
    }))
}

/// Each component at each size; skipped (said so) when its release binary
/// is not built.
pub fn measure(sizes: &[usize]) -> anyhow::Result<Vec<serde_json::Value>> {
    let here = std::env::current_exe()?;
    let bins: Vec<(&str, PathBuf)> = [("waypoint", "waypoint"), ("agent", "istio-cni-agent")]
        .into_iter()
        .map(|(w, b)| (w, here.with_file_name(b)))
        .collect();
    let mut rows = Vec::new();
    println!("The waypoint and the node agent from the standalone file (their release binaries; edits: {EDITS} one-pod changes):");
    println!();
    println!("| component | pods | start to first state (s) | RSS after load (MB) | CPU per one-pod edit (ms) | edit to in force, median (ms) | RSS after the edits (MB) |");
    println!("|---|---|---|---|---|---|---|");
    for (which, bin) in &bins {
        if !bin.exists() {
            println!("| {which} | — | not built: cargo build --release -p waypoint -p istio-cni | | | | |");
            continue;
        }
        for &n in sizes {
            let dir = std::env::temp_dir().join(format!("scale-components-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let r = one(bin, &dir, n, which);
            let _ = std::fs::remove_dir_all(&dir);
            let r = r.with_context(|| format!("{which} at {n} pods"))?;
            println!(
                "| {which} | {n} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
                r["start_s"].as_f64().unwrap_or(0.0),
                r["rss_after_load_mb"].as_f64().unwrap_or(0.0),
                r["cpu_ms_per_edit"].as_f64().unwrap_or(0.0),
                r["edit_to_applied_ms_median"].as_f64().unwrap_or(0.0),
                r["rss_after_edits_mb"].as_f64().unwrap_or(0.0),
            );
            rows.push(r);
        }
    }
    println!();
    Ok(rows)
}
