//! DestinationRule `trafficPolicy.tls`: TLS the waypoint originates to an
//! endpoint outside the mesh (a ServiceEntry's). Mesh endpoints are always
//! reached over HBONE mTLS, so `ISTIO_MUTUAL` and `DISABLE` change nothing.
//! What the waypoint cannot do as written is refused with its field rather
//! than silently sent in the clear or unverified.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::standalone::{err, ConfigError};

/// How to originate TLS. Files are read by the waypoint when it connects,
/// so a rotated certificate is picked up by the next connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct UpstreamTls {
    /// The server name sent and verified; None: the destination's host.
    pub sni: Option<String>,
    /// PEM roots; None: the system bundle.
    pub ca_certificates: Option<PathBuf>,
    /// MUTUAL: the client certificate chain and key (PEM files).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Set true: the server's certificate is not verified at all.
    pub insecure_skip_verify: bool,
    /// `credentialName`: the Secret (namespace, name) holding the roots
    /// (`ca.crt`) and, for MUTUAL, the client certificate (`tls.crt`,
    /// `tls.key`), in place of the files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<(String, String)>,
    /// MUTUAL: a client certificate is presented (from the files or the
    /// Secret).
    pub mutual: bool,
    /// The names the server certificate may carry (any one of them), in
    /// place of the server name sent; empty: the server name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TlsSpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    ca_certificates: Option<String>,
    #[serde(default)]
    client_certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    credential_name: Option<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    ca_crl: Option<String>,
    #[serde(default)]
    insecure_skip_verify: Option<bool>,
}

/// `spec` at `base` (e.g. `spec.trafficPolicy.tls`): None when the mesh's
/// own mTLS applies.
pub(crate) fn parse(
    object: &str,
    namespace: &str,
    base: &str,
    spec: TlsSpec,
) -> Result<Option<UpstreamTls>, ConfigError> {
    let f = |name: &str| format!("{base}.{name}");
    let mode = spec.mode.as_deref().unwrap_or("DISABLE");
    let mutual = match mode {
        "DISABLE" | "ISTIO_MUTUAL" => return Ok(None),
        "SIMPLE" => false,
        "MUTUAL" => true,
        other => return Err(err(object, f("mode"), format!("unknown mode {other:?}"))),
    };
    let credential = match spec.credential_name {
        Some(n) if n.is_empty() => return Err(err(object, f("credentialName"), "empty")),
        // One source for the key material, not a mix of two.
        Some(_)
            if spec.ca_certificates.is_some()
                || spec.client_certificate.is_some()
                || spec.private_key.is_some() =>
        {
            return Err(err(
                object,
                f("credentialName"),
                "give either credentialName or caCertificates/clientCertificate/privateKey",
            ))
        }
        Some(n) => Some((namespace.to_string(), n)),
        None => None,
    };
    for (i, san) in spec.subject_alt_names.iter().enumerate() {
        // A URI SAN (a SPIFFE identity) is not what a server outside the
        // mesh is checked by here: refused rather than skipped.
        if san.is_empty() || rustls_name_ok(san).is_err() {
            return Err(err(
                object,
                f(&format!("subjectAltNames[{i}]")),
                format!("{san:?}: only DNS names and IP addresses are verified"),
            ));
        }
    }
    if spec.ca_crl.is_some() {
        return Err(err(object, f("caCrl"), "not supported"));
    }
    let path = |v: Option<String>, name: &str| -> Result<Option<PathBuf>, ConfigError> {
        match v {
            Some(p) if p.is_empty() => Err(err(object, f(name), "empty path")),
            Some(p) => Ok(Some(PathBuf::from(p))),
            None => Ok(None),
        }
    };
    let cert = path(spec.client_certificate, "clientCertificate")?;
    let key = path(spec.private_key, "privateKey")?;
    let client_cert = match (mutual, cert, key) {
        (true, Some(c), Some(k)) => Some((c, k)),
        (true, None, None) if credential.is_some() => None,
        (true, None, _) => {
            return Err(err(
                object,
                f("clientCertificate"),
                "required by mode MUTUAL",
            ))
        }
        (true, _, None) => return Err(err(object, f("privateKey"), "required by mode MUTUAL")),
        (false, None, None) => None,
        (false, c, _) => {
            let name = if c.is_some() {
                "clientCertificate"
            } else {
                "privateKey"
            };
            return Err(err(object, f(name), "only used by mode MUTUAL"));
        }
    };
    if let Some(s) = &spec.sni {
        if s.is_empty() || rustls_name_ok(s).is_err() {
            return Err(err(object, f("sni"), format!("{s:?} is not a server name")));
        }
    }
    Ok(Some(UpstreamTls {
        sni: spec.sni,
        ca_certificates: path(spec.ca_certificates, "caCertificates")?,
        client_cert,
        insecure_skip_verify: spec.insecure_skip_verify == Some(true),
        credential,
        mutual,
        subject_alt_names: spec
            .subject_alt_names
            .iter()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
    }))
}

/// A DNS name or an IP address, as a TLS client can send it.
fn rustls_name_ok(s: &str) -> Result<(), ()> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(())
    }
}
