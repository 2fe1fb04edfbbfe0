//! Repair: re-creating the replicas and shards a dead holder took with it.
//!
//! Every few seconds the worker walks the placement records this node keeps. An object with a
//! dead holder (the peer table says `dead`, or a holder has not been seen at all for
//! `dead_after` since this node started and does not answer when asked directly) is repaired by
//! exactly one node: the holder with the lowest peer id that is not dead, so holders never race
//! each other. A repairer that is only unreachable for a moment (restarting, a dropped
//! connection) stays the repairer: the next holder takes over only once it is dead, because two
//! repairers would each write a different next version of the record and each send copies.
//! That node, for each part below its target (N live holders for `rep:N`, one per shard for
//! `ec:K+M`), picks new holders with the placement function (never a peer that already holds
//! that part; for shards, peers holding no shard of the chunk first), writes the next version
//! of the record without the dead holders, and queues a durable delivery ([`super::complete`]):
//! the new holders get their parts (a replica copied from a live holder, a shard rebuilt from K
//! others) and then the record, every other holder gets the record, and so do the dead ones, so
//! that one coming back releases the copies it no longer needs. The queue lives in RocksDB, so
//! a restart resumes a repair where it stopped, and a holder is asked what it has before
//! anything is sent, so nothing is copied twice. Sends are paced at `repair_rate`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh_proto::wire::{NodeId, PlacementRecord};
use mesh_proto::{Manifest, ObjectId, Redundancy};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::complete::Delivery;
use super::{Mesh, Target, lock, now_ms};
use crate::placement::{self, Liveness, Zone};
use crate::store::{MetaStore, StoreError};

/// How often the records are walked.
const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Objects read per store page during a walk.
const PAGE: usize = 512;

/// What the repair worker last saw, for status and `meshctl repair`.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<RepairState>,
    /// When each object this node must repair was first seen below target.
    since: Mutex<HashMap<ObjectId, Instant>>,
}

pub use mesh_proto::api::RepairStatus as RepairState;

impl Mesh {
    /// The repair worker's last view.
    pub fn repair_state(&self) -> RepairState {
        let mut state = lock(&self.inner.repair.state).clone();
        state.rate_bytes_per_sec = self.inner.pace.rate();
        state
    }

