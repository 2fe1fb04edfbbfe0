//! mesh-tests: the harness that integration tests share, and the tests that span crates.
//!
//! A [`TestNode`] is a real node started through `mesh_node::Node::start` in this process, with
//! its own temporary data directory and its control API on an OS-assigned port. Tests wait on
//! conditions with [`wait_until`] (or [`wait_for_value`] for brief states), never on fixed
//! sleeps. The nodes' logs (level from `MESH_LOG`, default `info`) go through libtest's
//! capture, so a failing test prints what its nodes said and a passing one prints nothing.
//!
//! [`netsim::NetsimRun`] is the other kind of cluster: real `meshd` processes in network
//! namespaces behind netsim's emulated WAN, for the latency tests.

pub mod netsim;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_node::{Node, config::Config};
use rand::{RngCore, SeedableRng};

/// A node running in this process on a temporary data directory.
#[derive(Debug)]
pub struct TestNode {
    node: Node,
    dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with default settings, its API on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a node after `configure` adjusts the config (data dir and API address are preset).
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        init_logging();
        let dir = tempfile::tempdir().context("creating a temporary data directory")?;
        let mut config = Config::for_tests(dir.path().join("data"));
        configure(&mut config);
        let node = Node::start(config).await.context("starting the node")?;
        Ok(Self { node, dir })
    }

    /// Restarts the node on the same data directory (new API port).
    pub async fn restart(self) -> anyhow::Result<Self> {
        self.restart_with(|_| {}).await
    }

    /// Restarts the node on the same data directory after `configure` adjusts its config.
    pub async fn restart_with(self, configure: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let Self { node, dir } = self;
        let config = node.config().clone();
        node.shutdown().await;
        let mut config = config;
        config.api_addr = "127.0.0.1:0".parse()?;
        configure(&mut config);
        let node = Node::start(config).await.context("restarting the node")?;
        Ok(Self { node, dir })
    }

    /// Stops the node but keeps its data directory, to start it again later with
    /// [`Parked::start`] (a node that was down and comes back).
    pub async fn park(self) -> Parked {
        let Self { node, dir } = self;
        let config = node.config().clone();
        node.shutdown().await;
        Parked { config, dir }
    }

    /// The node itself.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// What this node's peer table says of `peer`, if it knows it.
    pub fn view_of(&self, peer: libp2p::PeerId) -> Option<mesh_node::net::PeerView> {
        self.node
            .network()
            .peers()
            .iter()
            .find(|p| p.id == peer)
            .cloned()
    }

    /// Base URL of the control API, e.g. `http://127.0.0.1:41234`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.node.api_addr())
    }

    /// The bearer token of the control API.
    pub fn token(&self) -> String {
        self.node.api_token().to_owned()
    }

    /// The node's data directory (holds `api.token`).
    pub fn data_dir(&self) -> &Path {
        &self.node.config().data_dir
    }

    /// A scratch directory next to the data directory, removed with the node.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the node gracefully.
    pub async fn stop(self) {
        self.node.shutdown().await;
    }
}

/// A stopped node whose data directory is kept (see [`TestNode::park`]).
#[derive(Debug)]
pub struct Parked {
    config: Config,
    dir: tempfile::TempDir,
}

impl Parked {
    /// Starts the node again on its data directory (new API port and listen port).
    pub async fn start(self) -> anyhow::Result<TestNode> {
        let Self { mut config, dir } = self;
        config.api_addr = "127.0.0.1:0".parse()?;
        let node = Node::start(config)
            .await
            .context("starting the parked node")?;
        Ok(TestNode { node, dir })
    }
}

/// Sends this process's logs to libtest's output capture, once. Threads a test starts (its
/// tokio runtime's workers) inherit the test's capture, so each test's failure output holds
/// the logs of its own nodes.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Fails only if another subscriber is already set, which then gets the logs instead.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    });
}

