//! The jobs scenario: a `validate` + `dedup` job over millions of JSONL records.
//!
//! `topologies/bench-jobs.toml`: three loopback nodes. The bench streams `--records` (default
//! 10 million) generated records of 200 bytes ([`super::records`]) as the chunked body of
//! `POST /v1/objects?records=jsonl&redundancy=rep:3` to the first node, timed until it
//! returns (write quorum) and until no node has an object still completing; that put is the
//! input and is not part of the job's time. Then one job goes to the first node (`POST
//! /v1/jobs`): `validate` against [`super::records::SCHEMA`], then `dedup` with key `id` and
//! timestamp `ts`, with the output policy and reduce partitions of the options. The bench
//! polls `GET /v1/jobs/{id}` until the job ends; the job's time is the coordinator's
//! `ended_ms - submitted_ms`, and the client's wall time from submit until it saw the end is
//! reported next to it. The job must succeed, read every record, reject exactly the invalid
//! ones and keep exactly one record per distinct valid id: the generator makes these counts
//! known from the record count alone. CPU time is utime + stime of the three meshd processes
//! from submit to end; peak RSS is VmHWM, reset at submit where the kernel allows it.
//!
//! The node stores hold the input three times, the map outputs and the job's output once per
//! copy of the output policy, and the stores' own overhead: 11.9 GB at the peak for 10
//! million records with a `rep:1` output, 9.4 GB for 5 million with `rep:3`. A run that
//! would not fit on the run directory's disk is refused before it starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use mesh_proto::api::PutResponse;
use mesh_proto::job::{Bottleneck, JobState, JobStatus, JobSubmit, StageReport, StageSpec};
use mesh_proto::policy::Redundancy;
use serde::Serialize;
use serde_json::json;

use super::markdown::{Table, num};
use super::records::{Expected, RECORD_LEN, Records, SCHEMA};
use super::stats::mb_per_s;
use super::{Api, Outcome, REDUNDANCY, Setup, cpu_ticks_of, procfs, progress};
use crate::driver::Driver;
use crate::state::{Mode, Role};

const TOPOLOGY: &str = include_str!("../../topologies/bench-jobs.toml");
const NAME: &str = "jobs";
/// The data stream of this scenario's records.
const STREAM: u64 = 3 << 32;
/// The goal: this many records...
const GOAL_RECORDS: u64 = 10_000_000;
/// ...through the job in at most this long.
const GOAL: Duration = Duration::from_secs(60);
/// Longest wait for one read or write on the upload's connection (the put answers only
/// after its last chunk reached the write quorum).
const PUT_IO_TIMEOUT: Duration = Duration::from_secs(600);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(1800);
const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often the job's status is asked for: often enough for the client's wall time, rarely
/// enough that building the report costs the coordinator nothing that matters.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// meshd refuses writes when its disk has less than this free (`net.min_free_space`); the
/// three loopback nodes share one disk.
const NODE_FREE_SPACE_RESERVE: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct Options {
    pub records: u64,
    /// Redundancy of what the job writes.
    pub output: Redundancy,
    /// Reduce partitions of `dedup`.
    pub partitions: u32,
}