    /// Walks the records every few seconds and repairs what this node is responsible for,
    /// until `stop` is cancelled.
    pub async fn run_repair(self, stop: CancellationToken) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(SCAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                result = self.repair_scan(started) => {
                    if let Err(e) = result {
                        warn!(error = %e, "repair scan failed");
                    }
                }
            }
        }
    }

    /// One walk over the records kept here.
    async fn repair_scan(&self, started: Instant) -> Result<(), StoreError> {
        let me = self.local_id();
        let peers = self.inner.net.peers();
        let dead_after = self.inner.settings.dead_after;
        let view: HashMap<Vec<u8>, Liveness> = peers
            .iter()
            .map(|p| {
                let liveness = if p.connected || p.liveness != Liveness::Alive {
                    p.liveness
                } else {
                    Liveness::Suspect
                };
                (p.id.to_bytes(), liveness)
            })
            .collect();
        let me_bytes = me.to_bytes();
        // A holder never seen since this node started counts as dead after `dead_after`.
        let unseen_is_dead = started.elapsed() >= dead_after;
        let is_dead = |n: &NodeId| {
            n.0 != me_bytes
                && match view.get(&n.0) {
                    Some(l) => *l == Liveness::Dead,
                    None => unseen_is_dead,
                }
        };
        let is_alive = |n: &NodeId| n.0 == me_bytes || view.get(&n.0) == Some(&Liveness::Alive);

        // Unseen holders asked during this scan, and whether they answered.
        let mut probed: HashMap<PeerId, bool> = HashMap::new();
        let mut below = 0u64;
        let mut backlog = 0u64;
        let mut still_below: HashSet<ObjectId> = HashSet::new();
        let mut after: Option<ObjectId> = None;
        loop {
            let store = Arc::clone(&self.inner.store);
            let cursor = after;
            let page = tokio::task::spawn_blocking(move || {
                let objects = store.list_objects(cursor.as_ref(), PAGE)?;
                let mut out = Vec::with_capacity(objects.len());
                for object in objects {
                    let record = store.record(&object.id)?;
                    let queued = store.delivery(&object.id)?.map(|d| Delivery::summary(&d));
                    out.push((object.id, record, queued));
                }
                Ok::<_, StoreError>(out)
            })
            .await
            .map_err(|_| StoreError::Db("repair worker failed".into()))??;
            let Some(last) = page.last() else { break };
            after = Some(last.0);
            for (object, record, queued) in page {
                let Some(record) = record.and_then(|b| PlacementRecord::decode(&b).ok()) else {
                    continue;
                };
                if record.tombstone || record.parts_below_target(is_alive).is_empty() {
                    continue;
                }
                below += 1;
                // The holder with the lowest peer id that is not dead repairs; the others
                // leave it. Not "alive": a repairer that is suspect because it is restarting
                // mid-repair must not be doubled by the next holder.
                let repairer = record
                    .nodes
                    .iter()
                    .filter(|n| !is_dead(n))
                    .min_by(|a, b| a.0.cmp(&b.0));
                if repairer.is_none_or(|n| n.0 != me_bytes) {
                    continue;
                }
                backlog += 1;
                still_below.insert(object);
                lock(&self.inner.repair.since)
                    .entry(object)
                    .or_insert_with(Instant::now);
                // A delivery still sending parts (the put's, or an earlier repair's) goes
                // first; one only owing the record (to a dead peer) does not hold repair up.
                let (owes_parts, owed_peers) = queued.unwrap_or_default();
                if owes_parts || !record.nodes.iter().any(&is_dead) {
                    continue;
                }
                // A holder this node has not heard from since it started may simply not be
                // connected yet (a restarted node, gossip slower than `dead_after`): it is
                // asked directly, and only one that does not answer is taken for dead.
                let mut answered: HashSet<Vec<u8>> = HashSet::new();
                for node in record
                    .nodes
                    .iter()
                    .filter(|n| is_dead(n) && !view.contains_key(&n.0))
                {
                    let Ok(peer) = PeerId::from_bytes(&node.0) else {
                        continue;
                    };
                    let alive = match probed.get(&peer) {
                        Some(&alive) => alive,
                        None => {
                            let alive = self.answers(peer, dead_after).await;
                            probed.insert(peer, alive);
                            alive
                        }
                    };
                    if alive {
                        answered.insert(node.0.clone());
                    }
                }
                let is_dead = |n: &NodeId| is_dead(n) && !answered.contains(&n.0);
                if !record.nodes.iter().any(is_dead) {
                    debug!(%object, "a holder not heard from since start answered; no repair");
                    continue;
                }
                if let Err(e) = self
                    .repair_object(object, record, &is_dead, owed_peers)
                    .await
                {
                    warn!(%object, error = %e, "repair failed; retrying on the next scan");
                }
            }
        }
        // Objects that left the backlog were repaired: record how long that took.
        let finished: Vec<(ObjectId, Instant)> = {
            let mut since = lock(&self.inner.repair.since);
            let done: Vec<ObjectId> = since
                .keys()
                .filter(|o| !still_below.contains(o))
                .copied()
                .collect();
            done.into_iter()
                .filter_map(|o| since.remove(&o).map(|t| (o, t)))
                .collect()
        };
        let mut state = lock(&self.inner.repair.state);
        for (object, t) in finished {
            let seconds = t.elapsed().as_secs_f64();
            info!(%object, seconds, "object repaired to its target");
            state.last_repair_seconds = Some(seconds);
            self.inner.metrics.repair_seconds().set(seconds);
        }
        state.below_target = below;
        state.backlog = backlog;
        state.last_scan_ms = now_ms();
        self.inner.metrics.below_target().set(below as f64);
        self.inner.metrics.repair_backlog().set(backlog as f64);
        Ok(())
    }

    /// Whether `peer` answers a request (an empty `Has`) within `timeout`.
    async fn answers(&self, peer: PeerId, timeout: Duration) -> bool {
        let probe = self.inner.net.chunk(
            peer,
            crate::net::Frame::new(mesh_proto::wire::ChunkRequest::Has { ids: Vec::new() }),
        );
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)))
    }

    /// Places the parts `object` lost on new holders: writes the next record version here and
    /// queues its delivery.
    async fn repair_object(
        &self,
        object: ObjectId,
        record: PlacementRecord,
        is_dead: &impl Fn(&NodeId) -> bool,
        still_owed: Vec<PeerId>,
    ) -> Result<(), StoreError> {
        let store = Arc::clone(&self.inner.store);
        let Some((manifest, manifest_bytes)) =
            tokio::task::spawn_blocking(move || store.manifest(&object))
                .await
                .map_err(|_| StoreError::Db("repair worker failed".into()))??
        else {
            return Ok(());
        };
        let me = self.local_id();
        let peers = self.inner.net.peers();
        let (candidates, targets) = self.candidates(&peers);
        let zone = Zone::new(self.inner.net.zone());
        let wanted = record.holders_wanted();
        let width = record.redundancy.width();
        let erasure = matches!(record.redundancy, Redundancy::Erasure { .. });

        // Holders per part, as peer ids, without the dead ones.
        let mut holders: Vec<Vec<PeerId>> = (0..record.part_count())
            .map(|i| {
                record
                    .holders_of(i)
                    .filter(|n| !is_dead(n))
                    .filter_map(|n| PeerId::from_bytes(&n.0).ok())
                    .collect()
            })
            .collect();
        let mut owed: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        let mut parts_queued = 0u64;
        let mut bytes_queued = 0u64;
        for index in 0..holders.len() {
            let live = holders[index].len();
            if live >= wanted {
                continue;
            }
            let Some(part) = record.part_id(&manifest.chunks, index) else {
                continue;
            };
            // Holders of the chunk's other shards are taken last, and of those, holders of
            // a shard with this one's id (equal bytes, like the zero padding of a short
            // chunk) last of all: a second shard of the same id on one node is no copy.
            let (siblings, same_id): (HashSet<PeerId>, HashSet<PeerId>) = if erasure {
                let first = index - index % width;
                let siblings = (first..first + width)
                    .flat_map(|i| holders[i].iter().copied())
                    .collect();
                let same_id = (first..first + width)
                    .filter(|&i| i != index && record.part_id(&manifest.chunks, i) == Some(part))
                    .flat_map(|i| holders[i].iter().copied())
                    .collect();
                (siblings, same_id)
            } else {
                (HashSet::new(), HashSet::new())
            };
            let order = placement::choose_targets(
                &candidates,
                &placement::Request {
                    chunk: &part,
                    width: candidates.len(),
                    max_per_zone: None,
                    writer_zone: &zone,
                    min_free_bytes: self.inner.settings.min_free_bytes,
                },
            );
            let mut eligible: Vec<PeerId> = order
                .into_iter()
                .filter_map(|i| match targets[i] {
                    Target::Remote(p) => Some(p),
                    Target::Local => None,
                })
                .filter(|p| *p != me && !holders[index].contains(p))
                .collect();
            eligible.sort_by_key(|p| (same_id.contains(p), siblings.contains(p)));
            let len = part_len(&manifest, &record, index);
            for peer in eligible.into_iter().take(wanted - live) {
                holders[index].push(peer);
                owed.entry(peer).or_default().push(index as u32);
                parts_queued += 1;
                bytes_queued += len;
            }
        }
        if parts_queued == 0 {
            debug!(%object, "no live peer can take the lost parts yet");
            return Ok(());
        }

        // The next version: the same parts, their live and new holders.
        let mut nodes: Vec<PeerId> = Vec::new();
        let holder_lists: Vec<Vec<u16>> = holders
            .iter()
            .map(|list| {
                list.iter()
                    .map(|peer| match nodes.iter().position(|n| n == peer) {
                        Some(pos) => pos as u16,
                        None => {
                            nodes.push(*peer);
                            (nodes.len() - 1) as u16
                        }
                    })
                    .collect()
            })
            .collect();
        let next = PlacementRecord {
            object,
            version: record.version + 1,
            writer: NodeId(me.to_bytes()),
            redundancy: record.redundancy,
            tombstone: false,
            nodes: nodes.iter().map(|p| NodeId(p.to_bytes())).collect(),
            holders: holder_lists,
            parts: record.parts.clone(),
        };
        // Everyone in either version hears of the new one: the holders (new ones after their
        // parts), and the dropped ones so that they release what they no longer hold; so do
        // the peers an earlier delivery still owed a record (this one replaces it).
        let named = record
            .nodes
            .iter()
            .chain(&next.nodes)
            .filter_map(|n| PeerId::from_bytes(&n.0).ok());
        for peer in named.chain(still_owed) {
            if peer != me {
                owed.entry(peer).or_default();
            }
        }
        let held = next.chunks_held_by(&NodeId(me.to_bytes()));
        let encoded = next.encode();
        let delivery = Delivery::new(&next, &manifest_bytes, owed, now_ms());
        let store = Arc::clone(&self.inner.store);
        let commit_manifest: Manifest = manifest.clone();
        let parts = next.parts.clone();
        let based_on = record.clone();
        let committed = tokio::task::spawn_blocking(move || {
            // Only on top of the record the repair was planned from: a tombstone or a newer
            // record that arrived meanwhile wins, and the next scan looks again.
            let _object = store.object_lock(&object);
            let current = store.record(&object)?;
            if current.and_then(|bytes| PlacementRecord::decode(&bytes).ok()) != Some(based_on) {
                return Ok(false);
            }
            store
                .commit_placed(&commit_manifest, &encoded, &held, &parts)
                .map(|_| true)
        })
        .await
        .map_err(|_| StoreError::Db("repair worker failed".into()))??;
        if !committed {
            debug!(%object, "the record changed while the repair was planned; planning again later");
            return Ok(());
        }
        self.enqueue_delivery(object, delivery, Vec::new())
            .await
            .map_err(|e| StoreError::Db(e.to_string()))?;
        self.inner.metrics.repaired_parts().increment(parts_queued);
        self.inner.metrics.repair_bytes().increment(bytes_queued);
        {
            let mut state = lock(&self.inner.repair.state);
            state.parts_queued += parts_queued;
            state.bytes_queued += bytes_queued;
        }
        info!(%object, version = next.version, parts = parts_queued, bytes = bytes_queued, "repair queued: lost parts go to new holders");
        Ok(())
    }
}

