//! mesh-bootstrap: parses flags and calls `mesh_bootstrap::run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mesh_bootstrap::Config;
use mesh_node::config::NetConfig;
use mesh_node::net::RelayLimits;

/// A storage-less rendezvous peer for joining mesh nodes across clouds and NAT: Kademlia
/// server, identify, AutoNAT server and circuit relay. Its first log line prints the address
/// to pass to `meshd --bootstrap`.
#[derive(Debug, Parser)]
#[command(name = "mesh-bootstrap", version, about)]
struct Args {
    /// Holds identity.key, so the peer id (and address) survive restarts
    #[arg(long, value_name = "DIR", default_value = "./mesh-bootstrap-data")]
    data_dir: PathBuf,
    /// QUIC listen address, repeatable [default: /ip4/0.0.0.0/udp/4001/quic-v1]
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Address nodes should dial (public IP), repeatable
    #[arg(long, value_name = "MULTIADDR")]
    external_addr: Vec<String>,
    /// Zone of this peer, e.g. aws/us-east-1/a
    #[arg(long, value_name = "ZONE", default_value = "")]
    zone: String,
    /// The mesh's cluster key file (see `meshd init`); peers that cannot prove it are dropped
    #[arg(long, value_name = "FILE")]
    cluster_key_file: Option<PathBuf>,
    /// Bytes one relayed circuit may carry, 0 for no limit [default: 128 KiB, enough for
    /// DCUtR to set up a direct connection]
    #[arg(long, value_name = "SIZE")]
    relay_circuit_bytes: Option<bytesize::ByteSize>,
    /// How long one relayed circuit may stay open [default: 2m]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    relay_circuit_duration: Option<Duration>,
    /// Circuits relayed at once [default: 16]
    #[arg(long, value_name = "N")]
    relay_circuits: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut net = NetConfig::default();
    if !args.listen.is_empty() {
        net.listen = args.listen;
    }
    net.external_addrs = args.external_addr;
    net.zone = args.zone;
    net.cluster_key_file = args.cluster_key_file;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let mut relay = RelayLimits::default();
    if let Some(bytes) = args.relay_circuit_bytes {
        relay.max_circuit_bytes = bytes.as_u64();
    }
    if let Some(duration) = args.relay_circuit_duration {
        relay.max_circuit_duration = duration;
    }
    if let Some(circuits) = args.relay_circuits {
        relay.max_circuits = circuits;
    }
    let config = Config {
        data_dir: args.data_dir,
        net,
        relay,
    };
    match runtime.block_on(mesh_bootstrap::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("mesh-bootstrap: error: {error}");
    ExitCode::FAILURE
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
