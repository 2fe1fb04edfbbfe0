//! The node's networking: one task owns the libp2p `Swarm`; everything else holds a cloneable
//! [`Network`] handle that sends [`Command`]s carrying oneshot replies.
//!
//! Behaviours: QUIC transport ([`quic`]: quinn with AES-GCM first and datagrams up to 64 KiB,
//! with DNS, and a relay client for nodes behind NAT), Kademlia under `/mesh/kad/1.0.0`,
//! identify (carries zone, role and version), ping (RTT samples), gossipsub (signed load
//! reports, and job announcements handed to [`Network::job_announcements`] subscribers),
//! AutoNAT, DCUtR, an optional relay server (bootstrap peers), connection limits, and three
//! request-response protocols with bounded frames:
//! `/mesh/chunk/1` (store, fetch, has, copy), `/mesh/control/1` (placement records, manifests,
//! the job protocol's claims) and
//! `/mesh/auth/1` (membership proof).
//!
//! Data flow: outbound requests come in as commands and their responses go back through the
//! oneshot stored under the request id. Inbound chunk and control requests are handed, with
//! their response channel, to the storage service over a bounded channel (a full channel is
//! answered `Busy` at once, so a peer cannot queue work without limit); the service answers
//! through [`Command::Respond`]. The peer table lives in this task and is published as a
//! `watch` snapshot after every change.
//!
//! Nodes behind NAT: `listen` may name relay circuits (`<relay>/p2p/<id>/p2p-circuit`),
//! and AutoNAT finding the node unreachable adds circuits through the bootstrap peers. A
//! circuit is listened on once its relay is connected, and again after a backoff when the
//! relay drops it. A new external address (a circuit, one AutoNAT confirmed) is pushed to
//! connected peers at once. DCUtR's upgrades of relayed connections are counted in
//! [`NetStatus`]; [`PeerView::relayed`] marks peers reached only through a relay.
//!
//! Membership: with a cluster key, both sides of every connection challenge each other
//! (`/mesh/auth/1`); a peer that answers wrongly or not within [`AUTH_DEADLINE`] is
//! disconnected, and until it has proven the key it is not in the peer table, its chunk and
//! control requests are refused and its gossip is rejected. Kademlia and identify stay open
//! to unproven peers, so routing works before the proof: they reveal addresses, never data.

pub mod bufpool;
pub mod codec;
pub mod peers;
pub mod quic;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub,
    identify, identity, kad, noise, ping, relay, yamux,
};
use mesh_proto::ObjectId;
use mesh_proto::wire::{
    self, AuthRequest, AuthResponse, ChunkRequest, ChunkResponse, ControlRequest, ControlResponse,
    Limits, LoadReport, NodeId, Refusal,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use codec::{Frame, FrameCodec};
pub use peers::{PeerView, Role};

use peers::{PeerTable, Timeouts};

/// How long a connected peer has to prove membership before it is disconnected.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);
/// Commands queued to the swarm task before senders wait.
const COMMAND_QUEUE: usize = 1024;
/// Inbound requests queued to the storage service before new ones are answered `Busy`; the
/// capacity of the channel the storage service creates.
pub const INBOUND_QUEUE: usize = 256;
/// How often disconnected (but not dead) peers are dialed again.
const REDIAL_EVERY: Duration = Duration::from_secs(3);
/// The answer to an inbound request that finds the storage service's queue full.
const BUSY: (Refusal, &str) = (Refusal::Busy, "too many requests in flight");
/// Most addresses of one peer added to Kademlia from identify.
const MAX_IDENTIFY_ADDRS: usize = 8;
/// A peer heard of through gossip but not connected is looked up in the DHT at most this often.
const LOOKUP_EVERY: Duration = Duration::from_secs(10);
/// Most such lookups remembered at once.
const MAX_LOOKUPS: usize = 1024;

type ChunkCodec = FrameCodec<ChunkRequest, ChunkResponse>;
type ControlCodec = FrameCodec<ControlRequest, ControlResponse>;
type AuthCodec = FrameCodec<AuthRequest, AuthResponse>;

/// Networking settings, typed and validated (see `config::NetConfig` for the file form).
#[derive(Debug, Clone)]
pub struct Config {
    /// Direct (QUIC) listen addresses, and relay circuits to listen through
    /// (`<relay address>/p2p/<relay id>/p2p-circuit`, see [`is_circuit`]).
    pub listen: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    /// Tell peers the direct listen addresses (identify) and take specific ones as external
    /// addresses. Off behind NAT: peers then learn only the external addresses (configured,
    /// confirmed by AutoNAT, or relay circuits), not private ones they cannot dial.
    pub advertise_listen_addrs: bool,
    /// Each with a `/p2p/<peer id>` suffix.
    pub bootstrap: Vec<Multiaddr>,
    pub zone: String,
    pub role: Role,
    /// `None`: an open mesh.
    pub cluster_key: Option<[u8; 32]>,
    pub suspect_after: Duration,
    pub dead_after: Duration,
    pub load_interval: Duration,
    pub ping_interval: Duration,
    pub request_timeout: Duration,
    pub max_connections: u32,
    pub max_streams_per_peer: usize,
    /// Serve a circuit relay with these limits (bootstrap peers); `None`: no relay server.
    pub relay_server: Option<RelayLimits>,
}

/// Limits of the circuit relay a bootstrap peer serves to nodes behind NAT.
///
/// libp2p's defaults (128 KiB and 2 minutes per circuit) make the relay a rendezvous for
/// hole punching only: a circuit carries the handshakes, then DCUtR moves the peers to a
/// direct connection. Where hole punching fails (symmetric NATs on both sides, or a node
/// that listens only through the relay) the mesh's own traffic has to flow through the
/// circuit, which needs larger limits; the operator of the relay decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Bytes one circuit may carry before the relay closes it; 0: no limit.
    pub max_circuit_bytes: u64,
    /// How long one circuit may stay open (at most `u32::MAX` seconds).
    pub max_circuit_duration: Duration,
    /// Circuits relayed at once.
    pub max_circuits: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        let libp2p = relay::Config::default();
        Self {
            max_circuit_bytes: libp2p.max_circuit_bytes,
            max_circuit_duration: libp2p.max_circuit_duration,
            max_circuits: libp2p.max_circuits,
        }
    }
}

