//! The throughput scenario: one large object through a replicated mesh on loopback.
//!
//! `topologies/bench-throughput.toml`: a bootstrap peer, three holders and a fourth node on
//! standby. The first holder puts a seeded random file with `rep:3` through `meshctl put`
//! (timed until it returns at its write quorum, and until the writer reports no object still
//! completing, i.e. all three holders have every chunk). Only then does the fourth node start;
//! the bench checks that no chunk of the object lists it as a holder and that it stores no
//! chunk, and `meshctl get` on it reads the object from the holders. The bytes read back must
//! have the input's BLAKE3. CPU time is utime + stime of every meshd over each phase, from
//! /proc; peak RSS is VmHWM, reset before each phase where the kernel allows it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::markdown::{Table, num};
use super::stats::mb_per_s;
use super::{Api, Outcome, REDUNDANCY, Setup, cpu_ticks_of, data, meshctl_timed, procfs, progress};
use crate::driver::{Driver, parse_json};
use crate::state::{Mode, ProcessState, Role};

const TOPOLOGY: &str = include_str!("../../topologies/bench-throughput.toml");
const NAME: &str = "throughput";
const GIB: f64 = (1u64 << 30) as f64;
/// How long the third holders may take after the put returned.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Options {
    pub size_mib: u64,
}

#[derive(Debug, Serialize)]
struct Result {
    size_bytes: u64,
    redundancy: &'static str,
    writer: String,
    holders: Vec<String>,
    reader: String,
    object: String,
    chunks: u64,
    blake3: String,
    verified: bool,
    /// Chunks listing the reader as a holder before the get (must be 0).
    reader_chunks_before_get: u64,
    put_quorum_secs: f64,
    put_quorum_mb_s: f64,
    put_all_holders_secs: f64,
    put_all_holders_mb_s: f64,
    put_cpu_secs: f64,
    put_cpu_secs_per_gib: f64,
    get_secs: f64,
    get_mb_s: f64,
    get_cpu_secs: f64,
    get_cpu_secs_per_gib: f64,
    hedged_fetches: Option<f64>,
    peak_rss_reset_per_phase: bool,
    nodes: Vec<NodeUsage>,
}

#[derive(Debug, Serialize)]
struct NodeUsage {
    name: String,
    role: &'static str,
    put_cpu_secs: Option<f64>,
    get_cpu_secs: f64,
    put_peak_rss_bytes: Option<u64>,
    get_peak_rss_bytes: u64,
}

