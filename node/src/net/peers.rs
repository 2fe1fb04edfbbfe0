//! The peer table: what this node knows of every mesh peer. The swarm task owns it and
//! publishes immutable snapshots ([`PeerView`]) for the rest of the node; nothing else
//! mutates it.
//!
//! RTT is an EWMA over ping samples and chunk-transfer timings. A small exchange (request and
//! answer together under [`SMALL_EXCHANGE`] bytes, such as `Has`) is a round trip and counts
//! as a sample. A large one also carries its bytes, so its time is only an upper bound on the
//! RTT: it counts when it is below the current estimate (the path is faster than measured so
//! far), and otherwise only shows the peer is alive. The estimate is kept within the range
//! of the last three samples, so that a slow start (or a stale low) is forgotten in three pings.
//! Liveness follows from the last time the peer was heard from: `alive`, `suspect` after
//! `suspect_after` (a few missed pings or load reports), `dead` after `dead_after`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use mesh_proto::wire::LoadReport;
use serde::{Deserialize, Serialize};

use crate::placement::Liveness;

/// Weight of a new RTT sample in the EWMA.
const RTT_ALPHA: f64 = 0.25;
/// The EWMA is fed the median of this many latest samples.
const RTT_MEDIAN_OF: usize = 3;
/// Exchanges up to this many payload bytes are timed as round trips.
pub const SMALL_EXCHANGE: u64 = 16 * 1024;
/// Most addresses remembered per peer (a peer may announce many; we keep the latest).
const MAX_ADDRS: usize = 8;

/// What a peer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A `meshd` that stores and processes.
    Storage,
    /// A `mesh-bootstrap` rendezvous peer: routes and relays, stores nothing.
    Bootstrap,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Storage => "storage",
            Role::Bootstrap => "bootstrap",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    addrs: Vec<Multiaddr>,
    zone: String,
    role: Role,
    version: String,
    rtt: Option<f64>,
    last_rtt: Option<Duration>,
    /// The last three samples (seconds), newest last; the EWMA takes their median.
    recent: Vec<f64>,
    last_seen: Instant,
    load: Option<LoadReport>,
    connected: bool,
}

/// A snapshot of one peer, as the rest of the node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub id: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub zone: String,
    pub role: Role,
    pub version: String,
    /// EWMA of RTT samples; `None` until the first sample.
    pub rtt: Option<Duration>,
    /// `rtt` is provisional: the connection's first ping, taken while the peer joined, which
    /// errs high; the first regular sample replaces it ([`PeerTable::provisional_rtt`]).
    pub rtt_provisional: bool,
    pub last_rtt: Option<Duration>,
    pub last_seen_ago: Duration,
    pub load: Option<LoadReport>,
    pub liveness: Liveness,
    pub connected: bool,
    /// Connected, but only through a relay's circuit (no direct connection yet). The swarm
    /// task fills this in; the table does not track connections.
    pub relayed: bool,
}

/// Thresholds of liveness.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub suspect_after: Duration,
    pub dead_after: Duration,
    /// Dead peers are forgotten after this long.
    pub forget_after: Duration,
}

/// Every proven mesh peer (peers that failed or have not yet passed the membership check
/// are not here).
#[derive(Debug)]
pub struct PeerTable {
    peers: HashMap<PeerId, Entry>,
    timeouts: Timeouts,
}

