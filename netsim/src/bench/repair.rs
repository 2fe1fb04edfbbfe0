//! The repair scenario: how fast the mesh re-creates what a killed holder took with it.
//!
//! One run per [`Policy`]: `rep:3` on `topologies/bench-repair.toml` (a bootstrap peer and five
//! storage nodes on loopback), and on request `ec:4+2` on `bench-repair-ec.toml` (eight nodes).
//! Their `[env]` makes a silent peer dead after 5 s (instead of 60 s) and leaves repair
//! unthrottled. The first node puts a seeded random object and the bench waits until the
//! writer reports nothing completing (every part on its holders). It then SIGKILLs the holder
//! (not the writer) that holds the most parts, and polls the live nodes:
//!
//! - *queued*: some node's `GET /v1/repair` counts more queued parts than before the kill (the
//!   lowest holder not dead found the dead one and queued its lost parts for new holders);
//! - *done*: every live node's `GET /v1/status` counts no object below target (its placement
//!   record names enough live holders for every part) **and** the live nodes together store
//!   at least the queued bytes more than at the kill. Both are needed: the repairer writes the
//!   new record (naming the new holders) before it sends them anything, so the record alone
//!   says nothing about the data having arrived.
//!
//! Then `meshctl stat --json` on every live node must show every part on as many live holders
//! as the policy wants, none of them the killed node, and `meshctl get` on the node that
//! received the most repaired parts (reading them from its own store) must return the input's
//! BLAKE3.
//!
//! Throughput is the queued bytes (each re-created replica or shard once) over the time from
//! queued to done. Detection (kill to queued) is reported apart: it is `dead_after` plus up to
//! one repair scan, not repair work. CPU is utime + stime of the live meshd processes over the
//! repair; the machine's share of busy, iowait and idle time (/proc/stat) shows whether the
//! repair was CPU-bound and whether anything else ran. A run whose checks pass removes the
//! nodes' stores (several GB) and keeps their logs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::markdown::{Table, num};
use super::stats::mb_per_s;
use super::{Api, Outcome, Setup, cpu_ticks_of, data, meshctl_timed, procfs, progress};
use crate::driver::{Driver, parse_json};
use crate::state::{Mode, NodeRecord, ProcessState, Role};

const NAME: &str = "repair";
/// Issue 5: repair throughput on loopback, unthrottled.
pub const GOAL_MB_S: f64 = 100.0;
const GIB: f64 = (1u64 << 30) as f64;
/// How long the third holders may take after the put returned.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long detection may take: `dead_after` (5 s) plus scans, with a wide margin.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the repair itself may take.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct Options {
    pub size_mib: u64,
    /// One run each, in this order.
    pub policies: Vec<Policy>,
}

/// A redundancy policy the scenario repairs, with the topology it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
pub enum Policy {
    /// Five nodes; a killed holder's chunks each lose one of three replicas.
    #[value(name = "rep:3")]
    #[serde(rename = "rep:3")]
    Rep3,
    /// Eight nodes; a killed holder's chunks each lose one of six shards, rebuilt from four.
    #[value(name = "ec:4+2")]
    #[serde(rename = "ec:4+2")]
    Ec4p2,
}

impl Policy {
    pub fn redundancy(self) -> &'static str {
        match self {
            Policy::Rep3 => "rep:3",
            Policy::Ec4p2 => "ec:4+2",
        }
    }

    /// The topology's name and text (shipped in `topologies/`).
    fn topology(self) -> (&'static str, &'static str) {
        match self {
            Policy::Rep3 => (
                "bench-repair",
                include_str!("../../topologies/bench-repair.toml"),
            ),
            Policy::Ec4p2 => (
                "bench-repair-ec",
                include_str!("../../topologies/bench-repair-ec.toml"),
            ),
        }
    }

    /// Holders each part must have after the repair: every replica of a chunk, or the one
    /// holder of a shard.
    fn holders_wanted(self) -> usize {
        match self {
            Policy::Rep3 => 3,
            Policy::Ec4p2 => 1,
        }
    }

    /// The run's subdirectory (no `:` or `+` in paths).
    fn dir(self) -> &'static str {
        match self {
            Policy::Rep3 => "rep3",
            Policy::Ec4p2 => "ec4p2",
        }
    }
}