pub fn run(setup: &Setup, options: &Options) -> anyhow::Result<Outcome> {
    let size = options.size_mib.max(1) << 20;
    let (driver, state) = Driver::up(
        &setup.run_dir,
        setup.bin_dir.as_deref(),
        "bench-throughput",
        TOPOLOGY,
        Mode::Loopback,
    )?;
    let run_dir = driver.run_dir().to_path_buf();
    let holders: Vec<_> = state
        .nodes
        .iter()
        .filter(|n| n.role == Role::Node && n.state == ProcessState::Running)
        .cloned()
        .collect();
    let reader = state
        .nodes
        .iter()
        .find(|n| n.state == ProcessState::Standby)
        .cloned()
        .ok_or_else(|| anyhow!("the throughput topology has no standby reader"))?;
    let [writer, ..] = holders.as_slice() else {
        bail!("the throughput topology has no running node");
    };
    progress(NAME, "waiting for the nodes to see each other");
    driver.wait_mesh(super::MESH_TIMEOUT)?;

    let input = run_dir.join("input.bin");
    progress(
        NAME,
        &format!(
            "writing {} MiB of seeded random data to {}",
            size >> 20,
            input.display()
        ),
    );
    let input_hash = data::write_file(&input, setup.seed, 0, size, |_| {})
        .with_context(|| format!("cannot write {}", input.display()))?;

    let ticks = procfs::clock_ticks();
    let holder_pids: Vec<u32> = holders
        .iter()
        .map(|n| n.pid.ok_or_else(|| anyhow!("{} has no pid", n.name)))
        .collect::<anyhow::Result<_>>()?;
    let apis: Vec<Api> = holders.iter().map(Api::of).collect::<anyhow::Result<_>>()?;
    let writer_api = apis[0].clone();
    let mut reset = holder_pids.iter().all(|&p| procfs::reset_peak_rss(p));
    let cpu_before: Vec<u64> = cpu_ticks_of(&holder_pids)?;

    let input_str = input.display().to_string();
    let args = ["--json", "put", &input_str, "--redundancy", REDUNDANCY];
    let total = size * 3;
    let (out, put_quorum) = meshctl_timed(&driver, &writer.name, &args, NAME, "put", || {
        stored_progress(&apis, total)
    })?;
    let put = parse_json(&writer.name, &args, &out)?;
    let id = super::object_id(&put)?;
    let chunks = put["chunks"].as_u64().unwrap_or(0);
    progress(
        NAME,
        &format!(
            "put returned at its write quorum after {:.1} s ({:.0} MB/s); object {id}, {chunks} chunks",
            put_quorum.as_secs_f64(),
            mb_per_s(size, put_quorum)
        ),
    );
    let completing = super::wait_until(NAME, "third holders", COMPLETE_TIMEOUT, || {
        let status = writer_api.status()?;
        let left = status["objects_completing"]
            .as_u64()
            .ok_or_else(|| anyhow!("status has no objects_completing: {status}"))?;
        Ok((left == 0, stored_progress(&apis, total)))
    })?;
    let put_all = put_quorum + completing;
    let cpu_put: Vec<u64> = cpu_ticks_of(&holder_pids)?;
    let put_rss: Vec<u64> = holder_pids
        .iter()
        .map(|&p| procfs::peak_rss(p))
        .collect::<std::io::Result<_>>()
        .context("cannot read peak RSS")?;
    progress(
        NAME,
        &format!(
            "all holders complete after {:.1} s ({:.0} MB/s)",
            put_all.as_secs_f64(),
            mb_per_s(size, put_all)
        ),
    );

    progress(
        NAME,
        &format!("starting {}, which holds nothing", reader.name),
    );
    driver.netsim(&["restart", &reader.name])?;
    driver.wait_peers(&reader.name, holders.len(), super::MESH_TIMEOUT)?;
    let state = driver.state()?;
    let reader = state
        .node(&reader.name)
        .cloned()
        .ok_or_else(|| anyhow!("{} vanished from the state file", reader.name))?;
    let reader_pid = reader
        .pid
        .ok_or_else(|| anyhow!("{} has no pid", reader.name))?;
    let reader_api = Api::of(&reader)?;
    let reader_chunks = held_by(
        &writer_api.get_json(&format!("/v1/objects/{id}/stat"))?,
        &reader,
    )?;
    let reader_stored = reader_api.status()?["chunks"].as_u64().unwrap_or(0);
    if reader_chunks > 0 || reader_stored > 0 {
        bail!(
            "{} should hold nothing before the get, but {reader_chunks} chunks list it as a holder and it stores {reader_stored}",
            reader.name
        );
    }

    let mut all_pids = holder_pids.clone();
    all_pids.push(reader_pid);
    reset &= all_pids.iter().all(|&p| procfs::reset_peak_rss(p));
    let cpu_get_start = cpu_ticks_of(&all_pids)?;
    let out_dir = run_dir.join("get");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).context("cannot create the get directory")?;
    let output = out_dir.join("output.bin");
    let output_str = output.display().to_string();
    let args = ["get", &id, "-o", &output_str];
    let (_, get_time) = meshctl_timed(&driver, &reader.name, &args, NAME, "get", || {
        format!("{:.0} MB read", dir_bytes(&out_dir) as f64 / 1e6)
    })?;
    let cpu_get_end = cpu_ticks_of(&all_pids)?;
    let get_rss: Vec<u64> = all_pids
        .iter()
        .map(|&p| procfs::peak_rss(p))
        .collect::<std::io::Result<_>>()
        .context("cannot read peak RSS")?;
    let hedged = reader_api
        .metrics()
        .ok()
        .and_then(|m| super::prometheus_value(&m, "mesh_hedged_fetches_total"));
    progress(
        NAME,
        &format!(
            "get took {:.1} s ({:.0} MB/s); checking BLAKE3",
            get_time.as_secs_f64(),
            mb_per_s(size, get_time)
        ),
    );
    let (output_hash, output_len) =
        data::hash_file(&output).with_context(|| format!("cannot read {}", output.display()))?;
    let verified = output_hash == input_hash && output_len == size;
    let mut problems = Vec::new();
    if !verified {
        problems.push(format!(
            "the object read back differs: {output_len} bytes with BLAKE3 {}, put {size} bytes with BLAKE3 {}",
            output_hash.to_hex(),
            input_hash.to_hex()
        ));
    } else {
        // The files are as large as the object; the nodes' data stays until the next run.
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
    }
    driver.down();

    let secs = |t: u64| t as f64 / ticks as f64;
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let put_cpu = secs(sum(&cpu_put) - sum(&cpu_before));
    let get_cpu = secs(sum(&cpu_get_end) - sum(&cpu_get_start));
    let gib = size as f64 / GIB;
    let mut nodes = Vec::new();
    for (i, name) in holders
        .iter()
        .map(|n| n.name.clone())
        .chain([reader.name.clone()])
        .enumerate()
    {
        let holder = i < holders.len();
        nodes.push(NodeUsage {
            name,
            role: if i == 0 {
                "writer, holder"
            } else if holder {
                "holder"
            } else {
                "reader"
            },
            put_cpu_secs: holder.then(|| secs(cpu_put[i] - cpu_before[i])),
            get_cpu_secs: secs(cpu_get_end[i] - cpu_get_start[i]),
            put_peak_rss_bytes: holder.then(|| put_rss[i]),
            get_peak_rss_bytes: get_rss[i],
        });
    }
    let result = Result {
        size_bytes: size,
        redundancy: REDUNDANCY,
        writer: writer.name.clone(),
        holders: holders.iter().map(|n| n.name.clone()).collect(),
        reader: reader.name.clone(),
        object: id,
        chunks,
        blake3: input_hash.to_hex().to_string(),
        verified,
        reader_chunks_before_get: reader_chunks,
        put_quorum_secs: put_quorum.as_secs_f64(),
        put_quorum_mb_s: mb_per_s(size, put_quorum),
        put_all_holders_secs: put_all.as_secs_f64(),
        put_all_holders_mb_s: mb_per_s(size, put_all),
        put_cpu_secs: put_cpu,
        put_cpu_secs_per_gib: put_cpu / gib,
        get_secs: get_time.as_secs_f64(),
        get_mb_s: mb_per_s(size, get_time),
        get_cpu_secs: get_cpu,
        get_cpu_secs_per_gib: get_cpu / gib,
        hedged_fetches: hedged,
        peak_rss_reset_per_phase: reset,
        nodes,
    };
    let tables = tables(&result);
    Ok(Outcome {
        result: serde_json::to_value(&result).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        tables,
        problems,
    })
}