#[derive(Debug, Serialize)]
struct Result {
    records: u64,
    record_bytes: usize,
    input_bytes: u64,
    nodes: Vec<String>,
    writer: String,
    input_redundancy: &'static str,
    input: String,
    input_chunks: u64,
    put_quorum_secs: f64,
    put_quorum_mb_s: f64,
    put_all_holders_secs: f64,
    put_all_holders_mb_s: f64,
    put_meshd_cpu_secs: f64,
    expected: Expected,
    job: String,
    processors: String,
    output_redundancy: String,
    partitions: u32,
    state: String,
    /// The coordinator's `ended_ms - submitted_ms`.
    job_secs: f64,
    /// From before the submit was sent until a poll saw the job ended.
    job_wall_secs: f64,
    /// Client-side, to a poll's resolution: from the submit until no reduce task waited for
    /// the map phase, and from then until the end.
    map_phase_secs: f64,
    reduce_phase_secs: f64,
    records_per_sec: f64,
    input_mb_per_sec: f64,
    map_tasks: u64,
    reduce_tasks: u64,
    attempts: u64,
    retries: u64,
    lease_expiries: u64,
    locality: f64,
    records_in: u64,
    records_out: u64,
    rejected: u64,
    dead_letters: usize,
    stages: Vec<StageReport>,
    bottleneck: Option<Bottleneck>,
    /// utime + stime of the three meshd processes from submit until the end was seen.
    job_meshd_cpu_secs: f64,
    /// That CPU time as a share of all cores over the client's wall time of the job.
    job_meshd_cpu_share: f64,
    /// After the job ended, until no node had an object still completing (the output's
    /// copies beyond the write quorum); not in the job's time.
    output_complete_secs: f64,
    goal: String,
    goal_met: bool,
    output: Option<String>,
    rejects: Option<String>,
    peak_rss_reset: bool,
    per_node: Vec<NodeUsage>,
}

#[derive(Debug, Serialize)]
struct NodeUsage {
    name: String,
    tasks: u64,
    local: u64,
    near: u64,
    remote: u64,
    failed_attempts: u64,
    job_cpu_secs: f64,
    job_peak_rss_bytes: u64,
}