#[derive(Debug, Serialize)]
struct Result {
    size_bytes: u64,
    redundancy: Policy,
    /// Storage nodes in the topology, the killed one included.
    nodes_total: usize,
    /// The `[env]` of the topology: failure detection and repair settings of every meshd.
    settings: BTreeMap<String, String>,
    object: String,
    chunks: u64,
    blake3: String,
    writer: String,
    killed: String,
    /// Parts (replicas, or shards for ec) the killed node held.
    killed_parts: u64,
    /// Parts of the object in all (chunks x replicas or chunks x shards).
    parts: u64,
    repairer: Option<String>,
    #[serde(flatten)]
    figures: Figures,
    /// From the moment the repair was queued until every live node's record met the target
    /// (the records may get there before the data).
    records_met_target_secs: f64,
    /// From queued until the live nodes stored the queued bytes.
    data_stored_secs: f64,
    /// Of the lost replicas, those the repairer held itself and sent from its own store; the
    /// new holders copied the others from another holder (`Copy`).
    repairer_local_parts: u64,
    /// Bytes the live nodes served to fetches during the repair: replicas the new holders
    /// copied from a holder other than the repairer, and for ec the shards a rebuild read.
    fetched_bytes: u64,
    /// Fetches hedged to a second holder during the repair (`mesh_hedged_fetches_total`).
    hedged_fetches: Option<f64>,
    /// The whole machine during the repair: shares of its CPU time busy, idle with disk I/O
    /// outstanding, and idle (from /proc/stat).
    machine_busy: f64,
    machine_iowait: f64,
    machine_idle: f64,
    /// Of the machine's CPU time during the repair, the share this netsim used (mostly
    /// polling the nodes every 50 ms).
    machine_bench: f64,
    /// The share used by neither the live meshd processes nor this netsim: the bootstrap
    /// peer, `netsim up`, the kernel outside process time, and anything else running (a
    /// benchmark on a shared machine is only as good as this is small).
    machine_other: f64,
    /// Every part on as many live holders as the policy wants, none of them the killed node
    /// (and for ec, the shards of a chunk on distinct holders), on every live node's `meshctl
    /// stat`.
    placement_verified: bool,
    reader: String,
    get_secs: f64,
    get_mb_s: f64,
    verified: bool,
    nodes: Vec<NodeUsage>,
}

/// The figures of one repair, computed from what was measured ([`Figures::compute`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Figures {
    /// Replicas queued for new holders, and their bytes (each re-created replica once).
    parts_repaired: u64,
    bytes_repaired: u64,
    /// Kill to queued: failure detection, dominated by `dead_after`.
    detection_secs: f64,
    /// Queued to done.
    repair_secs: f64,
    repair_mb_s: f64,
    goal_mb_s: f64,
    meets_goal: bool,
    /// utime + stime of the live meshd processes from queued to done.
    repair_cpu_secs: f64,
    repair_cpu_secs_per_gib: f64,
}

impl Figures {
    fn compute(
        parts: u64,
        bytes: u64,
        detection: Duration,
        repair: Duration,
        cpu_secs: f64,
    ) -> Self {
        let repair_mb_s = mb_per_s(bytes, repair);
        let gib = bytes as f64 / GIB;
        Self {
            parts_repaired: parts,
            bytes_repaired: bytes,
            detection_secs: detection.as_secs_f64(),
            repair_secs: repair.as_secs_f64(),
            repair_mb_s,
            goal_mb_s: GOAL_MB_S,
            meets_goal: bytes > 0 && repair_mb_s >= GOAL_MB_S,
            repair_cpu_secs: cpu_secs,
            repair_cpu_secs_per_gib: if gib > 0.0 { cpu_secs / gib } else { 0.0 },
        }
    }
}

#[derive(Debug, Serialize)]
struct NodeUsage {
    name: String,
    role: String,
    /// Replicas or shards it received from the repair.
    parts_received: u64,
    /// How much more it stored at the end than at the kill.
    stored_bytes_gained: i64,
    repair_cpu_secs: f64,
}

/// One run per policy, each on its own mesh; a run that fails is reported and the next one
/// still runs.
pub fn run(setup: &Setup, options: &Options) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        result: json!({ "runs": [] }),
        tables: Vec::new(),
        problems: Vec::new(),
    };
    let mut runs = Vec::new();
    for &policy in &options.policies {
        progress(NAME, &format!("{}: starting", policy.redundancy()));
        match run_policy(setup, options.size_mib.max(1) << 20, policy) {
            Ok(o) => {
                runs.push(o.result);
                outcome.tables.extend(o.tables);
                outcome.problems.extend(
                    o.problems
                        .into_iter()
                        .map(|p| format!("{}: {p}", policy.redundancy())),
                );
            }
            Err(e) => outcome
                .problems
                .push(format!("{}: {e:#}", policy.redundancy())),
        }
    }
    outcome.result = json!({ "runs": runs });
    Ok(outcome)
}

