//! WDS resources (istio.workload.Address, istio.security.Authorization) into
//! the mesh model. Resources are kept by name as istiod last sent them; each
//! change rebuilds one whole `MeshState`, so the data path sees a consistent
//! view exactly as with the standalone file.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use mesh::authz::{self, AuthorizationPolicy, StringMatch};
use mesh::routes::{AllowedNamespaces, Waypoint, WaypointFor, WaypointRef};
use mesh::{
    Endpoint, MeshState, Rejected, Service, ServicePort, TargetPort, TunnelProtocol, Workload,
};
use prost::Message;

use crate::pb::istio::security as sec;
use crate::pb::istio::workload as wl;

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{name}: not a valid {type_url}: {source}")]
    Decode {
        name: String,
        type_url: String,
        source: prost::DecodeError,
    },
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("unsupported resource type {0}")]
    UnknownType(String),
}

/// What istiod has told us, by resource name.
#[derive(Default, Debug)]
pub struct Resources {
    pub workloads: BTreeMap<String, wl::Workload>,
    pub services: BTreeMap<String, wl::Service>,
    /// Translated on arrival; one we cannot read fully is kept in its
    /// fail-closed form with what was wrong, never refused.
    pub policies: BTreeMap<String, (AuthorizationPolicy, Vec<Rejected>)>,
    /// name -> version, for `initial_resource_versions` on reconnect.
    pub versions: HashMap<String, HashMap<String, String>>,
}

