//! Garbage collection: deletes the chunks no live object references once `gc_grace` has
//! passed, gives their disk space back, and drops tombstones after their retention.
//!
//! A chunk becomes a GC candidate, with the time, when a delete (local, or a tombstone from
//! another node) releases its last reference, or when an upload stores it before committing.
//! Each pass deletes the candidates older than the grace that are still unreferenced and not
//! pinned by an upload in progress: a put that references a chunk again within the grace keeps
//! it, and a peer storing it again starts its grace over. A chunk kept in a chunk file gives its
//! space back when it is deleted (the file goes). For one kept in RocksDB, deleting only removes
//! its key; the bytes stay in RocksDB's blob files until a compaction drops the key and the blob GC
//! drops or rewrites the files, so a pass that deleted something is followed by a compaction
//! of the chunk column family ([`RocksStore::compact_chunks`]): at once when
//! [`COMPACT_AFTER_BYTES`] are waiting for one, else at most every [`compact_every`].
//! Then tombstone records older than `tombstone_retention` go. The first pass after a run that
//! did not close the store also removes stray chunk files ([`RocksStore::sweep_strays_if_pending`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::store::{MetaStore, RocksStore, StoreError};

/// Deleted bytes that make a compaction run at the next pass (one blob file's worth).
pub const COMPACT_AFTER_BYTES: u64 = 256 << 20;
/// Longest time between two passes, whatever the grace.
const MAX_PASS_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest time between two passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);

/// How the collector runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long an unreferenced chunk is kept.
    pub grace: Duration,
    /// How long a tombstone record is kept.
    pub tombstone_retention: Duration,
}

/// Time between passes: a quarter of the grace, so a chunk goes at most a quarter grace late,
/// within [`MIN_PASS_INTERVAL`]..=[`MAX_PASS_INTERVAL`].
pub fn pass_interval(grace: Duration) -> Duration {
    (grace / 4).clamp(MIN_PASS_INTERVAL, MAX_PASS_INTERVAL)
}

/// Shortest time between two compactions that smaller deletions wait for: the grace, at
/// least a second and at most ten minutes.
pub fn compact_every(grace: Duration) -> Duration {
    grace.clamp(Duration::from_secs(1), Duration::from_secs(600))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch, `age` ago.
fn ms_ago(age: Duration) -> u64 {
    now_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the deleted bytes still waiting for a compaction warrant one now.
fn compaction_due(waiting_bytes: u64, since_last: Option<Duration>, every: Duration) -> bool {
    waiting_bytes > 0
        && (waiting_bytes >= COMPACT_AFTER_BYTES || since_last.is_none_or(|t| t >= every))
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub deleted_chunks: u64,
    pub deleted_bytes: u64,
    /// Chunk file bytes before and after a compaction, if one ran.
    pub compacted: Option<(u64, u64)>,
    pub tombstones_expired: u64,
    /// Stray chunk files removed (the first pass after an unclean shutdown).
    pub strays_removed: Option<u64>,
}

/// The collector of one node.
#[derive(Debug)]
pub struct Collector {
    store: Arc<RocksStore>,
    metrics: Metrics,
    settings: Settings,
    /// Deleted bytes no compaction has dealt with yet.
    uncompacted: u64,
    last_compaction: Option<Instant>,
}

impl Collector {
    pub fn new(store: Arc<RocksStore>, metrics: Metrics, settings: Settings) -> Self {
        Self {
            store,
            metrics,
            settings,
            uncompacted: 0,
            last_compaction: None,
        }
    }

    /// One pass; blocks (run it on the blocking pool).
    pub fn pass(&mut self) -> Result<Pass, StoreError> {
        let strays_removed = self.store.sweep_strays_if_pending()?;
        let collected = self.store.collect_garbage(ms_ago(self.settings.grace))?;
        let freed = collected.freed;
        self.metrics.gc_pass(
            freed.chunks,
            freed.bytes,
            (collected.waiting_chunks, collected.waiting_bytes),
        );
        self.uncompacted += freed.bytes;
        let mut pass = Pass {
            deleted_chunks: freed.chunks,
            deleted_bytes: freed.bytes,
            strays_removed,
            ..Pass::default()
        };
        let since_last = self.last_compaction.map(|t| t.elapsed());
        if compaction_due(
            self.uncompacted,
            since_last,
            compact_every(self.settings.grace),
        ) {
            let (before, after) = self.store.compact_chunks()?;
            self.metrics.gc_compacted(before, after);
            self.uncompacted = 0;
            self.last_compaction = Some(Instant::now());
            pass.compacted = Some((before, after));
        }
        pass.tombstones_expired = self
            .store
            .expire_tombstones(ms_ago(self.settings.tombstone_retention))?;
        self.metrics
            .tombstones_expired()
            .increment(pass.tombstones_expired);
        Ok(pass)
    }

    /// Runs passes until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(pass_interval(self.settings.grace));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut collector = Some(self);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(mut this) = collector.take() else {
                return;
            };
            let done = tokio::task::spawn_blocking(move || {
                let result = this.pass();
                (this, result)
            })
            .await;
            let Ok((this, result)) = done else {
                warn!("a garbage collection pass panicked; the collector stops");
                return;
            };
            match result {
                Ok(pass) => log_pass(&pass),
                Err(e) => warn!(error = %e, "garbage collection pass failed; retrying at the next"),
            }
            collector = Some(this);
        }
    }
}

