//! The Istio CA client: ztunnel asks istiod to sign a CSR for each
//! local workload identity, impersonating it with its own node-bound token.

use std::collections::BTreeMap;
use std::time::Duration;

use identity::{CaError, CertificateAuthority, Identity, SignFuture};
use prost_types::{value::Kind, Struct, Value};
use tonic::transport::Channel;

use crate::channel::ControlPlane;
use crate::pb::istio::v1::auth::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
};

pub struct IstioCa {
    cp: ControlPlane,
    channel: Channel,
    impersonate: bool,
}

impl IstioCa {
    /// `impersonate`: ask for the identity named in each request (ztunnel,
    /// on behalf of its node's pods) rather than the caller's own (waypoint).
    pub fn new(cp: ControlPlane, impersonate: bool) -> Result<Self, crate::XdsError> {
        let channel = cp.channel()?;
        Ok(IstioCa {
            cp,
            channel,
            impersonate,
        })
    }
}

impl CertificateAuthority for IstioCa {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a Identity,
        validity: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let mut metadata = Struct {
                fields: BTreeMap::new(),
            };
            if self.impersonate {
                metadata.fields.insert(
                    "ImpersonatedIdentity".to_string(),
                    Value {
                        kind: Some(Kind::StringValue(identity.to_string())),
                    },
                );
            }
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem.to_string(),
                validity_duration: validity.as_secs() as i64,
                metadata: Some(metadata),
            });
            req.set_timeout(Duration::from_secs(10));
            self.cp
                .authorize(&mut req)
                .map_err(|e| CaError::Unavailable(e.to_string()))?;
            let resp = IstioCertificateServiceClient::new(self.channel.clone())
                .create_certificate(req)
                .await
                .map_err(|s| {
                    CaError::Unavailable(format!(
                        "istiod CA {}: {:?}: {}",
                        self.cp.address,
                        s.code(),
                        s.message()
                    ))
                })?;
            // The identity check of the leaf happens in the secret manager,
            // for every CA alike.
            Ok(resp.into_inner().cert_chain)
        })
    }
}
