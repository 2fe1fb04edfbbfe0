//! Jobs: the spec a user submits, its canonical identity, what nodes say to each other to
//! claim and finish tasks, and the report `meshctl job status` shows.
//!
//! A [`JobSubmit`] (JSON from `meshctl job submit` or a spec file) is normalized into a
//! [`JobSpec`] with every default filled in; the [`JobId`] is the BLAKE3 of the spec's
//! canonical bincode encoding, so the same spec submitted twice is the same job. The node
//! that receives it coordinates it. Workers claim one task at a time with [`JobRequest::Claim`]
//! and hold a lease they renew; a finished task reports its output parts, which the
//! coordinator concatenates, in input order, into the job's output object.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{JobId, ObjectId};
use crate::policy::{RecordFormat, Redundancy};
use crate::wire::{NodeId, PlacementRecord, WireError};

/// Version byte in front of a canonical spec encoding (part of what the JobId hashes).
pub const JOB_SPEC_VERSION: u8 = 1;
/// Most stages in one job.
pub const MAX_STAGES: usize = 8;
/// Most input objects of one job.
pub const MAX_INPUTS: usize = 1024;
/// Most parameters of one stage.
pub const MAX_PARAMS: usize = 64;
/// Longest parameter name or processor name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest parameter value (a JSON Schema, a mapping spec).
pub const MAX_PARAM_LEN: usize = 1024 * 1024;
/// Most reduce partitions.
pub const MAX_PARTITIONS: u32 = 4096;
/// Most attempts per task.
pub const MAX_ATTEMPTS: u32 = 100;
/// Shortest and longest lease.
pub const MIN_LEASE_MS: u64 = 1_000;
pub const MAX_LEASE_MS: u64 = 3_600_000;
/// Defaults a submit leaves out.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_LEASE_MS: u64 = 30_000;
pub const DEFAULT_PARTITIONS: u32 = 8;
/// Most tasks one job may have (map tasks are one per input chunk).
pub const MAX_TASKS: usize = 1_000_000;
/// Processors every node has built in; `exec:NAME` are registered per node.
pub const BUILTIN_PROCESSORS: [&str; 4] = ["validate", "map", "filter", "dedup"];
/// Prefix of registered command processors.
pub const EXEC_PREFIX: &str = "exec:";

/// One processing stage: a processor and its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub processor: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// What a job does when a task ends in the dead-letter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The job fails; no output object is made.
    #[default]
    Fail,
    /// The job finishes as `partial`, with the output of the tasks that succeeded.
    Partial,
}

/// A job as submitted: only the stages and inputs are required.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSubmit {
    /// One processor, or several applied in order (`validate`, then `dedup`).
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    /// Shorthand for a single stage.
    #[serde(default)]
    pub processor: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub inputs: Vec<ObjectId>,
    /// Redundancy of the output (default: the coordinator's configured default).
    #[serde(default)]
    pub output: Option<Redundancy>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Lease time, e.g. `30s`.
    #[serde(default)]
    pub lease: Option<String>,
    /// Reduce partitions for processors that shuffle by key (default 8).
    #[serde(default)]
    pub partitions: Option<u32>,
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
}

/// Why a submitted job is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("a job needs a processor (`--processor NAME` or `stages` in the spec)")]
    NoStages,
    #[error("give either `processor` and `params` or `stages`, not both")]
    BothForms,
    #[error("a job has at most {MAX_STAGES} stages, this one has {0}")]
    TooManyStages(usize),
    #[error("a job needs at least one input object (`--input ID`)")]
    NoInputs,
    #[error("a job has at most {MAX_INPUTS} inputs, this one has {0}")]
    TooManyInputs(usize),
    #[error("input {0} is named twice")]
    DuplicateInput(ObjectId),
    #[error("stage {stage}: {reason}")]
    Stage { stage: usize, reason: String },
    #[error("max_attempts must be 1..={MAX_ATTEMPTS}, got {0}")]
    Attempts(u32),
    #[error("lease {0:?} is not a duration between 1s and 1h (e.g. `30s`)")]
    Lease(String),
    #[error("partitions must be 1..={MAX_PARTITIONS}, got {0}")]
    Partitions(u32),
}

/// A normalized job: every default filled in. Its canonical encoding names the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub stages: Vec<StageSpec>,
    pub inputs: Vec<ObjectId>,
    pub output: Redundancy,
    pub max_attempts: u32,
    pub lease_ms: u64,
    pub partitions: u32,
    pub on_failure: OnFailure,
}