impl Resources {
    /// Decodes and stores one resource. On error nothing is stored and the
    /// previous version of that resource (if any) stays.
    pub fn upsert(
        &mut self,
        type_url: &str,
        name: &str,
        version: &str,
        body: &[u8],
    ) -> Result<(), ResourceError> {
        let decode_err = |source| ResourceError::Decode {
            name: name.to_string(),
            type_url: type_url.to_string(),
            source,
        };
        match type_url {
            ADDRESS_TYPE => {
                let addr = wl::Address::decode(body).map_err(decode_err)?;
                match addr.r#type {
                    Some(wl::address::Type::Workload(w)) => {
                        workload_ip(&w).map_err(|reason| invalid(name, reason))?;
                        self.services.remove(name);
                        self.workloads.insert(name.to_string(), w);
                    }
                    Some(wl::address::Type::Service(s)) => {
                        for a in &s.addresses {
                            ip_of(&a.address)
                                .map_err(|r| invalid(name, format!("service address: {r}")))?;
                        }
                        self.workloads.remove(name);
                        self.services.insert(name.to_string(), s);
                    }
                    None => {
                        return Err(invalid(
                            name,
                            "Address with neither workload nor service".into(),
                        ))
                    }
                }
            }
            AUTHORIZATION_TYPE => {
                let translated = match sec::Authorization::decode(body) {
                    Ok(p) => translate_policy(&p, body.len()),
                    // A policy we cannot decode still says which namespace
                    // it covers (resources are named `<ns>/<name>`): it
                    // denies everything there rather than vanish.
                    Err(e) => match name.split_once('/') {
                        Some((ns, n)) => undecodable_policy(ns, n, &e),
                        None => return Err(decode_err(e)),
                    },
                };
                self.policies.insert(name.to_string(), translated);
            }
            other => return Err(ResourceError::UnknownType(other.to_string())),
        }
        self.versions
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), version.to_string());
        Ok(())
    }

    pub fn remove(&mut self, type_url: &str, name: &str) {
        if type_url == ADDRESS_TYPE {
            self.workloads.remove(name);
            self.services.remove(name);
        } else {
            self.policies.remove(name);
        }
        if let Some(v) = self.versions.get_mut(type_url) {
            v.remove(name);
        }
    }

    /// The mesh as istiod currently describes it.
    pub fn build(&self) -> MeshState {
        let vip_hosts: HashMap<IpAddr, (&str, &str)> = self
            .services
            .values()
            .flat_map(|s| {
                s.addresses
                    .iter()
                    .filter_map(|a| ip_of(&a.address).ok())
                    .map(move |ip| (ip, (s.namespace.as_str(), s.hostname.as_str())))
            })
            .collect();
        let mut waypoints: BTreeMap<(String, String), Waypoint> = BTreeMap::new();
        // istiod has already resolved `istio.io/use-waypoint` and the Gateway's
        // `waypoint-for`: a workload or service carries a waypoint only when
        // that traffic must cross it.
        let mut waypoint_ref = |g: &Option<wl::GatewayAddress>| -> Option<WaypointRef> {
            let (ns, host) = match g.as_ref()?.destination.as_ref()? {
                wl::gateway_address::Destination::Hostname(h) => {
                    (h.namespace.clone(), h.hostname.clone())
                }
                wl::gateway_address::Destination::Address(a) => {
                    let (ns, host) = vip_hosts.get(&ip_of(&a.address).ok()?)?;
                    (ns.to_string(), host.to_string())
                }
            };
            let wp = waypoints
                .entry((ns.clone(), host.clone()))
                .or_insert_with(|| Waypoint {
                    name: host.clone(),
                    namespace: ns.clone(),
                    hostname: host.clone(),
                    for_traffic: WaypointFor::All,
                    // istiod sends a waypoint only where the Gateway admits it.
                    allowed_namespaces: AllowedNamespaces::All,
                });
            Some(WaypointRef {
                name: wp.name.clone(),
                namespace: wp.namespace.clone(),
            })
        };

        let mut workloads = Vec::new();
        // uid -> index in `workloads`.
        let mut position: HashMap<&str, usize> = HashMap::new();
        let mut members: HashMap<String, Vec<(String, IpAddr)>> = HashMap::new();
        for w in self.workloads.values() {
            let Ok(ip) = workload_ip(w) else { continue };
            position.insert(w.uid.as_str(), workloads.len());
            let mut named_ports = BTreeMap::new();
            for (key, ports) in &w.services {
                let host = key.split_once('/').map_or(key.as_str(), |(_, h)| h);
                for p in &ports.ports {
                    if let (Ok(sp), Ok(tp)) =
                        (u16::try_from(p.service_port), u16::try_from(p.target_port))
                    {
                        if tp != 0 {
                            named_ports.insert(per_endpoint_port(host, sp), tp);
                        }
                    }
                }
                if w.status == wl::WorkloadStatus::Healthy as i32 {
                    members
                        .entry(key.clone())
                        .or_default()
                        .push((w.uid.clone(), ip));
                }
            }
            workloads.push(Workload {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: non_empty(&w.service_account, "default"),
                trust_domain: non_empty(&w.trust_domain, identity::DEFAULT_TRUST_DOMAIN),
                node: w.node.clone(),
                ip,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                waypoint: waypoint_ref(&w.waypoint),
                named_ports,
                protocol: if w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
                    TunnelProtocol::Hbone
                } else {
                    TunnelProtocol::None
                },
                canonical_name: non_empty(&w.canonical_name, &w.name),
                canonical_revision: non_empty(&w.canonical_revision, "latest"),
                authorization_policies: w.authorization_policies.clone(),
            });
        }

        let mut services = Vec::new();
        for s in self.services.values() {
            let key = format!("{}/{}", s.namespace, s.hostname);
            let endpoints = members
                .get(&key)
                .map(|m| {
                    m.iter()
                        .map(|(uid, ip)| Endpoint {
                            workload_uid: uid.clone(),
                            ip: *ip,
                        })
                        .collect()
                })
                .unwrap_or_default();
            services.push(Service {
                waypoint: waypoint_ref(&s.waypoint),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                vips: s
                    .addresses
                    .iter()
                    .filter_map(|a| ip_of(&a.address).ok())
                    .collect(),
                ports: s
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let port = u16::try_from(p.service_port).ok()?;
                        // The target port may differ per endpoint (named
                        // targetPort): each workload's own map wins.
                        Some(ServicePort {
                            name: None,
                            port,
                            target: TargetPort::Named(per_endpoint_port(&s.hostname, port)),
                        })
                    })
                    .collect(),
                endpoints,
            });
            // A service port with a fixed target reaches endpoints whose
            // workload entry did not list it. Only the members are visited
            // (by position), so this is linear in endpoints, not services
            // times workloads.
            for p in &s.ports {
                if let (Ok(sp), Ok(tp)) =
                    (u16::try_from(p.service_port), u16::try_from(p.target_port))
                {
                    if tp == 0 {
                        continue;
                    }
                    for (uid, _) in members.get(&key).into_iter().flatten() {
                        if let Some(&i) = position.get(uid.as_str()) {
                            workloads[i]
                                .named_ports
                                .entry(per_endpoint_port(&s.hostname, sp))
                                .or_insert(tp);
                        }
                    }
                }
            }
        }

        let policies = self.policies.values().map(|(p, _)| p.clone()).collect();
        let mut state = MeshState::new(workloads, services, policies, Vec::new());
        state.waypoints = waypoints.into_values().collect();
        state.rejected = self
            .policies
            .values()
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        state
    }
}

