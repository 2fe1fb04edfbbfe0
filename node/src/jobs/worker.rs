//! The worker: every node runs one. It learns of jobs from gossip (and from its own
//! coordinator), and while it has a free task slot and the machine's CPU load, less its own
//! use, is under the ceiling it asks their coordinators for work, one task per claim. A
//! granted task reads its input chunk (a local read when the coordinator chose this node for
//! its locality), runs the pipeline, stores the output through the normal write path, and
//! reports the output's manifest and placement record. The lease is renewed every third of its term while the task runs; a
//! renewal answered `Lost` stops the task without reporting.
//!
//! A map task of a shuffling job stores its shuffle output with one copy, here: a reduce task
//! that cannot read one reports the map tasks whose outputs are lost rather than failing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use mesh_proto::job::{
    JobRequest, JobResponse, JobSpec, Part, Source, StageStat, TaskOutput, Work,
};
use mesh_proto::wire::{ControlRequest, ControlResponse, NodeId};
use mesh_proto::{ChunkerSpec, JobId, Manifest, RecordFormat, Redundancy};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::coordinator::{Coordinator, REDUCE_KEPT_STAGE, parse_pipeline};
use super::exec;
use super::processors::{ChunkInput, Format, Pipeline, TaskError};
use super::shuffle;
use crate::chunker::{ChunkSource, Chunker, PreCut, cut_all};
use crate::config::{ExecConfig, JobsConfig};
use crate::net::Frame;
use crate::objects::PutOptions;
use crate::replicate::{Announce, Mesh};

/// How often an idle worker looks for work.
const POLL: Duration = Duration::from_millis(200);
/// Longest wait between asks of a coordinator that had nothing to give.
const MAX_IDLE_BACKOFF: Duration = Duration::from_secs(2);
/// A job not announced for this long is forgotten (its coordinator is gone or it ended).
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Chunks a reduce task reads at once.
const REDUCE_READ_WINDOW: usize = 32;
/// Bytes of kept records a reduce task's merge hands to the write at a time, and how many
/// such buffers it may be ahead.
const REDUCE_BUFFER: usize = 1 << 20;
const REDUCE_BUFFERS_AHEAD: usize = 2;
/// Copies of a map task's shuffle output.
const SHUFFLE_REDUNDANCY: Redundancy = Redundancy::Replicas(1);
/// Near peers a claim names.
const MAX_NEAR: usize = 64;
/// Jobs whose coordinator a worker remembers.
const MAX_REMEMBERED: usize = 4096;
/// Attempts to deliver a task's result to its coordinator.
const FINISH_TRIES: u32 = 5;

/// Why a task attempt ended without an output.
#[derive(Debug)]
enum Failure {
    /// A failed attempt, with its error.
    Error(String),
    /// A reduce task could not read the shuffle outputs of these map tasks: their holder is
    /// gone.
    InputsLost { maps: Vec<u32>, error: String },
}

impl From<String> for Failure {
    fn from(error: String) -> Self {
        Failure::Error(error)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(e) => f.write_str(e),
            Failure::InputsLost { maps, error } => {
                write!(
                    f,
                    "the outputs of {} map tasks are lost: {error}",
                    maps.len()
                )
            }
        }
    }
}

/// A job this worker may ask for work.
struct Known {
    coordinator: PeerId,
    exec: Vec<String>,
    prepared: Option<Arc<Prepared>>,
    next_ask: Instant,
    idle_backoff: Duration,
    heard: Instant,
    /// The coordinator said to stop asking.
    done: bool,
}

impl Known {
    /// The coordinator announced the job as running.
    fn heard_running(&mut self, now: Instant) {
        self.heard = now;
        if self.done {
            // Running again (resubmitted after it ended and was forgotten): ask at once, not
            // after the idle backoff the ended job built up.
            self.done = false;
            self.next_ask = now;
            self.idle_backoff = POLL;
        }
    }
}

/// A job's spec and parsed pipeline.
struct Prepared {
    spec: JobSpec,
    pipeline: Pipeline,
}

