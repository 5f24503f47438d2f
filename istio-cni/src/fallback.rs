//! What the plugin decides when the node agent does not answer (down,
//! restarting, stuck): the agent keeps a small membership answer on disk,
//! `<state dir>/membership.json`, holding only what tells a pod that is
//! certainly outside the mesh from one that may be ambient. An ambient pod is
//! never started without the agent (fail closed: the runtime retries); a pod
//! that is certainly outside is not blocked by the agent's absence.
//!
//! The agent rewrites the file (by rename) only when its content changes,
//! i.e. when a namespace's or one of this node's pods' dataplane-mode label
//! or the excluded namespaces change, never for other mesh changes.
//!
//! It is the agent's last view: a label changed while the agent is away is
//! not seen until it is back. So that such a change still reaches pods the
//! plugin let start meanwhile, the plugin leaves each of them in
//! `<state dir>/pending/`, which the agent takes in as if their ADD had
//! reached it (and so captures them if they are ambient by then).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[cfg(feature = "agent")]
use mesh::MeshState;
use serde::{Deserialize, Serialize};

use crate::api::Request;

pub const FILE: &str = "membership.json";
pub const PENDING_DIR: &str = "pending";
/// A pending entry is one request line; anything larger is not ours.
#[cfg(feature = "agent")]
const MAX_PENDING_BYTES: u64 = 64 * 1024;
/// `mesh::DATAPLANE_MODE_LABEL`, spelled here because the static plugin is
/// built without the mesh crate (a test holds the two equal).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Never captured.
    pub excluded_namespaces: BTreeSet<String>,
    /// Labelled `istio.io/dataplane-mode=ambient`.
    pub ambient_namespaces: BTreeSet<String>,
    /// This node's pods (and those not yet scheduled) that carry their own
    /// dataplane-mode label, which beats the namespace's: `namespace/name`.
    pub pod_modes: BTreeMap<String, PodMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodMode {
    Ambient,
    None,
}

impl Answer {
    /// What the agent answers from `state` on `node`. Only the pod label
    /// values `membership::decide` acts on are kept; any other value defers
    /// to the namespace there too.
    #[cfg(feature = "agent")]
    pub fn of(state: &MeshState, node: &str, excluded: &[String]) -> Answer {
        let ambient_namespaces = state
            .namespace_labels
            .iter()
            .filter(|(_, l)| l.get(DATAPLANE_MODE_LABEL).is_some_and(|m| m == "ambient"))
            .map(|(ns, _)| ns.clone())
            .collect();
        let pod_modes = state
            .workloads
            .values()
            .chain(state.unaddressed.iter())
            .filter(|w| &*w.node == node || w.node.is_empty())
            .filter_map(|w| {
                let mode = match w.labels.get(DATAPLANE_MODE_LABEL)?.as_str() {
                    "ambient" => PodMode::Ambient,
                    "none" => PodMode::None,
                    _ => return None,
                };
                Some((format!("{}/{}", w.namespace, w.name), mode))
            })
            .collect();
        Answer {
            excluded_namespaces: excluded.iter().cloned().collect(),
            ambient_namespaces,
            pod_modes,
        }
    }

    /// The file's bytes (stable: sorted sets), compared before each write.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("answer serializes");
        b.push(b'\n');
        b
    }
}

/// The plugin's decision without the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// Start it uncaptured, and why that is safe.
    Outside(String),
    /// It may be ambient: it must wait for the agent.
    MaybeAmbient(String),
}