/// The synthetic named port under which a workload records the target of a
/// service port (WDS gives target ports per workload, not per service).
fn per_endpoint_port(host: &str, port: u16) -> String {
    format!("wds:{host}:{port}")
}

fn invalid(name: &str, reason: String) -> ResourceError {
    ResourceError::Invalid {
        name: name.to_string(),
        reason,
    }
}

fn non_empty(s: &str, default: &str) -> String {
    if s.is_empty() { default } else { s }.to_string()
}

fn ip_of(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap())),
        n => Err(format!("address of {n} bytes")),
    }
}

fn workload_ip(w: &wl::Workload) -> Result<IpAddr, String> {
    // Our pods are single-stack; the first address is the one traffic uses.
    match w.addresses.first() {
        Some(a) => ip_of(a).map_err(|r| format!("workload {}/{} {r}", w.namespace, w.name)),
        None => Err(format!(
            "workload {}/{} has no address",
            w.namespace, w.name
        )),
    }
}

/// What we cannot read of an Authorization fails closed, as for the
/// Kubernetes objects: an unknown scope widens to the namespace, an unknown
/// action is a DENY, a match field we cannot evaluate makes its rule match
/// nothing (ALLOW) or match on the rest (DENY), and fields this build does
/// not know (the message re-encodes shorter than it arrived) make the whole
/// policy deny everything in scope (DENY) or allow nothing (ALLOW).
fn translate_policy(
    p: &sec::Authorization,
    wire_len: usize,
) -> (AuthorizationPolicy, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut report = |field: &str, reason: String, effect: &str| {
        rejected.push(Rejected {
            kind: POLICY_KIND.into(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            field: field.into(),
            reason,
            effect: effect.into(),
        })
    };
    let widest = if p.namespace == mesh::ROOT_NAMESPACE {
        authz::Scope::Global
    } else {
        authz::Scope::Namespace
    };
    let scope = match sec::Scope::try_from(p.scope) {
        Ok(sec::Scope::Global) => authz::Scope::Global,
        Ok(sec::Scope::Namespace) => authz::Scope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => authz::Scope::Listed,
        Err(_) => {
            report(
                "scope",
                format!("unknown scope {}", p.scope),
                "applied to the policy's namespace",
            );
            widest
        }
    };
    let action = match sec::Action::try_from(p.action) {
        Ok(sec::Action::Allow) => authz::Action::Allow,
        Ok(sec::Action::Deny) => authz::Action::Deny,
        Err(_) => {
            report(
                "action",
                format!("unknown action {}", p.action),
                "treated as DENY",
            );
            authz::Action::Deny
        }
    };
    let rule_effect = if action == authz::Action::Deny {
        "the DENY rule ignores it and denies more"
    } else {
        "the rule matches nothing"
    };
    let strings = |ms: &[sec::StringMatch]| -> Result<Vec<StringMatch>, String> {
        ms.iter()
            .map(|m| match &m.match_type {
                Some(sec::string_match::MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
                Some(sec::string_match::MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
                Some(sec::string_match::MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
                Some(sec::string_match::MatchType::Presence(_)) => Ok(StringMatch::Presence),
                None => Err("string match with no match type".to_string()),
            })
            .collect()
    };
    // A service account match is any trust domain's principal for it; a
    // principal is `<td>/ns/<ns>/sa/<sa>` and neither part may hold a '/'.
    let accounts = |ms: &[sec::ServiceAccountMatch]| -> Vec<StringMatch> {
        ms.iter()
            .map(|m| StringMatch::Suffix(format!("/ns/{}/sa/{}", m.namespace, m.service_account)))
            .collect()
    };
    let nets = |addrs: &[sec::Address]| -> Result<Vec<IpNet>, String> {
        addrs
            .iter()
            .map(|a| {
                let ip = ip_of(&a.address)?;
                IpNet::new(ip, a.length as u8)
                    .map_err(|_| format!("prefix length {} for {ip}", a.length))
            })
            .collect()
    };
    let ports = |ps: &[u32]| -> Result<Vec<u16>, String> {
        ps.iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("port {p}")))
            .collect()
    };
    let mut rules = Vec::new();
    for (gi, g) in p.groups.iter().enumerate() {
        let mut rule = authz::Rule::default();
        for (ri, r) in g.rules.iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in r.matches.iter().enumerate() {
                let base = format!("groups[{gi}].rules[{ri}].matches[{mi}]");
                // Each field either evaluates or is left out and named.
                let mut bad = |field: &str, why: String| {
                    let field = format!("{base}.{field}");
                    report(&field, why, rule_effect);
                    rule.unevaluable.push(field);
                };
                fn take<T>(
                    field: &str,
                    v: Result<Vec<T>, String>,
                    bad: &mut dyn FnMut(&str, String),
                ) -> Vec<T> {
                    v.unwrap_or_else(|why| {
                        bad(field, why);
                        Vec::new()
                    })
                }
                let mut principals = take("principals", strings(&m.principals), &mut bad);
                principals.extend(accounts(&m.service_accounts));
                let mut not_principals =
                    take("not_principals", strings(&m.not_principals), &mut bad);
                not_principals.extend(accounts(&m.not_service_accounts));
                matches.push(authz::Match {
                    namespaces: take("namespaces", strings(&m.namespaces), &mut bad),
                    not_namespaces: take("not_namespaces", strings(&m.not_namespaces), &mut bad),
                    principals,
                    not_principals,
                    source_ips: take("source_ips", nets(&m.source_ips), &mut bad),
                    not_source_ips: take("not_source_ips", nets(&m.not_source_ips), &mut bad),
                    destination_ips: take("destination_ips", nets(&m.destination_ips), &mut bad),
                    not_destination_ips: take(
                        "not_destination_ips",
                        nets(&m.not_destination_ips),
                        &mut bad,
                    ),
                    destination_ports: take(
                        "destination_ports",
                        ports(&m.destination_ports),
                        &mut bad,
                    ),
                    not_destination_ports: take(
                        "not_destination_ports",
                        ports(&m.not_destination_ports),
                        &mut bad,
                    ),
                    l7: Default::default(),
                });
            }
            rule.clauses.push(authz::Clause { matches });
        }
        rules.push(rule);
    }
    if p.encoded_len() != wire_len {
        let effect = if action == authz::Action::Deny {
            "the policy denies all it covers"
        } else {
            "the policy allows nothing it covers"
        };
        report("", "fields this build does not know".into(), effect);
        rules = vec![authz::Rule {
            clauses: Vec::new(),
            unevaluable: vec!["unknown fields".into()],
        }];
    }
    let policy = AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: p.dry_run,
    };
    (policy, rejected)
}

