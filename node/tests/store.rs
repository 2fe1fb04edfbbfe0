//! Conformance suite for the store traits, run against the RocksDB store.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_node::store::{ChunkStore, Config, MetaStore, RocksStore, StoreError};
use mesh_proto::{ChunkId, ChunkRef, ChunkerSpec, Manifest, ObjectId, Redundancy};

fn open(dir: &std::path::Path) -> Arc<RocksStore> {
    RocksStore::open(dir, &Config::default()).unwrap()
}

/// A store that keeps every chunk in RocksDB (no chunk files): what the tests of blob files
/// and the write-ahead log need.
fn open_inline(dir: &std::path::Path) -> Arc<RocksStore> {
    let config = Config {
        chunk_files: false,
        ..Config::default()
    };
    RocksStore::open(dir, &config).unwrap()
}

/// Where the store keeps `id`'s chunk file (the layout `rocks::files` documents).
fn chunk_file(dir: &std::path::Path, id: &ChunkId) -> std::path::PathBuf {
    dir.join("chunk-files")
        .join(format!("{:02x}", id.as_bytes()[0]))
        .join(id.to_string())
}

fn manifest_of(chunks: &[&[u8]], created_ms: u64) -> Manifest {
    let refs = chunks
        .iter()
        .map(|c| ChunkRef {
            id: ChunkId::of(c),
            len: c.len() as u32,
        })
        .collect();
    Manifest::new(
        Some("t".into()),
        ChunkerSpec::Fixed { size: 1 << 20 },
        Redundancy::DEFAULT,
        refs,
        BTreeMap::new(),
        created_ms,
    )
    .unwrap()
}

fn put_object<S: ChunkStore + MetaStore>(store: &S, chunks: &[&[u8]], created_ms: u64) -> ObjectId {
    for c in chunks {
        store.put_chunk(c).unwrap();
    }
    store
        .commit_object(&manifest_of(chunks, created_ms))
        .unwrap()
}

fn chunk_contract<S: ChunkStore>(store: &S) {
    let data = vec![7u8; 200_000];
    let stored = store.put_chunk(&data).unwrap();
    assert!(stored.new);
    assert_eq!(stored.id, ChunkId::of(&data));
    assert!(
        !store.put_chunk(&data).unwrap().new,
        "a second put deduplicates"
    );
    assert_eq!(store.get_chunk(&stored.id).unwrap().unwrap(), data);
    assert!(store.has_chunk(&stored.id).unwrap());

    let small = b"small chunk".to_vec();
    let id = ChunkId::of(&small);
    assert_eq!(store.put_chunk_verified(&id, &small).unwrap().id, id);

    let wrong = ChunkId::of(b"something else");
    match store.put_chunk_verified(&wrong, b"bytes") {
        Err(StoreError::HashMismatch { claimed, actual }) => {
            assert_eq!(claimed, wrong);
            assert_eq!(actual, ChunkId::of(b"bytes"));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    assert!(!store.has_chunk(&wrong).unwrap());
    assert!(store.get_chunk(&wrong).unwrap().is_none());
}

fn meta_contract<S: ChunkStore + MetaStore>(store: &S) {
    let shared = vec![1u8; 100_000];
    let only_a = vec![2u8; 70_000];
    let only_b = vec![3u8; 90_000];
    // Earlier contracts may have left unreferenced chunks; start from none.
    store.collect_garbage(u64::MAX).unwrap();
    let before = store.stats().unwrap();
    let a = put_object(store, &[&shared, &only_a, &shared], 1);
    let b = put_object(store, &[&only_b, &shared], 2);
    let stats = store.stats().unwrap();
    assert_eq!(stats.objects - before.objects, 2);
    assert_eq!(
        stats.chunks - before.chunks,
        3,
        "the shared chunk is stored once"
    );
    assert_eq!(stats.bytes - before.bytes, 260_000);

    let (m, bytes) = store.manifest(&a).unwrap().unwrap();
    assert_eq!(ObjectId::of(&bytes), a);
    assert_eq!(m.size, 270_000);
    assert_eq!(store.object(&b).unwrap().unwrap().size, 190_000);
    assert_eq!(
        store.commit_object(&m).unwrap(),
        a,
        "committing twice is a no-op"
    );
    assert_eq!(store.stats().unwrap().objects - before.objects, 2);

    let listed: Vec<ObjectId> = store
        .list_objects(None, 100)
        .unwrap()
        .iter()
        .map(|o| o.id)
        .collect();
    assert!(listed.contains(&a) && listed.contains(&b));
    let first = store.list_objects(None, 1).unwrap();
    let rest = store.list_objects(Some(&first[0].id), 100).unwrap();
    assert!(rest.iter().all(|o| o.id > first[0].id));

    let freed = store.delete_object(&a).unwrap().unwrap();
    assert_eq!(
        (freed.chunks, freed.bytes),
        (1, 70_000),
        "only the unshared chunk is released"
    );
    assert!(store.has_chunk(&ChunkId::of(&shared)).unwrap());
    assert!(
        store.has_chunk(&ChunkId::of(&only_a)).unwrap(),
        "a released chunk waits for the garbage collection"
    );
    assert!(store.manifest(&a).unwrap().is_none());
    assert!(store.object(&a).unwrap().is_none());
    assert!(store.delete_object(&a).unwrap().is_none());
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!((collected.freed.chunks, collected.freed.bytes), (1, 70_000));
    assert!(store.has_chunk(&ChunkId::of(&shared)).unwrap());
    assert!(!store.has_chunk(&ChunkId::of(&only_a)).unwrap());

    let freed = store.delete_object(&b).unwrap().unwrap();
    assert_eq!((freed.chunks, freed.bytes), (2, 190_000));
    assert_eq!(store.collect_garbage(u64::MAX).unwrap().freed, freed);
    assert_eq!(store.stats().unwrap(), before);
}

fn missing_chunks_are_refused<S: ChunkStore + MetaStore>(store: &S) {
    let m = manifest_of(&[b"never stored"], 3);
    match store.commit_object(&m) {
        Err(StoreError::MissingChunk { chunk, .. }) => {
            assert_eq!(chunk, ChunkId::of(b"never stored"))
        }
        other => panic!("expected a missing chunk, got {other:?}"),
    }
    assert!(store.manifest(&m.object_id()).unwrap().is_none());
}

#[test]
fn rocksdb_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    chunk_contract(&*store);
    meta_contract(&*store);
    missing_chunks_are_refused(&*store);
}

#[test]
fn rocksdb_store_without_blob_files_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        blob_files: false,
        ..Config::default()
    };
    let store = RocksStore::open(dir.path(), &config).unwrap();
    chunk_contract(&*store);
    meta_contract(&*store);
}