/// Decides from the agent's last answer (None: there is none) and the
/// excluded namespaces of the plugin's own network config, which hold even
/// when the agent never wrote an answer (the node's system pods must start
/// before anything else). Agrees with `membership::decide` on which pods of
/// this node are outside.
pub fn judge(answer: Option<&Answer>, excluded: &[String], namespace: &str, name: &str) -> Judged {
    let is_excluded = excluded.iter().any(|n| n == namespace)
        || answer.is_some_and(|a| a.excluded_namespaces.contains(namespace));
    if is_excluded {
        return Judged::Outside(format!("namespace {namespace} is excluded from capture"));
    }
    let Some(a) = answer else {
        return Judged::MaybeAmbient("the node agent has left no membership answer".into());
    };
    let ns_ambient = a.ambient_namespaces.contains(namespace);
    match a.pod_modes.get(&format!("{namespace}/{name}")) {
        Some(PodMode::Ambient) => {
            Judged::MaybeAmbient(format!("pod label {DATAPLANE_MODE_LABEL}=ambient"))
        }
        Some(PodMode::None) => Judged::Outside(format!("pod label {DATAPLANE_MODE_LABEL}=none")),
        None if ns_ambient => Judged::MaybeAmbient(format!(
            "namespace {namespace} is labelled {DATAPLANE_MODE_LABEL}=ambient"
        )),
        None => Judged::Outside(format!(
            "namespace {namespace} is not labelled {DATAPLANE_MODE_LABEL}=ambient"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a membership answer: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The plugin's side: the answer in `state_dir`.
pub fn read(state_dir: &Path) -> Result<Answer, FallbackError> {
    let path = state_dir.join(FILE);
    let bytes = std::fs::read(&path).map_err(|source| FallbackError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| FallbackError::Decode { path, source })
}

/// Replaces `to` through a temporary file and a rename, so a reader sees
/// the old content or the new, never half of it.
pub fn write_atomic(to: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = to.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let tmp = to.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, to)
}

/// The plugin's side: leaves a pod it started without the agent for the
/// agent to take in. One file per sandbox.
pub fn leave_pending(state_dir: &Path, req: &Request) -> Result<PathBuf, FallbackError> {
    let dir = state_dir.join(PENDING_DIR);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FallbackError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Container ids are hex; anything that could leave the dir (a `/`, a
    // `..`) is kept out of the path.
    let id: String = req
        .container_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    let path = dir.join(format!("{id}.json"));
    let bytes = serde_json::to_vec(req).expect("request serializes");
    write_atomic(&path, &bytes).map_err(io(&path))?;
    Ok(path)
}

#[cfg(feature = "agent")]
/// The agent's side: every pending request, oldest first, each removed once
/// read. A file that is not a request is removed and reported.
pub fn take_pending(state_dir: &Path) -> Vec<Request> {
    use std::io::Read;
    let dir = state_dir.join(PENDING_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let t = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, p)
        })
        .collect();
    found.sort();
    let mut out = Vec::new();
    for (_, path) in found {
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_PENDING_BYTES).read_to_end(&mut bytes));
        match read
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_slice::<Request>(&bytes).map_err(|e| e.to_string()))
        {
            Ok(r) => out.push(r),
            Err(error) => {
                tracing::warn!(path = %path.display(), error, "pending pod entry unreadable; removed")
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove pending pod entry");
        }
    }
    out
}

