//! What to do with one DNS request: answer it from the mesh, forward it, or
//! refuse it. Pure (no I/O), so the packet path can be fuzzed and
//! unit-tested.

use std::net::IpAddr;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use mesh::MeshState;

/// TTL of answers the mesh gives: short, so VIP changes reach pods quickly.
pub const MESH_TTL: u32 = 30;
/// What we advertise (and cap a client's EDNS size at) over UDP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

pub enum Plan {
    Reply(Message),
    Forward { name: Name, qtype: RecordType },
}

/// A response skeleton for `req`: same id, opcode, question and RD bit; an
/// OPT record when the client sent one.
pub fn response(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP_PAYLOAD);
        m.set_edns(e);
    }
    m
}

/// Decides for one parsed request from a pod in `pod_namespace` whose
/// resolver searches `search` (lowercase, no trailing dots).
pub fn plan(req: &Message, state: &MeshState, search: &[String]) -> Plan {
    if req.metadata.op_code != OpCode::Query {
        return Plan::Reply(response(req, ResponseCode::NotImp));
    }
    let [q] = req.queries.as_slice() else {
        return Plan::Reply(response(req, ResponseCode::FormErr));
    };
    if q.query_class() == DNSClass::IN {
        let asked = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let found = std::iter::once(asked.clone())
            .chain(search.iter().map(|s| format!("{asked}.{s}")))
            .find_map(|host| state.addresses_of_host(&host));
        if let Some(addrs) = found {
            return Plan::Reply(mesh_answer(req, q.name(), q.query_type(), &addrs));
        }
    }
    let mut name = q.name().clone();
    name.set_fqdn(true);
    Plan::Forward {
        name,
        qtype: q.query_type(),
    }
}

/// The mesh owns the name: A/AAAA get its addresses of that family; any other
/// type gets an empty NOERROR (the name exists), never a forward that would
/// leak or contradict it.
fn mesh_answer(req: &Message, owner: &Name, qtype: RecordType, addrs: &[IpAddr]) -> Message {
    let mut m = response(req, ResponseCode::NoError);
    m.metadata.authoritative = true;
    for ip in addrs {
        let rdata = match (qtype, ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A((*v4).into()),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA((*v6).into()),
            _ => continue,
        };
        m.add_answer(Record::from_rdata(owner.clone(), MESH_TTL, rdata));
    }
    m
}

/// Encodes `m` for UDP: when it does not fit what the client can take, the
/// answer is replaced by an empty truncated one so the client retries over
/// TCP, where it is sent whole.
pub fn encode_udp(req: &Message, m: &Message) -> Option<Vec<u8>> {
    let limit = req
        .edns
        .as_ref()
        .map(|e| e.max_payload().clamp(512, MAX_UDP_PAYLOAD))
        .unwrap_or(512) as usize;
    let bytes = m.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut t = response(req, m.metadata.response_code);
    t.metadata.truncation = true;
    t.to_vec().ok()
}

/// Parses a request; None for anything that is not a well-formed query.
pub fn parse(bytes: &[u8]) -> Option<Message> {
    let m = Message::from_vec(bytes).ok()?;
    (m.metadata.message_type == MessageType::Query).then_some(m)
}

