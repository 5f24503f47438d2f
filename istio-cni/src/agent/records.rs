//! What the agent keeps on disk: its pod records (`pods.json`, so a
//! restarted agent knows every netns it captured) and the plugin's fallback
//! membership answer (`membership.json`). Each is rewritten, by rename, only
//! when its content changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{pod_name, Agent, Key};
use crate::api::Request;
use crate::fallback::{self, Answer};
use crate::redirect;

const STATE_FILE: &str = "pods.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Enrolled {
    pub uid: String,
    pub ip: IpAddr,
    pub service_account: String,
    pub options: redirect::Options,
}

/// A pod the plugin told us about.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Rules installed and handed (or queued for the next snapshot) to ztunnel.
    pub enrolled: Option<Enrolled>,
    /// Why the mesh's last decision for it could not be applied, so a
    /// refusal is reported once, not at every mesh change. Not kept across
    /// restarts: a new agent reports it again.
    #[serde(skip)]
    pub refused: Option<String>,
}

impl Record {
    pub fn of(req: Request, netns: PathBuf) -> Record {
        Record {
            namespace: req.namespace,
            name: req.name,
            container_id: req.container_id,
            netns,
            ips: req.ips,
            enrolled: None,
            refused: None,
        }
    }
}

/// The records a previous agent left, and the bytes they were read from
/// (so an unchanged set is not rewritten).
pub(super) fn load(state_dir: &Path) -> anyhow::Result<(BTreeMap<Key, Record>, Vec<u8>)> {
    let path = state_dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("agent state {}", path.display())),
    };
    let records: Vec<Record> = serde_json::from_slice(&bytes)
        .with_context(|| format!("agent state {}", path.display()))?;
    let pods = records
        .into_iter()
        .map(|r| ((r.namespace.clone(), r.name.clone()), r))
        .collect();
    Ok((pods, bytes))
}

/// The answer file as it is now (empty when there is none).
pub(super) fn current_answer(state_dir: &Path) -> Vec<u8> {
    std::fs::read(state_dir.join(fallback::FILE)).unwrap_or_default()
}

impl Agent {
    pub(super) fn persist(&mut self) {
        let records: Vec<&Record> = self.pods.values().collect();
        let bytes = serde_json::to_vec_pretty(&records).expect("JSON");
        if bytes == self.persisted {
            return;
        }
        let path = self.cfg.state_dir.join(STATE_FILE);
        match fallback::write_atomic(&path, &bytes) {
            Ok(()) => self.persisted = bytes,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot persist agent state")
            }
        }
    }

    /// Writes the plugin's fallback answer if the decision inputs changed.
    /// A failed write is retried at the next change; until then the plugin
    /// judges from the previous answer.
    pub(super) fn publish_answer(&mut self) {
        let answer = Answer::of(&self.state, &self.cfg.node, &self.cfg.exclude_namespaces);
        let bytes = answer.to_bytes();
        if bytes == self.answered {
            return;
        }
        let path = self.cfg.state_dir.join(fallback::FILE);
        match fallback::write_atomic(&path, &bytes) {
            Ok(()) => {
                tracing::info!(
                    path = %path.display(),
                    ambient_namespaces = answer.ambient_namespaces.len(),
                    labelled_pods = answer.pod_modes.len(),
                    "membership answer for the plugin updated"
                );
                self.answered = bytes;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot write the plugin's membership answer")
            }
        }
    }

    /// Remembers a pod sandbox the plugin told us about; a different netns
    /// for a known pod is a recreated sandbox, whose old netns leaves the
    /// mesh.
    pub(super) async fn remember(&mut self, req: Request, netns: PathBuf) {
        let key = (req.namespace.clone(), req.name.clone());
        let mut record = Record::of(req, netns);
        if let Some(old) = self.pods.get(&key) {
            if old.netns == record.netns {
                record.enrolled = old.enrolled.clone();
            } else {
                tracing::info!(pod = pod_name(&key), old = %old.netns.display(), new = %record.netns.display(), "pod sandbox replaced");
                self.unenrol(&key).await;
            }
        }
        self.pods.insert(key, record);
    }

    /// Takes in the pods the plugin started while it could not reach us.
    /// A pod already known is left as it is: the entry may be older than
    /// what the agent heard since (a stalled call the agent answered after
    /// all), and a replaced sandbox's old netns is pruned first anyway.
    /// Returns the keys taken in.
    pub(super) fn take_pending(&mut self) -> Vec<Key> {
        let mut taken = Vec::new();
        for req in fallback::take_pending(&self.cfg.state_dir) {
            let key = (req.namespace.clone(), req.name.clone());
            let Some(netns) = req
                .netns
                .as_deref()
                .map(|n| super::on_node(&self.cfg.host_root, n))
                .filter(|n| n.exists())
            else {
                continue;
            };
            if self.pods.contains_key(&key) {
                continue;
            }
            tracing::info!(pod = pod_name(&key), netns = %netns.display(), "pod started while the agent was away; now known");
            self.pods.insert(key.clone(), Record::of(req, netns));
            taken.push(key);
        }
        taken
    }
}
