//! Per-node Prometheus metrics.
//!
//! Each node owns its own recorder instead of installing the process-wide one, so that tests can
//! run several nodes in one process without mixing their figures. Handles to the hot counters
//! are registered once; labelled series are registered on first use. Gauges that mirror the
//! store (objects, chunks, bytes) are refreshed when `/metrics` is scraped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

static METADATA: Metadata<'static> = Metadata::new("mesh_node", Level::INFO, Some(module_path!()));

/// Latency buckets (seconds) for request histograms: 1 ms to 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The node's metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub puts: Counter,
    pub put_bytes: Counter,
    pub dedup_bytes: Counter,
    pub gets: Counter,
    pub get_bytes: Counter,
    pub deletes: Counter,
    pub corrupt_chunks: Counter,
    pub aborted_uploads: Counter,
    pub bad_peer_data: Counter,
    pub get_remote_bytes: Counter,
    pub delivered_chunks: Counter,
    copied_chunks: Counter,
    pub hedged_fetches: Counter,
    pub deliveries_abandoned: Counter,
    rebuilt_shards: Counter,
    repair_bytes: Counter,
    repaired_parts: Counter,
    below_target: Gauge,
    repair_backlog: Gauge,
    repair_seconds: Gauge,
    served_chunks: Counter,
    served_bytes: Counter,
    /// The served totals again, readable for `status` (Prometheus counters are write-only).
    served_totals: [AtomicU64; 2],
    gc_deleted_chunks: Counter,
    gc_deleted_bytes: Counter,
    gc_compactions: Counter,
    gc_reclaimed_bytes: Counter,
    tombstones_expired: Counter,
    tombstones_abandoned: Counter,
    gc_pending_chunks: Gauge,
    gc_pending_bytes: Gauge,
    /// The GC backlog of the last pass (chunks, bytes), readable for `status`.
    gc_backlog: [AtomicU64; 2],
    objects: Gauge,
    chunks: Gauge,
    stored_bytes: Gauge,
    disk_free_bytes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            // The bucket list is a non-empty constant, so the builder accepts it.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Unit, help: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), Some(unit), help.into());
        };
        describe(
            "mesh_puts_total",
            Unit::Count,
            "objects stored through the API",
        );
        describe(
            "mesh_put_bytes_total",
            Unit::Bytes,
            "bytes received in puts",
        );
        describe(
            "mesh_dedup_bytes_total",
            Unit::Bytes,
            "bytes of put chunks that were already stored",
        );
        describe("mesh_gets_total", Unit::Count, "object downloads started");
        describe(
            "mesh_get_bytes_total",
            Unit::Bytes,
            "bytes sent in downloads",
        );
        describe("mesh_deletes_total", Unit::Count, "objects deleted");
        describe(
            "mesh_corrupt_chunks_total",
            Unit::Count,
            "chunk reads that failed verification",
        );
        describe(
            "mesh_aborted_uploads_total",
            Unit::Count,
            "uploads that ended before committing",
        );
        describe(
            "mesh_peer_bad_chunks_total",
            Unit::Count,
            "chunks, manifests or records from peers that failed verification",
        );
        describe(
            "mesh_get_remote_bytes_total",
            Unit::Bytes,
            "chunk bytes fetched from other nodes",
        );
        describe(
            "mesh_background_chunks_total",
            Unit::Count,
            "chunks sent to holders beyond the write quorum after a put returned",
        );
        describe(
            "mesh_hedged_fetches_total",
            Unit::Count,
            "chunk fetches also asked of a second holder because the first was slow",
        );
        describe(
            HOLE_PUNCHES,
            Unit::Count,
            "relayed connections DCUtR upgraded to direct ones (result=succeeded) or could not (result=failed)",
        );
        describe(
            "mesh_background_abandoned_total",
            Unit::Count,
            "holders the background completion gave up on (left to repair)",
        );
        describe(
            "mesh_rebuilt_shards_total",
            Unit::Count,
            "erasure-coded shards rebuilt from other shards",
        );
        describe(
            "mesh_repair_bytes_total",
            Unit::Bytes,
            "bytes repair sent to new holders",
        );
        describe(
            "mesh_repaired_parts_total",
            Unit::Count,
            "replicas and shards repair re-created on new holders",
        );
        describe(
            "mesh_served_chunks_total",
            Unit::Count,
            "chunks sent to peers that fetched them",
        );
        describe(
            "mesh_served_bytes_total",
            Unit::Bytes,
            "chunk bytes sent to peers that fetched them",
        );
        describe(
            "mesh_gc_deleted_chunks_total",
            Unit::Count,
            "unreferenced chunks the garbage collection deleted after their grace",
        );
        describe(
            "mesh_gc_deleted_bytes_total",
            Unit::Bytes,
            "bytes of the chunks the garbage collection deleted",
        );
        describe(
            "mesh_gc_compactions_total",
            Unit::Count,
            "compactions of the chunk files after a garbage collection",
        );
        describe(
            "mesh_gc_reclaimed_bytes_total",
            Unit::Bytes,
            "bytes of chunk files (blob and SST) those compactions gave back to the disk",
        );
        describe(
            "mesh_tombstones_expired_total",
            Unit::Count,
            "tombstone records dropped after their retention",
        );
        describe(
            "mesh_tombstone_deliveries_abandoned_total",
            Unit::Count,
            "holders a delete stopped trying to tell (their tombstone retention ran out)",
        );
        describe(
            "mesh_copied_chunks_total",
            Unit::Count,
            "replicas this node fetched from a holder and stored because a repairer or writer \
             asked it to (`Copy`), instead of being sent them",
        );
        describe(
            "mesh_api_errors_total",
            Unit::Count,
            "control-API requests answered with an error, by code",
        );
        describe_scrub(&recorder);
        recorder.describe_histogram(
            KeyName::from_const_str("mesh_api_request_duration_seconds"),
            Some(Unit::Seconds),
            "control-API request latency by route".into(),
        );
        for (name, help) in [
            ("mesh_objects", "objects stored on this node"),
            ("mesh_chunks", "chunks stored on this node"),
            ("mesh_stored_bytes", "bytes of chunks stored on this node"),
            (
                "mesh_gc_pending_chunks",
                "unreferenced chunks waiting out gc_grace (as of the last pass)",
            ),
            (
                "mesh_gc_pending_bytes",
                "bytes of the chunks waiting out gc_grace",
            ),
            (
                "mesh_disk_free_bytes",
                "free space on the data directory's file system",
            ),
            (
                "mesh_objects_below_target",
                "objects this node repairs that have fewer live holders than their policy wants",
            ),
            (
                "mesh_repair_backlog_objects",
                "objects queued for repair on this node",
            ),
            (
                "mesh_repair_last_duration_seconds",
                "time from a holder being declared dead to its objects being repaired, last repair",
            ),
        ] {
            recorder.describe_gauge(KeyName::from_const_str(name), None, help.into());
        }
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        let inner = Inner {
            puts: counter("mesh_puts_total"),
            put_bytes: counter("mesh_put_bytes_total"),
            dedup_bytes: counter("mesh_dedup_bytes_total"),
            gets: counter("mesh_gets_total"),
            get_bytes: counter("mesh_get_bytes_total"),
            deletes: counter("mesh_deletes_total"),
            corrupt_chunks: counter("mesh_corrupt_chunks_total"),
            aborted_uploads: counter("mesh_aborted_uploads_total"),
            bad_peer_data: counter("mesh_peer_bad_chunks_total"),
            get_remote_bytes: counter("mesh_get_remote_bytes_total"),
            delivered_chunks: counter("mesh_background_chunks_total"),
            copied_chunks: counter("mesh_copied_chunks_total"),
            hedged_fetches: counter("mesh_hedged_fetches_total"),
            deliveries_abandoned: counter("mesh_background_abandoned_total"),
            rebuilt_shards: counter("mesh_rebuilt_shards_total"),
            repair_bytes: counter("mesh_repair_bytes_total"),
            repaired_parts: counter("mesh_repaired_parts_total"),
            below_target: gauge("mesh_objects_below_target"),
            repair_backlog: gauge("mesh_repair_backlog_objects"),
            repair_seconds: gauge("mesh_repair_last_duration_seconds"),
            served_chunks: counter("mesh_served_chunks_total"),
            served_bytes: counter("mesh_served_bytes_total"),
            served_totals: [AtomicU64::new(0), AtomicU64::new(0)],
            gc_deleted_chunks: counter("mesh_gc_deleted_chunks_total"),
            gc_deleted_bytes: counter("mesh_gc_deleted_bytes_total"),
            gc_compactions: counter("mesh_gc_compactions_total"),
            gc_reclaimed_bytes: counter("mesh_gc_reclaimed_bytes_total"),
            tombstones_expired: counter("mesh_tombstones_expired_total"),
            tombstones_abandoned: counter("mesh_tombstone_deliveries_abandoned_total"),
            gc_pending_chunks: gauge("mesh_gc_pending_chunks"),
            gc_pending_bytes: gauge("mesh_gc_pending_bytes"),
            gc_backlog: [AtomicU64::new(0), AtomicU64::new(0)],
            objects: gauge("mesh_objects"),
            chunks: gauge("mesh_chunks"),
            stored_bytes: gauge("mesh_stored_bytes"),
            disk_free_bytes: gauge("mesh_disk_free_bytes"),
            handle,
            recorder,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn puts(&self) -> &Counter {
        &self.inner.puts
    }
    pub fn put_bytes(&self) -> &Counter {
        &self.inner.put_bytes
    }
    pub fn dedup_bytes(&self) -> &Counter {
        &self.inner.dedup_bytes
    }
    pub fn gets(&self) -> &Counter {
        &self.inner.gets
    }
    pub fn get_bytes(&self) -> &Counter {
        &self.inner.get_bytes
    }
    pub fn deletes(&self) -> &Counter {
        &self.inner.deletes
    }
    pub fn corrupt_chunks(&self) -> &Counter {
        &self.inner.corrupt_chunks
    }
    pub fn aborted_uploads(&self) -> &Counter {
        &self.inner.aborted_uploads
    }
    pub fn bad_peer_data(&self) -> &Counter {
        &self.inner.bad_peer_data
    }
    pub fn get_remote_bytes(&self) -> &Counter {
        &self.inner.get_remote_bytes
    }
    pub fn delivered_chunks(&self) -> &Counter {
        &self.inner.delivered_chunks
    }
    pub fn copied_chunks(&self) -> &Counter {
        &self.inner.copied_chunks
    }
    pub fn rebuilt_shards(&self) -> &Counter {
        &self.inner.rebuilt_shards
    }
    pub fn repair_bytes(&self) -> &Counter {
        &self.inner.repair_bytes
    }
    pub fn repaired_parts(&self) -> &Counter {
        &self.inner.repaired_parts
    }
    pub fn below_target(&self) -> &Gauge {
        &self.inner.below_target
    }
    pub fn repair_backlog(&self) -> &Gauge {
        &self.inner.repair_backlog
    }
    pub fn repair_seconds(&self) -> &Gauge {
        &self.inner.repair_seconds
    }
    /// A chunk of `bytes` sent to a peer that fetched it.
    pub fn served(&self, bytes: u64) {
        self.inner.served_chunks.increment(1);
        self.inner.served_bytes.increment(bytes);
        self.inner.served_totals[0].fetch_add(1, Ordering::Relaxed);
        self.inner.served_totals[1].fetch_add(bytes, Ordering::Relaxed);
    }
    /// Chunks and bytes served to peers since the node started.
    pub fn served_totals(&self) -> (u64, u64) {
        let [chunks, bytes] = &self.inner.served_totals;
        (
            chunks.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        )
    }
    pub fn hedged_fetches(&self) -> &Counter {
        &self.inner.hedged_fetches
    }
    pub fn deliveries_abandoned(&self) -> &Counter {
        &self.inner.deliveries_abandoned
    }

    /// One garbage collection pass: what it deleted and what still waits out the grace.
    pub fn gc_pass(&self, deleted_chunks: u64, deleted_bytes: u64, waiting: (u64, u64)) {
        let inner = &self.inner;
        inner.gc_deleted_chunks.increment(deleted_chunks);
        inner.gc_deleted_bytes.increment(deleted_bytes);
        inner.gc_pending_chunks.set(waiting.0 as f64);
        inner.gc_pending_bytes.set(waiting.1 as f64);
        inner.gc_backlog[0].store(waiting.0, Ordering::Relaxed);
        inner.gc_backlog[1].store(waiting.1, Ordering::Relaxed);
    }
    /// Unreferenced chunks and bytes waiting out the grace, as of the last pass.
    pub fn gc_backlog(&self) -> (u64, u64) {
        let [chunks, bytes] = &self.inner.gc_backlog;
        (
            chunks.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        )
    }
    /// A compaction after a garbage collection, with the chunk files' bytes around it.
    pub fn gc_compacted(&self, before: u64, after: u64) {
        self.inner.gc_compactions.increment(1);
        self.inner
            .gc_reclaimed_bytes
            .increment(before.saturating_sub(after));
    }
    pub fn tombstones_expired(&self) -> &Counter {
        &self.inner.tombstones_expired
    }
    pub fn tombstone_deliveries_abandoned(&self) -> &Counter {
        &self.inner.tombstones_abandoned
    }

    /// A counter registered on first use (the job service's `mesh_job_*_total`).
    pub fn counter(&self, name: &'static str) -> Counter {
        self.inner
            .recorder
            .register_counter(&Key::from_static_name(name), &METADATA)
    }
    /// A gauge registered on first use, with one label.
    pub fn gauge(&self, name: &'static str, label: Option<(&'static str, &'static str)>) -> Gauge {
        let key = match label {
            Some((k, v)) => Key::from_parts(name, vec![Label::new(k, v)]),
            None => Key::from_static_name(name),
        };
        self.inner.recorder.register_gauge(&key, &METADATA)
    }

    /// Counts an error answer with its code.
    pub fn api_error(&self, code: &'static str) {
        let key = Key::from_parts("mesh_api_errors_total", vec![Label::new("code", code)]);
        self.inner
            .recorder
            .register_counter(&key, &METADATA)
            .increment(1);
    }

    /// Records one request's latency under its route.
    pub fn request_latency(&self, route: String, elapsed: Duration) {
        let key = Key::from_parts(
            "mesh_api_request_duration_seconds",
            vec![Label::new("route", route)],
        );
        let histogram: Histogram = self.inner.recorder.register_histogram(&key, &METADATA);
        histogram.record(elapsed.as_secs_f64());
    }

    /// Mirrors the network task's hole punching totals (see `net::NetStatus`).
    pub fn set_hole_punches(&self, succeeded: u64, failed: u64) {
        for (result, total) in [("succeeded", succeeded), ("failed", failed)] {
            let key = Key::from_parts(HOLE_PUNCHES, vec![Label::new("result", result)]);
            self.inner
                .recorder
                .register_counter(&key, &METADATA)
                .absolute(total);
        }
    }

    /// Sets the gauges that mirror the store.
    pub fn set_store_gauges(&self, objects: u64, chunks: u64, bytes: u64, disk_free: u64) {
        self.inner.objects.set(objects as f64);
        self.inner.chunks.set(chunks as f64);
        self.inner.stored_bytes.set(bytes as f64);
        self.inner.disk_free_bytes.set(disk_free as f64);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Drains histogram buffers; run every few seconds.
    pub fn upkeep(&self) {
        self.inner.handle.run_upkeep();
    }
}

const HOLE_PUNCHES: &str = "mesh_hole_punches_total";
const SCRUB_CHECKED_CHUNKS: &str = "mesh_scrub_checked_chunks_total";
const SCRUB_CHECKED_BYTES: &str = "mesh_scrub_checked_bytes_total";
const SCRUB_CORRUPT: &str = "mesh_scrub_corrupt_chunks_total";
const SCRUB_REPAIRED: &str = "mesh_scrub_repaired_chunks_total";
const SCRUB_QUARANTINED: &str = "mesh_scrub_quarantined_chunks";

fn describe_scrub(recorder: &PrometheusRecorder) {
    for (name, unit, help) in [
        (
            SCRUB_CHECKED_CHUNKS,
            Unit::Count,
            "stored chunks the scrubber re-hashed",
        ),
        (
            SCRUB_CHECKED_BYTES,
            Unit::Bytes,
            "stored bytes the scrubber re-hashed",
        ),
        (
            SCRUB_CORRUPT,
            Unit::Count,
            "stored chunks the scrubber found corrupt and quarantined",
        ),
        (
            SCRUB_REPAIRED,
            Unit::Count,
            "quarantined chunks replaced with verified bytes from another holder",
        ),
    ] {
        recorder.describe_counter(KeyName::from_const_str(name), Some(unit), help.into());
    }
    recorder.describe_gauge(
        KeyName::from_const_str(SCRUB_QUARANTINED),
        Some(Unit::Count),
        "chunks in quarantine: corrupt here and not replaced yet".into(),
    );
}

/// The scrubber's figures (see [`crate::scrub`]); registered on first use, as they change a
/// few times a second at most.
impl Metrics {
    fn scrub_counter(&self, name: &'static str) -> Counter {
        self.inner
            .recorder
            .register_counter(&Key::from_static_name(name), &METADATA)
    }

    /// A scrub batch re-hashed `chunks` chunks of `bytes` bytes.
    pub fn scrub_checked(&self, chunks: u64, bytes: u64) {
        self.scrub_counter(SCRUB_CHECKED_CHUNKS).increment(chunks);
        self.scrub_counter(SCRUB_CHECKED_BYTES).increment(bytes);
    }

    pub fn scrub_corrupt(&self) {
        self.scrub_counter(SCRUB_CORRUPT).increment(1);
    }

    pub fn scrub_repaired(&self) {
        self.scrub_counter(SCRUB_REPAIRED).increment(1);
    }

    pub fn set_scrub_quarantined(&self, chunks: u64) {
        self.inner
            .recorder
            .register_gauge(&Key::from_static_name(SCRUB_QUARANTINED), &METADATA)
            .set(chunks as f64);
    }
}
