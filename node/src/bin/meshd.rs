//! meshd: the mesh daemon. Parses flags, loads the configuration and calls `mesh_node::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mesh_node::config::{Config, LogFormat};
use mesh_proto::Redundancy;

/// The mesh daemon: stores content-addressed chunks, replicates them over its peers and
/// serves the control API for meshctl.
#[derive(Debug, Parser)]
#[command(name = "meshd", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file; its keys are those of `meshd.example.toml` in the repository.
    #[arg(long, env = "MESH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (store, identity.key, api.token) [default: ./mesh-data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the control API [default: 127.0.0.1:5080]
    #[arg(long, value_name = "ADDR")]
    api_addr: Option<SocketAddr>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Default redundancy of puts that name none: rep:N or ec:K+M [default: rep:3]
    #[arg(long, value_name = "POLICY")]
    redundancy: Option<Redundancy>,
    /// QUIC listen address, repeatable [default: /ip4/0.0.0.0/udp/4001/quic-v1]
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Address other nodes should dial (public IP, NAT mapping), repeatable
    #[arg(long, value_name = "MULTIADDR")]
    external_addr: Vec<String>,
    /// Peer to join through, repeatable; must end in /p2p/<peer id>
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Failure zone as cloud/region/az, e.g. aws/us-east-1/a
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// File holding the cluster key (see `meshd init`); without one the mesh is open
    #[arg(long, value_name = "FILE")]
    cluster_key_file: Option<PathBuf>,
    /// Job tasks this node runs at once (default: its CPU cores)
    #[arg(long, value_name = "N")]
    task_slots: Option<usize>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a cluster key file to copy to every node (then pass --cluster-key-file).
    Init {
        /// Where to write the key [default: ./cluster.key]
        #[arg(long, value_name = "FILE", default_value = "cluster.key")]
        cluster_key_file: PathBuf,
    },
}

/// Keeps glibc's malloc from handing freed memory back to the kernel after every large
/// free. By default it serves blocks above a threshold (128 KiB, rising to the largest block
/// freed so far) with their own `mmap` and trims each heap's free top above twice that; a put
/// allocates and frees chunk buffers and RocksDB memtable blocks of 1 to 8 MiB all the time,
/// so the memory came back as fresh pages the kernel had to zero, again and again. Blocks up
/// to 32 MiB now come from the heaps, and a heap keeps up to 128 MiB of free memory for the
/// next ones. On the 1 GiB put benchmarks (README, "Freed memory kept") the three nodes spent
/// 6 to 20% less CPU per GiB, the writer about 17% less, for 30 to 140 MiB more peak RSS.
///
/// Operators' own `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`, which glibc reads
/// before `main`, are left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 128 << 20;
    for (variable, param, value) in [
        (
            "MALLOC_MMAP_THRESHOLD_",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        ),
        (
            "MALLOC_TRIM_THRESHOLD_",
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        ),
    ] {
        if std::env::var_os(variable).is_some() {
            continue;
        }
        // SAFETY: mallopt only sets malloc's tuning parameters, under malloc's own lock; it
        // is called with valid parameters before any other thread exists.
        if unsafe { libc::mallopt(param, value) } != 1 {
            eprintln!("meshd: mallopt refused {variable}={value}; keeping glibc's default");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let args = Args::parse();
    if let Some(Command::Init { cluster_key_file }) = &args.command {
        return match mesh_node::identity::create_cluster_key(cluster_key_file) {
            Ok(()) => {
                println!(
                    "wrote a new cluster key to {}; copy it to every node and start them with --cluster-key-file {}",
                    cluster_key_file.display(),
                    cluster_key_file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let mut config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(addr) = args.api_addr {
        config.api_addr = addr;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(policy) = args.redundancy {
        config.redundancy = policy;
    }
    if !args.listen.is_empty() {
        config.net.listen = args.listen;
    }
    if !args.external_addr.is_empty() {
        config.net.external_addrs = args.external_addr;
    }
    if !args.bootstrap.is_empty() {
        config.net.bootstrap = args.bootstrap;
    }
    if let Some(zone) = args.zone {
        config.net.zone = zone;
    }
    if let Some(path) = args.cluster_key_file {
        config.net.cluster_key_file = Some(path);
    }
    if let Some(slots) = args.task_slots {
        config.jobs.task_slots = slots;
    }
    if let Err(e) = config.validate() {
        return fail(&e);
    }
    init_logging(config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    // The signal handlers are installed inside the runtime, before the node starts.
    match runtime.block_on(async { mesh_node::run(config, shutdown_signal()).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("meshd: error: {error}");
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Watches SIGINT and SIGTERM from the moment it is called, and completes on the first.
/// Called before the node starts, so a signal that arrives while it is still starting is
/// seen here rather than taking the default action (an unclean exit).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(e)) | (Err(e), Ok(mut one)) => {
                eprintln!("meshd: cannot watch one of SIGINT and SIGTERM: {e}");
                one.recv().await;
            }
            (Err(e), Err(_)) => {
                eprintln!("meshd: cannot watch SIGINT or SIGTERM: {e}; stop meshd with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
