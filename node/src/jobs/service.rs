//! Starts a node's job service: the coordinator (loaded from the store), the loop that answers
//! other nodes' job-protocol requests, the lease and announcement ticks, and the worker.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::wire::NodeId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::coordinator::Coordinator;
use super::worker::Worker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::replicate::Mesh;
use crate::store::{RocksStore, StoreError};

/// Job-protocol requests queued before the sender waits.
const CALLS: usize = 256;
/// How often expired leases are looked for.
const LEASE_TICK: Duration = Duration::from_millis(250);
/// How often running jobs are announced again.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// The running job service of a node.
#[derive(Debug)]
pub struct Jobs {
    pub coordinator: Coordinator,
    pub worker: Worker,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// Opens the coordinator's state and starts everything; it all stops on `stop`.
    pub fn start(
        store: Arc<RocksStore>,
        mesh: Mesh,
        metrics: Metrics,
        config: &Config,
        stop: CancellationToken,
    ) -> Result<Self, StoreError> {
        let coordinator = Coordinator::open(
            store,
            mesh.clone(),
            metrics,
            config.redundancy,
            config.processors.keys().cloned().collect(),
        )?;
        let (calls_tx, mut calls) = mpsc::channel::<crate::replicate::JobCall>(CALLS);
        mesh.serve_jobs(calls_tx);
        let mut tasks = Vec::new();
        let c = coordinator.clone();
        let s = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    call = calls.recv() => {
                        let Some(call) = call else { break };
                        let answer = c.handle(NodeId(call.peer.to_bytes()), call.request);
                        let _ = call.reply.send(answer);
                    }
                }
            }
        }));
        let c = coordinator.clone();
        let s = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut leases = tokio::time::interval(LEASE_TICK);
            let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
            leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    _ = leases.tick() => c.expire_leases(),
                    _ = announce.tick() => c.announce_running().await,
                }
            }
        }));
        let worker = Worker::new(
            mesh,
            coordinator.clone(),
            config.jobs.clone(),
            config.processors.clone(),
        );
        tasks.push(tokio::spawn(worker.clone().run(stop)));
        Ok(Self {
            coordinator,
            worker,
            tasks,
        })
    }

    /// Waits for the service's tasks after the stop token was cancelled.
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
