//! mesh-node: the mesh daemon as a library; `meshd` is a thin binary around [`run`].
//!
//! What it owns, and how data flows through it:
//!
//! - [`config`]: the typed, validated configuration (defaults < file < `MESH_*` env < flags).
//! - [`identity`]: the data directory's lock, the node's Ed25519 identity and the API token.
//! - [`store`]: content-addressed chunks and object metadata in RocksDB (large chunks' bytes
//!   in chunk files beside it, named by RocksDB), behind the narrow [`store::ChunkStore`] /
//!   [`store::MetaStore`] traits.
//! - [`chunker`]: cuts a byte stream into chunks (FastCDC, fixed, record-aligned).
//! - [`objects`]: ingest (stream -> chunker -> hash + store -> manifest commit) and reads
//!   (manifest -> verified chunks -> stream).
//! - [`net`]: libp2p over QUIC; one task owns the swarm (Kademlia, identify, ping, gossiped
//!   load reports, the chunk/control/membership protocols) and keeps the peer table.
//! - [`placement`]: the pure function that picks the holders of a chunk.
//! - [`erasure`]: Reed-Solomon shards of a chunk for `ec:K+M` (encode, rebuild, decode).
//! - [`replicate`]: replicated and erasure-coded put and remote get over the network, the
//!   durable background completion, repair of what dead holders took with them, deletes
//!   (tombstones delivered to every holder), and the service that answers other nodes' chunk
//!   and control requests.
//! - [`gc`]: deletes chunks no live object references once `gc_grace` has passed, compacts
//!   their space back, and drops old tombstones.
//! - [`scrub`]: the background worker that re-hashes stored chunks at a bounded rate,
//!   quarantines those that went bad and replaces them from other holders.
//! - [`jobs`]: processing stored objects: the coordinator of the jobs submitted here (state
//!   in the store, leases, retries, dead letters, the composed output), the worker that claims
//!   tasks near their input, record pipelines over JSONL and CSV chunks (validate, map,
//!   filter, dedup by key) and registered commands (`exec:NAME`).
//! - [`api`]: the HTTP control API `meshctl` talks to, with `/metrics` from [`metrics`].
//!
//! A put streams the request body through the chunker; each chunk is placed on `rep:N`
//! holders (this node and its nearest peers, spread over zones), or cut into `ec:K+M` shards
//! on K+M holders, and counts once `W` of them stored it durably; then every holder commits its part with the placement record and
//! announces the object in the DHT. Holders beyond `W` are finished in the background from a
//! durable queue ([`replicate::complete`]). A get reads local chunks first; otherwise it asks
//! the nearest peers and the DHT's providers at once for the manifest and placement record
//! (and, when neither has it, the peer table's nearest peers), then fetches the rest from the
//! nearest holders, each chunk verified against its BLAKE3 (for `ec:`, the K nearest shards,
//! decoded). When a holder dies, the lowest holder not dead of each object it held re-creates the
//! lost parts elsewhere ([`replicate::repair`]). A delete writes a tombstone version of the
//! placement record that every holder applies (durably queued until each has it,
//! [`replicate::delete`]); chunks left unreferenced are deleted by [`gc`] after `gc_grace`.
//! [`Node::start`] brings all of this up and [`Node::shutdown`] stops it gracefully; several
//! nodes can run in one process.

pub mod api;
pub mod chunker;
pub mod config;
pub mod erasure;
pub mod gc;
pub mod identity;
pub mod jobs;
pub mod metrics;
pub mod net;
pub mod objects;
pub mod placement;
pub mod replicate;
pub mod scrub;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::identity::DataDirError;
use crate::store::{RocksStore, StoreError};

