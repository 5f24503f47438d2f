//! Kubernetes `Secret`s the standalone file declares, for DestinationRule
//! `credentialName`: the PEM a waypoint originates TLS with (`tls.crt`,
//! `tls.key`, `ca.crt`). The Kubernetes source does not read Secrets (a
//! proxy that could read every Secret of the cluster is worth more to an
//! attacker than to us); a rule naming one there finds none and fails
//! closed. Never serialized: a config dump carries no key material.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use crate::standalone::{err, typed, ConfigError};

/// The PEM blocks of one Secret, each as written.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert_chain: Option<Arc<[u8]>>,
    pub key: Option<Arc<[u8]>>,
    pub ca: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for TlsSecret {
    // Which parts it has, never their bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret")
            .field("tls.crt", &self.cert_chain.is_some())
            .field("tls.key", &self.key.is_some())
            .field("ca.crt", &self.ca.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Object {
    #[serde(default)]
    #[allow(dead_code)] // read by the caller; listed so it is known
    api_version: serde::de::IgnoredAny,
    #[serde(default)]
    #[allow(dead_code)]
    kind: serde::de::IgnoredAny,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: serde::de::IgnoredAny,
    #[serde(default)]
    #[allow(dead_code)]
    immutable: serde::de::IgnoredAny,
    #[serde(rename = "type", default)]
    secret_type: Option<String>,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

pub(crate) fn parse(object: &str, value: serde_yaml::Value) -> Result<TlsSecret, ConfigError> {
    // serde's message may quote the value it could not read: for a Secret
    // that is key material, so only the field is named.
    let o: Object = typed(object, value).map_err(|e| {
        err(
            object,
            e.field,
            "not a Secret's shape (type, data, stringData; values not shown)",
        )
    })?;
    match o.secret_type.as_deref() {
        None | Some("kubernetes.io/tls") | Some("Opaque") => {}
        Some(other) => {
            return Err(err(
                object,
                "type",
                format!("{other:?}: only kubernetes.io/tls and Opaque Secrets are read"),
            ))
        }
    }
    let mut parts: BTreeMap<&str, Arc<[u8]>> = BTreeMap::new();
    let known = |field: String, k: &str| -> Result<(), ConfigError> {
        if matches!(k, "tls.crt" | "tls.key" | "ca.crt") {
            Ok(())
        } else {
            Err(err(
                object,
                field,
                "unknown key: a TLS Secret holds tls.crt, tls.key and ca.crt",
            ))
        }
    };
    for (k, v) in &o.data {
        known(format!("data.{k}"), k)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.split_whitespace().collect::<String>())
            .map_err(|e| err(object, format!("data.{k}"), format!("not base64: {e}")))?;
        parts.insert(k, bytes.into());
    }
    for (k, v) in &o.string_data {
        known(format!("stringData.{k}"), k)?;
        parts.insert(k, v.as_bytes().into());
    }
    if parts.is_empty() {
        return Err(err(
            object,
            "data",
            "empty: a TLS Secret holds tls.crt, tls.key and/or ca.crt",
        ));
    }
    Ok(TlsSecret {
        cert_chain: parts.remove("tls.crt"),
        key: parts.remove("tls.key"),
        ca: parts.remove("ca.crt"),
    })
}
