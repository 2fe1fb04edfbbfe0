//! The scrubber: a background worker that re-hashes every stored chunk at a bounded rate and
//! replaces the ones whose bytes went bad.
//!
//! A *pass* walks the `chunks` column family in key order in small batches
//! ([`RocksStore::scrub_batch`]: values are hashed where RocksDB holds them, so memory stays
//! flat whatever the store's size), paced by a token bucket ([`Pacer`]) at
//! `durability.scrub_rate` bytes per second. After every batch the cursor (the last key
//! checked) and the pass's counters are written to the store together, so a restarted node
//! resumes the pass where it stopped instead of starting over. A pass starts
//! `durability.scrub_interval` after the previous one started (at once if that is overdue when
//! the node starts), or when an operator asks for one (`meshctl scrub --now`, which goes
//! through [`Handle::request_pass`]).
//!
//! A chunk whose bytes no longer hash to its id is quarantined by the store in the same step:
//! its bytes are dropped and no read can return them; reads go to other holders as for a
//! chunk this node lacks. The worker then finds which local objects use the chunk
//! ([`RocksStore::part_uses`]), asks the mesh for a verified copy of that part (fetched from
//! another holder, or for an erasure shard rebuilt from other shards), and writes it back
//! verified. A chunk nobody can supply stays quarantined and is tried again at the start of
//! every later pass; the count shows in `meshctl status`, in `/metrics` and in a warning.
//!
//! Ownership: the worker ([`run`]) is the only writer of the scrub state; the [`Handle`]
//! shares that state with the control API for status and for starting a pass.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_proto::ChunkId;
use mesh_proto::api::{ScrubPass, ScrubStatus};
use mesh_proto::wire::PlacementRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DurabilityConfig;
use crate::metrics::Metrics;
use crate::replicate::Mesh;
use crate::store::rocks::scrub::{PartUse, Restored};
use crate::store::{MetaStore, RocksStore, StoreError};

/// Most chunks one batch visits (small chunks would otherwise make a batch long).
const BATCH_CHUNKS: usize = 1024;
/// The token bucket refills this many batches' worth of bytes per second, so a pass persists
/// its cursor a few times a second at most and pauses are short.
const BATCHES_PER_SEC: f64 = 4.0;
/// Largest batch, whatever the rate.
const MAX_BATCH_BYTES: f64 = 64.0 * 1024.0 * 1024.0;
/// Local objects asked about a corrupt chunk: one good source is enough.
const MAX_USES: usize = 4;
/// Quarantined chunks read per page when a pass retries them.
const QUARANTINE_PAGE: usize = 64;
/// Longest one attempt to obtain a good copy may take.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the idle worker sleeps before it looks at the clock again.
const MAX_IDLE: Duration = Duration::from_secs(3600);
/// Pause after a pass failed on a store error.
const FAILURE_PAUSE: Duration = Duration::from_secs(60);
/// Version of the persisted [`State`].
const STATE_VERSION: u8 = 1;

/// A token bucket in bytes: a batch may start when the bucket is not in debt, and its bytes
/// are taken after it ran (a batch reads whole chunks, so it may overshoot its budget).
/// Over any span `t`, at most `burst + rate * t` plus one batch's overshoot pass.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// A full bucket for `rate` bytes per second (at least 1).
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / BATCHES_PER_SEC).clamp(1.0, MAX_BATCH_BYTES);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Bytes the next batch should read.
    pub fn budget(&self) -> u64 {
        self.burst as u64
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let elapsed = (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            self.last = now;
        }
    }

    /// How long to wait before the next batch may start.
    pub fn delay(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes `bytes` a batch read.
    pub fn spend(&mut self, now: Instant, bytes: u64) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }
}

/// One pass, as persisted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    started_ms: u64,
    finished_ms: Option<u64>,
    chunks: u64,
    bytes: u64,
    corrupt: u64,
    repaired: u64,
}

/// What the scrubber keeps in the store: the pass in progress (or the last one), where it
/// stands, and totals since the store was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    pass: Option<PassState>,
    /// The last chunk the pass checked; the next batch starts after it.
    cursor: Option<ChunkId>,
    last_finished_ms: Option<u64>,
    corrupt_total: u64,
    repaired_total: u64,
    passes_completed: u64,
}