/// Longest a put waits for its DHT announcement to be stored (the announcement goes on after).
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("cannot open the store in {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("cannot start networking: {0}")]
    Net(#[from] net::NetError),
    #[error(
        "cannot listen on {addr} for the control API: {source}; is another meshd running? choose another --api-addr"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running node. Dropping it without [`Node::shutdown`] stops its server without waiting.
#[derive(Debug)]
pub struct Node {
    config: Config,
    api_addr: SocketAddr,
    token: String,
    peer_id: PeerId,
    store: Arc<RocksStore>,
    mesh: replicate::Mesh,
    stop: CancellationToken,
    /// Cancels `stop` if the node is dropped without [`Node::shutdown`].
    _stop_on_drop: tokio_util::sync::DropGuard,
    server: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    net_task: JoinHandle<()>,
    serve_task: JoinHandle<()>,
    completion_task: JoinHandle<()>,
    tombstone_task: JoinHandle<()>,
    gc_task: JoinHandle<()>,
    repair_task: JoinHandle<()>,
    scrub: scrub::Handle,
    scrub_task: Option<JoinHandle<()>>,
    jobs: Arc<jobs::service::Jobs>,
    _lock: std::fs::File,
}

impl Node {
    /// Validates `config`, opens the data directory and the store, and starts serving.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        let setup = tokio::task::spawn_blocking(move || -> Result<_, StartError> {
            let lock = identity::lock_data_dir(&data_dir)?;
            let keypair = identity::load_or_create_identity(&data_dir)?;
            let token = identity::load_or_create_token(&data_dir)?;
            Ok((lock, keypair, token))
        });
        let (lock, keypair, token) = setup.await.map_err(|e| {
            StartError::DataDir(DataDirError::Create {
                path: config.data_dir.clone(),
                source: std::io::Error::other(e),
            })
        })??;
        let peer_id = PeerId::from(keypair.public());

        let db_path = config.data_dir.join("db");
        let store_config = config.store.clone();
        let path = db_path.clone();
        let store = tokio::task::spawn_blocking(move || RocksStore::open(&path, &store_config))
            .await
            .map_err(|e| StartError::Store {
                path: db_path.clone(),
                source: StoreError::Db(e.to_string()),
            })?
            .map_err(|source| StartError::Store {
                path: db_path.clone(),
                source,
            })?;

        let listener = tokio::net::TcpListener::bind(config.api_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.api_addr,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.api_addr,
            source,
        })?;

        let metrics = metrics::Metrics::new();
        let stop = CancellationToken::new();
        let net_config = config.net.resolve(net::Role::Storage)?;
        let (inbound_tx, inbound_rx) = tokio::sync::mpsc::channel(net::INBOUND_QUEUE);
        let exec_names: Vec<String> = config
            .processors
            .keys()
            .take(mesh_proto::wire::MAX_REPORTED_PROCESSORS)
            .cloned()
            .collect();
        let load = load_reporter(Arc::clone(&store), config.net.zone.clone(), exec_names);
        let (network, net_task) =
            net::start(net_config, keypair, load, Some(inbound_tx), stop.clone()).await?;
        let mesh = replicate::Mesh::new(
            Arc::clone(&store),
            network.clone(),
            metrics.clone(),
            replicate::Settings {
                write_window: config.net.write_window,
                hedge_after: config.net.hedge_after,
                min_free_bytes: config.net.min_free_space.as_u64(),
                // A get that finds no provider asks the peer table too, so a put need not
                // wait out an announcement that a partition or a dead peer holds up.
                announce_timeout: config.net.request_timeout.min(ANNOUNCE_WAIT),
                dead_after: config.net.dead_after,
                repair_rate: config.durability.repair_rate.as_u64(),
            },
        );
        let serve_task = tokio::spawn(mesh.clone().serve(inbound_rx));
        let completion_task = tokio::spawn(mesh.clone().run_completion(stop.clone()));
        let durability = &config.durability;
        let tombstone_task = tokio::spawn(
            mesh.clone()
                .run_tombstone_delivery(durability.tombstone_retention, stop.clone()),
        );
        let collector = gc::Collector::new(
            Arc::clone(&store),
            metrics.clone(),
            gc::Settings {
                grace: durability.gc_grace,
                tombstone_retention: durability.tombstone_retention,
            },
        );
        let gc_task = tokio::spawn(collector.run(stop.clone()));
        let repair_task = tokio::spawn(mesh.clone().run_repair(stop.clone()));
        announce_objects(Arc::clone(&store), network.clone());
        let scrub = open_scrub(Arc::clone(&store), &config).await?;
        let scrub_task = scrub.enabled().then(|| {
            tokio::spawn(scrub::run(
                scrub.clone(),
                mesh.clone(),
                metrics.clone(),
                stop.clone(),
            ))
        });
        let jobs = Arc::new(
            jobs::service::Jobs::start(
                Arc::clone(&store),
                mesh.clone(),
                metrics.clone(),
                &config,
                stop.clone(),
            )
            .map_err(|source| StartError::Store {
                path: store.path().to_owned(),
                source,
            })?,
        );
        let state = api::ApiState::new(
            Arc::clone(&store),
            mesh.clone(),
            metrics.clone(),
            config.clone(),
            token.clone(),
            peer_id.to_string(),
            api_addr.to_string(),
        )
        .with_scrub(scrub.clone())
        .with_jobs(jobs.coordinator.clone(), jobs.worker.clone());
        let app = api::router(state);
        let serve_stop = stop.clone();
        let server = tokio::spawn(async move {
            // Without TCP_NODELAY, the last small write of a streamed response waits for the
            // client's delayed ACK: about 40 ms per request on a kept-alive connection.
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|stream| {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
                }
            });
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(serve_stop.cancelled_owned())
                .await;
            if let Err(e) = result {
                warn!(error = %e, "control API server stopped with an error");
            }
        });
        let upkeep = tokio::spawn(api::metrics_upkeep(metrics, stop.clone()));
        let listen: Vec<String> = network
            .status()
            .listen_addrs
            .iter()
            .map(ToString::to_string)
            .collect();
        info!(peer = %peer_id, api = %api_addr, listen = ?listen, zone = %config.net.zone, data_dir = %config.data_dir.display(), "meshd started");
        let _stop_on_drop = stop.clone().drop_guard();
        Ok(Node {
            config,
            api_addr,
            token,
            peer_id,
            store,
            mesh,
            stop,
            _stop_on_drop,
            server,
            upkeep,
            net_task,
            serve_task,
            completion_task,
            tombstone_task,
            gc_task,
            repair_task,
            scrub,
            scrub_task,
            jobs,
            _lock: lock,
        })
    }

    /// The address the control API listens on (the real port when configured with port 0).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The control API's bearer token.
    pub fn api_token(&self) -> &str {
        &self.token
    }

    /// This node's peer id, derived from `identity.key`.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The network handle (peer table, addresses).
    pub fn network(&self) -> &net::Network {
        self.mesh.network()
    }

    /// The replicated object service.
    pub fn mesh(&self) -> &replicate::Mesh {
        &self.mesh
    }

    /// The local store.
    pub fn store(&self) -> &Arc<RocksStore> {
        &self.store
    }

    /// The job coordinator and worker.
    pub fn jobs(&self) -> &jobs::service::Jobs {
        &self.jobs
    }

    /// The scrubber's status and its start-a-pass switch.
    pub fn scrub(&self) -> &scrub::Handle {
        &self.scrub
    }

    /// Stops accepting requests, lets those in flight finish for up to
    /// `api.shutdown_grace`, aborts the rest, and flushes the store.
    pub async fn shutdown(self) {
        info!("meshd shutting down");
        self.stop.cancel();
        let Node {
            mut server,
            upkeep,
            net_task,
            serve_task,
            completion_task,
            tombstone_task,
            gc_task,
            repair_task,
            scrub_task,
            jobs,
            mesh,
            store,
            config,
            _lock,
            ..
        } = self;
        if tokio::time::timeout(config.api.shutdown_grace, &mut server)
            .await
            .is_err()
        {
            warn!(grace = ?config.api.shutdown_grace, "requests still running after the grace period; aborting them");
            server.abort();
            let _ = server.await;
        }
        let _ = upkeep.await;
        // Background completion stops between attempts; what it owes stays queued.
        let _ = completion_task.await;
        // So do tombstone deliveries; the collector finishes its pass (it holds the store).
        let _ = tombstone_task.await;
        let _ = gc_task.await;
        let _ = repair_task.await;
        // The scrubber stops between batches; its cursor is in the store.
        if let Some(task) = scrub_task {
            let _ = task.await;
        }
        // The job service's loops stop on the token; running tasks are dropped (their leases
        // expire at their coordinators).
        if let Ok(jobs) = Arc::try_unwrap(jobs) {
            jobs.stopped().await;
        }
        // The swarm stops on the same token; its QUIC endpoint closes when it is dropped.
        let _ = net_task.await;
        // With the swarm gone the inbound queue closes and the service drains.
        let _ = serve_task.await;
        drop(mesh);
        let flushed = tokio::task::spawn_blocking(move || {
            let result = store.flush();
            // Closing RocksDB before the lock file is released keeps a restarting node from
            // racing this one for the database.
            drop(store);
            result
        })
        .await;
        match flushed {
            Ok(Ok(())) => info!("store flushed; meshd stopped"),
            Ok(Err(e)) => {
                warn!(error = %e, "flushing the store at shutdown failed; the WAL will be replayed")
            }
            Err(e) => warn!(error = %e, "flush task failed"),
        }
        drop(_lock);
    }
}