pub fn run(setup: &Setup, options: &Options) -> anyhow::Result<Outcome> {
    let n = options.records.max(1);
    let input_bytes = n * RECORD_LEN as u64;
    let expected = Expected::of(n);
    check_disk(&setup.run_dir, input_bytes, options.output)?;
    let (driver, state) = Driver::up(
        &setup.run_dir,
        setup.bin_dir.as_deref(),
        "bench-jobs",
        TOPOLOGY,
        Mode::Loopback,
    )?;
    let run_dir = driver.run_dir().to_path_buf();
    progress(NAME, "waiting for the nodes to see each other");
    driver.wait_mesh(super::MESH_TIMEOUT)?;
    let nodes: Vec<_> = state
        .nodes
        .iter()
        .filter(|n| n.role == Role::Node)
        .cloned()
        .collect();
    let apis: Vec<Api> = nodes.iter().map(Api::of).collect::<anyhow::Result<_>>()?;
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n.pid.ok_or_else(|| anyhow!("{} has no pid", n.name)))
        .collect::<anyhow::Result<_>>()?;
    let [writer, ..] = apis.as_slice() else {
        bail!("the jobs topology has no node");
    };
    let ticks = procfs::clock_ticks();
    let secs = |t: u64| t as f64 / ticks.max(1) as f64;
    let mut problems = Vec::new();

    progress(
        NAME,
        &format!(
            "put {n} generated JSONL records ({:.0} MB; {} repeat an id, {} invalid) with {} on {}",
            input_bytes as f64 / 1e6,
            expected.repeats,
            expected.invalid,
            REDUNDANCY,
            writer.node
        ),
    );
    let cpu_put_start = cpu_ticks_of(&pids)?;
    let (put, counted, put_quorum) = put_records(writer, setup.seed, n, input_bytes)?;
    if counted != expected {
        problems.push(format!(
            "the generator made {counted:?}, not the {expected:?} the scenario checks against"
        ));
    }
    if put.size != input_bytes {
        problems.push(format!(
            "the input object has {} bytes, {input_bytes} were sent",
            put.size
        ));
    }
    progress(
        NAME,
        &format!(
            "put returned at its write quorum after {:.1} s ({:.0} MB/s); object {}, {} chunks",
            put_quorum.as_secs_f64(),
            mb_per_s(input_bytes, put_quorum),
            put.id,
            put.chunks
        ),
    );
    let completing = wait_complete(&apis, "third copies of the input")?;
    let put_all = put_quorum + completing;
    let put_cpu = secs(sum(&cpu_ticks_of(&pids)?) - sum(&cpu_put_start));
    progress(
        NAME,
        &format!(
            "every holder has the input after {:.1} s ({:.0} MB/s)",
            put_all.as_secs_f64(),
            mb_per_s(input_bytes, put_all)
        ),
    );

    let submit = JobSubmit {
        stages: vec![
            StageSpec {
                processor: "validate".into(),
                params: BTreeMap::from([("schema".into(), SCHEMA.into())]),
            },
            StageSpec {
                processor: "dedup".into(),
                params: BTreeMap::from([("key".into(), "id".into()), ("ts".into(), "ts".into())]),
            },
        ],
        inputs: vec![put.id],
        output: Some(options.output),
        partitions: Some(options.partitions),
        ..Default::default()
    };
    let body = serde_json::to_vec(&submit).context("cannot encode the job")?;
    progress(
        NAME,
        &format!(
            "submit validate | dedup (key id, ts ts) on {}: output {}, {} partitions",
            writer.node, options.output, options.partitions
        ),
    );
    let peak_rss_reset = pids.iter().all(|&p| procfs::reset_peak_rss(p));
    let cpu_job_start = cpu_ticks_of(&pids)?;
    let submitted = Instant::now();
    let mut http = writer.polling_client();
    let r = http
        .request_json("POST", "/v1/jobs", &body)
        .with_context(|| format!("cannot submit the job to {}", writer.node))?;
    if r.status != 200 {
        bail!(
            "POST /v1/jobs on {} answered {}: {}",
            writer.node,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let answer: mesh_proto::job::SubmitResponse = serde_json::from_slice(&r.body)
        .with_context(|| format!("the submit answered {}", String::from_utf8_lossy(&r.body)))?;
    if !answer.new {
        bail!(
            "{} already had job {}: the run directory was not fresh",
            writer.node,
            answer.id
        );
    }
    let (status, map_phase) = wait_job(writer, &mut http, &answer.id.to_string(), submitted)?;
    let job_wall = submitted.elapsed();
    let cpu_job_end = cpu_ticks_of(&pids)?;
    let rss: Vec<u64> = pids
        .iter()
        .map(|&p| procfs::peak_rss(p))
        .collect::<std::io::Result<_>>()
        .context("cannot read peak RSS")?;
    let job_secs = status.ended_ms.map_or(job_wall.as_secs_f64(), |end| {
        end.saturating_sub(status.submitted_ms) as f64 / 1e3
    });
    progress(
        NAME,
        &format!(
            "job {} after {job_secs:.1} s ({:.0} records/s); waiting for the output's third copies",
            status.state,
            n as f64 / job_secs.max(1e-9)
        ),
    );
    let output_complete = wait_complete(&apis, "third copies of the output")?;

    if status.state != JobState::Succeeded {
        problems.push(format!(
            "the job ended {}{}{}",
            status.state,
            status
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(": {e}")),
            status
                .dead_letters
                .first()
                .map_or(String::new(), |d| format!(
                    "; first dead letter: {} after {} attempts: {}",
                    d.what, d.attempts, d.error
                ))
        ));
    }
    for (what, got, want) in [
        (
            "records read (records_in)",
            status.records_in,
            expected.records,
        ),
        ("records rejected", status.rejected, expected.invalid),
        (
            "records kept by dedup (records_out), one per distinct valid id",
            status.records_out,
            expected.distinct_valid_ids,
        ),
    ] {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    }
    driver.down();
    if problems.is_empty() {
        // Several GB of node stores; kept only when something needs looking into.
        let _ = std::fs::remove_dir_all(run_dir.join("nodes"));
    }

    let name_of = |peer: &str| {
        nodes
            .iter()
            .find(|n| n.peer_id.as_deref() == Some(peer))
            .map_or_else(|| peer.to_string(), |n| n.name.clone())
    };
    let per_node = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let work = status
                .nodes
                .iter()
                .find(|w| name_of(&w.node) == node.name)
                .cloned()
                .unwrap_or_default();
            NodeUsage {
                name: node.name.clone(),
                tasks: work.tasks,
                local: work.local,
                near: work.near,
                remote: work.remote,
                failed_attempts: work.failed_attempts,
                job_cpu_secs: secs(cpu_job_end[i] - cpu_job_start[i]),
                job_peak_rss_bytes: rss[i],
            }
        })
        .collect();
    let goal_met =
        status.state == JobState::Succeeded && n >= GOAL_RECORDS && job_secs <= GOAL.as_secs_f64();
    let goal = if n < GOAL_RECORDS {
        format!("not measured: the goal is for {GOAL_RECORDS} records, this run had {n}")
    } else if goal_met {
        format!("met: {job_secs:.1} s <= {} s", GOAL.as_secs())
    } else {
        format!("NOT met: {job_secs:.1} s > {} s", GOAL.as_secs())
    };
    let job_cpu = secs(sum(&cpu_job_end) - sum(&cpu_job_start));
    let result = Result {
        records: n,
        record_bytes: RECORD_LEN,
        input_bytes,
        nodes: nodes.iter().map(|n| n.name.clone()).collect(),
        writer: writer.node.clone(),
        input_redundancy: REDUNDANCY,
        input: put.id.to_string(),
        input_chunks: put.chunks,
        put_quorum_secs: put_quorum.as_secs_f64(),
        put_quorum_mb_s: mb_per_s(input_bytes, put_quorum),
        put_all_holders_secs: put_all.as_secs_f64(),
        put_all_holders_mb_s: mb_per_s(input_bytes, put_all),
        put_meshd_cpu_secs: put_cpu,
        expected,
        job: status.id.to_string(),
        processors: status.processors.clone(),
        output_redundancy: options.output.to_string(),
        partitions: options.partitions,
        state: status.state.to_string(),
        job_secs,
        job_wall_secs: job_wall.as_secs_f64(),
        map_phase_secs: map_phase.as_secs_f64(),
        reduce_phase_secs: job_wall.saturating_sub(map_phase).as_secs_f64(),
        records_per_sec: n as f64 / job_secs.max(1e-9),
        input_mb_per_sec: input_bytes as f64 / 1e6 / job_secs.max(1e-9),
        map_tasks: status.map_tasks,
        reduce_tasks: status.reduce_tasks,
        attempts: status.attempts,
        retries: status.retries,
        lease_expiries: status.lease_expiries,
        locality: status.locality,
        records_in: status.records_in,
        records_out: status.records_out,
        rejected: status.rejected,
        dead_letters: status.dead_letters.len(),
        stages: status.stages.clone(),
        bottleneck: status.bottleneck.clone(),
        job_meshd_cpu_secs: job_cpu,
        job_meshd_cpu_share: job_cpu
            / (job_wall.as_secs_f64().max(1e-9) * procfs::Machine::read().cores.max(1) as f64),
        output_complete_secs: output_complete.as_secs_f64(),
        goal,
        goal_met,
        output: status.output.map(|o| o.to_string()),
        rejects: status.rejects.map(|o| o.to_string()),
        peak_rss_reset,
        per_node,
    };
    Ok(Outcome {
        tables: tables(&result),
        result: serde_json::to_value(&result).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        problems,
    })
}

