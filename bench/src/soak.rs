//! A bounded soak: a steady request rate through the waypoint (keep-alive
//! HTTP/1.1) and a steady new-connection rate through ztunnel alone, for
//! SOAK_SECS (default 300), reported per window: requests, errors, p50/p99,
//! and the RSS of both ztunnels and the waypoint. Errors must be zero; the
//! drift rows compare the last window with the first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::Mesh;

#[derive(Default)]
struct Window {
    lat_us: Vec<u64>,
    errors: u64,
}

struct Flow {
    name: &'static str,
    window: Mutex<Window>,
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One HTTP/1.1 exchange on `s`; Ok when the answer is a 200 with its body.
fn get(s: &mut BufReader<TcpStream>, close: bool) -> Result<(), String> {
    let req = if close {
        "GET /soak HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    } else {
        "GET /soak HTTP/1.1\r\nHost: web\r\n\r\n"
    };
    s.get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut status = String::new();
    s.read_line(&mut status).map_err(|e| e.to_string())?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status {status:?}"));
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if s.read_line(&mut h).map_err(|e| e.to_string())? == 0 {
            return Err("closed in headers".into());
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().map_err(|_| format!("bad length {h:?}"))?;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// Runs `f` every `every` until `stop`, recording latency or error in `flow`.
fn paced(
    stop: Arc<AtomicBool>,
    flow: Arc<Flow>,
    every: Duration,
    mut f: impl FnMut() -> Result<(), String>,
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += every;
        let t = Instant::now();
        let r = f();
        let us = t.elapsed().as_micros() as u64;
        {
            let mut w = flow.window.lock().unwrap();
            match r {
                Ok(()) => w.lat_us.push(us),
                Err(e) => {
                    w.errors += 1;
                    eprintln!("{}: {e}", flow.name);
                }
            }
        }
        // A late request is sent at once (no catch-up burst beyond that).
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        } else {
            next = Instant::now();
        }
    }
}

pub fn run(m: &Mesh, waypoint_url_ip: &str, l4_ip: &str) {
    let total = env_secs("SOAK_SECS", 300);
    let window = env_secs("SOAK_WINDOW_SECS", 60).min(total);
    let stop = Arc::new(AtomicBool::new(false));
    let l7 = Arc::new(Flow {
        name: "waypoint keep-alive",
        window: Default::default(),
    });
    let l4 = Arc::new(Flow {
        name: "ztunnel new conns",
        window: Default::default(),
    });
    let mut threads = Vec::new();
    // 4 keep-alive connections x 50 req/s through the waypoint = 200 req/s.
    for _ in 0..4 {
        let (stop, flow, addr) = (stop.clone(), l7.clone(), format!("{waypoint_url_ip}:80"));
        let s = m
            .connect("client", &addr)
            .expect("connect through the waypoint");
        threads.push(std::thread::spawn(move || {
            let mut conn = BufReader::new(s);
            paced(stop, flow, Duration::from_millis(20), || {
                get(&mut conn, false)
            });
        }));
    }
    // 20 new connections/s through ztunnel alone, one request each.
    for _ in 0..2 {
        let (stop, flow, addr) = (stop.clone(), l4.clone(), format!("{l4_ip}:80"));
        let ns = m.pod_ns("client");
        threads.push(std::thread::spawn(move || {
            let fd = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            paced(stop, flow, Duration::from_millis(100), || {
                let s = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                get(&mut BufReader::new(s), true)
            });
        }));
    }
    let nodes = [format!("{}-node1", m.prefix), format!("{}-node2", m.prefix)];
    let wp_ns = m.pod_ns("waypoint");
    let mut rows = Vec::new();
    let start = Instant::now();
    let mut errors = 0;
    while start.elapsed() < Duration::from_secs(total) {
        std::thread::sleep(Duration::from_secs(window));
        let mut row = vec![format!("{:>4}", start.elapsed().as_secs())];
        for f in [&l7, &l4] {
            let mut w = std::mem::take(&mut *f.window.lock().unwrap());
            w.lat_us.sort_unstable();
            errors += w.errors;
            row.push(format!(
                "{} | {} | {:.2} | {:.2}",
                w.lat_us.len(),
                w.errors,
                pct(&w.lat_us, 0.5),
                pct(&w.lat_us, 0.99)
            ));
        }
        row.push(format!(
            "{:.1} | {:.1} | {:.1}",
            super::status_mib(&nodes[0], "ztunnel", "VmRSS"),
            super::status_mib(&nodes[1], "ztunnel", "VmRSS"),
            super::status_mib(&wp_ns, "waypoint", "VmRSS")
        ));
        eprintln!("{}", row.join(" | "));
        rows.push(row);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!("\nsoak: {total} s in {window} s windows; 200 req/s keep-alive through the waypoint, 20 new conns/s through ztunnel only\n");
    println!("| t s | waypoint reqs | errors | p50 ms | p99 ms | ztunnel conns | errors | p50 ms | p99 ms | ztunnel1 RSS MiB | ztunnel2 RSS MiB | waypoint RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!("| {} |", r.join(" | "));
    }
    println!("\ntotal errors: {errors}");
}
