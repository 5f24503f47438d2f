use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::model::MeshState;

/// The live mesh state plus what the last config load said, for the admin dump.
pub struct MeshStore {
    state: ArcSwap<MeshState>,
    status: Mutex<LoadStatus>,
    /// The generation of the state in force, for whoever must react to a
    /// change (live connections are re-checked against new policy).
    changed: tokio::sync::watch::Sender<u64>,
    /// Replaced states that readers may still hold. Freeing a large state
    /// takes time (tens of ms at 50k workloads); holding one reference here
    /// means the last one is never dropped on a connection's thread but by
    /// the writer, at its next change.
    retired: Mutex<Vec<Arc<MeshState>>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadStatus {
    pub source: String,
    pub generation: u64,
    pub last_error: Option<String>,
}

impl MeshStore {
    pub fn new(state: MeshState, source: &str) -> Arc<Self> {
        crate::report_rejected(&[], &state.rejected);
        Arc::new(MeshStore {
            changed: tokio::sync::watch::channel(1).0,
            retired: Mutex::new(Vec::new()),
            state: ArcSwap::from_pointee(state),
            status: Mutex::new(LoadStatus {
                source: source.to_string(),
                generation: 1,
                last_error: None,
            }),
        })
    }

    pub fn load(&self) -> Arc<MeshState> {
        self.state.load_full()
    }

    pub fn replace(&self, state: MeshState) {
        let old = self.state.swap(Arc::new(state));
        crate::report_rejected(&old.rejected, &self.state.load().rejected);
        {
            let mut retired = self.retired.lock().unwrap();
            retired.push(old);
            // Those only we hold any more are freed here, by the writer.
            retired.retain(|s| Arc::strong_count(s) > 1);
        }
        let generation = {
            let mut st = self.status.lock().unwrap();
            st.generation += 1;
            st.last_error = None;
            st.generation
        };
        self.changed.send_replace(generation);
    }

    /// Fires after each `replace`, once the new state is in force.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn reject(&self, error: String) {
        self.status.lock().unwrap().last_error = Some(error);
    }

    pub fn status(&self) -> LoadStatus {
        self.status.lock().unwrap().clone()
    }
}
