//! The swarm's QUIC transport: quinn endpoints that this crate configures, instead of
//! libp2p-quic's.
//!
//! Why our own: libp2p-quic 0.14 builds its quinn configs privately, and two of its choices
//! cost a replicated put much of its CPU on 2 cores. Its TLS puts ChaCha20 first, so the
//! hardware AES goes unused; and its endpoints announce a 1472-byte `max_udp_payload_size`,
//! which caps the peer's MTU discovery, so every 1.4 KB of data pays quinn's per-packet work
//! and a syscall share. Here TLS comes from [`super::tls`] (AES-128-GCM first), and endpoints
//! accept datagrams of up to [`QuicConfig::max_udp_payload`], so MTU discovery climbs to what
//! the path carries: 64 KiB on loopback, about 9 KB inside cloud VPCs with jumbo frames,
//! 1.4 KB across the internet.
//!
//! On the wire this is plain libp2p QUIC: QUIC v1, libp2p's TLS certificates and ALPN, one
//! bidirectional QUIC stream per substream. Peers still on libp2p-quic connect to us and we
//! to them (tested below), so nodes can be upgraded one at a time.
//!
//! Data flow: `listen_on` binds a UDP socket, wraps it in a quinn `Endpoint` with the server
//! config and spawns an accept task. The task turns incoming connections (and, on an
//! unspecified address, interface changes) into [`Event`]s on one bounded channel, which
//! `poll` hands to the swarm, so a slow swarm holds back accepting rather than queueing
//! without limit. `dial` connects from a listener's endpoint when the swarm asks for port
//! reuse (NATs then see the listen port, which DCUtR relies on), else from a dialing endpoint
//! per address family. A handshake ends with the peer id read from the peer's certificate,
//! and the connection becomes a [`QuicMuxer`].
//!
//! Hole punching: DCUtR makes both peers dial each other at once, each from its listen port
//! (port reuse). Each side's Initial packets open its own NAT's mapping toward the other, and
//! quinn retransmits them until the other side's mapping lets them through, so nothing beyond
//! the QUIC handshake is sent.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt, StreamExt};
use if_watch::IfEvent;
use if_watch::tokio::IfWatcher;
use libp2p::core::Transport;
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rustls::pki_types::CertificateDer;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tracing::debug;

use super::tls;

/// The largest UDP payload quinn handles (65535 minus the UDP and IPv6 headers).
pub const MAX_UDP_PAYLOAD: u16 = 65527;

/// Kernel socket buffers asked for (the kernel caps them at `net.core.rmem_max` and
/// `wmem_max`). The default 208 KiB holds only three 64 KiB datagrams, and a burst that
/// overflows it is loss that the congestion controller answers by slowing down.
const SOCKET_BUFFER: usize = 4 << 20;

/// Accept-task events waiting for the swarm, over all listeners.
const EVENT_QUEUE: usize = 32;

/// Transport parameters; the defaults are the node's.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// A dial or an incoming connection fails when its handshake takes longer.
    pub handshake_timeout: Duration,
    /// A connection that hears nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A quiet connection sends a keep-alive this often (below both peers' idle timeouts).
    pub keep_alive: Duration,
    /// Substreams a peer may have open on one connection at once.
    pub max_streams: u32,
    /// Unacknowledged bytes one stream may have in flight.
    pub stream_window: u32,
    /// Unacknowledged bytes all streams of a connection may have in flight.
    pub connection_window: u32,
    /// The largest UDP payload this node receives, and MTU discovery's upper bound.
    pub max_udp_payload: u16,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            max_streams: 256,
            // Room for a whole 16 MiB chunk in flight on one stream, and several streams at
            // once, so window size does not cap throughput at WAN RTTs.
            stream_window: 24 << 20,
            connection_window: 96 << 20,
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

/// Why a QUIC listen, dial or connection failed.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC TLS config: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("QUIC config: {0}")]
    Config(String),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("UDP: {0}")]
    Io(#[from] io::Error),
    #[error("cannot dial {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("QUIC handshake with {addr} did not finish within {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("peer at {addr} has no valid libp2p certificate: {reason}")]
    Identity { addr: SocketAddr, reason: String },
}