/// Loads the scrubber's persisted state.
async fn open_scrub(store: Arc<RocksStore>, config: &Config) -> Result<scrub::Handle, StartError> {
    let durability = config.durability.clone();
    let path = store.path().to_owned();
    let opened = tokio::task::spawn_blocking(move || scrub::Handle::open(store, &durability))
        .await
        .map_err(|e| StoreError::Db(e.to_string()));
    opened
        .and_then(|r| r)
        .map_err(|source| StartError::Store { path, source })
}

/// Builds the load report gossiped every few seconds.
fn load_reporter(store: Arc<RocksStore>, zone: String, processors: Vec<String>) -> net::LoadFn {
    use crate::store::MetaStore;
    let cpu = std::sync::Mutex::new(CpuSampler::default());
    Arc::new(move || {
        let stats = store.stats().unwrap_or_default();
        let (mem_total, mem_used) = memory();
        let cpu = cpu.lock().map(|mut s| s.sample()).unwrap_or(0.0);
        mesh_proto::wire::LoadReport {
            zone: zone.clone(),
            version: mesh_proto::MESH_VERSION.to_owned(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            cpu,
            mem_used,
            mem_total,
            disk_free: replicate::disk_free(store.path()),
            disk_used: stats.bytes,
            chunks: stats.chunks,
            bytes: stats.bytes,
            processors: processors.clone(),
            ..Default::default()
        }
    })
}

/// CPU busy fraction between samples, from `/proc/stat` (0 where that is unavailable).
#[derive(Debug, Default)]
pub(crate) struct CpuSampler {
    last: Option<CpuTicks>,
}

/// Cumulative CPU ticks (USER_HZ, summed over the cores) at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuTicks {
    /// Every core's busy ticks.
    pub busy: u64,
    /// Every core's ticks, busy or idle.
    pub total: u64,
    /// This process's user and system ticks.
    pub own: u64,
}