/// Refuses to start a run that would fill the disk half-way (the nodes would then refuse
/// writes, the job would fail, and whatever else uses the disk would suffer).
fn check_disk(run_dir: &Path, input_bytes: u64, output: Redundancy) -> anyhow::Result<()> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let Ok(stat) = nix::sys::statvfs::statvfs(run_dir) else {
        return Ok(());
    };
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let need = disk_needed(input_bytes, output) + NODE_FREE_SPACE_RESERVE;
    if need > free {
        bail!(
            "the jobs scenario needs about {:.1} GB of disk in {} at its peak ({:.1} GB of \
             records stored with rep:3, the map outputs and the output with {output}, the \
             stores' overhead, and the 1 GiB each node keeps free), but {:.1} GB are free \
             there: free some, or use fewer --records or --job-output rep:1",
            need as f64 / 1e9,
            run_dir.display(),
            input_bytes as f64 / 1e9,
            free as f64 / 1e9
        );
    }
    Ok(())
}

/// Bytes the three node stores hold at the peak of a run, a little more than measured: the
/// input three times, the map outputs once (one LZ4-compressed copy, about a fifth of the
/// input; a quarter here), the output (about the input's size) once per copy of the output
/// policy, 15% for the stores' overhead and 2 GB for what does not grow with the input (WAL,
/// memtables). Measured peaks of the `nodes` directory, when map outputs were uncompressed
/// and had the output's policy: 1.6 and 11.9 GB for 1 and 10 million records (0.2 and 2 GB)
/// with a `rep:1` output, 3.1 and 9.4 GB for 1 and 5 million with `rep:3`.
fn disk_needed(input_bytes: u64, output: Redundancy) -> u64 {
    let copies = match output {
        Redundancy::Replicas(n) => f64::from(n),
        Redundancy::Erasure { data, parity } => {
            (f64::from(data) + f64::from(parity)) / f64::from(data.max(1))
        }
    };
    (input_bytes as f64 * (3.25 + copies) * 1.15) as u64 + 2_000_000_000
}