/// The quinn configs every endpoint and connection of one transport share.
#[derive(Debug)]
struct Setup {
    client: quinn::ClientConfig,
    server: quinn::ServerConfig,
    endpoint: quinn::EndpointConfig,
    handshake_timeout: Duration,
}

impl Setup {
    fn new(keypair: &Keypair, config: &QuicConfig) -> Result<Self, QuicError> {
        let invalid = |e: &dyn std::fmt::Display| QuicError::Config(e.to_string());
        let client_tls =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(keypair, None)?)
                .map_err(|e| invalid(&e))?;
        let server_tls =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(keypair)?)
                .map_err(|e| invalid(&e))?;

        let mut transport = quinn::TransportConfig::default();
        // libp2p uses bidirectional streams only, and no datagrams.
        transport
            .max_concurrent_uni_streams(0u32.into())
            .max_concurrent_bidi_streams(config.max_streams.into())
            .datagram_receive_buffer_size(None)
            .keep_alive_interval(Some(config.keep_alive))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|e| invalid(&e))?,
            ))
            .allow_spin(false)
            .stream_receive_window(config.stream_window.into())
            .receive_window(config.connection_window.into());
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(config.max_udp_payload);
        transport.mtu_discovery_config(Some(mtu));
        let transport = Arc::new(transport);

        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(Arc::clone(&transport));
        // A migrated connection would need its new address reported to the swarm.
        server.migration(false);
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);

        // Stateless resets stay valid across restarts when the key comes from the identity.
        let reset_key = match keypair.derive_secret(b"mesh quic stateless reset key") {
            Some(key) => key,
            None => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| invalid(&e))?;
                key
            }
        };
        let mut endpoint = quinn::EndpointConfig::new(Arc::new(ResetKey(reset_key)));
        endpoint
            .max_udp_payload_size(config.max_udp_payload)
            .map_err(|e| invalid(&e))?;
        endpoint.supported_versions(vec![1]);
        Ok(Self {
            client,
            server,
            endpoint,
            handshake_timeout: config.handshake_timeout,
        })
    }

    fn new_endpoint(&self, socket: UdpSocket, server: bool) -> Result<quinn::Endpoint, QuicError> {
        use quinn::Runtime as _;
        let server = server.then(|| self.server.clone());
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = Arc::new(GsoCap(runtime.wrap_udp_socket(socket)?));
        Ok(quinn::Endpoint::new_with_abstract_socket(
            self.endpoint.clone(),
            server,
            socket,
            runtime,
        )?)
    }
}

