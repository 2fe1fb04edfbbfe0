//! Chunking + BLAKE3 of in-memory data on one core (goal: >= 1 GB/s for the default chunker).
//!
//! `cargo bench -p mesh-node --bench chunking`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_node::chunker::{Chunker, Cutter};
use mesh_proto::{ChunkerSpec, RecordFormat};
use rand::{RngCore, SeedableRng};

const LEN: usize = 64 << 20;

fn data() -> Vec<u8> {
    let mut data = vec![0u8; LEN];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
    data
}

fn jsonl() -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN);
    let mut i = 0u64;
    while out.len() < LEN {
        out.extend_from_slice(
            format!(
                "{{\"id\":{i},\"user\":\"u{}\",\"ts\":{},\"payload\":\"{}\"}}\n",
                i % 9973,
                1_700_000_000 + i,
                "p".repeat((i % 150) as usize)
            )
            .as_bytes(),
        );
        i += 1;
    }
    out
}

/// Cut points only, then cut points plus BLAKE3 of every chunk, over a buffer.
fn cut_and_hash(c: &mut Criterion) {
    let data = data();
    let mut group = c.benchmark_group("chunking");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(10);
    for (name, spec) in [
        ("cdc", ChunkerSpec::DEFAULT_CDC),
        ("fixed-1MiB", ChunkerSpec::Fixed { size: 1 << 20 }),
    ] {
        let cutter = Cutter::new(spec);
        group.bench_function(format!("{name}/cut"), |b| {
            b.iter(|| {
                let mut pos = 0;
                let mut chunks = 0;
                while pos < data.len() {
                    pos += cutter
                        .cut(&data[pos..], true, pos as u64)
                        .unwrap_or(data.len() - pos);
                    chunks += 1;
                }
                chunks
            })
        });
        group.bench_function(format!("{name}/cut+blake3"), |b| {
            b.iter(|| {
                let mut pos = 0;
                let mut last = [0u8; 32];
                while pos < data.len() {
                    let len = cutter
                        .cut(&data[pos..], true, pos as u64)
                        .unwrap_or(data.len() - pos);
                    last = *blake3::hash(&data[pos..pos + len]).as_bytes();
                    pos += len;
                }
                last
            })
        });
    }
    let records = jsonl();
    let cutter = Cutter::new(ChunkerSpec::records(RecordFormat::Jsonl));
    group.bench_function("records-jsonl/cut+blake3", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut last = [0u8; 32];
            while pos < records.len() {
                let len = cutter
                    .cut(&records[pos..], true, pos as u64)
                    .unwrap_or(records.len() - pos);
                last = *blake3::hash(&records[pos..pos + len]).as_bytes();
                pos += len;
            }
            last
        })
    });
    group.finish();
}

/// The streaming chunker over an in-memory reader, as the put path drives it.
fn streaming(c: &mut Criterion) {
    let data = data();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut group = c.benchmark_group("chunker-stream");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(10);
    group.bench_function("cdc+blake3", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut chunker = Chunker::new(&data[..], ChunkerSpec::DEFAULT_CDC);
                let mut last = [0u8; 32];
                while let Ok(Some(chunk)) = chunker.next_chunk().await {
                    last = *blake3::hash(&chunk).as_bytes();
                }
                last
            })
        })
    });
    group.finish();
}

criterion_group!(benches, cut_and_hash, streaming);
criterion_main!(benches);
