//! A pod's and a Service's addresses of both families, as Kubernetes
//! declares them (`status.podIP`/`podIPs`; `spec.clusterIP`/`clusterIPs`,
//! `ipFamilies`, `ipFamilyPolicy`), checked as the API server checks them:
//! the single-address field is the first of the list, at most one address
//! per family, and the families and policy agree with the addresses.

use std::net::IpAddr;

use serde::Deserialize;

/// What is wrong, and in which field.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// One entry of `status.podIPs`.
#[derive(Deserialize, Debug, Clone)]
pub struct PodIp {
    pub ip: String,
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// At most two addresses, of different families.
fn one_per_family(ips: &[IpAddr], field: &str) -> Result<(), Invalid> {
    match ips {
        [] | [_] => Ok(()),
        [a, b] if a.is_ipv4() != b.is_ipv4() => Ok(()),
        [a, b] => Err(invalid(
            field,
            format!(
                "{a} and {b} are both {}: at most one address per family",
                family(*a)
            ),
        )),
        _ => Err(invalid(
            field,
            format!("{} addresses: at most two (one per family)", ips.len()),
        )),
    }
}

fn parse(s: &str, field: String) -> Result<IpAddr, Invalid> {
    s.parse().map_err(|e| invalid(field, format!("{s:?}: {e}")))
}

/// The pod's primary address and its others. No address at all (`""` and
/// no list) is a pod not yet networked.
pub fn pod_addresses(
    pod_ip: &str,
    pod_ips: &[PodIp],
) -> Result<(Option<IpAddr>, Vec<IpAddr>), Invalid> {
    let mut ips = Vec::with_capacity(pod_ips.len());
    for (i, p) in pod_ips.iter().enumerate() {
        ips.push(parse(&p.ip, format!("status.podIPs[{i}].ip"))?);
    }
    let primary = match pod_ip {
        "" => None,
        s => Some(parse(s, "status.podIP".into())?),
    };
    match (primary, ips.first()) {
        (Some(p), Some(first)) if p != *first => {
            return Err(invalid(
                "status.podIPs",
                format!("starts with {first}, not status.podIP {p}"),
            ))
        }
        (Some(p), None) => ips.push(p),
        _ => {}
    }
    one_per_family(&ips, "status.podIPs")?;
    let mut it = ips.into_iter();
    Ok((it.next(), it.collect()))
}

/// The family and policy fields of a Service spec.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct ServiceFamilies {
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: String,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ip_families: Vec<String>,
    #[serde(default)]
    pub ip_family_policy: Option<String>,
}

/// What the Service's `ipFamilies` says (checked by `service_vips`).
pub fn service_families(f: &ServiceFamilies) -> crate::model::IpFamilies {
    use crate::model::IpFamilies;
    match f
        .ip_families
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["IPv4"] => IpFamilies::V4Only,
        ["IPv6"] => IpFamilies::V6Only,
        _ => IpFamilies::Any,
    }
}

