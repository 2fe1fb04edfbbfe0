//! `meshctl job ...`: processing jobs, coordinated by the node the command talks to.
//!
//! `submit` turns the command line (and an optional spec file it amends) into a [`JobSubmit`],
//! checks it with proto's own rules so that a mistake fails before anything is sent, and posts
//! it. `wait` (and `submit --wait`) polls the job's status until it ends, then prints the output
//! object id or fails with the job's error and dead letters. `status`, `ls`, `cancel` and `rm`
//! are one route each. A job may be named by a unique prefix of its id, resolved through the
//! node's job list.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use mesh_proto::job::{
    DeadLetter, JobList, JobState, JobStatus, JobSubmit, MAX_PARAM_LEN, StageSpec,
};
use mesh_proto::{JobId, ObjectId, Redundancy};
use tokio::time::MissedTickBehavior;

use crate::args::{JobCommand, JobRef, StageFlags, SubmitArgs};
use crate::client::Client;
use crate::error::Error;
use crate::output::{self, Align, cell, short_peer_id};

use super::scrub::now_ms;
use super::status::render_rows;

/// How often a job being waited for is polled.
const POLL: Duration = Duration::from_millis(500);
/// Largest spec file read (parameters inline in it may be up to 1 MiB each).
const MAX_SPEC_LEN: usize = 16 * 1024 * 1024;
/// Dead letters listed in an error or a warning; `meshctl job status` shows more.
const DEAD_LETTERS_IN_MESSAGES: usize = 10;
/// Dead letters in `meshctl job status`'s table; `--json` has all of them.
const DEAD_LETTERS_IN_STATUS: usize = 50;
/// Input ids listed in `meshctl job status`.
const INPUTS_IN_STATUS: usize = 4;

pub async fn run(client: &Client, command: JobCommand, json: bool) -> Result<(), Error> {
    match command {
        JobCommand::Submit(args) => submit(client, &args, json).await,
        JobCommand::Status { id } => {
            let id = resolve(client, id).await?;
            let status = client.job(&id).await?;
            if json {
                output::print_json(&status)
            } else {
                output::print(&render_status(&status, now_ms()))
            }
        }
        JobCommand::Ls => {
            let list = client.jobs().await?;
            if json {
                output::print_json(&list)
            } else {
                output::print(&render_list(&list, now_ms()))
            }
        }
        JobCommand::Cancel { id } => {
            let id = resolve(client, id).await?;
            let status = client.cancel_job(&id).await?;
            if json {
                output::print_json(&status)
            } else if status.state == JobState::Cancelled {
                output::print(&format!("cancelled job {id}\n"))
            } else {
                output::print(&format!("job {id} had already ended: {}\n", status.state))
            }
        }
        JobCommand::Wait { id } => {
            let id = resolve(client, id).await?;
            wait(client, id, json).await
        }
        JobCommand::Rm { id } => {
            let id = resolve(client, id).await?;
            client.forget_job(&id).await?;
            // The route answers 204 without a body, so `--json` has nothing to print.
            if json {
                Ok(())
            } else {
                output::print(&format!("forgot job {id} (its output object stays)\n"))
            }
        }
    }
}

async fn submit(client: &Client, args: &SubmitArgs, json: bool) -> Result<(), Error> {
    let job = build_submit(args)?;
    let answer = client.submit_job(&job).await?;
    if !answer.new && !json {
        // The id is the hash of the spec: the same spec is the same job, whatever state it
        // ended in. Said on stderr so that stdout stays the id alone.
        eprintln!(
            "meshctl: note: this spec was submitted before; job {} is that job",
            answer.id
        );
    }
    if args.wait {
        return wait(client, answer.id, json).await;
    }
    if json {
        output::print_json(&answer)
    } else {
        output::print(&format!("{}\n", answer.id))
    }
}

/// The job the command line describes: the spec file if any, amended by the flags, and
/// checked with the rules the node applies.
pub fn build_submit(args: &SubmitArgs) -> Result<JobSubmit, Error> {
    let mut job = match &args.spec {
        Some(path) => read_spec(path)?,
        None => JobSubmit::default(),
    };
    apply_stages(&mut job, &args.stages, args.spec.as_deref())?;
    job.inputs.extend(args.inputs.iter().copied());
    if let Some(output) = args.output {
        job.output = Some(output);
    }
    if let Some(n) = args.max_attempts {
        job.max_attempts = Some(n);
    }
    if let Some(lease) = &args.lease {
        job.lease = Some(lease.clone());
    }
    if let Some(n) = args.partitions {
        job.partitions = Some(n);
    }
    if let Some(policy) = args.on_failure {
        job.on_failure = Some(policy);
    }
    // The output default only matters to the node; here the spec is only checked.
    job.clone()
        .normalize(Redundancy::DEFAULT)
        .map_err(|e| Error::Usage(format!("invalid job: {e}")))?;
    Ok(job)
}