impl RelayLimits {
    fn server_config(self) -> relay::Config {
        relay::Config {
            max_circuit_bytes: self.max_circuit_bytes,
            max_circuit_duration: self.max_circuit_duration,
            max_circuits: self.max_circuits,
            ..relay::Config::default()
        }
    }
}

/// What can go wrong talking to a peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("the network task has stopped")]
    Stopped,
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("invalid bootstrap address {addr}: it must end with /p2p/<peer id>")]
    BootstrapAddr { addr: Multiaddr },
    #[error("cannot build the network: {0}")]
    Build(String),
}

/// Listen and external addresses, what AutoNAT thinks of us, and how hole punching went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStatus {
    pub listen_addrs: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    pub nat: String,
    /// Relayed connections that DCUtR upgraded to direct ones since the node started.
    pub hole_punches_succeeded: u64,
    /// Upgrades of relayed connections that failed (after DCUtR's own retries).
    pub hole_punches_failed: u64,
}

/// An inbound request for the storage service, with the way to answer it.
#[derive(Debug)]
pub enum Inbound {
    Chunk {
        peer: PeerId,
        request: Frame<ChunkRequest>,
        reply: Reply<ChunkResponse>,
    },
    Control {
        peer: PeerId,
        request: Frame<ControlRequest>,
        reply: Reply<ControlResponse>,
    },
}

/// Answers one inbound request. Dropping it without answering closes the stream, which the
/// peer sees as a failed request.
#[derive(Debug)]
pub struct Reply<R> {
    channel: ResponseChannel<Frame<R>>,
    commands: mpsc::Sender<Command>,
}

impl Reply<ChunkResponse> {
    pub async fn send(self, response: Frame<ChunkResponse>) {
        let _ = self
            .commands
            .send(Command::RespondChunk(self.channel, response))
            .await;
    }
}

impl Reply<ControlResponse> {
    pub async fn send(self, response: Frame<ControlResponse>) {
        let _ = self
            .commands
            .send(Command::RespondControl(self.channel, response))
            .await;
    }
}

type Responder<T> = oneshot::Sender<Result<T, NetError>>;

/// What the rest of the node asks of the swarm task.
#[derive(Debug)]
pub enum Command {
    Chunk {
        peer: PeerId,
        request: Frame<ChunkRequest>,
        reply: Responder<Frame<ChunkResponse>>,
    },
    Control {
        peer: PeerId,
        request: Frame<ControlRequest>,
        reply: Responder<Frame<ControlResponse>>,
    },
    RespondChunk(ResponseChannel<Frame<ChunkResponse>>, Frame<ChunkResponse>),
    RespondControl(
        ResponseChannel<Frame<ControlResponse>>,
        Frame<ControlResponse>,
    ),
    /// Announce this node as a provider of an object.
    Provide {
        object: ObjectId,
        /// Told whether the announcement reached at least one peer, once its query ends.
        done: Option<oneshot::Sender<bool>>,
    },
    /// Stop announcing an object (it was deleted here).
    StopProviding {
        object: ObjectId,
    },
    /// Find providers of an object (the first answers found, or none).
    FindProviders {
        object: ObjectId,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// A timing of a transfer, as an RTT sample.
    RttSample {
        peer: PeerId,
        rtt: Duration,
    },
    /// Gossip a job announcement.
    AnnounceJob(mesh_proto::job::JobAnnouncement),
}

/// Job announcements heard over gossip, with the peer that published them, buffered for
/// slow subscribers (a lagging one skips some; they are repeated every few seconds).
const JOB_ANNOUNCEMENTS: usize = 1024;

/// The cloneable handle to the network.
#[derive(Debug, Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    peers: watch::Receiver<Arc<Vec<PeerView>>>,
    status: watch::Receiver<Arc<NetStatus>>,
    local_peer_id: PeerId,
    zone: String,
    jobs: broadcast::Sender<(PeerId, mesh_proto::job::JobAnnouncement)>,
}

impl Network {
    /// Job announcements gossiped by other nodes from now on.
    pub fn job_announcements(
        &self,
    ) -> broadcast::Receiver<(PeerId, mesh_proto::job::JobAnnouncement)> {
        self.jobs.subscribe()
    }

