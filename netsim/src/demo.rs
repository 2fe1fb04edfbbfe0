//! `netsim demo`: a guided tour of a mesh across three clouds, for a newcomer.
//!
//! Starts `netsim up` on the shipped `three-clouds` topology (as a child process, exactly as a
//! user would), waits until the nodes know each other, puts a random file from an aws node,
//! shows where its replicas went, kills one holder, reads the file back from a gcp node and
//! checks it byte for byte and by BLAKE3, then tears everything down. It drives the mesh only
//! through `netsim exec ... -- meshctl`, so it shows the commands a person would type. Every
//! step either succeeds or ends the demo with an error and a non-zero exit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::RngCore;

use crate::driver::Driver;
use crate::state::{self, Mode};

/// The topology the demo runs, shipped inside the binary.
const THREE_CLOUDS: &str = include_str!("../topologies/three-clouds.toml");
const WRITER: &str = "aws-us-east-1-1";

#[derive(Debug, Clone)]
pub struct Options {
    pub run_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub mode: Mode,
    pub size_mib: usize,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    println!("== 1. a mesh in three clouds");
    match options.mode {
        Mode::Netns => println!(
            "Six meshd nodes, two each in aws/us-east-1, gcp/us-central1 and azure/westeurope, plus a\n\
             bootstrap peer. Each runs in its own network namespace; netsim's router gives the links\n\
             about 1 ms RTT inside a region, 30 ms aws<->gcp, 85 ms aws<->azure and 100 ms gcp<->azure."
        ),
        Mode::Loopback => println!(
            "Six meshd nodes in three zones (aws, gcp, azure) plus a bootstrap peer, all on 127.0.0.1:\n\
             loopback mode emulates no latency, so placement sees every peer as equally near."
        ),
    }
    let (demo, state) = Driver::up(
        &options.run_dir,
        options.bin_dir.as_deref(),
        "three-clouds",
        THREE_CLOUDS,
        options.mode,
    )?;
    let run_dir = demo.run_dir().to_path_buf();
    crate::cluster::print_table(&state);
    let storage_nodes = state
        .nodes
        .iter()
        .filter(|n| n.role == state::Role::Node)
        .count();

    println!("\n== 2. the nodes find each other through the bootstrap peer");
    let peers = demo.wait_peers(WRITER, storage_nodes - 1, Duration::from_secs(60))?;
    println!(
        "{WRITER} sees {} storage peers; measured RTTs:",
        peers.len()
    );
    for peer in &peers {
        println!("  {:<22} {:>7.1} ms", peer.zone, peer.rtt_ms);
    }

    println!(
        "\n== 3. put a {} MiB file from {WRITER} (rep:3)",
        options.size_mib
    );
    let input = run_dir.join("demo-input.bin");
    let mut data = vec![0u8; options.size_mib << 20];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&input, &data).context("cannot write the demo file")?;
    let input_hash = blake3::hash(&data);
    let input_str = input.display().to_string();
    let started = Instant::now();
    let put = demo.meshctl_json(WRITER, &["put", &input_str])?;
    let put_time = started.elapsed();
    let id = put["id"]
        .as_str()
        .ok_or_else(|| anyhow!("meshctl put printed no id: {put}"))?
        .to_string();
    println!("$ netsim exec {WRITER} -- meshctl put {input_str}");
    println!(
        "object {id}\nstored in {:.2} s (BLAKE3 of the file {})",
        put_time.as_secs_f64(),
        input_hash.to_hex()
    );

    println!("\n== 4. where the replicas went");
    let stat = demo.meshctl_json(WRITER, &["stat", &id])?;
    let names: BTreeMap<&str, &str> = state
        .nodes
        .iter()
        .filter_map(|n| Some((n.peer_id.as_deref()?, n.name.as_str())))
        .collect();
    let mut holders: BTreeMap<String, (String, Option<f64>, usize)> = BTreeMap::new();
    for chunk in stat["chunks"]
        .as_array()
        .ok_or_else(|| anyhow!("meshctl stat printed no chunks"))?
    {
        for placed in chunk["placed"].as_array().into_iter().flatten() {
            let peer = placed["id"].as_str().unwrap_or("?");
            let name = names.get(peer).copied().unwrap_or(peer).to_string();
            let entry = holders.entry(name).or_insert((
                placed["zone"].as_str().unwrap_or("?").to_string(),
                placed["rtt_ms"].as_f64(),
                0,
            ));
            entry.2 += 1;
        }
    }
    let chunks = stat["chunks"].as_array().map(Vec::len).unwrap_or(0);
    println!(
        "{chunks} chunks, each on 3 holders; placement prefers near peers and keeps two zones:"
    );
    for (name, (zone, rtt, count)) in &holders {
        let rtt = rtt
            .map(|r| format!("{r:.1} ms"))
            .unwrap_or_else(|| "(writer)".into());
        println!("  {name:<22} {zone:<22} RTT {rtt:>9}  holds {count} chunks");
    }

    println!("\n== 5. kill a holder");
    let victim = holders
        .keys()
        .filter(|n| n.as_str() != WRITER)
        .max_by_key(|n| n.starts_with("gcp"))
        .cloned()
        .ok_or_else(|| anyhow!("no holder other than the writer"))?;
    demo.netsim(&["kill", &victim])?;
    println!("$ netsim kill {victim}");

    let reader = state
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .find(|n| n.starts_with("gcp") && *n != victim)
        .ok_or_else(|| anyhow!("no gcp node left to read from"))?
        .to_string();
    println!("\n== 6. get the file from {reader}");
    let output = run_dir.join("demo-output.bin");
    let _ = std::fs::remove_file(&output);
    let output_str = output.display().to_string();
    let started = Instant::now();
    demo.meshctl(&reader, &["get", &id, "-o", &output_str])?;
    let get_time = started.elapsed();
    let back = std::fs::read(&output).context("cannot read the fetched file")?;
    let back_hash = blake3::hash(&back);
    println!("$ netsim exec {reader} -- meshctl get {id} -o {output_str}");
    println!(
        "fetched in {:.2} s; BLAKE3 {}",
        get_time.as_secs_f64(),
        back_hash.to_hex()
    );
    if back != data {
        bail!(
            "the fetched file differs from the one put ({} vs {} bytes)",
            back.len(),
            data.len()
        );
    }
    println!("same bytes, same BLAKE3: the mesh served the file with one holder down.");

    println!("\n== 7. tear down");
    demo.down();
    println!(
        "everything netsim created is gone; logs and data stay in {}",
        run_dir.display()
    );
    Ok(())
}
