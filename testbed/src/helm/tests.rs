//! Renders of Istio's real charts, read back.

use super::*;

fn render(chart: &str, sets: &[(&str, &str)]) -> Option<Render> {
    let dir = istio_chart(chart)?;
    helm_bin()?;
    Some(template(&dir, chart, "istio-system", sets).expect("helm template"))
}

#[test]
fn ztunnel_chart_container() {
    let Some(r) = render(
        "ztunnel",
        &[
            ("image", "example.test/ztunnel:dev"),
            ("logAsJson", "true"),
            (
                "meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE",
                "true",
            ),
        ],
    ) else {
        return;
    };
    let facts = PodFacts::example();
    let c = r
        .daemonset_container("ztunnel", "istio-proxy", &facts)
        .unwrap();
    assert_eq!(c.image, "example.test/ztunnel:dev");
    assert_eq!(c.args, ["proxy", "ztunnel"]);
    assert_eq!(c.env("LOG_FORMAT"), Some("json"));
    assert_eq!(c.env("ISTIO_META_DNS_CAPTURE"), Some("true"));
    assert_eq!(c.env("POD_NAME"), Some("pod-0"));
    assert_eq!(c.env("POD_NAMESPACE"), Some("istio-system"));
    assert_eq!(c.env("NODE_NAME"), Some("node-0"));
    assert_eq!(c.env("INSTANCE_IP"), Some("10.0.0.10"));
    assert_eq!(c.env("SERVICE_ACCOUNT"), Some("default"));
    assert_eq!(c.env("ZTUNNEL_CPU_LIMIT"), Some("2"));
    assert_eq!(c.env("CA_ADDRESS"), Some("istiod.istio-system.svc:15012"));
    let token = c.mount("/var/run/secrets/tokens").expect("token mount");
    assert_eq!(
        token.source,
        VolumeSource::Projected(vec![Projection::ServiceAccountToken {
            path: "istio-token".into(),
            audience: Some("istio-ca".into()),
            expiration_seconds: Some(43200),
        }])
    );
    let root = c.mount("/var/run/secrets/istio").expect("root cert mount");
    assert_eq!(
        root.source,
        VolumeSource::ConfigMap {
            name: "istio-ca-root-cert".into()
        }
    );
    let sock = c.mount("/var/run/ztunnel").expect("zds socket dir");
    assert_eq!(
        sock.source,
        VolumeSource::HostPath {
            path: "/var/run/ztunnel".into()
        }
    );
    assert_eq!(c.mount("/tmp").unwrap().source, VolumeSource::EmptyDir);
    assert_eq!(
        c.readiness,
        Some(HttpProbe {
            port: 15021,
            path: "/healthz/ready".into()
        })
    );
    assert!(c.ports.iter().any(|p| p.container_port == 15020));
    // A stated value is required: facts without it fail naming the var.
    let mut bare = facts.clone();
    bare.resources.clear();
    let err = r
        .daemonset_container("ztunnel", "istio-proxy", &bare)
        .unwrap_err();
    assert!(err.to_string().contains("ZTUNNEL_CPU_LIMIT"), "{err}");
}

#[test]
fn cni_chart_container() {
    let Some(r) = render(
        "istio-cni",
        &[("image", "example.test/cni:dev"), ("profile", "ambient")],
    ) else {
        return;
    };
    let c = r
        .daemonset_container("istio-cni-node", "install-cni", &PodFacts::example())
        .unwrap();
    assert_eq!(c.image, "example.test/cni:dev");
    assert_eq!(c.command, ["install-cni"]);
    // From the istio-cni-config ConfigMap (envFrom) and from env.
    assert_eq!(c.env("AMBIENT_ENABLED"), Some("true"));
    assert!(c.env("EXCLUDE_NAMESPACES").is_some());
    assert_eq!(c.env("NODE_NAME"), Some("node-0"));
    assert_eq!(c.env("POD_NAMESPACE"), Some("istio-system"));
    let envfrom_end = c
        .env
        .iter()
        .position(|(k, _)| k == "REPAIR_NODE_NAME")
        .unwrap();
    assert!(
        c.env[..envfrom_end]
            .iter()
            .any(|(k, _)| k == "AMBIENT_ENABLED"),
        "envFrom comes before env"
    );
    assert_eq!(
        c.mount("/host/proc").map(|m| (&m.source, m.read_only)),
        Some((
            &VolumeSource::HostPath {
                path: "/proc".into()
            },
            true
        ))
    );
    let netns = c.mount("/host/var/run/netns").expect("ambient netns mount");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    for (at, host) in [
        ("/host/opt/cni/bin", "/opt/cni/bin"),
        ("/host/etc/cni/net.d", "/etc/cni/net.d"),
        ("/var/run/istio-cni", "/var/run/istio-cni"),
    ] {
        assert_eq!(
            c.mount(at).map(|m| &m.source),
            Some(&VolumeSource::HostPath { path: host.into() }),
            "{at}"
        );
    }
    assert_eq!(
        c.readiness,
        Some(HttpProbe {
            port: 8000,
            path: "/readyz".into()
        })
    );
    assert!(c.ports.iter().any(|p| p.container_port == 15014));
}

#[test]
fn envfrom_of_a_missing_configmap_is_an_error() {
    let yaml = "
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: d}
spec:
  selector: {matchLabels: {a: b}}
  template:
    spec:
      containers:
      - name: c
        envFrom: [{configMapRef: {name: nowhere}}]
";
    let r = parse(yaml).unwrap();
    let err = r
        .daemonset_container("d", "c", &PodFacts::example())
        .unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}