impl JobSubmit {
    /// Fills in the defaults and checks the bounds (processor parameters are checked by the
    /// node, which knows the processors).
    pub fn normalize(self, default_output: Redundancy) -> Result<JobSpec, SpecError> {
        let stages = match (self.processor, self.stages.is_empty()) {
            (Some(_), false) => return Err(SpecError::BothForms),
            (Some(processor), true) => vec![StageSpec {
                processor,
                params: self.params,
            }],
            (None, _) if !self.params.is_empty() && self.stages.is_empty() => {
                return Err(SpecError::NoStages);
            }
            (None, _) => self.stages,
        };
        if stages.is_empty() {
            return Err(SpecError::NoStages);
        }
        if stages.len() > MAX_STAGES {
            return Err(SpecError::TooManyStages(stages.len()));
        }
        for (i, stage) in stages.iter().enumerate() {
            let bad = |reason: String| SpecError::Stage {
                stage: i + 1,
                reason,
            };
            if stage.processor.is_empty() || stage.processor.len() > MAX_NAME_LEN {
                return Err(bad(format!(
                    "processor name must be 1..={MAX_NAME_LEN} bytes"
                )));
            }
            if stage.params.len() > MAX_PARAMS {
                return Err(bad(format!("at most {MAX_PARAMS} parameters")));
            }
            for (k, v) in &stage.params {
                if k.is_empty() || k.len() > MAX_NAME_LEN {
                    return Err(bad(format!(
                        "parameter name {k:?} must be 1..={MAX_NAME_LEN} bytes"
                    )));
                }
                if v.len() > MAX_PARAM_LEN {
                    return Err(bad(format!(
                        "parameter {k} is {} bytes, more than {MAX_PARAM_LEN}",
                        v.len()
                    )));
                }
            }
        }
        if self.inputs.is_empty() {
            return Err(SpecError::NoInputs);
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(SpecError::TooManyInputs(self.inputs.len()));
        }
        for (i, id) in self.inputs.iter().enumerate() {
            if self.inputs[..i].contains(id) {
                return Err(SpecError::DuplicateInput(*id));
            }
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(SpecError::Attempts(max_attempts));
        }
        let lease_ms = match &self.lease {
            None => DEFAULT_LEASE_MS,
            Some(text) => {
                let ms = humantime::parse_duration(text)
                    .map_err(|_| SpecError::Lease(text.clone()))?
                    .as_millis();
                if !(u128::from(MIN_LEASE_MS)..=u128::from(MAX_LEASE_MS)).contains(&ms) {
                    return Err(SpecError::Lease(text.clone()));
                }
                ms as u64
            }
        };
        let partitions = self.partitions.unwrap_or(DEFAULT_PARTITIONS);
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(SpecError::Partitions(partitions));
        }
        Ok(JobSpec {
            stages,
            inputs: self.inputs,
            output: self.output.unwrap_or(default_output),
            max_attempts,
            lease_ms,
            partitions,
            on_failure: self.on_failure.unwrap_or_default(),
        })
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 * 1024 * 1024 }>()
}

impl JobSpec {
    /// The canonical encoding: a version byte, then bincode (maps are ordered).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![JOB_SPEC_VERSION];
        // Plain data into a Vec cannot fail to serialize.
        out.extend(bincode::serde::encode_to_vec(self, config()).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or(WireError::Truncated("job spec"))?;
        if version != JOB_SPEC_VERSION {
            return Err(WireError::UnsupportedVersion { found: version });
        }
        let (spec, used): (JobSpec, usize) = bincode::serde::decode_from_slice(rest, config())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != rest.len() {
            return Err(WireError::TrailingBytes {
                extra: rest.len() - used,
            });
        }
        Ok(spec)
    }

    /// The job's identity: BLAKE3 of the canonical encoding.
    pub fn id(&self) -> JobId {
        JobId::of(&self.encode())
    }

    /// Names of the `exec:` processors the job needs.
    pub fn exec_processors(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter_map(|s| s.processor.strip_prefix(EXEC_PREFIX))
            .collect()
    }

