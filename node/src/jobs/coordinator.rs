//! The coordinator: the node a job was submitted to keeps its state (in RocksDB, so that it
//! resumes after a restart), grants tasks to the nodes that ask, and makes the output.
//!
//! A job has one map task per input chunk and, when its pipeline shuffles (dedup), one reduce
//! task per partition that waits until every map task is done. A claim gets the pending task
//! with the best locality for the asking node: a chunk it holds, then one a peer in its near
//! band holds, then any; a task a live holder could run locally is held back from other
//! nodes for [`LOCALITY_WAIT`] first (delay scheduling). A grant is a lease the
//! worker renews; an expired lease returns the task to the queue, a failed attempt is retried
//! after an exponential backoff with jitter, and a task out of attempts is a dead letter. When
//! every task is done (or dead, for `on_failure = partial`), the coordinator composes the
//! tasks' outputs, in input order (partition order for reduce), into the output object; the
//! rejects likewise. The same spec over the same inputs always gives the same ObjectIds.
//!
//! Shuffle outputs have one copy, on the node that ran the map task. A reduce task that
//! cannot read some of them reports those map tasks ([`JobRequest::InputsLost`]), and so does
//! the tick when the peer table declares a node dead: those map tasks run again, reduce tasks
//! not yet granted wait for them, and the reduce attempt is not counted as a failure.
//!
//! Persistence, in the store's `jobs` column family: `j/<job>/h` the header (spec, inputs'
//! formats and holders), `j/<job>/t/<task>` each task's state, `j/<job>/e` the end. Lease
//! expiry times are not persisted: after a restart every lease gets a fresh term.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use mesh_proto::job::{
    Bottleneck, DeadLetter, JobAnnouncement, JobList, JobRequest, JobResponse, JobSpec, JobState,
    JobStatus, JobSummary, Locality, MAX_TASKS, NodeWork, OnFailure, Part, Source, StageReport,
    SubmitResponse, TaskCounts, TaskOutput, Work,
};
use mesh_proto::wire::{NodeId, PlacementRecord};
use mesh_proto::{ChunkerSpec, JobId, Manifest, ObjectId, RecordFormat, Redundancy};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::processors::{Pipeline, StageSpec as ParsedStage};
use crate::metrics::Metrics;
use crate::placement::Liveness;
use crate::replicate::compose::Composition;
use crate::replicate::{Mesh, MeshError};
use crate::store::{RocksStore, StoreError};

/// The reduce task's stage whose records out are the job's records written.
pub(crate) const REDUCE_KEPT_STAGE: &str = "reduce dedup";

/// How long a task another node holds the input of waits for that node before anyone may
/// take it.
pub const LOCALITY_WAIT: Duration = Duration::from_secs(3);
/// First retry delay of a failed attempt; doubled per attempt, up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a submit was refused, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Spec(#[from] mesh_proto::job::SpecError),
    #[error("{0}")]
    Invalid(String),
    #[error("input {0} was not found on this node or any other")]
    InputNotFound(ObjectId),
    #[error("job {0} is not coordinated by this node")]
    NotFound(JobId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 256 * 1024 * 1024 }>()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, codec()).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, codec())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::BadRecord {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: e.to_string(),
        })
}

fn job_prefix(job: &JobId) -> Vec<u8> {
    format!("j/{job}/").into_bytes()
}

fn header_key(job: &JobId) -> Vec<u8> {
    format!("j/{job}/h").into_bytes()
}

fn end_key(job: &JobId) -> Vec<u8> {
    format!("j/{job}/e").into_bytes()
}

fn task_key(job: &JobId, task: u32) -> Vec<u8> {
    let mut key = format!("j/{job}/t/").into_bytes();
    key.extend_from_slice(&task.to_be_bytes());
    key
}

/// What the coordinator learned about one input at submit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InputMeta {
    object: ObjectId,
    format: Option<RecordFormat>,
    csv_header: Option<Vec<u8>>,
    /// Per chunk: the nodes holding it (or a shard of it).
    holders: Vec<Vec<NodeId>>,
}

/// The persisted header of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    spec: Vec<u8>,
    submitted_ms: u64,
    inputs: Vec<InputMeta>,
}

/// The persisted end of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct End {
    state: JobState,
    ended_ms: u64,
    output: Option<ObjectId>,
    rejects: Option<ObjectId>,
    error: Option<String>,
}

/// What a task works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    Map { input: u32, chunk: u32 },
    Reduce { partition: u32 },
}

/// Where a task stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Status {
    /// A reduce task before the map phase has ended.
    Waiting,
    Pending,
    Leased {
        node: NodeId,
        attempt: u32,
        locality: Locality,
        /// Not persisted in meaning: reset at load.
        expires_ms: u64,
    },
    Done {
        node: NodeId,
        locality: Locality,
        output: Box<TaskOutput>,
    },
    Dead,
}

/// A task's state (persisted as one value).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Task {
    kind: Kind,
    status: Status,
    attempts: u32,
    not_before_ms: u64,
    pending_since_ms: u64,
    last_error: Option<String>,
    /// Failed attempts per node (for the report).
    failures: Vec<(NodeId, u32)>,
}

/// One job this node coordinates.
#[derive(Debug)]
struct Job {
    id: JobId,
    spec: JobSpec,
    spec_bytes: Vec<u8>,
    pipeline: Arc<Pipeline>,
    submitted_ms: u64,
    inputs: Vec<InputMeta>,
    tasks: Vec<Task>,
    map_tasks: usize,
    end: Option<End>,
    /// The output is being composed (the job ends when that returns).
    finishing: bool,
    attempts: u64,
    retries: u64,
    lease_expiries: u64,
    /// Map outputs lost after their task was done (so it ran again).
    lost_outputs: u64,
}

impl Job {
    fn shuffles(&self) -> bool {
        self.pipeline.shuffles()
    }

    fn state(&self) -> JobState {
        self.end.as_ref().map_or(JobState::Running, |e| e.state)
    }
}

/// The job coordinator of one node (cheap to clone).
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<RocksStore>,
    mesh: Mesh,
    metrics: Metrics,
    default_output: Redundancy,
    /// `exec:` processors this node's own config registers.
    local_exec: Vec<String>,
    jobs: Mutex<HashMap<JobId, Job>>,
    /// The dead peers whose shuffle outputs were last looked for (they are looked for again
    /// only when the set changes).
    dead_seen: Mutex<HashSet<NodeId>>,
}

