//! Delta ADS to istiod for the two ambient types. Every response is
//! ACKed, or NACKed naming each resource we could not take while the rest
//! still applies. While istiod is away the last good state keeps serving;
//! reconnects back off and resume with `initial_resource_versions`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh::MeshStore;
use prost_types::{value::Kind, Struct, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::channel::ControlPlane;
use crate::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, Node,
};
use crate::pb::google::rpc::Status;
use crate::wds::{Resources, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::XdsError;

const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];
/// gRPC INVALID_ARGUMENT, the code Envoy NACKs with.
const INVALID_ARGUMENT: i32 = 3;

/// Who this ztunnel is, as istiod expects to read it from the xDS node.
#[derive(Clone, Debug)]
pub struct ProxyInfo {
    pub ip: IpAddr,
    pub pod_name: String,
    pub pod_namespace: String,
    pub node_name: String,
    pub service_account: String,
    pub cluster_id: String,
    /// The node's network (empty: the default one).
    pub network: String,
    /// Proxy metadata (the `ISTIO_META_*` variables, prefix stripped).
    pub metadata: BTreeMap<String, String>,
}

impl ProxyInfo {
    fn node(&self) -> Node {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        // Our own keys are set last: metadata cannot override who we are.
        let mut fields: BTreeMap<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), s(v)))
            .collect();
        if !self.network.is_empty() {
            fields.insert("NETWORK".into(), s(&self.network));
        }
        fields.extend([
            ("NAMESPACE".to_string(), s(&self.pod_namespace)),
            ("NODE_NAME".to_string(), s(&self.node_name)),
            ("CLUSTER_ID".to_string(), s(&self.cluster_id)),
            ("SERVICE_ACCOUNT".to_string(), s(&self.service_account)),
            ("NAME".to_string(), s(&self.pod_name)),
        ]);
        Node {
            id: format!(
                "ztunnel~{}~{}.{}~{}.svc.cluster.local",
                self.ip, self.pod_name, self.pod_namespace, self.pod_namespace
            ),
            cluster: String::new(),
            metadata: Some(Struct { fields }),
            user_agent_name: "ztunnel".into(),
            user_agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Connection state for readiness and the admin dump.
#[derive(Clone, Debug, Default)]
pub struct AdsStatus {
    pub connected: bool,
    /// Both types received at least once: the mesh is complete enough to
    /// enforce (before this, publishing addresses without their policies
    /// would briefly allow what policy forbids).
    pub synced: bool,
}

pub struct Ads {
    pub cp: ControlPlane,
    pub proxy: ProxyInfo,
    pub store: Arc<MeshStore>,
    pub status: watch::Sender<AdsStatus>,
}

/// Registers the xDS series at zero, so they exist before the first
/// message or failure (a rate over a series that appears only at the first
/// failure misses that failure) and in standalone mode, where no stream
/// runs and zero is the truth.
pub fn register_metrics() {
    for reason in ["ConnectionError", "Error", "Reconnect"] {
        metrics::counter!("istio_xds_connection_terminations_total", "reason" => reason)
            .increment(0);
    }
    for url in TYPES {
        metrics::counter!("istio_xds_message_total", "url" => url).increment(0);
    }
}

/// Why a stream ended, with upstream ztunnel's `reason` values: istiod
/// never answered (`ConnectionError`), failed the stream (`Error`), or
/// closed it cleanly, as it does to rebalance (`Reconnect`).
fn termination(opened: bool, r: &Result<(), XdsError>) -> &'static str {
    match (opened, r) {
        (false, _) => "ConnectionError",
        (true, Err(_)) => "Error",
        (true, Ok(())) => "Reconnect",
    }
}