fn tables(r: &Result) -> Vec<Table> {
    let mib = r.size_bytes >> 20;
    let mut t = Table::new(
        format!("throughput: {mib} MiB, {}, loopback", r.redundancy),
        &[
            "phase",
            "seconds",
            "MB/s",
            "CPU-s",
            "CPU-s/GiB",
            "meshd processes",
        ],
    );
    let row =
        |phase: &str, secs: f64, mbs: f64, cpu: Option<f64>, per_gib: Option<f64>, who: &str| {
            vec![
                phase.to_string(),
                num(Some(secs), 2),
                num(Some(mbs), 1),
                num(cpu, 1),
                num(per_gib, 1),
                who.to_string(),
            ]
        };
    t.row(row(
        &format!("put on {}, returned at write quorum (2 of 3)", r.writer),
        r.put_quorum_secs,
        r.put_quorum_mb_s,
        None,
        None,
        "",
    ));
    t.row(row(
        "put, until all 3 holders have every chunk",
        r.put_all_holders_secs,
        r.put_all_holders_mb_s,
        Some(r.put_cpu_secs),
        Some(r.put_cpu_secs_per_gib),
        "3 holders",
    ));
    t.row(row(
        &format!("get on {} (holds nothing)", r.reader),
        r.get_secs,
        r.get_mb_s,
        Some(r.get_cpu_secs),
        Some(r.get_cpu_secs_per_gib),
        "3 holders + reader",
    ));
    t.note(format!(
        "object {} ({} chunks); the bytes read back {} (BLAKE3 {})",
        r.object,
        r.chunks,
        if r.verified {
            "match the input"
        } else {
            "DO NOT match the input"
        },
        r.blake3
    ));
    t.note(
        "times are wall clock around `netsim exec NODE -- meshctl ...` (process start included, \
         negligible at this size); MB/s = 10^6 bytes/s of object size; CPU-s = utime + stime of \
         the meshd processes (not meshctl) over the phase, from /proc/PID/stat",
    );
    t.note(format!(
        "the reader started after the put; before the get it held no chunk of the object \
         (checked with stat and status); fetches hedged to a second holder during the get: {}",
        num(r.hedged_fetches, 0)
    ));
    let mut n = Table::new(
        "throughput: per node",
        &[
            "node",
            "role",
            "put CPU-s",
            "get CPU-s",
            "put peak RSS MiB",
            "get peak RSS MiB",
        ],
    );
    let mib_of = |b: u64| num(Some(b as f64 / (1u64 << 20) as f64), 0);
    for node in &r.nodes {
        n.row(vec![
            node.name.clone(),
            node.role.to_string(),
            num(node.put_cpu_secs, 1),
            num(Some(node.get_cpu_secs), 1),
            node.put_peak_rss_bytes.map_or("-".to_string(), mib_of),
            mib_of(node.get_peak_rss_bytes),
        ]);
    }
    n.note(if r.peak_rss_reset_per_phase {
        "peak RSS is VmHWM, reset (clear_refs) at the start of each phase, so each column covers one phase"
    } else {
        "peak RSS is VmHWM since the process started (it could not be reset between phases)"
    });
    vec![t, n]
}

/// "N MB of M stored on the holders", from their status.
fn stored_progress(apis: &[Api], total: u64) -> String {
    let stored: u64 = apis
        .iter()
        .filter_map(|a| a.status().ok())
        .filter_map(|s| s["stored_bytes"].as_u64())
        .sum();
    format!(
        "{:.0} of {:.0} MB stored on the holders",
        stored as f64 / 1e6,
        total as f64 / 1e6
    )
}

/// How many chunks of a `stat` answer list `node` as a holder.
fn held_by(stat: &Value, node: &crate::state::NodeRecord) -> anyhow::Result<u64> {
    let peer = node
        .peer_id
        .as_deref()
        .ok_or_else(|| anyhow!("{} has no peer id yet", node.name))?;
    let chunks = stat["chunks"]
        .as_array()
        .ok_or_else(|| anyhow!("stat has no chunks: {stat}"))?;
    Ok(chunks
        .iter()
        .filter(|c| {
            c["holders"]
                .as_array()
                .is_some_and(|h| h.iter().any(|p| p == peer))
        })
        .count() as u64)
}

/// Bytes of the files in `dir` (the get's temporary file grows there).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}