/// The worker of one node.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    mesh: Mesh,
    coordinator: Coordinator,
    config: JobsConfig,
    exec: BTreeMap<String, ExecConfig>,
    known: Mutex<HashMap<JobId, Known>>,
    /// The coordinator of every job heard of (running or ended), for `meshctl job status`
    /// on a node that does not coordinate the job; at most [`MAX_REMEMBERED`] entries.
    coordinators: Mutex<HashMap<JobId, PeerId>>,
    running: AtomicUsize,
    wake: Notify,
    /// The last CPU sample, when it was taken, and the others' load it gave.
    cpu: Mutex<(Option<crate::CpuTicks>, Instant, f32)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Worker {
    pub fn new(
        mesh: Mesh,
        coordinator: Coordinator,
        config: JobsConfig,
        exec: BTreeMap<String, ExecConfig>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                mesh,
                coordinator,
                config,
                exec,
                known: Mutex::new(HashMap::new()),
                coordinators: Mutex::new(HashMap::new()),
                running: AtomicUsize::new(0),
                wake: Notify::new(),
                cpu: Mutex::new((crate::CpuTicks::read(), Instant::now(), 0.0)),
            }),
        }
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Relaxed)
    }

    fn me(&self) -> PeerId {
        self.inner.mesh.network().local_peer_id()
    }

    fn exec_names(&self) -> Vec<String> {
        self.inner.exec.keys().cloned().collect()
    }

    /// Learns of jobs and claims work until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut announcements = self.inner.mesh.network().job_announcements();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                heard = announcements.recv() => match heard {
                    Ok((author, a)) => self.heard(a.job, a.coordinator, author, a.exec, a.running),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            let me = self.me();
            for (job, exec) in self.inner.coordinator.running() {
                self.heard(job, NodeId(me.to_bytes()), me, exec, true);
            }
            self.claim_round(&stop).await;
        }
        // Tasks still running stop with the node; their leases expire at the coordinator.
    }

    fn heard(
        &self,
        job: JobId,
        coordinator: NodeId,
        author: PeerId,
        exec: Vec<String>,
        running: bool,
    ) {
        let Ok(coordinator) = PeerId::from_bytes(&coordinator.0) else {
            return;
        };
        // Only the coordinator itself announces its jobs.
        if coordinator != author {
            return;
        }
        {
            let mut remembered = lock(&self.inner.coordinators);
            if remembered.len() >= MAX_REMEMBERED && !remembered.contains_key(&job) {
                // Forget an arbitrary one: this map only helps operators find reports.
                if let Some(old) = remembered.keys().next().copied() {
                    remembered.remove(&old);
                }
            }
            remembered.insert(job, coordinator);
        }
        let mut known = lock(&self.inner.known);
        if !running {
            known.remove(&job);
            return;
        }
        let now = Instant::now();
        let entry = known.entry(job).or_insert_with(|| Known {
            coordinator,
            exec,
            prepared: None,
            next_ask: now,
            idle_backoff: POLL,
            heard: now,
            done: false,
        });
        entry.heard_running(now);
    }

    /// The CPU load of everything on the machine but this node, over the last second or so.
    /// The node's own tasks are left out: `task_slots` bounds them, and counting them would
    /// make nodes that share a machine (tests, benchmarks, a laptop) each see the others'
    /// tasks plus its own and hold back to one task apiece.
    fn others_load(&self) -> f32 {
        let mut cpu = lock(&self.inner.cpu);
        if cpu.1.elapsed() >= Duration::from_secs(1) {
            let now = crate::CpuTicks::read();
            cpu.2 = match (now, cpu.0) {
                (Some(now), Some(before)) => now.others_since(&before),
                _ => 0.0,
            };
            cpu.0 = now;
            cpu.1 = Instant::now();
        }
        cpu.2
    }

    /// May this node take one more task now?
    fn has_room(&self) -> bool {
        let running = self.running();
        running < self.inner.config.task_slots
            && (running == 0 || self.others_load() <= self.inner.config.max_load)
    }

    async fn claim_round(&self, stop: &CancellationToken) {
        let now = Instant::now();
        let candidates: Vec<(JobId, PeerId)> = {
            let mut known = lock(&self.inner.known);
            known.retain(|_, k| now.duration_since(k.heard) < FORGET_AFTER);
            let mine = self.exec_names();
            let mut list: Vec<(JobId, PeerId)> = known
                .iter()
                .filter(|(_, k)| !k.done && k.next_ask <= now)
                .filter(|(_, k)| k.exec.iter().all(|e| mine.contains(e)))
                .map(|(id, k)| (*id, k.coordinator))
                .collect();
            list.sort();
            list
        };
        for (job, coordinator) in candidates {
            while self.has_room() && !stop.is_cancelled() {
                let Some(prepared) = self.prepare(job, coordinator).await else {
                    break;
                };
                let request = JobRequest::Claim {
                    job,
                    near: self.near_peers(),
                    exec: self.exec_names(),
                };
                match self.call(coordinator, request).await {
                    Ok(JobResponse::Granted {
                        task,
                        attempt,
                        lease_ms,
                        work,
                    }) => {
                        self.inner.running.fetch_add(1, Ordering::Relaxed);
                        if let Some(k) = lock(&self.inner.known).get_mut(&job) {
                            k.idle_backoff = POLL;
                        }
                        let this = self.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            this.run_task(
                                job,
                                coordinator,
                                prepared,
                                task,
                                attempt,
                                lease_ms,
                                work,
                                stop,
                            )
                            .await;
                            this.inner.running.fetch_sub(1, Ordering::Relaxed);
                            this.inner.wake.notify_one();
                        });
                    }
                    Ok(JobResponse::NoWork { ended }) => {
                        self.idle(job, ended);
                        break;
                    }
                    Ok(JobResponse::UnknownJob) => {
                        self.idle(job, true);
                        break;
                    }
                    Ok(other) => {
                        debug!(%job, answer = ?other, "unexpected answer to a claim");
                        self.idle(job, false);
                        break;
                    }
                    Err(e) => {
                        debug!(%job, %coordinator, error = %e, "claim failed");
                        self.idle(job, false);
                        break;
                    }
                }
            }
        }
    }

    fn idle(&self, job: JobId, done: bool) {
        if let Some(k) = lock(&self.inner.known).get_mut(&job) {
            k.done |= done;
            k.next_ask = Instant::now() + k.idle_backoff;
            k.idle_backoff = (k.idle_backoff * 2).min(MAX_IDLE_BACKOFF);
        }
    }

    /// The job's spec and pipeline, fetched from its coordinator once.
    async fn prepare(&self, job: JobId, coordinator: PeerId) -> Option<Arc<Prepared>> {
        if let Some(p) = lock(&self.inner.known)
            .get(&job)
            .and_then(|k| k.prepared.clone())
        {
            return Some(p);
        }
        let answer = self.call(coordinator, JobRequest::Spec { job }).await;
        let prepared = match answer {
            Ok(JobResponse::Spec { spec }) => match JobSpec::decode(&spec) {
                Ok(spec) if spec.id() == job => match parse_pipeline(&spec) {
                    Ok(pipeline) => Some(Arc::new(Prepared { spec, pipeline })),
                    Err(e) => {
                        warn!(%job, error = %e, "cannot run a job's pipeline here");
                        None
                    }
                },
                Ok(_) => {
                    warn!(%job, %coordinator, "coordinator sent a spec that is not the job's");
                    None
                }
                Err(e) => {
                    warn!(%job, error = %e, "bad job spec from the coordinator");
                    None
                }
            },
            Ok(JobResponse::UnknownJob) => {
                self.idle(job, true);
                return None;
            }
            Ok(_) | Err(_) => None,
        };
        match &prepared {
            Some(p) => {
                if let Some(k) = lock(&self.inner.known).get_mut(&job) {
                    k.prepared = Some(Arc::clone(p));
                }
            }
            None => self.idle(job, false),
        }
        prepared
    }

    /// Peers within this node's near band (for the coordinator's locality choice).
    fn near_peers(&self) -> Vec<NodeId> {
        self.inner
            .mesh
            .nearest_peers(MAX_NEAR)
            .into_iter()
            .map(|p| NodeId(p.to_bytes()))
            .collect()
    }

    /// The coordinator of a job this node heard of.
    pub fn coordinator_of(&self, job: &JobId) -> Option<PeerId> {
        lock(&self.inner.coordinators).get(job).copied()
    }

    /// Sends a job-protocol request to `coordinator` (a direct call when it is this node).
    pub async fn call(
        &self,
        coordinator: PeerId,
        request: JobRequest,
    ) -> Result<JobResponse, String> {
        if coordinator == self.me() {
            return Ok(self
                .inner
                .coordinator
                .handle(NodeId(coordinator.to_bytes()), request));
        }
        let frame = Frame::new(ControlRequest::Job(request));
        match self.inner.mesh.network().control(coordinator, frame).await {
            Ok(Frame {
                header: ControlResponse::Job(answer),
                ..
            }) => Ok(answer),
            Ok(Frame { header, .. }) => Err(format!("{coordinator} answered {header:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_task(
        &self,
        job: JobId,
        coordinator: PeerId,
        prepared: Arc<Prepared>,
        task: u32,
        attempt: u32,
        lease_ms: u64,
        work: Work,
        stop: CancellationToken,
    ) {
        let lost = CancellationToken::new();
        let renewer = {
            let this = self.clone();
            let lost = lost.clone();
            let every = Duration::from_millis((lease_ms / 3).max(200));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let answer = this
                        .call(coordinator, JobRequest::Renew { job, task, attempt })
                        .await;
                    match answer {
                        Ok(JobResponse::Renewed) => {}
                        Ok(JobResponse::Lost | JobResponse::UnknownJob) => {
                            lost.cancel();
                            break;
                        }
                        // Unreachable for now: keep working; the lease may still hold.
                        Ok(_) | Err(_) => {}
                    }
                }
            })
        };
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => None,
            () = lost.cancelled() => None,
            result = self.execute(Arc::clone(&prepared), work) => Some(result),
        };
        renewer.abort();
        let Some(result) = result else {
            debug!(%job, task, attempt, "task stopped: lease lost or node stopping");
            return;
        };
        match &result {
            Ok(_) => debug!(%job, task, attempt, elapsed = ?started.elapsed(), "task done"),
            Err(e) => warn!(%job, task, attempt, error = %e, "task attempt failed"),
        }
        let request = match result {
            Ok(output) => JobRequest::Finish {
                job,
                task,
                attempt,
                result: Ok(Box::new(output)),
            },
            Err(Failure::Error(error)) => JobRequest::Finish {
                job,
                task,
                attempt,
                result: Err(error),
            },
            Err(Failure::InputsLost { maps, error }) => JobRequest::InputsLost {
                job,
                task,
                attempt,
                maps,
                error,
            },
        };
        for tries in 1..=FINISH_TRIES {
            match self.call(coordinator, request.clone()).await {
                Ok(_) => return,
                Err(e) if tries == FINISH_TRIES => {
                    info!(%job, task, error = %e, "cannot report a task to its coordinator; its lease will expire");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await,
            }
        }
    }

    /// Runs one task: read, process, write.
    async fn execute(&self, prepared: Arc<Prepared>, work: Work) -> Result<TaskOutput, Failure> {
        let mesh = &self.inner.mesh;
        let redundancy = prepared.spec.output;
        match work {
            Work::Map {
                input,
                chunk,
                format,
                csv_header,
            } => {
                let started = Instant::now();
                let (manifest, record) = mesh
                    .open(input)
                    .await
                    .map_err(|e| format!("opening input {input}: {e}"))?;
                let data = mesh
                    .read_chunk(&manifest, record.as_ref(), chunk as usize)
                    .await
                    .map_err(|e| format!("reading chunk {chunk} of {input}: {e}"))?;
                let read = StageStat {
                    stage: "read".into(),
                    nanos: started.elapsed().as_nanos() as u64,
                    bytes_in: data.len() as u64,
                    ..Default::default()
                };
                if let Some(name) = prepared.pipeline.exec_name() {
                    let config = self
                        .inner
                        .exec
                        .get(name)
                        .ok_or_else(|| format!("exec:{name} is not registered on this node"))?;
                    let started = Instant::now();
                    let out = exec::run(config, data.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    let ran = StageStat {
                        stage: format!("exec:{name}"),
                        nanos: started.elapsed().as_nanos() as u64,
                        bytes_in: data.len() as u64,
                        ..Default::default()
                    };
                    let out = Bytes::from(out);
                    let chunks =
                        cut_all(&out, ChunkerSpec::default()).map_err(|e| e.to_string())?;
                    let (output, write) = self
                        .write(chunks, redundancy, ChunkerSpec::default())
                        .await?;
                    return Ok(TaskOutput {
                        output,
                        partition_chunks: Vec::new(),
                        rejects: None,
                        stats: vec![read, ran, write],
                    });
                }
                let format = match format {
                    Some(RecordFormat::Jsonl) => Format::Jsonl,
                    Some(RecordFormat::Csv) => Format::Csv,
                    None => return Err(format!("input {input} is not record-chunked").into()),
                };
                let partitions = if prepared.pipeline.shuffles() {
                    prepared.spec.partitions
                } else {
                    0
                };
                let spec = ChunkerSpec::records(RecordFormat::Jsonl);
                let owned = Arc::clone(&prepared);
                let (mut mapped, packed) = tokio::task::spawn_blocking(move || {
                    let input = ChunkInput {
                        data: &data,
                        format,
                        csv_header: csv_header.as_deref(),
                        first_chunk: chunk == 0,
                    };
                    let mut mapped = owned
                        .pipeline
                        .run_map(&input, partitions.max(1))
                        .map_err(|e| e.to_string())?;
                    let packed = if partitions > 0 {
                        Some(pack_partitions(
                            std::mem::take(&mut mapped.partitions),
                            spec,
                        )?)
                    } else {
                        None
                    };
                    Ok::<_, String>((mapped, packed))
                })
                .await
                .map_err(|e| format!("processing failed: {e}"))??;
                let mut stats = vec![read];
                stats.extend(std::mem::take(&mut mapped.stats).into_iter().map(wire_stat));
                let rejected = memchr::memchr_iter(b'\n', &mapped.rejects).count() as u64;
                let cut = cut_all(&Bytes::from(std::mem::take(&mut mapped.rejects)), spec)
                    .map_err(|e| e.to_string())?;
                // The output and the rejects are stored at once: the rejects' replicated put
                // waits on other nodes' synced writes, which need not hold up the output's.
                // The write stage is the wall time of both, plus the packing of the shuffle.
                let pack_nanos = packed.as_ref().map_or(0, |p| p.nanos);
                let writing = Instant::now();
                let output = async {
                    if let Some(packed) = packed {
                        // Shuffle outputs are read once, by the reduce tasks, and can be made
                        // again from the input: one copy, here, is enough. If this node dies
                        // before the reduce tasks read them, the coordinator runs the map task
                        // again.
                        let (output, write) = self
                            .write(packed.chunks, SHUFFLE_REDUNDANCY, ChunkerSpec::default())
                            .await?;
                        Ok::<_, String>((output, packed.counts, write))
                    } else {
                        let cut = cut_all(&Bytes::from(std::mem::take(&mut mapped.output)), spec)
                            .map_err(|e| e.to_string())?;
                        let (output, write) = self.write(cut, redundancy, spec).await?;
                        Ok((output, Vec::new(), write))
                    }
                };
                let (stored, stored_rejects) =
                    tokio::join!(output, self.write(cut, redundancy, spec));
                let (output, partition_chunks, mut write) = stored?;
                let (rejects, write_rejects) = stored_rejects?;
                write.bytes_in += write_rejects.bytes_in;
                write.nanos = writing.elapsed().as_nanos() as u64 + pack_nanos;
                stats.push(write);
                stats.push(StageStat {
                    stage: "rejected".into(),
                    records_out: rejected,
                    ..Default::default()
                });
                Ok(TaskOutput {
                    output,
                    partition_chunks,
                    rejects,
                    stats,
                })
            }
            Work::Reduce { partition, sources } => {
                let started = Instant::now();
                let packed = self.read_sources(partition, &sources).await?;
                let read = StageStat {
                    stage: "reduce read".into(),
                    nanos: started.elapsed().as_nanos() as u64,
                    bytes_in: packed.iter().map(|(_, c)| c.len() as u64).sum(),
                    ..Default::default()
                };
                // The merge runs on a blocking thread and hands the kept records over in
                // buffers, a few ahead of the write: no copy of the partition, packed or not,
                // is gathered.
                let (tx, mut rx) = tokio::sync::mpsc::channel(REDUCE_BUFFERS_AHEAD);
                let owned = Arc::clone(&prepared);
                let merging = tokio::task::spawn_blocking(move || {
                    merge_partition(&owned.pipeline, packed, tx)
                });
                let writing = Instant::now();
                // The first buffer tells whether there is any output at all.
                let written = match rx.recv().await {
                    None => Ok((None, write_stat(writing, 0))),
                    Some(first) => {
                        let rest = futures::stream::unfold(rx, |mut rx| async move {
                            rx.recv().await.map(|buffer| (buffer, rx))
                        });
                        let buffers = futures::stream::once(async { first }).chain(rest);
                        let reader = tokio_util::io::StreamReader::new(Box::pin(buffers));
                        let spec = ChunkerSpec::records(RecordFormat::Jsonl);
                        self.write_from(Chunker::new(reader, spec), 0, redundancy, spec)
                            .await
                    }
                };
                // The merge's failure first: it is why the write stopped, if it did.
                let merged = merging.await.map_err(|e| format!("reduce failed: {e}"))??;
                let (output, mut write) = written?;
                write.stage = "reduce write".into();
                // Each record is followed by its newline.
                write.bytes_in = merged.dedup.bytes_in + merged.dedup.records_out;
                write.nanos = write
                    .nanos
                    .saturating_sub(merged.dedup.nanos + merged.unpack_nanos);
                let unpack = StageStat {
                    stage: "reduce unpack".into(),
                    nanos: merged.unpack_nanos,
                    bytes_in: read.bytes_in,
                    ..Default::default()
                };
                let mut dedup = wire_stat(merged.dedup);
                dedup.stage = REDUCE_KEPT_STAGE.into();
                Ok(TaskOutput {
                    output,
                    partition_chunks: Vec::new(),
                    rejects: None,
                    stats: vec![read, unpack, dedup, write],
                })
            }
        }
    }

    /// Reads one reduce partition's share of every map output, in map-task order: each packed
    /// chunk with the map task that wrote it. A shuffle output has one holder; when it cannot
    /// be read, the holder is taken as gone, the other outputs it held are not asked for, and
    /// the failure names every map task whose output could not be read, so the coordinator
    /// runs them again.
    async fn read_sources(
        &self,
        partition: u32,
        sources: &[Source],
    ) -> Result<Vec<(u32, Bytes)>, Failure> {
        let mesh = &self.inner.mesh;
        let me = NodeId(mesh.network().local_peer_id().to_bytes());
        let mut reads = Vec::new();
        for source in sources {
            let manifest =
                Manifest::decode_verified(&source.part.record.object, &source.part.manifest)
                    .map_err(|e| format!("a map output's manifest: {e}"))?;
            let manifest = Arc::new(manifest);
            let record = Arc::new(source.part.record.clone());
            for index in source.first..source.first.saturating_add(source.count) {
                reads.push((
                    source.task,
                    Arc::clone(&manifest),
                    Arc::clone(&record),
                    index as usize,
                ));
            }
        }
        let gone: Mutex<HashSet<NodeId>> = Mutex::new(HashSet::new());
        let lost: Mutex<(BTreeSet<u32>, Option<String>)> = Mutex::new((BTreeSet::new(), None));
        let chunks: Vec<Option<(u32, Bytes)>> =
            futures::stream::iter(reads.into_iter().map(|(task, manifest, record, index)| {
                let gone = &gone;
                let lost = &lost;
                let me = &me;
                async move {
                    let holders: Vec<NodeId> = record.holders_of(index).cloned().collect();
                    if !holders.is_empty() && holders.iter().all(|h| lock(gone).contains(h)) {
                        lock(lost).0.insert(task);
                        return None;
                    }
                    match mesh.read_chunk(&manifest, Some(&record), index).await {
                        Ok(bytes) => Some((task, bytes)),
                        Err(e) => {
                            lock(gone).extend(holders.into_iter().filter(|h| h != me));
                            let mut lost = lock(lost);
                            lost.0.insert(task);
                            lost.1.get_or_insert_with(|| {
                                format!("reading a map output for partition {partition}: {e}")
                            });
                            None
                        }
                    }
                }
            }))
            .buffered(REDUCE_READ_WINDOW)
            .collect()
            .await;
        let (maps, error) = lost.into_inner().unwrap_or_else(|e| e.into_inner());
        if !maps.is_empty() {
            return Err(Failure::InputsLost {
                maps: maps.into_iter().collect(),
                error: error.unwrap_or_else(|| "a holder is gone".into()),
            });
        }
        Ok(chunks.into_iter().flatten().collect())
    }

    /// Stores a task's output chunks as one object (nothing for no chunks), unannounced.
    async fn write(
        &self,
        chunks: Vec<Bytes>,
        redundancy: Redundancy,
        chunker: ChunkerSpec,
    ) -> Result<(Option<Part>, StageStat), String> {
        let bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if chunks.is_empty() {
            return Ok((None, write_stat(Instant::now(), 0)));
        }
        self.write_from(PreCut(chunks.into()), bytes, redundancy, chunker)
            .await
    }

    /// Stores the chunks `source` yields (`bytes` in all) as one object, unannounced.
    async fn write_from(
        &self,
        source: impl ChunkSource,
        bytes: u64,
        redundancy: Redundancy,
        chunker: ChunkerSpec,
    ) -> Result<(Option<Part>, StageStat), String> {
        let started = Instant::now();
        let options = PutOptions {
            name: None,
            redundancy,
            chunker,
            created_ms: Some(0),
        };
        let written = self
            .inner
            .mesh
            .put_chunks(
                source,
                options,
                redundancy.default_write_quorum(),
                // The coordinator learns where a task output is from the answer, and the job's
                // composed objects, which are made of its chunks, are announced.
                Announce::Never,
            )
            .await
            .map_err(|e| format!("storing the output: {e}"))?;
        Ok((
            Some(Part {
                manifest: written.manifest.encode(),
                record: written.record,
            }),
            write_stat(started, bytes),
        ))
    }
}