impl Ads {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut res = Resources::default();
        let mut seen: [bool; 2] = [false; 2];
        let mut backoff = Duration::from_millis(200);
        register_metrics();
        loop {
            let started = Instant::now();
            let mut opened = false;
            let r = tokio::select! {
                r = self.session(&mut res, &mut seen, &mut opened) => r,
                _ = stop.changed() => return,
            };
            self.status.send_modify(|s| s.connected = false);
            metrics::counter!("istio_xds_connection_terminations_total", "reason" => termination(opened, &r))
                .increment(1);
            let err = match r {
                Ok(()) => "stream closed by istiod".to_string(),
                Err(e) => e.to_string(),
            };
            // A session that lived a while was healthy: retry promptly.
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(200);
            }
            tracing::warn!(address = %self.cp.address, error = %err, retry_in_ms = backoff.as_millis() as u64, "xDS disconnected; serving last known state");
            self.store.reject(format!("xDS {}: {err}", self.cp.address));
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
            tokio::select! {
                _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    /// One stream; `opened` tells the caller whether it got as far as
    /// istiod answering, for the termination reason.
    async fn session(
        &self,
        res: &mut Resources,
        seen: &mut [bool; 2],
        opened: &mut bool,
    ) -> Result<(), XdsError> {
        let channel = self.cp.channel()?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
        for (i, t) in TYPES.iter().enumerate() {
            let req = DeltaDiscoveryRequest {
                // The node goes with the first request of the stream only.
                node: (i == 0).then(|| self.proxy.node()),
                type_url: t.to_string(),
                initial_resource_versions: res.versions(t),
                ..Default::default()
            };
            tx.send(req).await.expect("receiver held below");
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        self.cp.authorize(&mut req)?;
        let mut stream = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .delta_aggregated_resources(req)
            .await
            .map_err(XdsError::Rpc)?
            .into_inner();
        *opened = true;
        tracing::info!(address = %self.cp.address, "xDS stream open");
        self.status.send_modify(|s| s.connected = true);
        while let Some(resp) = stream.message().await.map_err(XdsError::Rpc)? {
            let ack = self.apply(res, seen, resp);
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Applies one response and returns its ACK or NACK.
    fn apply(
        &self,
        res: &mut Resources,
        seen: &mut [bool; 2],
        mut resp: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let mut errors = Vec::new();
        let Some(idx) = TYPES.iter().position(|t| *t == resp.type_url) else {
            metrics::counter!("istio_xds_message_total", "url" => "unsupported").increment(1);
            errors.push(format!("unsupported resource type {}", resp.type_url));
            return nack(resp, errors);
        };
        metrics::counter!("istio_xds_message_total", "url" => TYPES[idx]).increment(1);
        // Each body is freed once applied: the translations that follow
        // reuse its memory instead of growing the heap past a whole push.
        let resources = std::mem::take(&mut resp.resources);
        let updated = resources.len();
        for r in resources {
            let Some(any) = &r.resource else {
                errors.push(format!("{}: resource has no body", r.name));
                continue;
            };
            if any.type_url != resp.type_url {
                errors.push(format!(
                    "{}: body is {} in a {} response",
                    r.name, any.type_url, resp.type_url
                ));
                continue;
            }
            if let Err(e) = res.upsert(&resp.type_url, &r.name, &r.version, &any.value) {
                errors.push(e.to_string());
            }
        }
        for name in &resp.removed_resources {
            res.remove(&resp.type_url, name);
        }
        seen[idx] = true;
        if seen.iter().all(|s| *s) {
            // Building the state is the heavy part of a push: never on an
            // async worker that other connections are waiting for.
            let state = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| res.build())
                }
                _ => res.build(),
            };
            self.store.replace(state);
            if !self.status.borrow().synced {
                let (workloads, services, policies) = res.counts();
                tracing::info!(workloads, services, policies, "xDS initial sync complete");
            }
            self.status.send_modify(|s| s.synced = true);
        }
        tracing::debug!(type_url = %resp.type_url, updated, removed = resp.removed_resources.len(), rejected = errors.len(), "xDS response");
        if errors.is_empty() {
            DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                ..Default::default()
            }
        } else {
            nack(resp, errors)
        }
    }
}

