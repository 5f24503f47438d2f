//! RequestAuthentication at the waypoint, end to end: client → ztunnel →
//! waypoint → ztunnel → server, with a real OIDC provider
//! (oauth2-proxy/mockoidc, `testbed/peers/oidc`) serving its JWKS over
//! HTTPS under a CA of the test's own that the waypoint is told to trust.
//! The provider mints every token (valid, expired, foreign issuer, wrong
//! audience, custom claims) with its own key; a tampered one is a valid
//! one with its signature changed.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use base64::Engine;
use testbed::*;

mod oidc;
use oidc::{idp, mint, start_idp, IDP};

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: app, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node1}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 10.96.0.20, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules:
  - issuer: https://idp.test
    audiences: [echo]
    jwksUri: https://10.244.2.40:8443/oidc/.well-known/jwks.json
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}, {header: x-jwt-team, claim: org.team}]
";

const POLICY: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-rules, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - to: [{operation: {paths: [\"/any*\"]}}]
    from: [{source: {requestPrincipals: [\"*\"]}}]
  - to: [{operation: {paths: [\"/admin*\"]}}]
    when: [{key: \"request.auth.claims[groups]\", values: [admins]}]
  - to: [{operation: {paths: [\"/team*\"]}}]
    when: [{key: \"request.auth.claims[org][team]\", values: [core]}]
";

/// A server in `pod` that answers every request with its path and the
/// headers it received, one `name: value` a line.
fn header_echo(m: &Mesh, pod: &str, port: u16) {
    let l = in_ns(&m.pod_ns(pod), move || {
        TcpListener::bind(("0.0.0.0", port)).unwrap()
    });
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut body = format!("{}\n", line.split_whitespace().nth(1).unwrap_or(""));
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        body.push_str(&h.trim_end().to_ascii_lowercase());
                        body.push('\n');
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// (status, body) of a GET from the client, with `token` as a bearer.
fn get(m: &Mesh, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("-H 'Authorization: Bearer {t}'"))
        .unwrap_or_default();
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 {auth} -w '\n%{{http_code}}' 'http://10.96.0.20{path}'",
        m.pod_ns("client")
    ));
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn access_log(m: &Mesh) -> Vec<serde_json::Value> {
    std::fs::read_to_string(m.dir.join("waypoint-access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_at_the_waypoint() {
    let mut m = Mesh::new("jwt", &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.pod("idp", "auth", "idp", IDP, "node2", false);
    m.write_config(MESH);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    header_echo(&m, "echo", 8080);
    let (_idp, idp_ca) = start_idp(&m);
    oidc::wait_ready(&m).await;
    // The JWKS endpoint is down when the waypoint first needs it.
    idp(&m, "/down", "");
    let ca_arg = idp_ca.display().to_string();
    m.start_waypoint_with(
        WP,
        "waypoint",
        "waypoint",
        "app",
        "waypoint",
        &[
            "--jwks-ca-file",
            &ca_arg,
            "--jwks-min-refetch-interval",
            "1s",
        ],
    );
    eventually(
        "service through the waypoint",
        Duration::from_secs(20),
        || get(&m, "/up", None).0 == 200,
    )
    .await;

    let claims = |sub: &str, extra: serde_json::Value| {
        let mut c = serde_json::json!({"sub": sub, "aud": ["echo"]});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let alice = mint(
        &m,
        claims(
            "alice",
            serde_json::json!({"groups": ["admins", "dev"], "org": {"team": "core"}}),
        ),
    );
    let bob = mint(
        &m,
        claims(
            "bob",
            serde_json::json!({"groups": ["dev"], "org": {"team": "edge"}}),
        ),
    );

    // Fail closed: no keys, the token is rejected, never passed.
    assert_eq!(get(&m, "/down", Some(&alice)).0, 401);
    idp(&m, "/up", "");
    eventually(
        "the JWKS is fetched once the provider is back",
        Duration::from_secs(20),
        || get(&m, "/back", Some(&alice)).0 == 200,
    )
    .await;

    // A verified token: its claims and payload reach the server, the
    // token itself does not (forwardOriginalToken is false).
    let (code, seen) = get(&m, "/hello", Some(&alice));
    assert_eq!(code, 200, "{seen}");
    assert!(seen.lines().any(|l| l == "x-jwt-sub: alice"), "{seen}");
    assert!(seen.lines().any(|l| l == "x-jwt-team: core"), "{seen}");
    assert!(
        !seen.contains("authorization:"),
        "the token was forwarded: {seen}"
    );
    let payload = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-jwt-payload: "))
        .unwrap_or_else(|| panic!("no payload header: {seen}"));
    // Lower-cased by the echo server: compare the decoded claim names only.
    let raw = alice.split('.').nth(1).unwrap();
    assert_eq!(payload, raw.to_ascii_lowercase());
    let decoded: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded["sub"], "alice");
    // The default query parameter works too, and is taken off the path.
    let (code, seen) = get(&m, &format!("/q?x=1&access_token={alice}"), None);
    assert_eq!(code, 200, "{seen}");
    assert_eq!(seen.lines().next(), Some("/q?x=1"), "{seen}");
    // A client cannot forge the output headers.
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -H 'x-jwt-sub: admin' http://10.96.0.20/forged",
        m.pod_ns("client")
    ));
    assert!(!out.contains("x-jwt-sub"), "{out}");

    // Tokens that do not verify: 401, whatever the reason.
    // One signature character changed (mid-signature: every bit counts).
    let at = alice.rfind('.').unwrap() + 20;
    let mut tampered = alice.clone().into_bytes();
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let bad = [
        (
            "expired",
            mint(
                &m,
                claims(
                    "carol",
                    serde_json::json!({"exp": now() - 3600, "iat": now() - 7200}),
                ),
            ),
            "Jwt_is_expired",
        ),
        (
            "foreign issuer",
            mint(
                &m,
                claims("carol", serde_json::json!({"iss": "https://evil.test"})),
            ),
            "Jwt_issuer_is_not_configured",
        ),
        (
            "wrong audience",
            mint(&m, serde_json::json!({"sub": "carol", "aud": ["other"]})),
            "Audiences_in_Jwt_are_not_allowed",
        ),
        ("tampered", tampered, "Jwt_verification_fails"),
        (
            "not a token",
            "garbage".to_string(),
            "Jwt_is_not_in_the_form_of_Header.Payload.Signature",
        ),
    ];
    for (what, token, _) in &bad {
        let (code, body) = get(&m, &format!("/bad/{}", what.replace(' ', "-")), Some(token));
        assert_eq!(code, 401, "{what}: {body}");
    }
    let (_, head) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -o /dev/null -D - -H 'Authorization: Bearer {}' http://10.96.0.20/head",
        m.pod_ns("client"),
        bad[0].1
    ));
    assert!(
        head.to_ascii_lowercase().contains(
            "www-authenticate: bearer realm=\"http://10.96.0.20/head\", error=\"invalid_token\""
        ),
        "{head}"
    );
    // Without a token and without a policy asking for one: allowed.
    assert_eq!(get(&m, "/anonymous", None).0, 200);
    // The operator reads each rejection apart from RBAC denials.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = access_log(&m);
    for (what, _, reason) in &bad {
        let path = format!("/bad/{}", what.replace(' ', "-"));
        let want = format!("jwt_authn_access_denied{{{reason}}}");
        assert!(
            log.iter().any(|l| l["path"] == path.as_str()
                && l["response_code"] == 401
                && l["response_code_details"] == want.as_str()),
            "{what}: no access-log line with {want}: {log:#?}"
        );
    }
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_waypoint_jwt_denied_total")
                && l.contains("reason=\"Jwt_is_expired\"")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total") && l.contains("response_code=\"401\"")),
        "{metrics}"
    );

    // AuthorizationPolicy reads the verified token.
    m.write_config(&format!("{MESH}{POLICY}"));
    eventually("the policy applies", Duration::from_secs(10), || {
        get(&m, "/any", None).0 == 403
    })
    .await;
    let body = get(&m, "/any", None).1;
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(get(&m, "/any", Some(&bob)).0, 200);
    assert_eq!(get(&m, "/admin", Some(&alice)).0, 200);
    assert_eq!(get(&m, "/admin", Some(&bob)).0, 403);
    assert_eq!(get(&m, "/team", Some(&alice)).0, 200);
    assert_eq!(get(&m, "/team", Some(&bob)).0, 403);
    // An invalid token is still a 401, not a 403: authentication first.
    assert_eq!(get(&m, "/any", Some(&bad[0].1)).0, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        access_log(&m).iter().any(|l| l["response_code"] == 403
            && l["response_code_details"] == "rbac_access_denied_matched_policy[none]"),
        "no RBAC denial in the access log"
    );

    // The provider rotates its key: a token signed with the new one is
    // accepted once the waypoint fetched the new set (its kid is unknown,
    // which triggers the fetch); the old key is gone from it.
    idp(&m, "/rotate", "");
    let rotated = mint(&m, claims("dave", serde_json::json!({})));
    eventually(
        "the rotated key is fetched",
        Duration::from_secs(20),
        || get(&m, "/any/rotated", Some(&rotated)).0 == 200,
    )
    .await;
    assert_eq!(get(&m, "/any/old", Some(&bob)).0, 401);
}
