//! `netsim bench`: reproducible whole-system benchmarks of real `meshd` processes.
//!
//! Every scenario starts its own `netsim up` through [`crate::driver`] (a topology shipped in
//! `topologies/`, built into the binary), waits until the nodes see each other, measures, and
//! tears the run down however it ends. The scenarios:
//!
//! - [`throughput`]: one large object (default 1 GiB, `rep:3`) put on loopback nodes and got
//!   back from a node that holds nothing; MB/s, CPU-seconds per GiB, peak RSS per node.
//! - [`latency`]: 1 MiB objects put from and got from every cloud of `three-clouds` behind
//!   the emulated WAN (netns mode, root); p50/p99 per writer cloud and per cloud pair.
//! - [`ops`]: many small objects (default 10,000 of 4 KiB) put and got by concurrent clients
//!   talking HTTP to the control APIs directly; ops/s and p50/p99.
//! - [`repair`]: a `rep:3` object (default 512 MiB) on five loopback nodes, one holder killed;
//!   failure detection time, repair MB/s and CPU-seconds until the lost replicas are back.
//! - [`jobs`]: a `validate` + `dedup` job over generated JSONL records (default 10 million) on
//!   three loopback nodes; job time, records/s per stage, the bottleneck, CPU-seconds, peak
//!   RSS. It takes minutes, so `all` leaves it out: it runs only when named.
//!
//! The report (machine, kernel, commit, build, command line, every figure) is written as JSON
//! and as markdown tables; a failed step or a byte that does not match makes the exit status
//! non-zero, and the figures measured so far are still written.

pub mod data;
pub mod http;
pub mod jobs;
pub mod latency;
pub mod markdown;
pub mod ops;
pub mod procfs;
pub mod records;
pub mod repair;
pub mod stats;
pub mod throughput;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::state::NodeRecord;
use markdown::Table;
use procfs::Machine;

/// Version of the JSON report's layout.
pub const REPORT_VERSION: u32 = 1;
/// How often a long step prints a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long the nodes of a run get to find each other.
const MESH_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Throughput,
    Latency,
    Ops,
    Repair,
    Jobs,
    All,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Ops => "ops",
            Scenario::Repair => "repair",
            Scenario::Jobs => "jobs",
            Scenario::All => "all",
        }
    }

    /// The scenarios to run for a selection, in a fixed order, without repeats. `all` is
    /// every scenario but `jobs`, which runs only when named.
    pub fn expand(selected: &[Scenario]) -> Vec<Scenario> {
        let all = [
            Scenario::Throughput,
            Scenario::Latency,
            Scenario::Ops,
            Scenario::Repair,
        ];
        let mut out: Vec<Scenario> = selected
            .iter()
            .copied()
            .filter(|&s| s != Scenario::All)
            .collect();
        if selected.is_empty() || selected.contains(&Scenario::All) {
            out.extend(all);
        }
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    /// Each scenario runs in its own subdirectory.
    pub run_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    /// Where the JSON report goes; the markdown goes next to it (`.md`).
    pub json: PathBuf,
    pub seed: u64,
    pub throughput: throughput::Options,
    pub latency: latency::Options,
    pub ops: ops::Options,
    pub repair: repair::Options,
    pub jobs: jobs::Options,
    /// The command line, as typed, for the report.
    pub command: Vec<String>,
}

/// The whole report, as written to JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: u32,
    pub started: String,
    pub duration_secs: f64,
    pub command: String,
    pub machine: Machine,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git: Option<Git>,
    pub build: Build,
    pub seed: u64,
    pub ok: bool,
    pub scenarios: Vec<ScenarioReport>,
}

#[derive(Debug, Serialize)]
pub struct Git {
    pub commit: String,
    /// Tracked files differ from the commit.
    pub dirty: bool,
}

#[derive(Debug, Serialize)]
pub struct Build {
    /// The profile this `netsim` was built with.
    pub netsim_profile: &'static str,
    pub meshd: String,
    /// From meshd's path (`target/release/...`); otherwise assumed to be netsim's, as the
    /// binaries are normally built together.
    pub meshd_profile: String,
}