/// Decides on and persists task changes under the jobs lock; returns what to write.
struct Writes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    fn task(&mut self, job: &JobId, index: usize, task: &Task) {
        self.0
            .push((task_key(job, index as u32), Some(encode(task))));
    }
}

impl Coordinator {
    /// Loads the jobs this node coordinates from the store.
    pub fn open(
        store: Arc<RocksStore>,
        mesh: Mesh,
        metrics: Metrics,
        default_output: Redundancy,
        local_exec: Vec<String>,
    ) -> Result<Self, StoreError> {
        let mut jobs = HashMap::new();
        let entries = store.job_scan(b"j/")?;
        let mut headers: BTreeMap<String, Header> = BTreeMap::new();
        let mut ends: HashMap<String, End> = HashMap::new();
        let mut tasks: HashMap<String, Vec<(u32, Task)>> = HashMap::new();
        for (key, value) in &entries {
            let text = String::from_utf8_lossy(key);
            let mut parts = text.splitn(3, '/');
            let (_, Some(job), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            match rest {
                "h" => {
                    headers.insert(job.to_owned(), decode(key, value)?);
                }
                "e" => {
                    ends.insert(job.to_owned(), decode(key, value)?);
                }
                _ if rest.starts_with("t/") && key.len() >= 4 => {
                    let index =
                        u32::from_be_bytes(key[key.len() - 4..].try_into().map_err(|_| {
                            StoreError::BadRecord {
                                key: text.clone().into_owned(),
                                reason: "bad task key".into(),
                            }
                        })?);
                    tasks
                        .entry(job.to_owned())
                        .or_default()
                        .push((index, decode(key, value)?));
                }
                _ => {}
            }
        }
        let now = now_ms();
        for (name, header) in headers {
            let spec = match JobSpec::decode(&header.spec) {
                Ok(spec) => spec,
                Err(e) => {
                    warn!(job = %name, error = %e, "cannot read a stored job spec; skipping it");
                    continue;
                }
            };
            let pipeline = match parse_pipeline(&spec) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    warn!(job = %name, error = %e, "a stored job no longer parses; skipping it");
                    continue;
                }
            };
            let mut list = tasks.remove(&name).unwrap_or_default();
            list.sort_by_key(|(i, _)| *i);
            let mut job_tasks: Vec<Task> = list.into_iter().map(|(_, t)| t).collect();
            for task in &mut job_tasks {
                if let Status::Leased { expires_ms, .. } = &mut task.status {
                    *expires_ms = now + spec.lease_ms;
                }
            }
            let map_tasks = job_tasks
                .iter()
                .filter(|t| matches!(t.kind, Kind::Map { .. }))
                .count();
            let id = spec.id();
            let end = ends.remove(&name);
            let attempts = job_tasks.iter().map(|t| u64::from(t.attempts)).sum();
            let job = Job {
                id,
                spec_bytes: header.spec,
                spec,
                pipeline,
                submitted_ms: header.submitted_ms,
                inputs: header.inputs,
                tasks: job_tasks,
                map_tasks,
                end,
                finishing: false,
                attempts,
                retries: 0,
                lease_expiries: 0,
                lost_outputs: 0,
            };
            if job.end.is_none() {
                info!(job = %id, "resuming a job after a restart");
            }
            jobs.insert(id, job);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                mesh,
                metrics,
                default_output,
                local_exec,
                jobs: Mutex::new(jobs),
                dead_seen: Mutex::new(HashSet::new()),
            }),
        })
    }

    fn me(&self) -> NodeId {
        self.inner.mesh.network().local_node_id()
    }

    fn persist(&self, writes: Writes) {
        if writes.0.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.job_write(&writes.0, false) {
            warn!(error = %e, "cannot persist job state");
        }
    }

    /// Checks and registers a job; the same spec again returns the existing job.
    pub async fn submit(
        &self,
        submit: mesh_proto::job::JobSubmit,
    ) -> Result<SubmitResponse, JobError> {
        let spec = submit.normalize(self.inner.default_output)?;
        let id = spec.id();
        if lock(&self.inner.jobs).contains_key(&id) {
            return Ok(SubmitResponse { id, new: false });
        }
        let pipeline = parse_pipeline(&spec)?;
        for name in spec.exec_processors() {
            if !self.offered(name) {
                return Err(JobError::Invalid(format!(
                    "no node offers the processor exec:{name} (register it under [processors.{name}] in a node's config)"
                )));
            }
        }
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        let mut total_chunks = 0usize;
        for &object in &spec.inputs {
            let (manifest, record) = match self.inner.mesh.open(object).await {
                Ok(found) => found,
                Err(MeshError::NotFound(_)) => return Err(JobError::InputNotFound(object)),
                Err(e) => return Err(e.into()),
            };
            let format = match manifest.chunker {
                ChunkerSpec::Records { format, .. } => Some(format),
                _ => None,
            };
            if format.is_none() && pipeline.exec_name().is_none() {
                return Err(JobError::Invalid(format!(
                    "input {object} was not put with record-aligned chunking (`meshctl put --records jsonl|csv`), so a task could see half a record"
                )));
            }
            let csv_header = match format {
                Some(RecordFormat::Csv) if !manifest.chunks.is_empty() => {
                    let first = self
                        .inner
                        .mesh
                        .read_chunk(&manifest, record.as_ref(), 0)
                        .await?;
                    Some(csv_header_line(&first))
                }
                _ => None,
            };
            let holders = chunk_holders(&manifest, record.as_ref());
            total_chunks += holders.len();
            inputs.push(InputMeta {
                object,
                format,
                csv_header,
                holders,
            });
        }
        let reduce = if pipeline.shuffles() {
            spec.partitions as usize
        } else {
            0
        };
        if total_chunks + reduce > MAX_TASKS {
            return Err(JobError::Invalid(format!(
                "the job would have {} tasks, more than the {MAX_TASKS} allowed",
                total_chunks + reduce
            )));
        }
        let now = now_ms();
        let mut tasks = Vec::with_capacity(total_chunks + reduce);
        for (i, input) in inputs.iter().enumerate() {
            for chunk in 0..input.holders.len() {
                tasks.push(Task {
                    kind: Kind::Map {
                        input: i as u32,
                        chunk: chunk as u32,
                    },
                    status: Status::Pending,
                    attempts: 0,
                    not_before_ms: 0,
                    pending_since_ms: now,
                    last_error: None,
                    failures: Vec::new(),
                });
            }
        }
        let map_tasks = tasks.len();
        for partition in 0..reduce {
            tasks.push(Task {
                kind: Kind::Reduce {
                    partition: partition as u32,
                },
                status: if map_tasks == 0 {
                    Status::Pending
                } else {
                    Status::Waiting
                },
                attempts: 0,
                not_before_ms: 0,
                pending_since_ms: now,
                last_error: None,
                failures: Vec::new(),
            });
        }
        let spec_bytes = spec.encode();
        let header = Header {
            spec: spec_bytes.clone(),
            submitted_ms: now,
            inputs: inputs.clone(),
        };
        let mut writes = Writes(vec![(header_key(&id), Some(encode(&header)))]);
        for (i, task) in tasks.iter().enumerate() {
            writes.task(&id, i, task);
        }
        let job = Job {
            id,
            spec: spec.clone(),
            spec_bytes,
            pipeline: Arc::new(pipeline),
            submitted_ms: now,
            inputs,
            tasks,
            map_tasks,
            end: None,
            finishing: false,
            attempts: 0,
            retries: 0,
            lease_expiries: 0,
            lost_outputs: 0,
        };
        {
            let mut jobs = lock(&self.inner.jobs);
            if jobs.contains_key(&id) {
                return Ok(SubmitResponse { id, new: false });
            }
            let store = Arc::clone(&self.inner.store);
            // Synced: a job acknowledged to the user survives a crash.
            store.job_write(&writes.0, true)?;
            jobs.insert(id, job);
        }
        info!(job = %id, processors = %spec.describe(), tasks = map_tasks + reduce, "job submitted");
        self.inner
            .metrics
            .counter("mesh_job_submitted_total")
            .increment(1);
        self.announce(id).await;
        // A job with nothing to do (empty inputs) ends at once.
        self.maybe_finish(id);
        Ok(SubmitResponse { id, new: true })
    }

    /// Whether this node or a live peer registers `exec:NAME`.
    fn offered(&self, name: &str) -> bool {
        self.inner.local_exec.iter().any(|n| n == name)
            || self.inner.mesh.network().peers().iter().any(|p| {
                p.liveness == Liveness::Alive
                    && p.load
                        .as_ref()
                        .is_some_and(|l| l.processors.iter().any(|n| n == name))
            })
    }

    /// Gossips a job's announcement.
    async fn announce(&self, id: JobId) {
        let announcement = {
            let jobs = lock(&self.inner.jobs);
            let Some(job) = jobs.get(&id) else { return };
            JobAnnouncement {
                job: id,
                coordinator: self.me(),
                exec: job
                    .spec
                    .exec_processors()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                running: job.end.is_none(),
            }
        };
        self.inner.mesh.network().announce_job(announcement).await;
    }

    /// Jobs this node coordinates that still run, with the `exec:` names they need.
    pub fn running(&self) -> Vec<(JobId, Vec<String>)> {
        lock(&self.inner.jobs)
            .values()
            .filter(|j| j.end.is_none())
            .map(|j| {
                (
                    j.id,
                    j.spec
                        .exec_processors()
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                )
            })
            .collect()
    }

    /// Answers a job-protocol request from `node`.
    pub fn handle(&self, node: NodeId, request: JobRequest) -> JobResponse {
        match request {
            JobRequest::Claim { job, near, exec } => self.claim(&node, job, &near, &exec),
            JobRequest::Renew { job, task, attempt } => self.renew(&node, job, task, attempt),
            JobRequest::Finish {
                job,
                task,
                attempt,
                result,
            } => self.finish(&node, job, task, attempt, result),
            JobRequest::Spec { job } => match lock(&self.inner.jobs).get(&job) {
                Some(j) => JobResponse::Spec {
                    spec: j.spec_bytes.clone(),
                },
                None => JobResponse::UnknownJob,
            },
            JobRequest::Status { job } => match self.status(job) {
                Ok(report) => JobResponse::Status(Box::new(report)),
                Err(_) => JobResponse::UnknownJob,
            },
            JobRequest::Cancel { job } => match self.cancel(job).and_then(|_| self.status(job)) {
                Ok(report) => JobResponse::Status(Box::new(report)),
                Err(_) => JobResponse::UnknownJob,
            },
            JobRequest::InputsLost {
                job,
                task,
                attempt,
                maps,
                error,
            } => self.inputs_lost(&node, job, task, attempt, &maps, &error),
        }
    }

    /// Counts map tasks run again because their shuffle output was lost.
    fn count_lost(&self, rerun: u64) {
        if rerun > 0 {
            self.inner
                .metrics
                .counter("mesh_job_lost_outputs_total")
                .increment(rerun);
        }
    }

    /// A reduce attempt could not read the shuffle outputs of `maps`: those map tasks run
    /// again, and the reduce tasks not yet running wait for them. The attempt is not a
    /// failure of the reduce task.
    fn inputs_lost(
        &self,
        node: &NodeId,
        id: JobId,
        index: u32,
        attempt: u32,
        maps: &[u32],
        error: &str,
    ) -> JobResponse {
        let now = now_ms();
        let mut writes = Writes(Vec::new());
        let rerun;
        {
            let mut jobs = lock(&self.inner.jobs);
            let Some(job) = jobs.get_mut(&id) else {
                return JobResponse::UnknownJob;
            };
            if job.end.is_some() {
                return JobResponse::Finished;
            }
            let current = match job.tasks.get(index as usize).map(|t| &t.status) {
                Some(Status::Leased {
                    node: n,
                    attempt: a,
                    ..
                }) => n == node && *a == attempt,
                _ => false,
            };
            if !current || (index as usize) < job.map_tasks {
                return JobResponse::Lost;
            }
            let maps: Vec<usize> = maps
                .iter()
                .map(|&m| m as usize)
                .filter(|&m| m < job.map_tasks)
                .collect();
            warn!(job = %id, task = index, lost = maps.len(), %error, "a reduce task lost map outputs; running those map tasks again");
            if let Some(task) = job.tasks.get_mut(index as usize) {
                task.status = Status::Waiting;
                task.last_error = Some(format!("map outputs lost: {error}"));
                writes.task(&id, index as usize, task);
            }
            rerun = rerun_maps(job, &maps, now, &mut writes);
        }
        self.persist(writes);
        self.count_lost(rerun);
        JobResponse::Finished
    }

    fn claim(&self, node: &NodeId, id: JobId, near: &[NodeId], exec: &[String]) -> JobResponse {
        let alive: HashSet<NodeId> = self
            .inner
            .mesh
            .network()
            .peers()
            .iter()
            .filter(|p| p.liveness == Liveness::Alive)
            .map(|p| NodeId(p.id.to_bytes()))
            .chain(std::iter::once(self.me()))
            .collect();
        let now = now_ms();
        let mut jobs = lock(&self.inner.jobs);
        let Some(job) = jobs.get_mut(&id) else {
            return JobResponse::UnknownJob;
        };
        if job.end.is_some() || job.finishing {
            return JobResponse::NoWork {
                ended: job.end.is_some(),
            };
        }
        if job
            .spec
            .exec_processors()
            .iter()
            .any(|name| !exec.iter().any(|e| e == name))
        {
            // This node cannot run the job's command: it should stop asking.
            return JobResponse::NoWork { ended: true };
        }
        let wait_ms = LOCALITY_WAIT.as_millis() as u64;
        let mut best: Option<(usize, Locality)> = None;
        for (i, task) in job.tasks.iter().enumerate() {
            if !matches!(task.status, Status::Pending) || task.not_before_ms > now {
                continue;
            }
            let locality = match task.kind {
                Kind::Map { input, chunk } => {
                    let holders = job
                        .inputs
                        .get(input as usize)
                        .and_then(|m| m.holders.get(chunk as usize))
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    if holders.contains(node) {
                        Locality::Local
                    } else {
                        // Delay scheduling: a task a live holder can run locally waits for it a
                        // little, whether this node is near its holders or not; on one LAN
                        // every peer is near, and stealing at once would halve locality.
                        let waited = now.saturating_sub(task.pending_since_ms) >= wait_ms;
                        let holder_alive = holders.iter().any(|h| alive.contains(h));
                        if holder_alive && !waited {
                            continue;
                        }
                        if holders.iter().any(|h| near.contains(h)) {
                            Locality::Near
                        } else {
                            Locality::Remote
                        }
                    }
                }
                Kind::Reduce { .. } => Locality::Remote,
            };
            let better = match best {
                None => true,
                Some((_, b)) => rank(locality) < rank(b),
            };
            if better {
                best = Some((i, locality));
                if locality == Locality::Local {
                    break;
                }
            }
        }
        let Some((index, locality)) = best else {
            return JobResponse::NoWork { ended: false };
        };
        let work = match work_of(job, index) {
            Ok(work) => work,
            Err(e) => {
                warn!(job = %id, task = index, error = %e, "cannot describe a task");
                return JobResponse::NoWork { ended: false };
            }
        };
        let lease_ms = job.spec.lease_ms;
        let task = &mut job.tasks[index];
        task.attempts += 1;
        let attempt = task.attempts;
        task.status = Status::Leased {
            node: node.clone(),
            attempt,
            locality,
            expires_ms: now + lease_ms,
        };
        job.attempts += 1;
        let mut writes = Writes(Vec::new());
        writes.task(&id, index, &job.tasks[index]);
        drop(jobs);
        self.persist(writes);
        self.inner
            .metrics
            .counter("mesh_job_claims_total")
            .increment(1);
        JobResponse::Granted {
            task: index as u32,
            attempt,
            lease_ms,
            work,
        }
    }

    fn renew(&self, node: &NodeId, id: JobId, task: u32, attempt: u32) -> JobResponse {
        let mut jobs = lock(&self.inner.jobs);
        let Some(job) = jobs.get_mut(&id) else {
            return JobResponse::UnknownJob;
        };
        if job.end.is_some() {
            return JobResponse::Lost;
        }
        let lease_ms = job.spec.lease_ms;
        let Some(t) = job.tasks.get_mut(task as usize) else {
            return JobResponse::Lost;
        };
        match &mut t.status {
            Status::Leased {
                node: holder,
                attempt: a,
                expires_ms,
                ..
            } if *holder == *node && *a == attempt => {
                *expires_ms = now_ms() + lease_ms;
                JobResponse::Renewed
            }
            _ => JobResponse::Lost,
        }
    }

    fn finish(
        &self,
        node: &NodeId,
        id: JobId,
        index: u32,
        attempt: u32,
        result: Result<Box<TaskOutput>, String>,
    ) -> JobResponse {
        let now = now_ms();
        let mut writes = Writes(Vec::new());
        let mut failed_job = None;
        {
            let mut jobs = lock(&self.inner.jobs);
            let Some(job) = jobs.get_mut(&id) else {
                return JobResponse::UnknownJob;
            };
            if job.end.is_some() {
                return JobResponse::Finished;
            }
            let partitions = if job.shuffles() {
                job.spec.partitions as usize
            } else {
                0
            };
            let max_attempts = job.spec.max_attempts;
            let is_map = index < job.map_tasks as u32;
            let Some(task) = job.tasks.get_mut(index as usize) else {
                return JobResponse::Lost;
            };
            let current = match &task.status {
                Status::Leased {
                    node: n,
                    attempt: a,
                    ..
                } => n == node && *a == attempt,
                _ => false,
            };
            match result {
                Ok(output) => {
                    if matches!(task.status, Status::Done { .. } | Status::Dead) {
                        // A late duplicate: the outputs are the same bytes.
                        return JobResponse::Finished;
                    }
                    if let Err(e) = check_output(&output, is_map, partitions) {
                        warn!(job = %id, task = index, %e, "a task reported an output that does not fit; retrying it");
                        task.status = Status::Pending;
                        task.pending_since_ms = now;
                        task.last_error = Some(e);
                        writes.task(&id, index as usize, task);
                    } else {
                        let locality = match &task.status {
                            Status::Leased { locality, .. } => *locality,
                            _ => Locality::Remote,
                        };
                        let records: u64 = output.stats.first().map_or(0, |s| s.records_in);
                        self.inner
                            .metrics
                            .counter("mesh_job_records_total")
                            .increment(records);
                        task.status = Status::Done {
                            node: node.clone(),
                            locality,
                            output,
                        };
                        writes.task(&id, index as usize, task);
                    }
                }
                Err(error) => {
                    if !current {
                        return JobResponse::Lost;
                    }
                    bump_failure(task, node);
                    task.last_error = Some(error.clone());
                    if failed_attempts(task) >= max_attempts {
                        task.status = Status::Dead;
                        self.inner
                            .metrics
                            .counter("mesh_job_dead_letters_total")
                            .increment(1);
                        warn!(job = %id, task = index, attempts = task.attempts, %error, "task is a dead letter");
                        if job.spec.on_failure == OnFailure::Fail {
                            failed_job = Some(format!(
                                "task {index} failed {} times; last error: {error}",
                                failed_attempts(task)
                            ));
                        }
                    } else {
                        task.status = Status::Pending;
                        task.pending_since_ms = now;
                        task.not_before_ms = now + backoff(&id, index, task.attempts);
                        job.retries += 1;
                        self.inner
                            .metrics
                            .counter("mesh_job_retries_total")
                            .increment(1);
                    }
                    writes.task(&id, index as usize, &job.tasks[index as usize]);
                }
            }
            if failed_job.is_none() {
                release_reduce(job, now, &mut writes);
            }
        }
        self.persist(writes);
        match failed_job {
            Some(error) => self.end(id, JobState::Failed, None, None, Some(error)),
            None => self.maybe_finish(id),
        }
        JobResponse::Finished
    }

    /// Returns expired leases to the queue (or to the dead letters); called every tick.
    pub fn expire_leases(&self) {
        let now = now_ms();
        let mut writes = Writes(Vec::new());
        let mut failed = Vec::new();
        let mut touched = Vec::new();
        let mut rerun = 0;
        // Peers declared dead: the shuffle outputs only they held are lost.
        let dead: HashSet<NodeId> = self
            .inner
            .mesh
            .network()
            .peers()
            .iter()
            .filter(|p| p.liveness == Liveness::Dead)
            .map(|p| NodeId(p.id.to_bytes()))
            .collect();
        let dead = {
            let mut seen = lock(&self.inner.dead_seen);
            if *seen == dead {
                HashSet::new()
            } else {
                seen.clone_from(&dead);
                dead
            }
        };
        {
            let mut jobs = lock(&self.inner.jobs);
            for job in jobs.values_mut().filter(|j| j.end.is_none()) {
                let lost = lost_map_outputs(job, &dead);
                if !lost.is_empty() {
                    warn!(job = %job.id, lost = lost.len(), "map outputs lost with a dead node; running those map tasks again");
                    rerun += rerun_maps(job, &lost, now, &mut writes);
                }
                let max_attempts = job.spec.max_attempts;
                let mut expired = 0;
                for (index, task) in job.tasks.iter_mut().enumerate() {
                    let Status::Leased {
                        node, expires_ms, ..
                    } = &task.status
                    else {
                        continue;
                    };
                    if *expires_ms > now {
                        continue;
                    }
                    let node = node.clone();
                    expired += 1;
                    let who = PeerId::from_bytes(&node.0)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|_| "?".into());
                    task.last_error = Some(format!("lease expired on {who}"));
                    bump_failure(task, &node);
                    if failed_attempts(task) >= max_attempts {
                        task.status = Status::Dead;
                        if job.spec.on_failure == OnFailure::Fail {
                            failed.push((
                                job.id,
                                format!(
                                    "task {index} used its {} attempts; last: lease expired on {who}",
                                    failed_attempts(task)
                                ),
                            ));
                        }
                    } else {
                        task.status = Status::Pending;
                        task.pending_since_ms = now;
                        task.not_before_ms = now;
                    }
                    writes.task(&job.id, index, task);
                }
                if expired > 0 {
                    job.lease_expiries += expired;
                    self.inner
                        .metrics
                        .counter("mesh_job_lease_expiries_total")
                        .increment(expired);
                    release_reduce(job, now, &mut writes);
                    touched.push(job.id);
                }
            }
        }
        self.persist(writes);
        self.count_lost(rerun);
        for (id, error) in &failed {
            self.end(*id, JobState::Failed, None, None, Some(error.clone()));
        }
        for id in touched {
            self.maybe_finish(id);
        }
        self.update_gauges();
    }

    /// Gossips every running job again (gossip is best effort; late joiners learn here).
    pub async fn announce_running(&self) {
        let ids: Vec<JobId> = self.running().into_iter().map(|(id, _)| id).collect();
        for id in ids {
            self.announce(id).await;
        }
    }

    /// Starts composing the output once every task is done (or dead, for partial jobs).
    fn maybe_finish(&self, id: JobId) {
        let parts = {
            let mut jobs = lock(&self.inner.jobs);
            let Some(job) = jobs.get_mut(&id) else { return };
            if job.end.is_some() || job.finishing {
                return;
            }
            let open = job
                .tasks
                .iter()
                .any(|t| !matches!(t.status, Status::Done { .. } | Status::Dead));
            if open {
                return;
            }
            job.finishing = true;
            let final_tasks: Vec<&Task> = if job.shuffles() {
                job.tasks[job.map_tasks..].iter().collect()
            } else {
                job.tasks[..job.map_tasks].iter().collect()
            };
            let outputs: Vec<Part> = final_tasks
                .iter()
                .filter_map(|t| match &t.status {
                    Status::Done { output, .. } => output.output.clone(),
                    _ => None,
                })
                .collect();
            let rejects: Vec<Part> = job.tasks[..job.map_tasks]
                .iter()
                .filter_map(|t| match &t.status {
                    Status::Done { output, .. } => output.rejects.clone(),
                    _ => None,
                })
                .collect();
            let dead = job.tasks.iter().any(|t| matches!(t.status, Status::Dead));
            let chunker = if job.pipeline.exec_name().is_some() {
                ChunkerSpec::default()
            } else {
                ChunkerSpec::records(RecordFormat::Jsonl)
            };
            (outputs, rejects, dead, job.spec.output, chunker)
        };
        let this = self.clone();
        tokio::spawn(async move {
            let (outputs, rejects, dead, redundancy, chunker) = parts;
            let compose = |parts: Vec<Part>, suffix: &'static str| {
                let this = this.clone();
                async move {
                    let mut decoded = Vec::with_capacity(parts.len());
                    for part in parts {
                        let manifest =
                            Manifest::decode_verified(&part.record.object, &part.manifest)
                                .map_err(|e| format!("a task output's manifest: {e}"))?;
                        decoded.push((manifest, part.record));
                    }
                    this.inner
                        .mesh
                        .compose(
                            &decoded,
                            Composition {
                                name: Some(format!("job-{id}{suffix}")),
                                chunker,
                                redundancy,
                                metadata: BTreeMap::from([("job".to_owned(), id.to_string())]),
                                created_ms: 0,
                            },
                        )
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            let has_rejects = !rejects.is_empty();
            let output = compose(outputs, ".jsonl").await;
            let rejects = if has_rejects {
                compose(rejects, ".rejects.jsonl").await.map(Some)
            } else {
                Ok(None)
            };
            match (output, rejects) {
                (Ok(output), Ok(rejects)) => {
                    let state = if dead {
                        JobState::Partial
                    } else {
                        JobState::Succeeded
                    };
                    this.end(id, state, Some(output), rejects, None);
                }
                (Err(e), _) | (_, Err(e)) => {
                    // Composing failed (holders unreachable): try again on the next event.
                    warn!(job = %id, error = %e, "cannot compose the job's output yet; retrying");
                    if let Some(job) = lock(&this.inner.jobs).get_mut(&id) {
                        job.finishing = false;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    this.maybe_finish(id);
                }
            }
        });
    }

    /// Ends a job and tells every node.
    fn end(
        &self,
        id: JobId,
        state: JobState,
        output: Option<ObjectId>,
        rejects: Option<ObjectId>,
        error: Option<String>,
    ) {
        let end = End {
            state,
            ended_ms: now_ms(),
            output,
            rejects,
            error,
        };
        {
            let mut jobs = lock(&self.inner.jobs);
            let Some(job) = jobs.get_mut(&id) else { return };
            if job.end.is_some() {
                return;
            }
            if let Err(e) = self
                .inner
                .store
                .job_write(&[(end_key(&id), Some(encode(&end)))], true)
            {
                warn!(job = %id, error = %e, "cannot persist the end of a job");
            }
            info!(job = %id, %state, output = ?end.output, "job ended");
            let report = report_of(job);
            let metrics = &self.inner.metrics;
            metrics
                .gauge("mesh_job_locality_ratio", None)
                .set(report.locality);
            let seconds = (end.ended_ms.saturating_sub(job.submitted_ms)) as f64 / 1000.0;
            if seconds > 0.0 {
                metrics
                    .gauge("mesh_job_records_per_second", None)
                    .set(report.records_in as f64 / seconds);
            }
            job.end = Some(end);
        }
        let this = self.clone();
        tokio::spawn(async move { this.announce(id).await });
        self.update_gauges();
    }

    /// Cancels a running job: its leases are lost at their next renewal.
    pub fn cancel(&self, id: JobId) -> Result<JobState, JobError> {
        let state = lock(&self.inner.jobs)
            .get(&id)
            .map(Job::state)
            .ok_or(JobError::NotFound(id))?;
        if state == JobState::Running {
            self.end(
                id,
                JobState::Cancelled,
                None,
                None,
                Some("cancelled".into()),
            );
            return Ok(JobState::Cancelled);
        }
        Ok(state)
    }

    /// The report `meshctl job status` shows.
    pub fn status(&self, id: JobId) -> Result<JobStatus, JobError> {
        let jobs = lock(&self.inner.jobs);
        let job = jobs.get(&id).ok_or(JobError::NotFound(id))?;
        let mut report = report_of(job);
        report.coordinator = self.inner.mesh.network().local_peer_id().to_string();
        Ok(report)
    }

    /// Every job this node coordinates, newest first.
    pub fn list(&self) -> JobList {
        let jobs = lock(&self.inner.jobs);
        let mut list: Vec<JobSummary> = jobs
            .values()
            .map(|j| JobSummary {
                id: j.id,
                state: j.state(),
                processors: j.spec.describe(),
                inputs: j.spec.inputs.len() as u64,
                tasks: j.tasks.len() as u64,
                done: j
                    .tasks
                    .iter()
                    .filter(|t| matches!(t.status, Status::Done { .. }))
                    .count() as u64,
                submitted_ms: j.submitted_ms,
                output: j.end.as_ref().and_then(|e| e.output),
            })
            .collect();
        list.sort_by(|a, b| b.submitted_ms.cmp(&a.submitted_ms).then(a.id.cmp(&b.id)));
        JobList { jobs: list }
    }

    /// Removes an ended job's state from this node (its output objects stay).
    pub fn forget(&self, id: JobId) -> Result<(), JobError> {
        let mut jobs = lock(&self.inner.jobs);
        match jobs.get(&id) {
            None => return Err(JobError::NotFound(id)),
            Some(j) if j.end.is_none() => {
                return Err(JobError::Invalid(format!(
                    "job {id} is still running; cancel it first"
                )));
            }
            Some(_) => {}
        }
        let keys: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .inner
            .store
            .job_scan(&job_prefix(&id))?
            .into_iter()
            .map(|(k, _)| (k, None))
            .collect();
        self.inner.store.job_write(&keys, false)?;
        jobs.remove(&id);
        Ok(())
    }

    fn update_gauges(&self) {
        let mut counts = TaskCounts::default();
        for job in lock(&self.inner.jobs).values().filter(|j| j.end.is_none()) {
            add_counts(&mut counts, job);
        }
        let m = &self.inner.metrics;
        for (state, value) in [
            ("waiting", counts.waiting),
            ("pending", counts.pending),
            ("leased", counts.leased),
            ("done", counts.done),
            ("dead", counts.dead),
        ] {
            m.gauge("mesh_job_tasks", Some(("state", state)))
                .set(value as f64);
        }
    }
}

fn rank(l: Locality) -> u8 {
    match l {
        Locality::Local => 0,
        Locality::Near => 1,
        Locality::Remote => 2,
    }
}

/// Attempts that failed (errors and expired leases). Attempts ended by lost map outputs, and
/// map tasks run again because their output was lost, do not count.
fn failed_attempts(task: &Task) -> u32 {
    task.failures.iter().map(|(_, n)| *n).sum()
}

/// Map tasks `maps`, done but with their shuffle output lost, run again; reduce tasks that
/// were released but not granted wait again for the map phase. Returns how many map tasks
/// were done and now run again (also added to the job's `lost_outputs`): a map task two
/// reduce tasks report is run and counted once.
fn rerun_maps(job: &mut Job, maps: &[usize], now: u64, writes: &mut Writes) -> u64 {
    let mut rerun = 0;
    for &m in maps {
        let Some(task) = job.tasks.get_mut(m) else {
            continue;
        };
        if matches!(task.status, Status::Done { .. }) {
            task.status = Status::Pending;
            task.pending_since_ms = now;
            task.not_before_ms = now;
            writes.task(&job.id, m, task);
            rerun += 1;
        }
    }
    if rerun == 0 {
        return 0;
    }
    job.lost_outputs += rerun;
    for index in job.map_tasks..job.tasks.len() {
        let task = &mut job.tasks[index];
        if matches!(task.status, Status::Pending) {
            task.status = Status::Waiting;
            writes.task(&job.id, index, task);
        }
    }
    rerun
}

/// Done map tasks of a shuffling job whose shuffle output has a chunk with no holder left
/// alive (every holder in `dead`), while some reduce task still needs it.
fn lost_map_outputs(job: &Job, dead: &HashSet<NodeId>) -> Vec<usize> {
    if !job.shuffles()
        || dead.is_empty()
        || job.tasks[job.map_tasks..]
            .iter()
            .all(|t| matches!(t.status, Status::Done { .. } | Status::Dead))
    {
        return Vec::new();
    }
    let mut lost = Vec::new();
    for (i, task) in job.tasks[..job.map_tasks].iter().enumerate() {
        let Status::Done { output, .. } = &task.status else {
            continue;
        };
        let Some(part) = &output.output else { continue };
        let Ok(manifest) = Manifest::decode_verified(&part.record.object, &part.manifest) else {
            continue;
        };
        let gone = chunk_holders(&manifest, Some(&part.record))
            .iter()
            .any(|holders| !holders.is_empty() && holders.iter().all(|h| dead.contains(h)));
        if gone {
            lost.push(i);
        }
    }
    lost
}

fn bump_failure(task: &mut Task, node: &NodeId) {
    match task.failures.iter_mut().find(|(n, _)| n == node) {
        Some((_, count)) => *count += 1,
        None => task.failures.push((node.clone(), 1)),
    }
}

/// Exponential backoff with jitter (±50%), deterministic per task and attempt.
fn backoff(job: &JobId, task: u32, attempt: u32) -> u64 {
    let base = BASE_BACKOFF.as_millis() as u64;
    let exp = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(MAX_BACKOFF.as_millis() as u64);
    let mut seed = Vec::with_capacity(40);
    seed.extend_from_slice(job.as_bytes());
    seed.extend_from_slice(&task.to_be_bytes());
    seed.extend_from_slice(&attempt.to_be_bytes());
    let h = blake3::hash(&seed);
    let r = u64::from(u16::from_le_bytes([h.as_bytes()[0], h.as_bytes()[1]]));
    capped / 2 + capped * r / 65_536
}

/// Once the map phase is over, reduce tasks may run.
fn release_reduce(job: &mut Job, now: u64, writes: &mut Writes) {
    if !job.shuffles() {
        return;
    }
    let maps_over = job.tasks[..job.map_tasks]
        .iter()
        .all(|t| matches!(t.status, Status::Done { .. } | Status::Dead));
    if !maps_over {
        return;
    }
    for index in job.map_tasks..job.tasks.len() {
        let task = &mut job.tasks[index];
        if matches!(task.status, Status::Waiting) {
            task.status = Status::Pending;
            task.pending_since_ms = now;
            writes.task(&job.id, index, task);
        }
    }
}

/// What task `index` works on.
fn work_of(job: &Job, index: usize) -> Result<Work, String> {
    let task = job.tasks.get(index).ok_or("no such task")?;
    match task.kind {
        Kind::Map { input, chunk } => {
            let meta = job
                .inputs
                .get(input as usize)
                .ok_or("task names an unknown input")?;
            Ok(Work::Map {
                input: meta.object,
                chunk,
                format: meta.format,
                csv_header: meta.csv_header.clone(),
            })
        }
        Kind::Reduce { partition } => {
            let mut sources = Vec::new();
            for (map, t) in job.tasks[..job.map_tasks].iter().enumerate() {
                let output = match &t.status {
                    Status::Done { output, .. } => output,
                    Status::Dead => continue,
                    _ => return Err(format!("map task {map} has not finished")),
                };
                let Some(part) = &output.output else { continue };
                let first: u32 = output
                    .partition_chunks
                    .iter()
                    .take(partition as usize)
                    .sum();
                let count = output
                    .partition_chunks
                    .get(partition as usize)
                    .copied()
                    .unwrap_or(0);
                if count > 0 {
                    sources.push(Source {
                        task: map as u32,
                        part: part.clone(),
                        first,
                        count,
                    });
                }
            }
            Ok(Work::Reduce { partition, sources })
        }
    }
}

/// Checks that a reported output fits the task (a shuffle output lists every partition).
fn check_output(output: &TaskOutput, is_map: bool, partitions: usize) -> Result<(), String> {
    if let Some(part) = &output.output {
        let manifest = Manifest::decode_verified(&part.record.object, &part.manifest)
            .map_err(|e| format!("output manifest: {e}"))?;
        part.record
            .validate(manifest.chunks.len())
            .map_err(|e| format!("output record: {e}"))?;
        if is_map && partitions > 0 {
            let listed: u64 = output.partition_chunks.iter().map(|&c| u64::from(c)).sum();
            if output.partition_chunks.len() != partitions || listed != manifest.chunks.len() as u64
            {
                return Err("shuffle output does not list its partitions".into());
            }
        }
    } else if output.partition_chunks.iter().any(|&c| c > 0) {
        return Err("partitions listed without an output".into());
    }
    if let Some(part) = &output.rejects {
        let manifest = Manifest::decode_verified(&part.record.object, &part.manifest)
            .map_err(|e| format!("rejects manifest: {e}"))?;
        part.record
            .validate(manifest.chunks.len())
            .map_err(|e| format!("rejects record: {e}"))?;
    }
    Ok(())
}

/// The nodes holding each chunk of an object (any shard of it, for `ec:`).
fn chunk_holders(manifest: &Manifest, record: Option<&PlacementRecord>) -> Vec<Vec<NodeId>> {
    let chunks = manifest.chunks.len();
    let Some(record) = record else {
        return vec![Vec::new(); chunks];
    };
    let per_chunk = match record.redundancy {
        Redundancy::Erasure { data, parity } => usize::from(data) + usize::from(parity),
        Redundancy::Replicas(_) => 1,
    };
    (0..chunks)
        .map(|c| {
            let mut nodes: Vec<NodeId> = Vec::new();
            for part in c * per_chunk..(c + 1) * per_chunk {
                for n in record.holders_of(part) {
                    if !nodes.contains(n) {
                        nodes.push(n.clone());
                    }
                }
            }
            nodes
        })
        .collect()
}

/// The first line of a CSV input (its header), without the line end.
fn csv_header_line(chunk: &[u8]) -> Vec<u8> {
    let end = memchr::memchr(b'\n', chunk).unwrap_or(chunk.len());
    let line = &chunk[..end];
    line.strip_suffix(b"\r").unwrap_or(line).to_vec()
}

/// Parses the spec's stages into a pipeline.
pub fn parse_pipeline(spec: &JobSpec) -> Result<Pipeline, JobError> {
    let stages: Vec<ParsedStage<'_>> = spec
        .stages
        .iter()
        .map(|s| ParsedStage {
            processor: &s.processor,
            params: &s.params,
        })
        .collect();
    Pipeline::parse(&stages).map_err(|e| JobError::Invalid(e.to_string()))
}

fn add_counts(counts: &mut TaskCounts, job: &Job) {
    for task in &job.tasks {
        match task.status {
            Status::Waiting => counts.waiting += 1,
            Status::Pending => counts.pending += 1,
            Status::Leased { .. } => counts.leased += 1,
            Status::Done { .. } => counts.done += 1,
            Status::Dead => counts.dead += 1,
        }
    }
}

fn node_name(node: &NodeId) -> String {
    PeerId::from_bytes(&node.0)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| hex::encode(&node.0))
}

