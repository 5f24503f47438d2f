//! DNS for the tests: a pod's resolv.conf (`ip netns` style), a small
//! authoritative test server for the zone `test.`, and a client that sends
//! raw queries from inside a pod.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::{in_ns, Mesh};

/// Queries the test server saw, by transport.
#[derive(Default)]
pub struct DnsCounts {
    pub udp: AtomicUsize,
    pub tcp: AtomicUsize,
}

/// `outside.test A` → 192.0.2.1 (TTL 1234); `big.test TXT` → 40 records,
/// too big for UDP (answered truncated there, whole over TCP); any other
/// name → NXDOMAIN with the zone's SOA.
fn answer(req: &Message, udp: bool) -> Message {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.add_queries(req.queries.iter().cloned());
    let Some(q) = req.queries.first() else {
        m.metadata.response_code = ResponseCode::FormErr;
        return m;
    };
    let name = q.name().to_ascii().to_lowercase();
    match (name.as_str(), q.query_type()) {
        ("outside.test.", RecordType::A) => {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                1234,
                RData::A(Ipv4Addr::new(192, 0, 2, 1).into()),
            ));
        }
        ("big.test.", RecordType::TXT) if udp => m.metadata.truncation = true,
        ("big.test.", RecordType::TXT) => {
            for i in 0..40 {
                let txt = TXT::new(vec![format!("record {i:02} {}", "x".repeat(60))]);
                m.add_answer(Record::from_rdata(q.name().clone(), 300, RData::TXT(txt)));
            }
        }
        ("outside.test." | "big.test.", _) => {}
        _ => {
            m.metadata.response_code = ResponseCode::NXDomain;
            let zone = Name::from_ascii("test.").unwrap();
            let soa = SOA::new(
                Name::from_ascii("ns.test.").unwrap(),
                Name::from_ascii("admin.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                60,
            );
            m.add_authority(Record::from_rdata(zone, 60, RData::SOA(soa)));
        }
    }
    m
}

impl Mesh {
    /// Gives `pod` its own resolv.conf, as `ip netns exec` shows it (and
    /// ztunnel reads when the pod is enrolled, so write it before).
    pub fn resolv_conf(&self, pod: &str, text: &str) {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{}-{pod}", self.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
    }

    /// Runs the test DNS server on port 53 (UDP and TCP) inside `pod`.
    pub fn dns_server(&self, pod: &str) -> Arc<DnsCounts> {
        let counts = Arc::new(DnsCounts::default());
        let (udp, tcp) = in_ns(&self.pod_ns(pod), || {
            (
                UdpSocket::bind("0.0.0.0:53").unwrap(),
                TcpListener::bind("0.0.0.0:53").unwrap(),
            )
        });
        let c = counts.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                if let Ok(req) = Message::from_vec(&buf[..n]) {
                    c.udp.fetch_add(1, Ordering::Relaxed);
                    let _ = udp.send_to(&answer(&req, true).to_vec().unwrap(), peer);
                }
            }
        });
        let c = counts.clone();
        std::thread::spawn(move || {
            for mut s in tcp.incoming().flatten() {
                let c = c.clone();
                std::thread::spawn(move || {
                    while let Ok(req) = read_framed(&mut s) {
                        c.tcp.fetch_add(1, Ordering::Relaxed);
                        if write_framed(&mut s, &answer(&req, false)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        counts
    }

    /// One query from inside `pod` to `server` (redirected to ztunnel when the
    /// pod is captured). Err on timeout or a reply that does not parse.
    pub fn dns_query(
        &self,
        pod: &str,
        server: &str,
        name: &str,
        qtype: RecordType,
        tcp: bool,
    ) -> std::io::Result<Message> {
        let mut q = Message::query();
        q.metadata.id = rand_id();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        self.dns_raw(
            pod,
            server,
            &q.to_vec().unwrap(),
            tcp,
            Duration::from_secs(8),
        )
        .and_then(|b| {
            Message::from_vec(&b)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
        })
    }

    /// Raw bytes as one DNS message from inside `pod`; the raw reply, or an
    /// error when none came within `wait`.
    pub fn dns_raw(
        &self,
        pod: &str,
        server: &str,
        bytes: &[u8],
        tcp: bool,
        wait: Duration,
    ) -> std::io::Result<Vec<u8>> {
        let server: SocketAddr = server.parse().unwrap();
        let bytes = bytes.to_vec();
        in_ns(&self.pod_ns(pod), move || {
            let timeout = Some(wait);
            if tcp {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
                s.set_read_timeout(timeout)?;
                s.write_all(&(bytes.len() as u16).to_be_bytes())?;
                s.write_all(&bytes)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut out = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut out)?;
                Ok(out)
            } else {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(timeout)?;
                s.send_to(&bytes, server)?;
                let mut buf = vec![0u8; 65535];
                let n = s.recv(&mut buf)?;
                buf.truncate(n);
                Ok(buf)
            }
        })
    }
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

fn read_framed(s: &mut TcpStream) -> std::io::Result<Message> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Message::from_vec(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

fn write_framed(s: &mut TcpStream, m: &Message) -> std::io::Result<()> {
    let b = m.to_vec().unwrap();
    s.write_all(&(b.len() as u16).to_be_bytes())?;
    s.write_all(&b)
}
