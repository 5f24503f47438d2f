//! The standalone file as a source. A change re-reads the file, but only
//! documents whose text changed are parsed and translated again; the rest
//! keep their translation, and the incremental translator re-derives only
//! what the changed objects touch. A file with any error is refused whole
//! (the last good state stays), as an operator editing one file expects.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::objects::{ObjectKey, Objects, Translated};
use crate::standalone::{err, split, translate_doc};
use crate::{ConfigError, MeshState, MeshStore};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Invalid { path: PathBuf, source: ConfigError },
}

/// What a document translated to, as far as checking the whole set needs.
#[derive(Clone)]
struct DocSummary {
    key: ObjectKey,
    addresses: Vec<(&'static str, IpAddr)>,
    /// A pod's own `metadata.uid`, when it sets one (a pod without one is
    /// known by `<namespace>/<name>`).
    uid: Option<Box<str>>,
}

impl DocSummary {
    fn of(t: &Translated) -> Self {
        let uid = match &t.object {
            crate::objects::Kind::Pod(p) => p.uid.as_deref().map(Box::from),
            _ => None,
        };
        DocSummary {
            key: t.key.clone(),
            addresses: t.object.addresses(),
            uid,
        }
    }
}

/// The file's documents as last applied (by a hash of their text) and the
/// objects they made.
pub struct FileSource {
    path: PathBuf,
    objects: Objects,
    docs: HashMap<u64, Option<DocSummary>>,
}

fn bytes_hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

fn text_hash(text: &str) -> u64 {
    // Fixed keys: the same text hashes alike across changes.
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl FileSource {
    pub fn new(path: &Path, trust_domain: &str) -> Self {
        FileSource {
            path: path.to_path_buf(),
            objects: Objects::new(trust_domain),
            docs: HashMap::new(),
        }
    }

    /// Reads the file and builds the first state from it.
    pub fn open(path: &Path, trust_domain: &str) -> Result<(Self, MeshState), FileError> {
        let mut src = FileSource::new(path, trust_domain);
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let state = src.apply(&text).map_err(|source| FileError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        Ok((src, state))
    }

    /// Applies the file's new text. On error nothing changes.
    pub fn apply(&mut self, text: &str) -> Result<MeshState, ConfigError> {
        // Unchanged documents move their summaries over from the last apply
        // (no copies: at 50k documents, cloning every key cost more than
        // the one translation a change needs).
        let mut old = std::mem::take(&mut self.docs);
        // (text hash, summary, whether it was known before this apply)
        let mut entries: Vec<(u64, Option<DocSummary>, bool)> = Vec::new();
        let mut changed = Vec::new();
        let mut failed = None;
        for d in split(text) {
            let h = text_hash(d.text);
            let (summary, known) = match old.remove(&h) {
                Some(s) => (s, true),
                None => match translate_doc(d.index, d.text) {
                    Ok(t) => {
                        let s = t.as_ref().map(DocSummary::of);
                        changed.extend(t);
                        (s, false)
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            };
            entries.push((h, summary, known));
        }
        let summaries: Vec<&DocSummary> =
            entries.iter().filter_map(|(_, s, _)| s.as_ref()).collect();
        if let Some(e) = failed
            .map(Err)
            .unwrap_or_else(|| check_set(&summaries))
            .err()
        {
            // Put back what was moved: the last good documents stay known,
            // and nothing of the refused text is taken for applied.
            old.extend(entries.into_iter().filter(|e| e.2).map(|(h, s, _)| (h, s)));
            self.docs = old;
            return Err(e);
        }
        let keep: HashSet<&ObjectKey> = summaries.iter().map(|s| &s.key).collect();
        // What the old text had and the new one has not, by key (a changed
        // document keeps its key and is upserted below).
        let gone: Vec<ObjectKey> = old
            .values()
            .flatten()
            .map(|s| &s.key)
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        drop(keep);
        for k in &gone {
            self.objects.remove(k);
        }
        for t in changed {
            self.objects.upsert(t);
        }
        self.docs = entries.into_iter().map(|(h, s, _)| (h, s)).collect();
        Ok(self.objects.publish())
    }

    /// Polls the file and applies each good change to `store`, on a thread
    /// of its own until `stop` says true (or its sender is gone). A bad
    /// change is logged and recorded; the last good state stays in force.
    /// Polling (rather than inotify) survives editors and ConfigMap mounts
    /// that replace the file. One thread, not the blocking pool: parsing and
    /// deriving stay off the async workers, and their allocations stay in
    /// one allocator arena (applies spread over pool threads grew a
    /// 10k-pod waypoint's RSS by a third over 20 edits).
    pub fn watch(
        mut self,
        store: Arc<MeshStore>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::thread::JoinHandle<()> {
        let stopped = move || *stop.borrow() || stop.has_changed().is_err();
        std::thread::Builder::new()
            .name("config-file".into())
            .spawn(move || {
                let path = self.path.clone();
                // The text in force, by hash: no second copy of the file.
                let mut last = std::fs::read(&path).ok().map(|b| bytes_hash(&b));
                loop {
                    for _ in 0..10 {
                        if stopped() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let bytes = match std::fs::read(&path) {
                        Ok(b) => b,
                        Err(e) => {
                            // A vanished file keeps the last good state serving.
                            if last.is_some() {
                                tracing::warn!(path = %path.display(), error = %e, "config file unreadable; keeping last good config");
                                store.reject(format!("{}: {e}", path.display()));
                            }
                            last = None;
                            continue;
                        }
                    };
                    let h = bytes_hash(&bytes);
                    if last == Some(h) {
                        continue;
                    }
                    last = Some(h);
                    self.apply_to(&bytes, &store);
                }
            })
            .expect("spawn the config file thread")
    }

    fn apply_to(&mut self, bytes: &[u8], store: &MeshStore) {
        let path = self.path.display().to_string();
        let text = String::from_utf8_lossy(bytes);
        match self.apply_into(&text, store) {
            Ok(()) => {
                let state = store.load();
                tracing::info!(
                    path,
                    workloads = state.workloads.len(),
                    services = state.services.len(),
                    policies = state.policies.len(),
                    "config applied"
                );
            }
            Err(e) => {
                tracing::error!(path, error = %e, "config rejected; keeping last good config");
                store.reject(e.to_string());
            }
        }
    }

    /// `apply`, then the new state into `store`. An apply holds the whole
    /// text and a new document map for a moment (megabytes at cluster
    /// size) between long-lived entries; the allocator keeps those pages
    /// unless asked, and RSS grew ~20% over a few hundred edits at 10k pods.
    /// Once the replaced state is freed, the free pages go back to the OS.
    pub fn apply_into(&mut self, text: &str, store: &MeshStore) -> Result<(), ConfigError> {
        store.replace(self.apply(text)?);
        crate::memory::release_free();
        Ok(())
    }
}

/// No object twice, no address or pod uid claimed twice (a workload is
/// indexed by its uid: two with one would shadow each other).
fn check_set(docs: &[&DocSummary]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    let mut ips: HashMap<IpAddr, &ObjectKey> = HashMap::new();
    let mut uids: HashMap<&str, &ObjectKey> = HashMap::new();
    let explicit: HashSet<&ObjectKey> = docs
        .iter()
        .filter(|d| d.uid.is_some())
        .map(|d| &d.key)
        .collect();
    for d in docs {
        if !seen.insert(&d.key) {
            return Err(err(&d.key.to_string(), "metadata.name", "defined twice"));
        }
        for (field, ip) in &d.addresses {
            if let Some(other) = ips.insert(*ip, &d.key) {
                return Err(err(
                    &d.key.to_string(),
                    *field,
                    format!("{ip} is already used by {other}"),
                ));
            }
        }
        if let Some(uid) = &d.uid {
            if let Some(other) = uids.insert(uid, &d.key) {
                return Err(err(
                    &d.key.to_string(),
                    "metadata.uid",
                    format!("{uid} is already used by {other}"),
                ));
            }
        }
    }
    // A uid of the form another pod without one is known by.
    for (uid, key) in &uids {
        if let Some((ns, name)) = uid.split_once('/') {
            let other = ObjectKey {
                kind: "Pod".into(),
                namespace: ns.into(),
                name: name.into(),
            };
            if other != **key && seen.contains(&other) && !explicit.contains(&other) {
                return Err(err(
                    &key.to_string(),
                    "metadata.uid",
                    format!("{uid} is already used by {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// A store holding the file's state, kept current by a watch that runs
/// until `stop`.
pub fn open_file(
    path: &Path,
    trust_domain: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Arc<MeshStore>, FileError> {
    let (src, state) = FileSource::open(path, trust_domain)?;
    let store = MeshStore::new(state, &path.display().to_string());
    src.watch(store.clone(), stop);
    Ok(store)
}