#[test]
fn rocksdb_store_without_chunk_files_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_inline(dir.path());
    chunk_contract(&*store);
    meta_contract(&*store);
    missing_chunks_are_refused(&*store);
}

#[test]
fn corrupt_bytes_are_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = vec![9u8; 300_000];
    let id = store.put_chunk(&data).unwrap().id;
    let mut rotten = data.clone();
    rotten[12345] ^= 0x40;
    store.overwrite_chunk_unchecked(&id, &rotten).unwrap();
    match store.get_chunk(&id) {
        Err(StoreError::Corrupt { id: bad, actual }) => {
            assert_eq!(bad, id);
            assert_eq!(actual, ChunkId::of(&rotten));
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn state_survives_reopen_and_orphans_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let kept = vec![4u8; 80_000];
    let id;
    {
        let store = open(dir.path());
        id = put_object(&*store, &[&kept], 5);
        // An upload that never commits: its chunk is an orphan.
        store.put_chunk(&[5u8; 50_000]).unwrap();
        assert_eq!(store.stats().unwrap().chunks, 2);
    }
    let store = open(dir.path());
    assert_eq!(
        store.stats().unwrap().chunks,
        1,
        "the orphan is swept at open"
    );
    assert!(!store.has_chunk(&ChunkId::of(&[5u8; 50_000])).unwrap());
    assert_eq!(store.manifest(&id).unwrap().unwrap().0.size, 80_000);
    assert_eq!(store.get_chunk(&ChunkId::of(&kept)).unwrap().unwrap(), kept);
}

#[test]
fn an_upload_in_progress_keeps_shared_chunks_through_a_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shared = vec![6u8; 120_000];
    let old = put_object(&*store, &[&shared], 6);

    let mut upload = store.begin_upload();
    assert!(
        !upload.put(&shared).unwrap().new,
        "deduplicated against the old object"
    );
    // Deleting the old object releases its last reference while the upload holds the chunk:
    // even a collection with no grace at all leaves it.
    let freed = store.delete_object(&old).unwrap().unwrap();
    assert_eq!(freed.chunks, 1);
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!((collected.freed.chunks, collected.waiting_chunks), (0, 1));
    assert!(store.has_chunk(&ChunkId::of(&shared)).unwrap());
    let new = upload.commit(&manifest_of(&[&shared], 7)).unwrap();
    assert_eq!(store.collect_garbage(u64::MAX).unwrap(), Default::default());
    assert_eq!(
        store.get_chunk(&ChunkId::of(&shared)).unwrap().unwrap(),
        shared
    );
    store.delete_object(&new).unwrap().unwrap();
    store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(store.stats().unwrap().chunks, 0);
}