    /// `validate | dedup`, for listings.
    pub fn describe(&self) -> String {
        self.stages
            .iter()
            .map(|s| s.processor.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// Gossiped by a coordinator every few seconds while a job runs, so that every node learns
/// of it and knows whom to ask for work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAnnouncement {
    pub job: JobId,
    pub coordinator: NodeId,
    /// `exec:` processor names the job needs: a node without them does not ask.
    pub exec: Vec<String>,
    /// False once the job has ended: nodes stop asking.
    pub running: bool,
}

/// Longest job announcement on the wire.
pub const MAX_ANNOUNCEMENT_LEN: usize = 16 * 1024;

impl JobAnnouncement {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![JOB_SPEC_VERSION];
        out.extend(bincode::serde::encode_to_vec(self, config()).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_ANNOUNCEMENT_LEN {
            return Err(WireError::TooLarge {
                part: "job announcement",
                len: bytes.len(),
                max: MAX_ANNOUNCEMENT_LEN,
            });
        }
        let (&version, rest) = bytes
            .split_first()
            .ok_or(WireError::Truncated("job announcement"))?;
        if version != JOB_SPEC_VERSION {
            return Err(WireError::UnsupportedVersion { found: version });
        }
        let (a, used): (JobAnnouncement, usize) = bincode::serde::decode_from_slice(rest, config())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != rest.len() {
            return Err(WireError::TrailingBytes {
                extra: rest.len() - used,
            });
        }
        if a.exec.len() > MAX_STAGES || a.exec.iter().any(|e| e.len() > MAX_NAME_LEN) {
            return Err(WireError::Malformed(
                "too many or too long exec names".into(),
            ));
        }
        Ok(a)
    }
}

/// An object a task wrote: its canonical manifest bytes and its placement record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub manifest: Vec<u8>,
    pub record: PlacementRecord,
}

/// Chunks `first..first + count` of a map task's shuffle output: one reduce partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The map task that wrote it, named back in [`JobRequest::InputsLost`].
    pub task: u32,
    pub part: Part,
    pub first: u32,
    pub count: u32,
}

/// What a granted task works on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// One chunk of one input object.
    Map {
        input: ObjectId,
        chunk: u32,
        /// Record format of the input (`None`: not record-chunked, for `exec:` only).
        format: Option<RecordFormat>,
        /// A CSV input's header line (it is only in the first chunk).
        csv_header: Option<Vec<u8>>,
    },
    /// One reduce partition over every map task's share of it, in map-task order.
    Reduce {
        partition: u32,
        sources: Vec<Source>,
    },
}

/// Timing and counts of one stage of one task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStat {
    pub stage: String,
    pub nanos: u64,
    pub records_in: u64,
    pub records_out: u64,
    pub bytes_in: u64,
}

/// What a finished task made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// The records (a map task without shuffle, a reduce task), or the shuffle output: the
    /// partitions one after another, `partition_chunks[p]` chunks each.
    pub output: Option<Part>,
    pub partition_chunks: Vec<u32>,
    /// Rejected records with their reasons.
    pub rejects: Option<Part>,
    pub stats: Vec<StageStat>,
}

/// How close a granted task's input was to the node that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locality {
    /// The node holds the input chunk.
    Local,
    /// A holder is within the node's near band.
    Near,
    /// Anything else, and reduce tasks.
    Remote,
}

/// Messages of the job protocol (carried by the control protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Give me a task of this job. `near` are the asking node's peers within its near band;
    /// `exec` the command processors it has.
    Claim {
        job: JobId,
        near: Vec<NodeId>,
        exec: Vec<String>,
    },
    /// I am still working on this task.
    Renew { job: JobId, task: u32, attempt: u32 },
    /// This attempt ended.
    Finish {
        job: JobId,
        task: u32,
        attempt: u32,
        result: Result<Box<TaskOutput>, String>,
    },
    /// Send me the job's spec.
    Spec { job: JobId },
    /// Send me the job's report (a node asked by `meshctl` for a job it does not coordinate).
    Status { job: JobId },
    /// Cancel the job (likewise) and send its report.
    Cancel { job: JobId },
    /// This attempt of a reduce task could not read the shuffle outputs of map tasks `maps`
    /// (their holder is gone): run those again. The attempt is not held against the task.
    InputsLost {
        job: JobId,
        task: u32,
        attempt: u32,
        maps: Vec<u32>,
        error: String,
    },
}

/// Answers of the job protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobResponse {
    Granted {
        task: u32,
        attempt: u32,
        lease_ms: u64,
        work: Work,
    },
    /// Nothing to give now; ask again later. `ended`: the job is over, stop asking.
    NoWork {
        ended: bool,
    },
    Renewed,
    /// The lease is gone (expired and granted again, or the job ended): stop the task.
    Lost,
    Finished,
    Spec {
        spec: Vec<u8>,
    },
    Status(Box<JobStatus>),
    UnknownJob,
}

/// State of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Succeeded,
    /// Finished with the output of the tasks that succeeded; others are dead letters.
    Partial,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn ended(self) -> bool {
        self != JobState::Running
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Partial => "partial",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

/// Answer to `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub id: JobId,
    /// False when the same spec was submitted before (the existing job is returned).
    pub new: bool,
}

/// Counts of tasks by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Reduce tasks waiting for the map phase.
    pub waiting: u64,
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
    pub dead: u64,
}

/// Work done by one node for a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWork {
    pub node: String,
    pub tasks: u64,
    pub local: u64,
    pub near: u64,
    pub remote: u64,
    pub failed_attempts: u64,
}