/// Bytes of part `index`: the chunk for `rep:N`, one shard for `ec:K+M`.
fn part_len(manifest: &Manifest, record: &PlacementRecord, index: usize) -> u64 {
    match record.redundancy {
        Redundancy::Replicas(_) => manifest.chunks.get(index).map_or(0, |c| u64::from(c.len)),
        Redundancy::Erasure { data, parity } => {
            let width = usize::from(data) + usize::from(parity);
            manifest.chunks.get(index / width).map_or(0, |c| {
                crate::erasure::shard_len(c.len as usize, usize::from(data)) as u64
            })
        }
    }
}

/// Paces background sends (put completion and repair) at a byte rate.
#[derive(Debug)]
pub(crate) struct Pace {
    rate: std::sync::atomic::AtomicU64,
    /// When the bytes granted so far have been paid for.
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate: std::sync::atomic::AtomicU64::new(rate),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub(crate) fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Waits until `bytes` more may be sent. A burst of up to one second's worth goes at once.
    pub(crate) async fn take(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        // `next` is when everything granted so far is paid for; a send waits until its own
        // debt is less than one second ahead of now.
        let wait_until = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            *next = (*next).max(now) + cost;
            next.checked_sub(Duration::from_secs(1)).unwrap_or(now)
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacing_holds_sends_to_the_rate_after_a_one_second_burst() {
        let pace = Pace::new(1_000_000);
        let start = tokio::time::Instant::now();
        // The first second's worth goes at once.
        for _ in 0..10 {
            pace.take(100_000).await;
        }
        assert!(start.elapsed() < Duration::from_millis(10));
        // The next 2 MB take two seconds.
        for _ in 0..20 {
            pace.take(100_000).await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
        let unpaced = Pace::new(0);
        let t = tokio::time::Instant::now();
        unpaced.take(u64::MAX).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
