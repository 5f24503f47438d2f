//! Envoy configured as an ambient waypoint, the way istiod builds one, so
//! the race against our waypoint carries the same hops:
//!
//!   client → ztunnel ⇒HBONE⇒ [connect_terminate → main_internal → connect_originate] ⇒HBONE⇒ ztunnel → backend
//!
//! - `connect_terminate` (0.0.0.0:15008): TLS 1.3 only, a client
//!   certificate required and checked against the mesh root, HTTP/2 with
//!   `allow_connect`; every CONNECT is handed, as a byte stream, to the
//!   internal listener `main_internal` (a cluster whose endpoint is an
//!   Envoy internal address, reached through `internal_upstream`).
//! - `main_internal`: the HTTP connection manager with the plain-Envoy
//!   row's route, retry policy (2 on 5xx) and stats. Its upstream cluster's
//!   endpoint is the internal listener `connect_originate`.
//! - `connect_originate`: tcp_proxy with `tunneling_config`, the backend pod
//!   as the CONNECT `hostname` (ip:port), to a cluster of the backend node's
//!   15008 over mTLS (HTTP/2, TLS 1.3), presenting the waypoint's SPIFFE
//!   certificate and checking the backend's.
//!
//! Where istiod recovers each tunnel's destination from metadata
//! (original-destination listener filter, endpoint metadata, an
//! ORIGINAL_DST cluster with the port overridden to 15008), this bench has
//! one backend and routes to it statically; the work per request and the
//! hops are the same.

use std::path::Path;

/// The Envoy waypoint's pod, service account and Gateway name.
pub const POD: &str = "envoy-wp";
pub const SA: &str = "envoy-waypoint";

/// Its Gateway, pod, Service, and the Service bound to it
/// (`web-envoy-wp`, 10.96.0.17), appended to the bench's config.
pub const YAML: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: envoy-wp, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: envoy-waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: envoy-waypoint, nodeName: node2}
status: {podIP: 10.244.2.40}
---
apiVersion: v1
kind: Service
metadata: {name: envoy-waypoint, namespace: app}
spec: {clusterIP: 10.96.0.31, selector: {gateway.networking.k8s.io/gateway-name: envoy-waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: envoy-waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-envoy-wp, namespace: app, labels: {istio.io/use-waypoint: envoy-waypoint}}
spec: {clusterIP: 10.96.0.17, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8080}]}
";

/// The VIP of the Service behind the Envoy waypoint.
pub const URL: &str = "http://10.96.0.17/";

/// Both HTTP listeners are an HTTP connection manager (`HCM`, up to its
/// settings) ending in the router (`ROUTER`).
const HCM: &str = "      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
";
const ROUTER: &str = "          http_filters: [{name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
";

/// The pod the tunnels end in, and the identity its ztunnel proves.
const BACKEND: &str = "10.244.2.11";
const BACKEND_ID: &str = "spiffe://cluster.local/ns/app/sa/backend";

/// An internal-listener endpoint, reached through `internal_upstream`.
fn internal_cluster(name: &str, listener: &str) -> String {
    format!(
        "  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{envoy_internal_address: {{server_listener_name: {listener}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}
"
    )
}

/// The bootstrap. `chain`/`key` are the waypoint's certificate (issued by
/// the mesh CA for `SA`), `root` the mesh root.
pub fn config(chain: &Path, key: &Path, root: &Path) -> String {
    let down = testbed::envoy_tls_context(chain, key, root, None, 10);
    let up = testbed::envoy_tls_context(chain, key, root, Some(BACKEND_ID), 8);
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}}}
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: {{"@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}}
static_resources:
  listeners:
  - name: connect_terminate
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {down}
      filters:
{HCM}          stat_prefix: connect_terminate
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
{ROUTER}          route_config:
            virtual_hosts:
            - name: connect
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: main_internal, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
  - name: main_internal
    internal_listener: {{}}
    filter_chains:
    - filters:
{HCM}          stat_prefix: main_internal
          codec_type: AUTO
{ROUTER}          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes: [{{match: {{prefix: /}}, route: {{cluster: backend, retry_policy: {{retry_on: 5xx, num_retries: 2}}}}}}]
  - name: connect_originate
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: connect_originate
          cluster: connect_originate
          tunneling_config: {{hostname: "{BACKEND}:8080"}}
  clusters:
{main_internal}{backend}  - name: connect_originate
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: connect_originate
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {BACKEND}, port_value: 15008}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {up}
"#,
        main_internal = internal_cluster("main_internal", "main_internal"),
        backend = internal_cluster("backend", "connect_originate"),
    )
}
