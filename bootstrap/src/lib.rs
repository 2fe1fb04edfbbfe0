//! mesh-bootstrap: a storage-less peer that nodes in different clouds join through.
//!
//! It runs the node library's own networking ([`mesh_node::net`]) in the bootstrap role:
//! Kademlia in server mode, identify, AutoNAT (which answers dial-back probes), and a
//! circuit-relay server so that nodes behind NAT stay reachable. It keeps no chunks: chunk
//! and control requests are refused, and nodes leave it out of placement because identify
//! says `role=bootstrap`. Its identity lives in `<data-dir>/identity.key`, so its address —
//! printed in the first log line — stays the same across restarts.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use mesh_node::config::{ConfigError, NetConfig};
use mesh_node::identity::DataDirError;
use mesh_node::net::{self, NetError, Network, RelayLimits, Role};
use mesh_proto::wire::LoadReport;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What a bootstrap peer needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Networking, as for `meshd` (`listen`, `external_addrs`, `zone`, timings).
    pub net: NetConfig,
    /// What one relayed circuit may carry (libp2p's small defaults, or more to carry the
    /// mesh's traffic between nodes that hole punching cannot connect).
    pub relay: RelayLimits,
}

/// Why a bootstrap peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Net(#[from] NetError),
}

/// A running bootstrap peer.
#[derive(Debug)]
pub struct Bootstrap {
    network: Network,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _lock: std::fs::File,
}

impl Bootstrap {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let mut net_config = config.net.resolve(Role::Bootstrap)?;
        // libp2p's relay panics on a circuit duration beyond u32::MAX seconds.
        if u32::try_from(config.relay.max_circuit_duration.as_secs()).is_err() {
            return Err(ConfigError::Invalid {
                key: "relay.max_circuit_duration",
                message: format!(
                    "{:?} is too long (at most {} seconds)",
                    config.relay.max_circuit_duration,
                    u32::MAX
                ),
            }
            .into());
        }
        net_config.relay_server = Some(config.relay);
        let lock = mesh_node::identity::lock_data_dir(&config.data_dir)?;
        let keypair = mesh_node::identity::load_or_create_identity(&config.data_dir)?;
        let stop = CancellationToken::new();
        // A bootstrap peer publishes no load report; the function is never called.
        let load: net::LoadFn = Arc::new(LoadReport::default);
        let (network, task) = net::start(net_config, keypair, load, None, stop.clone()).await?;
        let this = Self {
            network,
            stop,
            task,
            _lock: lock,
        };
        for addr in this.dial_addrs() {
            info!(bootstrap = %addr, "mesh-bootstrap started; join with --bootstrap {addr}");
        }
        Ok(this)
    }

    /// The full addresses (with `/p2p/<peer id>`) nodes should pass to `--bootstrap`.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        let status = self.network.status();
        let addrs = if status.external_addrs.is_empty() {
            &status.listen_addrs
        } else {
            &status.external_addrs
        };
        addrs
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.network.local_peer_id())))
            .collect()
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Runs a bootstrap peer until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let node = Bootstrap::start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}
