//! The delta-ADS path: for one mesh size, a fresh client process (see
//! `ads_client`) connects to the bench's xDS server, takes the whole mesh as
//! istiod sends it (one response per type), then single changes and churn,
//! each pushed as its own delta response and ACKed before the next.
//!
//! CPU is the client process's own (getrusage in the client, sampled just
//! before the push and after the publish, so it covers decode, apply, build,
//! publish and the ACK); wall time runs from the server handing the
//! response to gRPC to the client's store subscriber seeing the new
//! generation (one machine-wide monotonic clock).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use xds::wds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

use crate::ads_server::{Delta, Server, Session};
use crate::gen;

/// Rounds per kind of single change; the table shows their median.
const ROUNDS: usize = 10;
const CHURN: usize = 1_000;

struct Published {
    generation: u64,
    at: u64,
    workloads: usize,
    services: usize,
    policies: usize,
}

struct Sample {
    cpu_ns: u64,
    rss_kb: u64,
    peak_kb: u64,
}

/// The client process and what it reports.
struct Client {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    samples: mpsc::UnboundedReceiver<Sample>,
    published: mpsc::UnboundedReceiver<Published>,
    /// The store generation the next publish must reach.
    generation: u64,
}

impl Client {
    fn spawn(server: &Server) -> anyhow::Result<Client> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--xds-client")
            .arg(&server.address)
            .arg(&server.root_cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the xDS client process")?;
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (stx, samples) = mpsc::unbounded_channel();
        let (ptx, published) = mpsc::unbounded_channel();
        // One reader splits the two kinds of line, which may interleave.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let f: Vec<&str> = line.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                match f.first() {
                    Some(&"sample") => {
                        let _ = stx.send(Sample {
                            cpu_ns: num(1),
                            rss_kb: num(2),
                            peak_kb: num(3),
                        });
                    }
                    Some(&"published") => {
                        let _ = ptx.send(Published {
                            generation: num(1),
                            at: num(2),
                            workloads: num(3) as usize,
                            services: num(4) as usize,
                            policies: num(5) as usize,
                        });
                    }
                    _ => tracing::warn!(line = %line, "unexpected line from the xDS client"),
                }
            }
        });
        Ok(Client {
            child,
            stdin,
            samples,
            published,
            // MeshStore starts at 1; the first full sync publishes 2.
            generation: 2,
        })
    }

    /// The client's CPU time and RSS now.
    async fn sample(&mut self) -> anyhow::Result<Sample> {
        self.stdin.write_all(b"sample\n").await?;
        self.stdin.flush().await?;
        self.samples.recv().await.context("xDS client exited")
    }

    /// Waits until the store has published `self.generation`.
    async fn published(&mut self) -> anyhow::Result<Published> {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(300), self.published.recv())
                .await
                .context("xDS client published nothing within 300 s")?
                .context("xDS client exited")?;
            if p.generation >= self.generation {
                return Ok(p);
            }
        }
    }

    async fn quit(mut self) -> anyhow::Result<()> {
        self.stdin.write_all(b"quit\n").await?;
        drop(self.stdin);
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("xDS client exited with {status}");
        }
        Ok(())
    }
}

/// One kind of single change, every round.
pub struct Change {
    pub kind: &'static str,
    pub cpu_ms: Vec<f64>,
    pub wall_ms: Vec<f64>,
}