/// The Service's VIPs, the primary first; empty for a headless Service.
pub fn service_vips(f: &ServiceFamilies) -> Result<Vec<IpAddr>, Invalid> {
    if f.cluster_ip == "None" {
        return match f.cluster_ips.as_slice() {
            [] => Ok(Vec::new()),
            [one] if one == "None" => Ok(Vec::new()),
            _ => Err(invalid(
                "spec.clusterIPs",
                "must be [None] for a headless service",
            )),
        };
    }
    let listed: Vec<&str> = match (f.cluster_ip.as_str(), f.cluster_ips.as_slice()) {
        ("", []) => return Err(invalid("spec.clusterIP", "missing")),
        (one, []) => vec![one],
        (one, [first, ..]) if !one.is_empty() && one != first => {
            return Err(invalid(
                "spec.clusterIPs",
                format!("starts with {first}, not spec.clusterIP {one}"),
            ))
        }
        (_, all) => all.iter().map(String::as_str).collect(),
    };
    let mut vips = Vec::with_capacity(listed.len());
    for (i, s) in listed.iter().enumerate() {
        let field = match f.cluster_ips.is_empty() {
            true => "spec.clusterIP".to_string(),
            false => format!("spec.clusterIPs[{i}]"),
        };
        vips.push(parse(s, field)?);
    }
    one_per_family(&vips, "spec.clusterIPs")?;
    for (i, fam) in f.ip_families.iter().enumerate() {
        if fam != "IPv4" && fam != "IPv6" {
            return Err(invalid(
                format!("spec.ipFamilies[{i}]"),
                format!("{fam:?}: IPv4 or IPv6"),
            ));
        }
    }
    if !f.ip_families.is_empty() {
        let have: Vec<&str> = vips.iter().map(|v| family(*v)).collect();
        if have != f.ip_families {
            return Err(invalid(
                "spec.ipFamilies",
                format!(
                    "{:?} does not match the cluster IPs' families {have:?}",
                    f.ip_families
                ),
            ));
        }
    }
    match f.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") => {}
        Some("SingleStack") if vips.len() == 1 => {}
        Some("SingleStack") => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                "SingleStack with a cluster IP of each family",
            ))
        }
        Some("RequireDualStack") if vips.len() == 2 => {}
        Some("RequireDualStack") => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                "RequireDualStack needs a cluster IP of each family (spec.clusterIPs)",
            ))
        }
        Some(other) => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                format!("{other:?}: SingleStack, PreferDualStack or RequireDualStack"),
            ))
        }
    }
    Ok(vips)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn pod_addresses_table() {
        let list = |v: &[&str]| {
            v.iter()
                .map(|s| PodIp { ip: s.to_string() })
                .collect::<Vec<_>>()
        };
        type Want = Result<(Option<&'static str>, Vec<&'static str>), &'static str>;
        let cases: &[(&str, &[&str], Want)] = &[
            ("", &[], Ok((None, vec![]))),
            ("10.0.0.1", &[], Ok((Some("10.0.0.1"), vec![]))),
            (
                "10.0.0.1",
                &["10.0.0.1", "fd00::1"],
                Ok((Some("10.0.0.1"), vec!["fd00::1"])),
            ),
            (
                "",
                &["fd00::1", "10.0.0.1"],
                Ok((Some("fd00::1"), vec!["10.0.0.1"])),
            ),
            ("fd00::1", &["fd00::1"], Ok((Some("fd00::1"), vec![]))),
            ("10.0.0.1", &["fd00::1", "10.0.0.1"], Err("status.podIPs")),
            ("", &["10.0.0.1", "10.0.0.2"], Err("status.podIPs")),
            (
                "",
                &["10.0.0.1", "fd00::1", "fd00::2"],
                Err("status.podIPs"),
            ),
            ("", &["10.0.0.1", "nope"], Err("status.podIPs[1].ip")),
            ("nope", &[], Err("status.podIP")),
        ];
        for (ip, list_, want) in cases {
            let got = pod_addresses(ip, &list(list_));
            match (got, want) {
                (Ok((p, rest)), Ok((wp, wrest))) => {
                    assert_eq!(p, wp.map(|s| s.parse().unwrap()), "{ip} {list_:?}");
                    assert_eq!(rest, ips(wrest), "{ip} {list_:?}");
                }
                (Err(e), Err(field)) => assert_eq!(e.field, *field, "{ip} {list_:?}: {e:?}"),
                (got, want) => panic!("{ip} {list_:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn service_vips_table() {
        let svc = |ip: &str, list: &[&str], fams: &[&str], policy: Option<&str>| ServiceFamilies {
            cluster_ip: ip.into(),
            cluster_ips: list.iter().map(|s| s.to_string()).collect(),
            ip_families: fams.iter().map(|s| s.to_string()).collect(),
            ip_family_policy: policy.map(Into::into),
        };
        let dual = ["10.96.0.1", "fd00:96::1"];
        let cases: Vec<(ServiceFamilies, Result<Vec<IpAddr>, &str>)> = vec![
            (svc("10.96.0.1", &[], &[], None), Ok(ips(&["10.96.0.1"]))),
            (svc("None", &[], &[], None), Ok(vec![])),
            (
                svc(
                    "None",
                    &["None"],
                    &["IPv4", "IPv6"],
                    Some("PreferDualStack"),
                ),
                Ok(vec![]),
            ),
            (
                svc("None", &["10.96.0.1"], &[], None),
                Err("spec.clusterIPs"),
            ),
            (svc("", &[], &[], None), Err("spec.clusterIP")),
            (svc("nope", &[], &[], None), Err("spec.clusterIP")),
            (
                svc(
                    "10.96.0.1",
                    &dual,
                    &["IPv4", "IPv6"],
                    Some("RequireDualStack"),
                ),
                Ok(ips(&dual)),
            ),
            (svc("", &dual, &[], None), Ok(ips(&dual))),
            (
                svc(
                    "fd00:96::1",
                    &["fd00:96::1"],
                    &["IPv6"],
                    Some("SingleStack"),
                ),
                Ok(ips(&["fd00:96::1"])),
            ),
            (svc("fd00:96::1", &dual, &[], None), Err("spec.clusterIPs")),
            (
                svc("10.96.0.1", &["10.96.0.1", "10.96.0.2"], &[], None),
                Err("spec.clusterIPs"),
            ),
            (
                svc("10.96.0.1", &["10.96.0.1", "bad"], &[], None),
                Err("spec.clusterIPs[1]"),
            ),
            (
                svc("10.96.0.1", &dual, &["IPv6", "IPv4"], None),
                Err("spec.ipFamilies"),
            ),
            (
                svc("10.96.0.1", &dual, &["IPv4"], None),
                Err("spec.ipFamilies"),
            ),
            (
                svc("10.96.0.1", &[], &["ipv4"], None),
                Err("spec.ipFamilies[0]"),
            ),
            (
                svc("10.96.0.1", &dual, &[], Some("SingleStack")),
                Err("spec.ipFamilyPolicy"),
            ),
            (
                svc("10.96.0.1", &[], &[], Some("RequireDualStack")),
                Err("spec.ipFamilyPolicy"),
            ),
            (
                svc("10.96.0.1", &[], &[], Some("DualStack")),
                Err("spec.ipFamilyPolicy"),
            ),
        ];
        for (f, want) in cases {
            let got = service_vips(&f);
            match (&got, &want) {
                (Ok(v), Ok(w)) => assert_eq!(v, w, "{f:?}"),
                (Err(e), Err(field)) => assert_eq!(e.field, *field, "{f:?}: {e:?}"),
                _ => panic!("{f:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