fn log_pass(pass: &Pass) {
    if pass.deleted_chunks > 0 {
        info!(
            chunks = pass.deleted_chunks,
            bytes = pass.deleted_bytes,
            "deleted unreferenced chunks after their grace"
        );
    }
    if let Some((before, after)) = pass.compacted {
        info!(
            before,
            after,
            reclaimed = before.saturating_sub(after),
            "compacted the chunk files"
        );
    }
    if pass.tombstones_expired > 0 {
        debug!(
            count = pass.tombstones_expired,
            "dropped tombstones past their retention"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_first_pass_after_an_unclean_shutdown_sweeps_stray_chunk_files() {
        let dir = tempfile::tempdir().unwrap();
        // A new store counts as not closed cleanly: nothing to remove, but the sweep runs.
        let store = RocksStore::open(dir.path(), &crate::store::Config::default()).unwrap();
        let stray = dir
            .path()
            .join("chunk-files")
            .join("ab")
            .join(mesh_proto::ChunkId::from_bytes([0xab; 32]).to_string());
        std::fs::write(&stray, b"left by a crash").unwrap();
        let settings = Settings {
            grace: Duration::from_secs(3600),
            tombstone_retention: Duration::from_secs(3600),
        };
        let mut collector = Collector::new(Arc::clone(&store), Metrics::new(), settings);
        assert_eq!(collector.pass().unwrap().strays_removed, Some(1));
        assert!(!stray.exists());
        assert_eq!(collector.pass().unwrap().strays_removed, None);
    }

    #[test]
    fn passes_come_a_quarter_grace_apart_within_bounds() {
        assert_eq!(pass_interval(Duration::from_secs(3600)), MAX_PASS_INTERVAL);
        assert_eq!(
            pass_interval(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(pass_interval(Duration::ZERO), MIN_PASS_INTERVAL);
    }

    #[test]
    fn a_compaction_waits_for_deleted_bytes_and_then_for_time_or_volume() {
        let every = Duration::from_secs(600);
        assert!(!compaction_due(0, None, every));
        assert!(compaction_due(1, None, every), "the first one runs at once");
        assert!(!compaction_due(
            1 << 20,
            Some(Duration::from_secs(5)),
            every
        ));
        assert!(compaction_due(1 << 20, Some(every), every));
        assert!(compaction_due(
            COMPACT_AFTER_BYTES,
            Some(Duration::from_secs(5)),
            every
        ));
        assert_eq!(compact_every(Duration::from_secs(3600)), every);
        assert_eq!(compact_every(Duration::ZERO), Duration::from_secs(1));
    }
}
