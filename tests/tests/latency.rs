//! Latency tests: real `meshd` processes in network namespaces behind netsim's emulated WAN
//! (`netsim/topologies/three-clouds.toml` and `six-regions.toml`), driven through `netsim exec
//! NODE -- meshctl`. They need root and `/dev/net/tun`; CI runs as root, and without either
//! they fail (they never skip). They use the debug binaries `cargo test --workspace` builds.
//!
//! The tests run one at a time ([`one_at_a_time`]): each starts 7 to 25 processes, and on two
//! cores a 24-node mesh starting next to a three-clouds one delays pings and reads by
//! milliseconds, which is what these tests measure (a 1 ms link once measured 3 ms that way).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use mesh_netsim::state::NodeRecord;
use mesh_node::placement::near_band;
use mesh_proto::api::{PeerSummary, PeersResponse, PutResponse, StatResponse, StatusResponse};
use mesh_tests::netsim::{NetsimRun, wait_for};
use serde::de::DeserializeOwned;

const AWS: &str = "aws/us-east-1";
const GCP: &str = "gcp/us-central1";
const AZURE: &str = "azure/westeurope";

/// Held for the whole of a test, so that no two meshes share the CPU.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn topology(name: &str) -> PathBuf {
    // Not through CARGO_MANIFEST_DIR at run time: that is this crate's, not netsim's.
    mesh_netsim::topology::shipped(name)
}

fn json<T: DeserializeOwned>(run: &NetsimRun, node: &str, args: &[&str]) -> anyhow::Result<T> {
    let value = run.meshctl_json(node, args)?;
    serde_json::from_value(value)
        .with_context(|| format!("meshctl {} on {node}: unexpected JSON", args.join(" ")))
}

fn peers(run: &NetsimRun, node: &str) -> anyhow::Result<Vec<PeerSummary>> {
    Ok(json::<PeersResponse>(run, node, &["peers"])?.peers)
}

fn status(run: &NetsimRun, node: &str) -> anyhow::Result<StatusResponse> {
    json(run, node, &["status"])
}

/// Why `measured` (ms, `from`'s estimate of `to`) is not yet the emulated link's RTT, if it
/// is not: within 15% or 2 ms, whichever is larger.
fn rtt_off(
    run: &NetsimRun,
    from: &NodeRecord,
    to: &NodeRecord,
    measured: f64,
) -> anyhow::Result<Option<String>> {
    let emulated = run.emulated_rtt(from, to)?.as_secs_f64() * 1000.0;
    let tolerance = (emulated * 0.15).max(2.0);
    Ok(((measured - emulated).abs() > tolerance).then(|| {
        format!(
            "{} measures {measured:.2} ms to {}, the link emulates {emulated:.1} ms (± {tolerance:.1})",
            from.name, to.name
        )
    }))
}

/// Waits until every storage node sees every other storage node alive and ranks them as the
/// emulated links do. Placement orders peers in near bands ([`near_band`]): two peers whose
/// emulated RTTs fall in different bands must fall in different bands, in the same order, as
/// measured. A new connection's first pings can read several times the link's RTT (the peer
/// is busy joining), and a put placed before they settle may rank a same-region peer behind
/// another region's.
///
/// This asks for the ranking, not for accuracy (the test above checks that): on a busy
/// machine a 1 ms link can measure 5 to 10 ms, which is still far below the 30 ms to the
/// nearest other region, and placement is right as long as that holds.
fn wait_for_ranked_mesh(run: &NetsimRun, limit: Duration) -> anyhow::Result<()> {
    let names = run.names();
    wait_for("every node to rank every other node", limit, || {
        for node in run.storage_nodes() {
            let seen = peers(run, &node.name)?;
            let mut ranked = Vec::new();
            for other in run.storage_nodes().filter(|o| o.name != node.name) {
                let measured = seen
                    .iter()
                    .filter(|p| p.liveness == "alive" && !p.rtt_provisional)
                    .find(|p| names.get(&p.id) == Some(&other.name))
                    .and_then(|p| p.rtt_ms)
                    .ok_or_else(|| anyhow!("{} has not measured {} yet", node.name, other.name))?;
                let emulated = run.emulated_rtt(node, other)?;
                ranked.push((other.name.as_str(), emulated, measured));
            }
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let band = |rtt_ms: f64| ms(near_band(Duration::from_secs_f64(rtt_ms / 1000.0)));
            for (near, near_emulated, near_measured) in &ranked {
                for (far, far_emulated, far_measured) in &ranked {
                    if *far_emulated > near_band(*near_emulated)
                        && *far_measured <= band(*near_measured)
                    {
                        bail!(
                            "{} ranks {far} ({far_measured:.2} ms, emulated {:.1}) with or before \
                             {near} ({near_measured:.2} ms, emulated {:.1})",
                            node.name,
                            ms(*far_emulated),
                            ms(*near_emulated),
                        );
                    }
                }
            }
        }
        Ok(Some(()))
    })
}

