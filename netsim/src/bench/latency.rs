//! The latency scenario: small objects across the emulated WAN of `three-clouds`.
//!
//! Six nodes, two in each of aws, gcp and azure, behind netsim's router (netns mode, root).
//! From the first node of each cloud, `count` objects of 1 MiB (distinct seeded contents) are
//! put with `rep:3`; after the writers report no object still completing, `meshctl stat`
//! tells where each object's chunks went. Then every object is got from every cloud, from a
//! node of that cloud that holds none of its chunks when there is one (else from a holder,
//! and the table counts those reads), and checked by BLAKE3.
//!
//! What a sample measures: the wall time of `netsim exec NODE -- meshctl ...`, i.e. starting
//! netsim, entering the namespace, starting meshctl, meshctl's own status check (meshctl put
//! asks `/v1/status` before it streams), the request, and the exit. That start-up cost is
//! measured on its own by timing `netsim exec NODE -- meshctl status` on every node, and
//! reported next to the figures; nothing is subtracted from them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::json;

use super::markdown::{Table, num};
use super::stats::Summary;
use super::{Outcome, REDUNDANCY, Setup, data, progress};
use crate::driver::{Driver, check_output, parse_json};
use crate::state::{Mode, NodeRecord, Role};

const TOPOLOGY: &str = include_str!("../../topologies/three-clouds.toml");
const NAME: &str = "latency";
const OBJECT_SIZE: usize = 1 << 20;
/// Data streams of this scenario start here (the throughput input is stream 0).
const STREAM_BASE: u64 = 1 << 32;
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Options {
    /// Objects per writer cloud (and so gets per writer/reader pair).
    pub count: usize,
    /// `meshctl status` calls per node for the start-up cost.
    pub overhead_samples: usize,
}

#[derive(Debug, Serialize)]
struct Result {
    object_size: usize,
    redundancy: &'static str,
    count_per_pair: usize,
    measured: &'static str,
    overhead: Vec<OverheadRow>,
    overhead_all: Option<Summary>,
    puts: Vec<PutRow>,
    gets: Vec<GetRow>,
    gets_by_reader: Vec<ReaderRow>,
    verified: usize,
    mismatched: usize,
}