/// The packet path without sockets or upstreams, for fuzzing: parse, plan
/// against `state`, encode. Must never panic, whatever the bytes.
pub fn packet_path(bytes: &[u8], state: &MeshState) -> Option<Vec<u8>> {
    let req = parse(bytes)?;
    let search = [
        "default.svc.cluster.local".to_string(),
        "svc.cluster.local".into(),
    ];
    match plan(&req, state, &search) {
        Plan::Reply(m) => encode_udp(&req, &m),
        Plan::Forward { .. } => encode_udp(&req, &response(&req, ResponseCode::ServFail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: e, namespace: demo, labels: {app: e}}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.5}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec: {clusterIP: 10.96.0.10, selector: {app: e}, ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: demo}\nspec: {hosts: [api.example.com], addresses: [240.0.0.9], resolution: DNS}\n";

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn search() -> Vec<String> {
        [
            "demo.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .map(String::from)
        .to_vec()
    }

    fn answers(p: Plan) -> (ResponseCode, Vec<String>) {
        match p {
            Plan::Reply(m) => (
                m.metadata.response_code,
                m.answers
                    .iter()
                    .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
                    .collect(),
            ),
            Plan::Forward { name, .. } => panic!("forwarded {name}"),
        }
    }

    #[test]
    fn every_name_form_of_a_service_and_service_entry_hosts() {
        let state = mesh::standalone::parse(MESH, "cluster.local").unwrap();
        for name in [
            "echo",
            "echo.demo",
            "echo.demo.svc",
            "echo.demo.svc.cluster.local.",
            "ECHO.Demo.svc.cluster.local",
        ] {
            let (code, a) = answers(plan(&query(name, RecordType::A), &state, &search()));
            assert_eq!(code, ResponseCode::NoError, "{name}");
            assert_eq!(a.len(), 1, "{name}: {a:?}");
            assert!(a[0].ends_with(" 30 10.96.0.10"), "{name}: {a:?}");
            // The answer is for the name as asked.
            assert!(
                a[0].to_lowercase()
                    .starts_with(&name.trim_end_matches('.').to_lowercase()),
                "{a:?}"
            );
        }
        let (_, a) = answers(plan(
            &query("api.example.com", RecordType::A),
            &state,
            &search(),
        ));
        assert_eq!(a, ["api.example.com 30 240.0.0.9"]);
        // A mesh name without addresses of the asked family: NOERROR, empty.
        assert_eq!(
            answers(plan(&query("echo", RecordType::AAAA), &state, &search())),
            (ResponseCode::NoError, vec![])
        );
        assert_eq!(
            answers(plan(&query("echo", RecordType::MX), &state, &search())),
            (ResponseCode::NoError, vec![])
        );
    }

    #[test]
    fn other_names_are_forwarded_as_fqdn_and_odd_requests_refused() {
        let state = mesh::standalone::parse(MESH, "cluster.local").unwrap();
        // Short form only within the pod's own search list.
        let p = plan(&query("echo", RecordType::A), &state, &[]);
        assert!(
            matches!(p, Plan::Forward { ref name, qtype: RecordType::A } if name.to_ascii() == "echo.")
        );
        assert!(matches!(
            plan(&query("example.org", RecordType::A), &state, &search()),
            Plan::Forward { .. }
        ));
        let mut two = query("echo", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("x").unwrap(), RecordType::A));
        assert_eq!(
            answers(plan(&two, &state, &search())).0,
            ResponseCode::FormErr
        );
        let mut notify = query("echo", RecordType::A);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            answers(plan(&notify, &state, &search())).0,
            ResponseCode::NotImp
        );
        // Responses and garbage are not requests.
        let mut resp = query("echo", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert!(parse(&resp.to_vec().unwrap()).is_none());
        assert!(parse(b"\x00\x01garbage").is_none());
    }

    #[test]
    fn udp_answers_that_do_not_fit_are_truncated() {
        let req = query("big.example", RecordType::A);
        let mut m = response(&req, ResponseCode::NoError);
        for i in 0..60u8 {
            m.add_answer(Record::from_rdata(
                Name::from_ascii("big.example.").unwrap(),
                5,
                RData::A(std::net::Ipv4Addr::new(10, 0, 0, i).into()),
            ));
        }
        let out = Message::from_vec(&encode_udp(&req, &m).unwrap()).unwrap();
        assert!(out.metadata.truncation && out.answers.is_empty());
        assert_eq!(out.metadata.id, 7);
        let small = response(&req, ResponseCode::NXDomain);
        let out = Message::from_vec(&encode_udp(&req, &small).unwrap()).unwrap();
        assert!(!out.metadata.truncation);
        assert_eq!(out.metadata.response_code, ResponseCode::NXDomain);
    }

    /// The fuzz target's property on stable Rust, bounded: mutated queries
    /// (flipped, cut, spliced bytes) never panic the packet path.
    #[test]
    fn mutated_packets_never_panic() {
        let state = mesh::standalone::parse(MESH, "cluster.local").unwrap();
        let mut with_edns = query("echo.demo.svc.cluster.local", RecordType::A);
        with_edns.set_edns(Edns::new());
        let seeds: Vec<Vec<u8>> = [
            query("echo", RecordType::A),
            query("api.example.com", RecordType::AAAA),
            with_edns,
        ]
        .iter()
        .map(|m| m.to_vec().unwrap())
        .collect();
        for s in &seeds {
            assert!(packet_path(s, &state).is_some(), "seeds are answered");
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut parsed = 0;
        for i in 0..20_000 {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..=(next() % 4) {
                let at = next() as usize % (p.len() + 1);
                match next() % 4 {
                    0 if at < p.len() => p[at] ^= 1 << (next() % 8),
                    1 => p.truncate(at),
                    2 => p.insert(at, next() as u8),
                    _ if at < p.len() => p[at] = next() as u8,
                    _ => {}
                }
            }
            if packet_path(&p, &state).is_some() {
                parsed += 1;
            }
        }
        assert!(
            parsed > 1000,
            "mutations too destructive to reach the planner ({parsed})"
        );
    }
}
