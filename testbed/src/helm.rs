//! Istio's own Helm charts, rendered by the real `helm` (built by
//! `scripts/peers.sh` from the pinned istio module, beside istioctl) and read
//! back as the kubelet would run them: the tests take a DaemonSet's container
//! from the render and start our binary with exactly its command, args,
//! environment and mounts.
//!
//! ```no_run
//! use testbed::helm::{self, PodFacts};
//! let Some(chart) = helm::istio_chart("ztunnel") else { return }; // skipped
//! let render = helm::template(&chart, "ztunnel", "istio-system", &[("image", "ours/ztunnel:dev")]).unwrap();
//! let c = render.daemonset_container("ztunnel", "istio-proxy", &PodFacts::example()).unwrap();
//! assert_eq!(c.args, ["proxy", "ztunnel"]);
//! ```
//!
//! What the kubelet fills in at run time is resolved here from [`PodFacts`]:
//! `valueFrom.fieldRef` (pod name, namespace, node, pod IP, host IP, service
//! account) and `valueFrom.resourceFieldRef` (a value the test states, since
//! there is no node to measure). `envFrom` ConfigMaps are taken from the same
//! render; like the kubelet, `env` entries override `envFrom` keys of the same
//! name. Anything the helper cannot resolve is an error naming it, so a chart
//! change shows up as a failing test rather than a silently dropped variable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container as K8sContainer, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Why a chart could not be rendered or read.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    #[error("running {helm}: {source}")]
    Spawn {
        helm: PathBuf,
        source: std::io::Error,
    },
    #[error("helm template {chart} failed: {stderr}")]
    Template { chart: PathBuf, stderr: String },
    #[error("rendered document {index} is not valid YAML for its kind: {source}")]
    Parse {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("no DaemonSet {0} in the render")]
    NoDaemonSet(String),
    #[error("DaemonSet {daemonset} has no container {container}")]
    NoContainer {
        daemonset: String,
        container: String,
    },
    #[error("env {var}: {why}")]
    Env { var: String, why: String },
    #[error("envFrom ConfigMap {0} is not in the render")]
    NoConfigMap(String),
    #[error("volume mount {mount}: no volume of that name")]
    NoVolume { mount: String },
    #[error("readiness probe: {0}")]
    Probe(String),
}

/// What the kubelet knows about the pod and hands to `fieldRef` and
/// `resourceFieldRef` env entries.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: String,
    pub host_ip: String,
    pub service_account: String,
    /// `resourceFieldRef.resource` (e.g. `limits.cpu`) to the value the
    /// variable gets, already divided by the chart's divisor.
    pub resources: BTreeMap<String, String>,
}

impl PodFacts {
    /// Plausible facts for tests that only look at the shape of a render.
    pub fn example() -> PodFacts {
        PodFacts {
            name: "pod-0".into(),
            namespace: "istio-system".into(),
            node: "node-0".into(),
            ip: "10.0.0.10".into(),
            host_ip: "10.0.0.1".into(),
            service_account: "default".into(),
            resources: [
                ("limits.cpu", "2"),
                ("requests.cpu", "1"),
                ("limits.memory", "1073741824"),
                ("requests.memory", "536870912"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }
}

/// Where a mounted volume's contents come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    HostPath {
        path: String,
    },
    ConfigMap {
        name: String,
    },
    Secret {
        name: String,
    },
    EmptyDir,
    /// A projected volume: each source, in order.
    Projected(Vec<Projection>),
    /// A kind of volume this helper does not model (its field name).
    Other(String),
}

/// One source of a projected volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projection {
    /// A bound service-account token written to `path` inside the volume.
    ServiceAccountToken {
        path: String,
        audience: Option<String>,
        expiration_seconds: Option<i64>,
    },
    ConfigMap {
        name: String,
    },
    Secret {
        name: String,
    },
    Other,
}

/// A volume mount joined with the volume it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub name: String,
    pub mount_path: String,
    pub sub_path: Option<String>,
    pub read_only: bool,
    pub mount_propagation: Option<String>,
    pub source: VolumeSource,
}

/// An HTTP readiness probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    pub port: u16,
    pub path: String,
}

/// A declared container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: Option<String>,
    pub container_port: u16,
    pub protocol: String,
}

/// One container of a rendered DaemonSet, resolved as the kubelet would.
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// In the order the process sees them set (envFrom first, then env).
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub readiness: Option<HttpProbe>,
    pub ports: Vec<Port>,
}

impl Container {
    /// The value of env var `name`, if the chart sets it.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The mount at `mount_path`, if any.
    pub fn mount(&self, mount_path: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.mount_path == mount_path)
    }
}

/// The objects of one `helm template` run that the tests read.
#[derive(Debug, Default)]
pub struct Render {
    pub daemonsets: Vec<DaemonSet>,
    pub config_maps: Vec<ConfigMap>,
    /// Every document's `kind`, in order (for asserting what else it made).
    pub kinds: Vec<String>,
}

