//! The real node's cluster DNS: the kubelet points pods' resolv.conf here
//! (`clusterDNS`), and this answers A queries for the Service names the test
//! registers with the Service's ClusterIP, as CoreDNS would for
//! `<service>.<namespace>.svc.cluster.local`; anything else is NXDOMAIN.
//! UDP only (answers are one record).

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};

use super::{Cluster, CONTROL_IP};

#[derive(Clone, Default)]
pub struct ClusterDns {
    names: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
}

impl ClusterDns {
    /// Serves on CONTROL_IP:53 (reachable from every node's pods) until the
    /// process ends: one per test binary (a second bind of the address fails).
    pub fn start() -> ClusterDns {
        let dns = ClusterDns::default();
        let sock = UdpSocket::bind((CONTROL_IP, 53)).expect("cluster DNS on the control address");
        let names = dns.names.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut m = Message::response(req.metadata.id, req.metadata.op_code);
                m.metadata.recursion_available = true;
                m.metadata.authoritative = true;
                m.add_queries(req.queries.iter().cloned());
                let found = req.queries.first().and_then(|q| {
                    let name = q.name().to_ascii().to_lowercase();
                    let ip = names
                        .lock()
                        .unwrap()
                        .get(name.trim_end_matches('.'))
                        .copied();
                    ip.map(|ip| (q, ip))
                });
                match found {
                    Some((q, ip)) if q.query_type() == RecordType::A => {
                        m.add_answer(Record::from_rdata(q.name().clone(), 5, RData::A(ip.into())));
                    }
                    // The name exists, with no record of that type.
                    Some(_) => {}
                    None => m.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = m.to_vec() {
                    let _ = sock.send_to(&bytes, peer);
                }
            }
        });
        dns
    }

    /// Answers `<name>.<namespace>.svc.cluster.local` with the Service's ClusterIP.
    pub async fn add_service(&self, cluster: &Cluster, namespace: &str, name: &str) {
        let ip: Ipv4Addr = cluster.cluster_ip(namespace, name).await.parse().unwrap();
        self.names
            .lock()
            .unwrap()
            .insert(format!("{name}.{namespace}.svc.cluster.local"), ip);
    }
}
