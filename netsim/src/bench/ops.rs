//! The ops scenario: many small objects through the control APIs, by concurrent clients.
//!
//! `topologies/bench-ops.toml`: three loopback nodes, so `rep:3` puts every object on every
//! node. `clients` threads, spread round-robin over the three nodes, each with one keep-alive
//! HTTP connection, take object numbers from a shared counter and `POST
//! /v1/objects?redundancy=rep:3` their seeded contents (every object distinct), timing each
//! request. After the writers report no object still completing, the same threads `GET
//! /v1/objects/{id}` every object from the next node over (not the one the put went to) and
//! compare the bytes. No process is spawned per operation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde::Serialize;
use serde_json::json;

use super::markdown::{Table, num};
use super::stats::Summary;
use super::{Api, Outcome, REDUNDANCY, Setup, data, procfs, progress};
use crate::driver::Driver;
use crate::state::{Mode, Role};

const TOPOLOGY: &str = include_str!("../../topologies/bench-ops.toml");
const NAME: &str = "ops";
/// Data streams of this scenario start here.
const STREAM_BASE: u64 = 2 << 32;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);
/// Problems listed one by one before they are only counted.
const MAX_LISTED: usize = 10;

#[derive(Debug, Clone)]
pub struct Options {
    pub objects: usize,
    pub size_kib: usize,
    pub clients: usize,
}

#[derive(Debug, Serialize)]
struct Result {
    objects: usize,
    object_bytes: usize,
    clients: usize,
    nodes: Vec<String>,
    redundancy: &'static str,
    put: Phase,
    /// After the last put returned, until no node reported an object still completing.
    complete_secs: f64,
    get: Phase,
    mismatched: usize,
    connections: u64,
}

#[derive(Debug, Serialize)]
struct Phase {
    ok: usize,
    failed: usize,
    wall_secs: f64,
    ops_per_sec: f64,
    latency: Option<Summary>,
    /// utime + stime of the three meshd processes over the phase.
    meshd_cpu_secs: f64,
}

/// What one phase's threads collected.
#[derive(Default)]
struct Collected {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    failed: usize,
    mismatched: usize,
    connects: u64,
}

impl Collected {
    fn fail(&mut self, message: String) {
        self.failed += 1;
        if self.failures.len() < MAX_LISTED {
            self.failures.push(message);
        }
    }

    fn merge(&mut self, other: Collected) {
        self.latencies.extend(other.latencies);
        for f in other.failures {
            if self.failures.len() < MAX_LISTED {
                self.failures.push(f);
            }
        }
        self.failed += other.failed;
        self.mismatched += other.mismatched;
        self.connects += other.connects;
    }
}

pub fn run(setup: &Setup, options: &Options) -> anyhow::Result<Outcome> {
    let count = options.objects.max(1);
    let size = options.size_kib.max(1) << 10;
    let clients = options.clients.max(1);
    let (driver, state) = Driver::up(
        &setup.run_dir,
        setup.bin_dir.as_deref(),
        "bench-ops",
        TOPOLOGY,
        Mode::Loopback,
    )?;
    progress(NAME, "waiting for the nodes to see each other");
    driver.wait_mesh(super::MESH_TIMEOUT)?;
    let nodes: Vec<_> = state
        .nodes
        .iter()
        .filter(|n| n.role == Role::Node)
        .collect();
    let apis: Vec<Api> = nodes
        .iter()
        .map(|n| Api::of(n))
        .collect::<anyhow::Result<_>>()?;
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n.pid.ok_or_else(|| anyhow!("{} has no pid", n.name)))
        .collect::<anyhow::Result<_>>()?;
    let ticks = procfs::clock_ticks();
    let seed = setup.seed;
    let ids: Vec<Mutex<Option<String>>> = (0..count).map(|_| Mutex::new(None)).collect();

    progress(
        NAME,
        &format!(
            "put {count} objects of {} KiB with {clients} clients over {} nodes",
            size >> 10,
            apis.len()
        ),
    );
    let cpu0 = super::cpu_seconds(&pids, ticks)?;
    let (put, put_wall) = phase(count, clients, |client, next, done| {
        let api = &apis[client % apis.len()];
        let mut http = api.client(REQUEST_TIMEOUT, 1 << 20);
        let mut c = Collected::default();
        let path = format!("/v1/objects?redundancy={REDUNDANCY}");
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            let body = data::bytes(seed, STREAM_BASE + i as u64, size);
            let started = Instant::now();
            let result = http.request("POST", &path, &body);
            let t = started.elapsed();
            done.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(r) if r.status == 200 => {
                    match serde_json::from_slice::<serde_json::Value>(&r.body)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_string))
                    {
                        Some(id) => {
                            c.latencies.push(t);
                            if let Ok(mut slot) = ids[i].lock() {
                                *slot = Some(id);
                            }
                        }
                        None => c.fail(format!(
                            "put {i} on {}: no id in {}",
                            api.node,
                            String::from_utf8_lossy(&r.body)
                        )),
                    }
                }
                Ok(r) => c.fail(format!(
                    "put {i} on {}: HTTP {}: {}",
                    api.node,
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )),
                Err(e) => c.fail(format!("put {i} on {}: {e}", api.node)),
            }
        }
        c.connects = http.connects;
        c
    })?;
    let cpu1 = super::cpu_seconds(&pids, ticks)?;
    progress(
        NAME,
        &format!(
            "{} puts in {:.1} s ({:.0} ops/s); waiting for the third holders",
            put.latencies.len(),
            put_wall.as_secs_f64(),
            put.latencies.len() as f64 / put_wall.as_secs_f64()
        ),
    );
    let complete = super::wait_until(NAME, "third holders", COMPLETE_TIMEOUT, || {
        let mut left = 0;
        for api in &apis {
            let status = api.status()?;
            left += status["objects_completing"]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no objects_completing: {status}"))?;
        }
        Ok((left == 0, format!("{left} objects completing")))
    })?;

    progress(
        NAME,
        &format!("get every object with {clients} clients, each from another node than its put"),
    );
    let cpu2 = super::cpu_seconds(&pids, ticks)?;
    let (get, get_wall) = phase(count, clients, |client, next, done| {
        let api = &apis[(client + 1) % apis.len()];
        let mut http = api.client(REQUEST_TIMEOUT, size + (1 << 20));
        let mut c = Collected::default();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            let id = ids[i].lock().ok().and_then(|s| s.clone());
            let Some(id) = id else {
                // The put failed and is counted there.
                done.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let started = Instant::now();
            let result = http.request("GET", &format!("/v1/objects/{id}"), &[]);
            let t = started.elapsed();
            done.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(r) if r.status == 200 => {
                    c.latencies.push(t);
                    if r.body != data::bytes(seed, STREAM_BASE + i as u64, size) {
                        c.mismatched += 1;
                        c.fail(format!(
                            "get {i} ({id}) on {}: {} bytes that differ from the put",
                            api.node,
                            r.body.len()
                        ));
                    }
                }
                Ok(r) => c.fail(format!(
                    "get {i} ({id}) on {}: HTTP {}: {}",
                    api.node,
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )),
                Err(e) => c.fail(format!("get {i} ({id}) on {}: {e}", api.node)),
            }
        }
        c.connects = http.connects;
        c
    })?;
    let cpu3 = super::cpu_seconds(&pids, ticks)?;
    driver.down();

    let mut problems = Vec::new();
    for (what, c) in [("put", &put), ("get", &get)] {
        if c.failed > 0 {
            problems.push(format!(
                "{} of {count} {what}s failed; first: {}",
                c.failed,
                c.failures.join("; ")
            ));
        }
    }
    let mismatched = get.mismatched;
    let connections = put.connects + get.connects;
    let phase_of = |c: &Collected, wall: Duration, cpu: f64| Phase {
        ok: c.latencies.len() - c.mismatched,
        failed: c.failed,
        wall_secs: wall.as_secs_f64(),
        ops_per_sec: (c.latencies.len() - c.mismatched) as f64 / wall.as_secs_f64().max(1e-9),
        latency: Summary::of(&c.latencies),
        meshd_cpu_secs: cpu,
    };
    let result = Result {
        objects: count,
        object_bytes: size,
        clients,
        nodes: nodes.iter().map(|n| n.name.clone()).collect(),
        redundancy: REDUNDANCY,
        put: phase_of(&put, put_wall, cpu1 - cpu0),
        complete_secs: complete.as_secs_f64(),
        get: phase_of(&get, get_wall, cpu3 - cpu2),
        mismatched,
        connections,
    };
    if result.put.ok == 0 {
        bail!("no put succeeded: {}", problems.join("; "));
    }
    Ok(Outcome {
        tables: tables(&result),
        result: serde_json::to_value(&result).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        problems,
    })
}