fn run_policy(setup: &Setup, size: u64, policy: Policy) -> anyhow::Result<Outcome> {
    let redundancy = policy.redundancy();
    let (topology_name, topology) = policy.topology();
    let settings = crate::topology::parse(topology, topology_name)
        .with_context(|| format!("the shipped topology {topology_name}"))?
        .env;
    let (driver, _) = Driver::up(
        &setup.run_dir.join(policy.dir()),
        setup.bin_dir.as_deref(),
        topology_name,
        topology,
        Mode::Loopback,
    )?;
    let run_dir = driver.run_dir().to_path_buf();
    progress(NAME, "waiting for the nodes to see each other");
    driver.wait_mesh(super::MESH_TIMEOUT)?;
    let nodes: Vec<NodeRecord> = driver
        .state()?
        .nodes
        .into_iter()
        .filter(|n| n.role == Role::Node && n.state == ProcessState::Running)
        .collect();
    let [writer, ..] = nodes.as_slice() else {
        bail!("the repair topology has no running node");
    };
    let names: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| Some((n.peer_id.clone()?, n.name.clone())))
        .collect();
    let name_of = |peer: &str| names.get(peer).cloned().unwrap_or_else(|| peer.to_string());
    let apis: Vec<Api> = nodes.iter().map(Api::of).collect::<anyhow::Result<_>>()?;

    let input = run_dir.join("input.bin");
    progress(
        NAME,
        &format!("writing {} MiB of seeded random data", size >> 20),
    );
    let input_hash = data::write_file(&input, setup.seed, 0, size, |_| {})
        .with_context(|| format!("cannot write {}", input.display()))?;
    let input_str = input.display().to_string();
    let args = ["--json", "put", &input_str, "--redundancy", redundancy];
    let (out, put_time) = meshctl_timed(&driver, &writer.name, &args, NAME, "put", String::new)?;
    let put = parse_json(&writer.name, &args, &out)?;
    let _ = std::fs::remove_file(&input);
    let id = super::object_id(&put)?;
    let chunks = put["chunks"].as_u64().unwrap_or(0);
    progress(
        NAME,
        &format!(
            "put returned after {:.1} s; object {id}, {chunks} chunks; waiting for all holders",
            put_time.as_secs_f64()
        ),
    );
    super::wait_until(NAME, "all holders", COMPLETE_TIMEOUT, || {
        let left = apis[0].status()?["objects_completing"]
            .as_u64()
            .ok_or_else(|| anyhow!("status has no objects_completing"))?;
        Ok((left == 0, format!("{left} objects completing")))
    })?;

    let before = parts_of(&driver.meshctl_json(&writer.name, &["stat", &id])?)?;
    let writer_peer = writer
        .peer_id
        .clone()
        .ok_or_else(|| anyhow!("{} has no peer id", writer.name))?;
    let (victim_peer, killed_parts) = victim(&before, &writer_peer)
        .ok_or_else(|| anyhow!("no part has a holder other than the writer"))?;
    let killed = name_of(&victim_peer);
    let live: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].name != killed)
        .collect();
    let live_pids: Vec<u32> = live
        .iter()
        .map(|&i| {
            nodes[i]
                .pid
                .ok_or_else(|| anyhow!("{} has no pid", nodes[i].name))
        })
        .collect::<anyhow::Result<_>>()?;
    let ticks = procfs::clock_ticks();

    let repairer_local = |repairer: &str| lost_parts_held_by(&before, &victim_peer, repairer);
    let hedged = || -> Option<f64> {
        live.iter()
            .map(|&i| {
                let text = apis[i].metrics().ok()?;
                Some(super::prometheus_value(&text, "mesh_hedged_fetches_total").unwrap_or(0.0))
            })
            .sum()
    };

    let mut problems = Vec::new();
    let hedged_at_kill = hedged();
    let mut poller = Poller::new(&apis, &live);
    let at_kill = poller.poll()?;
    let base = Totals::of(&at_kill);
    if base.parts_queued > 0 {
        problems.push(format!(
            "repair had queued {} parts before the kill: a live node was taken for dead",
            base.parts_queued
        ));
    }
    progress(
        NAME,
        &format!(
            "killing {killed} (SIGKILL), which holds {killed_parts} of the {} parts",
            before.len()
        ),
    );
    driver.netsim(&["kill", &killed])?;

    // Detection: until some live node has queued parts.
    let mut repairer: Option<usize> = None;
    let detection = super::wait_until(NAME, "detection", QUEUE_TIMEOUT, || {
        let samples = poller.poll()?;
        repairer = live
            .iter()
            .zip(samples.iter().zip(&at_kill))
            .find(|(_, (now, then))| now.parts_queued > then.parts_queued)
            .map(|(&i, _)| i);
        Ok((repairer.is_some(), "no repair queued yet".to_string()))
    })?;
    let cpu_queued = cpu_ticks_of(&live_pids)?;
    let bench_queued = procfs::cpu_ticks(std::process::id()).context("cannot read own CPU time")?;
    let machine_queued = procfs::MachineTicks::read().context("cannot read /proc/stat")?;
    progress(
        NAME,
        &format!(
            "repair queued {:.1} s after the kill, on {}",
            detection.as_secs_f64(),
            repairer.map_or("?", |i| nodes[i].name.as_str())
        ),
    );

    // Repair: until the records are at target everywhere and the data is stored.
    let queued_at = Instant::now();
    let mut records_met = None;
    let mut data_stored = None;
    let mut last = at_kill.clone();
    let repair = super::wait_until(NAME, "repair", REPAIR_TIMEOUT, || {
        last = poller.poll()?;
        let grown = Totals::of(&last).since(&base);
        if grown.records_met() {
            records_met.get_or_insert(queued_at.elapsed());
        }
        if grown.data_stored() {
            data_stored.get_or_insert(queued_at.elapsed());
        }
        Ok((
            grown.records_met() && grown.data_stored(),
            format!(
                "{:.0} of {:.0} MB stored, {} objects below target",
                grown.stored_bytes as f64 / 1e6,
                grown.bytes_queued as f64 / 1e6,
                grown.below_target
            ),
        ))
    })?;
    let cpu_done = cpu_ticks_of(&live_pids)?;
    let bench_ticks = procfs::cpu_ticks(std::process::id())
        .context("cannot read own CPU time")?
        .saturating_sub(bench_queued);
    let machine = procfs::MachineTicks::read()
        .context("cannot read /proc/stat")?
        .since(&machine_queued);
    let (machine_busy, machine_iowait, machine_idle) = machine.fractions();
    let meshd_ticks = cpu_done.iter().sum::<u64>() - cpu_queued.iter().sum::<u64>();
    let share = |ticks: u64| ticks as f64 / machine.total().max(1) as f64;
    let machine_bench = share(bench_ticks);
    let machine_other = share(machine.busy.saturating_sub(meshd_ticks + bench_ticks));
    let hedged_fetches = hedged().zip(hedged_at_kill).map(|(now, then)| now - then);
    let grown = Totals::of(&last).since(&base);
    let cpu_secs = meshd_ticks as f64 / ticks as f64;
    let figures = Figures::compute(
        grown.parts_queued,
        grown.bytes_queued,
        detection,
        repair,
        cpu_secs,
    );
    progress(
        NAME,
        &format!(
            "repaired {:.0} MB in {:.1} s ({:.0} MB/s; goal {GOAL_MB_S:.0} MB/s)",
            figures.bytes_repaired as f64 / 1e6,
            figures.repair_secs,
            figures.repair_mb_s
        ),
    );

    // Every live node's view of the placement; the repairer's has the newest record.
    let mut after: Option<Vec<Part>> = None;
    let mut placement_verified = true;
    for &i in &live {
        let parts = parts_of(&driver.meshctl_json(&nodes[i].name, &["stat", &id])?)?;
        for p in placement_problems(&parts, policy.holders_wanted(), &victim_peer) {
            placement_verified = false;
            problems.push(format!("{}'s stat after the repair: {p}", nodes[i].name));
        }
        if repairer == Some(i) || after.is_none() {
            after = Some(parts);
        }
    }
    let received = received_parts(&before, after.as_deref().unwrap_or_default())?;

    // The node that received the most replicas reads the object, those from its own store.
    let reader = received
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(peer, _)| name_of(peer))
        .unwrap_or_else(|| writer.name.clone());
    let output = run_dir.join("output.bin");
    let output_str = output.display().to_string();
    let args = ["get", &id, "-o", &output_str];
    let (_, get_time) = meshctl_timed(&driver, &reader, &args, NAME, "get", String::new)?;
    let (output_hash, output_len) =
        data::hash_file(&output).with_context(|| format!("cannot read {}", output.display()))?;
    let _ = std::fs::remove_file(&output);
    let verified = output_hash == input_hash && output_len == size;
    if !verified {
        problems.push(format!(
            "the object read back on {reader} differs: {output_len} bytes with BLAKE3 {}, put \
             {size} bytes with BLAKE3 {}",
            output_hash.to_hex(),
            input_hash.to_hex()
        ));
    }
    driver.down();
    if verified && placement_verified {
        // Several GB of node stores; kept only when something needs looking into.
        let _ = std::fs::remove_dir_all(run_dir.join("nodes"));
    }

    let usage = live
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let node = &nodes[i];
            let received = node
                .peer_id
                .as_ref()
                .and_then(|p| received.get(p))
                .copied()
                .unwrap_or(0);
            let roles = [
                (i == 0, "writer"),
                (repairer == Some(i), "repairer"),
                (received > 0, "new holder"),
            ];
            NodeUsage {
                name: node.name.clone(),
                role: roles
                    .iter()
                    .filter(|(is, _)| *is)
                    .map(|(_, r)| *r)
                    .collect::<Vec<_>>()
                    .join(", "),
                parts_received: received,
                stored_bytes_gained: last[j].stored_bytes as i64 - at_kill[j].stored_bytes as i64,
                repair_cpu_secs: (cpu_done[j] - cpu_queued[j]) as f64 / ticks as f64,
            }
        })
        .collect();
    let result = Result {
        size_bytes: size,
        redundancy: policy,
        nodes_total: nodes.len(),
        settings,
        object: id,
        chunks,
        blake3: input_hash.to_hex().to_string(),
        writer: writer.name.clone(),
        killed,
        killed_parts,
        parts: before.len() as u64,
        repairer: repairer.map(|i| nodes[i].name.clone()),
        figures,
        records_met_target_secs: records_met.unwrap_or(repair).as_secs_f64(),
        data_stored_secs: data_stored.unwrap_or(repair).as_secs_f64(),
        repairer_local_parts: repairer
            .and_then(|i| nodes[i].peer_id.as_deref())
            .map_or(0, repairer_local),
        fetched_bytes: grown.bytes_served,
        hedged_fetches,
        machine_busy,
        machine_iowait,
        machine_idle,
        machine_bench,
        machine_other,
        placement_verified,
        reader,
        get_secs: get_time.as_secs_f64(),
        get_mb_s: mb_per_s(size, get_time),
        verified,
        nodes: usage,
    };
    Ok(Outcome {
        tables: tables(&result),
        result: serde_json::to_value(&result).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        problems,
    })
}