#[test]
fn an_abandoned_upload_releases_only_its_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shared = vec![8u8; 100_000];
    put_object(&*store, &[&shared], 8);
    {
        let mut upload = store.begin_upload();
        upload.put(&shared).unwrap();
        upload.put(&[9u8; 100_000]).unwrap();
        assert_eq!(store.stats().unwrap().chunks, 2);
    }
    assert_eq!(store.stats().unwrap().chunks, 1);
    assert!(store.has_chunk(&ChunkId::of(&shared)).unwrap());
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    match RocksStore::open(dir.path(), &Config::default()) {
        Err(StoreError::Locked { path, .. }) => {
            assert!(path.contains(&*dir.path().to_string_lossy()))
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
}

#[test]
fn a_placed_object_takes_references_on_chunks_that_arrive_after_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (a, b, c) = (vec![1u8; 70_000], vec![2u8; 70_000], vec![3u8; 70_000]);
    let manifest = manifest_of(&[&a, &b, &c], 9);
    // This node holds chunks 0 and 1; only chunk 0 has arrived when the record does.
    store.put_chunk_verified(&ChunkId::of(&a), &a).unwrap();
    let (id, missing) = store
        .commit_placed(&manifest, b"record-1", &[0, 1], &[])
        .unwrap();
    assert_eq!(missing, vec![ChunkId::of(&b)]);

    // Chunk 1 arrives late, then the same record again: it takes a reference on chunk 1.
    store.put_chunk_verified(&ChunkId::of(&b), &b).unwrap();
    let (_, missing) = store
        .commit_placed(&manifest, b"record-1", &[0, 1], &[])
        .unwrap();
    assert!(missing.is_empty());
    // Applying it once more adds nothing.
    store
        .commit_placed(&manifest, b"record-1", &[0, 1], &[])
        .unwrap();
    assert_eq!(store.record(&id).unwrap().unwrap(), b"record-1");

    // Reopening sweeps unreferenced chunks: both stay, so both are referenced.
    drop(store);
    let store = open(dir.path());
    assert!(store.has_chunk(&ChunkId::of(&a)).unwrap());
    assert!(store.has_chunk(&ChunkId::of(&b)).unwrap());
    // Deleting releases exactly the references taken: both chunks go.
    let freed = store.delete_object(&id).unwrap().unwrap();
    assert_eq!(freed.chunks, 2);
    store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(store.stats().unwrap().chunks, 0);
}

#[test]
fn an_erasure_coded_share_references_the_shards_its_part_indices_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let chunk = vec![4u8; 70_000];
    let mut manifest = manifest_of(&[&chunk], 11);
    manifest.redundancy = Redundancy::Erasure { data: 2, parity: 1 };
    // Three shards of the one chunk; this node holds parts 0 and 2.
    let shards: Vec<Vec<u8>> = (0u8..3).map(|i| vec![i + 10; 35_000]).collect();
    let parts: Vec<ChunkId> = shards.iter().map(|s| ChunkId::of(s)).collect();
    for i in [0, 2] {
        store.put_chunk_verified(&parts[i], &shards[i]).unwrap();
    }
    let (id, missing) = store
        .commit_placed(&manifest, b"record", &[0, 2], &parts)
        .unwrap();
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(store.parts(&id).unwrap(), parts);
    // The chunk itself was never stored here, and is not needed.
    assert!(!store.has_chunk(&ChunkId::of(&chunk)).unwrap());
    drop(store);
    let store = open(dir.path());
    assert!(store.has_chunk(&parts[0]).unwrap() && store.has_chunk(&parts[2]).unwrap());
    let freed = store.delete_object(&id).unwrap().unwrap();
    assert_eq!(freed.chunks, 2);
    assert!(store.parts(&id).unwrap().is_empty());
}

#[test]
fn queued_deliveries_are_listed_in_order_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids: Vec<ObjectId> = (0u8..5).map(|i| ObjectId::of(&[i])).collect();
    for (i, id) in ids.iter().enumerate() {
        store.put_delivery(id, &[i as u8; 3]).unwrap();
    }
    // Orphan candidates share the queue's column family; they must not show up.
    store.put_chunk(&[5u8; 50_000]).unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    let first = store.deliveries(None, 3).unwrap();
    assert_eq!(first.len(), 3);
    let rest = store.deliveries(Some(&first[2].0), 10).unwrap();
    let listed: Vec<ObjectId> = first.iter().chain(&rest).map(|(id, _)| *id).collect();
    assert_eq!(listed, sorted);
    store.delete_delivery(&ids[0]).unwrap();
    assert!(store.delivery(&ids[0]).unwrap().is_none());
    assert_eq!(store.delivery(&ids[1]).unwrap().unwrap(), vec![1u8; 3]);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.deliveries(None, 10).unwrap().len(), 4);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn released_chunks_wait_out_the_grace_and_a_new_reference_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (only_a, shared) = (vec![1u8; 80_000], vec![2u8; 80_000]);
    let a = put_object(&*store, &[&only_a, &shared], 1);
    put_object(&*store, &[&shared], 2);
    let before_delete = now_ms();
    store.delete_object(&a).unwrap().unwrap();

    // Inside the grace: nothing goes, and the candidate is counted as waiting.
    let collected = store.collect_garbage(before_delete - 1).unwrap();
    assert_eq!(collected.freed.chunks, 0);
    assert_eq!(
        (collected.waiting_chunks, collected.waiting_bytes),
        (1, 80_000)
    );
    // A restart does not cut the grace short (unlike an upload's orphans, swept at open).
    drop(store);
    let store = open(dir.path());
    assert!(store.has_chunk(&ChunkId::of(&only_a)).unwrap());

    // Put again within the grace: the chunk is referenced again and survives any collection.
    let c = put_object(&*store, &[&only_a], 3);
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(collected, Default::default());
    assert_eq!(
        store.get_chunk(&ChunkId::of(&only_a)).unwrap().unwrap(),
        only_a
    );

    // Released again: after the grace it goes, the shared chunk stays.
    store.delete_object(&c).unwrap().unwrap();
    let collected = store.collect_garbage(now_ms()).unwrap();
    assert_eq!((collected.freed.chunks, collected.freed.bytes), (1, 80_000));
    assert!(!store.has_chunk(&ChunkId::of(&only_a)).unwrap());
    assert!(store.has_chunk(&ChunkId::of(&shared)).unwrap());
    assert_eq!(store.stats().unwrap().chunks, 1);
}