impl PeerTable {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            peers: HashMap::new(),
            timeouts,
        }
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Adds or refreshes a peer we have proof of membership and an identify of.
    pub fn upsert(
        &mut self,
        peer: PeerId,
        zone: String,
        role: Role,
        version: String,
        addrs: Vec<Multiaddr>,
        now: Instant,
    ) {
        let entry = self.peers.entry(peer).or_insert_with(|| Entry {
            addrs: Vec::new(),
            zone: String::new(),
            role,
            version: String::new(),
            rtt: None,
            last_rtt: None,
            recent: Vec::new(),
            last_seen: now,
            load: None,
            connected: true,
        });
        entry.zone = zone;
        entry.role = role;
        entry.version = version;
        entry.last_seen = now;
        entry.connected = true;
        for addr in addrs {
            entry.add_addr(addr);
        }
    }

    pub fn add_addr(&mut self, peer: &PeerId, addr: Multiaddr) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.add_addr(addr);
        }
    }

    /// Anything heard from the peer.
    pub fn seen(&mut self, peer: &PeerId, now: Instant) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.last_seen = now;
        }
    }

    pub fn set_connected(&mut self, peer: &PeerId, connected: bool) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.connected = connected;
        }
    }

    pub fn rtt_sample(&mut self, peer: &PeerId, rtt: Duration, now: Instant) {
        if let Some(entry) = self.peers.get_mut(peer) {
            // A single slow sample (the peer's or this node's scheduler, a queue) is noise;
            // the median of the last three ignores it, and follows a real change of the path
            // from its second sample on.
            let first = entry.recent.is_empty();
            if entry.recent.len() == RTT_MEDIAN_OF {
                entry.recent.remove(0);
            }
            entry.recent.push(rtt.as_secs_f64());
            let sample = median(&entry.recent);
            let smoothed = match entry.rtt {
                // The first sample sets the estimate, replacing a provisional one.
                Some(old) if !first => old + RTT_ALPHA * (sample - old),
                _ => sample,
            };
            // An estimate above every recent sample, or below every one, is stale: a new
            // connection's first pings share the peer's handshake and join work (tens of
            // milliseconds on a busy bootstrap peer), and the EWMA alone would take a
            // dozen pings to forget them. The path is what the last few samples say.
            let (low, high) = entry
                .recent
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), &s| {
                    (lo.min(s), hi.max(s))
                });
            entry.rtt = Some(smoothed.clamp(low, high));
            entry.last_rtt = Some(rtt);
            entry.last_seen = now;
        }
    }

    /// A sample taken before the peer was in the table: a connection's first ping, which
    /// shares both sides' handshake and join work and often reads several times the path's
    /// RTT. It is the estimate until the first regular sample, which replaces it rather than
    /// averaging with it; better than no estimate, which ranks the peer behind every other.
    pub fn provisional_rtt(&mut self, peer: &PeerId, rtt: Duration) {
        if let Some(entry) = self.peers.get_mut(peer)
            && entry.rtt.is_none()
        {
            entry.rtt = Some(rtt.as_secs_f64());
            entry.last_rtt = Some(rtt);
        }
    }

    /// A chunk-protocol exchange with `peer` that moved `bytes` of payload took `elapsed`.
    pub fn transfer_sample(&mut self, peer: &PeerId, elapsed: Duration, bytes: u64, now: Instant) {
        let Some(entry) = self.peers.get(peer) else {
            return;
        };
        let tighter = entry.rtt.is_some_and(|rtt| elapsed.as_secs_f64() < rtt);
        if bytes <= SMALL_EXCHANGE || tighter {
            self.rtt_sample(peer, elapsed, now);
        } else {
            self.seen(peer, now);
        }
    }

    pub fn load_report(&mut self, peer: &PeerId, report: LoadReport, now: Instant) {
        if let Some(entry) = self.peers.get_mut(peer) {
            if !report.zone.is_empty() {
                entry.zone.clone_from(&report.zone);
            }
            entry.load = Some(report);
            entry.last_seen = now;
        }
    }

    pub fn liveness(&self, peer: &PeerId, now: Instant) -> Option<Liveness> {
        self.peers.get(peer).map(|e| self.liveness_of(e, now))
    }

    fn liveness_of(&self, entry: &Entry, now: Instant) -> Liveness {
        let ago = now.saturating_duration_since(entry.last_seen);
        if ago >= self.timeouts.dead_after {
            Liveness::Dead
        } else if ago >= self.timeouts.suspect_after {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }

    /// Peers worth redialing: known, not connected, not dead.
    pub fn to_redial(&self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.peers
            .iter()
            .filter(|(_, e)| !e.connected && self.liveness_of(e, now) != Liveness::Dead)
            .map(|(id, e)| (*id, e.addrs.clone()))
            .collect()
    }

    /// Drops peers dead for longer than `forget_after`.
    pub fn forget_stale(&mut self, now: Instant) {
        let limit = self.timeouts.dead_after + self.timeouts.forget_after;
        self.peers
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < limit);
    }

    pub fn snapshot(&self, now: Instant) -> Vec<PeerView> {
        let mut views: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(id, e)| PeerView {
                id: *id,
                addrs: e.addrs.clone(),
                zone: e.zone.clone(),
                role: e.role,
                version: e.version.clone(),
                rtt: e.rtt.map(Duration::from_secs_f64),
                rtt_provisional: e.rtt.is_some() && e.recent.is_empty(),
                last_rtt: e.last_rtt,
                last_seen_ago: now.saturating_duration_since(e.last_seen),
                load: e.load.clone(),
                liveness: self.liveness_of(e, now),
                connected: e.connected,
                relayed: false,
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }
}