/// Builds the report of a job.
fn report_of(job: &Job) -> JobStatus {
    let mut counts = TaskCounts::default();
    add_counts(&mut counts, job);
    let mut nodes: BTreeMap<String, NodeWork> = BTreeMap::new();
    let mut stages: Vec<StageReport> = Vec::new();
    let (mut map_done, mut map_local) = (0u64, 0u64);
    let mut rejected = 0u64;
    let mut dead_letters = Vec::new();
    for (index, task) in job.tasks.iter().enumerate() {
        for (node, failures) in &task.failures {
            let name = node_name(node);
            nodes
                .entry(name.clone())
                .or_insert_with(|| NodeWork {
                    node: name,
                    ..Default::default()
                })
                .failed_attempts += u64::from(*failures);
        }
        match &task.status {
            Status::Done {
                node,
                locality,
                output,
            } => {
                let name = node_name(node);
                let entry = nodes.entry(name.clone()).or_insert_with(|| NodeWork {
                    node: name,
                    ..Default::default()
                });
                entry.tasks += 1;
                match locality {
                    Locality::Local => entry.local += 1,
                    Locality::Near => entry.near += 1,
                    Locality::Remote => entry.remote += 1,
                }
                if matches!(task.kind, Kind::Map { .. }) {
                    map_done += 1;
                    if *locality == Locality::Local {
                        map_local += 1;
                    }
                }
                for stat in &output.stats {
                    if stat.stage == "rejected" {
                        rejected += stat.records_out;
                        continue;
                    }
                    let at = match stages.iter().position(|s| s.stage == stat.stage) {
                        Some(at) => at,
                        None => {
                            stages.push(StageReport {
                                stage: stat.stage.clone(),
                                ..Default::default()
                            });
                            stages.len() - 1
                        }
                    };
                    let s = &mut stages[at];
                    s.seconds += stat.nanos as f64 / 1e9;
                    s.records_in += stat.records_in;
                    s.records_out += stat.records_out;
                }
            }
            Status::Dead => dead_letters.push(DeadLetter {
                task: index as u32,
                what: match task.kind {
                    Kind::Map { input, chunk } => format!("map input {input} chunk {chunk}"),
                    Kind::Reduce { partition } => format!("reduce partition {partition}"),
                },
                attempts: task.attempts,
                error: task.last_error.clone().unwrap_or_default(),
            }),
            _ => {}
        }
    }
    let total: f64 = stages.iter().map(|s| s.seconds).sum();
    for s in &mut stages {
        s.share = if total > 0.0 { s.seconds / total } else { 0.0 };
        s.records_per_sec = if s.seconds > 0.0 {
            s.records_in as f64 / s.seconds
        } else {
            0.0
        };
    }
    let bottleneck = stages
        .iter()
        .max_by(|a, b| a.share.total_cmp(&b.share))
        .filter(|s| s.seconds > 0.0)
        .map(|s| Bottleneck {
            stage: s.stage.clone(),
            share: s.share,
            severity: severity(s.share).to_owned(),
        });
    // Records read are what the map side parsed; records written, what the last phase
    // wrote out (the reduce side's dedup kept, when the job shuffles).
    let records_in = stages
        .iter()
        .find(|s| s.stage == "parse")
        .map_or(0, |s| s.records_in);
    let final_encode = if job.shuffles() {
        REDUCE_KEPT_STAGE
    } else {
        "encode"
    };
    let records_out = stages
        .iter()
        .find(|s| s.stage == final_encode)
        .map_or(0, |s| s.records_out);
    let end = job.end.as_ref();
    JobStatus {
        id: job.id,
        state: job.state(),
        coordinator: String::new(),
        processors: job.spec.describe(),
        inputs: job.spec.inputs.clone(),
        submitted_ms: job.submitted_ms,
        ended_ms: end.map(|e| e.ended_ms),
        tasks: counts,
        map_tasks: job.map_tasks as u64,
        reduce_tasks: (job.tasks.len() - job.map_tasks) as u64,
        attempts: job.attempts,
        retries: job.retries,
        lease_expiries: job.lease_expiries,
        lost_outputs: job.lost_outputs,
        locality: if map_done > 0 {
            map_local as f64 / map_done as f64
        } else {
            0.0
        },
        nodes: nodes.into_values().collect(),
        stages,
        bottleneck,
        records_in,
        records_out,
        rejected,
        dead_letters,
        output: end.and_then(|e| e.output),
        rejects: end.and_then(|e| e.rejects),
        error: end.and_then(|e| e.error.clone()),
    }
}

/// How bad a bottleneck with this share of the time is.
pub fn severity(share: f64) -> &'static str {
    if share > 0.5 {
        "severe"
    } else if share > 0.35 {
        "moderate"
    } else if share > 0.25 {
        "minor"
    } else {
        "none"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let job = JobId::of(b"j");
        for attempt in 1..30 {
            let b = backoff(&job, 1, attempt);
            let base = (BASE_BACKOFF.as_millis() as u64)
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF.as_millis() as u64);
            assert!(
                b >= base / 2 && b <= base + base / 2,
                "{attempt}: {b} vs {base}"
            );
        }
        assert_ne!(
            backoff(&job, 1, 3),
            backoff(&job, 2, 3),
            "jitter differs per task"
        );
    }

    #[test]
    fn severity_follows_the_thresholds() {
        assert_eq!(severity(0.2), "none");
        assert_eq!(severity(0.3), "minor");
        assert_eq!(severity(0.4), "moderate");
        assert_eq!(severity(0.6), "severe");
    }

    #[test]
    fn a_csv_header_is_the_first_line() {
        assert_eq!(csv_header_line(b"a,b\r\n1,2\n"), b"a,b");
        assert_eq!(csv_header_line(b"a,b"), b"a,b");
    }
}
