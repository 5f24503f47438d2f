//! A small HTTP/1.1 server for waypoint tests (keep-alive, one thread per
//! connection) whose behaviour is chosen by the path:
//! `/status/<code>` answers that code, `/flaky/<key>` fails its first request
//! per key with 503, `/slow` answers after 3 s, anything else 200. Every
//! answer's body is "<pod>\n"; requests are counted per path.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{in_ns, Mesh};

#[derive(Default)]
pub struct Hits(Mutex<HashMap<String, u32>>);

impl Hits {
    pub fn get(&self, path: &str) -> u32 {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }
}

impl Mesh {
    pub fn http_server(&self, pod: &str, port: u16) -> Arc<Hits> {
        let hits = Arc::new(Hits::default());
        // A pod with an IPv6 address listens on [::] too, as `serve` does.
        let v6 = self.pods[pod].ips.iter().any(|ip| ip.contains(':'));
        let ls = in_ns(&self.pod_ns(pod), move || {
            let mut ls = vec![TcpListener::bind(("0.0.0.0", port)).unwrap()];
            if v6 {
                ls.push(crate::v6_listener(port));
            }
            ls
        });
        for l in ls {
            let (name, h) = (pod.to_string(), hits.clone());
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let (name, h) = (name.clone(), h.clone());
                    std::thread::spawn(move || serve(s, &name, &h));
                }
            });
        }
        hits
    }
}

fn serve(s: std::net::TcpStream, name: &str, hits: &Hits) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let n = {
            let mut m = hits.0.lock().unwrap();
            let c = m.entry(path.clone()).or_default();
            *c += 1;
            *c
        };
        let code: u16 = if let Some(c) = path.strip_prefix("/status/") {
            c.parse().unwrap_or(400)
        } else if path.starts_with("/flaky/") && n == 1 {
            503
        } else {
            if path == "/slow" {
                std::thread::sleep(Duration::from_secs(3));
            }
            200
        };
        let text = format!("{name}\n");
        let resp = format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nx-served-by: {name}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