/// One live node as a poll reads it (`/v1/status` and `/v1/repair`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct NodeSample {
    parts_queued: u64,
    bytes_queued: u64,
    stored_bytes: u64,
    bytes_served: u64,
    below_target: u64,
}

impl NodeSample {
    fn read(api: &Api, client: &mut super::http::Client) -> anyhow::Result<Self> {
        let status = api.get_json_with(client, "/v1/status")?;
        let repair = api.get_json_with(client, "/v1/repair")?;
        let field = |v: &Value, key: &str| {
            v[key]
                .as_u64()
                .ok_or_else(|| anyhow!("{} answered no {key}: {v}", api.node))
        };
        Ok(Self {
            parts_queued: field(&repair, "parts_queued")?,
            bytes_queued: field(&repair, "bytes_queued")?,
            stored_bytes: field(&status, "stored_bytes")?,
            bytes_served: field(&status, "bytes_served")?,
            below_target: field(&status, "objects_below_target")?,
        })
    }
}

/// The live nodes' samples added up, and what changed since a baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    parts_queued: u64,
    bytes_queued: u64,
    stored_bytes: u64,
    bytes_served: u64,
    below_target: u64,
}

impl Totals {
    fn of(samples: &[NodeSample]) -> Self {
        samples.iter().fold(Self::default(), |t, s| Self {
            parts_queued: t.parts_queued + s.parts_queued,
            bytes_queued: t.bytes_queued + s.bytes_queued,
            stored_bytes: t.stored_bytes + s.stored_bytes,
            bytes_served: t.bytes_served + s.bytes_served,
            below_target: t.below_target + s.below_target,
        })
    }