#[test]
fn a_chunk_stored_again_while_unreferenced_starts_its_grace_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = vec![3u8; 70_000];
    let a = put_object(&*store, &[&data], 1);
    store.delete_object(&a).unwrap().unwrap();
    let released = now_ms();
    // A peer sends the chunk again (its placement record is still on the way), a clock tick
    // after the release.
    while now_ms() <= released {
        std::thread::yield_now();
    }
    store
        .put_chunk_verified(&ChunkId::of(&data), &data)
        .unwrap();
    let collected = store.collect_garbage(released).unwrap();
    assert_eq!((collected.freed.chunks, collected.waiting_chunks), (0, 1));
    assert!(store.has_chunk(&ChunkId::of(&data)).unwrap());
}

fn tombstone_of(id: ObjectId) -> Vec<u8> {
    use mesh_proto::wire::{NodeId, PlacementRecord};
    PlacementRecord {
        object: id,
        version: 2,
        writer: NodeId(vec![1; 38]),
        redundancy: Redundancy::DEFAULT,
        tombstone: true,
        nodes: vec![NodeId(vec![1; 38])],
        holders: Vec::new(),
        parts: Vec::new(),
    }
    .encode()
}

#[test]
fn a_tombstone_removes_the_object_keeps_the_record_and_expires() {
    use mesh_node::store::Queue;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (x, y) = (vec![4u8; 70_000], vec![5u8; 70_000]);
    let manifest = manifest_of(&[&x, &y], 4);
    for c in [&x, &y] {
        store.put_chunk_verified(&ChunkId::of(c), c).unwrap();
    }
    let (id, _) = store
        .commit_placed(&manifest, b"record-1", &[0, 1], &[])
        .unwrap();
    store.put_delivery(&id, b"owed").unwrap();

    let tombstone = tombstone_of(id);
    let released = store
        .apply_tombstone(&id, &tombstone, Some(b"tell them"))
        .unwrap();
    assert_eq!((released.chunks, released.bytes), (2, 140_000));
    assert!(store.manifest(&id).unwrap().is_none());
    assert!(store.object(&id).unwrap().is_none());
    assert!(store.list_objects(None, 10).unwrap().is_empty());
    assert_eq!(store.stats().unwrap().objects, 0);
    assert_eq!(store.record(&id).unwrap().unwrap(), tombstone);
    assert!(
        store.delivery(&id).unwrap().is_none(),
        "the put owes nothing"
    );
    assert_eq!(
        store.queued(Queue::Tombstone, &id).unwrap().unwrap(),
        b"tell them"
    );
    // Applying it again (a second delivery) releases nothing more.
    assert_eq!(
        store.apply_tombstone(&id, &tombstone, None).unwrap(),
        Default::default()
    );

    // A node that never stored the object keeps the tombstone too.
    let other = ObjectId::of(b"never here");
    store
        .apply_tombstone(&other, &tombstone_of(other), None)
        .unwrap();
    assert!(store.record(&other).unwrap().is_some());

    // The records outlive a restart, and go once their retention is over.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.expire_tombstones(0).unwrap(), 0);
    assert!(store.record(&id).unwrap().is_some());
    assert_eq!(store.expire_tombstones(u64::MAX).unwrap(), 2);
    assert!(store.record(&id).unwrap().is_none());
    assert!(store.record(&other).unwrap().is_none());
    assert_eq!(store.expire_tombstones(u64::MAX).unwrap(), 0);
}

/// Bytes of the files under `dir`, subdirectories included.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some(if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            })
        })
        .sum()
}

/// Copies a store directory as it is on disk: with the store still open, what a `kill -9`
/// would leave.
fn crash_image(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            crash_image(&entry.path(), &target);
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn random_chunk(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut out);
    out
}

