//! Connections admitted under the policy of their time. A policy change must
//! reach them too (a database or gRPC stream lives for hours): every change
//! of the store re-runs each live connection's admission check against the
//! new state, and those now refused are told why and close.
//!
//! Both proxies use it: ztunnel for inbound connections, the waypoint for
//! L4 streams. The check is the caller's own admission function, so a live
//! connection is judged by exactly the rules a new one would be.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::{MeshState, MeshStore};

/// Live connections, each with what its admission check needs (`K`).
pub struct LiveConns<K> {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (K, oneshot::Sender<String>)>>,
}

impl<K> Default for LiveConns<K> {
    fn default() -> Self {
        LiveConns {
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }
}

/// Held by the connection: dropping it (the connection ended) forgets it.
/// `revoked` resolves with the reason when a policy change refuses it.
pub struct Admitted<K> {
    id: u64,
    conns: Arc<LiveConns<K>>,
    pub revoked: oneshot::Receiver<String>,
}

impl<K> Drop for Admitted<K> {
    fn drop(&mut self) {
        self.conns.conns.lock().unwrap().remove(&self.id);
    }
}

impl<K: Send + 'static> LiveConns<K> {
    pub fn admit(self: &Arc<Self>, key: K) -> Admitted<K> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.conns.lock().unwrap().insert(id, (key, tx));
        Admitted {
            id,
            conns: self.clone(),
            revoked: rx,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Visits every live connection (for the admin dump); `f` is brief, it
    /// runs under the lock admissions take.
    pub fn for_each(&self, mut f: impl FnMut(&K)) {
        for (k, _) in self.conns.lock().unwrap().values() {
            f(k);
        }
    }

    /// Runs `check` over every live connection; those it refuses are removed
    /// and told why. Returns how many were revoked. The check is pure and
    /// brief: the lock is never held across an await.
    pub fn recheck(&self, mut check: impl FnMut(&K) -> Result<(), String>) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let refused: Vec<(u64, String)> = conns
            .iter()
            .filter_map(|(id, (k, _))| check(k).err().map(|why| (*id, why)))
            .collect();
        for (id, why) in &refused {
            if let Some((_, tx)) = conns.remove(id) {
                let _ = tx.send(why.clone());
            }
        }
        refused.len()
    }

    /// Re-checks after every change of `store` until `stop` flips, counting
    /// what it revokes (`mesh_connections_revoked_total{component}`).
    pub fn watch(
        self: Arc<Self>,
        store: Arc<MeshStore>,
        component: &'static str,
        mut stop: tokio::sync::watch::Receiver<bool>,
        check: impl Fn(&MeshState, &K) -> Result<(), String> + Send + 'static,
    ) {
        let mut changed = store.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                let state = store.load();
                let revoked = self.recheck(|k| check(&state, k));
                if revoked > 0 {
                    tracing::info!(
                        revoked,
                        live = self.len(),
                        "policy change closed live connections"
                    );
                    metrics::counter!("mesh_connections_revoked_total", "component" => component)
                        .increment(revoked as u64);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recheck_revokes_only_the_refused_and_forgets_the_ended() {
        let live = Arc::new(LiveConns::<u16>::default());
        let mut a = live.admit(80);
        let mut b = live.admit(443);
        let c = live.admit(8080);
        drop(c);
        assert_eq!(live.len(), 2, "an ended connection is forgotten");
        let n = live.recheck(|port| match port {
            443 => Err("denied by DENY policy ns/no-tls".into()),
            _ => Ok(()),
        });
        assert_eq!(n, 1);
        assert_eq!(
            b.revoked.try_recv().unwrap(),
            "denied by DENY policy ns/no-tls"
        );
        assert!(
            a.revoked.try_recv().is_err(),
            "an allowed connection is untouched"
        );
        assert_eq!(live.len(), 1);
        // A revoked connection is not revoked twice.
        assert_eq!(live.recheck(|_| Err("all".into())), 1);
        assert!(live.is_empty());
    }
}
