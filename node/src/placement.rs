//! Placement: which peers should hold a chunk (or one erasure shard), best first.
//!
//! A pure function of the candidate peers (from the peer table), the chunk id, the policy's
//! width and the writer's zone: no IO, no clock, no randomness. Every node with the same view of
//! the mesh computes the same targets, and the rules can be property-tested. The write path and
//! repair call [`choose_targets`] and send to what it returns, in that order.
//!
//! The rules:
//!
//! 1. **Eligible peers only**: alive, with at least `min_free_bytes` free, each peer id once (the
//!    first entry for an id wins, even when it is ineligible). Never a suspect, dead or full peer.
//! 2. **Near first, in bands**: the best eligible RTT opens a band [`near_band`] wide (1.5 x the
//!    best, at least 2 ms); every peer inside it is equally near. The nearest peer outside opens
//!    the next band, and so on. RTTs are noisy averages, so close values count as equal and
//!    capacity and load decide among them instead of noise.
//! 3. **Within a band**: the writer itself first (RTT zero: a local copy costs no network), then
//!    more free space, then lower load, then a rendezvous hash of (chunk id, peer id). Free space
//!    is compared in powers of two and load in tenths, so a few bytes or a load blip cannot send
//!    every chunk to one peer; the hash spreads chunks evenly and stably over the peers left tied.
//! 4. **Spread**: a zone is `cloud/region/az`; spreading compares the *region*
//!    ([`Zone::region`], the first two components). Zones of one region share power, network and
//!    control plane, so a copy in the next zone of the same region is not "elsewhere" when a
//!    region fails. Peers of unknown zone form one region: nothing says they are apart.
//!    - Replicas (`max_per_zone == None`): when width >= 2 and the eligible peers span two
//!      regions, the first target is the best peer in the writer's region (or the best peer
//!      overall when that region has none), the second the best peer in another region, and the
//!      rest follow the order. Losing one region never loses every copy.
//!    - Erasure (`Some(m)`): at most `m` shards per region, so losing a region loses at most the
//!      parity. When the regions cannot host `width` shards under that cap, the cap rises by the
//!      least that fits (spreading as evenly as possible) rather than placing fewer shards.
//! 5. **Shortfall**: with fewer eligible peers than `width`, all of them, best first; the caller
//!    reports the shortfall.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use mesh_proto::ChunkId;

/// The narrowest near band: below a couple of milliseconds RTT samples are mostly scheduling
/// noise, so peers in one data centre all count as equally near.
const MIN_NEAR_BAND: Duration = Duration::from_millis(2);

/// Load is compared in steps of 1 / this (tenths), so load reports that wobble between gossip
/// rounds do not reshuffle placement.
const LOAD_STEPS: f32 = 10.0;

/// A node that could hold a chunk. `id` is an opaque stable peer identifier (raw bytes of a
/// libp2p `PeerId`).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: Vec<u8>,
    pub zone: Zone,
    /// RTT from the writer; the writer itself has `Duration::ZERO`.
    pub rtt: Duration,
    pub free_bytes: u64,
    /// 0.0 idle .. 1.0 saturated (may exceed 1).
    pub load: f32,
    pub liveness: Liveness,
}

/// What the peer table believes about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

/// A zone path such as `aws/us-east-1/a` (cloud/region/az). Components are split by `/`, empty
/// components are dropped; the empty path is the unknown zone, which shares nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Zone(String);

impl Zone {
    /// Parses a zone path, normalising `" aws//us-east-1/ "` to `aws/us-east-1`.
    pub fn new(path: &str) -> Zone {
        let components: Vec<&str> = path
            .split('/')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        Zone(components.join("/"))
    }

    /// The normalised path; empty for the unknown zone.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the unknown zone.
    pub fn is_unknown(&self) -> bool {
        self.0.is_empty()
    }

    /// How many leading components two zones share: longer is closer; 0 with the unknown zone.
    pub fn shared_prefix(&self, other: &Zone) -> usize {
        self.components()
            .zip(other.components())
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The `cloud/region` part, which zone spreading compares (empty for the unknown zone).
    pub fn region(&self) -> &str {
        // The path is normalised, so the region ends just before the second '/', if any.
        match self.0.match_indices('/').nth(1) {
            Some((end, _)) => &self.0[..end],
            None => &self.0,
        }
    }

    fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Zone {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Zone::new(s))
    }
}