/// How a policy is named in reports: the resource type istiod sends.
const POLICY_KIND: &str = "Authorization";

fn undecodable_policy(
    namespace: &str,
    name: &str,
    e: &prost::DecodeError,
) -> (AuthorizationPolicy, Vec<Rejected>) {
    let scope = if namespace == mesh::ROOT_NAMESPACE {
        authz::Scope::Global
    } else {
        authz::Scope::Namespace
    };
    let policy = AuthorizationPolicy {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action: authz::Action::Deny,
        rules: vec![authz::Rule {
            clauses: Vec::new(),
            unevaluable: vec!["undecodable".into()],
        }],
        dry_run: false,
    };
    let rejected = Rejected {
        kind: POLICY_KIND.into(),
        namespace: namespace.into(),
        name: name.into(),
        field: String::new(),
        reason: format!("cannot decode: {e}"),
        effect: "denies everything in its namespace".into(),
    };
    (policy, vec![rejected])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::authz::{Connection, Decision};

    fn workload(
        name: &str,
        ip: [u8; 4],
        svc: Option<(&str, u32, u32)>,
        policies: &[&str],
    ) -> wl::Workload {
        let mut services = HashMap::new();
        if let Some((key, sp, tp)) = svc {
            services.insert(
                key.to_string(),
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: sp,
                        target_port: tp,
                        app_protocol: 0,
                    }],
                },
            );
        }
        wl::Workload {
            uid: format!("Kubernetes//Pod/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            node: "node1".into(),
            services: services.into_iter().collect(),
            authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn put(r: &mut Resources, name: &str, a: wl::address::Type) {
        let body = wl::Address { r#type: Some(a) }.encode_to_vec();
        r.upsert(ADDRESS_TYPE, name, "v1", &body).unwrap();
    }

    #[test]
    fn workloads_services_and_listed_policies() {
        let mut r = Resources::default();
        let key = "demo/echo.demo.svc.cluster.local";
        put(
            &mut r,
            "a",
            wl::address::Type::Workload(workload(
                "echo",
                [10, 244, 1, 2],
                Some((key, 80, 8080)),
                &["demo/only-client"],
            )),
        );
        put(
            &mut r,
            "b",
            wl::address::Type::Workload(workload("client", [10, 244, 1, 3], None, &[])),
        );
        put(
            &mut r,
            "svc",
            wl::address::Type::Service(wl::Service {
                name: "echo".into(),
                namespace: "demo".into(),
                hostname: "echo.demo.svc.cluster.local".into(),
                addresses: vec![wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 10],
                }],
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: 0,
                }],
                waypoint: None,
            }),
        );
        let allow = sec::Authorization {
            name: "only-client".into(),
            namespace: "demo".into(),
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Allow as i32,
            groups: vec![sec::Group {
                rules: vec![sec::Rules {
                    matches: vec![sec::Match {
                        service_accounts: vec![sec::ServiceAccountMatch {
                            namespace: "demo".into(),
                            service_account: "client".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        r.upsert(
            AUTHORIZATION_TYPE,
            "demo/only-client",
            "v1",
            &allow.encode_to_vec(),
        )
        .unwrap();

        let st = r.build();
        let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        let eps = st.endpoints_for(svc, 80);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].0.name.as_str(), eps[0].1), ("echo", 8080));
        let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
        let client = st.workload_by_ip("10.244.1.3".parse().unwrap()).unwrap();
        fn conn<'a>(id: &'a identity::Identity, echo: &Workload) -> Connection<'a> {
            Connection {
                src_identity: Some(id),
                src_ip: "10.244.1.3".parse().unwrap(),
                dst_ip: echo.ip,
                dst_port: 8080,
                request: None,
            }
        }
        let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
        assert_eq!(
            authz::evaluate(
                policies.iter().copied(),
                echo,
                &conn(&client.identity(), echo)
            ),
            Decision::Allow
        );
        let other = identity::Identity::new("cluster.local", "demo", "intruder");
        assert!(matches!(
            authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
            Decision::Deny(_)
        ));
        // The policy is listed on echo only: client has no ALLOW selecting it.
        assert!(
            authz::evaluate(policies.iter().copied(), client, &conn(&other, echo))
                == Decision::Allow
        );

        r.remove(AUTHORIZATION_TYPE, "demo/only-client");
        let st = r.build();
        let policies: Vec<_> = st.policies.iter().map(|p| p.as_ref()).collect();
        assert_eq!(
            authz::evaluate(policies.iter().copied(), echo, &conn(&other, echo)),
            Decision::Allow
        );
    }

    #[test]
    fn bad_resources_are_refused_by_name_and_keep_the_old_version() {
        let mut r = Resources::default();
        put(
            &mut r,
            "a",
            wl::address::Type::Workload(workload("echo", [10, 244, 1, 2], None, &[])),
        );
        let mut bad = workload("echo", [10, 244, 1, 2], None, &[]);
        bad.addresses = vec![vec![1, 2, 3]];
        let body = wl::Address {
            r#type: Some(wl::address::Type::Workload(bad)),
        }
        .encode_to_vec();
        let e = r
            .upsert(ADDRESS_TYPE, "a", "v2", &body)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a: workload demo/echo address of 3 bytes"),
            "{e}"
        );
        let e = r
            .upsert(ADDRESS_TYPE, "junk", "v1", &[0xff, 0xff])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("junk: not a valid type.googleapis.com/istio.workload.Address"),
            "{e}"
        );
        assert_eq!(r.versions[ADDRESS_TYPE]["a"], "v1");
        assert!(r
            .build()
            .workload_by_ip("10.244.1.2".parse().unwrap())
            .is_some());
    }

    /// Policies we cannot read fully are kept, fail closed, and reported.
    #[test]
    fn unreadable_policies_fail_closed() {
        let echo = workload("echo", [10, 244, 1, 2], None, &[]);
        let principal = |p: &str| sec::StringMatch {
            match_type: Some(sec::string_match::MatchType::Exact(p.into())),
        };
        let deny_client = |name: &str| sec::Authorization {
            name: name.into(),
            namespace: "demo".into(),
            scope: sec::Scope::Namespace as i32,
            action: sec::Action::Deny as i32,
            groups: vec![sec::Group {
                rules: vec![sec::Rules {
                    matches: vec![sec::Match {
                        principals: vec![principal("cluster.local/ns/demo/sa/client")],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        let decide = |body: &[u8], name: &str, src: &str| {
            let mut r = Resources::default();
            put(&mut r, "echo", wl::address::Type::Workload(echo.clone()));
            r.upsert(AUTHORIZATION_TYPE, name, "v1", body).unwrap();
            let st = r.build();
            let w = st
                .workload_by_ip("10.244.1.2".parse().unwrap())
                .unwrap()
                .clone();
            let src = identity::Identity::new("cluster.local", "demo", src);
            let c = Connection {
                src_identity: Some(&src),
                src_ip: "10.244.2.9".parse().unwrap(),
                dst_ip: w.ip,
                dst_port: 8080,
                request: None,
            };
            let d = authz::evaluate(st.policies.iter().map(|p| p.as_ref()), &w, &c);
            (d == Decision::Allow, st.rejected.clone())
        };
        // Sound: only the named client is denied, nothing reported.
        let ok = deny_client("demo/p").encode_to_vec();
        assert_eq!(decide(&ok, "demo/p", "client"), (false, vec![]));
        assert!(decide(&ok, "demo/p", "other").0);

        // Unknown scope: widens to the namespace; unknown action: a DENY.
        let mut p = deny_client("p");
        p.scope = 7;
        p.action = 9;
        let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "client");
        assert!(!allowed);
        let fields: Vec<_> = rejected.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["scope", "action"]);
        assert!(
            decide(&p.encode_to_vec(), "demo/p", "other").0,
            "the rest of the rule still decides"
        );

        // A match with no type: the DENY rule ignores it and denies more.
        let mut p = deny_client("p");
        p.groups[0].rules[0].matches[0].principals = vec![sec::StringMatch { match_type: None }];
        let (allowed, rejected) = decide(&p.encode_to_vec(), "demo/p", "other");
        assert!(!allowed, "{rejected:?}");
        assert_eq!(
            rejected[0].field,
            "groups[0].rules[0].matches[0].principals"
        );
        // ...and the same field in an ALLOW matches nothing.
        p.action = sec::Action::Allow as i32;
        assert!(!decide(&p.encode_to_vec(), "demo/p", "client").0);

        // Fields this build does not know (field 99, varint 1): DENY all.
        let mut body = deny_client("p").encode_to_vec();
        body.extend([0x98, 0x06, 0x01]);
        let (allowed, rejected) = decide(&body, "demo/p", "other");
        assert!(!allowed);
        assert_eq!(
            (rejected[0].kind.as_str(), rejected[0].name.as_str()),
            ("Authorization", "p")
        );
        assert!(rejected[0].reason.contains("does not know"), "{rejected:?}");

        // Undecodable: denies everything in the namespace the name gives.
        let (allowed, rejected) = decide(&[0xff, 0xff], "demo/broken", "other");
        assert!(!allowed);
        assert_eq!(
            (rejected[0].namespace.as_str(), rejected[0].name.as_str()),
            ("demo", "broken")
        );
        let mut r = Resources::default();
        assert!(r
            .upsert(AUTHORIZATION_TYPE, "nonamespace", "v1", &[0xff, 0xff])
            .is_err());
    }

    #[test]
    fn waypoint_by_hostname_and_by_vip() {
        let mut r = Resources::default();
        let mut w = workload("echo", [10, 244, 1, 2], None, &[]);
        w.waypoint = Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 99],
                },
            )),
            hbone_mtls_port: 15008,
        });
        put(&mut r, "a", wl::address::Type::Workload(w));
        put(
            &mut r,
            "wp",
            wl::address::Type::Service(wl::Service {
                name: "waypoint".into(),
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
                addresses: vec![wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 99],
                }],
                ports: vec![],
                waypoint: None,
            }),
        );
        let st = r.build();
        let echo = st.workload_by_ip("10.244.1.2".parse().unwrap()).unwrap();
        let wref = st.workload_waypoint(echo).expect("waypoint");
        assert_eq!(wref.name, "waypoint.demo.svc.cluster.local");
    }
}