fn sum(ticks: &[u64]) -> u64 {
    ticks.iter().sum()
}

/// Streams the records to `api` as one JSONL object, printing how much was sent every few
/// seconds; returns the node's answer, what the generator counted, and the time until the
/// answer (the write quorum).
fn put_records(
    api: &Api,
    seed: u64,
    n: u64,
    total: u64,
) -> anyhow::Result<(PutResponse, Expected, Duration)> {
    let mut records = Records::new(seed, STREAM, n);
    let sent = records.sent();
    let mut http = api.client(PUT_IO_TIMEOUT, 1 << 20);
    let path = format!("/v1/objects?records=jsonl&redundancy={REDUNDANCY}");
    let started = Instant::now();
    let (response, counted) = std::thread::scope(|scope| {
        let upload = scope.spawn(|| {
            let r = http.request_streamed("POST", &path, &mut records);
            (r, records.counted())
        });
        let mut last = Instant::now();
        while !upload.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() >= super::PROGRESS_EVERY {
                let bytes = sent.load(std::sync::atomic::Ordering::Relaxed);
                progress(
                    NAME,
                    &format!(
                        "put: {:.0} s, {:.0} of {:.0} MB sent ({:.0} MB/s)",
                        started.elapsed().as_secs_f64(),
                        bytes as f64 / 1e6,
                        total as f64 / 1e6,
                        mb_per_s(bytes, started.elapsed())
                    ),
                );
                last = Instant::now();
            }
        }
        upload.join()
    })
    .map_err(|_| anyhow!("the upload thread panicked"))?;
    let elapsed = started.elapsed();
    let response = response.with_context(|| format!("the put of the records on {}", api.node))?;
    if response.status != 200 {
        bail!(
            "POST {path} on {} answered {}: {}",
            api.node,
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    let put: PutResponse = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "the put on {} answered {}",
            api.node,
            String::from_utf8_lossy(&response.body)
        )
    })?;
    Ok((put, counted, elapsed))
}

/// Waits until no node has an object still completing (copies beyond the write quorum).
fn wait_complete(apis: &[Api], what: &str) -> anyhow::Result<Duration> {
    let mut clients: Vec<_> = apis.iter().map(Api::polling_client).collect();
    super::wait_until(NAME, what, COMPLETE_TIMEOUT, || {
        let mut left = 0;
        for (api, client) in apis.iter().zip(&mut clients) {
            let status = api.get_json_with(client, "/v1/status")?;
            left += status["objects_completing"]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no objects_completing: {status}"))?;
        }
        Ok((left == 0, format!("{left} objects completing")))
    })
}