/// What a reduce task's merge did.
struct Merged {
    /// `dedup`: lines in, records kept out, their bytes; its time leaves out unpacking and
    /// waiting on the write.
    dedup: super::processors::StageStat,
    unpack_nanos: u64,
}

/// Merges a reduce partition's packed inputs (each with the map task that wrote it) and sends
/// the kept records to `tx` in buffers of about [`REDUCE_BUFFER`] bytes. An input that does not
/// unpack names its map task, whose output is then taken as lost; any failure is also sent down
/// `tx`, so that the write of what came before it fails rather than storing a short output.
fn merge_partition(
    pipeline: &Pipeline,
    packed: Vec<(u32, Bytes)>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<Merged, Failure> {
    let result = merge_into(pipeline, packed, &tx);
    if let Err(e) = &result {
        let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
    }
    result
}

fn merge_into(
    pipeline: &Pipeline,
    packed: Vec<(u32, Bytes)>,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<Merged, Failure> {
    let started = Instant::now();
    let tasks: Vec<u32> = packed.iter().map(|(task, _)| *task).collect();
    let lost = |task: u32, error: String| Failure::InputsLost {
        maps: vec![task],
        error: format!("the shuffle output of map task {task}: {error}"),
    };
    let failed = |e: TaskError| match e {
        TaskError::ReduceRead { input, message } => {
            lost(tasks.get(input).copied().unwrap_or_default(), message)
        }
        other => Failure::Error(other.to_string()),
    };
    let mut inputs = Vec::with_capacity(packed.len());
    for (task, bytes) in packed {
        inputs.push(shuffle::Blocks::new(bytes).map_err(|e| match e {
            // Another version of meshd ran the map task: running it again may well land on
            // that node again, so this is a failed attempt, which counts, not a lost output,
            // which does not.
            shuffle::UnpackError::Format(_) => {
                Failure::Error(format!("the shuffle output of map task {task}: {e}"))
            }
            e => lost(task, e.to_string()),
        })?);
    }
    let mut reducer = pipeline.reducer(inputs).map_err(failed)?;
    let mut waited = Duration::ZERO;
    loop {
        let mut buffer = Vec::with_capacity(REDUCE_BUFFER + (64 << 10));
        let more = reducer.fill(&mut buffer, REDUCE_BUFFER).map_err(failed)?;
        if !buffer.is_empty() {
            let sending = Instant::now();
            let sent = tx.blocking_send(Ok(Bytes::from(buffer)));
            waited += sending.elapsed();
            if sent.is_err() {
                // The write stopped reading: it failed, and says why.
                break;
            }
        }
        if !more {
            break;
        }
    }
    let unpack_nanos: u64 = reducer.inputs().iter().map(shuffle::Blocks::nanos).sum();
    let busy = started.elapsed().saturating_sub(waited).as_nanos() as u64;
    Ok(Merged {
        dedup: reducer.stat(busy.saturating_sub(unpack_nanos)),
        unpack_nanos,
    })
}

/// A map task's shuffle output, cut and packed for storing.
struct Packed {
    chunks: Vec<Bytes>,
    /// Chunks per partition.
    counts: Vec<u32>,
    /// Time spent cutting and compressing.
    nanos: u64,
}

/// Cuts each partition's shuffle lines into record-aligned chunks and compresses each chunk
/// ([`shuffle::pack`]), partition after partition.
fn pack_partitions(partitions: Vec<Vec<u8>>, spec: ChunkerSpec) -> Result<Packed, String> {
    let started = Instant::now();
    let mut chunks = Vec::new();
    let mut counts = Vec::with_capacity(partitions.len());
    for p in partitions {
        let cut = cut_all(&Bytes::from(p), spec).map_err(|e| e.to_string())?;
        counts.push(cut.len() as u32);
        chunks.extend(cut.iter().map(|c| shuffle::pack(c)));
    }
    Ok(Packed {
        chunks,
        counts,
        nanos: started.elapsed().as_nanos() as u64,
    })
}

/// A processor's stage timing as the job protocol carries it.
fn wire_stat(s: super::processors::StageStat) -> StageStat {
    StageStat {
        stage: s.stage,
        nanos: s.nanos,
        records_in: s.records_in,
        records_out: s.records_out,
        bytes_in: s.bytes_in,
    }
}

fn write_stat(started: Instant, bytes: u64) -> StageStat {
    StageStat {
        stage: "write".into(),
        nanos: started.elapsed().as_nanos() as u64,
        bytes_in: bytes,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::processors::StageSpec;

    fn dedup_pipeline() -> Pipeline {
        let params: BTreeMap<String, String> = [("key", "id"), ("ts", "ts")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Pipeline::parse(&[StageSpec {
            processor: "dedup",
            params: &params,
        }])
        .unwrap()
    }

    /// The id of record `i` of map task `t`: many repeat across tasks.
    fn key_of(t: usize, i: usize) -> usize {
        (i * 7 + t * 13) % 20_000
    }

    /// Map outputs of partition 0 (one partition), one per map task, from `tasks` chunks of
    /// 3,000 generated records.
    fn map_outputs(pipeline: &Pipeline, tasks: usize) -> Vec<Vec<u8>> {
        (0..tasks)
            .map(|t| {
                let mut input = Vec::new();
                for i in 0..3000 {
                    let id = key_of(t, i);
                    let line = format!(
                        "{{\"id\":\"u{id:05}\",\"ts\":{},\"pad\":\"{}\"}}\n",
                        i % 11,
                        "x".repeat(i % 50)
                    );
                    input.extend_from_slice(line.as_bytes());
                }
                let chunk = ChunkInput {
                    data: &input,
                    format: Format::Jsonl,
                    csv_header: None,
                    first_chunk: true,
                };
                let mut out = pipeline.run_map(&chunk, 1).unwrap();
                out.partitions.remove(0)
            })
            .collect()
    }

    /// Runs [`merge_partition`] on a thread of its own, as the worker does, and gathers what it
    /// sends.
    fn merge(
        pipeline: Pipeline,
        packed: Vec<(u32, Bytes)>,
    ) -> (Result<Merged, Failure>, Vec<std::io::Result<Bytes>>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(REDUCE_BUFFERS_AHEAD);
        let merging = std::thread::spawn(move || merge_partition(&pipeline, packed, tx));
        let mut sent = Vec::new();
        while let Some(buffer) = rx.blocking_recv() {
            sent.push(buffer);
        }
        (merging.join().unwrap(), sent)
    }

    #[test]
    fn a_reduce_streams_what_the_in_memory_reduce_outputs() {
        let pipeline = dedup_pipeline();
        let outputs = map_outputs(&pipeline, 40);
        let slices: Vec<&[u8]> = outputs.iter().map(Vec::as_slice).collect();
        let expected = pipeline.run_reduce(&slices).unwrap();
        let packed: Vec<(u32, Bytes)> = outputs
            .iter()
            .enumerate()
            .map(|(t, o)| (t as u32, shuffle::pack(o)))
            .collect();
        // Every input spans several blocks.
        assert!(outputs.iter().all(|o| o.len() > 4 * shuffle::BLOCK));
        let (merged, sent) = merge(dedup_pipeline(), packed);
        let merged = merged.unwrap();
        let mut streamed = Vec::new();
        for buffer in sent {
            streamed.extend_from_slice(&buffer.unwrap());
        }
        assert!(streamed.len() > REDUCE_BUFFER, "{} bytes", streamed.len());
        assert_eq!(streamed, expected.output);
        assert_eq!(merged.dedup.records_in, 40 * 3000);
        let ids: HashSet<usize> = (0..40)
            .flat_map(|t| (0..3000).map(move |i| key_of(t, i)))
            .collect();
        assert_eq!(merged.dedup.records_out, ids.len() as u64);
        assert!(merged.unpack_nanos > 0);
    }

    #[test]
    fn a_shuffle_output_that_does_not_unpack_is_lost_and_the_stream_fails() {
        let pipeline = dedup_pipeline();
        let outputs = map_outputs(&pipeline, 3);
        let mut packed: Vec<(u32, Bytes)> = outputs
            .iter()
            .enumerate()
            .map(|(t, o)| (10 + t as u32, shuffle::pack(o)))
            .collect();
        // Map task 11's output is cut short: the merge finds out at its last block.
        let short = packed[1].1.slice(..packed[1].1.len() - 100);
        packed[1].1 = short;
        let (merged, sent) = merge(dedup_pipeline(), packed.clone());
        match merged {
            Err(Failure::InputsLost { maps, error }) => {
                assert_eq!(maps, [11]);
                assert!(error.contains("map task 11"), "{error}");
            }
            other => panic!("{:?}", other.map(|m| m.dedup)),
        }
        assert!(matches!(sent.last(), Some(Err(_))), "the write must fail");
        // Another version's format is a failed attempt, not a lost output.
        let mut old = packed[1].1.to_vec();
        old[0] = 1;
        packed[1].1 = Bytes::from(old);
        match merge(dedup_pipeline(), packed).0 {
            Err(Failure::Error(e)) => assert!(e.contains("another version"), "{e}"),
            other => panic!("{:?}", other.map(|m| m.dedup)),
        }
    }

    #[test]
    fn a_job_announced_running_again_after_it_ended_is_asked_for_work_at_once() {
        let now = Instant::now();
        let mut known = Known {
            coordinator: PeerId::random(),
            exec: Vec::new(),
            prepared: None,
            next_ask: now + MAX_IDLE_BACKOFF,
            idle_backoff: MAX_IDLE_BACKOFF,
            heard: now,
            done: false,
        };
        // Still running: the backoff of an idle job stands.
        let later = now + Duration::from_millis(10);
        known.heard_running(later);
        assert_eq!(known.next_ask, now + MAX_IDLE_BACKOFF);
        assert_eq!(known.heard, later);
        // Ended, then announced running again: ask now, from the shortest backoff.
        known.done = true;
        known.heard_running(later);
        assert!(!known.done);
        assert_eq!(known.next_ask, later);
        assert_eq!(known.idle_backoff, POLL);
    }
}