/// Waits until the writer has no holder left to complete in the background.
fn wait_settled(run: &NetsimRun, writer: &str) -> anyhow::Result<()> {
    wait_for(
        "the put's holders to complete",
        Duration::from_secs(60),
        || {
            let completing = status(run, writer)?.objects_completing;
            ensure!(completing == 0, "{completing} objects still completing");
            Ok(Some(()))
        },
    )
}

/// Every chunk's holders, by node name, as `node` sees them.
fn holders(run: &NetsimRun, node: &str, id: &str) -> anyhow::Result<Vec<(u64, Vec<String>)>> {
    let stat: StatResponse = json(run, node, &["stat", id])?;
    let names = run.names();
    stat.chunks
        .iter()
        .map(|c| {
            let held = c
                .holders
                .iter()
                .map(|h| {
                    names
                        .get(h)
                        .cloned()
                        .ok_or_else(|| anyhow!("holder {h} is not a node of this run"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((u64::from(c.len), held))
        })
        .collect()
}

fn put(run: &NetsimRun, node: &str, path: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let path = path.display().to_string();
    let args = [&["put", path.as_str()], extra].concat();
    Ok(json::<PutResponse>(run, node, &args)?.id.to_string())
}

/// `meshctl get` on `node` into the run directory; the bytes and the reported time to first byte.
fn get(run: &NetsimRun, node: &str, id: &str) -> anyhow::Result<(Vec<u8>, f64)> {
    let out = run
        .run_dir()
        .join(format!("got-{node}-{}", &id[..12.min(id.len())]));
    let _ = std::fs::remove_file(&out);
    let out_str = out.display().to_string();
    let report = run.meshctl_json(node, &["get", id, "-o", &out_str, "--force"])?;
    let first_byte_ms = report["first_byte_ms"]
        .as_f64()
        .ok_or_else(|| anyhow!("meshctl get reported no first_byte_ms: {report}"))?;
    let bytes = std::fs::read(&out).with_context(|| format!("cannot read {out_str}"))?;
    Ok((bytes, first_byte_ms))
}

fn region_of<'a>(run: &'a NetsimRun, name: &str) -> anyhow::Result<&'a str> {
    Ok(run.node(name)?.region.as_str())
}

#[test]
fn every_measured_rtt_is_within_15_percent_or_2_ms_of_the_emulated_link() -> anyhow::Result<()> {
    let _serial = one_at_a_time();
    let run = NetsimRun::up(&topology("three-clouds.toml"))?;
    let names = run.names();
    let nodes: BTreeMap<&str, &NodeRecord> = run
        .state
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let table = wait_for(
        "every node's RTT to every other node to match the emulated links",
        Duration::from_secs(90),
        || {
            let mut table = Vec::new();
            for node in run.storage_nodes() {
                let seen = peers(&run, &node.name)?;
                for other in run.state.nodes.iter().filter(|o| o.name != node.name) {
                    let summary = seen
                        .iter()
                        .find(|p| names.get(&p.id) == Some(&other.name))
                        .ok_or_else(|| anyhow!("{} does not know {}", node.name, other.name))?;
                    let measured = summary.rtt_ms.ok_or_else(|| {
                        anyhow!("{} has not measured {} yet", node.name, other.name)
                    })?;
                    let other = nodes[other.name.as_str()];
                    if let Some(off) = rtt_off(&run, node, other, measured)? {
                        bail!("{off}");
                    }
                    let emulated = run.emulated_rtt(node, other)?.as_secs_f64() * 1000.0;
                    table.push((node.name.clone(), other.name.clone(), measured, emulated));
                }
            }
            Ok(Some(table))
        },
    )?;
    // Every ordered pair was checked: 6 storage nodes, each against 5 others and the bootstrap.
    assert_eq!(table.len(), 6 * 6);
    for (from, to, measured, emulated) in table {
        eprintln!("{from:>20} -> {to:<20} {measured:7.2} ms (emulated {emulated:.1} ms)");
    }
    run.passed();
    Ok(())
}

#[test]
fn a_put_from_aws_lands_twice_in_aws_and_once_in_gcp_and_gcp_reads_from_its_own_region()
-> anyhow::Result<()> {
    let _serial = one_at_a_time();
    let run = NetsimRun::up(&topology("three-clouds.toml"))?;
    wait_for_ranked_mesh(&run, Duration::from_secs(90))?;
    let writer = "aws-us-east-1-1";
    // Small chunks, so that the first byte does not wait for a large chunk to cross the link.
    let (file, data) = run.random_file("placed.bin", 2 << 20)?;
    let id = put(&run, writer, &file, &["--chunker", "fixed:64KiB"])?;
    wait_settled(&run, writer)?;

    let chunks = holders(&run, writer, &id)?;
    assert_eq!(chunks.len(), 32);
    for (i, (_, held)) in chunks.iter().enumerate() {
        let regions: Vec<&str> = held
            .iter()
            .map(|h| region_of(&run, h))
            .collect::<anyhow::Result<_>>()?;
        let distinct: BTreeSet<&String> = held.iter().collect();
        assert_eq!(
            distinct.len(),
            3,
            "chunk {i} is not on 3 distinct holders: {held:?}"
        );
        assert_eq!(
            regions.iter().filter(|r| **r == AWS).count(),
            2,
            "chunk {i}: {held:?}"
        );
        assert_eq!(
            regions.iter().filter(|r| **r == GCP).count(),
            1,
            "chunk {i}: {held:?} (gcp is the nearest other region)"
        );
    }

    // The reader is the gcp node that does not hold the first chunk: the other gcp node does.
    let gcp: Vec<&str> = run
        .storage_nodes()
        .filter(|n| n.region == GCP)
        .map(|n| n.name.as_str())
        .collect();
    let holder = gcp
        .iter()
        .copied()
        .find(|n| chunks[0].1.iter().any(|h| h == n))
        .ok_or_else(|| anyhow!("no gcp node holds the first chunk"))?;
    let reader = gcp
        .iter()
        .copied()
        .find(|n| *n != holder)
        .ok_or_else(|| anyhow!("only one gcp node"))?;
    let remote_bytes: u64 = chunks
        .iter()
        .filter(|(_, held)| !held.iter().any(|h| h == reader))
        .map(|(len, _)| len)
        .sum();

    let served = |name: &str| status(&run, name).map(|s| s.bytes_served);
    let before: BTreeMap<String, u64> = run
        .storage_nodes()
        .map(|n| Ok((n.name.clone(), served(&n.name)?)))
        .collect::<anyhow::Result<_>>()?;
    let (bytes, first_byte_ms) = get(&run, reader, &id)?;
    assert!(
        bytes == data,
        "the bytes read back differ from the bytes put"
    );

    let mut from_each = BTreeMap::new();
    for (name, was) in &before {
        from_each.insert(name.clone(), served(name)? - was);
    }
    eprintln!(
        "{reader} read {id}: first byte after {first_byte_ms:.1} ms; bytes served by each node: {from_each:?}"
    );
    assert!(
        from_each[holder] >= remote_bytes,
        "{holder} (the gcp holder) served {} bytes; {reader} lacked {remote_bytes}: {from_each:?}",
        from_each[holder]
    );
    let nearest_other_region = run.emulated_rtt(run.node(reader)?, run.node(writer)?)?;
    assert!(
        first_byte_ms < nearest_other_region.as_secs_f64() * 1000.0,
        "first byte after {first_byte_ms:.1} ms: not below the {:?} RTT to the nearest other region",
        nearest_other_region
    );

    // ec:4+2 from aws: the six shards of every chunk on six distinct holders, at most M = 2
    // per region, so losing any one region loses at most the parity. Azure reads it back.
    let (file, data) = run.random_file("shards.bin", 1 << 20)?;
    let id = put(
        &run,
        writer,
        &file,
        &["--chunker", "fixed:256KiB", "--redundancy", "ec:4+2"],
    )?;
    wait_settled(&run, writer)?;
    let stat: StatResponse = json(&run, writer, &["stat", &id])?;
    assert_eq!(stat.chunks.len(), 4);
    let names = run.names();
    for (i, chunk) in stat.chunks.iter().enumerate() {
        assert_eq!(chunk.shards.len(), 6, "chunk {i} has no shard list");
        let mut held = Vec::new();
        for shard in &chunk.shards {
            for holder in &shard.placed {
                let name = names
                    .get(&holder.id)
                    .ok_or_else(|| anyhow!("shard holder {} is not a node", holder.id))?;
                held.push(name.clone());
            }
        }
        let distinct: BTreeSet<&String> = held.iter().collect();
        assert_eq!(distinct.len(), 6, "chunk {i}: shards on {held:?}");
        for region in [AWS, GCP, AZURE] {
            let here = held
                .iter()
                .map(|h| region_of(&run, h))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .filter(|r| *r == region)
                .count();
            assert!(here <= 2, "chunk {i}: {here} shards in {region}: {held:?}");
        }
    }
    let azure = run
        .storage_nodes()
        .find(|n| n.region == AZURE)
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("no azure node"))?;
    let (bytes, _) = get(&run, &azure, &id)?;
    assert!(bytes == data, "the ec:4+2 bytes read back differ");
    run.passed();
    Ok(())
}

#[test]
fn a_killed_holder_and_a_partitioned_region_lose_no_data() -> anyhow::Result<()> {
    let _serial = one_at_a_time();
    let mut run = NetsimRun::up(&topology("three-clouds.toml"))?;
    wait_for_ranked_mesh(&run, Duration::from_secs(90))?;

    // Kill the gcp holder of the first chunk; the other gcp node still reads the exact bytes.
    let writer = "aws-us-east-1-1";
    let (file, data) = run.random_file("before-kill.bin", 4 << 20)?;
    let id = put(&run, writer, &file, &[])?;
    wait_settled(&run, writer)?;
    let chunks = holders(&run, writer, &id)?;
    let victim = chunks[0]
        .1
        .iter()
        .find(|h| region_of(&run, h).is_ok_and(|r| r == GCP))
        .cloned()
        .ok_or_else(|| anyhow!("no gcp holder: {:?}", chunks[0]))?;
    run.netsim(&["kill", &victim])?;
    let reader = run
        .storage_nodes()
        .find(|n| n.region == GCP && n.name != victim)
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("no other gcp node"))?;
    let (bytes, _) = get(&run, &reader, &id)?;
    assert!(
        bytes == data,
        "read after the kill differs from the bytes put"
    );

    // Cut azure off. Puts on the US side still reach their quorum.
    run.netsim(&["partition", AZURE, "--from", &format!("{AWS},{GCP}")])?;
    let mut written = Vec::new();
    for i in 0..3 {
        let (file, data) = run.random_file(&format!("partitioned-{i}.bin"), 1 << 20)?;
        let started = Instant::now();
        let id = put(&run, "aws-us-east-1-2", &file, &[])
            .with_context(|| format!("put {i} during the partition"))?;
        eprintln!("put {i} during the partition took {:?}", started.elapsed());
        written.push((id, data));
    }

    // After the heal, an azure node reads every one of them.
    run.netsim(&["heal"])?;
    let azure = run
        .storage_nodes()
        .find(|n| n.region == AZURE)
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow!("no azure node"))?;
    for (id, data) in &written {
        let bytes = wait_for(
            "the azure node to read an object put during the partition",
            Duration::from_secs(120),
            || Ok(Some(get(&run, &azure, id)?.0)),
        )?;
        assert!(&bytes == data, "azure read different bytes for {id}");
    }
    run.passed();
    Ok(())
}