impl CpuTicks {
    /// Now, or none where `/proc` cannot tell.
    pub(crate) fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (busy, total) = machine_ticks(&stat)?;
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| process_ticks(&s))
            .unwrap_or(0);
        Some(Self { busy, total, own })
    }

    /// Busy fraction of the machine since `earlier`.
    pub(crate) fn load_since(&self, earlier: &Self) -> f32 {
        self.share_since(earlier, self.busy.saturating_sub(earlier.busy))
    }

    /// Busy fraction of the machine since `earlier`, leaving out this process's own use.
    pub(crate) fn others_since(&self, earlier: &Self) -> f32 {
        let busy = self.busy.saturating_sub(earlier.busy);
        let own = self.own.saturating_sub(earlier.own);
        self.share_since(earlier, busy.saturating_sub(own))
    }

    /// `ticks` as a fraction of all ticks since `earlier` (0 when no time passed).
    fn share_since(&self, earlier: &Self, ticks: u64) -> f32 {
        match self.total.checked_sub(earlier.total) {
            Some(dt) if dt > 0 => (ticks as f32 / dt as f32).clamp(0.0, 1.0),
            _ => 0.0,
        }
    }
}

/// (busy, total) ticks from the `cpu` line of `/proc/stat`; idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// utime + stime from `/proc/self/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`: utime and stime are fields 14 and 15.
fn process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

impl CpuSampler {
    pub(crate) fn sample(&mut self) -> f32 {
        let Some(now) = CpuTicks::read() else {
            return 0.0;
        };
        let load = self.last.map_or(0.0, |last| now.load_since(&last));
        self.last = Some(now);
        load
    }
}

/// (total, used) memory in bytes, from `/proc/meminfo`.
fn memory() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    (total, total.saturating_sub(field("MemAvailable:")))
}

/// Re-announces every object this node holds (provider records expire, and a restarted
/// node's were only in memory).
fn announce_objects(store: Arc<RocksStore>, network: net::Network) {
    use crate::store::MetaStore;
    tokio::spawn(async move {
        let mut after = None;
        loop {
            let s = Arc::clone(&store);
            let page =
                tokio::task::spawn_blocking(move || s.list_objects(after.as_ref(), 1000)).await;
            let Ok(Ok(page)) = page else { break };
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for object in &page {
                network.provide(object.id).await;
            }
        }
    });
}

/// Runs a node until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let node = Node::start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_and_process_ticks_parse() {
        let stat = "cpu  100 5 50 800 40 0 5 0 0 0\ncpu0 50 2 25 400 20 0 3 0 0 0\n";
        assert_eq!(machine_ticks(stat), Some((160, 1000)));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
        // A command name with spaces and a parenthesis does not shift the fields.
        let own = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 70 30 0 0 20 0 8 0 1";
        assert_eq!(process_ticks(own), Some(100));
        assert_eq!(process_ticks("42 (x) S 1"), None);
        let here = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(process_ticks(&here).is_some(), "{here}");
    }

    #[test]
    fn a_node_leaves_its_own_cpu_out_of_the_others_load() {
        let before = CpuTicks {
            busy: 1000,
            total: 4000,
            own: 300,
        };
        // 200 ticks of 2 cores: 180 busy, of which this process used 120.
        let after = CpuTicks {
            busy: 1180,
            total: 4200,
            own: 420,
        };
        assert!((after.load_since(&before) - 0.9).abs() < 1e-6);
        assert!((after.others_since(&before) - 0.3).abs() < 1e-6);
        // Clock going backwards or no time passed: no load rather than nonsense.
        assert_eq!(before.others_since(&after), 0.0);
        assert_eq!(after.others_since(&after), 0.0);
        let now = CpuTicks::read().expect("/proc is readable here");
        let load = now.others_since(&CpuTicks::default());
        assert!((0.0..=1.0).contains(&load));
    }
}