fn state_codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<4096>()
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        // A struct of integers and ids always encodes within the limit.
        out.extend(bincode::serde::encode_to_vec(self, state_codec()).unwrap_or_default());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&STATE_VERSION, rest)) => bincode::serde::decode_from_slice(rest, state_codec())
                .map(|(state, _)| state)
                .map_err(|e| e.to_string()),
            Some((v, _)) => Err(format!("unknown scrub state version {v}")),
            None => Err("empty scrub state".into()),
        }
    }

    fn running(&self) -> bool {
        self.pass.is_some_and(|p| p.finished_ms.is_none())
    }

    /// Opens a new pass from the first chunk.
    fn begin(&mut self, now_ms: u64) {
        self.pass = Some(PassState {
            started_ms: now_ms,
            ..PassState::default()
        });
        self.cursor = None;
    }

    /// Counts a batch and moves the cursor past it.
    fn checked(&mut self, chunks: u64, bytes: u64, last: Option<ChunkId>) {
        if let Some(pass) = &mut self.pass {
            pass.chunks += chunks;
            pass.bytes += bytes;
        }
        if last.is_some() {
            self.cursor = last;
        }
    }

    fn corrupt(&mut self) {
        if let Some(pass) = &mut self.pass {
            pass.corrupt += 1;
        }
        self.corrupt_total += 1;
    }

    fn repaired(&mut self) {
        if let Some(pass) = &mut self.pass {
            pass.repaired += 1;
        }
        self.repaired_total += 1;
    }

    fn finish(&mut self, now_ms: u64) {
        if let Some(pass) = &mut self.pass {
            pass.finished_ms = Some(now_ms);
        }
        self.cursor = None;
        self.last_finished_ms = Some(now_ms);
        self.passes_completed += 1;
    }
}

/// When the next pass should start (ms since the Unix epoch): `None` while one runs
/// (resume it), 0 when there never was one.
fn next_pass_at(state: &State, interval: Duration) -> Option<u64> {
    match state.pass {
        None => Some(0),
        Some(pass) if pass.finished_ms.is_none() => None,
        Some(pass) => Some(
            pass.started_ms
                .saturating_add(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)),
        ),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why a pass could not be started on request.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error(
        "scrubbing is off on this node (durability.scrub_rate = 0); set a rate such as \"4MiB\" and restart meshd"
    )]
    Off,
}

/// The scrubber's shared side: its state, its settings and the nudge that starts a pass.
#[derive(Debug, Clone)]
pub struct Handle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Arc<RocksStore>,
    rate: u64,
    interval: Duration,
    state: Mutex<State>,
    wake: Notify,
}

impl Handle {
    /// Loads the persisted state (blocking). An unreadable state is logged and replaced: it
    /// only costs a fresh pass.
    pub fn open(store: Arc<RocksStore>, config: &DurabilityConfig) -> Result<Self, StoreError> {
        let state = match store.scrub_state()? {
            None => State::default(),
            Some(bytes) => State::decode(&bytes).unwrap_or_else(|e| {
                warn!(error = %e, "stored scrub state is unreadable; the next pass starts afresh");
                State::default()
            }),
        };
        Ok(Self {
            inner: Arc::new(Shared {
                store,
                rate: config.scrub_rate.as_u64(),
                interval: config.scrub_interval,
                state: Mutex::new(state),
                wake: Notify::new(),
            }),
        })
    }