/// The `helm` binary from the peers cache. `None` (the caller skips) only
/// when it is missing and `MESH_PEERS_OPTIONAL=1`; otherwise missing is a
/// panic telling how to build it.
pub fn helm_bin() -> Option<PathBuf> {
    let bin = crate::cluster::peers_dir().join("bin/helm");
    if bin.exists() {
        return Some(bin);
    }
    skip_or_panic(&format!(
        "{} missing: build it with scripts/peers.sh",
        bin.display()
    ))
}

/// `manifests/charts/<name>` of the pinned istio module (`testbed/peers/istio`),
/// found with `go list` as scripts/peers.sh finds it; `MESH_ISTIO_DIR`
/// overrides the module directory. `None` as for [`helm_bin`].
pub fn istio_chart(name: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("MESH_ISTIO_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/istio");
            let path = format!(
                "{}:/usr/local/go/bin",
                std::env::var("PATH").unwrap_or_default()
            );
            let out = Command::new("go")
                .args(["list", "-m", "-f", "{{.Dir}}", "istio.io/istio"])
                .current_dir(&peers)
                .env("PATH", path)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                }
                Ok(o) => {
                    return skip_or_panic(&format!(
                        "go list istio.io/istio in {}: {}",
                        peers.display(),
                        String::from_utf8_lossy(&o.stderr)
                    ))
                }
                Err(e) => return skip_or_panic(&format!("running go: {e}")),
            }
        }
    };
    let chart = dir.join("manifests/charts").join(name);
    if chart.join("Chart.yaml").exists() {
        return Some(chart);
    }
    skip_or_panic(&format!(
        "{} missing: fetch the istio module with scripts/peers.sh",
        chart.display()
    ))
}

fn skip_or_panic<T>(why: &str) -> Option<T> {
    let optional = std::env::var("MESH_PEERS_OPTIONAL").is_ok_and(|v| v == "1");
    assert!(optional, "{why} (or set MESH_PEERS_OPTIONAL=1 to skip)");
    eprintln!("SKIP: {why}, and MESH_PEERS_OPTIONAL=1");
    None
}

/// Runs `helm template <release> <chart> -n <namespace> --set k=v...` and
/// parses the render. Values go through `--set`, as users type them (so
/// `true` is a boolean to the chart). Call [`helm_bin`] first to skip when
/// helm is missing; here a missing helm panics.
pub fn template(
    chart: &Path,
    release: &str,
    namespace: &str,
    sets: &[(&str, &str)],
) -> Result<Render, HelmError> {
    parse(&template_yaml(chart, release, namespace, sets)?)
}

/// [`template`]'s render as helm prints it: what `kubectl apply -f` takes.
pub fn template_yaml(
    chart: &Path,
    release: &str,
    namespace: &str,
    sets: &[(&str, &str)],
) -> Result<String, HelmError> {
    let Some(helm) = helm_bin() else {
        panic!("helm missing: check helm_bin() before rendering");
    };
    let mut cmd = Command::new(&helm);
    cmd.arg("template")
        .arg(release)
        .arg(chart)
        .args(["--namespace", namespace]);
    for (k, v) in sets {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    // helm keeps caches and plugins under HOME; keep it off the real one.
    let home = std::env::temp_dir().join("mesh-helm-home");
    let out = cmd
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .map_err(|source| HelmError::Spawn {
            helm: helm.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HelmError::Template {
            chart: chart.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses multi-document YAML as `helm template` prints it.
pub fn parse(yaml: &str) -> Result<Render, HelmError> {
    let mut render = Render::default();
    for (index, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc)
            .map_err(|source| HelmError::Parse { index, source })?;
        // Documents that are only comments (helm's zzz_profile) are null.
        let Some(kind) = value.get("kind").and_then(|k| k.as_str()) else {
            continue;
        };
        render.kinds.push(kind.to_string());
        let err = |source| HelmError::Parse { index, source };
        match kind {
            "DaemonSet" => render
                .daemonsets
                .push(serde_yaml::from_value(value).map_err(err)?),
            "ConfigMap" => render
                .config_maps
                .push(serde_yaml::from_value(value).map_err(err)?),
            _ => {}
        }
    }
    Ok(render)
}

impl Render {
    /// The ConfigMap `name` of this render.
    pub fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
    }

    /// Container `container` of DaemonSet `daemonset`, resolved with `facts`.
    pub fn daemonset_container(
        &self,
        daemonset: &str,
        container: &str,
        facts: &PodFacts,
    ) -> Result<Container, HelmError> {
        let ds = self
            .daemonsets
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(daemonset))
            .ok_or_else(|| HelmError::NoDaemonSet(daemonset.into()))?;
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .ok_or_else(|| HelmError::NoDaemonSet(daemonset.into()))?;
        let c = pod
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| HelmError::NoContainer {
                daemonset: daemonset.into(),
                container: container.into(),
            })?;
        let ports = ports(c);
        Ok(Container {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            env: self.env(c, facts)?,
            mounts: mounts(c, pod.volumes.as_deref().unwrap_or_default())?,
            readiness: readiness(c, &ports)?,
            ports,
        })
    }

    fn env(&self, c: &K8sContainer, facts: &PodFacts) -> Result<Vec<(String, String)>, HelmError> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: String, v: String| {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                let cm = self
                    .config_map(&r.name)
                    .ok_or_else(|| HelmError::NoConfigMap(r.name.clone()))?;
                let prefix = from.prefix.clone().unwrap_or_default();
                for (k, v) in cm.data.iter().flatten() {
                    set(format!("{prefix}{k}"), v.clone());
                }
            } else {
                return Err(HelmError::Env {
                    var: "envFrom".into(),
                    why: "only configMapRef sources are modelled".into(),
                });
            }
        }
        for e in c.env.iter().flatten() {
            let err = |why: String| HelmError::Env {
                var: e.name.clone(),
                why,
            };
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, None) => String::new(),
                (None, Some(from)) => {
                    if let Some(f) = &from.field_ref {
                        match f.field_path.as_str() {
                            "metadata.name" => facts.name.clone(),
                            "metadata.namespace" => facts.namespace.clone(),
                            "spec.nodeName" => facts.node.clone(),
                            "status.podIP" | "status.podIPs" => facts.ip.clone(),
                            "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
                            "spec.serviceAccountName" => facts.service_account.clone(),
                            other => return Err(err(format!("fieldRef {other} not modelled"))),
                        }
                    } else if let Some(r) = &from.resource_field_ref {
                        facts.resources.get(&r.resource).cloned().ok_or_else(|| {
                            err(format!(
                                "resourceFieldRef {} has no stated value",
                                r.resource
                            ))
                        })?
                    } else if let Some(r) = &from.config_map_key_ref {
                        self.config_map(&r.name)
                            .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned())
                            .ok_or_else(|| err(format!("configMapKeyRef {}/{}", r.name, r.key)))?
                    } else {
                        return Err(err("valueFrom of an unmodelled kind".into()));
                    }
                }
            };
            set(e.name.clone(), value);
        }
        Ok(env)
    }
}

