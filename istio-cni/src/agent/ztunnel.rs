//! The agent's side of ZDS: accepting ztunnels, the snapshot a (re)connected
//! one gets, and telling the connected one about each change.

use std::fs::File;

use tokio::sync::mpsc;
use zds::{WorkloadInfo, ZdsConn, ZdsError, ZdsServer};

use super::records::{Enrolled, Record};
use super::{Agent, Event};

pub(super) async fn accept(server: ZdsServer, tx: mpsc::Sender<Event>) {
    loop {
        match server.accept().await {
            Ok(conn) => {
                if tx.send(Event::Ztunnel(conn)).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "ZDS accept failed"),
        }
    }
}

impl Agent {
    /// AddWorkload to the connected ztunnel. Without one the pod waits for
    /// the next snapshot (its traffic fails closed until then): Ok.
    pub(super) async fn tell_add(&mut self, r: &Record, e: &Enrolled) -> Result<(), String> {
        let Some(conn) = &self.ztunnel else {
            tracing::warn!(pod = %format!("{}/{}", r.namespace, r.name), "no ztunnel connected; pod captured, served at its next snapshot");
            return Ok(());
        };
        let fd = File::open(&r.netns)
            .map_err(|err| format!("open netns {}: {err}", r.netns.display()))?;
        let info = WorkloadInfo {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            service_account: e.service_account.clone(),
        };
        match conn.add(&e.uid, info, &fd).await {
            Ok(()) => Ok(()),
            Err(ZdsError::Nack(why)) => Err(format!("ztunnel refused the pod: {why}")),
            Err(err) => {
                tracing::warn!(error = %err, "ztunnel connection lost; it gets the pod in its next snapshot");
                self.ztunnel = None;
                self.cfg.status.ztunnel_connected(false);
                Ok(())
            }
        }
    }

    pub(super) async fn tell_del(&mut self, uid: &str) {
        let Some(conn) = &self.ztunnel else { return };
        match conn.del(uid).await {
            Ok(()) => {}
            Err(ZdsError::Nack(why)) => tracing::warn!(uid, why, "ztunnel refused DelWorkload"),
            Err(err) => {
                tracing::warn!(error = %err, "ztunnel connection lost");
                self.ztunnel = None;
                self.cfg.status.ztunnel_connected(false);
            }
        }
    }

    /// A (re)connected ztunnel gets every enrolled pod, then SnapshotSent.
    /// The newest ztunnel is the one told about later changes.
    pub(super) async fn snapshot(&mut self, conn: ZdsConn) {
        let enrolled: Vec<Record> = self
            .pods
            .values()
            .filter(|r| r.enrolled.is_some())
            .cloned()
            .collect();
        for r in &enrolled {
            let e = r.enrolled.as_ref().expect("filtered");
            let Ok(fd) = File::open(&r.netns) else {
                continue;
            };
            let info = WorkloadInfo {
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                service_account: e.service_account.clone(),
            };
            match conn.add(&e.uid, info, &fd).await {
                Ok(()) => {}
                Err(ZdsError::Nack(why)) => {
                    // Rules stay: the pod fails closed rather than escaping.
                    tracing::error!(uid = e.uid, why, "ztunnel refused a pod in the snapshot")
                }
                Err(err) => {
                    tracing::warn!(error = %err, "ztunnel left during the snapshot");
                    return;
                }
            }
        }
        match conn.snapshot_sent().await {
            Ok(()) => {
                tracing::info!(pods = enrolled.len(), "ztunnel connected; snapshot sent");
                self.ztunnel = Some(conn);
                self.cfg.status.ztunnel_connected(true);
            }
            Err(err) => tracing::warn!(error = %err, "ztunnel refused the snapshot"),
        }
    }
}
