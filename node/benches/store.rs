//! Store write and read of 1 MiB chunks in chunk files, in RocksDB blob files and as values
//! in RocksDB's LSM tree, and a scrub walk (every chunk read back and hashed) with no rate
//! limit.
//!
//! `cargo bench -p mesh-node --bench store`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mesh_node::store::{ChunkStore, Config, RocksStore};
use mesh_proto::ChunkId;
use rand::{RngCore, SeedableRng};

const CHUNK: usize = 1 << 20;
const BATCH: usize = 64;

fn chunks(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..BATCH)
        .map(|_| {
            let mut c = vec![0u8; CHUNK];
            rng.fill_bytes(&mut c);
            c
        })
        .collect()
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store-1MiB");
    group.throughput(Throughput::Bytes((CHUNK * BATCH) as u64));
    group.sample_size(10);
    for (name, chunk_files, blob_files) in [
        ("chunk-files", true, true),
        ("blob-files", false, true),
        ("lsm-values", false, false),
    ] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config = Config {
            chunk_files,
            blob_files,
            ..Config::default()
        };
        let store = RocksStore::open(dir.path(), &config).unwrap_or_else(|e| panic!("open: {e}"));
        let mut seed = 0;
        group.bench_function(format!("{name}/write"), |b| {
            b.iter_batched(
                || {
                    seed += 1;
                    chunks(seed)
                },
                |batch| {
                    for chunk in &batch {
                        store
                            .put_chunk(chunk)
                            .unwrap_or_else(|e| panic!("put: {e}"));
                    }
                },
                BatchSize::PerIteration,
            )
        });
        let ids: Vec<ChunkId> = chunks(u64::MAX)
            .iter()
            .map(|c| store.put_chunk(c).map(|s| s.id))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("put: {e}"));
        store.flush().unwrap_or_else(|e| panic!("flush: {e}"));
        group.bench_function(format!("{name}/read"), |b| {
            b.iter(|| {
                let mut total = 0;
                for id in &ids {
                    total += store.get_chunk(id).ok().flatten().map_or(0, |c| c.len());
                }
                total
            })
        });
    }
    group.finish();
}

/// A walk over 256 MiB of 1 MiB chunks, read back from the page cache: on a node the disk's
/// read rate or the configured scrub rate is the bound.
fn bench_scrub(c: &mut Criterion) {
    const CHUNKS: u64 = 256;
    let mut group = c.benchmark_group("scrub-walk");
    group.throughput(Throughput::Bytes(CHUNKS * CHUNK as u64));
    group.sample_size(10);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store =
        RocksStore::open(dir.path(), &Config::default()).unwrap_or_else(|e| panic!("open: {e}"));
    for seed in 0..CHUNKS / BATCH as u64 {
        for chunk in chunks(seed) {
            store
                .put_chunk(&chunk)
                .unwrap_or_else(|e| panic!("put: {e}"));
        }
    }
    store.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    group.bench_function("256MiB", |b| {
        b.iter(|| {
            let (mut cursor, mut bytes) = (None, 0u64);
            loop {
                let batch = store
                    .scrub_batch(cursor.as_ref(), 64 << 20, 1024)
                    .unwrap_or_else(|e| panic!("scrub: {e}"));
                bytes += batch.bytes;
                cursor = batch.last.or(cursor);
                if batch.done {
                    break;
                }
            }
            assert_eq!(bytes, CHUNKS * CHUNK as u64, "the walk read every chunk");
            bytes
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store, bench_scrub);
criterion_main!(benches);