/// What to place: one chunk, on how many peers, under which spreading rule.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub chunk: &'a ChunkId,
    /// How many distinct holders are wanted (N for `rep:N`, K+M for `ec:K+M`).
    pub width: usize,
    /// For `ec:K+M` pass `Some(M)`: never more than M targets in one region when enough regions
    /// exist. `None` for replicas.
    pub max_per_zone: Option<usize>,
    pub writer_zone: &'a Zone,
    /// A peer with fewer free bytes than this is full.
    pub min_free_bytes: u64,
}

/// The near band: peers with `rtt <= near_band(best)` count as equally near, where `best` is
/// the lowest RTT among the peers still to order.
pub fn near_band(best: Duration) -> Duration {
    best.saturating_add(best / 2).max(MIN_NEAR_BAND)
}

/// Returns up to `request.width` distinct candidate indices (into `candidates`), best first.
pub fn choose_targets(candidates: &[Candidate], request: &Request<'_>) -> Vec<usize> {
    if request.width == 0 {
        return Vec::new();
    }
    let order = rank(candidates, request);
    let target = request.width.min(order.len());
    match request.max_per_zone {
        None => pick_replicas(candidates, &order, request.writer_zone, target),
        Some(cap) => pick_capped(candidates, &order, cap, target),
    }
}

/// Sort key within the tiered order: (band, not the writer, free bucket desc, load bucket asc,
/// rendezvous hash desc). The hash is unique per peer, so the order is total and does not
/// depend on the order of `candidates`.
type RankKey = (usize, bool, Reverse<u32>, u32, Reverse<[u8; 32]>);