    /// Whether a worker runs (`scrub_rate` above 0).
    pub fn enabled(&self) -> bool {
        self.inner.rate > 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a pass now; `Ok(false)` when one is running already (it goes on).
    pub fn request_pass(&self) -> Result<bool, ScrubError> {
        if !self.enabled() {
            return Err(ScrubError::Off);
        }
        {
            let mut state = self.state();
            if state.running() {
                return Ok(false);
            }
            state.begin(now_ms());
        }
        info!("scrub pass requested");
        self.inner.wake.notify_one();
        Ok(true)
    }

    /// The scrubber's progress (blocking: reads two store counters).
    pub fn status(&self) -> Result<ScrubStatus, StoreError> {
        let state = self.state().clone();
        let store = &self.inner.store;
        let enabled = self.enabled();
        Ok(ScrubStatus {
            enabled,
            rate_bytes_per_sec: self.inner.rate,
            interval_secs: self.inner.interval.as_secs(),
            pass: state.pass.map(|p| ScrubPass {
                started_ms: p.started_ms,
                finished_ms: p.finished_ms,
                chunks_checked: p.chunks,
                bytes_checked: p.bytes,
                corrupt: p.corrupt,
                repaired: p.repaired,
            }),
            last_finished_ms: state.last_finished_ms,
            next_pass_ms: next_pass_at(&state, self.inner.interval)
                .filter(|_| enabled)
                .map(|at| at.max(now_ms())),
            chunks_stored: store.stats()?.chunks,
            quarantined: store.quarantined_count()?,
            corrupt_total: state.corrupt_total,
            repaired_total: state.repaired_total,
            passes_completed: state.passes_completed,
        })
    }

    /// Applies `change` to the state and persists the result.
    async fn update(&self, change: impl FnOnce(&mut State)) -> Result<(), StoreError> {
        let encoded = {
            let mut state = self.state();
            change(&mut state);
            state.encode()
        };
        let store = Arc::clone(&self.inner.store);
        blocking(move || store.put_scrub_state(&encoded)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Db(format!("scrub task failed: {e}")))?
}

/// Runs the scrubber until `stop` fires. Start it only when [`Handle::enabled`].
pub async fn run(handle: Handle, mesh: Mesh, metrics: Metrics, stop: CancellationToken) {
    let worker = Worker {
        store: Arc::clone(&handle.inner.store),
        pacer: Pacer::new(handle.inner.rate, Instant::now()),
        handle,
        mesh,
        metrics,
        stop,
    };
    worker.run().await;
}

struct Worker {
    handle: Handle,
    store: Arc<RocksStore>,
    mesh: Mesh,
    metrics: Metrics,
    stop: CancellationToken,
    pacer: Pacer,
}

/// How a quarantined chunk came out of a repair attempt.
#[derive(Debug)]
enum Repair {
    /// Verified bytes were written back.
    Replaced,
    /// Nothing left to do: it was healed or deleted meanwhile.
    Settled,
    /// No object uses it any more; it waits for garbage collection (a put of the same bytes
    /// before that would heal it).
    Unused,
    Failed(String),
}

impl Worker {
    async fn run(mut self) {
        self.refresh_gauge().await;
        loop {
            let next = next_pass_at(&self.handle.state(), self.handle.inner.interval);
            if let Some(at) = next {
                let now = now_ms();
                if at > now {
                    let wait = Duration::from_millis(at - now).min(MAX_IDLE);
                    tokio::select! {
                        biased;
                        () = self.stop.cancelled() => return,
                        () = self.handle.inner.wake.notified() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                    // Woken by a request (which opened a pass) or by the clock: look again.
                    continue;
                }
                let mut state = self.handle.state();
                if !state.running() {
                    state.begin(now);
                }
            }
            if let Err(e) = self.run_pass().await {
                warn!(error = %e, "scrub pass interrupted by a store error; retrying later");
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(FAILURE_PAUSE) => {}
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
        }
    }

    /// Runs (or resumes) the open pass to its end, or until `stop`.
    async fn run_pass(&mut self) -> Result<(), StoreError> {
        let (fresh, started_ms) = {
            let state = self.handle.state();
            let pass = state.pass.unwrap_or_default();
            (state.cursor.is_none() && pass.chunks == 0, pass.started_ms)
        };
        if fresh {
            info!(started_ms, "scrub pass started");
            self.retry_quarantined().await?;
        } else {
            info!(started_ms, "scrub pass resumed");
        }
        loop {
            let delay = self.pacer.delay(Instant::now());
            if !delay.is_zero() {
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            } else if self.stop.is_cancelled() {
                return Ok(());
            }
            let cursor = self.handle.state().cursor;
            let budget = self.pacer.budget();
            let store = Arc::clone(&self.store);
            let batch =
                blocking(move || store.scrub_batch(cursor.as_ref(), budget, BATCH_CHUNKS)).await?;
            self.pacer.spend(Instant::now(), batch.bytes);
            self.metrics.scrub_checked(batch.chunks, batch.bytes);
            let found = batch.quarantined.len();
            self.handle
                .update(|state| {
                    state.checked(batch.chunks, batch.bytes, batch.last);
                    for _ in 0..found {
                        state.corrupt();
                    }
                })
                .await?;
            for _ in 0..found {
                self.metrics.scrub_corrupt();
            }
            if found > 0 {
                self.refresh_gauge().await;
            }
            for id in batch.quarantined {
                self.repair_logged(id).await?;
                if self.stop.is_cancelled() {
                    return Ok(());
                }
            }
            if batch.done {
                let now = now_ms();
                self.handle.update(|state| state.finish(now)).await?;
                let pass = self.handle.state().pass.unwrap_or_default();
                info!(
                    chunks = pass.chunks,
                    bytes = pass.bytes,
                    corrupt = pass.corrupt,
                    repaired = pass.repaired,
                    secs = now.saturating_sub(pass.started_ms) / 1000,
                    "scrub pass finished"
                );
                return Ok(());
            }
        }
    }

    /// Tries again to replace every chunk still quarantined by earlier passes.
    async fn retry_quarantined(&mut self) -> Result<(), StoreError> {
        let mut after: Option<ChunkId> = None;
        loop {
            let store = Arc::clone(&self.store);
            let page = blocking(move || store.quarantined(after.as_ref(), QUARANTINE_PAGE)).await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(*last);
            for (id, _) in page {
                if self.stop.is_cancelled() {
                    return Ok(());
                }
                self.repair_logged(id).await?;
            }
        }
    }

    /// Tries to replace a quarantined chunk, and counts and reports the outcome.
    async fn repair_logged(&mut self, id: ChunkId) -> Result<(), StoreError> {
        match self.repair(id).await? {
            Repair::Replaced => {
                info!(chunk = %id, "replaced a corrupt chunk with a verified copy");
                self.metrics.scrub_repaired();
                self.handle.update(State::repaired).await?;
            }
            Repair::Settled => {
                debug!(chunk = %id, "quarantined chunk was healed or deleted meanwhile")
            }
            Repair::Unused => {
                debug!(chunk = %id, "quarantined chunk is used by no object; left to garbage collection")
            }
            Repair::Failed(reason) => {
                warn!(chunk = %id, %reason, "no good copy of a corrupt chunk yet; it stays quarantined and the next pass tries again");
            }
        }
        self.refresh_gauge().await;
        Ok(())
    }

    async fn repair(&self, id: ChunkId) -> Result<Repair, StoreError> {
        let store = Arc::clone(&self.store);
        if blocking(move || store.settle_quarantined(&id)).await? {
            return Ok(Repair::Settled);
        }
        let store = Arc::clone(&self.store);
        let uses = blocking(move || store.part_uses(&id, MAX_USES)).await?;
        if uses.is_empty() {
            return Ok(Repair::Unused);
        }
        let mut reason = String::new();
        for PartUse { object, index } in uses {
            let store = Arc::clone(&self.store);
            let (manifest, record) =
                blocking(move || Ok((store.manifest(&object)?, store.record(&object)?))).await?;
            let Some((manifest, _)) = manifest else {
                continue;
            };
            let Some(record) = record else {
                reason = format!(
                    "object {object} has no placement record: this node holds its only copy"
                );
                continue;
            };
            let record = match PlacementRecord::decode(&record) {
                Ok(r) => r,
                Err(e) => {
                    reason = format!("the placement record of {object} is unreadable: {e}");
                    continue;
                }
            };
            let attempt = tokio::time::timeout(
                REPAIR_TIMEOUT,
                self.mesh.recover_part(&manifest, &record, index),
            );
            let bytes = tokio::select! {
                biased;
                () = self.stop.cancelled() => return Ok(Repair::Failed("shutting down".into())),
                result = attempt => match result {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(e)) => {
                        reason = format!("part {index} of {object}: {e}");
                        continue;
                    }
                    Err(_) => {
                        reason = format!("part {index} of {object}: no copy within {REPAIR_TIMEOUT:?}");
                        continue;
                    }
                },
            };
            let store = Arc::clone(&self.store);
            match blocking(move || store.restore_chunk(&id, &bytes)).await {
                Ok(Restored::Replaced) => return Ok(Repair::Replaced),
                Ok(Restored::AlreadyGood | Restored::NoLongerStored) => {
                    return Ok(Repair::Settled);
                }
                Err(StoreError::HashMismatch { actual, .. }) => {
                    reason = format!("the copy of part {index} of {object} hashes to {actual}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Repair::Failed(reason))
    }

    async fn refresh_gauge(&self) {
        let store = Arc::clone(&self.store);
        match blocking(move || store.quarantined_count()).await {
            Ok(n) => self.metrics.set_scrub_quarantined(n),
            Err(e) => debug!(error = %e, "cannot read the quarantine count"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_the_long_run_rate_with_whole_chunk_batches() {
        let rate = 4 << 20;
        let start = Instant::now();
        let mut pacer = Pacer::new(rate, start);
        assert_eq!(pacer.budget(), 1 << 20);
        let mut now = start;
        let mut total = 0u64;
        // Batches overshoot their budget by up to a 4 MiB chunk, as a CDC store's would.
        let sizes = [3 << 20, 700 << 10, 4 << 20, 256 << 10, 1 << 20];
        for i in 0..200 {
            now += pacer.delay(now);
            // The amount read by `now` never runs ahead of the bucket by more than a burst
            // and one batch's overshoot.
            let allowed = (1 << 20) as f64 + rate as f64 * (now - start).as_secs_f64();
            assert!(
                total as f64 <= allowed + 0.5,
                "read {total} by {:?}",
                now - start
            );
            let bytes = sizes[i % sizes.len()];
            pacer.spend(now, bytes);
            total += bytes;
        }
        now += pacer.delay(now);
        let achieved = total as f64 / (now - start).as_secs_f64();
        let error = (achieved - rate as f64).abs() / rate as f64;
        assert!(error < 0.02, "{achieved} bytes/s against {rate}");
    }

    #[test]
    fn an_idle_pacer_saves_no_more_than_one_batch() {
        let start = Instant::now();
        let mut pacer = Pacer::new(1 << 20, start);
        let later = start + Duration::from_secs(3600);
        assert_eq!(pacer.delay(later), Duration::ZERO);
        pacer.spend(later, pacer.budget());
        assert_eq!(pacer.delay(later), Duration::ZERO);
        pacer.spend(later, 1 << 20);
        // A second full megabyte right away is 1 s of debt at 1 MiB/s.
        let wait = pacer.delay(later);
        assert!(
            (wait.as_secs_f64() - 1.0).abs() < 1e-6,
            "waits {wait:?} after an idle hour"
        );
    }

    #[test]
    fn tiny_and_huge_rates_keep_sane_batches() {
        let now = Instant::now();
        assert_eq!(Pacer::new(0, now).budget(), 1);
        assert_eq!(Pacer::new(3, now).budget(), 1);
        assert_eq!(Pacer::new(u64::MAX, now).budget(), 64 << 20);
    }

    #[test]
    fn passes_start_on_schedule_and_resume_from_their_cursor() {
        let hour = Duration::from_secs(3600);
        let mut state = State::default();
        assert_eq!(next_pass_at(&state, hour), Some(0), "never scrubbed: now");
        state.begin(10_000);
        assert!(state.running());
        assert_eq!(next_pass_at(&state, hour), None, "running: resume");
        let a = ChunkId::of(b"a");
        state.checked(3, 300, Some(a));
        state.checked(0, 0, None);
        assert_eq!(state.cursor, Some(a), "an empty batch keeps the cursor");
        state.corrupt();
        state.repaired();

        // What a restart reads back is what was written.
        let reread = State::decode(&state.encode()).unwrap();
        assert_eq!(reread, state);
        assert_eq!(reread.cursor, Some(a));
        assert_eq!(next_pass_at(&reread, hour), None);

        state.finish(20_000);
        assert!(!state.running());
        assert_eq!(state.cursor, None);
        assert_eq!(state.last_finished_ms, Some(20_000));
        assert_eq!(state.passes_completed, 1);
        assert_eq!(
            next_pass_at(&state, hour),
            Some(10_000 + 3_600_000),
            "the interval counts from the last pass's start"
        );
        let pass = state.pass.unwrap();
        assert_eq!(
            (pass.chunks, pass.bytes, pass.corrupt, pass.repaired),
            (3, 300, 1, 1)
        );
        state.begin(30_000);
        assert_eq!(state.pass.unwrap().chunks, 0, "a new pass counts afresh");
        assert_eq!((state.corrupt_total, state.repaired_total), (1, 1));
    }

    #[test]
    fn an_unknown_state_version_is_refused() {
        let mut bytes = State::default().encode();
        bytes[0] = 99;
        assert!(State::decode(&bytes).is_err());
        assert!(State::decode(&[]).is_err());
    }
}