/// Polls `check` until it returns `Ok(true)` or `timeout` passes; fails naming `what`. The
/// pause between polls starts at 5 ms and doubles up to 200 ms.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let pauses = Pauses::Doubling(Duration::from_millis(5), Duration::from_millis(200));
    poll(timeout, what, pauses, || {
        let done = check();
        async move { Ok(done.await?.then_some(())) }
    })
    .await
}

/// Polls `check` every `every` until it returns `Ok(Some(value))` or `timeout` passes, and
/// returns the value. For a state that lasts only moments, which [`wait_until`]'s growing
/// pauses could miss. An error from `check` ends the wait at once, as for [`wait_until`].
pub async fn wait_for_value<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    poll(timeout, what, Pauses::Every(every), check).await
}

enum Pauses {
    Every(Duration),
    /// The first pause, doubled after each poll up to the second.
    Doubling(Duration, Duration),
}

async fn poll<T, F, Fut>(
    timeout: Duration,
    what: &str,
    pauses: Pauses,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let (mut pause, max) = match pauses {
        Pauses::Every(every) => (every, every),
        Pauses::Doubling(first, max) => (first, max),
    };
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(max);
    }
}

/// Deterministic pseudo-random bytes: the same `seed` and `len` give the same bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// An HTTP client for the control API with the node's token preset.
pub fn api_client(node: &TestNode) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {}", node.token()).parse()?;
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

/// `POST /v1/objects?{query}` with `body` on `node`.
pub async fn api_put(
    node: &TestNode,
    query: &str,
    body: Vec<u8>,
) -> anyhow::Result<reqwest::Response> {
    Ok(api_client(node)?
        .post(format!("{}/v1/objects?{query}", node.api_url()))
        .body(body)
        .send()
        .await?)
}

/// `GET /v1/objects/{id}` on `node`.
pub async fn api_get(
    node: &TestNode,
    id: &mesh_proto::ObjectId,
) -> anyhow::Result<reqwest::Response> {
    Ok(api_client(node)?
        .get(format!("{}/v1/objects/{id}", node.api_url()))
        .send()
        .await?)
}

/// `GET /v1/status` on `node`.
pub async fn api_status(node: &TestNode) -> anyhow::Result<mesh_proto::api::StatusResponse> {
    Ok(api_client(node)?
        .get(format!("{}/v1/status", node.api_url()))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// The value of one Prometheus series (its name, with its labels if it has any) on
/// `node`'s `/metrics`; 0 while the node has not registered it.
pub async fn metric(node: &TestNode, series: &str) -> anyhow::Result<f64> {
    let text = api_client(node)?
        .get(format!("{}/metrics", node.api_url()))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    match text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    {
        Some(value) => Ok(value.trim().parse()?),
        None => Ok(0.0),
    }
}

/// The placement record `node` keeps for object `id`, if any.
pub fn record_on(
    node: &TestNode,
    id: &mesh_proto::ObjectId,
) -> anyhow::Result<Option<mesh_proto::wire::PlacementRecord>> {
    use mesh_node::store::MetaStore;
    match node.node().store().record(id)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(mesh_proto::wire::PlacementRecord::decode(&bytes)?)),
    }
}

/// Object `seed` of the crash test: a 128 KiB prefix shared by every object (so that chunks
/// are deduplicated and reference-counted) followed by up to 900 KiB unique to `seed`.
pub fn prefixed_object(seed: u64) -> Vec<u8> {
    let mut data = random_bytes(128 * 1024, u64::MAX);
    let unique = 1 + (seed as usize).wrapping_mul(7919) % (900 * 1024);
    data.extend(random_bytes(unique, seed));
    data
}