#[test]
fn in_24_nodes_every_node_knows_every_other_within_30_seconds() -> anyhow::Result<()> {
    let _serial = one_at_a_time();
    let run = NetsimRun::up(&topology("six-regions.toml"))?;
    let started = Instant::now();
    let names = run.names();
    let all: BTreeSet<&str> = run.storage_nodes().map(|n| n.name.as_str()).collect();
    assert_eq!(all.len(), 24);
    let mut done = BTreeSet::new();
    wait_for(
        "all 24 nodes to know each other",
        Duration::from_secs(30),
        || {
            for node in run.storage_nodes() {
                if done.contains(&node.name) {
                    continue;
                }
                let known: BTreeSet<&str> = peers(&run, &node.name)?
                    .iter()
                    .filter(|p| p.role == "storage" && p.liveness == "alive")
                    .filter_map(|p| names.get(&p.id).map(String::as_str))
                    .collect();
                let missing = all.len() - 1 - known.len().min(all.len() - 1);
                ensure!(missing == 0, "{} misses {missing} nodes", node.name);
                done.insert(node.name.clone());
            }
            Ok(Some(()))
        },
    )?;
    eprintln!(
        "24 nodes knew each other {:.1} s after the last one started",
        started.elapsed().as_secs_f64()
    );
    run.passed();
    Ok(())
}