#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    pub name: &'static str,
    pub ok: bool,
    pub secs: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<Table>,
}

/// What a scenario hands back: its figures, its tables, and anything that went wrong that
/// did not stop it (a mismatching byte, a failed operation among thousands).
#[derive(Debug)]
pub struct Outcome {
    pub result: Value,
    pub tables: Vec<Table>,
    pub problems: Vec<String>,
}

/// Runs the selected scenarios and writes the report; `Ok(false)` when any failed.
pub fn run(options: &Options) -> anyhow::Result<bool> {
    let scenarios = Scenario::expand(&options.scenarios);
    if scenarios.contains(&Scenario::Latency) && !crate::netns::have_privileges() {
        bail!(
            "the latency scenario runs behind the emulated WAN, which needs root (network \
             namespaces and /dev/net/tun); run netsim bench as root, or leave it out: \
             --scenario throughput,ops,repair"
        );
    }
    let meshd = crate::cluster::find_binary("meshd", options.bin_dir.as_deref())?;
    std::fs::create_dir_all(&options.run_dir)
        .with_context(|| format!("cannot create {}", options.run_dir.display()))?;
    let started_at = SystemTime::now();
    let started = Instant::now();
    let mut report = Report {
        version: REPORT_VERSION,
        started: humantime::format_rfc3339_seconds(started_at).to_string(),
        duration_secs: 0.0,
        command: shell_words(&options.command),
        machine: Machine::read(),
        git: git_info(),
        build: Build {
            netsim_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            meshd_profile: profile_of(&meshd).unwrap_or_else(|| {
                format!(
                    "{} (assumed: built with netsim)",
                    if cfg!(debug_assertions) {
                        "debug"
                    } else {
                        "release"
                    }
                )
            }),
            meshd: meshd.display().to_string(),
        },
        seed: options.seed,
        ok: true,
        scenarios: Vec::new(),
    };
    if cfg!(debug_assertions) {
        eprintln!("netsim bench: this netsim is a debug build; figures of a release build differ");
    }
    for scenario in scenarios {
        let dir = options.run_dir.join(scenario.name());
        let ctx = Setup {
            run_dir: dir,
            bin_dir: options.bin_dir.clone(),
            seed: options.seed,
        };
        progress(scenario.name(), "starting");
        let t = Instant::now();
        let outcome = match scenario {
            Scenario::Throughput => throughput::run(&ctx, &options.throughput),
            Scenario::Latency => latency::run(&ctx, &options.latency),
            Scenario::Ops => ops::run(&ctx, &options.ops),
            Scenario::Repair => repair::run(&ctx, &options.repair),
            Scenario::Jobs => jobs::run(&ctx, &options.jobs),
            Scenario::All => Err(anyhow!("`all` is expanded before running")),
        };
        let secs = t.elapsed().as_secs_f64();
        let entry = match outcome {
            Ok(o) => ScenarioReport {
                name: scenario.name(),
                ok: o.problems.is_empty(),
                secs,
                problems: o.problems,
                result: Some(o.result),
                tables: o.tables,
            },
            Err(e) => ScenarioReport {
                name: scenario.name(),
                ok: false,
                secs,
                problems: vec![format!("{e:#}")],
                result: None,
                tables: Vec::new(),
            },
        };
        for p in &entry.problems {
            progress(scenario.name(), &format!("FAILED: {p}"));
        }
        if entry.ok {
            progress(scenario.name(), &format!("done in {secs:.0} s"));
        }
        report.ok &= entry.ok;
        report.scenarios.push(entry);
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    let text = render(&report);
    println!("\n{text}");
    write_report(&options.json, &report, &text)?;
    Ok(report.ok)
}

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Setup {
    pub run_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub seed: u64,
}

fn write_report(json: &Path, report: &Report, markdown: &str) -> anyhow::Result<()> {
    if let Some(parent) = json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(report).context("cannot encode the report")?;
    std::fs::write(json, text + "\n")
        .with_context(|| format!("cannot write {}", json.display()))?;
    let md = markdown_path(json);
    std::fs::write(&md, markdown).with_context(|| format!("cannot write {}", md.display()))?;
    println!("report: {} and {}", json.display(), md.display());
    Ok(())
}

/// The markdown report's path: the JSON's with `.md`.
pub fn markdown_path(json: &Path) -> PathBuf {
    json.with_extension("md")
}

/// The report as markdown: what ran where, then each scenario's tables.
pub fn render(report: &Report) -> String {
    let mut out = String::from("## netsim bench\n\n");
    out.push_str(&format!("- command: `{}`\n", report.command));
    let m = &report.machine;
    out.push_str(&format!(
        "- machine: {}, {} cores, {:.1} GiB memory, Linux {}\n",
        m.cpu_model,
        m.cores,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.kernel
    ));
    if let Some(git) = &report.git {
        out.push_str(&format!(
            "- commit: {}{}\n",
            git.commit,
            if git.dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ));
    }
    out.push_str(&format!(
        "- build: netsim {}, meshd {} ({})\n",
        report.build.netsim_profile, report.build.meshd_profile, report.build.meshd
    ));
    out.push_str(&format!(
        "- started {}, took {:.0} s; data seed {}\n",
        report.started, report.duration_secs, report.seed
    ));
    out.push_str(&format!(
        "- result: {}\n",
        if report.ok { "ok" } else { "FAILED" }
    ));
    for s in &report.scenarios {
        out.push_str(&format!(
            "\n## {} ({}, {:.0} s)\n\n",
            s.name,
            if s.ok { "ok" } else { "FAILED" },
            s.secs
        ));
        for p in &s.problems {
            out.push_str(&format!("**problem:** {}\n\n", p.replace('\n', " ")));
        }
        for t in &s.tables {
            out.push_str(&t.render());
            out.push('\n');
        }
    }
    out
}

/// The command line as one string a shell would split back the same way.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./:=,@%+-".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `release` or `debug` when the path says so (`.../target/release/meshd`).
pub fn profile_of(binary: &Path) -> Option<String> {
    let parent = binary.parent()?.file_name()?.to_str()?;
    matches!(parent, "release" | "debug").then(|| parent.to_string())
}

/// The commit of the source tree this netsim was built from, when git can tell.
fn git_info() -> Option<Git> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).filter(|c| !c.is_empty())?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(Git { commit, dirty })
}

