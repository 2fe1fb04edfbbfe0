//! `netsim`: a thin command line over `mesh_netsim`; see the crate documentation.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mesh_netsim::cluster;
use mesh_netsim::control::{self, Request};
use mesh_netsim::state::{self, Mode};
use mesh_netsim::{bench, demo, netns, selftest, topology};

#[derive(Debug, Parser)]
#[command(
    name = "netsim",
    version,
    about = "A wide-area network emulator for real meshd processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct RunDir {
    /// Run directory: state file, control socket, logs and node data
    #[arg(long, env = "NETSIM_RUN_DIR", default_value_os_t = state::default_run_dir())]
    run_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start mesh-bootstrap and every meshd of TOPOLOGY, each in its own network namespace
    /// behind the emulated WAN; stays in the foreground until Ctrl-C or `netsim down`
    Up {
        topology: PathBuf,
        #[command(flatten)]
        run_dir: RunDir,
        /// Where meshd, mesh-bootstrap and meshctl are (default: next to netsim, then PATH)
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Run everything on 127.0.0.1 instead: no root needed, but no latency, loss,
        /// bandwidth limits or partitions (the default when not root)
        #[arg(long)]
        loopback: bool,
    },
    /// Stop the run: its processes, router, namespaces (also cleans up after a crashed run)
    Down {
        #[command(flatten)]
        run_dir: RunDir,
    },
    /// Show the nodes of the running netsim and the router's counters
    Status {
        #[command(flatten)]
        run_dir: RunDir,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in NODE's namespace; `meshctl` gets the node's --api and --data-dir
    Exec {
        node: String,
        #[command(flatten)]
        run_dir: RunDir,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The command, after `--`: netsim exec aws-us-east-1-1 -- meshctl peers
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Kill NODE's process (SIGKILL, as a crash)
    Kill {
        node: String,
        #[command(flatten)]
        run_dir: RunDir,
    },
    /// Kill NODE if it runs, and start it again with the same data directory
    Restart {
        node: String,
        #[command(flatten)]
        run_dir: RunDir,
    },
    /// Drop all traffic between REGIONS and the regions after --from (comma-separated)
    Partition {
        regions: String,
        #[arg(long)]
        from: String,
        #[command(flatten)]
        run_dir: RunDir,
    },
    /// Remove every partition
    Heal {
        #[command(flatten)]
        run_dir: RunDir,
    },
    /// Validate a topology file and print what it describes
    Check { topology: PathBuf },
    /// Measure the router: packets/s, MB/s and delay precision (needs root); exits 1 when a
    /// goal is missed
    Selftest {
        /// Seconds per throughput phase
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// A guided tour: three clouds, a put, where the replicas went, a killed holder, a get
    /// checked by BLAKE3; exits 1 if any step fails
    Demo {
        /// Run directory of the demo
        #[arg(long, default_value = "/tmp/netsim-demo")]
        run_dir: PathBuf,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Run on 127.0.0.1 without the emulated WAN (the default when not root)
        #[arg(long)]
        loopback: bool,
        /// Size of the file to put, in MiB
        #[arg(long, default_value_t = 16)]
        size_mib: usize,
    },
    /// Reproducible whole-system benchmarks (throughput, latency, ops, repair, jobs); writes a JSON
    /// report and a markdown table next to it; exits 1 if any step fails or any byte differs
    Bench {
        /// Scenarios to run, comma-separated: throughput, latency (needs root), ops, repair, jobs,
        /// or all (every one but jobs, which takes minutes and runs only when named)
        #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
        scenario: Vec<bench::Scenario>,
        /// Run directory; each scenario runs in a subdirectory of it
        #[arg(long, default_value = "/tmp/netsim-bench")]
        run_dir: PathBuf,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Where to write the JSON report (default RUN_DIR/bench.json); the markdown goes
        /// next to it with the extension .md
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seed of the generated data (the same seed puts the same bytes)
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// throughput: size of the object, in MiB
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// latency: objects put per cloud, and so gets per (writer, reader) cloud pair
        #[arg(long, default_value_t = 20)]
        latency_count: usize,
        /// latency: `meshctl status` calls per node that measure the start-up cost
        #[arg(long, default_value_t = 10)]
        latency_overhead_samples: usize,
        /// ops: number of objects
        #[arg(long, default_value_t = 10_000)]
        ops_objects: usize,
        /// ops: size of each object, in KiB
        #[arg(long, default_value_t = 4)]
        ops_size_kib: usize,
        /// ops: concurrent clients (threads, one keep-alive connection each)
        #[arg(long, default_value_t = 16)]
        ops_clients: usize,
        /// repair: size of the object each policy's run puts before a holder is killed, in MiB
        #[arg(long, default_value_t = 512)]
        repair_size_mib: u64,
        /// repair: the policies to repair, comma-separated, one run each: rep:3 (5 nodes),
        /// ec:4+2 (8 nodes)
        #[arg(long, value_enum, value_delimiter = ',', default_value = "rep:3")]
        repair_policy: Vec<bench::repair::Policy>,
        /// jobs: JSONL records of 200 bytes to put and run the validate + dedup job over
        #[arg(long, default_value_t = 10_000_000)]
        records: u64,
        /// jobs: redundancy of the job's output (rep:N or ec:K+M)
        #[arg(long, default_value = "rep:3")]
        job_output: mesh_proto::policy::Redundancy,
        /// jobs: reduce partitions of the dedup stage
        #[arg(long, default_value_t = 6)]
        partitions: u32,
    },
    /// Internal: the trampoline that starts a child in its namespace
    #[command(name = "__enter", hide = true)]
    Enter {
        #[arg(long)]
        parent: u32,
        #[arg(long)]
        netns: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netsim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Netns mode when we may create namespaces, unless loopback was asked for.
fn choose_mode(loopback: bool) -> Mode {
    if loopback {
        Mode::Loopback
    } else if netns::have_privileges() {
        Mode::Netns
    } else {
        eprintln!(
            "netsim: not root (or no /dev/net/tun), so using loopback mode: every node on 127.0.0.1, \
             with no emulated latency, jitter, loss, bandwidth limit or partitions; run as root for the WAN"
        );
        Mode::Loopback
    }
}

fn split_regions(list: &str) -> Vec<String> {
    list.split(',')
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Sends a request to the running `netsim up` and prints its answer.
fn ask(run_dir: &RunDir, request: Request) -> anyhow::Result<ExitCode> {
    let response = control::request(&run_dir.run_dir, &request)?;
    if response.ok {
        println!("{}", response.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("netsim: {}", response.message);
        Ok(ExitCode::FAILURE)
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up {
            topology,
            run_dir,
            bin_dir,
            loopback,
        } => {
            let mode = choose_mode(loopback);
            cluster::up(&cluster::Options {
                topology,
                run_dir: run_dir.run_dir,
                bin_dir,
                mode,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Down { run_dir } => {
            println!("{}", cluster::down(&run_dir.run_dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run_dir, json } => {
            let response = control::request(&run_dir.run_dir, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&response)?);
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(state) = &response.state {
                println!(
                    "run {} ({:?} mode, pid {}), topology {}",
                    state.run, state.mode, state.pid, state.topology
                );
                cluster::print_table(state);
                for (a, b) in &state.partitions {
                    println!("partition: {} | {}", a.join(","), b.join(","));
                }
            }
            if let Some(r) = &response.router {
                println!(
                    "router: {} packets in ({} reads), {} out ({} writes, {:.1} MB); dropped: {} partition, {} loss, {} queue, {} overflow, {} no route, {} malformed; {} write errors",
                    r.rx_packets,
                    r.rx_reads,
                    r.tx_packets,
                    r.tx_writes,
                    r.tx_bytes as f64 / 1e6,
                    r.dropped_partition,
                    r.dropped_loss,
                    r.dropped_queue,
                    r.dropped_overflow,
                    r.dropped_no_route,
                    r.dropped_malformed,
                    r.write_errors
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            node,
            run_dir,
            bin_dir,
            command,
        } => Err(cluster::exec(
            &run_dir.run_dir,
            &node,
            &command,
            bin_dir.as_deref(),
        )),
        Command::Kill { node, run_dir } => ask(&run_dir, Request::Kill { node }),
        Command::Restart { node, run_dir } => ask(&run_dir, Request::Restart { node }),
        Command::Partition {
            regions,
            from,
            run_dir,
        } => ask(
            &run_dir,
            Request::Partition {
                regions: split_regions(&regions),
                from: split_regions(&from),
            },
        ),
        Command::Heal { run_dir } => ask(&run_dir, Request::Heal),
        Command::Demo {
            run_dir,
            bin_dir,
            loopback,
            size_mib,
        } => {
            let options = demo::Options {
                run_dir,
                bin_dir,
                mode: choose_mode(loopback),
                size_mib: size_mib.clamp(1, 4096),
            };
            match demo::run(&options) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("\ndemo failed: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Bench {
            scenario,
            run_dir,
            bin_dir,
            json,
            seed,
            size_mib,
            latency_count,
            latency_overhead_samples,
            ops_objects,
            ops_size_kib,
            ops_clients,
            repair_size_mib,
            repair_policy,
            records,
            job_output,
            partitions,
        } => {
            let options = bench::Options {
                scenarios: scenario,
                json: json.unwrap_or_else(|| run_dir.join("bench.json")),
                run_dir,
                bin_dir,
                seed,
                throughput: bench::throughput::Options {
                    size_mib: size_mib.clamp(1, 64 << 10),
                },
                latency: bench::latency::Options {
                    count: latency_count.clamp(1, 10_000),
                    overhead_samples: latency_overhead_samples.clamp(1, 10_000),
                },
                ops: bench::ops::Options {
                    objects: ops_objects.clamp(1, 10_000_000),
                    size_kib: ops_size_kib.clamp(1, 64 << 10),
                    clients: ops_clients.clamp(1, 1024),
                },
                repair: bench::repair::Options {
                    size_mib: repair_size_mib.clamp(1, 64 << 10),
                    policies: {
                        let mut policies = repair_policy;
                        policies.sort();
                        policies.dedup();
                        policies
                    },
                },
                jobs: bench::jobs::Options {
                    records: records.clamp(1, 1_000_000_000),
                    output: job_output,
                    partitions: partitions.clamp(1, mesh_proto::job::MAX_PARTITIONS),
                },
                command: std::env::args_os()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
            };
            match bench::run(&options) {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => {
                    eprintln!("netsim bench: a scenario failed; see the report");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("netsim bench: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Enter {
            parent,
            netns,
            command,
        } => Err(cluster::enter_and_exec(parent, netns.as_deref(), &command)),
        Command::Check { topology } => {
            let t = topology::load(&topology)?;
            print_topology(&t);
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { seconds, json } => {
            let options = selftest::Options {
                phase: std::time::Duration::from_secs(seconds.max(1)),
                ..Default::default()
            };
            let report = selftest::run(&options).context("router selftest")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                selftest::print(&report);
            }
            Ok(if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_topology(t: &topology::Topology) {
    println!(
        "topology {:?}: {} regions, {} nodes",
        t.name,
        t.regions.len(),
        t.nodes.len()
    );
    for (i, r) in t.regions.iter().enumerate() {
        let nodes: Vec<&str> = t
            .nodes
            .iter()
            .filter(|n| n.region == i)
            .map(|n| n.name.as_str())
            .collect();
        println!(
            "  {:<24} rtt inside {:>8}  nodes: {}",
            r.name,
            humantime::format_duration(t.link(i, i).rtt).to_string(),
            nodes.join(" ")
        );
    }
    if let Some(b) = &t.bootstrap {
        println!("  bootstrap peer in {}", b.zone);
    }
    for a in 0..t.regions.len() {
        for b in a + 1..t.regions.len() {
            let l = t.link(a, b);
            println!(
                "  {:<24} <-> {:<24} rtt {:>6} jitter {:>6} loss {:.3}% bandwidth {}",
                t.regions[a].name,
                t.regions[b].name,
                humantime::format_duration(l.rtt).to_string(),
                humantime::format_duration(l.jitter).to_string(),
                l.loss * 100.0,
                l.bandwidth
                    .map(|b| format!("{:.0} Mbit/s", b as f64 * 8.0 / 1e6))
                    .unwrap_or_else(|| "unlimited".into())
            );
        }
    }
    for e in &t.events {
        println!(
            "  at {:>6}: {:?}",
            humantime::format_duration(e.at).to_string(),
            e.action
        );
    }
    for (name, value) in &t.env {
        println!("  every meshd gets {name}={value}");
    }
}