    /// Counters grown since `base` (none of them shrinks while a repair runs).
    fn since(&self, base: &Self) -> Self {
        Self {
            parts_queued: self.parts_queued.saturating_sub(base.parts_queued),
            bytes_queued: self.bytes_queued.saturating_sub(base.bytes_queued),
            stored_bytes: self.stored_bytes.saturating_sub(base.stored_bytes),
            bytes_served: self.bytes_served.saturating_sub(base.bytes_served),
            below_target: self.below_target,
        }
    }

    /// Records at their target everywhere, and the queued bytes stored on the live nodes.
    fn records_met(&self) -> bool {
        self.below_target == 0
    }

    fn data_stored(&self) -> bool {
        self.bytes_queued > 0 && self.stored_bytes >= self.bytes_queued
    }
}

/// Reads the live nodes, each over its own kept-alive connection: the bench polls every
/// 50 ms while the nodes work, and a connection per request made that polling a visible share
/// of the machine's CPU.
struct Poller {
    nodes: Vec<(Api, super::http::Client)>,
}

impl Poller {
    fn new(apis: &[Api], live: &[usize]) -> Self {
        Self {
            nodes: live
                .iter()
                .map(|&i| (apis[i].clone(), apis[i].polling_client()))
                .collect(),
        }
    }

    fn poll(&mut self) -> anyhow::Result<Vec<NodeSample>> {
        self.nodes
            .iter_mut()
            .map(|(api, client)| NodeSample::read(api, client))
            .collect()
    }
}

/// One part of an object (a chunk's replicas for `rep:N`, one shard for `ec:K+M`): its
/// holders' peer ids with their liveness as the answering node sees it.
#[derive(Debug, Clone, PartialEq)]
struct Part {
    /// Index of the chunk in the object.
    chunk: usize,
    holders: Vec<(String, String)>,
}