/// `--processor`s replace the spec's processor and params: one makes `processor` + `params`,
/// several make `stages`. `--param`s without a `--processor` add to the spec's `params`.
fn apply_stages(job: &mut JobSubmit, flags: &StageFlags, spec: Option<&Path>) -> Result<(), Error> {
    let given = !flags.stages.is_empty() || !flags.leading_params.is_empty();
    if given && !job.stages.is_empty() {
        let spec = spec.map_or_else(String::new, |path| format!(" {}", path.display()));
        return Err(Error::Usage(format!(
            "the job spec{spec} lists `stages`: give the processors and their params there, \
             not with --processor or --param"
        )));
    }
    if !flags.stages.is_empty() {
        if let Some(param) = flags.leading_params.first() {
            return Err(Error::Usage(format!(
                "--param {param} comes before any --processor: each --param belongs to the \
                 --processor before it"
            )));
        }
        let mut stages = Vec::with_capacity(flags.stages.len());
        for stage in &flags.stages {
            let mut params = BTreeMap::new();
            for raw in &stage.params {
                let (key, value) = parse_param(raw)?;
                params.insert(key, value);
            }
            stages.push(StageSpec {
                processor: stage.processor.clone(),
                params,
            });
        }
        if let [single] = stages.as_mut_slice() {
            job.processor = Some(std::mem::take(&mut single.processor));
            job.params = std::mem::take(&mut single.params);
        } else {
            job.processor = None;
            job.params.clear();
            job.stages = stages;
        }
    } else if let Some(first) = flags.leading_params.first() {
        if job.processor.is_none() {
            return Err(Error::Usage(format!(
                "--param {first} needs a --processor before it (or a --spec file with a \
                 `processor`)"
            )));
        }
        for raw in &flags.leading_params {
            let (key, value) = parse_param(raw)?;
            job.params.insert(key, value);
        }
    }
    Ok(())
}

/// `KEY=VALUE`; `KEY=@FILE` reads the value from FILE, `KEY=@@TEXT` is the literal `@TEXT`.
fn parse_param(raw: &str) -> Result<(String, String), Error> {
    let Some((key, value)) = raw.split_once('=') else {
        return Err(Error::Usage(format!(
            "--param {raw:?} is not KEY=VALUE (or KEY=@FILE to read the value from a file)"
        )));
    };
    if key.is_empty() {
        return Err(Error::Usage(format!(
            "--param {raw:?} has no name before the `=`"
        )));
    }
    let value = if let Some(literal) = value.strip_prefix("@@") {
        format!("@{literal}")
    } else if let Some(path) = value.strip_prefix('@') {
        if path.is_empty() {
            return Err(Error::Usage(format!(
                "--param {raw:?} names no file after the `@`"
            )));
        }
        read_text(Path::new(path), MAX_PARAM_LEN, &format!("--param {key}"))?
    } else {
        value.to_owned()
    };
    Ok((key.to_owned(), value))
}

/// A JobSubmit from a `.json` or `.toml` file.
fn read_spec(path: &Path) -> Result<JobSubmit, Error> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let bad = |reason: String| Error::Usage(format!("job spec {}: {reason}", path.display()));
    match extension.as_deref() {
        Some("json") => {
            let text = read_text(path, MAX_SPEC_LEN, "the job spec")?;
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
        }
        Some("toml") => {
            let text = read_text(path, MAX_SPEC_LEN, "the job spec")?;
            toml::from_str(&text).map_err(|e| bad(e.to_string().trim_end().to_owned()))
        }
        _ => Err(bad("expected a .json or .toml file".to_owned())),
    }
}