/// Aggregated time and throughput of one stage over the job's finished tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    pub seconds: f64,
    pub records_in: u64,
    pub records_out: u64,
    pub records_per_sec: f64,
    /// Share of all stages' time.
    pub share: f64,
}

/// The stage that took the largest share of the time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bottleneck {
    pub stage: String,
    pub share: f64,
    /// `none` (≤ 25%), `minor` (> 25%), `moderate` (> 35%), `severe` (> 50%).
    pub severity: String,
}

/// A task that used up its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub task: u32,
    /// `map input 2 chunk 7`, `reduce partition 3`.
    pub what: String,
    pub attempts: u32,
    pub error: String,
}

/// Answer to `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub state: JobState,
    pub coordinator: String,
    pub processors: String,
    pub inputs: Vec<ObjectId>,
    pub submitted_ms: u64,
    pub ended_ms: Option<u64>,
    pub tasks: TaskCounts,
    pub map_tasks: u64,
    pub reduce_tasks: u64,
    pub attempts: u64,
    pub retries: u64,
    pub lease_expiries: u64,
    /// Map tasks run again because their shuffle output was lost (its holder died).
    #[serde(default)]
    pub lost_outputs: u64,
    /// Share of finished map tasks that ran where their input chunk is.
    pub locality: f64,
    pub nodes: Vec<NodeWork>,
    pub stages: Vec<StageReport>,
    pub bottleneck: Option<Bottleneck>,
    pub records_in: u64,
    pub records_out: u64,
    pub rejected: u64,
    pub dead_letters: Vec<DeadLetter>,
    pub output: Option<ObjectId>,
    pub rejects: Option<ObjectId>,
    pub error: Option<String>,
}

/// One line of `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: JobId,
    pub state: JobState,
    pub processors: String,
    pub inputs: u64,
    pub tasks: u64,
    pub done: u64,
    pub submitted_ms: u64,
    pub output: Option<ObjectId>,
}

/// Answer to `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit() -> JobSubmit {
        JobSubmit {
            processor: Some("dedup".into()),
            params: BTreeMap::from([("key".into(), "id".into())]),
            inputs: vec![ObjectId::of(b"a")],
            ..Default::default()
        }
    }

    #[test]
    fn the_same_spec_is_the_same_job_and_defaults_are_part_of_it() {
        let a = submit().normalize(Redundancy::DEFAULT).unwrap();
        let b = submit().normalize(Redundancy::DEFAULT).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(a.lease_ms, DEFAULT_LEASE_MS);
        let mut other = submit();
        other.partitions = Some(3);
        assert_ne!(other.normalize(Redundancy::DEFAULT).unwrap().id(), a.id());
        assert_eq!(JobSpec::decode(&a.encode()).unwrap(), a);
        let mut bytes = a.encode();
        bytes.push(0);
        assert!(JobSpec::decode(&bytes).is_err());
    }

    #[test]
    fn bad_submits_name_their_problem() {
        let mut s = submit();
        s.inputs.clear();
        assert_eq!(s.normalize(Redundancy::DEFAULT), Err(SpecError::NoInputs));
        let mut s = submit();
        s.lease = Some("soon".into());
        assert!(
            s.normalize(Redundancy::DEFAULT)
                .unwrap_err()
                .to_string()
                .contains("soon")
        );
        let mut s = submit();
        s.max_attempts = Some(0);
        assert_eq!(
            s.normalize(Redundancy::DEFAULT),
            Err(SpecError::Attempts(0))
        );
        let mut s = submit();
        s.inputs.push(s.inputs[0]);
        assert!(matches!(
            s.normalize(Redundancy::DEFAULT),
            Err(SpecError::DuplicateInput(_))
        ));
        let mut s = submit();
        s.stages = vec![StageSpec {
            processor: "filter".into(),
            params: BTreeMap::new(),
        }];
        assert_eq!(s.normalize(Redundancy::DEFAULT), Err(SpecError::BothForms));
        let s = JobSubmit {
            inputs: vec![ObjectId::of(b"a")],
            ..Default::default()
        };
        assert_eq!(s.normalize(Redundancy::DEFAULT), Err(SpecError::NoStages));
    }

    #[test]
    fn announcements_round_trip_and_reject_garbage() {
        let a = JobAnnouncement {
            job: JobId::of(b"j"),
            coordinator: NodeId(vec![1, 2, 3]),
            exec: vec!["wc".into()],
            running: true,
        };
        assert_eq!(JobAnnouncement::decode(&a.encode()).unwrap(), a);
        assert!(JobAnnouncement::decode(&[9, 9, 9]).is_err());
        assert!(JobAnnouncement::decode(&[]).is_err());
    }
}
