//! What a certificate chain says about itself (serial, validity), for the
//! admin dump: operators and `istioctl ztunnel-config certificates` read it.

use std::time::{Duration, SystemTime};

use time::format_description::well_known::Rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error("certificate PEM: {0}")]
    Pem(String),
    #[error("certificate DER: {0}")]
    Der(String),
}

/// One certificate of a chain, as its own PEM block.
#[derive(Clone, Debug)]
pub struct CertDetails {
    pub pem: String,
    /// Decimal, as Go's `big.Int` parses it (istioctl prints it in hex).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Every certificate in `pems` (each may hold several PEM blocks), in order.
pub fn describe_chain(pems: &[String]) -> Result<Vec<CertDetails>, DescribeError> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    for text in pems {
        // Split on the END marker so each entry keeps its own PEM text: a
        // reader gets the block exactly as the CA sent it.
        let mut rest = text.as_str();
        while let Some(end) = rest.find(END) {
            let block = rest[..end + END.len()].trim_start();
            rest = &rest[end + END.len()..];
            let der = rustls_pemfile::certs(&mut block.as_bytes())
                .next()
                .ok_or_else(|| DescribeError::Pem("no certificate in block".into()))?
                .map_err(|e| DescribeError::Pem(e.to_string()))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| DescribeError::Der(e.to_string()))?;
            let at = |t: x509_parser::time::ASN1Time| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
            };
            out.push(CertDetails {
                pem: format!("{block}\n"),
                serial: cert.tbs_certificate.serial.to_string(),
                not_before: at(cert.validity().not_before),
                not_after: at(cert.validity().not_after),
            });
        }
    }
    Ok(out)
}

/// `t` as RFC 3339 in UTC, whole seconds (`2026-12-01T11:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuiltinCa, CertificateAuthority, Identity};

    #[tokio::test]
    async fn a_signed_chain_describes_leaf_then_root() {
        let dir = std::env::temp_dir().join(format!("describe-{}", std::process::id()));
        let ca = BuiltinCa::load_or_create(&dir, "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "app", "client");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            id.to_string().as_str().try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let chain = ca.sign(&csr, &id, Duration::from_secs(3600)).await.unwrap();
        // The whole chain as one string splits the same as one per entry.
        let joined = describe_chain(&[chain.concat()]).unwrap();
        let each = describe_chain(&chain).unwrap();
        assert_eq!(joined.len(), 2);
        assert_eq!(each.len(), 2);
        let (leaf, root) = (&each[0], &each[1]);
        assert_eq!(leaf.pem, joined[0].pem);
        assert!(leaf.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            leaf.serial.chars().all(|c| c.is_ascii_digit()),
            "{}",
            leaf.serial
        );
        assert_ne!(leaf.serial, root.serial);
        let now = SystemTime::now();
        assert!(leaf.not_before <= now && now < leaf.not_after);
        let life = leaf.not_after.duration_since(now).unwrap();
        assert!(life <= Duration::from_secs(3600), "{life:?}");
        assert_eq!(root.pem.trim(), chain.last().unwrap().trim());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----".to_string();
        assert!(describe_chain(&[bad]).is_err());
    }
}