/// A bootstrap peer and `n` nodes joined through it, all in this process on loopback.
#[derive(Debug)]
pub struct Cluster {
    pub bootstrap: mesh_bootstrap::Bootstrap,
    pub nodes: Vec<TestNode>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the bootstrap peer, then `n` nodes bootstrapping from it; `configure` sees each
    /// node's index and config. Does not wait for discovery (see [`Cluster::wait_joined`]).
    pub async fn start(n: usize, configure: impl Fn(usize, &mut Config)) -> anyhow::Result<Self> {
        init_logging();
        let dir = tempfile::tempdir().context("creating the bootstrap data directory")?;
        // The bootstrap peer gets the cluster key the nodes are configured with.
        let mut probe = Config::for_tests(dir.path().join("probe"));
        configure(usize::MAX, &mut probe);
        let net = mesh_node::config::NetConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()],
            cluster_key_file: probe.net.cluster_key_file.clone(),
            ..Default::default()
        };
        // The relay carries whole transfers for tests whose nodes listen only through it;
        // libp2p's default limits (128 KiB, 2 minutes per circuit) are for hole punching.
        let relay = mesh_node::net::RelayLimits {
            max_circuit_bytes: 0,
            max_circuit_duration: Duration::from_secs(3600),
            ..Default::default()
        };
        let bootstrap = mesh_bootstrap::Bootstrap::start(mesh_bootstrap::Config {
            data_dir: dir.path().join("bootstrap"),
            net,
            relay,
        })
        .await
        .context("starting the bootstrap peer")?;
        let addr = bootstrap
            .dial_addrs()
            .first()
            .cloned()
            .context("the bootstrap peer has no address")?
            .to_string();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let addr = addr.clone();
            let node = TestNode::start_with(|config| {
                config.net.bootstrap = vec![addr];
                config.redundancy = mesh_proto::Redundancy::Replicas(3);
                config.net.suspect_after = Duration::from_secs(3);
                config.net.dead_after = Duration::from_secs(10);
                config.net.ping_interval = Duration::from_millis(500);
                config.net.load_interval = Duration::from_secs(1);
                config.net.request_timeout = Duration::from_secs(10);
                configure(i, config);
            })
            .await
            .with_context(|| format!("starting node {i}"))?;
            nodes.push(node);
        }
        Ok(Self {
            bootstrap,
            nodes,
            _dir: dir,
        })
    }

    /// The `--bootstrap` address of the cluster.
    pub fn bootstrap_addr(&self) -> String {
        self.bootstrap
            .dial_addrs()
            .first()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// Waits until every node sees every other node alive, with an RTT measured by regular
    /// samples (not only the provisional first ping).
    pub async fn wait_joined(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_every_view(timeout, "every node to see every other node alive", |p| {
            p.rtt.is_some()
                && !p.rtt_provisional
                && p.connected
                && p.liveness == mesh_node::placement::Liveness::Alive
        })
        .await
    }

    /// Waits until, on every node, the view of every other node passes `check`.
    pub async fn wait_every_view(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&mesh_node::net::PeerView) -> bool,
    ) -> anyhow::Result<()> {
        let ids: Vec<_> = self.nodes.iter().map(|n| n.node().peer_id()).collect();
        wait_until(timeout, what, || {
            let done = self.nodes.iter().zip(&ids).all(|(node, me)| {
                let peers = node.node().network().peers();
                ids.iter()
                    .filter(|id| *id != me)
                    .all(|id| peers.iter().any(|p| p.id == *id && check(p)))
            });
            async move { Ok(done) }
        })
        .await
    }

    /// Waits until no node owes any holder a chunk or a record (background completion of
    /// the holders beyond each put's write quorum is done).
    pub async fn wait_settled(&self, timeout: Duration) -> anyhow::Result<()> {
        use mesh_node::store::MetaStore;
        wait_until(
            timeout,
            "every node's background deliveries to finish",
            || {
                let settled = self.nodes.iter().all(|n| {
                    n.node()
                        .store()
                        .deliveries(None, 1)
                        .is_ok_and(|queued| queued.is_empty())
                });
                async move { Ok(settled) }
            },
        )
        .await
    }

    pub async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        self.bootstrap.shutdown().await;
    }
}
