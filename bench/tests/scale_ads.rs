//! The scale bench's delta-ADS path end to end on a 4-pod mesh: the bench's
//! xDS server, the real client in its own process, every kind of change and
//! the churn. The bench itself fails if the client NACKs, stalls, or
//! publishes other counts than were sent; this checks it ran to the end
//! and reported every measure. Numbers are not judged (no timing here).

use std::process::Command;

#[test]
fn delta_ads_path_runs_end_to_end_on_a_small_mesh() {
    let out = Command::new(env!("CARGO_BIN_EXE_scale-bench"))
        .args(["4", "--only-ads", "--json"])
        .output()
        .expect("run scale-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scale-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &stdout[stdout.find("\n{").expect("JSON after the tables") + 1..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(
        v.get("in_process").is_none(),
        "--only-ads ran the in-process rows"
    );
    let rows = v["delta_ads"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["pods"], 4);
    assert_eq!(r["churn_events"], 1000);
    for kind in ["add_pod", "update_pod", "delete_pod", "change_policy"] {
        let c = &r["changes"][kind];
        assert_eq!(c["cpu_ms"].as_array().map(Vec::len), Some(10), "{kind}");
        assert_eq!(c["wall_ms"].as_array().map(Vec::len), Some(10), "{kind}");
    }
    for k in [
        "rss_connected_empty_mb",
        "rss_after_load_mb",
        "rss_after_churn_mb",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {}", r[k]);
    }
}