#[derive(Debug, Serialize)]
struct OverheadRow {
    cloud: String,
    nodes: Vec<String>,
    summary: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct PutRow {
    cloud: String,
    node: String,
    summary: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct GetRow {
    writer_cloud: String,
    reader_cloud: String,
    reader_nodes: Vec<String>,
    /// Gets that had to run on a node holding a chunk of the object.
    from_holder: usize,
    summary: Option<Summary>,
}

#[derive(Debug, Serialize)]
struct ReaderRow {
    reader_cloud: String,
    from_holder: usize,
    summary: Option<Summary>,
}

struct Object {
    id: String,
    hash: blake3::Hash,
    /// Names of the nodes holding any of its chunks.
    holders: BTreeSet<String>,
}

pub fn run(setup: &Setup, options: &Options) -> anyhow::Result<Outcome> {
    let count = options.count.max(1);
    let (driver, state) = Driver::up(
        &setup.run_dir,
        setup.bin_dir.as_deref(),
        "three-clouds",
        TOPOLOGY,
        Mode::Netns,
    )?;
    let run_dir = driver.run_dir().to_path_buf();
    progress(NAME, "waiting for the nodes to see each other");
    driver.wait_mesh(super::MESH_TIMEOUT)?;

    // Clouds in file order, with their storage nodes.
    let mut clouds: Vec<(String, Vec<NodeRecord>)> = Vec::new();
    for n in state.nodes.iter().filter(|n| n.role == Role::Node) {
        let cloud = n.region.split('/').next().unwrap_or(&n.region).to_string();
        match clouds.iter_mut().find(|(c, _)| *c == cloud) {
            Some((_, nodes)) => nodes.push(n.clone()),
            None => clouds.push((cloud, vec![n.clone()])),
        }
    }
    let names: BTreeMap<String, String> = state
        .nodes
        .iter()
        .filter_map(|n| Some((n.peer_id.clone()?, n.name.clone())))
        .collect();

    progress(
        NAME,
        &format!(
            "start-up cost: {} x `netsim exec NODE -- meshctl --json status` on each node",
            options.overhead_samples
        ),
    );
    let mut overhead = Vec::new();
    let mut overhead_all = Vec::new();
    for (cloud, nodes) in &clouds {
        let mut samples = Vec::new();
        for _ in 0..options.overhead_samples.max(1) {
            for n in nodes {
                let (_, t) = timed(&driver, &n.name, &["--json", "status"])?;
                samples.push(t);
            }
        }
        overhead_all.extend_from_slice(&samples);
        overhead.push(OverheadRow {
            cloud: cloud.clone(),
            nodes: nodes.iter().map(|n| n.name.clone()).collect(),
            summary: Summary::of(&samples),
        });
    }

    let files = run_dir.join("objects");
    let _ = std::fs::remove_dir_all(&files);
    std::fs::create_dir_all(&files).context("cannot create the objects directory")?;
    let mut objects: Vec<Vec<Object>> = Vec::new();
    let mut puts = Vec::new();
    for (w, (cloud, nodes)) in clouds.iter().enumerate() {
        let writer = &nodes[0];
        progress(
            NAME,
            &format!("put {count} x 1 MiB from {} ({cloud})", writer.name),
        );
        let mut samples = Vec::new();
        let mut written = Vec::new();
        let mut last_progress = Instant::now();
        for i in 0..count {
            if last_progress.elapsed() >= super::PROGRESS_EVERY {
                progress(NAME, &format!("put {i} of {count} from {}", writer.name));
                last_progress = Instant::now();
            }
            let stream = STREAM_BASE + (w * count + i) as u64;
            let bytes = data::bytes(setup.seed, stream, OBJECT_SIZE);
            let path = files.join(format!("{cloud}-{i}.bin"));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let path = path.display().to_string();
            let args = ["--json", "put", &path, "--redundancy", REDUNDANCY];
            let (out, t) = timed(&driver, &writer.name, &args)?;
            let id = super::object_id(&parse_json(&writer.name, &args, &out)?)?;
            samples.push(t);
            written.push(Object {
                id,
                hash: blake3::hash(&bytes),
                holders: BTreeSet::new(),
            });
        }
        puts.push(PutRow {
            cloud: cloud.clone(),
            node: writer.name.clone(),
            summary: Summary::of(&samples),
        });
        objects.push(written);
    }

    progress(NAME, "waiting until every object has all its holders");
    for (_, nodes) in &clouds {
        let writer = &nodes[0].name;
        super::wait_until(NAME, "third holders", COMPLETE_TIMEOUT, || {
            let status = driver.meshctl_json(writer, &["status"])?;
            let left = status["objects_completing"]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no objects_completing: {status}"))?;
            Ok((left == 0, format!("{left} objects completing on {writer}")))
        })?;
    }
    for ((_, nodes), written) in clouds.iter().zip(&mut objects) {
        for o in written.iter_mut() {
            let stat = driver.meshctl_json(&nodes[0].name, &["stat", &o.id])?;
            for chunk in stat["chunks"]
                .as_array()
                .ok_or_else(|| anyhow!("meshctl stat printed no chunks: {stat}"))?
            {
                for peer in chunk["holders"].as_array().into_iter().flatten() {
                    let peer = peer.as_str().unwrap_or("?");
                    o.holders
                        .insert(names.get(peer).cloned().unwrap_or_else(|| peer.to_string()));
                }
            }
        }
    }

    // Every object from every cloud, interleaved so that drift over time spreads evenly.
    let mut get_samples: BTreeMap<(usize, usize), Vec<Duration>> = BTreeMap::new();
    let mut get_nodes: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
    let mut from_holder: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut problems = Vec::new();
    let (mut verified, mut mismatched) = (0, 0);
    let total = count * clouds.len() * clouds.len();
    let mut done = 0;
    let mut last_progress = Instant::now();
    for i in 0..count {
        for (w, written) in objects.iter().enumerate() {
            let o = &written[i];
            for (r, (_, nodes)) in clouds.iter().enumerate() {
                let (reader, holder) = match nodes.iter().find(|n| !o.holders.contains(&n.name)) {
                    Some(n) => (n, false),
                    None => (&nodes[0], true),
                };
                let args = ["get", &o.id, "-o", "-"];
                let started = Instant::now();
                let out = driver
                    .meshctl_command(&reader.name, &args)
                    .output()
                    .context("cannot run netsim exec")?;
                let t = started.elapsed();
                if !out.status.success() {
                    check_output(&reader.name, &args, &out)?;
                }
                if blake3::hash(&out.stdout) == o.hash && out.stdout.len() == OBJECT_SIZE {
                    verified += 1;
                } else {
                    mismatched += 1;
                    problems.push(format!(
                        "{} read {} back as {} bytes that differ from what {} put",
                        reader.name,
                        o.id,
                        out.stdout.len(),
                        clouds[w].1[0].name
                    ));
                }
                get_samples.entry((w, r)).or_default().push(t);
                get_nodes
                    .entry((w, r))
                    .or_default()
                    .insert(reader.name.clone());
                *from_holder.entry((w, r)).or_default() += usize::from(holder);
                done += 1;
                if last_progress.elapsed() >= super::PROGRESS_EVERY {
                    progress(NAME, &format!("get {done} of {total}"));
                    last_progress = Instant::now();
                }
            }
        }
    }
    driver.down();
    let _ = std::fs::remove_dir_all(&files);

    let mut gets = Vec::new();
    for ((w, r), samples) in &get_samples {
        gets.push(GetRow {
            writer_cloud: clouds[*w].0.clone(),
            reader_cloud: clouds[*r].0.clone(),
            reader_nodes: get_nodes
                .get(&(*w, *r))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            from_holder: from_holder.get(&(*w, *r)).copied().unwrap_or(0),
            summary: Summary::of(samples),
        });
    }
    let gets_by_reader = clouds
        .iter()
        .enumerate()
        .map(|(r, (cloud, _))| {
            let samples: Vec<Duration> = get_samples
                .iter()
                .filter(|((_, rr), _)| *rr == r)
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            ReaderRow {
                reader_cloud: cloud.clone(),
                from_holder: from_holder
                    .iter()
                    .filter(|((_, rr), _)| *rr == r)
                    .map(|(_, n)| n)
                    .sum(),
                summary: Summary::of(&samples),
            }
        })
        .collect();
    if verified == 0 {
        bail!("no get succeeded");
    }
    let result = Result {
        object_size: OBJECT_SIZE,
        redundancy: REDUNDANCY,
        count_per_pair: count,
        measured: "wall time of `netsim exec NODE -- meshctl ...` per operation, process start-up included; the start-up cost is in `overhead`",
        overhead,
        overhead_all: Summary::of(&overhead_all),
        puts,
        gets,
        gets_by_reader,
        verified,
        mismatched,
    };
    Ok(Outcome {
        tables: tables(&result),
        result: serde_json::to_value(&result).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        problems,
    })
}

/// Runs `netsim exec NODE -- meshctl ARGS` and times it from spawn to exit.
fn timed(driver: &Driver, node: &str, args: &[&str]) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let out = driver
        .meshctl_command(node, args)
        .output()
        .context("cannot run netsim exec")?;
    let t = started.elapsed();
    Ok((check_output(node, args, &out)?, t))
}

fn ms(s: &Option<Summary>, f: impl Fn(&Summary) -> f64) -> String {
    num(s.as_ref().map(f), 1)
}

fn tables(r: &Result) -> Vec<Table> {
    let overhead_p50 = r.overhead_all.as_ref().map(|s| s.p50_ms);
    let mut put = Table::new(
        format!(
            "latency: put of 1 MiB, {}, three-clouds (netns), ms",
            r.redundancy
        ),
        &[
            "writer cloud",
            "node",
            "n",
            "p50",
            "p99",
            "mean",
            "p50 - start-up p50",
        ],
    );
    for p in &r.puts {
        put.row(vec![
            p.cloud.clone(),
            p.node.clone(),
            p.summary.as_ref().map_or(0, |s| s.count).to_string(),
            ms(&p.summary, |s| s.p50_ms),
            ms(&p.summary, |s| s.p99_ms),
            ms(&p.summary, |s| s.mean_ms),
            num(
                p.summary
                    .as_ref()
                    .zip(overhead_p50)
                    .map(|(s, o)| s.p50_ms - o),
                1,
            ),
        ]);
    }
    put.note(
        "each sample is the wall time of `netsim exec NODE -- meshctl --json put FILE --redundancy rep:3`: \
         process start-up, meshctl's /v1/status check, the upload, the write quorum (2 of 3 holders), exit",
    );
    put.note(
        "the last column subtracts the median start-up cost (table below) from the median, as an estimate only",
    );

    let mut get = Table::new(
        "latency: get of 1 MiB, writer cloud -> reader cloud, ms",
        &[
            "writer",
            "reader",
            "reader nodes",
            "n",
            "p50",
            "p99",
            "mean",
            "p50 - start-up p50",
            "from a holder",
        ],
    );
    for g in &r.gets {
        get.row(vec![
            g.writer_cloud.clone(),
            g.reader_cloud.clone(),
            g.reader_nodes.join(", "),
            g.summary.as_ref().map_or(0, |s| s.count).to_string(),
            ms(&g.summary, |s| s.p50_ms),
            ms(&g.summary, |s| s.p99_ms),
            ms(&g.summary, |s| s.mean_ms),
            num(
                g.summary
                    .as_ref()
                    .zip(overhead_p50)
                    .map(|(s, o)| s.p50_ms - o),
                1,
            ),
            g.from_holder.to_string(),
        ]);
    }
    get.note(
        "each sample is the wall time of `netsim exec NODE -- meshctl get ID -o -` (output to a pipe, checked by BLAKE3)",
    );
    get.note(
        "the reader is a node of the reader cloud that holds no chunk of the object; \
         `from a holder` counts gets where every node of that cloud held a chunk, so a holder read it",
    );
    get.note(format!(
        "{} gets matched the bytes put, {} did not",
        r.verified, r.mismatched
    ));

    let mut by_reader = Table::new(
        "latency: get of 1 MiB per reader cloud (all writers), ms",
        &["reader cloud", "n", "p50", "p99", "mean", "from a holder"],
    );
    for g in &r.gets_by_reader {
        by_reader.row(vec![
            g.reader_cloud.clone(),
            g.summary.as_ref().map_or(0, |s| s.count).to_string(),
            ms(&g.summary, |s| s.p50_ms),
            ms(&g.summary, |s| s.p99_ms),
            ms(&g.summary, |s| s.mean_ms),
            g.from_holder.to_string(),
        ]);
    }

    let mut overhead = Table::new(
        "latency: start-up cost, `netsim exec NODE -- meshctl --json status`, ms",
        &["cloud", "nodes", "n", "p50", "p99", "mean"],
    );
    for o in &r.overhead {
        overhead.row(vec![
            o.cloud.clone(),
            o.nodes.join(", "),
            o.summary.as_ref().map_or(0, |s| s.count).to_string(),
            ms(&o.summary, |s| s.p50_ms),
            ms(&o.summary, |s| s.p99_ms),
            ms(&o.summary, |s| s.mean_ms),
        ]);
    }
    overhead.note(
        "starting netsim exec, entering the namespace, starting meshctl and one /v1/status round trip \
         inside the node's namespace (no WAN hop): what every sample above pays besides the operation",
    );
    vec![put, get, by_reader, overhead]
}
