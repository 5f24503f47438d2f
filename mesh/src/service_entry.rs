//! ServiceEntry (networking.istio.io): hosts the mesh knows that have no
//! Kubernetes Service, so that ztunnel's DNS proxy can answer for them and,
//! when the entry has addresses, traffic to them is routed (`objects`
//! publishes such an entry as a service).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::standalone::{err, typed, ConfigError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryPort {
    pub number: u16,
    /// Lowercase (`http`, `http2`, `grpc`, `https`, `tcp`, `tls`...).
    pub protocol: String,
    pub name: String,
    /// Where the endpoints listen, when not on `number`.
    pub target_port: Option<u16>,
}

/// A DNS endpoint: a name the proxy resolves itself, and the ports it
/// listens on by entry port name, where they differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsEndpoint {
    pub host: String,
    pub ports: BTreeMap<String, u16>,
}

/// A STATIC endpoint: its address, labels (for subsets) and the ports it
/// listens on by entry port name, where they differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryEndpoint {
    pub address: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub ports: BTreeMap<String, u16>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    /// The object's labels (`istio.io/use-waypoint` binds it to a waypoint).
    pub labels: BTreeMap<String, String>,
    pub hosts: Vec<String>,
    /// The VIPs the hosts resolve to in the mesh.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<EntryPort>,
    pub location: Location,
    pub resolution: Resolution,
    /// STATIC endpoints' addresses.
    pub endpoints: Vec<IpAddr>,
    /// The STATIC endpoints in full.
    pub static_endpoints: Vec<EntryEndpoint>,
    /// DNS resolution: the names to resolve (none given: the hosts).
    pub dns_endpoints: Vec<DnsEndpoint>,
}

impl ServiceEntry {
    /// What a DNS query for one of the hosts is answered with in the mesh:
    /// the declared addresses, else (STATIC) the endpoints. Empty means the
    /// name is left to the upstream resolvers.
    pub fn dns_addresses(&self) -> &[IpAddr] {
        if !self.addresses.is_empty() || self.resolution != Resolution::Static {
            &self.addresses
        } else {
            &self.endpoints
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    resolution: Option<Resolution>,
    #[serde(default)]
    location: Option<Location>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortSpec {
    number: u16,
    #[serde(default)]
    protocol: Option<String>,
    name: String,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
struct EndpointSpec {
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
}

#[derive(Deserialize)]
struct Object {
    metadata: Meta,
    spec: Option<Spec>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn ip(object: &str, field: String, s: &str) -> Result<IpAddr, ConfigError> {
    // A single-address CIDR is accepted as that address.
    let bare = s
        .strip_suffix("/32")
        .or_else(|| s.strip_suffix("/128"))
        .unwrap_or(s);
    bare.parse().map_err(|_| {
        err(
            object,
            field,
            format!("{s:?} is not an IP address (ranges are not supported)"),
        )
    })
}

pub(crate) fn parse(object: &str, value: serde_yaml::Value) -> Result<ServiceEntry, ConfigError> {
    let o: Object = typed(object, value)?;
    let spec = o
        .spec
        .ok_or_else(|| err(object, "spec", "missing (needs spec.hosts)"))?;
    if spec.hosts.is_empty() {
        return Err(err(object, "spec.hosts", "empty"));
    }
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        if h.is_empty() || h.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(err(
                object,
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a DNS name"),
            ));
        }
        hosts.push(h);
    }
    let addresses = spec
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(object, format!("spec.addresses[{i}]"), a))
        .collect::<Result<_, _>>()?;
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.number == 0 || p.target_port == Some(0) {
            return Err(err(object, format!("spec.ports[{i}]"), "port 0"));
        }
        if ports.iter().any(|q: &EntryPort| q.name == p.name) {
            return Err(err(
                object,
                format!("spec.ports[{i}].name"),
                format!("{:?} is used twice", p.name),
            ));
        }
        ports.push(EntryPort {
            number: p.number,
            protocol: p.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase(),
            name: p.name.clone(),
            target_port: p.target_port,
        });
    }
    let mut endpoints = Vec::new();
    let mut static_endpoints = Vec::new();
    let mut dns_endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        match e.address.parse() {
            Ok(a) => {
                endpoints.push(a);
                if let Some(name) = e
                    .ports
                    .keys()
                    .find(|n| !ports.iter().any(|p| &p.name == *n))
                {
                    return Err(err(
                        object,
                        format!("spec.endpoints[{i}].ports.{name}"),
                        "names no port of the entry",
                    ));
                }
                static_endpoints.push(EntryEndpoint {
                    address: a,
                    labels: e.labels.clone(),
                    ports: e.ports.clone(),
                });
            }
            // DNS-resolved endpoints name hosts; only STATIC needs IPs.
            Err(_) if resolution == Resolution::Static => {
                return Err(err(
                    object,
                    format!("spec.endpoints[{i}].address"),
                    format!("{:?} is not an IP address (resolution STATIC)", e.address),
                ))
            }
            Err(_) => {
                let h = e.address.trim_end_matches('.').to_ascii_lowercase();
                if h.is_empty() || h.split('.').any(|l| l.is_empty() || l.len() > 63) {
                    return Err(err(
                        object,
                        format!("spec.endpoints[{i}].address"),
                        format!("{:?} is neither an IP address nor a DNS name", e.address),
                    ));
                }
                dns_endpoints.push(DnsEndpoint {
                    host: h,
                    ports: e.ports.clone(),
                });
            }
        }
    }
    Ok(ServiceEntry {
        name: o.metadata.name,
        namespace: o.metadata.namespace.unwrap_or_else(|| "default".into()),
        labels: o.metadata.labels,
        hosts,
        addresses,
        ports,
        location: spec.location.unwrap_or_default(),
        resolution,
        endpoints,
        static_endpoints,
        dns_endpoints,
    })
}
