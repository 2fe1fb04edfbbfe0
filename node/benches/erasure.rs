//! Erasure coding on one core: the two Reed-Solomon backends side by side, then the module's
//! `encode` / `decode` / `rebuild` as the put, get and repair paths call them (goal: >= 1 GB/s
//! for 1 MiB chunks at ec:4+2). Throughput counts chunk bytes (K x shard size).
//!
//! `cargo bench -p mesh-node --bench erasure` (about two minutes once built)

use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use mesh_node::erasure::{self, Backend};
use rand::{RngCore, SeedableRng};

const SHAPES: [(usize, usize); 3] = [(4, 2), (8, 3), (10, 4)];
const SHARD_SIZES: [usize; 3] = [64 << 10, 256 << 10, 1 << 20];

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Short runs: 44 benchmarks have to fit in a few minutes.
fn group<'a>(c: &'a mut Criterion, name: String, bytes: usize) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Bytes(bytes as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    group
}

/// The codecs alone, on shard buffers: encode, and reconstruct with M data shards lost (the
/// worst case: every lost byte must be computed).
fn backends(c: &mut Criterion) {
    for (k, m) in SHAPES {
        for size in SHARD_SIZES {
            let mut group = group(c, format!("ec-{k}+{m}/shard-{}KiB", size >> 10), k * size);
            let data: Vec<Vec<u8>> = (0..k).map(|i| random(size, i as u64)).collect();
            let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            for backend in Backend::ALL {
                let codec = erasure::codec_with(backend, k, m)
                    .unwrap_or_else(|e| panic!("{backend} ec:{k}+{m}: {e}"));
                let mut parity = vec![vec![0u8; size]; m];
                group.bench_function(BenchmarkId::new("encode", backend), |b| {
                    b.iter(|| {
                        let mut parity: Vec<&mut [u8]> =
                            parity.iter_mut().map(Vec::as_mut_slice).collect();
                        codec.encode(&data, &mut parity)
                    })
                });
                let shards: Vec<Option<&[u8]>> = (0..k)
                    .map(|i| (i >= m).then_some(data[i]))
                    .chain(parity.iter().map(|p| Some(p.as_slice())))
                    .collect();
                let mut lost = vec![vec![0u8; size]; m];
                group.bench_function(BenchmarkId::new("reconstruct", backend), |b| {
                    b.iter(|| {
                        let mut wanted: Vec<(usize, &mut [u8])> =
                            lost.iter_mut().map(Vec::as_mut_slice).enumerate().collect();
                        codec.reconstruct(&shards, &mut wanted)
                    })
                });
                assert!(lost.iter().zip(&data).all(|(got, want)| got == want));
            }
            group.finish();
        }
    }
}

/// The module's functions on a 1 MiB chunk at ec:4+2, copies and allocations included.
fn module(c: &mut Criterion) {
    const LEN: usize = 1 << 20;
    let chunk = random(LEN, 99);
    let mut group = group(c, "chunk-1MiB-ec-4+2".into(), LEN);
    for backend in Backend::ALL {
        let codec =
            erasure::codec_with(backend, 4, 2).unwrap_or_else(|e| panic!("{backend} ec:4+2: {e}"));
        let codec = codec.as_ref();
        group.bench_function(BenchmarkId::new("encode", backend), |b| {
            b.iter(|| erasure::encode_with(codec, &chunk))
        });
        let shards =
            erasure::encode_with(codec, &chunk).unwrap_or_else(|e| panic!("{backend} encode: {e}"));
        let all: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
        let mut two_lost = all.clone();
        two_lost[0] = None;
        two_lost[1] = None;
        group.bench_function(BenchmarkId::new("decode-none-lost", backend), |b| {
            b.iter(|| erasure::decode_with(codec, all.clone(), LEN))
        });
        group.bench_function(BenchmarkId::new("decode-2-data-lost", backend), |b| {
            b.iter(|| erasure::decode_with(codec, two_lost.clone(), LEN))
        });
        group.bench_function(BenchmarkId::new("rebuild-2-data-lost", backend), |b| {
            b.iter(|| erasure::rebuild_with(codec, two_lost.clone(), LEN))
        });
        let back = erasure::decode_with(codec, two_lost.clone(), LEN)
            .unwrap_or_else(|e| panic!("{backend} decode: {e}"));
        assert_eq!(&back[..], &chunk[..]);
    }
    group.finish();
}

criterion_group!(benches, module, backends);
criterion_main!(benches);