#[cfg(all(test, feature = "agent"))]
mod tests {
    use super::*;
    use crate::membership::{decide, Membership};

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system, labels: {istio.io/dataplane-mode: ambient}}\n";

    fn pod(ns: &str, name: &str, node: &str, mode: Option<&str>) -> String {
        let labels = match mode {
            Some(m) => format!("{{istio.io/dataplane-mode: {m}}}"),
            None => "{}".into(),
        };
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec: {{serviceAccountName: sa, nodeName: {node}}}\nstatus: {{}}\n")
    }

    fn state() -> MeshState {
        let mut y = NS.to_string();
        for (ns, name, node, mode) in [
            ("amb", "a", "n1", None),
            ("amb", "out", "n1", Some("none")),
            ("amb", "odd", "n1", Some("sometimes")),
            ("plain", "p", "n1", None),
            ("plain", "in", "n1", Some("ambient")),
            ("plain", "elsewhere", "n2", Some("ambient")),
            ("kube-system", "dns", "n1", None),
        ] {
            y += &pod(ns, name, node, mode);
        }
        mesh::standalone::parse(&y, "cluster.local").unwrap()
    }

    #[test]
    fn the_label_is_the_mesh_crates() {
        assert_eq!(DATAPLANE_MODE_LABEL, mesh::DATAPLANE_MODE_LABEL);
    }

    #[test]
    fn answer_holds_ambient_namespaces_and_this_nodes_own_labels() {
        let a = Answer::of(&state(), "n1", &["kube-system".into()]);
        assert_eq!(
            a.ambient_namespaces,
            ["amb", "kube-system"].map(String::from).into()
        );
        assert_eq!(
            a.pod_modes,
            [
                ("amb/out".to_string(), PodMode::None),
                ("plain/in".to_string(), PodMode::Ambient)
            ]
            .into()
        );
        assert_eq!(a.excluded_namespaces, ["kube-system".to_string()].into());
        // The bytes are stable: equal answers are equal files.
        assert_eq!(
            a.to_bytes(),
            Answer::of(&state(), "n1", &["kube-system".into()]).to_bytes()
        );
        let back: Answer = serde_json::from_slice(&a.to_bytes()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn judge_table() {
        let a = Answer::of(&state(), "n1", &["kube-system".into()]);
        let none: &[String] = &[];
        let outside = |why: &str| Judged::Outside(why.to_string());
        let maybe = |why: &str| Judged::MaybeAmbient(why.to_string());
        type Case<'a> = (Option<&'a Answer>, &'a [String], &'a str, &'a str, Judged);
        let cases: &[Case] = &[
            (
                Some(&a),
                none,
                "amb",
                "a",
                maybe("namespace amb is labelled istio.io/dataplane-mode=ambient"),
            ),
            // Not yet known to the agent: its namespace decides.
            (
                Some(&a),
                none,
                "amb",
                "new",
                maybe("namespace amb is labelled istio.io/dataplane-mode=ambient"),
            ),
            (
                Some(&a),
                none,
                "amb",
                "out",
                outside("pod label istio.io/dataplane-mode=none"),
            ),
            (
                Some(&a),
                none,
                "amb",
                "odd",
                maybe("namespace amb is labelled istio.io/dataplane-mode=ambient"),
            ),
            (
                Some(&a),
                none,
                "plain",
                "p",
                outside("namespace plain is not labelled istio.io/dataplane-mode=ambient"),
            ),
            (
                Some(&a),
                none,
                "plain",
                "in",
                maybe("pod label istio.io/dataplane-mode=ambient"),
            ),
            (
                Some(&a),
                none,
                "nowhere",
                "x",
                outside("namespace nowhere is not labelled istio.io/dataplane-mode=ambient"),
            ),
            // Excluded by the answer, or by the plugin's own config even
            // without an answer; nothing else passes without one.
            (
                Some(&a),
                none,
                "kube-system",
                "dns",
                outside("namespace kube-system is excluded from capture"),
            ),
            (
                None,
                &["kube-system".into()],
                "kube-system",
                "dns",
                outside("namespace kube-system is excluded from capture"),
            ),
            (
                None,
                none,
                "plain",
                "p",
                maybe("the node agent has left no membership answer"),
            ),
        ];
        for (answer, excluded, ns, name, want) in cases {
            assert_eq!(&judge(*answer, excluded, ns, name), want, "{ns}/{name}");
        }
    }

    /// For this node's pods and pods the mesh does not know, the fallback
    /// says outside exactly when the agent would.
    #[test]
    fn judge_agrees_with_decide_on_outside() {
        let s = state();
        let excluded = ["kube-system".to_string()];
        let a = Answer::of(&s, "n1", &excluded);
        for (ns, name) in [
            ("amb", "a"),
            ("amb", "out"),
            ("amb", "odd"),
            ("amb", "new"),
            ("plain", "p"),
            ("plain", "in"),
            ("plain", "new"),
            ("kube-system", "dns"),
            ("nowhere", "x"),
        ] {
            let agent_outside = matches!(
                decide(&s, ns, name, &excluded, true),
                Membership::Outside(_)
            );
            let fallback_outside = matches!(judge(Some(&a), &[], ns, name), Judged::Outside(_));
            assert_eq!(agent_outside, fallback_outside, "{ns}/{name}");
        }
    }

    #[test]
    fn pending_entries_round_trip_oldest_first_and_are_consumed() {
        let dir = std::env::temp_dir().join(format!("istio-cni-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let req = |id: &str| Request {
            op: crate::api::Op::Add,
            namespace: "plain".into(),
            name: id.into(),
            container_id: id.into(),
            netns: Some("/run/netns/x".into()),
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        let first = leave_pending(&dir, &req("c1")).unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&first)
            .unwrap()
            .set_modified(t)
            .unwrap();
        // A hostile id stays inside the pending dir.
        let p = leave_pending(&dir, &req("../../etc/x")).unwrap();
        assert_eq!(p.parent().unwrap(), dir.join(PENDING_DIR));
        std::fs::write(dir.join(PENDING_DIR).join("junk.json"), b"{").unwrap();
        let got = take_pending(&dir);
        assert_eq!(got, vec![req("c1"), req("../../etc/x")]);
        assert!(take_pending(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