/// The parts of a `meshctl --json stat` answer, in order.
fn parts_of(stat: &Value) -> anyhow::Result<Vec<Part>> {
    let chunks = stat["chunks"]
        .as_array()
        .ok_or_else(|| anyhow!("stat printed no chunks: {stat}"))?;
    let placed = |chunk: usize, v: &Value| -> anyhow::Result<Part> {
        let holders = v["placed"]
            .as_array()
            .ok_or_else(|| anyhow!("stat lists no holders (`placed`) for a part: {v}"))?
            .iter()
            .map(|h| {
                Ok((
                    h["id"]
                        .as_str()
                        .ok_or_else(|| anyhow!("a holder without an id: {h}"))?
                        .to_string(),
                    h["liveness"].as_str().unwrap_or("unknown").to_string(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Part { chunk, holders })
    };
    let mut parts = Vec::new();
    for (index, chunk) in chunks.iter().enumerate() {
        match chunk["shards"].as_array().filter(|s| !s.is_empty()) {
            Some(shards) => {
                for shard in shards {
                    parts.push(placed(index, shard)?);
                }
            }
            None => parts.push(placed(index, chunk)?),
        }
    }
    Ok(parts)
}

/// The holder to kill: the peer other than `writer` that holds the most parts (the lowest
/// peer id among equals), with how many it holds.
fn victim(parts: &[Part], writer: &str) -> Option<(String, u64)> {
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for part in parts {
        for (peer, _) in &part.holders {
            if peer != writer {
                *held.entry(peer).or_default() += 1;
            }
        }
    }
    held.into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(peer, n)| (peer.to_string(), n))
}

/// What is wrong with the placement after the repair: parts short of `wanted` holders, held
/// by the killed peer, held by a peer that is not alive, or on a holder that holds another
/// part of the same chunk (two shards of one chunk on one peer: losing it loses both). One
/// line per kind of fault, with a count and the first part it was found in.
fn placement_problems(parts: &[Part], wanted: usize, killed: &str) -> Vec<String> {
    let mut faults: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut note = |kind: &'static str, index: usize| {
        faults.entry(kind).or_insert((0, index)).0 += 1;
    };
    for (index, part) in parts.iter().enumerate() {
        if part.holders.len() < wanted {
            note("fewer holders than the policy wants", index);
        }
        if part.holders.iter().any(|(peer, _)| peer == killed) {
            note("the killed node is still a holder", index);
        }
        if part
            .holders
            .iter()
            .any(|(peer, l)| peer != killed && l != "alive" && l != "self")
        {
            note("a holder is not alive", index);
        }
        let shares_a_holder = parts[..index]
            .iter()
            .rev()
            .take_while(|earlier| earlier.chunk == part.chunk)
            .any(|earlier| {
                earlier
                    .holders
                    .iter()
                    .any(|(peer, _)| part.holders.iter().any(|(p, _)| p == peer))
            });
        if shares_a_holder {
            note(
                "a holder of another part of the same chunk holds it too",
                index,
            );
        }
    }
    faults
        .into_iter()
        .map(|(kind, (count, first))| {
            format!(
                "{count} of {} parts: {kind} (first: part {first})",
                parts.len()
            )
        })
        .collect()
}

/// Of the parts `killed` held, how many `peer` held too.
fn lost_parts_held_by(parts: &[Part], killed: &str, peer: &str) -> u64 {
    let holds = |part: &Part, who: &str| part.holders.iter().any(|(p, _)| p == who);
    parts
        .iter()
        .filter(|part| holds(part, killed) && holds(part, peer))
        .count() as u64
}

/// Per peer, the parts it holds in `after` and did not in `before`.
fn received_parts(before: &[Part], after: &[Part]) -> anyhow::Result<BTreeMap<String, u64>> {
    if before.len() != after.len() {
        bail!(
            "the object had {} parts before the repair and {} after",
            before.len(),
            after.len()
        );
    }
    let mut received: BTreeMap<String, u64> = BTreeMap::new();
    for (b, a) in before.iter().zip(after) {
        for (peer, _) in &a.holders {
            if !b.holders.iter().any(|(p, _)| p == peer) {
                *received.entry(peer.clone()).or_default() += 1;
            }
        }
    }
    Ok(received)
}

fn tables(r: &Result) -> Vec<Table> {
    let f = &r.figures;
    let mib = r.size_bytes >> 20;
    let mut t = Table::new(
        format!(
            "repair: {mib} MiB {}, {} loopback nodes, one holder killed",
            r.redundancy.redundancy(),
            r.nodes_total
        ),
        &["step", "seconds", "MB", "MB/s", "CPU-s", "CPU-s/GiB"],
    );
    t.row(vec![
        format!("detection: kill {} until repair queued", r.killed),
        num(Some(f.detection_secs), 2),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    t.row(vec![
        format!(
            "repair: {} {} re-created (queued until stored, records at target)",
            f.parts_repaired,
            match r.redundancy {
                Policy::Rep3 => "replicas",
                Policy::Ec4p2 => "shards",
            }
        ),
        num(Some(f.repair_secs), 2),
        num(Some(f.bytes_repaired as f64 / 1e6), 0),
        num(Some(f.repair_mb_s), 1),
        num(Some(f.repair_cpu_secs), 1),
        num(Some(f.repair_cpu_secs_per_gib), 1),
    ]);
    t.row(vec![
        format!("get on {} after the repair", r.reader),
        num(Some(r.get_secs), 2),
        num(Some(r.size_bytes as f64 / 1e6), 0),
        num(Some(r.get_mb_s), 1),
        String::new(),
        String::new(),
    ]);
    t.note(format!(
        "goal: repair >= {:.0} MB/s unthrottled: {}",
        f.goal_mb_s,
        if f.meets_goal { "met" } else { "MISSED" }
    ));
    let sources = match r.redundancy {
        Policy::Rep3 => format!(
            "{} sent from its own store and {} copied by their new holder from another holder",
            r.repairer_local_parts,
            f.parts_repaired.saturating_sub(r.repairer_local_parts)
        ),
        Policy::Ec4p2 => "each rebuilt from 4 other shards of its chunk".to_string(),
    };
    t.note(format!(
        "{} held {} of the object's {} parts ({} chunks); {} repaired them (the lowest holder \
         not dead), {sources} ({:.0} MB served to fetches, {} fetches hedged); the records \
         met the target {:.2} s after queued, the data was stored after {:.2} s",
        r.killed,
        r.killed_parts,
        r.parts,
        r.chunks,
        r.repairer.as_deref().unwrap_or("?"),
        r.fetched_bytes as f64 / 1e6,
        num(r.hedged_fetches, 0),
        r.records_met_target_secs,
        r.data_stored_secs,
    ));
    t.note(format!(
        "during the repair the machine's CPUs were {:.0}% busy ({:.0}% this netsim's polling, \
         {:.0}% neither it nor the live meshd processes), {:.0}% idle waiting for disk, {:.0}% \
         idle; the meshd processes used {:.2} cores on average",
        r.machine_busy * 100.0,
        r.machine_bench * 100.0,
        r.machine_other * 100.0,
        r.machine_iowait * 100.0,
        r.machine_idle * 100.0,
        if f.repair_secs > 0.0 {
            f.repair_cpu_secs / f.repair_secs
        } else {
            0.0
        }
    ));
    t.note(format!(
        "placement after the repair {} (every {} on {} live holder(s), none the killed node, \
         no two parts of a chunk on one holder, on every live node's stat); the bytes read back \
         {} (BLAKE3 {})",
        if r.placement_verified {
            "checked"
        } else {
            "WRONG"
        },
        match r.redundancy {
            Policy::Rep3 => "chunk",
            Policy::Ec4p2 => "shard",
        },
        r.redundancy.holders_wanted(),
        if r.verified {
            "match the input"
        } else {
            "DO NOT match the input"
        },
        r.blake3
    ));
    let settings: Vec<String> = r.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    t.note(format!(
        "meshd settings: {}; MB/s = 10^6 bytes of re-created replicas per second; CPU-s = \
         utime + stime of the live meshd processes",
        settings.join(" ")
    ));
    let mut n = Table::new(
        "repair: per live node",
        &["node", "role", "replicas received", "MB stored", "CPU-s"],
    );
    for node in &r.nodes {
        n.row(vec![
            node.name.clone(),
            node.role.clone(),
            node.parts_received.to_string(),
            num(Some(node.stored_bytes_gained as f64 / 1e6), 0),
            num(Some(node.repair_cpu_secs), 1),
        ]);
    }
    vec![t, n]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts of replicated chunks: one per chunk.
    fn replicas(parts: &[&[(&str, &str)]]) -> Vec<Part> {
        parts
            .iter()
            .enumerate()
            .map(|(chunk, holders)| shard(chunk, holders))
            .collect()
    }

    fn shard(chunk: usize, holders: &[(&str, &str)]) -> Part {
        Part {
            chunk,
            holders: holders
                .iter()
                .map(|(p, l)| (p.to_string(), l.to_string()))
                .collect(),
        }
    }

    #[test]
    fn figures_from_measurements() {
        let f = Figures::compute(
            300,
            300_000_000,
            Duration::from_secs(6),
            Duration::from_secs(2),
            3.0,
        );
        assert_eq!(f.repair_mb_s, 150.0);
        assert!(f.meets_goal);
        assert_eq!(f.detection_secs, 6.0);
        assert!((f.repair_cpu_secs_per_gib - 3.0 / (300e6 / GIB)).abs() < 1e-9);
        let slow = Figures::compute(
            300,
            300_000_000,
            Duration::ZERO,
            Duration::from_secs(4),
            1.0,
        );
        assert_eq!(slow.repair_mb_s, 75.0);
        assert!(!slow.meets_goal);
        let nothing = Figures::compute(0, 0, Duration::ZERO, Duration::ZERO, 0.0);
        assert!(!nothing.meets_goal, "no bytes repaired meets no goal");
        assert_eq!(nothing.repair_cpu_secs_per_gib, 0.0);
    }

    #[test]
    fn totals_add_up_and_compare_with_the_kill() {
        let at_kill = Totals::of(&[
            NodeSample {
                stored_bytes: 100,
                bytes_served: 5,
                ..Default::default()
            },
            NodeSample {
                stored_bytes: 50,
                ..Default::default()
            },
        ]);
        assert_eq!(at_kill.stored_bytes, 150);
        let queued_only = Totals::of(&[
            NodeSample {
                parts_queued: 2,
                bytes_queued: 40,
                stored_bytes: 100,
                bytes_served: 5,
                below_target: 0,
            },
            NodeSample {
                stored_bytes: 70,
                below_target: 1,
                ..Default::default()
            },
        ])
        .since(&at_kill);
        assert_eq!(
            queued_only,
            Totals {
                parts_queued: 2,
                bytes_queued: 40,
                stored_bytes: 20,
                bytes_served: 0,
                below_target: 1
            }
        );
        assert!(!queued_only.records_met() && !queued_only.data_stored());
        let done = Totals {
            stored_bytes: 40,
            below_target: 0,
            ..queued_only
        };
        assert!(done.records_met() && done.data_stored());
        assert!(
            !Totals::default().data_stored(),
            "nothing queued is not done"
        );
    }

    #[test]
    fn parts_of_replicas_and_shards() {
        let stat = json!({"chunks": [
            {"placed": [{"id": "a", "liveness": "self"}, {"id": "b", "liveness": "alive"}]},
            {"placed": [{"id": "a", "liveness": "self"}], "shards": [
                {"placed": [{"id": "c", "liveness": "dead"}]},
                {"placed": [{"id": "d"}]},
            ]},
        ]});
        assert_eq!(
            parts_of(&stat).expect("parts"),
            [
                shard(0, &[("a", "self"), ("b", "alive")]),
                shard(1, &[("c", "dead")]),
                shard(1, &[("d", "unknown")]),
            ]
        );
        assert!(parts_of(&json!({"error": "x"})).is_err());
        assert!(parts_of(&json!({"chunks": [{"holders": ["a"]}]})).is_err());
    }

    #[test]
    fn the_victim_holds_the_most_and_is_not_the_writer() {
        let parts = replicas(&[
            &[("w", "self"), ("b", "alive"), ("c", "alive")],
            &[("w", "self"), ("c", "alive"), ("d", "alive")],
            &[("w", "self"), ("b", "alive"), ("d", "alive")],
            &[("w", "self"), ("b", "alive"), ("e", "alive")],
        ]);
        assert_eq!(victim(&parts, "w"), Some(("b".to_string(), 3)));
        // Equals: the lowest peer id.
        assert_eq!(victim(&parts[..2], "w"), Some(("c".to_string(), 2)));
        assert_eq!(victim(&parts[..1], "w"), Some(("b".to_string(), 1)));
        assert_eq!(victim(&replicas(&[&[("w", "self")]]), "w"), None);
    }

    #[test]
    fn placement_faults_are_counted_by_kind() {
        let good = replicas(&[
            &[("a", "self"), ("b", "alive"), ("c", "alive")],
            &[("a", "self"), ("c", "alive"), ("d", "alive")],
        ]);
        assert!(placement_problems(&good, 3, "k").is_empty());
        // Shards of one chunk on distinct holders, then two on one holder.
        let shards = [
            shard(0, &[("a", "self")]),
            shard(0, &[("b", "alive")]),
            shard(1, &[("a", "self")]),
            shard(1, &[("c", "alive")]),
            shard(1, &[("a", "self")]),
        ];
        assert!(placement_problems(&shards[..4], 1, "k").is_empty());
        assert_eq!(
            placement_problems(&shards, 1, "k"),
            [
                "1 of 5 parts: a holder of another part of the same chunk holds it too (first: part 4)"
            ]
        );
        let bad = replicas(&[
            &[("a", "self"), ("b", "alive"), ("k", "dead")],
            &[("a", "self"), ("c", "suspect")],
            &[("a", "self"), ("c", "alive"), ("d", "alive")],
            &[("a", "self"), ("k", "dead"), ("d", "alive")],
        ]);
        assert_eq!(
            placement_problems(&bad, 3, "k"),
            [
                "1 of 4 parts: a holder is not alive (first: part 1)",
                "1 of 4 parts: fewer holders than the policy wants (first: part 1)",
                "2 of 4 parts: the killed node is still a holder (first: part 0)",
            ]
        );
    }

    #[test]
    fn lost_parts_the_repairer_held() {
        let parts = replicas(&[
            &[("a", "self"), ("r", "alive"), ("k", "alive")],
            &[("a", "self"), ("b", "alive"), ("k", "alive")],
            &[("a", "self"), ("r", "alive"), ("b", "alive")],
        ]);
        assert_eq!(lost_parts_held_by(&parts, "k", "r"), 1);
        assert_eq!(lost_parts_held_by(&parts, "k", "a"), 2);
        assert_eq!(lost_parts_held_by(&parts, "k", "x"), 0);
    }

    #[test]
    fn received_parts_are_the_new_holders() {
        let before = replicas(&[
            &[("a", "self"), ("b", "alive"), ("k", "alive")],
            &[("a", "self"), ("b", "alive"), ("c", "alive")],
            &[("k", "alive"), ("b", "alive"), ("c", "alive")],
        ]);
        let after = replicas(&[
            &[("a", "self"), ("b", "alive"), ("d", "alive")],
            &[("a", "self"), ("b", "alive"), ("c", "alive")],
            &[("d", "alive"), ("b", "alive"), ("c", "alive")],
        ]);
        let received = received_parts(&before, &after).expect("same parts");
        assert_eq!(received, BTreeMap::from([("d".to_string(), 2)]));
        assert!(received_parts(&before, &after[..2]).is_err());
    }
}