pub struct AdsRow {
    pub pods: usize,
    pub rss_connected_mb: f64,
    /// Encoded size of the two initial responses.
    pub initial_push_mb: f64,
    pub load_cpu_ms: f64,
    pub load_wall_ms: f64,
    pub rss_load_mb: f64,
    /// VmHWM after the load: the peak while the whole push was decoded and
    /// applied.
    pub peak_rss_load_mb: f64,
    pub changes: Vec<Change>,
    /// CPU between two samples with nothing pushed: the measurement's own
    /// cost, included in every change's CPU.
    pub floor_cpu_ms: f64,
    pub churn_events: usize,
    pub churn_cpu_ms_per_event: f64,
    pub churn_wall_s: f64,
    pub rss_churn_mb: f64,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Pushes one change and waits for its ACK and its publish. Returns the
/// client's CPU (ns) and the wall time to publish (ns).
async fn one_change(
    client: &mut Client,
    session: &mut Session,
    type_url: &str,
    delta: Delta,
) -> anyhow::Result<(u64, u64, Published)> {
    let before = client.sample().await?;
    let (nonce, sent, _) = session.push(type_url, delta).await?;
    session.ack(&nonce).await?;
    let p = client.published().await?;
    client.generation += 1;
    let after = client.sample().await?;
    Ok((
        after.cpu_ns.saturating_sub(before.cpu_ns),
        p.at.saturating_sub(sent),
        p,
    ))
}

fn upsert(item: (String, Vec<u8>)) -> Delta {
    Delta {
        upsert: vec![item],
        remove: Vec::new(),
    }
}

fn remove(name: String) -> Delta {
    Delta {
        upsert: Vec::new(),
        remove: vec![name],
    }
}

pub async fn measure(server: &mut Server, n: usize) -> anyhow::Result<AdsRow> {
    // Generated before the client starts, so the server's own work is
    // never on the client's cores while it is measured.
    let mut addresses: Vec<(String, Vec<u8>)> = (0..n).map(|i| gen::workload(i, 1)).collect();
    addresses.extend((0..gen::services(n)).map(gen::service));
    let policies: Vec<_> = (0..gen::policies(n)).map(|k| gen::policy(k, 0)).collect();

    let mut client = Client::spawn(server)?;
    let mut session = server.accept(&[ADDRESS_TYPE, AUTHORIZATION_TYPE]).await?;
    let connected = client.sample().await?;

    // The whole mesh, as istiod sends it to a new ztunnel: addresses, then
    // policies; the client publishes once it has both.
    let (nonce, sent, address_bytes) = session
        .push(
            ADDRESS_TYPE,
            Delta {
                upsert: addresses,
                remove: Vec::new(),
            },
        )
        .await?;
    session.ack(&nonce).await?;
    let (nonce, _, policy_bytes) = session
        .push(
            AUTHORIZATION_TYPE,
            Delta {
                upsert: policies,
                remove: Vec::new(),
            },
        )
        .await?;
    session.ack(&nonce).await?;
    let p = client.published().await?;
    client.generation += 1;
    let load_wall_ms = ms(p.at.saturating_sub(sent));
    let loaded = client.sample().await?;
    if (p.workloads, p.services, p.policies) != (n, gen::services(n), gen::policies(n)) {
        bail!(
            "after the initial push the client holds {} workloads, {} services, {} policies; sent {n}, {}, {}",
            p.workloads, p.services, p.policies, gen::services(n), gen::policies(n)
        );
    }

    let mut floor = Vec::new();
    for _ in 0..ROUNDS {
        let a = client.sample().await?;
        let b = client.sample().await?;
        floor.push(ms(b.cpu_ns.saturating_sub(a.cpu_ns)));
    }

    let mut changes = Vec::new();
    let mut record = |kind, runs: Vec<(u64, u64)>| {
        changes.push(Change {
            kind,
            cpu_ms: runs.iter().map(|r| ms(r.0)).collect(),
            wall_ms: runs.iter().map(|r| ms(r.1)).collect(),
        })
    };
    // Pods n.. are new; the deletes remove exactly those again.
    let mut runs = Vec::new();
    for r in 0..ROUNDS {
        let (cpu, wall, p) = one_change(
            &mut client,
            &mut session,
            ADDRESS_TYPE,
            upsert(gen::workload(n + r, 1)),
        )
        .await?;
        check(p.workloads, n + r + 1, "add pod")?;
        runs.push((cpu, wall));
    }
    record("add pod", std::mem::take(&mut runs));
    for r in 0..ROUNDS {
        let item = gen::workload(r * 7 % n, 2 + r as u32);
        let (cpu, wall, p) =
            one_change(&mut client, &mut session, ADDRESS_TYPE, upsert(item)).await?;
        check(p.workloads, n + ROUNDS, "update pod")?;
        runs.push((cpu, wall));
    }
    record("update pod", std::mem::take(&mut runs));
    for r in 0..ROUNDS {
        let (cpu, wall, p) = one_change(
            &mut client,
            &mut session,
            ADDRESS_TYPE,
            remove(gen::workload_name(n + r)),
        )
        .await?;
        check(p.workloads, n + ROUNDS - r - 1, "delete pod")?;
        runs.push((cpu, wall));
    }
    record("delete pod", std::mem::take(&mut runs));
    for r in 0..ROUNDS {
        let item = gen::policy(r % gen::policies(n), 1 + r as u32);
        let (cpu, wall, p) =
            one_change(&mut client, &mut session, AUTHORIZATION_TYPE, upsert(item)).await?;
        check(p.policies, gen::policies(n), "change policy")?;
        runs.push((cpu, wall));
    }
    record("change policy", runs);

    // Churn, as a busy cluster makes it: of every 10 events 7 pod updates,
    // one new pod (a fresh name each time), the delete of the pod added
    // just before, one policy change. Each is its own response, pushed as
    // soon as the previous one is ACKed.
    let churn_start = client.sample().await?;
    let started = Instant::now();
    for e in 0..CHURN {
        let (type_url, delta) = match e % 10 {
            0 => (
                AUTHORIZATION_TYPE,
                upsert(gen::policy((e / 10) % gen::policies(n), 1_000 + e as u32)),
            ),
            1 => (ADDRESS_TYPE, upsert(gen::workload(n + 100 + e, 1))),
            2 => (ADDRESS_TYPE, remove(gen::workload_name(n + 100 + e - 1))),
            _ => (
                ADDRESS_TYPE,
                upsert(gen::workload(e * 13 % n, 100 + e as u32)),
            ),
        };
        let (nonce, _, _) = session.push(type_url, delta).await?;
        session.ack(&nonce).await?;
    }
    // Each ACK is sent after its publish, so the last one is in force.
    client.generation += CHURN as u64 - 1;
    let p = client.published().await?;
    client.generation += 1;
    let churn_wall_s = started.elapsed().as_secs_f64();
    let churned = client.sample().await?;
    check(p.workloads, n, "churn")?;
    tracing::debug!(pods = n, generation = p.generation, "churn done");
    client.quit().await?;
    drop(session);

    Ok(AdsRow {
        pods: n,
        rss_connected_mb: mb(connected.rss_kb),
        initial_push_mb: (address_bytes + policy_bytes) as f64 / 1e6,
        load_cpu_ms: ms(loaded.cpu_ns.saturating_sub(connected.cpu_ns)),
        load_wall_ms,
        rss_load_mb: mb(loaded.rss_kb),
        peak_rss_load_mb: mb(loaded.peak_kb),
        changes,
        floor_cpu_ms: median(&floor),
        churn_events: CHURN,
        churn_cpu_ms_per_event: ms(churned.cpu_ns.saturating_sub(churn_start.cpu_ns))
            / CHURN as f64,
        churn_wall_s,
        rss_churn_mb: mb(churned.rss_kb),
    })
}

fn check(got: usize, want: usize, what: &str) -> anyhow::Result<()> {
    if got != want {
        bail!("after {what} the client holds {got} workloads, expected {want}");
    }
    Ok(())
}