/// quinn's UDP socket, with segmentation-offload batches cut to what one `sendmsg` carries.
///
/// quinn puts up to 64 datagrams of the path MTU into one GSO send, with no cap on the total,
/// and the kernel refuses a send of more than 64 KiB; quinn then counts the whole batch as
/// lost. At 1.4 KB datagrams that never happens. At 64 KiB any two datagrams exceed it, and
/// the losses trip quinn's MTU black-hole detection, which drops the path back to 1200 bytes.
#[derive(Debug)]
struct GsoCap(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for GsoCap {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Arc::clone(&self.0).create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        // The largest UDP payload of one IP packet (IPv4's header counts against its limit).
        let limit = if transmit.destination.is_ipv4() {
            65507
        } else {
            65527
        };
        let Some(segment) = transmit
            .segment_size
            .filter(|_| transmit.contents.len() > limit)
        else {
            return self.0.try_send(transmit);
        };
        let per_send = (limit / segment).max(1) * segment;
        for piece in transmit.contents.chunks(per_send) {
            let part = quinn::udp::Transmit {
                contents: piece,
                segment_size: (piece.len() > segment).then_some(segment),
                ..*transmit
            };
            // On `WouldBlock` after a first piece went out, quinn sends the whole batch again
            // later; the peer discards the packets it already has.
            self.0.try_send(&part)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }
}

/// Keyed BLAKE3 as the MAC behind stateless reset tokens.
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mac = blake3::keyed_hash(&self.0, data);
        if bool::from(mac.as_bytes().as_slice().ct_eq(signature)) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// A handshake under way, inbound or outbound.
pub type Handshake = BoxFuture<'static, Result<(PeerId, QuicMuxer), QuicError>>;

/// What an accept task reports.
enum Event {
    Incoming {
        id: ListenerId,
        upgrade: Handshake,
        local: SocketAddr,
        remote: SocketAddr,
    },
    Address {
        id: ListenerId,
        addr: SocketAddr,
        up: bool,
    },
    Error {
        id: ListenerId,
        error: QuicError,
    },
    Closed {
        id: ListenerId,
    },
}

#[derive(Debug)]
struct Listener {
    id: ListenerId,
    endpoint: quinn::Endpoint,
    local: SocketAddr,
}

/// A libp2p [`Transport`] over quinn; see the module documentation.
pub struct QuicTransport {
    setup: Arc<Setup>,
    listeners: Vec<Listener>,
    /// Endpoints for dials with port reuse when no listener of the family can serve them;
    /// keyed by "is IPv6".
    dialers: HashMap<bool, quinn::Endpoint>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("listeners", &self.listeners)
            .field("dialers", &self.dialers.len())
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    pub fn new(keypair: &Keypair, config: &QuicConfig) -> Result<Self, QuicError> {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        Ok(Self {
            setup: Arc::new(Setup::new(keypair, config)?),
            listeners: Vec::new(),
            dialers: HashMap::new(),
            events_tx,
            events,
        })
    }

    /// A listener's endpoint that can reach `remote`: same family, and bound either to the
    /// unspecified address or to an address on the same side of loopback as `remote`.
    fn listener_for(&self, remote: SocketAddr) -> Option<quinn::Endpoint> {
        self.listeners
            .iter()
            .find(|l| {
                let ip = l.local.ip();
                ip.is_ipv6() == remote.is_ipv6()
                    && (ip.is_unspecified() || ip.is_loopback() == remote.ip().is_loopback())
            })
            .map(|l| l.endpoint.clone())
    }

    fn dialing_endpoint(&self, remote: SocketAddr) -> Result<quinn::Endpoint, QuicError> {
        let any = if remote.is_ipv6() {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        };
        self.setup.new_endpoint(bind(any)?, false)
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Ends the accept tasks, which hold their endpoints.
        for listener in &self.listeners {
            listener.endpoint.close(0u32.into(), b"shutting down");
        }
        for endpoint in self.dialers.values() {
            endpoint.close(0u32.into(), b"shutting down");
        }
    }
}

impl Transport for QuicTransport {
    type Output = (PeerId, QuicMuxer);
    type Error = QuicError;
    type ListenerUpgrade = Handshake;
    type Dial = Handshake;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        let Some((requested, _)) = socket_addr_of(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let socket = bind(requested).map_err(|source| {
            TransportError::Other(QuicError::Bind {
                addr: requested,
                source,
            })
        })?;
        let other = |e: QuicError| TransportError::Other(e);
        let local = socket.local_addr().map_err(|e| other(e.into()))?;
        let endpoint = self.setup.new_endpoint(socket, true).map_err(other)?;
        let watcher = if local.ip().is_unspecified() {
            Some(IfWatcher::new().map_err(|e| other(e.into()))?)
        } else {
            None
        };
        tokio::spawn(accept_loop(
            id,
            endpoint.clone(),
            local,
            watcher,
            self.setup.handshake_timeout,
            self.events_tx.clone(),
        ));
        debug!(%local, "QUIC listening");
        self.listeners.push(Listener {
            id,
            endpoint,
            local,
        });
        // The listener's port now serves this family's dials; the old dialing endpoint lives
        // on while its connections do.
        self.dialers.remove(&local.is_ipv6());
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        let Some(pos) = self.listeners.iter().position(|l| l.id == id) else {
            return false;
        };
        // Its accept task sees the endpoint closed and reports `ListenerClosed`.
        self.listeners
            .swap_remove(pos)
            .endpoint
            .close(0u32.into(), b"listener removed");
        true
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some((remote, _)) = socket_addr_of(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        if remote.port() == 0 || remote.ip().is_unspecified() {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        let endpoint = match opts.port_use {
            PortUse::New => self
                .dialing_endpoint(remote)
                .map_err(TransportError::Other)?,
            PortUse::Reuse => match self.listener_for(remote) {
                Some(endpoint) => endpoint,
                None => match self.dialers.get(&remote.is_ipv6()) {
                    Some(endpoint) => endpoint.clone(),
                    None => {
                        let endpoint = self
                            .dialing_endpoint(remote)
                            .map_err(TransportError::Other)?;
                        self.dialers.insert(remote.is_ipv6(), endpoint.clone());
                        endpoint
                    }
                },
            },
        };
        let client = self.setup.client.clone();
        let timeout = self.setup.handshake_timeout;
        Ok(async move {
            // rustls wants a server name; the certificate check ignores it.
            let connecting = endpoint
                .connect_with(client, remote, "mesh")
                .map_err(|source| QuicError::Connect {
                    addr: remote,
                    source,
                })?;
            handshake(connecting, remote, timeout).await
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        // The transport holds a sender, so the channel never ends.
        let Some(event) = ready!(self.events.poll_recv(cx)) else {
            return Poll::Pending;
        };
        Poll::Ready(match event {
            Event::Incoming {
                id,
                upgrade,
                local,
                remote,
            } => TransportEvent::Incoming {
                listener_id: id,
                upgrade,
                local_addr: multiaddr_of(local),
                send_back_addr: multiaddr_of(remote),
            },
            Event::Address { id, addr, up: true } => TransportEvent::NewAddress {
                listener_id: id,
                listen_addr: multiaddr_of(addr),
            },
            Event::Address {
                id,
                addr,
                up: false,
            } => TransportEvent::AddressExpired {
                listener_id: id,
                listen_addr: multiaddr_of(addr),
            },
            Event::Error { id, error } => TransportEvent::ListenerError {
                listener_id: id,
                error,
            },
            Event::Closed { id } => {
                self.listeners.retain(|l| l.id != id);
                TransportEvent::ListenerClosed {
                    listener_id: id,
                    reason: Ok(()),
                }
            }
        })
    }
}

/// One listener's accept task: runs until its endpoint is closed or the transport is gone.
async fn accept_loop(
    id: ListenerId,
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    mut watcher: Option<IfWatcher>,
    timeout: Duration,
    events: mpsc::Sender<Event>,
) {
    enum Next {
        Incoming(Option<Box<quinn::Incoming>>),
        Interface(Option<io::Result<IfEvent>>),
    }
    if watcher.is_none() {
        let listening = Event::Address {
            id,
            addr: local,
            up: true,
        };
        if events.send(listening).await.is_err() {
            return;
        }
    }
    loop {
        let next = tokio::select! {
            incoming = endpoint.accept() => Next::Incoming(incoming.map(Box::new)),
            change = next_interface_event(&mut watcher) => Next::Interface(change),
        };
        let event = match next {
            Next::Incoming(None) => break,
            Next::Incoming(Some(incoming)) => {
                let remote = incoming.remote_address();
                match incoming.accept() {
                    Ok(connecting) => Event::Incoming {
                        id,
                        upgrade: handshake(connecting, remote, timeout).boxed(),
                        local,
                        remote,
                    },
                    Err(error) => {
                        debug!(%remote, %error, "refused an incoming QUIC connection");
                        continue;
                    }
                }
            }
            Next::Interface(None) => {
                watcher = None;
                continue;
            }
            Next::Interface(Some(Err(error))) => Event::Error {
                id,
                error: QuicError::Io(error),
            },
            Next::Interface(Some(Ok(change))) => {
                let (net, up) = match change {
                    IfEvent::Up(net) => (net, true),
                    IfEvent::Down(net) => (net, false),
                };
                if net.addr().is_ipv6() != local.is_ipv6() {
                    continue;
                }
                Event::Address {
                    id,
                    addr: SocketAddr::new(net.addr(), local.port()),
                    up,
                }
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
    let _ = events.send(Event::Closed { id }).await;
}

async fn next_interface_event(watcher: &mut Option<IfWatcher>) -> Option<io::Result<IfEvent>> {
    match watcher {
        Some(watcher) => watcher.next().await,
        None => std::future::pending().await,
    }
}

async fn handshake(
    connecting: quinn::Connecting,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(PeerId, QuicMuxer), QuicError> {
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| QuicError::HandshakeTimeout { addr, timeout })??;
    let peer = peer_of(&connection).map_err(|reason| QuicError::Identity { addr, reason })?;
    Ok((peer, QuicMuxer::new(connection)))
}

/// The peer id in the certificate the handshake verified.
fn peer_of(connection: &quinn::Connection) -> Result<PeerId, String> {
    let identity = connection
        .peer_identity()
        .ok_or("the handshake produced no peer identity")?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "the peer identity is not a certificate chain")?;
    let cert = chain.first().ok_or("the certificate chain is empty")?;
    tls::peer_of(cert).map_err(|e| e.to_string())
}

type OpenStream =
    BoxFuture<'static, Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>;

/// One QUIC connection as a libp2p stream muxer: a substream is a bidirectional QUIC stream.
pub struct QuicMuxer {
    connection: quinn::Connection,
    inbound: Option<OpenStream>,
    outbound: Option<OpenStream>,
    closed: Option<BoxFuture<'static, quinn::ConnectionError>>,
    /// Why the connection ended, once it has.
    ended: Option<quinn::ConnectionError>,
}

impl std::fmt::Debug for QuicMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicMuxer")
            .field("remote", &self.connection.remote_address())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl QuicMuxer {
    fn new(connection: quinn::Connection) -> Self {
        Self {
            connection,
            inbound: None,
            outbound: None,
            closed: None,
            ended: None,
        }
    }

    /// The UDP payload size the connection's path currently carries (MTU discovery's result).
    pub fn path_mtu(&self) -> u16 {
        self.connection.stats().path.current_mtu
    }

    fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<quinn::ConnectionError> {
        if let Some(error) = &self.ended {
            return Poll::Ready(error.clone());
        }
        let connection = &self.connection;
        let closed = self.closed.get_or_insert_with(|| {
            let connection = connection.clone();
            async move { connection.closed().await }.boxed()
        });
        let error = ready!(closed.poll_unpin(cx));
        self.closed = None;
        self.ended = Some(error.clone());
        Poll::Ready(error)
    }
}

/// Polls the pending stream open in `slot`, starting one with `open` when there is none.
/// (Cloning a quinn `Connection` takes its lock, so it is done only when a future starts.)
fn poll_open(
    slot: &mut Option<OpenStream>,
    connection: &quinn::Connection,
    cx: &mut Context<'_>,
    open: impl FnOnce(quinn::Connection) -> OpenStream,
) -> Poll<Result<QuicStream, QuicError>> {
    let pending = slot.get_or_insert_with(|| open(connection.clone()));
    let result = ready!(pending.poll_unpin(cx));
    *slot = None;
    let (send, recv) = result?;
    Poll::Ready(Ok(QuicStream {
        send,
        recv,
        closed: None,
    }))
}

impl StreamMuxer for QuicMuxer {
    type Substream = QuicStream;
    type Error = QuicError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        poll_open(&mut this.inbound, &this.connection, cx, |connection| {
            async move { connection.accept_bi().await }.boxed()
        })
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        poll_open(&mut this.outbound, &this.connection, cx, |connection| {
            async move { connection.open_bi().await }.boxed()
        })
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.ended.is_none() {
            this.connection.close(0u32.into(), b"");
        }
        // However it ended (closed here, by the peer, or timed out), it is closed now.
        ready!(this.poll_ended(cx));
        Poll::Ready(Ok(()))
    }

    /// Reports the connection's end at once, rather than when a substream next fails.
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let error = ready!(self.get_mut().poll_ended(cx));
        Poll::Ready(Err(QuicError::Connection(error)))
    }
}

/// A substream: one bidirectional QUIC stream.
#[derive(Debug)]
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// `poll_close`'s outcome: quinn's `finish` may be called only once.
    closed: Option<Result<(), io::ErrorKind>>,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(closed) = self.closed {
            return Poll::Ready(closed.map_err(io::Error::from));
        }
        let result = ready!(AsyncWrite::poll_close(Pin::new(&mut self.send), cx));
        self.closed = Some(result.as_ref().map(|_| ()).map_err(io::Error::kind));
        Poll::Ready(result)
    }
}

/// A UDP socket bound to `addr`, IPv6 sockets for IPv6 only (so `0.0.0.0` and `::` can both
/// be listened on at one port), with large kernel buffers when the kernel allows them.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as IpProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(IpProtocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: the kernel caps the sizes, and the defaults still work.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// `/ip4|ip6/<ip>/udp/<port>/quic-v1`, optionally followed by `/p2p/<id>`; anything else
/// (TCP, relay circuits, DNS names before resolution) is another transport's.
fn socket_addr_of(addr: &Multiaddr) -> Option<(SocketAddr, Option<PeerId>)> {
    let mut parts = addr.iter();
    let ip: IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Udp(port) = parts.next()? else {
        return None;
    };
    let Protocol::QuicV1 = parts.next()? else {
        return None;
    };
    let peer = match parts.next() {
        None => None,
        Some(Protocol::P2p(peer)) => Some(peer),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((SocketAddr::new(ip, port), peer))
}

fn multiaddr_of(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(addr.ip().into())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::Endpoint;
    use libp2p::core::muxing::StreamMuxerExt;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(20);

    fn opts(port_use: PortUse) -> DialOpts {
        DialOpts {
            role: Endpoint::Dialer,
            port_use,
        }
    }

    fn transport() -> (PeerId, QuicTransport) {
        let key = Keypair::generate_ed25519();
        let transport = QuicTransport::new(&key, &QuicConfig::default()).expect("transport");
        (key.public().to_peer_id(), transport)
    }

    async fn next_event<T: Transport + Unpin>(
        t: &mut T,
    ) -> TransportEvent<T::ListenerUpgrade, T::Error> {
        tokio::time::timeout(DEADLINE, poll_fn(|cx| Pin::new(&mut *t).poll(cx)))
            .await
            .expect("a transport event within the deadline")
    }

    async fn listen<T: Transport + Unpin>(t: &mut T) -> Multiaddr
    where
        T::Error: std::fmt::Debug,
    {
        let addr: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr");
        t.listen_on(ListenerId::next(), addr).expect("listen");
        match next_event(t).await {
            TransportEvent::NewAddress { listen_addr, .. } => listen_addr,
            _ => panic!("expected the listen address first"),
        }
    }

    /// The first incoming connection's handshake, and the address it came from.
    async fn accept<T, M>(t: &mut T) -> (PeerId, M, Multiaddr)
    where
        T: Transport<Output = (PeerId, M)> + Unpin,
        T::Error: std::fmt::Debug,
    {
        loop {
            if let TransportEvent::Incoming {
                upgrade,
                send_back_addr,
                ..
            } = next_event(t).await
            {
                let (peer, muxer) = upgrade.await.expect("inbound handshake");
                return (peer, muxer, send_back_addr);
            }
        }
    }

    async fn connect<A, B, MA, MB>(
        a: &mut A,
        b: &mut B,
        to_b: Multiaddr,
    ) -> ((PeerId, MA), (PeerId, MB, Multiaddr))
    where
        A: Transport<Output = (PeerId, MA)> + Unpin,
        B: Transport<Output = (PeerId, MB)> + Unpin,
        A::Error: std::fmt::Debug,
        B::Error: std::fmt::Debug,
    {
        let dial = a.dial(to_b, opts(PortUse::Reuse)).expect("dial");
        let (dialed, accepted) =
            tokio::time::timeout(DEADLINE, async { tokio::join!(dial, accept(b)) })
                .await
                .expect("connected within the deadline");
        (dialed.expect("outbound handshake"), accepted)
    }

    /// `data` goes from one side to the other on a new substream and comes back.
    async fn echo<MA, MB>(opener: &mut MA, acceptor: &mut MB, data: &[u8]) -> Vec<u8>
    where
        MA: StreamMuxer + Unpin,
        MB: StreamMuxer + Unpin,
        MA::Substream: Unpin,
        MB::Substream: Unpin,
        MA::Error: std::fmt::Debug,
        MB::Error: std::fmt::Debug,
    {
        let server = async {
            let mut s = poll_fn(|cx| acceptor.poll_inbound_unpin(cx))
                .await
                .expect("inbound");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read request");
            s.write_all(&got).await.expect("write reply");
            s.close().await.expect("close reply");
        };
        let client = async {
            let mut s = poll_fn(|cx| opener.poll_outbound_unpin(cx))
                .await
                .expect("outbound");
            s.write_all(data).await.expect("write request");
            s.close().await.expect("close request");
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.expect("read reply");
            back
        };
        let ((), back) = tokio::time::timeout(DEADLINE, async { tokio::join!(server, client) })
            .await
            .expect("echo within the deadline");
        back
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn peers_learn_each_others_ids_and_a_stream_carries_bytes_in_datagrams_over_16_kib() {
        let (id_a, mut a) = transport();
        let (id_b, mut b) = transport();
        let to_b = listen(&mut b).await;
        let ((seen_b, mut muxer_a), (seen_a, mut muxer_b, _)) = connect(&mut a, &mut b, to_b).await;
        assert_eq!(seen_b, id_b);
        assert_eq!(seen_a, id_a);

        let data = pattern(4 << 20);
        assert!(
            echo(&mut muxer_a, &mut muxer_b, &data).await == data,
            "echoed bytes differ"
        );

        // Loopback carries 64 KiB datagrams; libp2p-quic's endpoints stop at 1472 bytes.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while muxer_a.path_mtu() < 16 << 10 && tokio::time::Instant::now() < deadline {
            echo(&mut muxer_a, &mut muxer_b, &pattern(64 << 10)).await;
        }
        assert!(
            muxer_a.path_mtu() >= 16 << 10,
            "path MTU stayed at {} bytes: {:?}",
            muxer_a.path_mtu(),
            muxer_a.connection.stats().path
        );

        // Closing one side ends the other's muxer at once.
        poll_fn(|cx| muxer_a.poll_close_unpin(cx))
            .await
            .expect("close");
        let ended = tokio::time::timeout(DEADLINE, poll_fn(|cx| muxer_b.poll_unpin(cx)))
            .await
            .expect("the peer's close is seen within the deadline");
        assert!(ended.is_err(), "a closed connection reports an error");
    }

    #[tokio::test]
    async fn a_dial_with_port_reuse_leaves_from_the_listen_port() {
        let (_, mut a) = transport();
        let (_, mut b) = transport();
        let a_listens = listen(&mut a).await;
        let to_b = listen(&mut b).await;
        let (_, (_, _, from)) = connect(&mut a, &mut b, to_b.clone()).await;
        assert_eq!(from, a_listens, "reused port");

        let dial = a.dial(to_b, opts(PortUse::New)).expect("dial");
        let (dialed, (_, _, from)) =
            tokio::time::timeout(DEADLINE, async { tokio::join!(dial, accept(&mut b)) })
                .await
                .expect("connected within the deadline");
        dialed.expect("outbound handshake");
        assert_ne!(from, a_listens, "a new port was asked for");
    }

    #[tokio::test]
    async fn stock_libp2p_quic_peers_connect_both_ways() {
        let (id_ours, mut ours) = transport();
        let key = Keypair::generate_ed25519();
        let id_stock = key.public().to_peer_id();
        let mut stock = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(&key));
        let to_ours = listen(&mut ours).await;
        let to_stock = listen(&mut stock).await;
        let data = pattern(1 << 20);

        let ((seen, mut m_stock), (seen_back, mut m_ours, _)) =
            connect(&mut stock, &mut ours, to_ours).await;
        assert_eq!((seen, seen_back), (id_ours, id_stock));
        assert!(
            echo(&mut m_stock, &mut m_ours, &data).await == data,
            "stock dialed us"
        );

        let ((seen, mut m_ours), (seen_back, mut m_stock, _)) =
            connect(&mut ours, &mut stock, to_stock).await;
        assert_eq!((seen, seen_back), (id_stock, id_ours));
        assert!(
            echo(&mut m_ours, &mut m_stock, &data).await == data,
            "we dialed stock"
        );
    }

    #[tokio::test]
    async fn addresses_of_other_transports_are_declined() {
        let (_, mut t) = transport();
        for addr in [
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/127.0.0.1/udp/4001/quic",
            "/dns4/example.com/udp/4001/quic-v1",
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "/ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA/p2p-circuit",
        ] {
            let addr: Multiaddr = addr.parse().expect("addr");
            assert!(
                matches!(
                    t.dial(addr.clone(), opts(PortUse::Reuse)),
                    Err(TransportError::MultiaddrNotSupported(_))
                ),
                "dial {addr}"
            );
        }
        let circuit: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1/p2p-circuit"
            .parse()
            .expect("addr");
        assert!(matches!(
            t.listen_on(ListenerId::next(), circuit),
            Err(TransportError::MultiaddrNotSupported(_))
        ));
    }

    #[tokio::test]
    async fn a_dial_to_a_silent_port_times_out_with_a_clear_error() {
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let config = QuicConfig {
            handshake_timeout: Duration::from_millis(300),
            ..QuicConfig::default()
        };
        let mut t = QuicTransport::new(&Keypair::generate_ed25519(), &config).expect("transport");
        let addr: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .expect("addr");
        let result =
            tokio::time::timeout(DEADLINE, t.dial(addr, opts(PortUse::Reuse)).expect("dial"))
                .await
                .expect("the handshake timeout fires first");
        let Err(error) = result else {
            panic!("no one answered, yet the dial succeeded");
        };
        assert!(
            matches!(error, QuicError::HandshakeTimeout { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_removed_listener_reports_closed_and_stops_accepting() {
        let config = QuicConfig {
            handshake_timeout: Duration::from_millis(300),
            ..QuicConfig::default()
        };
        let mut a = QuicTransport::new(&Keypair::generate_ed25519(), &config).expect("transport");
        let (_, mut b) = transport();
        let id = ListenerId::next();
        b.listen_on(id, "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"))
            .expect("listen");
        let TransportEvent::NewAddress { listen_addr, .. } = next_event(&mut b).await else {
            panic!("expected the listen address first");
        };
        assert!(b.remove_listener(id));
        assert!(!b.remove_listener(id), "removed once");
        match next_event(&mut b).await {
            TransportEvent::ListenerClosed {
                listener_id,
                reason,
            } => assert!(listener_id == id && reason.is_ok()),
            _ => panic!("expected ListenerClosed"),
        }
        let dialed = a.dial(listen_addr, opts(PortUse::New)).expect("dial").await;
        assert!(dialed.is_err(), "nothing listens there any more");
    }

    #[test]
    fn reset_tokens_verify_only_unaltered() {
        use quinn::crypto::HmacKey;
        let key = ResetKey([7; 32]);
        let mut mac = vec![0u8; key.signature_len()];
        key.sign(b"connection id", &mut mac);
        assert!(key.verify(b"connection id", &mac).is_ok());
        assert!(key.verify(b"connection ie", &mac).is_err());
        mac[0] ^= 1;
        assert!(key.verify(b"connection id", &mac).is_err());
        assert!(key.verify(b"connection id", &mac[..16]).is_err());
        assert!(ResetKey([8; 32]).verify(b"connection id", &mac).is_err());
    }
}