#[test]
fn large_chunks_live_in_files_and_small_ones_in_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let big = random_chunk(1, 1 << 20);
    let edge = random_chunk(2, 64 << 10);
    let small = random_chunk(3, (64 << 10) - 1);
    let object;
    {
        let store = open(dir.path());
        object = put_object(&*store, &[&big, &edge, &small], 1);
        for (chunk, in_file) in [(&big, true), (&edge, true), (&small, false)] {
            let id = ChunkId::of(chunk);
            assert_eq!(
                chunk_file(dir.path(), &id).exists(),
                in_file,
                "{} bytes",
                chunk.len()
            );
            assert_eq!(store.get_chunk(&id).unwrap().unwrap(), *chunk);
        }
        let file = std::fs::metadata(chunk_file(dir.path(), &ChunkId::of(&big))).unwrap();
        assert_eq!(file.len(), big.len() as u64);
    }
    // A store written with chunk files reads them whatever its configuration says now.
    let store = open_inline(dir.path());
    let (manifest, _) = store.manifest(&object).unwrap().unwrap();
    for (c, want) in manifest.chunks.iter().zip([&big, &edge, &small]) {
        assert_eq!(store.get_chunk(&c.id).unwrap().unwrap(), *want);
    }
    assert_eq!(
        store.stats().unwrap().bytes,
        (big.len() + edge.len() + small.len()) as u64
    );
}

/// A deleted chunk's file goes when the collector deletes the chunk: no compaction needed.
#[test]
fn deleted_chunk_files_give_their_space_back_at_collection() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let doomed_chunks: Vec<Vec<u8>> = (0..64u64).map(|i| random_chunk(i, MIB)).collect();
    let refs: Vec<&[u8]> = doomed_chunks.iter().map(Vec::as_slice).collect();
    let doomed = put_object(&*store, &refs, 1);
    let kept_chunk = random_chunk(1000, MIB);
    let kept = put_object(&*store, &[&kept_chunk], 2);
    // An abandoned upload's chunk goes at once (it was never referenced).
    let abandoned = random_chunk(2000, MIB);
    {
        let mut upload = store.begin_upload();
        upload.put(&abandoned).unwrap();
    }
    assert!(!chunk_file(dir.path(), &ChunkId::of(&abandoned)).exists());
    let before = dir_bytes(dir.path());

    store.delete_object(&doomed).unwrap().unwrap();
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(collected.freed.bytes, 64 * MIB as u64);
    let after = dir_bytes(dir.path());
    eprintln!("64 MiB of chunk files deleted: data directory {before} -> {after} bytes");
    assert!(before - after >= 60 * MIB as u64, "{before} -> {after}");
    for chunk in &doomed_chunks {
        assert!(!chunk_file(dir.path(), &ChunkId::of(chunk)).exists());
    }
    assert_eq!(
        store.get_chunk(&ChunkId::of(&kept_chunk)).unwrap().unwrap(),
        kept_chunk
    );
    assert!(store.manifest(&kept).unwrap().is_some());
}

/// A chunk file that disappears (deleted or damaged outside meshd) is reported as lost, not
/// served; the scrubber quarantines the chunk and verified bytes bring the file back.
#[test]
fn a_lost_chunk_file_is_reported_quarantined_and_restored() {
    use mesh_node::store::rocks::scrub::Restored;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let good = random_chunk(7, 300_000);
    let other = random_chunk(8, 200_000);
    put_object(&*store, &[&good, &other], 1);
    let id = ChunkId::of(&good);
    std::fs::remove_file(chunk_file(dir.path(), &id)).unwrap();

    match store.get_chunk(&id) {
        Err(StoreError::Lost { id: lost, .. }) => assert_eq!(lost, id),
        other => panic!("expected a lost chunk, got {other:?}"),
    }
    let batch = store.scrub_batch(None, u64::MAX, 100).unwrap();
    assert_eq!(batch.chunks, 2);
    assert_eq!(batch.quarantined, vec![id]);
    assert_eq!(store.quarantine_entry(&id).unwrap().unwrap().bad_len, 0);
    assert!(store.get_chunk(&id).unwrap().is_none());
    assert!(!store.has_chunk(&id).unwrap());

    assert_eq!(store.restore_chunk(&id, &good).unwrap(), Restored::Replaced);
    assert!(chunk_file(dir.path(), &id).exists());
    assert_eq!(store.get_chunk(&id).unwrap().unwrap(), good);
    assert!(store.has_chunk(&id).unwrap());
    assert_eq!(
        store.get_chunk(&ChunkId::of(&other)).unwrap().unwrap(),
        other
    );
}

/// A chunk file no entry names (a crash between the file and its batch) is removed by the
/// first sweep after the unclean shutdown (the GC worker's first pass); files of stored
/// chunks stay.
#[test]
fn stray_chunk_files_are_swept_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let kept = random_chunk(1, 500_000);
    let store = open(dir.path());
    let object = put_object(&*store, &[&kept], 1);
    crash_image(dir.path(), image.path());
    drop(store);
    let stray = random_chunk(2, 500_000);
    let stray_id = ChunkId::of(&stray);
    std::fs::write(chunk_file(image.path(), &stray_id), &stray).unwrap();

    // A run that closes the store before its sweep leaves the sweep to the next open.
    let store = open(image.path());
    drop(store);
    let store = open(image.path());
    assert!(!store.has_chunk(&stray_id).unwrap());
    assert_eq!(store.sweep_strays_if_pending().unwrap(), Some(1));
    assert!(!chunk_file(image.path(), &stray_id).exists());
    assert_eq!(
        store.sweep_strays_if_pending().unwrap(),
        None,
        "once per open"
    );
    // After a sweep, a clean close means no sweep at the next open.
    drop(store);
    let store = open(image.path());
    assert_eq!(store.sweep_strays_if_pending().unwrap(), None);
    assert_eq!(store.get_chunk(&ChunkId::of(&kept)).unwrap().unwrap(), kept);
    assert!(store.object(&object).unwrap().is_some());
    // The same chunk can be stored afterwards, as if the stray had never been.
    assert!(store.put_chunk(&stray).unwrap().new);
    assert_eq!(store.get_chunk(&stray_id).unwrap().unwrap(), stray);
}