/// The eligible, deduplicated candidates in the tiered order (rules 1 to 3).
fn rank(candidates: &[Candidate], request: &Request<'_>) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut eligible: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|&(_, c)| seen.insert(c.id.as_slice()))
        .filter(|&(_, c)| c.liveness == Liveness::Alive && c.free_bytes >= request.min_free_bytes)
        .map(|(i, _)| i)
        .collect();

    // Walk by RTT: a peer beyond the current band's limit opens the next band, measured from it.
    eligible.sort_by_key(|&i| candidates[i].rtt);
    let mut band = 0;
    let mut limit = eligible
        .first()
        .map(|&i| near_band(candidates[i].rtt))
        .unwrap_or_default();
    let mut keyed: Vec<(RankKey, usize)> = Vec::with_capacity(eligible.len());
    for i in eligible {
        let c = &candidates[i];
        if c.rtt > limit {
            band += 1;
            limit = near_band(c.rtt);
        }
        let key = (
            band,
            c.rtt != Duration::ZERO,
            Reverse(free_bucket(c.free_bytes)),
            load_bucket(c.load),
            Reverse(rendezvous(request.chunk, &c.id)),
        );
        keyed.push((key, i));
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Rule 4 for replicas: the writer's region first, the nearest other region second.
fn pick_replicas(
    candidates: &[Candidate],
    order: &[usize],
    writer_zone: &Zone,
    target: usize,
) -> Vec<usize> {
    let mut picked = Vec::with_capacity(target);
    let first_region = order.first().map(|&i| region_of(candidates, i));
    let spans_regions = order
        .iter()
        .any(|&i| Some(region_of(candidates, i)) != first_region);
    if target >= 2 && spans_regions {
        let home = order
            .iter()
            .copied()
            .find(|&i| region_of(candidates, i) == writer_zone.region())
            .or(order.first().copied());
        if let Some(home) = home {
            let home_region = region_of(candidates, home);
            picked.push(home);
            picked.extend(
                order
                    .iter()
                    .copied()
                    .find(|&i| region_of(candidates, i) != home_region),
            );
        }
    }
    for &i in order {
        if picked.len() >= target {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked
}

/// Rule 4 for erasure: at most `max_per_region` per region, raised only as far as needed to
/// place `target` shards.
fn pick_capped(
    candidates: &[Candidate],
    order: &[usize],
    max_per_region: usize,
    target: usize,
) -> Vec<usize> {
    let mut available: HashMap<&str, usize> = HashMap::new();
    for &i in order {
        *available.entry(region_of(candidates, i)).or_default() += 1;
    }
    let room = |cap: usize| available.values().map(|&n| n.min(cap)).sum::<usize>();
    // Terminates: a cap of `order.len()` has room for every peer, and `target <= order.len()`.
    let mut cap = max_per_region;
    while room(cap) < target {
        cap += 1;
    }

    let mut taken: HashMap<&str, usize> = HashMap::new();
    let mut picked = Vec::with_capacity(target);
    for &i in order {
        if picked.len() >= target {
            break;
        }
        let count = taken.entry(region_of(candidates, i)).or_default();
        if *count < cap {
            *count += 1;
            picked.push(i);
        }
    }
    picked
}

fn region_of(candidates: &[Candidate], i: usize) -> &str {
    candidates[i].zone.region()
}

/// Free space by power of two (bit length): peers within 2x of each other usually tie.
fn free_bucket(free_bytes: u64) -> u32 {
    u64::BITS - free_bytes.leading_zeros()
}

/// Load in tenths; an unreadable (NaN) load counts as saturated.
fn load_bucket(load: f32) -> u32 {
    if load.is_nan() {
        return u32::MAX;
    }
    // `as` saturates: a negative load is bucket 0, an infinite one u32::MAX.
    (load * LOAD_STEPS).floor() as u32
}

/// One holder a reader may fetch a chunk from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The peer id's bytes (the rendezvous key), as in [`Candidate::id`].
    pub id: Vec<u8>,
    /// Measured RTT; `None` if unknown (ordered as far away).
    pub rtt: Option<Duration>,
    /// Alive and not avoided for bad data: a peer that is not is asked only after all that are.
    pub usable: bool,
}

/// The order in which to ask holders for `chunk`: usable before unusable; among usable ones,
/// those in the near band of the nearest first, ordered by rendezvous score, then the rest by
/// RTT. Like placement, the near band treats peers that are about as close as equally close,
/// so the chunks of a large object are read from all of them, not all from the one whose RTT
/// sample happens to be lowest: each holder serves its share and the reader decrypts over
/// several connections at once.
pub fn read_order(chunk: &ChunkId, sources: &[Source]) -> Vec<usize> {
    let far = Duration::from_secs(3600);
    let rtt = |s: &Source| s.rtt.unwrap_or(far);
    let best = sources
        .iter()
        .filter(|s| s.usable)
        .map(rtt)
        .min()
        .unwrap_or(far);
    let band = near_band(best);
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_cached_key(|&i| {
        let s = &sources[i];
        let near = s.usable && rtt(s) <= band;
        // Within the band the RTT does not count; outside it only the RTT does.
        let (distance, score) = if near {
            (Duration::ZERO, std::cmp::Reverse(rendezvous(chunk, &s.id)))
        } else {
            (rtt(s), std::cmp::Reverse([0u8; 32]))
        };
        (!s.usable, !near, distance, score)
    });
    order
}

/// Rendezvous (highest random weight) score of a peer for a chunk.
fn rendezvous(chunk: &ChunkId, peer: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(chunk.as_bytes());
    hasher.update(peer);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN_FREE: u64 = 1 << 30;

    fn peer(id: &str, zone: &str, rtt_ms: u64) -> Candidate {
        Candidate {
            id: id.as_bytes().to_vec(),
            zone: Zone::new(zone),
            rtt: Duration::from_millis(rtt_ms),
            free_bytes: 1 << 40,
            load: 0.2,
            liveness: Liveness::Alive,
        }
    }

    fn request<'a>(chunk: &'a ChunkId, writer_zone: &'a Zone, width: usize) -> Request<'a> {
        Request {
            chunk,
            width,
            max_per_zone: None,
            writer_zone,
            min_free_bytes: MIN_FREE,
        }
    }

    fn ids(candidates: &[Candidate], picked: &[usize]) -> Vec<String> {
        picked
            .iter()
            .map(|&i| String::from_utf8_lossy(&candidates[i].id).into_owned())
            .collect()
    }

    fn count_prefix(ids: &[String], prefix: &str) -> usize {
        ids.iter().filter(|id| id.starts_with(prefix)).count()
    }

    fn three_clouds() -> Vec<Candidate> {
        vec![
            peer("writer", "aws/us-east-1/a", 0),
            peer("aws-b", "aws/us-east-1/b", 1),
            peer("aws-c", "aws/us-east-1/c", 1),
            peer("gcp-a", "gcp/us-central1/a", 30),
            peer("gcp-b", "gcp/us-central1/b", 30),
        ]
    }

    #[test]
    fn zones_parse_and_compare_by_prefix() {
        let a = Zone::new(" aws//us-east-1/a/ ");
        assert_eq!(a.as_str(), "aws/us-east-1/a");
        assert_eq!(a.region(), "aws/us-east-1");
        assert_eq!(Zone::new("aws").region(), "aws");
        assert_eq!(a.shared_prefix(&Zone::new("aws/us-east-1/b")), 2);
        assert_eq!(a.shared_prefix(&Zone::new("gcp/us-east-1/a")), 0);
        assert_eq!(Zone::default().shared_prefix(&Zone::default()), 0);
        assert!(Zone::new("").is_unknown());
        assert_eq!(
            "aws/eu-west-1".parse::<Zone>().unwrap().to_string(),
            "aws/eu-west-1"
        );
    }

    #[test]
    fn three_clouds_keep_a_local_copy_and_one_in_another_cloud() {
        let peers = three_clouds();
        let writer_zone = Zone::new("aws/us-east-1/a");
        let mut aws_used = HashSet::new();
        for n in 0u32..200 {
            let chunk = ChunkId::of(&n.to_le_bytes());
            let picked = ids(
                &peers,
                &choose_targets(&peers, &request(&chunk, &writer_zone, 3)),
            );
            assert_eq!(picked.len(), 3, "{picked:?}");
            assert_eq!(picked[0], "writer");
            assert_eq!(count_prefix(&picked, "aws-"), 1, "{picked:?}");
            assert_eq!(count_prefix(&picked, "gcp-"), 1, "{picked:?}");
            aws_used.extend(picked.into_iter().filter(|id| id.starts_with("aws-")));

            // A writer that stores nothing: two copies near it, one in the other cloud.
            let remote = &peers[1..];
            let picked = ids(
                remote,
                &choose_targets(remote, &request(&chunk, &writer_zone, 3)),
            );
            assert_eq!(count_prefix(&picked, "aws-"), 2, "{picked:?}");
            assert_eq!(count_prefix(&picked, "gcp-"), 1, "{picked:?}");
        }
        assert_eq!(
            aws_used.len(),
            2,
            "chunks should spread over both aws peers"
        );
    }

    #[test]
    fn suspect_dead_full_and_duplicate_peers_are_never_chosen() {
        let mut suspect = peer("suspect", "aws/us-east-1/a", 1);
        suspect.liveness = Liveness::Suspect;
        let mut dead = peer("dead", "aws/us-east-1/a", 1);
        dead.liveness = Liveness::Dead;
        let mut full = peer("full", "aws/us-east-1/a", 1);
        full.free_bytes = MIN_FREE - 1;
        // The first entry for an id wins: a later live duplicate does not revive a dead peer.
        let revived = peer("dead", "aws/us-east-1/a", 1);
        let peers = vec![
            suspect,
            dead,
            full,
            revived,
            peer("ok", "aws/us-east-1/a", 5),
            peer("ok", "aws/us-east-1/b", 1),
        ];
        let zone = Zone::new("aws/us-east-1/a");
        let chunk = ChunkId::of(b"chunk");
        let picked = choose_targets(&peers, &request(&chunk, &zone, 5));
        assert_eq!(picked, vec![4]);
    }

    #[test]
    fn the_near_band_is_at_least_two_milliseconds() {
        assert_eq!(near_band(Duration::ZERO), Duration::from_millis(2));
        assert_eq!(
            near_band(Duration::from_millis(1)),
            Duration::from_millis(2)
        );
        assert_eq!(
            near_band(Duration::from_millis(10)),
            Duration::from_millis(15)
        );

        let with = |id: &str, rtt_us: u64, free_bytes: u64| Candidate {
            rtt: Duration::from_micros(rtt_us),
            free_bytes,
            ..peer(id, "aws/us-east-1/a", 0)
        };
        // 0.5 ms and 1.9 ms are equally near, so free space decides; 2.1 ms is the next band,
        // however empty that peer is.
        let peers = vec![
            with("near", 500, 1 << 32),
            with("roomy", 1900, 1 << 40),
            with("far", 2100, 1 << 50),
        ];
        let zone = Zone::new("aws/us-east-1/a");
        let chunk = ChunkId::of(b"chunk");
        let picked = ids(&peers, &choose_targets(&peers, &request(&chunk, &zone, 3)));
        assert_eq!(picked, ["roomy", "near", "far"]);
    }

    #[test]
    fn reads_spread_over_equally_near_holders_and_skip_far_and_unusable_ones() {
        let ids: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 8]).collect();
        let ms = |m| Some(Duration::from_millis(m));
        let sources = [
            Source {
                id: ids[0].clone(),
                rtt: ms(1),
                usable: true,
            },
            Source {
                id: ids[1].clone(),
                rtt: Some(Duration::from_micros(1200)),
                usable: true,
            },
            Source {
                id: ids[2].clone(),
                rtt: ms(30),
                usable: true,
            },
            Source {
                id: ids[3].clone(),
                rtt: Some(Duration::from_micros(100)),
                usable: false,
            },
        ];
        let mut first = [0usize; 4];
        for c in 0..600u32 {
            let order = read_order(&ChunkId::of(&c.to_be_bytes()), &sources);
            // The far holder comes after both near ones, the unusable one last.
            assert_eq!(&order[2..], &[2, 3], "{order:?}");
            first[order[0]] += 1;
        }
        // Both near holders serve a fair share (binomial, 600 draws).
        assert!(first[0] > 200 && first[1] > 200, "{first:?}");
        // Outside the band only the RTT counts.
        let far = [
            Source {
                id: ids[0].clone(),
                rtt: ms(80),
                usable: true,
            },
            Source {
                id: ids[1].clone(),
                rtt: ms(30),
                usable: true,
            },
            Source {
                id: ids[2].clone(),
                rtt: None,
                usable: true,
            },
            Source {
                id: ids[3].clone(),
                rtt: ms(1),
                usable: true,
            },
        ];
        assert_eq!(read_order(&ChunkId::of(b"x"), &far), vec![3, 1, 0, 2]);
        assert!(read_order(&ChunkId::of(b"x"), &[]).is_empty());
    }

    #[test]
    fn rendezvous_spreads_chunks_over_equal_peers() {
        let peers: Vec<_> = (0..4)
            .map(|n| peer(&format!("p{n}"), "aws/us-east-1/a", 1))
            .collect();
        let zone = Zone::new("aws/us-east-1/a");
        let mut firsts = [0usize; 4];
        for n in 0u32..1000 {
            // BLAKE3 outputs are as good as random chunk ids, and reproducible.
            let chunk = ChunkId::of(&n.to_le_bytes());
            let picked = choose_targets(&peers, &request(&chunk, &zone, 1));
            firsts[picked[0]] += 1;
        }
        assert!(firsts.iter().all(|&n| n >= 150), "{firsts:?}");
    }

    #[test]
    fn placement_is_deterministic_and_ignores_input_order() {
        let peers = three_clouds();
        let zone = Zone::new("aws/us-east-1/a");
        let chunk = ChunkId::of(b"chunk");
        let req = Request {
            max_per_zone: Some(1),
            ..request(&chunk, &zone, 4)
        };
        let first = ids(&peers, &choose_targets(&peers, &req));
        assert_eq!(first, ids(&peers, &choose_targets(&peers, &req)));
        let reversed: Vec<_> = peers.iter().rev().cloned().collect();
        assert_eq!(first, ids(&reversed, &choose_targets(&reversed, &req)));
    }

    const ZONES: [&str; 6] = [
        "aws/us-east-1/a",
        "aws/us-east-1/b",
        "aws/eu-west-1/a",
        "gcp/us-central1/a",
        "gcp/us-central1/b",
        "",
    ];

    fn candidate() -> impl Strategy<Value = Candidate> {
        let liveness = prop_oneof![
            6 => Just(Liveness::Alive),
            1 => Just(Liveness::Suspect),
            1 => Just(Liveness::Dead),
        ];
        let free = prop_oneof![Just(0u64), 0u64..1 << 40];
        (
            0u8..24,
            0..ZONES.len(),
            0u64..100_000,
            free,
            0.0f32..1.5,
            liveness,
        )
            .prop_map(|(id, zone, rtt_us, free_bytes, load, liveness)| Candidate {
                id: vec![id],
                zone: Zone::new(ZONES[zone]),
                rtt: Duration::from_micros(rtt_us),
                free_bytes,
                load,
                liveness,
            })
    }

    /// The oracle for rule 1: first entry per id, then alive and not full.
    fn eligible_oracle(candidates: &[Candidate], min_free: u64) -> Vec<usize> {
        let mut seen = HashSet::new();
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| seen.insert(c.id.clone()))
            .filter(|(_, c)| c.liveness == Liveness::Alive && c.free_bytes >= min_free)
            .map(|(i, _)| i)
            .collect()
    }

    fn per_region<'a>(candidates: &'a [Candidate], picked: &[usize]) -> HashMap<&'a str, usize> {
        let mut counts = HashMap::new();
        for &i in picked {
            *counts.entry(candidates[i].zone.region()).or_default() += 1;
        }
        counts
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn placement_keeps_its_rules(
            candidates in proptest::collection::vec(candidate(), 0..20),
            chunk in any::<[u8; 32]>(),
            width in 0usize..8,
            max_per_zone in proptest::option::of(1usize..4),
            writer_zone in 0..ZONES.len(),
            min_free in 0u64..1 << 39,
        ) {
            let chunk = ChunkId::from_bytes(chunk);
            let writer_zone = Zone::new(ZONES[writer_zone]);
            let request = Request {
                chunk: &chunk,
                width,
                max_per_zone,
                writer_zone: &writer_zone,
                min_free_bytes: min_free,
            };
            let picked = choose_targets(&candidates, &request);
            let eligible = eligible_oracle(&candidates, min_free);
            let target = width.min(eligible.len());
            prop_assert_eq!(picked.len(), target);

            let mut seen = HashSet::new();
            for &i in &picked {
                prop_assert!(eligible.contains(&i), "picked {} which is ineligible or a duplicate", i);
                prop_assert!(seen.insert(&candidates[i].id), "picked id {:?} twice", candidates[i].id);
            }

            let available = per_region(&candidates, &eligible);
            let got = per_region(&candidates, &picked);
            let promoted = max_per_zone.is_none() && width >= 2 && available.len() >= 2;
            match max_per_zone {
                None if promoted => {
                    prop_assert!(got.len() >= 2, "one region only: {:?}", got);
                    if available.contains_key(writer_zone.region()) {
                        prop_assert_eq!(candidates[picked[0]].zone.region(), writer_zone.region());
                    }
                }
                None => {}
                Some(cap) => {
                    let room = |c: usize| available.values().map(|&n| n.min(c)).sum::<usize>();
                    let most = got.values().copied().max().unwrap_or(0);
                    if room(cap) >= target {
                        prop_assert!(most <= cap, "{} in one region, cap {}", most, cap);
                    } else {
                        // Relaxed, but no more than needed.
                        prop_assert!(room(most.saturating_sub(1)) < target, "cap relaxed to {} needlessly", most);
                    }
                }
            }

            if let Some(&first) = picked.first() {
                let in_writer_region = candidates[first].zone.region() == writer_zone.region();
                let best = eligible.iter().map(|&i| candidates[i].rtt).min().unwrap_or_default();
                prop_assert!(
                    candidates[first].rtt <= near_band(best) || (promoted && in_writer_region),
                    "first target at {:?}, best eligible at {:?}", candidates[first].rtt, best
                );
            }
        }
    }
}