/// One progress line.
pub fn progress(scenario: &str, message: &str) {
    println!("[bench {scenario}] {message}");
}

/// Runs `command` to completion with its output captured, and prints `status()` as a
/// progress line every few seconds while it runs. Returns its output and wall time (from
/// spawn until it exited).
pub fn run_with_progress(
    mut command: Command,
    scenario: &str,
    what: &str,
    mut status: impl FnMut() -> String,
) -> anyhow::Result<(Output, Duration)> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(started.elapsed());
        out
    });
    let elapsed = loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(elapsed) => break elapsed,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => progress(
                scenario,
                &format!(
                    "{what}: {:.0} s, {}",
                    started.elapsed().as_secs_f64(),
                    status()
                ),
            ),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                break started.elapsed();
            }
        }
    };
    let out = waiter
        .join()
        .map_err(|_| anyhow!("the thread waiting for {what} panicked"))?
        .with_context(|| format!("cannot wait for {what}"))?;
    Ok((out, elapsed))
}

/// `netsim exec NODE -- meshctl ARGS...`, shown as a progress line, run to completion with
/// `status()` printed every few seconds; returns its standard output and wall time, or an
/// error with everything it printed when it failed.
pub fn meshctl_timed(
    driver: &crate::driver::Driver,
    node: &str,
    args: &[&str],
    scenario: &str,
    what: &str,
    status: impl FnMut() -> String,
) -> anyhow::Result<(String, Duration)> {
    progress(
        scenario,
        &format!("$ netsim exec {node} -- meshctl {}", args.join(" ")),
    );
    let (out, elapsed) =
        run_with_progress(driver.meshctl_command(node, args), scenario, what, status)?;
    Ok((crate::driver::check_output(node, args, &out)?, elapsed))
}