/// The figure the README quotes: 64 MiB deleted, collected and compacted (chunks kept in
/// RocksDB's blob files).
#[test]
fn deleted_chunks_give_their_disk_space_back_after_compaction() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open_inline(dir.path());
    // Incompressible, distinct chunks.
    let big: Vec<Vec<u8>> = (0..64u64).map(|i| random_chunk(i, MIB)).collect();
    let refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
    let doomed = put_object(&*store, &refs, 1);
    let kept_chunk = vec![6u8; MIB];
    let kept = put_object(&*store, &[&kept_chunk], 2);
    store.flush().unwrap();
    let before = (store.chunk_file_bytes().unwrap(), dir_bytes(dir.path()));

    store.delete_object(&doomed).unwrap().unwrap();
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(collected.freed.bytes, 64 * MIB as u64);
    store.compact_chunks().unwrap();
    let after = (store.chunk_file_bytes().unwrap(), dir_bytes(dir.path()));
    eprintln!(
        "64 MiB deleted: chunk files {} -> {} bytes, data directory {} -> {} bytes",
        before.0, after.0, before.1, after.1
    );
    assert!(before.0 >= 64 * MIB as u64, "{before:?}");
    assert!(
        after.0 < 4 * MIB as u64,
        "the chunk files still hold {} bytes",
        after.0
    );
    assert!(
        before.1 - after.1 >= 60 * MIB as u64,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        store.get_chunk(&ChunkId::of(&kept_chunk)).unwrap().unwrap(),
        kept_chunk
    );
    assert!(store.manifest(&kept).unwrap().is_some());
}

/// Deleted chunks spread over blob files that keep live ones too (the hard case for blob GC):
/// eight flushes, each of 8 MiB that stays and 8 MiB that is deleted.
#[test]
fn space_comes_back_when_deleted_chunks_share_blob_files_with_live_ones() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open_inline(dir.path());
    let chunk = |seed: u64| random_chunk(seed, MIB);
    let mut doomed = Vec::new();
    let mut kept = Vec::new();
    for round in 0..8u64 {
        let keep: Vec<Vec<u8>> = (0..8).map(|i| chunk(1000 + round * 8 + i)).collect();
        let drop: Vec<Vec<u8>> = (0..8).map(|i| chunk(2000 + round * 8 + i)).collect();
        let mixed: Vec<&[u8]> = keep
            .iter()
            .zip(&drop)
            .flat_map(|(k, d)| [k.as_slice(), d.as_slice()])
            .collect();
        let both = put_object(&*store, &mixed, round * 2);
        let keep_refs: Vec<&[u8]> = keep.iter().map(Vec::as_slice).collect();
        kept.push(put_object(&*store, &keep_refs, round * 2 + 1));
        doomed.push(both);
        store.flush().unwrap();
    }
    let before = (store.chunk_file_bytes().unwrap(), dir_bytes(dir.path()));
    for id in &doomed {
        store.delete_object(id).unwrap().unwrap();
    }
    let collected = store.collect_garbage(u64::MAX).unwrap();
    assert_eq!(collected.freed.bytes, 64 * MIB as u64);
    let (files_before, files_after) = store.compact_chunks().unwrap();
    let after = (store.chunk_file_bytes().unwrap(), dir_bytes(dir.path()));
    eprintln!(
        "64 of 128 MiB deleted across 8 blob files: chunk files {files_before} -> {files_after} bytes, data directory {} -> {} bytes",
        before.1, after.1
    );
    assert!(
        before.0 - after.0 >= 60 * MIB as u64,
        "{before:?} -> {after:?}"
    );
    for id in &kept {
        let (manifest, _) = store.manifest(id).unwrap().unwrap();
        for c in &manifest.chunks {
            assert!(store.get_chunk(&c.id).unwrap().is_some());
        }
    }
}

/// Distinct chunks of assorted sizes (some below the blob threshold, most above).
fn assorted_chunks(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let len = 1_000 + (i * 37_003) % 200_000;
            (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
        })
        .collect()
}

