//! Record processors on one core: records/s of a validate + dedup map task (parse, validate,
//! partition, encode) and of a dedup reduce task, over 5000 synthetic ~200-byte JSONL
//! records (goal: >= 300k records/s on the map side). `baseline/serde_json-parse` is the
//! floor the map side builds on: parsing the same lines into `serde_json::Value`s, nothing
//! else. `shuffle/pack` and `shuffle/unpack`: the LZ4 packing of a shuffle output's chunks,
//! per byte of shuffle lines.
//!
//! `cargo bench -p mesh-node --bench processors`

use std::collections::BTreeMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_node::jobs::processors::{ChunkInput, Format, Pipeline, StageSpec};
use mesh_node::jobs::shuffle;

const RECORDS: usize = 5000;
const PARTITIONS: u32 = 6;

const SCHEMA: &str = r#"{
    "type": "object",
    "required": ["id", "user", "ts", "amount", "country"],
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "user": {"type": "string", "minLength": 1},
        "ts": {"type": "integer"},
        "amount": {"type": "number"},
        "country": {"type": "string", "enum": ["NO", "SE", "DK", "FI", "IS"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string"}
    }
}"#;

/// About 200 bytes a record; a third of the users repeat, so dedup has work to do.
fn records() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..RECORDS as u64 {
        let line = format!(
            "{{\"id\":{i},\"user\":\"user-{:06}\",\"ts\":{},\"amount\":{}.{:02},\"country\":\"{}\",\"tags\":[\"a{}\",\"b{}\"],\"note\":\"{}\"}}\n",
            i % 3333,
            1_700_000_000 + (i * 7919) % 100_000,
            i % 1000,
            i % 100,
            ["NO", "SE", "DK", "FI", "IS"][(i % 5) as usize],
            i % 17,
            i % 23,
            "lorem ipsum dolor sit amet ".repeat(3),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn pipeline() -> Pipeline {
    let validate = BTreeMap::from([("schema".to_owned(), SCHEMA.to_owned())]);
    let dedup = BTreeMap::from([
        ("key".to_owned(), "user".to_owned()),
        ("ts".to_owned(), "ts".to_owned()),
    ]);
    let stages = [
        StageSpec {
            processor: "validate",
            params: &validate,
        },
        StageSpec {
            processor: "dedup",
            params: &dedup,
        },
    ];
    match Pipeline::parse(&stages) {
        Ok(p) => p,
        Err(e) => panic!("bench pipeline: {e}"),
    }
}

fn processors(c: &mut Criterion) {
    let data = records();
    let pipeline = pipeline();
    let input = ChunkInput {
        data: &data,
        format: Format::Jsonl,
        csv_header: None,
        first_chunk: true,
    };
    // Where the time goes, from the pipeline's own stage statistics of one (cold) run.
    if let Ok(out) = pipeline.run_map(&input, PARTITIONS) {
        for s in &out.stats {
            eprintln!(
                "map {:>9}: {:>8.0} records/s ({} in, {} out)",
                s.stage,
                s.records_in as f64 / (s.nanos.max(1) as f64 / 1e9),
                s.records_in,
                s.records_out
            );
        }
    }
    let mut group = c.benchmark_group("processors");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("baseline/serde_json-parse", |b| {
        b.iter(|| {
            data.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .filter(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok())
                .count()
        })
    });
    group.bench_function("validate+dedup/map", |b| {
        b.iter(|| {
            pipeline
                .run_map(&input, PARTITIONS)
                .map(|o| o.partitions.len())
        })
    });
    // All records in one partition, so the reduce sees the 5000.
    let mapped = match pipeline.run_map(&input, 1) {
        Ok(out) => out,
        Err(e) => panic!("bench map: {e}"),
    };
    assert!(mapped.rejects.is_empty(), "bench records must be valid");
    let inputs = [mapped.partitions[0].as_slice()];
    group.bench_function("dedup/reduce", |b| {
        b.iter(|| pipeline.run_reduce(&inputs).map(|o| o.output.len()))
    });
    group.finish();

    // The LZ4 packing of shuffle chunks, per byte of shuffle lines.
    let lines = mapped.partitions[0].as_slice();
    let packed = shuffle::pack(lines);
    eprintln!(
        "shuffle: {} bytes of shuffle lines pack into {} ({:.2}x)",
        lines.len(),
        packed.len(),
        lines.len() as f64 / packed.len().max(1) as f64
    );
    let mut group = c.benchmark_group("shuffle");
    group.throughput(Throughput::Bytes(lines.len() as u64));
    group.bench_function("pack", |b| b.iter(|| shuffle::pack(lines).len()));
    group.bench_function("unpack", |b| {
        b.iter(|| shuffle::unpack(packed.clone()).map(|u| u.len()))
    });
    group.finish();
}

criterion_group!(benches, processors);
criterion_main!(benches);