/// A UTF-8 file of at most `limit` bytes, exactly as it is (the value is part of the job's id).
fn read_text(path: &Path, limit: usize, what: &str) -> Result<String, Error> {
    let failed = |source| Error::Read {
        what: what.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() > limit {
        return Err(Error::Usage(format!(
            "{what}: {} is larger than the {limit} bytes allowed",
            path.display()
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::Usage(format!("{what}: {} is not UTF-8 text", path.display())))
}

/// The full id of `job`: itself, or the one id in the node's list that starts with the prefix.
async fn resolve(client: &Client, job: JobRef) -> Result<JobId, Error> {
    match job {
        JobRef::Id(id) => Ok(id),
        JobRef::Prefix(prefix) => match_prefix(&client.jobs().await?, &prefix),
    }
}

fn match_prefix(list: &JobList, prefix: &str) -> Result<JobId, Error> {
    let found: Vec<JobId> = list
        .jobs
        .iter()
        .map(|job| job.id)
        .filter(|id| id.to_string().starts_with(prefix))
        .collect();
    match found.as_slice() {
        [id] => Ok(*id),
        [] => Err(Error::NotFound {
            message: format!(
                "no job on this node has an id starting with {prefix} (`meshctl job ls` lists them)"
            ),
        }),
        many => Err(Error::Usage(format!(
            "{prefix} starts {} job ids ({}); give more of the id",
            many.len(),
            many.iter()
                .map(|id| id.to_string()[..12].to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Polls the job until it ends, then reports as [`ending`] says.
async fn wait(client: &Client, id: JobId, json: bool) -> Result<(), Error> {
    let bar = output::job_bar(format!("job {}", id.short()));
    let polled = async {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let status = client.job(&id).await?;
            let tasks = &status.tasks;
            bar.set_length(tasks.waiting + tasks.pending + tasks.leased + tasks.done + tasks.dead);
            bar.set_position(tasks.done);
            bar.set_message(if tasks.dead > 0 {
                format!("{}, {} dead", status.state, tasks.dead)
            } else {
                status.state.to_string()
            });
            if status.state.ended() {
                return Ok::<_, Error>(status);
            }
        }
    }
    .await;
    bar.finish_and_clear();
    let status = polled?;
    let end = ending(&status);
    if json {
        output::print_json(&status)?;
    } else if let Some(output) = end.output {
        output::print(&format!("{output}\n"))?;
    }
    for note in end.notes {
        eprintln!("meshctl: {note}");
    }
    end.error.map_or(Ok(()), Err)
}

/// What waiting for a job ends with: the output id for stdout, notes for stderr, and the error
/// the command fails with.
#[derive(Debug, Default)]
struct Ending {
    output: Option<ObjectId>,
    notes: Vec<String>,
    error: Option<Error>,
}

fn ending(status: &JobStatus) -> Ending {
    let mut end = Ending::default();
    let id = status.id;
    match status.state {
        JobState::Running => {}
        JobState::Succeeded | JobState::Partial => {
            end.output = status.output;
            if status.output.is_none() {
                end.notes
                    .push(format!("warning: job {id} ended without an output object"));
            }
            if status.state == JobState::Partial {
                end.notes.push(format!(
                    "warning: job {id} ended partial: its output lacks what {} tasks would have \
                     made{}",
                    status.dead_letters.len(),
                    dead_letter_lines(status, DEAD_LETTERS_IN_MESSAGES)
                ));
            }
            if status.rejected > 0 {
                let reasons = status.rejects.map_or_else(
                    || "their reasons were not stored".to_owned(),
                    |r| format!("their reasons are in object {r}"),
                );
                end.notes.push(format!(
                    "note: {} records were rejected; {reasons}",
                    status.rejected
                ));
            }
        }
        JobState::Failed | JobState::Cancelled => {
            let mut details = String::new();
            // A cancelled job's error is just "cancelled", which the state already says.
            if let Some(error) = status
                .error
                .as_deref()
                .filter(|e| *e != status.state.to_string())
            {
                let _ = write!(details, ": {}", cell(error));
            }
            details.push_str(&dead_letter_lines(status, DEAD_LETTERS_IN_MESSAGES));
            end.error = Some(Error::JobEnded {
                id,
                state: status.state,
                details,
            });
        }
    }
    end
}

/// `\ndead letters (N):` and a line per dead letter, at most `limit`; empty for none.
fn dead_letter_lines(status: &JobStatus, limit: usize) -> String {
    let letters = &status.dead_letters;
    if letters.is_empty() {
        return String::new();
    }
    let mut text = format!("\ndead letters ({}):", letters.len());
    for DeadLetter {
        task,
        what,
        attempts,
        error,
    } in letters.iter().take(limit)
    {
        let _ = write!(
            text,
            "\n  task {task} ({}), {attempts} attempts: {}",
            cell(what),
            cell(error)
        );
    }
    if letters.len() > limit {
        let _ = write!(
            text,
            "\n  … and {} more (`meshctl job status {}` shows them)",
            letters.len() - limit,
            status.id
        );
    }
    text
}

/// `45s`, `12m`, `3h`, `2d`: a coarse age for tables.
fn age(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A share (0..=1) as a percentage with `decimals` decimals; `-` when not a number.
fn percent(share: f64, decimals: usize) -> String {
    if share.is_finite() {
        format!("{:.decimals$}%", share * 100.0)
    } else {
        "-".to_owned()
    }
}

fn id_or_dash(id: Option<ObjectId>) -> String {
    id.map_or_else(|| "-".to_owned(), |id| id.to_string())
}

/// `meshctl job ls`: one row per job, newest first.
fn render_list(list: &JobList, now_ms: u64) -> String {
    if list.jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let mut jobs: Vec<_> = list.jobs.iter().collect();
    jobs.sort_by_key(|job| std::cmp::Reverse(job.submitted_ms));
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.id.short(),
                job.state.to_string(),
                cell(&job.processors),
                format!("{}/{}", job.done, job.tasks),
                format!("{} ago", age(now_ms.saturating_sub(job.submitted_ms))),
                job.output.map_or_else(|| "-".to_owned(), |id| id.short()),
            ]
        })
        .collect();
    output::table(
        &[
            ("ID", Align::Left),
            ("STATE", Align::Left),
            ("PROCESSORS", Align::Left),
            ("DONE/TASKS", Align::Right),
            ("SUBMITTED", Align::Right),
            ("OUTPUT", Align::Left),
        ],
        &rows,
    )
}

/// `meshctl job status`: the job's report as aligned lines, then tables of the nodes that
/// worked on it, its stages, and its dead letters.
fn render_status(status: &JobStatus, now_ms: u64) -> String {
    let tasks = &status.tasks;
    let total = tasks.waiting + tasks.pending + tasks.leased + tasks.done + tasks.dead;
    let end_ms = status.ended_ms.unwrap_or(now_ms);
    let elapsed = humantime::format_duration(Duration::from_secs(
        end_ms.saturating_sub(status.submitted_ms) / 1000,
    ));
    let submitted =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(status.submitted_ms));
    let mut inputs: Vec<String> = status
        .inputs
        .iter()
        .take(INPUTS_IN_STATUS)
        .map(ToString::to_string)
        .collect();
    if status.inputs.len() > INPUTS_IN_STATUS {
        inputs.push(format!(
            "… and {} more",
            status.inputs.len() - INPUTS_IN_STATUS
        ));
    }
    let mut text = render_rows([
        ("job", status.id.to_string()),
        ("state", status.state.to_string()),
        ("processors", cell(&status.processors)),
        ("coordinator", cell(&status.coordinator)),
        (
            "inputs",
            if inputs.is_empty() {
                "-".to_owned()
            } else {
                inputs.join("\n")
            },
        ),
        (
            "submitted",
            format!(
                "{submitted} ({} ago)",
                age(now_ms.saturating_sub(status.submitted_ms))
            ),
        ),
        (
            "elapsed",
            if status.ended_ms.is_some() {
                elapsed.to_string()
            } else {
                format!("{elapsed} so far")
            },
        ),
        (
            "tasks",
            format!(
                "{total}: {} done, {} leased, {} pending, {} waiting, {} dead",
                tasks.done, tasks.leased, tasks.pending, tasks.waiting, tasks.dead
            ),
        ),
        (
            "map/reduce",
            format!("{} map, {} reduce", status.map_tasks, status.reduce_tasks),
        ),
        (
            "attempts",
            format!(
                "{} ({} retries, {} lease expiries, {} map outputs lost)",
                status.attempts, status.retries, status.lease_expiries, status.lost_outputs
            ),
        ),
        (
            "locality",
            format!(
                "{} of finished map tasks ran where their input chunk is",
                percent(status.locality, 0)
            ),
        ),
        (
            "records",
            format!(
                "{} in, {} out, {} rejected",
                status.records_in, status.records_out, status.rejected
            ),
        ),
        ("output", id_or_dash(status.output)),
        ("rejects", id_or_dash(status.rejects)),
        (
            "error",
            status.error.as_deref().map_or_else(|| "-".to_owned(), cell),
        ),
    ]);
    if !status.nodes.is_empty() {
        let rows: Vec<Vec<String>> = status
            .nodes
            .iter()
            .map(|n| {
                vec![
                    short_peer_id(&n.node),
                    n.tasks.to_string(),
                    n.local.to_string(),
                    n.near.to_string(),
                    n.remote.to_string(),
                    n.failed_attempts.to_string(),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&output::table(
            &[
                ("NODE", Align::Left),
                ("TASKS", Align::Right),
                ("LOCAL", Align::Right),
                ("NEAR", Align::Right),
                ("REMOTE", Align::Right),
                ("FAILED ATTEMPTS", Align::Right),
            ],
            &rows,
        ));
    }
    if !status.stages.is_empty() {
        let rows: Vec<Vec<String>> = status
            .stages
            .iter()
            .map(|s| {
                vec![
                    cell(&s.stage),
                    format!("{:.2}", s.seconds),
                    s.records_in.to_string(),
                    s.records_out.to_string(),
                    format!("{:.1}", s.records_per_sec),
                    percent(s.share, 1),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&output::table(
            &[
                ("STAGE", Align::Left),
                ("SECONDS", Align::Right),
                ("RECORDS IN", Align::Right),
                ("RECORDS OUT", Align::Right),
                ("RECORDS/S", Align::Right),
                ("SHARE", Align::Right),
            ],
            &rows,
        ));
    }
    if let Some(b) = &status.bottleneck {
        let _ = writeln!(
            text,
            "bottleneck: {} ({}, {})",
            cell(&b.stage),
            percent(b.share, 0),
            cell(&b.severity)
        );
    }
    if !status.dead_letters.is_empty() {
        let rows: Vec<Vec<String>> = status
            .dead_letters
            .iter()
            .take(DEAD_LETTERS_IN_STATUS)
            .map(|d| {
                vec![
                    d.task.to_string(),
                    cell(&d.what),
                    d.attempts.to_string(),
                    cell(&d.error),
                ]
            })
            .collect();
        let _ = write!(text, "\ndead letters ({}):\n", status.dead_letters.len());
        text.push_str(&output::table(
            &[
                ("TASK", Align::Right),
                ("WHAT", Align::Left),
                ("ATTEMPTS", Align::Right),
                ("ERROR", Align::Left),
            ],
            &rows,
        ));
        if status.dead_letters.len() > DEAD_LETTERS_IN_STATUS {
            let _ = writeln!(
                text,
                "… and {} more (--json lists them all)",
                status.dead_letters.len() - DEAD_LETTERS_IN_STATUS
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use mesh_proto::job::{Bottleneck, JobSummary, NodeWork, OnFailure, StageReport, TaskCounts};

    use super::*;
    use crate::args::{Cli, Command};
    use crate::client::Token;

    fn args(list: &[&str]) -> SubmitArgs {
        let cli = Cli::try_parse_from(["meshctl", "job", "submit"].iter().chain(list))
            .unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            Command::Job {
                command: JobCommand::Submit(args),
            } => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn build(list: &[&str]) -> Result<JobSubmit, Error> {
        build_submit(&args(list))
    }

    fn usage_error(list: &[&str]) -> String {
        match build(list) {
            Err(Error::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    fn oid(seed: &str) -> ObjectId {
        ObjectId::of(seed.as_bytes())
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn one_processor_is_the_short_form() {
        let input = oid("a").to_string();
        let job = build(&[
            "--processor",
            "dedup",
            "--param",
            "key=id",
            "--param",
            "latest=ts=x",
            "--input",
            &input,
            "--max-attempts",
            "5",
            "--partitions",
            "4",
            "--on-failure",
            "partial",
            "--output",
            "rep:2",
        ])
        .unwrap();
        assert_eq!(
            job,
            JobSubmit {
                processor: Some("dedup".into()),
                params: params(&[("key", "id"), ("latest", "ts=x")]),
                inputs: vec![oid("a")],
                max_attempts: Some(5),
                partitions: Some(4),
                on_failure: Some(OnFailure::Partial),
                output: Some(Redundancy::replicas(2).unwrap()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn several_processors_are_stages_each_with_its_own_params() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("schema.json");
        std::fs::write(&schema, "{\"type\": \"object\"}\n").unwrap();
        let schema_param = format!("schema=@{}", schema.display());
        let (a, b) = (oid("a").to_string(), oid("b").to_string());
        let job = build(&[
            "--input",
            &a,
            "--processor",
            "validate",
            "--param",
            &schema_param,
            "--param",
            "mode=@@strict",
            "--processor",
            "dedup",
            "--input",
            &b,
            "--param",
            "key=id",
            "--processor",
            "exec:wc",
        ])
        .unwrap();
        assert_eq!(job.processor, None);
        assert!(job.params.is_empty());
        assert_eq!(
            job.stages,
            [
                StageSpec {
                    processor: "validate".into(),
                    params: params(&[("schema", "{\"type\": \"object\"}\n"), ("mode", "@strict")]),
                },
                StageSpec {
                    processor: "dedup".into(),
                    params: params(&[("key", "id")]),
                },
                StageSpec {
                    processor: "exec:wc".into(),
                    params: BTreeMap::new(),
                },
            ]
        );
        assert_eq!(job.inputs, [oid("a"), oid("b")]);
    }

    #[test]
    fn bad_params_are_usage_errors_that_name_them() {
        let input = oid("a").to_string();
        let base = ["--processor", "filter", "--input", &input];
        let with = |extra: &[&str]| {
            let mut list = base.to_vec();
            list.extend_from_slice(extra);
            usage_error(&list)
        };
        let message = with(&["--param", "where"]);
        assert!(
            message.contains("\"where\"") && message.contains("KEY=VALUE"),
            "{message}"
        );
        let message = with(&["--param", "=x"]);
        assert!(message.contains("no name"), "{message}");
        let message = with(&["--param", "x=@"]);
        assert!(message.contains("no file"), "{message}");
        let message = usage_error(&["--param", "k=v", "--processor", "filter", "--input", &input]);
        assert!(
            message.contains("--param k=v comes before any --processor"),
            "{message}"
        );
        let message = usage_error(&["--param", "k=v", "--input", &input]);
        assert!(message.contains("needs a --processor"), "{message}");

        let missing = "/nonexistent/mesh-schema.json";
        let err = build(&[
            "--processor",
            "validate",
            "--param",
            &format!("schema=@{missing}"),
            "--input",
            &input,
        ])
        .unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("--param schema") && message.contains(missing),
            "{message}"
        );
        assert!(!message.contains("os error"), "{message}");
    }

    #[test]
    fn protos_rules_are_checked_before_anything_is_sent() {
        let message = usage_error(&["--processor", "filter"]);
        assert!(message.contains("--input ID"), "{message}");
        let message = usage_error(&["--input", &oid("a").to_string()]);
        assert!(message.contains("needs a processor"), "{message}");
        let input = oid("a").to_string();
        let message = usage_error(&[
            "--processor",
            "filter",
            "--input",
            &input,
            "--input",
            &input,
        ]);
        assert!(message.contains("named twice"), "{message}");
        let message = usage_error(&["--processor", "filter", "--input", &input, "--lease", "2h"]);
        assert!(message.contains("between 1s and 1h"), "{message}");
    }

    #[test]
    fn a_json_spec_is_amended_by_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("job.json");
        std::fs::write(
            &spec,
            format!(
                r#"{{"processor": "dedup", "params": {{"key": "id", "latest": "ts"}},
                    "inputs": ["{}"], "lease": "10s", "max_attempts": 2}}"#,
                oid("a")
            ),
        )
        .unwrap();
        let spec = spec.to_str().unwrap();
        let b = oid("b").to_string();
        // --param alone adds to (and overrides) the spec's processor's params.
        let job = build(&[
            "--spec",
            spec,
            "--param",
            "latest=updated_at",
            "--param",
            "keep=last",
            "--input",
            &b,
            "--max-attempts",
            "7",
        ])
        .unwrap();
        assert_eq!(job.processor.as_deref(), Some("dedup"));
        assert_eq!(
            job.params,
            params(&[("key", "id"), ("latest", "updated_at"), ("keep", "last")])
        );
        assert_eq!(job.inputs, [oid("a"), oid("b")]);
        assert_eq!(job.lease.as_deref(), Some("10s"));
        assert_eq!(job.max_attempts, Some(7));
        // --processor replaces the spec's processor and its params.
        let job = build(&[
            "--spec",
            spec,
            "--processor",
            "filter",
            "--param",
            "where=x",
        ])
        .unwrap();
        assert_eq!(job.processor.as_deref(), Some("filter"));
        assert_eq!(job.params, params(&[("where", "x")]));
        let job = build(&[
            "--spec",
            spec,
            "--processor",
            "filter",
            "--processor",
            "dedup",
        ])
        .unwrap();
        assert_eq!(job.processor, None);
        assert!(job.params.is_empty());
        assert_eq!(job.stages.len(), 2);
    }

    #[test]
    fn a_toml_spec_with_stages_takes_no_processor_flags() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("job.TOML");
        std::fs::write(
            &spec,
            format!(
                "inputs = [\"{}\"]\non_failure = \"partial\"\noutput = \"ec:4+2\"\n\n\
                 [[stages]]\nprocessor = \"validate\"\nparams = {{ schema = '{{\"type\":\"object\"}}' }}\n\n\
                 [[stages]]\nprocessor = \"dedup\"\n[stages.params]\nkey = \"id\"\n",
                oid("a")
            ),
        )
        .unwrap();
        let spec = spec.to_str().unwrap();
        let job = build(&["--spec", spec, "--partitions", "2"]).unwrap();
        assert_eq!(job.stages.len(), 2);
        assert_eq!(job.stages[0].params["schema"], "{\"type\":\"object\"}");
        assert_eq!(job.stages[1].params, params(&[("key", "id")]));
        assert_eq!(job.on_failure, Some(OnFailure::Partial));
        assert_eq!(job.output, Some(Redundancy::erasure(4, 2).unwrap()));
        assert_eq!(job.partitions, Some(2));
        for flags in [["--processor", "filter"], ["--param", "key=x"]] {
            let message = usage_error(&["--spec", spec, flags[0], flags[1]]);
            assert!(
                message.contains("lists `stages`") && message.contains("job.TOML"),
                "{message}"
            );
        }
    }

    #[test]
    fn bad_spec_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("job.yaml");
        std::fs::write(&yaml, "processor: x").unwrap();
        let message = usage_error(&["--spec", yaml.to_str().unwrap()]);
        assert!(message.contains(".json or .toml"), "{message}");
        let json = dir.path().join("job.json");
        std::fs::write(&json, r#"{"processor": "x", "retries": 3}"#).unwrap();
        let message = usage_error(&["--spec", json.to_str().unwrap()]);
        assert!(
            message.contains("job.json") && message.contains("retries"),
            "{message}"
        );
        let toml = dir.path().join("job.toml");
        std::fs::write(&toml, "processor = ").unwrap();
        let message = usage_error(&["--spec", toml.to_str().unwrap()]);
        assert!(message.contains("job.toml"), "{message}");
        let missing = dir.path().join("nope.json");
        let err = build(&["--spec", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read the job spec from "),
            "{err}"
        );
    }

    fn summary(seed: &str, submitted_ms: u64) -> JobSummary {
        JobSummary {
            id: JobId::of(seed.as_bytes()),
            state: JobState::Running,
            processors: "validate | dedup".into(),
            inputs: 2,
            tasks: 40,
            done: 12,
            submitted_ms,
            output: None,
        }
    }

    #[test]
    fn a_prefix_names_one_job_or_fails_clearly() {
        let list = JobList {
            jobs: vec![summary("a", 0), summary("b", 0)],
        };
        let a = JobId::of(b"a");
        assert_eq!(match_prefix(&list, &a.to_string()[..6]).unwrap(), a);
        let err = match_prefix(&list, "").unwrap_err();
        assert!(
            matches!(&err, Error::Usage(m) if m.contains("starts 2 job ids")),
            "{err:?}"
        );
        let unknown = if a.to_string().starts_with("0000") {
            "ffff"
        } else {
            "0000"
        };
        let err = match_prefix(&list, unknown).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::exit::NOT_FOUND);
        assert!(err.to_string().contains("meshctl job ls"), "{err}");
    }

    #[test]
    fn ls_lists_newest_first() {
        let now = 10_000_000;
        let mut done = summary("done", now - 7_200_000);
        done.state = JobState::Succeeded;
        done.done = 40;
        done.output = Some(oid("out"));
        let list = JobList {
            jobs: vec![done, summary("new", now - 45_000)],
        };
        let text = render_list(&list, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID        STATE"), "{text}");
        assert!(lines[1].starts_with(&JobId::of(b"new").short()), "{text}");
        assert!(
            lines[1].contains("running    validate | dedup       12/40    45s ago  -"),
            "{text}"
        );
        assert!(
            lines[2].contains("succeeded  validate | dedup       40/40     2h ago  "),
            "{text}"
        );
        assert!(lines[2].ends_with(&oid("out").short()), "{text}");
        assert_eq!(render_list(&JobList { jobs: vec![] }, now), "no jobs\n");
    }

    const SUBMITTED: u64 = 1_700_000_000_000;

    fn report() -> JobStatus {
        JobStatus {
            id: JobId::of(b"job"),
            state: JobState::Partial,
            coordinator: "12D3KooWGzBxR5x6qYb9n4p1s2LQ8WvE7fRk3mJc5dHt9aZ0uVwX".into(),
            processors: "validate | dedup".into(),
            inputs: vec![oid("a"), oid("b")],
            submitted_ms: SUBMITTED,
            ended_ms: Some(SUBMITTED + 125_000),
            tasks: TaskCounts {
                waiting: 0,
                pending: 0,
                leased: 0,
                done: 9,
                dead: 1,
            },
            map_tasks: 8,
            reduce_tasks: 2,
            attempts: 14,
            retries: 4,
            lease_expiries: 1,
            lost_outputs: 0,
            locality: 0.875,
            nodes: vec![NodeWork {
                node: "12D3KooWQm7Lk2zSx9Pq4RtYv8NcWb3EdFh6Jk1Ma5Ab3xYz9QwE".into(),
                tasks: 9,
                local: 7,
                near: 1,
                remote: 1,
                failed_attempts: 3,
            }],
            stages: vec![
                StageReport {
                    stage: "validate".into(),
                    seconds: 6.0,
                    records_in: 1200,
                    records_out: 1150,
                    records_per_sec: 200.0,
                    share: 0.6,
                },
                StageReport {
                    stage: "dedup".into(),
                    seconds: 4.0,
                    records_in: 1150,
                    records_out: 1000,
                    records_per_sec: 287.5,
                    share: 0.4,
                },
            ],
            bottleneck: Some(Bottleneck {
                stage: "validate".into(),
                share: 0.6,
                severity: "severe".into(),
            }),
            records_in: 1200,
            records_out: 1000,
            rejected: 50,
            dead_letters: vec![DeadLetter {
                task: 3,
                what: "map input 1 chunk 2".into(),
                attempts: 3,
                error: "exit status 1: \u{1b}[31mboom".into(),
            }],
            output: Some(oid("out")),
            rejects: Some(oid("rejects")),
            error: None,
        }
    }

    #[test]
    fn status_shows_the_whole_report() {
        let status = report();
        let text = render_status(&status, SUBMITTED + 300_000);
        for line in [
            format!("job          {}\n", status.id),
            "state        partial\n".to_owned(),
            "processors   validate | dedup\n".to_owned(),
            "coordinator  12D3KooWGzBxR5x6qYb9n4p1s2LQ8WvE7fRk3mJc5dHt9aZ0uVwX\n".to_owned(),
            format!("inputs       {}\n             {}\n", oid("a"), oid("b")),
            "submitted    2023-11-14T22:13:20Z (5m ago)\n".to_owned(),
            "elapsed      2m 5s\n".to_owned(),
            "tasks        10: 9 done, 0 leased, 0 pending, 0 waiting, 1 dead\n".to_owned(),
            "map/reduce   8 map, 2 reduce\n".to_owned(),
            "attempts     14 (4 retries, 1 lease expiries, 0 map outputs lost)\n".to_owned(),
            "locality     88% of finished map tasks ran where their input chunk is\n".to_owned(),
            "records      1200 in, 1000 out, 50 rejected\n".to_owned(),
            format!("output       {}\n", oid("out")),
            format!("rejects      {}\n", oid("rejects")),
            "error        -\n".to_owned(),
            "NODE         TASKS  LOCAL  NEAR  REMOTE  FAILED ATTEMPTS\n".to_owned(),
            "…Ab3xYz9QwE      9      7     1       1                3\n".to_owned(),
            "STAGE     SECONDS  RECORDS IN  RECORDS OUT  RECORDS/S  SHARE\n".to_owned(),
            "validate     6.00        1200         1150      200.0  60.0%\n".to_owned(),
            "dedup        4.00        1150         1000      287.5  40.0%\n".to_owned(),
            "bottleneck: validate (60%, severe)\n".to_owned(),
            "dead letters (1):\n".to_owned(),
            "TASK  WHAT                 ATTEMPTS  ERROR\n".to_owned(),
            "   3  map input 1 chunk 2         3  exit status 1: \\u{1b}[31mboom\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn a_running_job_shows_time_so_far_and_no_empty_tables() {
        let mut status = report();
        status.state = JobState::Running;
        status.ended_ms = None;
        status.nodes.clear();
        status.stages.clear();
        status.bottleneck = None;
        status.dead_letters.clear();
        status.output = None;
        status.rejects = None;
        status.inputs = (0..6).map(|i| oid(&i.to_string())).collect();
        let text = render_status(&status, SUBMITTED + 61_000);
        assert!(text.contains("elapsed      1m 1s so far\n"), "{text}");
        assert!(text.contains("             … and 2 more\n"), "{text}");
        assert!(text.contains("output       -\n"), "{text}");
        for absent in ["NODE", "STAGE", "bottleneck", "dead letters"] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn waiting_ends_with_the_output_or_the_jobs_error() {
        let mut status = report();
        status.state = JobState::Succeeded;
        status.dead_letters.clear();
        let end = ending(&status);
        assert_eq!(end.output, Some(oid("out")));
        assert!(end.error.is_none());
        assert_eq!(
            end.notes,
            [format!(
                "note: 50 records were rejected; their reasons are in object {}",
                oid("rejects")
            )]
        );

        let status = report();
        let end = ending(&status);
        assert_eq!(end.output, Some(oid("out")));
        assert!(end.error.is_none());
        let warning = &end.notes[0];
        assert!(
            warning.starts_with(&format!("warning: job {} ended partial", status.id)),
            "{warning}"
        );
        assert!(
            warning.contains(
                "\ndead letters (1):\n  task 3 (map input 1 chunk 2), 3 attempts: exit status 1"
            ),
            "{warning}"
        );

        let mut status = report();
        status.state = JobState::Failed;
        status.output = None;
        status.error = Some("task 3 used up its 3 attempts".into());
        status.dead_letters = (0..12)
            .map(|task| DeadLetter {
                task,
                what: format!("map input 0 chunk {task}"),
                attempts: 3,
                error: "bad record".into(),
            })
            .collect();
        let end = ending(&status);
        assert_eq!(end.output, None);
        let err = end.error.unwrap();
        assert_eq!(err.exit_code(), crate::error::exit::ERROR);
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "job {} failed: task 3 used up its 3 attempts\ndead letters (12):\n  task 0 \
                 (map input 0 chunk 0), 3 attempts: bad record\n",
                status.id
            )),
            "{message}"
        );
        assert!(
            message.ends_with(&format!(
                "  task 9 (map input 0 chunk 9), 3 attempts: bad record\n  … and 2 more \
                 (`meshctl job status {}` shows them)",
                status.id
            )),
            "{message}"
        );

        let mut status = report();
        status.state = JobState::Cancelled;
        status.error = Some("cancelled".into());
        status.dead_letters.clear();
        let message = ending(&status).error.unwrap().to_string();
        assert_eq!(message, format!("job {} cancelled", status.id));
    }

    /// One request a [`FakeNode`] received: method, path, body.
    type Seen = (String, String, String);

    /// A stand-in for meshd's control API: answers each request with what `answer` returns
    /// for it (status and JSON body) and records it. One request per connection.
    struct FakeNode {
        client: Client,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    }

    impl FakeNode {
        async fn start(answer: impl Fn(&Seen, usize) -> (u16, String) + Send + 'static) -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let api = listener.local_addr().unwrap().to_string();
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let mut buf = Vec::new();
                    let head_end = loop {
                        let mut chunk = [0u8; 4096];
                        let n = socket.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "connection closed mid-request");
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                    };
                    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        let n = socket.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let mut first = head.split_whitespace();
                    let request = (
                        first.next().unwrap().to_owned(),
                        first.next().unwrap().to_owned(),
                        String::from_utf8(buf[head_end..].to_vec()).unwrap(),
                    );
                    let count = {
                        let mut log = log.lock().unwrap();
                        log.push(request.clone());
                        log.len()
                    };
                    let (status, body) = answer(&request, count);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    socket.write_all(response.as_bytes()).await.unwrap();
                    let _ = socket.shutdown().await;
                }
            });
            let dir = std::env::temp_dir();
            let token = Token::resolve(Some("t"), &dir).unwrap();
            let client = Client::new(&api, &dir, token).unwrap();
            Self { client, seen }
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn submit_wait_posts_the_job_and_polls_until_it_fails() {
        let mut failed = report();
        failed.state = JobState::Failed;
        failed.output = None;
        failed.error = Some("task 3 used up its 3 attempts".into());
        let id = failed.id;
        let mut running = failed.clone();
        running.state = JobState::Running;
        running.dead_letters.clear();
        let (running, failed) = (
            serde_json::to_string(&running).unwrap(),
            serde_json::to_string(&failed).unwrap(),
        );
        let node = FakeNode::start(move |(method, path, _), count| {
            match (method.as_str(), path.as_str(), count) {
                ("POST", "/v1/jobs", _) => (200, format!(r#"{{"id": "{id}", "new": true}}"#)),
                ("GET", p, 2..=3) if p == format!("/v1/jobs/{id}") => (200, running.clone()),
                ("GET", p, _) if p == format!("/v1/jobs/{id}") => (200, failed.clone()),
                _ => (
                    404,
                    r#"{"code": "not_found", "message": "no such route"}"#.into(),
                ),
            }
        })
        .await;
        let input = oid("a").to_string();
        let args = args(&[
            "--processor",
            "filter",
            "--param",
            "where=x",
            "--input",
            &input,
            "--wait",
        ]);
        let err = submit(&node.client, &args, false).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::JobEnded {
                    state: JobState::Failed,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("dead letters (1)"), "{err}");
        let seen = node.seen();
        assert_eq!(seen.len(), 4, "{seen:?}");
        let posted: JobSubmit = serde_json::from_str(&seen[0].2).unwrap();
        assert_eq!(posted, build_submit(&args).unwrap());
        assert!(
            seen[1..]
                .iter()
                .all(|(m, p, _)| m == "GET" && *p == format!("/v1/jobs/{id}"))
        );
    }

    #[tokio::test]
    async fn a_refused_spec_shows_the_nodes_reason_and_rm_resolves_a_prefix() {
        let id = JobId::of(b"a");
        let list = serde_json::to_string(&JobList {
            jobs: vec![summary("a", 0), summary("b", 0)],
        })
        .unwrap();
        let node =
            FakeNode::start(
                move |(method, path, _), _| {
                    match (method.as_str(), path.as_str()) {
                ("POST", "/v1/jobs") => (
                    400,
                    r#"{"code": "bad_request", "message": "stage 1: unknown processor \"filtr\""}"#
                        .into(),
                ),
                ("GET", "/v1/jobs") => (200, list.clone()),
                ("DELETE", p) if p == format!("/v1/jobs/{id}") => (204, String::new()),
                _ => (
                    404,
                    r#"{"code": "not_found", "message": "no such route"}"#.into(),
                ),
            }
                },
            )
            .await;
        let input = oid("a").to_string();
        let args = args(&["--processor", "filtr", "--input", &input]);
        let err = submit(&node.client, &args, false).await.unwrap_err();
        assert!(
            err.to_string().contains("unknown processor \"filtr\""),
            "{err}"
        );
        let prefix = JobRef::Prefix(id.to_string()[..8].to_owned());
        run(&node.client, JobCommand::Rm { id: prefix }, true)
            .await
            .unwrap();
        let seen = node.seen();
        assert_eq!(seen[1].0, "GET");
        assert_eq!(seen[2].0, "DELETE");
        assert_eq!(seen[2].1, format!("/v1/jobs/{id}"));
    }
}