#[test]
fn a_scrub_walk_visits_every_chunk_once_in_bounded_batches_across_a_reopen() {
    use mesh_node::store::rocks::scrub::ScrubBatch;
    let dir = tempfile::tempdir().unwrap();
    let chunks = assorted_chunks(60);
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let mut all: Vec<ChunkId> = refs.iter().map(|c| ChunkId::of(c)).collect();
    all.sort();
    let total_bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();

    let mut seen: Vec<ChunkId> = Vec::new();
    let mut bytes = 0;
    let mut cursor: Option<ChunkId> = None;
    {
        let store = open(dir.path());
        put_object(&*store, &refs, 1);
        // Half the walk, then the store closes as a restarting node's would.
        while seen.len() < 30 {
            let batch: ScrubBatch = store.scrub_batch(cursor.as_ref(), 150_000, 7).unwrap();
            assert!(batch.chunks >= 1 && batch.chunks <= 7, "{batch:?}");
            assert!(batch.quarantined.is_empty());
            // A batch stops once its byte budget is spent: at most one chunk past it.
            assert!(batch.bytes < 150_000 + 200_000, "{batch:?}");
            let last = batch.last.unwrap();
            seen.extend(
                all.iter()
                    .filter(|id| Some(*id) > cursor.as_ref() && **id <= last),
            );
            bytes += batch.bytes;
            cursor = Some(last);
        }
    }
    let store = open(dir.path());
    loop {
        let batch = store.scrub_batch(cursor.as_ref(), 150_000, 7).unwrap();
        bytes += batch.bytes;
        if let Some(last) = batch.last {
            seen.extend(
                all.iter()
                    .filter(|id| Some(*id) > cursor.as_ref() && **id <= last),
            );
            cursor = Some(last);
        }
        if batch.done {
            break;
        }
    }
    assert_eq!(seen, all, "every chunk once, in key order");
    assert_eq!(bytes, total_bytes);
    // At the end, a walk from the last key finds nothing more.
    let tail = store.scrub_batch(cursor.as_ref(), 1, 1).unwrap();
    assert_eq!((tail.chunks, tail.done), (0, true));
}

#[test]
fn a_corrupt_chunk_is_quarantined_reads_as_missing_and_is_restored_verified() {
    use mesh_node::store::rocks::scrub::Restored;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let chunks = assorted_chunks(5);
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let object = put_object(&*store, &refs, 2);
    let good = chunks[3].clone();
    let id = ChunkId::of(&good);
    let mut rotten = good.clone();
    rotten[100] ^= 1;
    store.overwrite_chunk_unchecked(&id, &rotten).unwrap();
    let before = store.stats().unwrap();

    let batch = store.scrub_batch(None, u64::MAX, 100).unwrap();
    assert_eq!(batch.chunks, 5);
    assert!(batch.done);
    assert_eq!(batch.quarantined, vec![id]);
    let entry = store.quarantine_entry(&id).unwrap().unwrap();
    assert_eq!(entry.actual, ChunkId::of(&rotten));
    assert_eq!(entry.bad_len as usize, rotten.len());
    assert_eq!(store.quarantined_count().unwrap(), 1);
    // No read returns the bad bytes: the chunk reads as absent, so readers go elsewhere.
    assert!(store.get_chunk(&id).unwrap().is_none());
    assert!(!store.has_chunk(&id).unwrap());
    // The object and the counts are untouched: the reference stays.
    assert_eq!(store.stats().unwrap(), before);
    assert!(store.object(&object).unwrap().is_some());
    // A second walk neither sees it nor counts it again.
    let again = store.scrub_batch(None, u64::MAX, 100).unwrap();
    assert_eq!((again.chunks, again.quarantined.len()), (4, 0));
    assert!(store.quarantine_chunk(&id).unwrap().is_none());

    // It survives a reopen, and only the right bytes come back.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.quarantined(None, 10).unwrap().len(), 1);
    assert!(matches!(
        store.restore_chunk(&id, &rotten),
        Err(StoreError::HashMismatch { .. })
    ));
    assert!(store.get_chunk(&id).unwrap().is_none());
    assert_eq!(store.restore_chunk(&id, &good).unwrap(), Restored::Replaced);
    assert_eq!(store.get_chunk(&id).unwrap().unwrap(), good);
    assert!(store.has_chunk(&id).unwrap());
    assert_eq!(store.quarantined_count().unwrap(), 0);
    assert!(store.quarantined(None, 10).unwrap().is_empty());
    assert_eq!(
        store.restore_chunk(&id, &good).unwrap(),
        Restored::AlreadyGood
    );
    assert_eq!(store.stats().unwrap(), before);
}

#[test]
fn a_verified_write_of_a_quarantined_chunk_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = vec![6u8; 120_000];
    put_object(&*store, &[&data], 3);
    let id = ChunkId::of(&data);
    store.overwrite_chunk_unchecked(&id, b"rot").unwrap();
    assert!(store.quarantine_chunk(&id).unwrap().is_some());
    assert!(
        !store.has_chunk(&id).unwrap(),
        "a writer asking should resend it"
    );
    let stored = store.put_chunk_verified(&id, &data).unwrap();
    assert!(!stored.new, "still the same stored chunk for the counts");
    assert_eq!(store.get_chunk(&id).unwrap().unwrap(), data);
    assert_eq!(store.quarantined_count().unwrap(), 0);
    assert_eq!(store.stats().unwrap().chunks, 1);
}