/// The control API of a node this process can reach (loopback mode), with its token.
#[derive(Debug, Clone)]
pub struct Api {
    pub node: String,
    pub addr: String,
    pub token: String,
}

impl Api {
    pub fn of(record: &NodeRecord) -> anyhow::Result<Self> {
        let path = record.data_dir.join("api.token");
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}'s token {}", record.name, path.display()))?;
        Ok(Self {
            node: record.name.clone(),
            addr: record.api.clone(),
            token: token.trim().to_string(),
        })
    }

    pub fn client(&self, timeout: Duration, max_body: usize) -> http::Client {
        http::Client::new(&self.addr, &self.token, timeout, max_body)
    }

    /// `GET path` as JSON, on a new connection.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.get_json_with(&mut self.polling_client(), path)
    }

    /// A client for [`Api::get_json_with`]: kept alive across requests, so that polling a
    /// node often costs neither side a connection per request.
    pub fn polling_client(&self) -> http::Client {
        self.client(Duration::from_secs(10), 16 << 20)
    }

    /// `GET path` as JSON over `client`, a connection to this node.
    pub fn get_json_with(&self, client: &mut http::Client, path: &str) -> anyhow::Result<Value> {
        let r = client.request("GET", path, &[])?;
        if r.status != 200 {
            bail!(
                "GET {path} on {} answered {}: {}",
                self.node,
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        serde_json::from_slice(&r.body)
            .with_context(|| format!("GET {path} on {} returned no JSON", self.node))
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        self.get_json("/v1/status")
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let mut client = self.client(Duration::from_secs(10), 16 << 20);
        let r = client.request("GET", "/metrics", &[])?;
        if r.status != 200 {
            bail!("GET /metrics on {} answered {}", self.node, r.status);
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }
}

/// The value of an unlabelled Prometheus sample `name` (the sum over its label sets when it
/// has labels).
pub fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = match rest.chars().next() {
            Some(' ') => rest.split_whitespace().next(),
            Some('{') => rest
                .rsplit_once('}')
                .and_then(|(_, v)| v.split_whitespace().next()),
            _ => None,
        };
        if let Some(v) = value.and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Polls until `check` is true, printing `status` every few seconds; returns how long it
/// took.
pub fn wait_until(
    scenario: &str,
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<(bool, String)>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut next_progress = PROGRESS_EVERY;
    loop {
        let (done, status) = check()?;
        if done {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what}: not done after {} s ({status})", limit.as_secs());
        }
        if started.elapsed() >= next_progress {
            progress(
                scenario,
                &format!("{what}: {:.0} s, {status}", started.elapsed().as_secs_f64()),
            );
            next_progress += PROGRESS_EVERY;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// utime + stime of each process, in clock ticks.
pub fn cpu_ticks_of(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter()
        .map(|&p| procfs::cpu_ticks(p).with_context(|| format!("cannot read CPU time of pid {p}")))
        .collect()
}

/// Sum of utime + stime of the processes, in seconds.
pub fn cpu_seconds(pids: &[u32], ticks_per_second: u64) -> anyhow::Result<f64> {
    let mut ticks = 0;
    for &pid in pids {
        ticks +=
            procfs::cpu_ticks(pid).with_context(|| format!("cannot read CPU time of pid {pid}"))?;
    }
    Ok(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// `rep:N` of the mesh's replication.
pub const REDUNDANCY: &str = "rep:3";

/// The `"id"` of a `meshctl --json put` answer or `POST /v1/objects` response.
pub fn object_id(put: &Value) -> anyhow::Result<String> {
    put["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the put answered no object id: {put}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_expand_in_order() {
        assert_eq!(
            Scenario::expand(&[Scenario::All]),
            [
                Scenario::Throughput,
                Scenario::Latency,
                Scenario::Ops,
                Scenario::Repair
            ]
        );
        assert_eq!(
            Scenario::expand(&[Scenario::Ops, Scenario::Throughput, Scenario::Ops]),
            [Scenario::Throughput, Scenario::Ops]
        );
        assert_eq!(
            Scenario::expand(&[Scenario::Repair, Scenario::Throughput]),
            [Scenario::Throughput, Scenario::Repair]
        );
        assert_eq!(Scenario::expand(&[]).len(), 4);
        assert!(!Scenario::expand(&[Scenario::All]).contains(&Scenario::Jobs));
        assert_eq!(Scenario::expand(&[Scenario::Jobs]), [Scenario::Jobs]);
        assert_eq!(
            Scenario::expand(&[Scenario::Jobs, Scenario::All]),
            [
                Scenario::Throughput,
                Scenario::Latency,
                Scenario::Ops,
                Scenario::Repair,
                Scenario::Jobs
            ]
        );
    }

    #[test]
    fn shell_words_quote_what_needs_it() {
        let args: Vec<String> = ["netsim", "bench", "--json", "/tmp/a b.json", "it's", ""]
            .map(String::from)
            .to_vec();
        assert_eq!(
            shell_words(&args),
            "netsim bench --json '/tmp/a b.json' 'it'\\''s' ''"
        );
    }

    #[test]
    fn profile_from_path() {
        assert_eq!(
            profile_of(Path::new("/x/target/release/meshd")).as_deref(),
            Some("release")
        );
        assert_eq!(
            profile_of(Path::new("/x/target/debug/meshd")).as_deref(),
            Some("debug")
        );
        assert_eq!(profile_of(Path::new("/work/bench-bin/meshd")), None);
        assert_eq!(
            markdown_path(Path::new("/r/bench.json")),
            Path::new("/r/bench.md")
        );
    }

    #[test]
    fn prometheus_values() {
        let text = "# HELP mesh_hedged_fetches_total x\n# TYPE mesh_hedged_fetches_total counter\n\
                    mesh_hedged_fetches_total 3\nmesh_hedged_fetches_total_other 9\n\
                    mesh_api_errors_total{code=\"a\"} 2\nmesh_api_errors_total{code=\"b\"} 5\n";
        assert_eq!(
            prometheus_value(text, "mesh_hedged_fetches_total"),
            Some(3.0)
        );
        assert_eq!(prometheus_value(text, "mesh_api_errors_total"), Some(7.0));
        assert_eq!(prometheus_value(text, "mesh_missing"), None);
    }

    #[test]
    fn report_renders_header_and_failures() {
        let mut table = Table::new("t", &["a"]);
        table.row(vec!["1".into()]);
        let report = Report {
            version: REPORT_VERSION,
            started: "2026-11-21T12:00:00Z".into(),
            duration_secs: 61.0,
            command: "netsim bench".into(),
            machine: Machine {
                cpu_model: "AMD EPYC".into(),
                cores: 2,
                memory_bytes: 24 << 30,
                kernel: "6.1.0".into(),
            },
            git: None,
            build: Build {
                netsim_profile: "release",
                meshd: "/b/meshd".into(),
                meshd_profile: "release".into(),
            },
            seed: 1,
            ok: false,
            scenarios: vec![
                ScenarioReport {
                    name: "ops",
                    ok: true,
                    secs: 10.0,
                    problems: vec![],
                    result: None,
                    tables: vec![table],
                },
                ScenarioReport {
                    name: "latency",
                    ok: false,
                    secs: 1.0,
                    problems: vec!["needs root".into()],
                    result: None,
                    tables: vec![],
                },
            ],
        };
        let text = render(&report);
        assert!(text.contains("- machine: AMD EPYC, 2 cores, 24.0 GiB memory, Linux 6.1.0\n"));
        assert!(!text.contains("commit:"), "no git, no commit line");
        assert!(text.contains("- result: FAILED\n"));
        assert!(text.contains("## ops (ok, 10 s)\n\n### t\n"));
        assert!(text.contains("## latency (FAILED, 1 s)\n\n**problem:** needs root\n"));
    }
}
