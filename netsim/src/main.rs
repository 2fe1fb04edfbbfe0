//! `netsim`: a thin command line over `mesh_netsim`; see the crate documentation.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_netsim::{selftest, topology};

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

#[derive(Debug, Subcommand)]
enum Command {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
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
}