fn nack(resp: DeltaDiscoveryResponse, errors: Vec<String>) -> DeltaDiscoveryRequest {
    let message = errors.join("; ");
    tracing::error!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "xDS NACK: rejected resources (the rest applied)");
    ::metrics::counter!("ztunnel_xds_rejected_resources_total").increment(errors.len() as u64);
    DeltaDiscoveryRequest {
        type_url: resp.type_url,
        response_nonce: resp.nonce,
        error_detail: Some(Status {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::envoy::service::discovery::v3::Resource;
    use crate::pb::istio::workload as wl;
    use prost::Message;

    fn ads() -> Ads {
        Ads {
            cp: ControlPlane {
                address: "127.0.0.1:1".into(),
                server_name: "istiod.istio-system.svc".into(),
                root_cert: "/nonexistent".into(),
                token: None,
                cluster_id: "Kubernetes".into(),
            },
            proxy: ProxyInfo {
                ip: "10.0.0.1".parse().unwrap(),
                pod_name: "ztunnel-x".into(),
                pod_namespace: "istio-system".into(),
                node_name: "n1".into(),
                service_account: "ztunnel".into(),
                cluster_id: "Kubernetes".into(),
                network: String::new(),
                metadata: Default::default(),
            },
            store: MeshStore::new(mesh::MeshState::default(), "test"),
            status: watch::channel(AdsStatus::default()).0,
        }
    }

    #[test]
    fn node_carries_network_and_metadata_but_not_over_our_identity() {
        let mut a = ads();
        a.proxy.network = "net-a".into();
        a.proxy.metadata = [("DNS_CAPTURE", "true"), ("NAME", "spoofed")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let fields = a.proxy.node().metadata.unwrap().fields;
        let get = |k: &str| match &fields[k].kind {
            Some(Kind::StringValue(v)) => v.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("NETWORK"), "net-a");
        assert_eq!(get("DNS_CAPTURE"), "true");
        assert_eq!(get("NAME"), "ztunnel-x");
        assert!(!ads()
            .proxy
            .node()
            .metadata
            .unwrap()
            .fields
            .contains_key("NETWORK"));
    }

    fn resource(name: &str, type_url: &str, body: Vec<u8>) -> Resource {
        Resource {
            version: "1".into(),
            name: name.into(),
            aliases: vec![],
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value: body,
            }),
        }
    }

    fn workload(name: &str, ip: [u8; 4]) -> Vec<u8> {
        wl::Address {
            r#type: Some(wl::address::Type::Workload(wl::Workload {
                uid: format!("c//Pod/ns/{name}"),
                name: name.into(),
                namespace: "ns".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn bad_resources_are_nacked_by_name_and_the_rest_applies_after_full_sync() {
        let a = ads();
        let mut res = Resources::default();
        let mut seen = [false; 2];
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n1".into(),
            resources: vec![
                resource("good", ADDRESS_TYPE, workload("good", [10, 0, 0, 2])),
                resource("garbage", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]),
                resource("mistyped", AUTHORIZATION_TYPE, vec![]),
            ],
            ..Default::default()
        };
        let reply = a.apply(&mut res, &mut seen, resp);
        assert_eq!(reply.response_nonce, "n1");
        let why = reply.error_detail.expect("NACK").message;
        assert!(
            why.contains("garbage: not a valid type.googleapis.com/istio.workload.Address"),
            "{why}"
        );
        assert!(
            why.contains("mistyped: body is type.googleapis.com/istio.security.Authorization"),
            "{why}"
        );
        assert!(!why.contains("good"), "{why}");
        // Addresses without policies are not published: that would allow
        // what policy forbids until the policies arrive.
        assert!(a.store.load().workloads.is_empty());
        assert!(!a.status.borrow().synced);

        let ack = a.apply(
            &mut res,
            &mut seen,
            DeltaDiscoveryResponse {
                type_url: AUTHORIZATION_TYPE.into(),
                nonce: "n2".into(),
                ..Default::default()
            },
        );
        assert!(ack.error_detail.is_none());
        assert_eq!(ack.response_nonce, "n2");
        assert!(a.status.borrow().synced);
        assert!(a
            .store
            .load()
            .workload_by_ip("10.0.0.2".parse().unwrap())
            .is_some());

        // Removal applies; an unknown type is NACKed whole.
        let ack = a.apply(
            &mut res,
            &mut seen,
            DeltaDiscoveryResponse {
                type_url: ADDRESS_TYPE.into(),
                nonce: "n3".into(),
                removed_resources: vec!["good".into()],
                ..Default::default()
            },
        );
        assert!(ack.error_detail.is_none());
        assert!(a.store.load().workloads.is_empty());
        let nack = a.apply(
            &mut res,
            &mut seen,
            DeltaDiscoveryResponse {
                type_url: "type.googleapis.com/other".into(),
                nonce: "n4".into(),
                ..Default::default()
            },
        );
        assert!(nack
            .error_detail
            .unwrap()
            .message
            .contains("unsupported resource type"));
    }

    #[test]
    fn node_identifies_a_ztunnel_to_istiod() {
        let n = ads().proxy.node();
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local"
        );
        let md = n.metadata.unwrap().fields;
        assert_eq!(
            md["NAMESPACE"].kind,
            Some(Kind::StringValue("istio-system".into()))
        );
        assert_eq!(
            md["SERVICE_ACCOUNT"].kind,
            Some(Kind::StringValue("ztunnel".into()))
        );
    }
}
