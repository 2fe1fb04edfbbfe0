//! mesh-node: the mesh daemon as a library; `meshd` is a thin binary around [`run`].
//!
//! What it owns, and how data flows through it:
//!
//! - [`config`]: the typed, validated configuration (defaults < file < `MESH_*` env < flags).
//! - [`identity`]: the data directory's lock, the node's Ed25519 identity and the API token.
//! - [`store`]: content-addressed chunks and object metadata in RocksDB, behind the narrow
//!   [`store::ChunkStore`] / [`store::MetaStore`] traits.
//! - [`chunker`]: cuts a byte stream into chunks (FastCDC, fixed, record-aligned).
//! - [`objects`]: ingest (stream -> chunker -> hash + store -> manifest commit) and reads
//!   (manifest -> verified chunks -> stream).
//! - [`api`]: the HTTP control API `meshctl` talks to, with `/metrics` from [`metrics`].
//!
//! A put streams the request body through the chunker into the store; the object becomes
//! visible when its manifest commits in one synced write batch. A get streams the manifest's
//! chunks back, each verified against its BLAKE3. [`Node::start`] brings all of this up and
//! [`Node::shutdown`] stops it gracefully; several nodes can run in one process.

pub mod api;
pub mod chunker;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod objects;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use libp2p_identity::PeerId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::identity::DataDirError;
use crate::store::{RocksStore, StoreError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("cannot open the store in {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
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
    stop: CancellationToken,
    /// Cancels `stop` if the node is dropped without [`Node::shutdown`].
    _stop_on_drop: tokio_util::sync::DropGuard,
    server: JoinHandle<()>,
    upkeep: JoinHandle<()>,
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
        let state = api::ApiState::new(
            Arc::clone(&store),
            metrics.clone(),
            config.clone(),
            token.clone(),
            peer_id.to_string(),
            api_addr.to_string(),
        );
        let stop = CancellationToken::new();
        let app = api::router(state);
        let serve_stop = stop.clone();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(serve_stop.cancelled_owned())
                .await;
            if let Err(e) = result {
                warn!(error = %e, "control API server stopped with an error");
            }
        });
        let upkeep = tokio::spawn(api::metrics_upkeep(metrics, stop.clone()));
        info!(peer = %peer_id, api = %api_addr, data_dir = %config.data_dir.display(), "meshd started");
        let _stop_on_drop = stop.clone().drop_guard();
        Ok(Node {
            config,
            api_addr,
            token,
            peer_id,
            store,
            stop,
            _stop_on_drop,
            server,
            upkeep,
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

    /// The local store.
    pub fn store(&self) -> &Arc<RocksStore> {
        &self.store
    }

    /// Stops accepting requests, lets those in flight finish for up to
    /// `api.shutdown_grace`, aborts the rest, and flushes the store.
    pub async fn shutdown(self) {
        info!("meshd shutting down");
        self.stop.cancel();
        let Node {
            mut server,
            upkeep,
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

/// Runs a node until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let node = Node::start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}
