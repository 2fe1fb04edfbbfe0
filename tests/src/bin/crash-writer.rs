//! Test helper for `tests/crash.rs`: writes objects into a store in a loop through the real
//! ingest path and prints `ACK <object id> <seed> <len>` after each commit returns, and
//! `DEL <object id>` after each delete returns. The test kills it with SIGKILL at a random
//! moment and checks the store it leaves behind.

use std::io::Write;
use std::path::PathBuf;

use mesh_node::metrics::Metrics;
use mesh_node::objects::{PutOptions, ingest};
use mesh_node::store::{Config, MetaStore, RocksStore};
use mesh_proto::{ChunkerSpec, Redundancy};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: crash-writer DIR FIRST_SEED"))?,
    );
    let first_seed: u64 = args.next().unwrap_or_else(|| "0".into()).parse()?;
    let store = RocksStore::open(&dir, &Config::default())?;
    let metrics = Metrics::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let stdout = std::io::stdout();
    let mut acked = Vec::new();
    for seed in first_seed.. {
        let data = mesh_tests::prefixed_object(seed);
        let options = PutOptions {
            name: Some(format!("obj-{seed}")),
            redundancy: Redundancy::DEFAULT,
            chunker: ChunkerSpec::Fixed { size: 64 * 1024 },
            created_ms: None,
        };
        let put = runtime.block_on(ingest(&store, &metrics, &data[..], options))?;
        writeln!(stdout.lock(), "ACK {} {seed} {}", put.id, data.len())?;
        acked.push(put.id);
        if seed % 5 == 4 {
            let victim = acked.remove(acked.len() / 2);
            writeln!(stdout.lock(), "DELETING {victim}")?;
            store.delete_object(&victim)?;
            writeln!(stdout.lock(), "DEL {victim}")?;
        }
    }
    Ok(())
}