/// Runs `work(client, next, done)` on `clients` threads until they return, printing
/// progress from `done`; returns what they collected and the wall time.
fn phase(
    count: usize,
    clients: usize,
    work: impl Fn(usize, &AtomicUsize, &AtomicUsize) -> Collected + Sync,
) -> anyhow::Result<(Collected, Duration)> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let started = Instant::now();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                let (work, next, done) = (&work, &next, &done);
                scope.spawn(move || work(client, next, done))
            })
            .collect();
        let mut last = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            if last.elapsed() >= super::PROGRESS_EVERY {
                progress(
                    NAME,
                    &format!("{} of {count} done", done.load(Ordering::Relaxed)),
                );
                last = Instant::now();
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked")))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let wall = started.elapsed();
    let mut all = Collected::default();
    for r in results {
        all.merge(r);
    }
    Ok((all, wall))
}

fn tables(r: &Result) -> Vec<Table> {
    let mut t = Table::new(
        format!(
            "ops: {} objects of {} KiB, {}, {} clients over {} loopback nodes",
            r.objects,
            r.object_bytes >> 10,
            r.redundancy,
            r.clients,
            r.nodes.len()
        ),
        &[
            "op",
            "ok",
            "failed",
            "seconds",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "meshd CPU-s",
        ],
    );
    for (op, p) in [("put", &r.put), ("get", &r.get)] {
        t.row(vec![
            op.to_string(),
            p.ok.to_string(),
            p.failed.to_string(),
            num(Some(p.wall_secs), 2),
            num(Some(p.ops_per_sec), 0),
            num(p.latency.as_ref().map(|s| s.p50_ms), 2),
            num(p.latency.as_ref().map(|s| s.p99_ms), 2),
            num(p.latency.as_ref().map(|s| s.mean_ms), 2),
            num(Some(p.meshd_cpu_secs), 1),
        ]);
    }
    t.note(
        "each client thread keeps one HTTP/1.1 connection to one node's control API; a sample is \
         one request's round trip (request written to response fully read), no process per op",
    );
    t.note(format!(
        "put: POST /v1/objects?redundancy={}, returns at the write quorum (2 of 3); the third \
         copies completed {:.1} s after the last put returned (not in the put figures)",
        r.redundancy, r.complete_secs
    ));
    t.note(format!(
        "get: GET /v1/objects/ID from another node than the put's (with rep:3 on 3 nodes every \
         node holds every object, so these are local reads); every body compared with what was \
         put: {} mismatched",
        r.mismatched
    ));
    t.note(format!(
        "ops/s = successful ops / wall time of the phase; {} connections opened in all",
        r.connections
    ));
    vec![t]
}
