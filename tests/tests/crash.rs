//! The store survives `kill -9`: a child process writes (and deletes) objects in a loop and is
//! killed at random moments; after each kill the store must hold every acknowledged object
//! intact, show no half-written object, and keep no chunk that no object references.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use mesh_node::store::{ChunkStore, Config, MetaStore, RocksStore};
use mesh_proto::ObjectId;
use rand::{Rng, SeedableRng};

#[test]
fn acknowledged_objects_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d657368);
    let mut live: BTreeMap<ObjectId, u64> = BTreeMap::new();
    let mut next_seed = 0u64;
    for round in 0..4 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .arg(dir.path())
            .arg(next_seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a random number of acknowledgements, mid-way through the next write.
        let kill_after = rng.random_range(3..25);
        let mut acks = 0;
        let mut killed = false;
        // After the kill, the lines the writer printed before it died are still read: an
        // object it started deleting may be gone, and one it acknowledged must be there.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["ACK", id, seed, _len] => {
                    live.insert(id.parse().unwrap(), seed.parse().unwrap());
                    next_seed = seed.parse::<u64>().unwrap() + 1;
                    acks += 1;
                }
                // From here the object may or may not exist; both are correct.
                ["DELETING", id] => {
                    live.remove(&id.parse().unwrap());
                }
                ["DEL", _] => {}
                // A line cut short by the kill.
                _ if killed => {}
                _ => panic!("unexpected line from the writer: {line}"),
            }
            if acks >= kill_after && !killed {
                child.kill().unwrap();
                killed = true;
            }
        }
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the writer should have been killed, it exited with {status}"
        );

        let store = RocksStore::open(dir.path(), &Config::default()).unwrap();
        let listed = store.list_objects(None, 100_000).unwrap();
        let listed_ids: HashSet<ObjectId> = listed.iter().map(|o| o.id).collect();
        for (id, seed) in &live {
            assert!(
                listed_ids.contains(id),
                "round {round}: acknowledged object {id} (seed {seed}) is missing"
            );
        }
        let mut referenced = HashSet::new();
        for object in &listed {
            // Every visible object is complete: manifest, and every chunk present and intact.
            let (manifest, _) = store
                .manifest(&object.id)
                .unwrap()
                .expect("listed objects have manifests");
            let mut bytes = Vec::with_capacity(manifest.size as usize);
            for chunk in &manifest.chunks {
                bytes.extend_from_slice(
                    &store
                        .get_chunk(&chunk.id)
                        .unwrap()
                        .expect("chunk of a visible object"),
                );
                referenced.insert(chunk.id);
            }
            let seed: u64 = object
                .name
                .as_deref()
                .unwrap()
                .trim_start_matches("obj-")
                .parse()
                .unwrap();
            assert_eq!(
                bytes,
                mesh_tests::prefixed_object(seed),
                "round {round}: object {} reads back wrong",
                object.id
            );
            // Committed but killed before its ACK, or killed before a delete committed: either
            // way it is whole, so from now on it must stay.
            live.entry(object.id).or_insert(seed);
        }
        // Chunks the writer's deletes released wait out the GC grace; collect them now.
        store.collect_garbage(u64::MAX).unwrap();
        let stats = store.stats().unwrap();
        assert_eq!(
            stats.objects,
            listed.len() as u64,
            "round {round}: object counter"
        );
        assert_eq!(
            stats.chunks,
            referenced.len() as u64,
            "round {round}: orphaned chunks were not swept"
        );
    }
    assert!(
        live.len() >= 4,
        "the test wrote too little to mean anything: {}",
        live.len()
    );
}