    /// Gossips a job announcement to every node.
    pub async fn announce_job(&self, announcement: mesh_proto::job::JobAnnouncement) {
        let _ = self.commands.send(Command::AnnounceJob(announcement)).await;
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    pub fn local_node_id(&self) -> NodeId {
        NodeId(self.local_peer_id.to_bytes())
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The latest snapshot of the peer table.
    pub fn peers(&self) -> Arc<Vec<PeerView>> {
        Arc::clone(&self.peers.borrow())
    }

    /// A receiver that changes whenever the peer table does (for waiting on conditions).
    pub fn watch_peers(&self) -> watch::Receiver<Arc<Vec<PeerView>>> {
        self.peers.clone()
    }

    pub fn status(&self) -> Arc<NetStatus> {
        Arc::clone(&self.status.borrow())
    }

    pub async fn chunk(
        &self,
        peer: PeerId,
        request: Frame<ChunkRequest>,
    ) -> Result<Frame<ChunkResponse>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Chunk {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    pub async fn control(
        &self,
        peer: PeerId,
        request: Frame<ControlRequest>,
    ) -> Result<Frame<ControlResponse>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Control {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Starts announcing `object` in the DHT (re-announcements; nobody waits on them).
    pub async fn provide(&self, object: ObjectId) {
        let _ = self
            .commands
            .send(Command::Provide { object, done: None })
            .await;
    }

    /// Announces `object` and waits until the announcement is stored on the peers nearest
    /// its key (true) or the query ended without reaching any (false), at most `timeout`.
    /// A put waits for this, so that any node can find the object once the put returned.
    pub async fn provide_confirmed(&self, object: ObjectId, timeout: Duration) -> bool {
        let (done, rx) = oneshot::channel();
        let sent = self.commands.send(Command::Provide {
            object,
            done: Some(done),
        });
        if sent.await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(true)))
    }

    /// Stops announcing `object`: it is no longer re-published, so the provider records
    /// other nodes keep for it expire.
    pub async fn stop_providing(&self, object: ObjectId) {
        let _ = self.commands.send(Command::StopProviding { object }).await;
    }

    pub async fn find_providers(&self, object: ObjectId) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::FindProviders { object, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub fn rtt_sample(&self, peer: PeerId, rtt: Duration) {
        let _ = self.commands.try_send(Command::RttSample { peer, rtt });
    }
}

/// Builds this node's load report on demand (called by the swarm task every interval).
pub type LoadFn = Arc<dyn Fn() -> LoadReport + Send + Sync>;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    chunk: request_response::Behaviour<ChunkCodec>,
    control: request_response::Behaviour<ControlCodec>,
    auth: request_response::Behaviour<AuthCodec>,
    autonat: autonat::Behaviour,
    relay_client: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
}

/// Kademlia store limits. The defaults (1024 records, 1024 provided keys) would stop a node
/// from announcing its 1025th object; a provider record is about 100 bytes, so a million
/// keys cost about 100 MiB at most.
fn kad_store_config() -> MemoryStoreConfig {
    MemoryStoreConfig {
        max_records: 65_536,
        max_value_bytes: 64 * 1024,
        max_providers_per_key: 20,
        max_provided_keys: 1 << 20,
    }
}

fn agent_version(config: &Config) -> String {
    format!(
        "meshd/{} (zone={}; role={})",
        mesh_proto::MESH_VERSION,
        config.zone,
        config.role.as_str()
    )
}

/// Reads zone and role out of a peer's identify agent version.
fn parse_agent(agent: &str) -> (String, Role, String) {
    let version = agent
        .split_whitespace()
        .next()
        .and_then(|p| p.split('/').nth(1))
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let field = |name: &str| {
        agent
            .split(['(', ')', ';'])
            .map(str::trim)
            .find_map(|part| part.strip_prefix(name))
            .map(|v| v.chars().take(wire::MAX_ZONE_LEN).collect::<String>())
    };
    let zone = field("zone=").unwrap_or_default();
    let role = match field("role=").as_deref() {
        Some("bootstrap") => Role::Bootstrap,
        _ => Role::Storage,
    };
    (zone, role, version)
}

fn build_swarm(config: &Config, keypair: identity::Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let peer_id = keypair.public().to_peer_id();
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(config.max_streams_per_peer);
    let relay_limits = config.relay_server;
    let hide_listen_addrs = !config.advertise_listen_addrs;
    let agent = agent_version(config);
    let ping_interval = config.ping_interval;
    let max_connections = config.max_connections;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            quic::QuicTransport::new(key, &quic::QuicConfig::default())
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| build(&e))?
        .with_dns()
        .map_err(|e| build(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_behaviour(|key, relay_client| {
            let mut kad_config = kad::Config::new(StreamProtocol::new(wire::KAD_PROTOCOL));
            kad_config.set_query_timeout(Duration::from_secs(30));
            let store = MemoryStore::with_config(peer_id, kad_store_config());
            let kad = kad::Behaviour::with_config(peer_id, store, kad_config);
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_secs(1))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(16 * 1024)
                .build()?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let limits = connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(max_connections))
                    .with_max_pending_incoming(Some(64))
                    .with_max_established_per_peer(Some(4)),
            );
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                limits,
                kad,
                identify: identify::Behaviour::new(
                    identify::Config::new(wire::IDENTIFY_PROTOCOL.to_owned(), key.public())
                        .with_agent_version(agent)
                        .with_hide_listen_addrs(hide_listen_addrs),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(ping_interval)),
                gossipsub,
                chunk: request_response::Behaviour::with_codec(
                    ChunkCodec::new(Limits::CHUNK),
                    [(
                        StreamProtocol::new(wire::CHUNK_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    rr_config.clone(),
                ),
                control: request_response::Behaviour::with_codec(
                    ControlCodec::new(Limits::CONTROL),
                    [(
                        StreamProtocol::new(wire::CONTROL_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    rr_config.clone(),
                ),
                auth: request_response::Behaviour::with_codec(
                    AuthCodec::new(Limits::AUTH),
                    [(
                        StreamProtocol::new(wire::AUTH_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(AUTH_DEADLINE)
                        .with_max_concurrent_streams(4),
                ),
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
                relay_client,
                relay_server: Toggle::from(
                    relay_limits
                        .map(|limits| relay::Behaviour::new(peer_id, limits.server_config())),
                ),
                dcutr: dcutr::Behaviour::new(peer_id),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// The peer id at the end of a multiaddr, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Whether `addr` is a relay circuit to listen through or dial through (it has a
/// `/p2p-circuit` part).
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The relay of a circuit listen address of the form
/// `<relay address>/p2p/<relay peer id>/p2p-circuit`; `None` for any other form.
pub fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let parts: Vec<Protocol<'_>> = addr.iter().collect();
    match parts.as_slice() {
        [prefix @ .., Protocol::P2p(relay), Protocol::P2pCircuit]
            if !prefix.is_empty()
                && prefix
                    .iter()
                    .all(|p| !matches!(p, Protocol::P2p(_) | Protocol::P2pCircuit)) =>
        {
            Some(*relay)
        }
        _ => None,
    }
}

fn is_specific(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_unspecified(),
        Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => true,
        _ => false,
    })
}

/// Starts the network: listens, dials the bootstrap peers and spawns the swarm task.
/// Returns once every listener is up, so the addresses in [`Network::status`] are final.
pub async fn start(
    config: Config,
    keypair: identity::Keypair,
    load: LoadFn,
    inbound: Option<mpsc::Sender<Inbound>>,
    shutdown: CancellationToken,
) -> Result<(Network, tokio::task::JoinHandle<()>), NetError> {
    let mut bootstrap = Vec::new();
    for addr in &config.bootstrap {
        let peer = peer_of(addr).ok_or_else(|| NetError::BootstrapAddr { addr: addr.clone() })?;
        bootstrap.push((peer, addr.clone()));
    }
    // Circuits are listened on once the swarm task runs: they need the relay to answer, and
    // a relay that is down must not stop the node from starting.
    let (circuits, direct): (Vec<Multiaddr>, Vec<Multiaddr>) =
        config.listen.iter().cloned().partition(is_circuit);
    let mut circuit_listeners = Vec::with_capacity(circuits.len());
    for addr in circuits {
        let relay = circuit_relay(&addr).ok_or_else(|| NetError::Listen {
            addr: addr.clone(),
            reason: "a relay circuit reads <relay address>/p2p/<relay peer id>/p2p-circuit".into(),
        })?;
        circuit_listeners.push(CircuitListener::new(addr, relay));
    }
    let local_peer_id = keypair.public().to_peer_id();
    let mut swarm = build_swarm(&config, keypair)?;

    // What we listen on is what others dial when it is a specific address we advertise (tests,
    // netsim, one VPC); a wildcard or unadvertised listener waits for AutoNAT or
    // --external-addr. A relay circuit is reachable by construction.
    let listen_is_external = config.advertise_listen_addrs
        && config.external_addrs.is_empty()
        && direct.iter().all(is_specific);
    let reachable = !config.external_addrs.is_empty()
        || !circuit_listeners.is_empty()
        || (listen_is_external && !direct.is_empty());
    if reachable || config.role == Role::Bootstrap {
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    let mut pending_listeners = HashSet::new();
    for addr in &direct {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        pending_listeners.insert(id);
    }
    let mut listen_addrs = Vec::new();
    while !pending_listeners.is_empty() {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                pending_listeners.remove(&listener_id);
                listen_addrs.push(address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } if pending_listeners.contains(&listener_id) => {
                let reason = match reason {
                    Ok(()) => "listener closed".to_owned(),
                    Err(e) => e.to_string(),
                };
                return Err(NetError::Listen {
                    addr: direct.first().cloned().unwrap_or_else(Multiaddr::empty),
                    reason,
                });
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NetError::Listen {
                    addr: direct.first().cloned().unwrap_or_else(Multiaddr::empty),
                    reason: error.to_string(),
                });
            }
            _ => {}
        }
    }
    if listen_is_external {
        for addr in &listen_addrs {
            swarm.add_external_address(addr.clone());
        }
    }
    let topic = gossipsub::IdentTopic::new(wire::LOAD_TOPIC);
    let job_topic = gossipsub::IdentTopic::new(wire::JOB_TOPIC);
    for t in [&topic, &job_topic] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(t)
            .map_err(|e| NetError::Build(e.to_string()))?;
    }
    let (jobs_tx, _) = broadcast::channel(JOB_ANNOUNCEMENTS);
    if config.cluster_key.is_none() && config.role == Role::Storage {
        warn!("no cluster key configured: this is an open mesh, any peer may store and fetch");
    }

    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (peers_tx, peers_rx) = watch::channel(Arc::new(Vec::new()));
    let status = NetStatus {
        listen_addrs: listen_addrs.clone(),
        external_addrs: swarm.external_addresses().cloned().collect(),
        nat: "unknown".into(),
        ..NetStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(Arc::new(status));
    let network = Network {
        commands: commands_tx.clone(),
        peers: peers_rx,
        status: status_rx,
        local_peer_id,
        zone: config.zone.clone(),
        jobs: jobs_tx.clone(),
    };
    let timeouts = Timeouts {
        suspect_after: config.suspect_after,
        dead_after: config.dead_after,
        forget_after: Duration::from_secs(24 * 3600),
    };
    let mut event_loop = EventLoop {
        swarm,
        commands: commands_rx,
        commands_tx,
        table: PeerTable::new(timeouts),
        identified: HashMap::new(),
        verified: HashSet::new(),
        awaiting_auth: HashMap::new(),
        auth_nonces: HashMap::new(),
        pending_chunk: HashMap::new(),
        pending_control: HashMap::new(),
        pending_providers: HashMap::new(),
        pending_provides: HashMap::new(),
        chunk_started: HashMap::new(),
        early_rtt: HashMap::new(),
        peers_tx,
        status_tx,
        inbound,
        load,
        topic,
        job_topic,
        jobs_tx,
        bootstrap,
        bootstrap_backoff: Duration::from_secs(1),
        next_bootstrap: Instant::now(),
        next_load: Instant::now(),
        next_redial: Instant::now(),
        nat: "unknown".into(),
        config,
        listen_addrs,
        circuits: circuit_listeners,
        links: HashMap::new(),
        hole_punches: (0, 0),
        lookups: HashMap::new(),
    };
    event_loop.dial_bootstrap();
    event_loop.open_circuits(Instant::now());
    let task = tokio::spawn(async move { event_loop.run(shutdown).await });
    Ok((network, task))
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    table: PeerTable,
    /// Identify information of peers, kept until they have proven membership.
    identified: HashMap<PeerId, (String, Role, String, Vec<Multiaddr>)>,
    /// Peers that proved the cluster key (every identified mesh peer in an open mesh).
    verified: HashSet<PeerId>,
    /// Connected peers that still owe a proof, with the time of connection.
    awaiting_auth: HashMap<PeerId, Instant>,
    auth_nonces: HashMap<OutboundRequestId, (PeerId, [u8; 32])>,
    pending_chunk: HashMap<OutboundRequestId, Responder<Frame<ChunkResponse>>>,
    pending_control: HashMap<OutboundRequestId, Responder<Frame<ControlResponse>>>,
    pending_providers: HashMap<kad::QueryId, oneshot::Sender<Vec<PeerId>>>,
    /// Announcements someone waits on (a put); one per put in flight.
    pending_provides: HashMap<kad::QueryId, oneshot::Sender<bool>>,
    /// Start time and payload size of outbound chunk requests: their timings feed the RTT
    /// (see [`peers`]). Entries leave with the response or the failure.
    chunk_started: HashMap<OutboundRequestId, (Instant, u64)>,
    /// The latest ping of connected peers not admitted yet. A connection's first ping is
    /// usually back before identify and the membership proof are done; admission makes it
    /// the peer's provisional RTT ([`PeerTable::provisional_rtt`]), so that a new peer is not
    /// ranked as unmeasured until the next ping (`ping_interval`).
    early_rtt: HashMap<PeerId, Duration>,
    peers_tx: watch::Sender<Arc<Vec<PeerView>>>,
    status_tx: watch::Sender<Arc<NetStatus>>,
    inbound: Option<mpsc::Sender<Inbound>>,
    load: LoadFn,
    topic: gossipsub::IdentTopic,
    job_topic: gossipsub::IdentTopic,
    jobs_tx: broadcast::Sender<(PeerId, mesh_proto::job::JobAnnouncement)>,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    bootstrap_backoff: Duration,
    next_bootstrap: Instant,
    next_load: Instant,
    next_redial: Instant,
    nat: String,
    config: Config,
    listen_addrs: Vec<Multiaddr>,
    /// Relay circuits this node listens through: configured, or added when AutoNAT finds it
    /// unreachable.
    circuits: Vec<CircuitListener>,
    /// Open connections per peer, direct and relayed (entries leave with the last one).
    links: HashMap<PeerId, Links>,
    /// Relayed connections upgraded to direct ones by DCUtR, and failed upgrades.
    hole_punches: (u64, u64),
    /// Peers heard of through gossip and looked up in the DHT, with when (see
    /// [`EventLoop::look_up`]); at most [`MAX_LOOKUPS`].
    lookups: HashMap<PeerId, Instant>,
}

/// A relay circuit this node listens through. The relay closes it when the connection to
/// the relay breaks or the relay restarts; it is then listened on again after a backoff.
struct CircuitListener {
    addr: Multiaddr,
    relay: PeerId,
    listener: Option<ListenerId>,
    retry_at: Instant,
    backoff: Duration,
    /// When the relay, if not connected, is dialed again.
    next_dial: Instant,
}

impl CircuitListener {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    const MAX_RETRY: Duration = Duration::from_secs(60);

    fn new(addr: Multiaddr, relay: PeerId) -> Self {
        Self {
            addr,
            relay,
            listener: None,
            retry_at: Instant::now(),
            backoff: Self::FIRST_RETRY,
            next_dial: Instant::now(),
        }
    }

    fn retry_later(&mut self, now: Instant) {
        self.listener = None;
        self.retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX_RETRY);
    }
}

/// How many connections to one peer are open, direct and through a relay.
#[derive(Debug, Default, Clone, Copy)]
struct Links {
    direct: u32,
    relayed: u32,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(command) = self.commands.recv() => self.handle_command(command),
                event = self.swarm.select_next_some() => self.handle_event(event),
                _ = tick.tick() => self.on_tick(),
            }
        }
        debug!("network task stopped");
    }

    fn publish_peers(&self) {
        let mut views = self.table.snapshot(Instant::now());
        for view in &mut views {
            view.relayed = self
                .links
                .get(&view.id)
                .is_some_and(|l| l.direct == 0 && l.relayed > 0);
        }
        let snapshot = Arc::new(views);
        self.peers_tx.send_if_modified(|old| {
            if **old == *snapshot {
                false
            } else {
                *old = snapshot;
                true
            }
        });
    }

    fn publish_status(&self) {
        let status = NetStatus {
            listen_addrs: self.listen_addrs.clone(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            nat: self.nat.clone(),
            hole_punches_succeeded: self.hole_punches.0,
            hole_punches_failed: self.hole_punches.1,
        };
        self.status_tx.send_if_modified(|old| {
            if **old == status {
                false
            } else {
                *old = Arc::new(status);
                true
            }
        });
    }

    fn dial_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.clone() {
            if self.swarm.is_connected(&peer) {
                continue;
            }
            let mut base = addr.clone();
            base.pop();
            self.swarm.behaviour_mut().kad.add_address(&peer, base);
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
    }

    /// Listens through every circuit that is not open and whose retry time has come, once
    /// connected to its relay; dials the relays not connected.
    ///
    /// The relay client would dial the relay itself, but it gives up (and closes the
    /// listener) when it finds another dial to that peer under way, such as the one to a
    /// bootstrap peer; on a connection it finds, it asks for the reservation at once.
    fn open_circuits(&mut self, now: Instant) {
        for circuit in &mut self.circuits {
            if circuit.listener.is_some() || now < circuit.retry_at {
                continue;
            }
            if !self.swarm.is_connected(&circuit.relay) {
                if now >= circuit.next_dial {
                    circuit.next_dial = now + REDIAL_EVERY;
                    let mut relay_addr = circuit.addr.clone();
                    relay_addr.pop();
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(circuit.relay)
                        .addresses(vec![relay_addr])
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(relay = %circuit.relay, error = %e, "relay not dialed");
                    }
                }
                continue;
            }
            match self.swarm.listen_on(circuit.addr.clone()) {
                Ok(id) => circuit.listener = Some(id),
                Err(e) => {
                    warn!(circuit = %circuit.addr, error = %e, "cannot listen through relay");
                    circuit.retry_later(now);
                }
            }
        }
    }

    /// Adds a circuit through `relay_addr` (ending in `/p2p/<relay id>`), unless this node
    /// listens through that relay already.
    fn listen_through(&mut self, relay_addr: &Multiaddr) {
        let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
        let Some(relay) = circuit_relay(&circuit) else {
            return;
        };
        if !self.circuits.iter().any(|c| c.relay == relay) {
            self.circuits.push(CircuitListener::new(circuit, relay));
        }
        self.open_circuits(Instant::now());
    }

    /// Forgets the addresses of a listener that closed; a circuit is opened again later.
    fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        addresses: &[Multiaddr],
        reason: Result<(), std::io::Error>,
    ) {
        self.listen_addrs.retain(|a| !addresses.contains(a));
        let now = Instant::now();
        if let Some(circuit) = self
            .circuits
            .iter_mut()
            .find(|c| c.listener == Some(listener))
        {
            let reason = reason.err().map(|e| e.to_string());
            info!(circuit = %circuit.addr, ?reason, retry_in = ?circuit.backoff, "relay circuit closed; listening through it again later");
            circuit.retry_later(now);
        }
        self.publish_status();
    }

    /// Asks the DHT for `peer`, whose address we do not know, at most once per
    /// [`LOOKUP_EVERY`]: the query contacts it, so we connect. A peer reachable only through
    /// a relay circuit made its address known to the peers it was connected to (identify)
    /// after it joined, so a node that joined at the same time may have none for it.
    fn look_up(&mut self, peer: PeerId) {
        let now = Instant::now();
        let recent = |at: &Instant| now.duration_since(*at) < LOOKUP_EVERY;
        if self.lookups.get(&peer).is_some_and(recent) {
            return;
        }
        if self.lookups.len() >= MAX_LOOKUPS {
            self.lookups.retain(|_, at| recent(at));
            if self.lookups.len() >= MAX_LOOKUPS {
                return;
            }
        }
        self.lookups.insert(peer, now);
        self.swarm.behaviour_mut().kad.get_closest_peers(peer);
    }

    fn link(&mut self, peer: PeerId, relayed: bool, up: bool) {
        let links = self.links.entry(peer).or_default();
        let count = if relayed {
            &mut links.relayed
        } else {
            &mut links.direct
        };
        *count = if up {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        if links.direct == 0 && links.relayed == 0 {
            self.links.remove(&peer);
        }
    }

    /// Tells connected peers our addresses now: identify repeats itself only every few
    /// minutes, and a node behind NAT has no other way to make a new relay circuit known.
    fn push_addresses(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        self.swarm.behaviour_mut().identify.push(peers);
        self.publish_status();
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.open_circuits(now);
        // Bootstrap peers unreachable and nobody else known: retry with backoff, and say so.
        if !self.bootstrap.is_empty()
            && now >= self.next_bootstrap
            && !self
                .bootstrap
                .iter()
                .any(|(p, _)| self.swarm.is_connected(p))
        {
            if self.swarm.connected_peers().next().is_none() {
                warn!(
                    retry_in = ?self.bootstrap_backoff,
                    "no bootstrap peer reachable; retrying"
                );
            }
            self.dial_bootstrap();
            self.next_bootstrap = now + self.bootstrap_backoff;
            self.bootstrap_backoff = (self.bootstrap_backoff * 2).min(Duration::from_secs(60));
        }
        // Membership proofs that did not come in time.
        let late: Vec<PeerId> = self
            .awaiting_auth
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > AUTH_DEADLINE)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            warn!(%peer, "peer did not prove cluster membership in time; disconnecting");
            self.awaiting_auth.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        // Keep connections to every live peer we know of, so pings and transfers flow.
        let redial = if now >= self.next_redial {
            self.next_redial = now + REDIAL_EVERY;
            self.table.to_redial(now)
        } else {
            Vec::new()
        };
        for (peer, addrs) in redial {
            if !self.swarm.is_connected(&peer) {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .build();
                let _ = self.swarm.dial(opts);
            }
        }
        if now >= self.next_load {
            self.next_load = now + self.config.load_interval;
            if self.config.role == Role::Storage {
                let report = (self.load)();
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), report.encode())
                {
                    debug!(error = %e, "load report not published");
                }
            }
        }
        self.table.forget_stale(now);
        self.publish_peers();
        self.publish_status();
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Chunk {
                peer,
                request,
                reply,
            } => {
                let sent = request.payload.len() as u64;
                let id = self
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_request(&peer, request);
                self.chunk_started.insert(id, (Instant::now(), sent));
                self.pending_chunk.insert(id, reply);
            }
            Command::Control {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_request(&peer, request);
                self.pending_control.insert(id, reply);
            }
            Command::RespondChunk(channel, response) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_response(channel, response);
            }
            Command::RespondControl(channel, response) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_response(channel, response);
            }
            Command::Provide { object, done } => {
                let key = kad::RecordKey::new(object.as_bytes());
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(query) => {
                        if let Some(done) = done {
                            self.pending_provides.insert(query, done);
                        }
                    }
                    Err(e) => {
                        warn!(%object, error = %e, "cannot announce object");
                        if let Some(done) = done {
                            let _ = done.send(false);
                        }
                    }
                }
            }
            Command::StopProviding { object } => {
                let key = kad::RecordKey::new(object.as_bytes());
                self.swarm.behaviour_mut().kad.stop_providing(&key);
            }
            Command::FindProviders { object, reply } => {
                let key = kad::RecordKey::new(object.as_bytes());
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.pending_providers.insert(id, reply);
            }
            Command::RttSample { peer, rtt } => {
                self.table.rtt_sample(&peer, rtt, Instant::now());
            }
            Command::AnnounceJob(announcement) => {
                let topic = self.job_topic.clone();
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, announcement.encode())
                {
                    // No peer subscribed yet (a lone node) is normal; it is repeated.
                    debug!(job = %announcement.job, error = %e, "job announcement not published");
                }
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.handle_behaviour(event),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.link(peer_id, endpoint.is_relayed(), true);
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.table.add_addr(&peer_id, address.clone());
                }
                self.table.set_connected(&peer_id, true);
                if self.config.cluster_key.is_some()
                    && !self.verified.contains(&peer_id)
                    && !self.awaiting_auth.contains_key(&peer_id)
                {
                    self.challenge(peer_id);
                }
                if self.circuits.iter().any(|c| c.relay == peer_id) {
                    self.open_circuits(Instant::now());
                }
                if self.bootstrap.iter().any(|(p, _)| *p == peer_id) {
                    self.bootstrap_backoff = Duration::from_secs(1);
                    if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                        debug!(error = %e, "kademlia bootstrap not started");
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                self.link(peer_id, endpoint.is_relayed(), false);
                if num_established == 0 {
                    self.table.set_connected(&peer_id, false);
                    self.awaiting_auth.remove(&peer_id);
                    self.early_rtt.remove(&peer_id);
                }
                self.publish_peers();
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(circuit) = self
                    .circuits
                    .iter_mut()
                    .find(|c| c.listener == Some(listener_id))
                {
                    info!(%address, "listening through relay");
                    circuit.backoff = CircuitListener::FIRST_RETRY;
                }
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
                self.publish_status();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                self.publish_status();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => self.on_listener_closed(listener_id, &addresses, reason),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                self.push_addresses();
                // Ask the DHT for our neighbours again: peers that became reachable the same
                // way before us (a relay circuit) were not in it when we joined.
                if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                    debug!(error = %e, "kademlia bootstrap not started");
                }
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                info!(%address, "external address expired");
                self.push_addresses();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "dial failed");
            }
            _ => {}
        }
    }

    fn challenge(&mut self, peer: PeerId) {
        let mut nonce = [0u8; 32];
        if getrandom::fill(&mut nonce).is_err() {
            warn!(%peer, "no randomness for a membership challenge; disconnecting");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let id = self
            .swarm
            .behaviour_mut()
            .auth
            .send_request(&peer, Frame::new(AuthRequest { nonce }));
        self.auth_nonces.insert(id, (peer, nonce));
        self.awaiting_auth.insert(peer, Instant::now());
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.config.cluster_key.is_none() || self.verified.contains(peer)
    }

    /// The storage service's queue, if an inbound chunk or control request from `peer` may
    /// go to it; otherwise the refusal to answer at once.
    fn inbound_gate(
        &self,
        peer: &PeerId,
    ) -> Result<&mpsc::Sender<Inbound>, (Refusal, &'static str)> {
        if !self.is_member(peer) {
            return Err((Refusal::Unauthenticated, "prove cluster membership first"));
        }
        self.inbound
            .as_ref()
            .ok_or((Refusal::BadRequest, "this peer stores nothing"))
    }

    /// Puts a peer in the table once it is both identified and proven.
    fn admit(&mut self, peer: PeerId) {
        if !self.is_member(&peer) {
            return;
        }
        let Some((zone, role, version, addrs)) = self.identified.get(&peer).cloned() else {
            return;
        };
        let new = !self.table.contains(&peer);
        let now = Instant::now();
        self.table
            .upsert(peer, zone.clone(), role, version, addrs, now);
        if let Some(rtt) = self.early_rtt.remove(&peer) {
            self.table.provisional_rtt(&peer, rtt);
        }
        if new {
            info!(%peer, %zone, role = role.as_str(), "peer joined");
        }
        self.publish_peers();
    }

    fn handle_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != wire::IDENTIFY_PROTOCOL {
                    debug!(peer = %peer_id, protocol = %info.protocol_version, "not a mesh peer");
                    return;
                }
                let (zone, role, version) = parse_agent(&info.agent_version);
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .take(MAX_IDENTIFY_ADDRS)
                    .collect();
                for addr in &addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                self.identified
                    .insert(peer_id, (zone, role, version, addrs));
                self.admit(peer_id);
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                if self.table.contains(&peer) {
                    self.table.rtt_sample(&peer, rtt, Instant::now());
                } else if self.swarm.is_connected(&peer) {
                    self.early_rtt.insert(peer, rtt);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
                ..
            }) => {
                let acceptance = self.on_gossip(&propagation_source, &message);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            BehaviourEvent::Kad(event) => self.on_kad(event),
            BehaviourEvent::Auth(event) => self.on_auth(event),
            BehaviourEvent::Chunk(event) => self.on_chunk(event),
            BehaviourEvent::Control(event) => self.on_control(event),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.nat = format!("{new:?}").to_lowercase();
                info!(status = %self.nat, "nat status changed");
                if matches!(new, autonat::NatStatus::Private) {
                    // Unreachable: listen through the bootstrap peers' relays.
                    for (_, addr) in self.bootstrap.clone() {
                        self.listen_through(&addr);
                    }
                }
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                match result {
                    Ok(_) => {
                        self.hole_punches.0 += 1;
                        info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one");
                    }
                    Err(e) => {
                        self.hole_punches.1 += 1;
                        debug!(peer = %remote_peer_id, error = %e, "hole punch failed; the connection stays relayed");
                    }
                }
                self.publish_status();
            }
            _ => {}
        }
    }

    fn on_gossip(
        &mut self,
        source: &PeerId,
        message: &gossipsub::Message,
    ) -> gossipsub::MessageAcceptance {
        if !self.is_member(source) {
            return gossipsub::MessageAcceptance::Reject;
        }
        let Some(author) = message.source else {
            return gossipsub::MessageAcceptance::Reject;
        };
        if message.topic == self.job_topic.hash() {
            return match mesh_proto::job::JobAnnouncement::decode(&message.data) {
                Ok(announcement) => {
                    let _ = self.jobs_tx.send((author, announcement));
                    gossipsub::MessageAcceptance::Accept
                }
                Err(e) => {
                    debug!(peer = %source, error = %e, "bad job announcement");
                    gossipsub::MessageAcceptance::Reject
                }
            };
        }
        if message.topic != self.topic.hash() {
            return gossipsub::MessageAcceptance::Ignore;
        }
        match LoadReport::decode(&message.data) {
            Ok(report) => {
                if self.table.contains(&author) {
                    self.table.load_report(&author, report, Instant::now());
                } else if author != *self.swarm.local_peer_id() && !self.swarm.is_connected(&author)
                {
                    // Heard of through gossip: connect, so that it can prove itself and we
                    // can measure it.
                    if let Err(libp2p::swarm::DialError::NoAddresses) = self.swarm.dial(author) {
                        self.look_up(author);
                    }
                }
                gossipsub::MessageAcceptance::Accept
            }
            Err(e) => {
                debug!(peer = %source, error = %e, "bad load report");
                gossipsub::MessageAcceptance::Reject
            }
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated { peer, .. }
                if peer != *self.swarm.local_peer_id() && !self.swarm.is_connected(&peer) =>
            {
                let _ = self.swarm.dial(peer);
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    if let Some(reply) = self.pending_providers.remove(&id) {
                        let _ = reply.send(providers.into_iter().collect());
                        if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            query.finish();
                        }
                    }
                }
                kad::QueryResult::GetProviders(_) if step.last => {
                    debug!(asked = stats.num_requests(), "no providers found");
                    if let Some(reply) = self.pending_providers.remove(&id) {
                        let _ = reply.send(Vec::new());
                    }
                }
                kad::QueryResult::StartProviding(Err(e)) => {
                    debug!(error = ?e, "provider announcement incomplete");
                    if let Some(done) = self.pending_provides.remove(&id) {
                        let _ = done.send(stats.num_successes() > 0);
                    }
                }
                kad::QueryResult::StartProviding(Ok(_)) => {
                    debug!(peers = stats.num_successes(), "object announced");
                    if let Some(done) = self.pending_provides.remove(&id) {
                        let _ = done.send(stats.num_successes() > 0);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_auth(&mut self, event: request_response::Event<Frame<AuthRequest>, Frame<AuthResponse>>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let proof = self.config.cluster_key.map(|key| {
                    wire::membership_proof(
                        &key,
                        &request.header.nonce,
                        &NodeId(self.swarm.local_peer_id().to_bytes()),
                        &NodeId(peer.to_bytes()),
                    )
                });
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .auth
                    .send_response(channel, Frame::new(AuthResponse { proof }));
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, nonce)) = self.auth_nonces.remove(&request_id) else {
                    return;
                };
                let Some(key) = self.config.cluster_key else {
                    return;
                };
                let expected = wire::membership_proof(
                    &key,
                    &nonce,
                    &NodeId(peer.to_bytes()),
                    &NodeId(self.swarm.local_peer_id().to_bytes()),
                );
                self.awaiting_auth.remove(&peer);
                let ok = response
                    .header
                    .proof
                    .is_some_and(|p| subtle::ConstantTimeEq::ct_eq(&p[..], &expected[..]).into());
                if ok {
                    debug!(%peer, "peer proved cluster membership");
                    self.verified.insert(peer);
                    self.admit(peer);
                } else {
                    warn!(%peer, "peer failed the cluster key check; disconnecting");
                    self.verified.remove(&peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } if self.auth_nonces.remove(&request_id).is_some() => {
                warn!(%peer, %error, "membership challenge failed; disconnecting");
                self.awaiting_auth.remove(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            _ => {}
        }
    }

    fn on_chunk(
        &mut self,
        event: request_response::Event<Frame<ChunkRequest>, Frame<ChunkResponse>>,
    ) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.table.seen(&peer, Instant::now());
                let refused = match self.inbound_gate(&peer) {
                    Err(refusal) => Some((channel, refusal)),
                    Ok(inbound) => {
                        let reply = Reply {
                            channel,
                            commands: self.commands_tx.clone(),
                        };
                        match inbound.try_send(Inbound::Chunk {
                            peer,
                            request,
                            reply,
                        }) {
                            Err(e) => match e.into_inner() {
                                Inbound::Chunk { reply, .. } => Some((reply.channel, BUSY)),
                                Inbound::Control { .. } => None,
                            },
                            Ok(()) => None,
                        }
                    }
                };
                if let Some((channel, (reason, message))) = refused {
                    let response = Frame::new(ChunkResponse::Refused {
                        reason,
                        message: message.to_owned(),
                    });
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .chunk
                        .send_response(channel, response);
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((started, sent)) = self.chunk_started.remove(&request_id) {
                    let bytes = sent + response.payload.len() as u64;
                    self.table
                        .transfer_sample(&peer, started.elapsed(), bytes, Instant::now());
                } else {
                    self.table.seen(&peer, Instant::now());
                }
                if let Some(reply) = self.pending_chunk.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.chunk_started.remove(&request_id);
                if let Some(reply) = self.pending_chunk.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound chunk request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_control(
        &mut self,
        event: request_response::Event<Frame<ControlRequest>, Frame<ControlResponse>>,
    ) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let refused = match self.inbound_gate(&peer) {
                    Err(refusal) => Some((channel, refusal)),
                    Ok(inbound) => {
                        let reply = Reply {
                            channel,
                            commands: self.commands_tx.clone(),
                        };
                        match inbound.try_send(Inbound::Control {
                            peer,
                            request,
                            reply,
                        }) {
                            Err(e) => match e.into_inner() {
                                Inbound::Control { reply, .. } => Some((reply.channel, BUSY)),
                                Inbound::Chunk { .. } => None,
                            },
                            Ok(()) => None,
                        }
                    }
                };
                if let Some((channel, (reason, message))) = refused {
                    let response = Frame::new(ControlResponse::Refused {
                        reason,
                        message: message.to_owned(),
                    });
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(channel, response);
                }
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_control.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_control.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_versions_carry_zone_and_role() {
        let config = Config {
            listen: vec![],
            external_addrs: vec![],
            advertise_listen_addrs: true,
            bootstrap: vec![],
            zone: "aws/us-east-1/a".into(),
            role: Role::Bootstrap,
            cluster_key: None,
            suspect_after: Duration::from_secs(1),
            dead_after: Duration::from_secs(1),
            load_interval: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_streams_per_peer: 1,
            relay_server: None,
        };
        let (zone, role, version) = parse_agent(&agent_version(&config));
        assert_eq!(zone, "aws/us-east-1/a");
        assert_eq!(role, Role::Bootstrap);
        assert_eq!(version, mesh_proto::MESH_VERSION);
        let (zone, role, _) = parse_agent("junk");
        assert_eq!((zone.as_str(), role), ("", Role::Storage));
    }

    #[test]
    fn bootstrap_addresses_need_a_peer_id() {
        let with: Multiaddr = format!("/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        assert!(peer_of(&with).is_some());
        let without: Multiaddr = "/ip4/1.2.3.4/udp/4001/quic-v1".parse().unwrap();
        assert!(peer_of(&without).is_none());
    }

    #[test]
    fn circuit_listen_addresses_name_their_relay() {
        let relay = PeerId::random();
        let circuit: Multiaddr = format!("/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert!(is_circuit(&circuit));
        assert_eq!(circuit_relay(&circuit), Some(relay));
        for bad in [
            "/ip4/1.2.3.4/udp/4001/quic-v1/p2p-circuit".to_owned(),
            format!("/p2p/{relay}/p2p-circuit"),
            format!("/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{relay}/p2p-circuit/p2p/{relay}"),
        ] {
            let bad: Multiaddr = bad.parse().unwrap();
            assert!(is_circuit(&bad));
            assert_eq!(circuit_relay(&bad), None, "{bad}");
        }
        let direct: Multiaddr = "/ip4/1.2.3.4/udp/4001/quic-v1".parse().unwrap();
        assert!(!is_circuit(&direct));
    }
}