impl Entry {
    fn add_addr(&mut self, addr: Multiaddr) {
        if let Some(pos) = self.addrs.iter().position(|a| a == &addr) {
            self.addrs.remove(pos);
        }
        self.addrs.push(addr);
        if self.addrs.len() > MAX_ADDRS {
            self.addrs.remove(0);
        }
    }
}

/// The median of up to three samples (the lower middle of two).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get((sorted.len().saturating_sub(1)) / 2)
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PeerTable {
        PeerTable::new(Timeouts {
            suspect_after: Duration::from_secs(10),
            dead_after: Duration::from_secs(60),
            forget_after: Duration::from_secs(3600),
        })
    }

    /// A table holding one storage peer, and the time it was added.
    fn one_peer() -> (PeerTable, PeerId, Instant) {
        let mut t = table();
        let p = PeerId::random();
        let now = Instant::now();
        t.upsert(p, String::new(), Role::Storage, String::new(), vec![], now);
        (t, p, now)
    }

    #[test]
    fn liveness_follows_the_last_time_a_peer_was_heard() {
        let mut t = table();
        let p = PeerId::random();
        let start = Instant::now();
        t.upsert(
            p,
            "aws/us-east-1/a".into(),
            Role::Storage,
            "0.1.0".into(),
            vec![],
            start,
        );
        assert_eq!(t.liveness(&p, start), Some(Liveness::Alive));
        assert_eq!(
            t.liveness(&p, start + Duration::from_secs(11)),
            Some(Liveness::Suspect)
        );
        assert_eq!(
            t.liveness(&p, start + Duration::from_secs(61)),
            Some(Liveness::Dead)
        );
        t.rtt_sample(
            &p,
            Duration::from_millis(5),
            start + Duration::from_secs(61),
        );
        assert_eq!(
            t.liveness(&p, start + Duration::from_secs(62)),
            Some(Liveness::Alive)
        );
        t.forget_stale(start + Duration::from_secs(61 + 60 + 3600));
        assert!(t.is_empty());
    }

    #[test]
    fn rtt_is_an_ewma_of_the_median_of_recent_samples_and_keeps_the_last_one() {
        let (mut t, p, now) = one_peer();
        let ms = |t: &PeerTable| t.snapshot(now)[0].rtt.unwrap().as_secs_f64() * 1000.0;
        t.rtt_sample(&p, Duration::from_millis(10), now);
        t.rtt_sample(&p, Duration::from_millis(10), now);
        // One slow sample is ignored...
        t.rtt_sample(&p, Duration::from_millis(100), now);
        assert!((ms(&t) - 10.0).abs() < 0.01, "{}", ms(&t));
        assert_eq!(
            t.snapshot(now)[0].last_rtt,
            Some(Duration::from_millis(100))
        );
        // ...while a path that really got slower moves the estimate.
        t.rtt_sample(&p, Duration::from_millis(30), now);
        assert!((ms(&t) - 15.0).abs() < 0.01, "{}", ms(&t));
        // Three samples at 30 ms or more: the estimate does not stay below all of them.
        t.rtt_sample(&p, Duration::from_millis(30), now);
        assert!((ms(&t) - 30.0).abs() < 0.01, "{}", ms(&t));
    }

    #[test]
    fn a_slow_start_is_forgotten_once_three_samples_say_otherwise() {
        let (mut t, p, now) = one_peer();
        let ms = |t: &PeerTable| t.snapshot(now)[0].rtt.unwrap().as_secs_f64() * 1000.0;
        // The first pings of a connection met a busy peer.
        for slow in [80, 60, 40] {
            t.rtt_sample(&p, Duration::from_millis(slow), now);
        }
        assert!(ms(&t) > 40.0, "{}", ms(&t));
        // The EWMA alone would still be above 20 ms after a dozen 1.5 ms samples; three
        // are enough to show that the estimate is stale.
        for _ in 0..3 {
            t.rtt_sample(&p, Duration::from_micros(1500), now);
        }
        assert!((ms(&t) - 1.5).abs() < 0.01, "{}", ms(&t));
        // Within the range of recent samples, it is still an EWMA.
        t.rtt_sample(&p, Duration::from_micros(2500), now);
        t.rtt_sample(&p, Duration::from_micros(2500), now);
        assert!((ms(&t) - 1.75).abs() < 0.01, "{}", ms(&t));
    }

    #[test]
    fn a_provisional_rtt_is_the_estimate_until_the_first_sample_replaces_it() {
        let (mut t, p, now) = one_peer();
        let ms = |t: &PeerTable| t.snapshot(now)[0].rtt.map(|d| d.as_secs_f64() * 1000.0);
        assert!(!t.snapshot(now)[0].rtt_provisional, "no estimate at all");
        t.provisional_rtt(&p, Duration::from_millis(24));
        assert_eq!(ms(&t), Some(24.0));
        assert!(t.snapshot(now)[0].rtt_provisional);
        // The first regular sample takes over whole; the provisional one is not a sample.
        t.rtt_sample(&p, Duration::from_millis(1), now);
        assert!((ms(&t).unwrap() - 1.0).abs() < 0.01, "{:?}", ms(&t));
        assert!(!t.snapshot(now)[0].rtt_provisional);
        t.rtt_sample(&p, Duration::from_millis(1), now);
        assert!((ms(&t).unwrap() - 1.0).abs() < 0.01, "{:?}", ms(&t));
        // A peer with an estimate keeps it.
        t.provisional_rtt(&p, Duration::from_millis(50));
        assert!((ms(&t).unwrap() - 1.0).abs() < 0.01, "{:?}", ms(&t));
        // Unknown peers are ignored.
        t.provisional_rtt(&PeerId::random(), Duration::from_millis(5));
        assert_eq!(t.snapshot(now).len(), 1);
    }

    #[test]
    fn small_exchanges_are_samples_and_large_ones_only_bound_the_rtt() {
        let (mut t, p, now) = one_peer();
        let rtt = |t: &PeerTable| t.snapshot(now)[0].rtt.map(|d| d.as_secs_f64() * 1000.0);
        // A large transfer with no estimate yet says nothing about the RTT.
        t.transfer_sample(&p, Duration::from_millis(50), 1 << 20, now);
        assert_eq!(rtt(&t), None);
        // A small exchange is a round trip.
        t.transfer_sample(&p, Duration::from_millis(20), 100, now);
        assert!((rtt(&t).unwrap() - 20.0).abs() < 0.01);
        // A large transfer slower than the estimate leaves it alone...
        t.transfer_sample(&p, Duration::from_millis(80), 1 << 20, now);
        assert!((rtt(&t).unwrap() - 20.0).abs() < 0.01);
        // ...and one faster than it pulls it down.
        t.transfer_sample(&p, Duration::from_millis(4), 1 << 20, now);
        assert!((rtt(&t).unwrap() - 16.0).abs() < 0.01, "{:?}", rtt(&t));
        assert_eq!(t.snapshot(now)[0].last_rtt, Some(Duration::from_millis(4)));
    }

    #[test]
    fn addresses_are_bounded_and_deduplicated() {
        let (mut t, p, now) = one_peer();
        for port in 0..20u16 {
            let addr: Multiaddr = format!("/ip4/10.0.0.1/udp/{port}/quic-v1").parse().unwrap();
            t.add_addr(&p, addr.clone());
            t.add_addr(&p, addr);
        }
        assert_eq!(t.snapshot(now)[0].addrs.len(), MAX_ADDRS);
    }
}