#[test]
fn a_quarantined_chunk_of_a_deleted_object_is_settled_not_restored() {
    use mesh_node::store::rocks::scrub::Restored;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = vec![8u8; 90_000];
    let object = put_object(&*store, &[&data], 4);
    let id = ChunkId::of(&data);
    store.overwrite_chunk_unchecked(&id, b"rot").unwrap();
    store.quarantine_chunk(&id).unwrap().unwrap();
    assert!(!store.settle_quarantined(&id).unwrap(), "still referenced");
    store.delete_object(&object).unwrap().unwrap();
    // Unreferenced but not collected yet: a put within the grace could reference it again,
    // so it stays quarantined (and is healed by that put's verified bytes).
    assert!(!store.settle_quarantined(&id).unwrap());
    assert_eq!(store.collect_garbage(u64::MAX).unwrap().freed.chunks, 1);
    assert_eq!(store.stats().unwrap().chunks, 0);
    assert!(store.settle_quarantined(&id).unwrap());
    assert_eq!(store.quarantined_count().unwrap(), 0);
    // A late good copy writes nothing for a chunk nobody references.
    store.overwrite_chunk_unchecked(&id, b"rot").unwrap();
    store.quarantine_chunk(&id).unwrap();
    assert_eq!(
        store.restore_chunk(&id, &data).unwrap(),
        Restored::NoLongerStored
    );
    assert_eq!(store.quarantined_count().unwrap(), 0);
}

#[test]
fn the_parts_using_a_chunk_are_found_among_whole_placed_and_sharded_objects() {
    use mesh_node::store::rocks::scrub::PartUse;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let shared = vec![1u8; 70_000];
    let other = vec![2u8; 70_000];
    // Whole: the chunk twice. Placed: this node holds index 1 only (not the shared chunk).
    let whole = put_object(&*store, &[&shared, &other, &shared], 5);
    store
        .put_chunk_verified(&ChunkId::of(&other), &other)
        .unwrap();
    let (placed, _) = store
        .commit_placed(&manifest_of(&[&shared, &other], 6), b"r", &[1], &[])
        .unwrap();
    // Sharded: the shared bytes are also shard 1 of an ec:2+1 object held here.
    let mut manifest = manifest_of(&[&[9u8; 70_000]], 7);
    manifest.redundancy = Redundancy::Erasure { data: 2, parity: 1 };
    let parts = vec![
        ChunkId::of(&[3u8; 1000]),
        ChunkId::of(&shared),
        ChunkId::of(&[4u8; 1000]),
    ];
    let (sharded, _) = store.commit_placed(&manifest, b"r", &[1], &parts).unwrap();

    let mut uses = store.part_uses(&ChunkId::of(&shared), 10).unwrap();
    uses.sort_by_key(|u| (u.object, u.index));
    let mut expected = vec![
        PartUse {
            object: whole,
            index: 0,
        },
        PartUse {
            object: whole,
            index: 2,
        },
        PartUse {
            object: sharded,
            index: 1,
        },
    ];
    expected.sort_by_key(|u| (u.object, u.index));
    assert_eq!(uses, expected);
    assert_eq!(store.part_uses(&ChunkId::of(&shared), 1).unwrap().len(), 1);
    let uses = store.part_uses(&ChunkId::of(&other), 10).unwrap();
    assert!(uses.contains(&PartUse {
        object: placed,
        index: 1
    }));
    assert!(
        store
            .part_uses(&ChunkId::of(b"unknown"), 10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_scrub_state_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        assert!(store.scrub_state().unwrap().is_none());
        store.put_scrub_state(b"\x01state").unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.scrub_state().unwrap().unwrap(), b"\x01state");
    // The counters sharing the family are unaffected.
    assert_eq!(store.stats().unwrap().chunks, 0);
}

/// Every chunk passes through the write-ahead log, and writing into page-cache pages a log
/// already used is several times cheaper than filling new ones (README, "Fresh pages"). A
/// long write must therefore reuse obsolete log files after a short first stretch of new
/// ones. RocksDB turns `recycle_log_file_num` off, without an error, when other options
/// conflict with it, so this counts in its info log which logs were new and which reused.
#[test]
fn a_long_write_reuses_obsolete_log_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_inline(dir.path());
    // Eight chunk memtables' worth (64 MiB each by default), in objects of eight 1 MiB chunks,
    // so the small column families (references, manifests) are written all along too.
    let mut chunk = vec![0x5au8; 1 << 20];
    for object in 0..64u64 {
        let chunks: Vec<Vec<u8>> = (0..8u64)
            .map(|i| {
                chunk[..8].copy_from_slice(&(object * 8 + i).to_le_bytes());
                chunk.clone()
            })
            .collect();
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        put_object(&*store, &slices, object);
    }
    drop(store);
    let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
    let logs: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|line| line.split("New memtable created with log file: #").nth(1))
        .filter_map(|rest| rest.split('.').next())
        .collect();
    let reused = log.matches("from recycle list").count();
    let new = logs.len().saturating_sub(reused);
    assert!(
        reused >= 3 && new <= 4,
        "{} logs written: {new} new, {reused} reused",
        logs.len()
    );
}
