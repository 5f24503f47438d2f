//! The agent's side of the plugin exchange (`crate::api`): it decides
//! membership from its live state and answers for each pod.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::capture::Standing;
use super::{blocking, on_node, pod_name, Agent, Event};
use crate::api::{Op, Request, Response};
use crate::membership::{decide, Membership};
use crate::redirect;

pub(super) async fn accept(l: UnixListener, tx: mpsc::Sender<Event>) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            // One bounded line: a plugin request is a few hundred bytes.
            let read = BufReader::new(r.take(64 * 1024)).read_line(&mut line).await;
            let resp = match read.map_err(|e| e.to_string()).and_then(|_| {
                serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
            }) {
                Ok(req) => {
                    let (otx, orx) = oneshot::channel();
                    if tx.send(Event::Plugin(req, otx)).await.is_err() {
                        return;
                    }
                    match orx.await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                Err(error) => Response::Refused { error },
            };
            let mut out = serde_json::to_vec(&resp).expect("response serializes");
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

fn refused(error: impl Into<String>) -> Response {
    Response::Refused {
        error: error.into(),
    }
}

impl Agent {
    pub(super) async fn plugin(&mut self, req: Request) -> Response {
        // A mesh change the event loop has not reached yet decides this pod
        // too: the plugin's answer is never older than the store.
        self.refresh().await;
        self.cfg.status.plugin_request(req.op);
        match req.op {
            Op::Add => self.add(req).await,
            Op::Check => self.check(&req).await,
            Op::Del => {
                let key = (req.namespace, req.name);
                if self.pods.contains_key(&key) {
                    self.unenrol(&key).await;
                    self.pods.remove(&key);
                    self.persist();
                    tracing::info!(pod = pod_name(&key), "pod deleted");
                }
                Response::Outside {
                    reason: "pod deleted".into(),
                }
            }
        }
    }

    /// Remembers every pod (so a later label captures it) and enrols the
    /// ambient ones.
    async fn add(&mut self, req: Request) -> Response {
        let key = (req.namespace.clone(), req.name.clone());
        let Some(netns) = req
            .netns
            .as_deref()
            .map(|n| on_node(&self.cfg.host_root, n))
        else {
            return refused("ADD without a netns path");
        };
        self.remember(req, netns).await;
        let resp = match self.reconcile(&key).await {
            Ok(Standing::Enrolled) => Response::Enrolled,
            Ok(Standing::Outside(reason)) => {
                tracing::debug!(
                    pod = pod_name(&key),
                    reason,
                    "pod outside the mesh; remembered"
                );
                Response::Outside { reason }
            }
            Err(error) => {
                // Failed ADD: this sandbox will not run, the runtime retries
                // with a fresh one. Nothing of ours stays behind.
                self.unenrol(&key).await;
                self.pods.remove(&key);
                refused(error)
            }
        };
        self.persist();
        resp
    }

    async fn check(&mut self, req: &Request) -> Response {
        let key = (req.namespace.clone(), req.name.clone());
        let pod = pod_name(&key);
        if let Membership::Outside(reason) = decide(
            &self.state,
            &req.namespace,
            &req.name,
            &self.cfg.exclude_namespaces,
            self.cfg.dns_capture,
        ) {
            return Response::Outside { reason };
        }
        let Some(r) = self.pods.get(&key) else {
            return refused(format!("{pod} is not known to the node agent"));
        };
        if r.enrolled.is_none() {
            return refused(format!("{pod} is not enrolled"));
        }
        let (netns, opts) = (r.netns.clone(), r.enrolled.as_ref().map(|e| e.options));
        let opts = opts.unwrap_or_default();
        match blocking(move || redirect::installed(&netns, opts)).await {
            Ok(true) => Response::Enrolled,
            Ok(false) => refused(format!("{pod}: capture rules are missing")),
            Err(e) => refused(e.to_string()),
        }
    }
}