fn ports(c: &K8sContainer) -> Vec<Port> {
    c.ports
        .iter()
        .flatten()
        .map(|p| Port {
            name: p.name.clone(),
            container_port: p.container_port as u16,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect()
}

fn mounts(c: &K8sContainer, volumes: &[Volume]) -> Result<Vec<Mount>, HelmError> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let v =
                volumes
                    .iter()
                    .find(|v| v.name == m.name)
                    .ok_or_else(|| HelmError::NoVolume {
                        mount: m.name.clone(),
                    })?;
            Ok(Mount {
                name: m.name.clone(),
                mount_path: m.mount_path.clone(),
                sub_path: m.sub_path.clone(),
                read_only: m.read_only.unwrap_or(false),
                mount_propagation: m.mount_propagation.clone(),
                source: volume_source(v),
            })
        })
        .collect()
}

fn volume_source(v: &Volume) -> VolumeSource {
    if let Some(h) = &v.host_path {
        VolumeSource::HostPath {
            path: h.path.clone(),
        }
    } else if let Some(c) = &v.config_map {
        VolumeSource::ConfigMap {
            name: c.name.clone(),
        }
    } else if let Some(s) = &v.secret {
        VolumeSource::Secret {
            name: s.secret_name.clone().unwrap_or_default(),
        }
    } else if v.empty_dir.is_some() {
        VolumeSource::EmptyDir
    } else if let Some(p) = &v.projected {
        VolumeSource::Projected(
            p.sources
                .iter()
                .flatten()
                .map(|s| {
                    if let Some(t) = &s.service_account_token {
                        Projection::ServiceAccountToken {
                            path: t.path.clone(),
                            audience: t.audience.clone(),
                            expiration_seconds: t.expiration_seconds,
                        }
                    } else if let Some(c) = &s.config_map {
                        Projection::ConfigMap {
                            name: c.name.clone(),
                        }
                    } else if let Some(c) = &s.secret {
                        Projection::Secret {
                            name: c.name.clone(),
                        }
                    } else {
                        Projection::Other
                    }
                })
                .collect(),
        )
    } else {
        // The first field the volume sets besides its name says its kind.
        let kind = serde_json::to_value(v)
            .ok()
            .and_then(|j| j.as_object()?.keys().find(|k| *k != "name").cloned())
            .unwrap_or_default();
        VolumeSource::Other(kind)
    }
}

fn readiness(c: &K8sContainer, ports: &[Port]) -> Result<Option<HttpProbe>, HelmError> {
    let Some(get) = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
        return Ok(None);
    };
    let port = match &get.port {
        IntOrString::Int(p) => *p as u16,
        IntOrString::String(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .ok_or_else(|| HelmError::Probe(format!("named port {name} not declared")))?,
    };
    Ok(Some(HttpProbe {
        port,
        path: get.path.clone().unwrap_or_else(|| "/".into()),
    }))
}

#[cfg(test)]
mod tests;