/// Polls the job's status on its coordinator until it ended, with a progress line every few
/// seconds. Also returns when a poll first saw the map phase over (no reduce task waiting for
/// it; the job's end when it has no reduce tasks or ended before a poll saw that), measured
/// from `submitted`.
fn wait_job(
    api: &Api,
    http: &mut super::http::Client,
    id: &str,
    submitted: Instant,
) -> anyhow::Result<(JobStatus, Duration)> {
    let path = format!("/v1/jobs/{id}");
    let started = Instant::now();
    let mut last = Instant::now();
    let mut map_done = None;
    loop {
        let value = api.get_json_with(http, &path)?;
        let status: JobStatus = serde_json::from_value(value)
            .with_context(|| format!("GET {path} on {} answered no job status", api.node))?;
        if status.state.ended() {
            return Ok((status, map_done.unwrap_or_else(|| submitted.elapsed())));
        }
        if map_done.is_none() && status.reduce_tasks > 0 && status.tasks.waiting == 0 {
            map_done = Some(submitted.elapsed());
        }
        if started.elapsed() > JOB_TIMEOUT {
            bail!(
                "job {id} still {} after {} s",
                status.state,
                JOB_TIMEOUT.as_secs()
            );
        }
        if last.elapsed() >= super::PROGRESS_EVERY {
            let t = &status.tasks;
            progress(
                NAME,
                &format!(
                    "job: {:.0} s, {} of {} tasks done ({} leased, {} pending, {} waiting for \
                     the map phase), {} records read",
                    started.elapsed().as_secs_f64(),
                    t.done,
                    status.map_tasks + status.reduce_tasks,
                    t.leased,
                    t.pending,
                    t.waiting,
                    status.records_in
                ),
            );
            last = Instant::now();
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn tables(r: &Result) -> Vec<Table> {
    let mut t = Table::new(
        format!(
            "jobs: validate + dedup over {} JSONL records on {} loopback nodes",
            r.records,
            r.nodes.len()
        ),
        &["figure", "value"],
    );
    let mut row = |figure: &str, value: String| t.row(vec![figure.to_string(), value]);
    row(
        "input",
        format!(
            "{} records of {} bytes, {:.0} MB, {}, {} chunks",
            r.records,
            r.record_bytes,
            r.input_bytes as f64 / 1e6,
            r.input_redundancy,
            r.input_chunks
        ),
    );
    row(
        "put (write quorum / all 3 holders)",
        format!(
            "{:.1} / {:.1} s, {:.1} / {:.1} MB/s, {:.1} meshd CPU-s",
            r.put_quorum_secs,
            r.put_all_holders_secs,
            r.put_quorum_mb_s,
            r.put_all_holders_mb_s,
            r.put_meshd_cpu_secs
        ),
    );
    row(
        "job",
        format!(
            "{}, {}, output {}, {} partitions",
            r.processors, r.state, r.output_redundancy, r.partitions
        ),
    );
    row(
        "job time (coordinator: submitted to ended)",
        format!("{:.2} s", r.job_secs),
    );
    row(
        "job wall time (client: submit sent to end seen)",
        format!("{:.2} s", r.job_wall_secs),
    );
    row(
        "map phase / reduce phase (client, +-0.25 s)",
        format!("{:.1} / {:.1} s", r.map_phase_secs, r.reduce_phase_secs),
    );
    row(
        "throughput",
        format!(
            "{:.0} records/s, {:.1} MB/s of input",
            r.records_per_sec, r.input_mb_per_sec
        ),
    );
    row("goal: 10 M records in <= 60 s", r.goal.clone());
    row(
        "tasks",
        format!(
            "{} map, {} reduce; {} attempts, {} retries, {} lease expiries, {} dead letters",
            r.map_tasks, r.reduce_tasks, r.attempts, r.retries, r.lease_expiries, r.dead_letters
        ),
    );
    row(
        "locality (map tasks run where their chunk is)",
        format!("{:.0}%", r.locality * 100.0),
    );
    row(
        "records in / rejected / out",
        format!(
            "{} / {} / {} (expected {} / {} / {})",
            r.records_in,
            r.rejected,
            r.records_out,
            r.expected.records,
            r.expected.invalid,
            r.expected.distinct_valid_ids
        ),
    );
    row(
        "bottleneck",
        r.bottleneck.as_ref().map_or("-".to_string(), |b| {
            format!("{} ({:.0}%, {})", b.stage, b.share * 100.0, b.severity)
        }),
    );
    row(
        "meshd CPU-s over the job (3 processes)",
        format!(
            "{:.1} ({:.0}% of the machine's cores over the job's wall time)",
            r.job_meshd_cpu_secs,
            100.0 * r.job_meshd_cpu_share
        ),
    );
    t.note(format!(
        "the input is generated as it is sent (chunked POST /v1/objects?records=jsonl&redundancy={}); \
         every id's first record is valid, {} records repeat an earlier id with their own ts, {} \
         of those are invalid (a string ts, no id, a negative age, a number id), so the expected \
         counts follow from the record count",
        r.input_redundancy, r.expected.repeats, r.expected.invalid
    ));
    t.note(format!(
        "the put is not part of the job's time; the job started after every holder had the \
         input; after the job ended its output's third copies took {:.1} s more (not counted)",
        r.output_complete_secs
    ));
    let mut s = Table::new(
        "jobs: per stage (task time summed over all tasks and nodes)",
        &[
            "stage",
            "seconds",
            "records in",
            "records out",
            "records/s",
            "share",
        ],
    );
    for stage in &r.stages {
        s.row(vec![
            stage.stage.clone(),
            num(Some(stage.seconds), 2),
            stage.records_in.to_string(),
            stage.records_out.to_string(),
            // Stages that count no records (read, write) have no rate.
            num(
                Some(stage.records_per_sec).filter(|_| stage.records_in > 0),
                0,
            ),
            format!("{:.1}%", stage.share * 100.0),
        ]);
    }
    s.note(
        "from the job's report: each task times its stages, the coordinator sums them over the \
         finished tasks; tasks run in parallel on 3 nodes, so the seconds add up to more than \
         the job's wall time; records/s = records in / seconds of that stage; share = of all \
         stages' seconds",
    );
    if let Some(b) = &r.bottleneck {
        s.note(format!(
            "bottleneck: {} with {:.0}% of the time ({}: minor over 25%, moderate over 35%, \
             severe over 50%)",
            b.stage,
            b.share * 100.0,
            b.severity
        ));
    }
    let mut n = Table::new(
        "jobs: per node",
        &[
            "node",
            "tasks",
            "local",
            "near",
            "remote",
            "failed attempts",
            "CPU-s",
            "peak RSS MiB",
        ],
    );
    for node in &r.per_node {
        n.row(vec![
            node.name.clone(),
            node.tasks.to_string(),
            node.local.to_string(),
            node.near.to_string(),
            node.remote.to_string(),
            node.failed_attempts.to_string(),
            num(Some(node.job_cpu_secs), 1),
            num(
                Some(node.job_peak_rss_bytes as f64 / (1u64 << 20) as f64),
                0,
            ),
        ]);
    }
    n.note(if r.peak_rss_reset {
        "CPU-s = utime + stime of the node's meshd from submit to end; peak RSS is VmHWM, reset \
         (clear_refs) at submit, so it covers the job"
    } else {
        "CPU-s = utime + stime of the node's meshd from submit to end; peak RSS is VmHWM since \
         the process started (it could not be reset at submit)"
    });
    vec![t, s, n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_estimate_follows_the_output_policy() {
        let gb = |b: u64| b as f64 / 1e9;
        let input = 2_000_000_000;
        assert!((gb(disk_needed(input, Redundancy::Replicas(1))) - 11.775).abs() < 1e-6);
        assert!((gb(disk_needed(input, Redundancy::Replicas(3))) - 16.375).abs() < 1e-6);
        let ec = Redundancy::Erasure { data: 4, parity: 2 };
        assert!((gb(disk_needed(input, ec)) - 12.925).abs() < 1e-6);
        // Above the peak measured with 1 million records, when map outputs were bigger.
        assert!(gb(disk_needed(200_000_000, Redundancy::Replicas(1))) > 1.6);
    }

    #[test]
    fn a_run_that_cannot_fit_is_refused_before_it_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = dir.path().join("jobs");
        let err = check_disk(&run_dir, u64::MAX / 64, Redundancy::Replicas(3))
            .expect_err("no disk is that large");
        assert!(err.to_string().contains("--job-output rep:1"), "{err}");
        assert!(run_dir.is_dir());
        check_disk(&run_dir, 1000, Redundancy::Replicas(3)).expect("a small run fits");
    }
}
