//! `netsim demo`, the README's first command, end to end with the debug binaries `cargo test
//! --workspace` builds: once behind the emulated WAN (root; without it this test fails, it does
//! not skip) and once in loopback mode, the mode a machine without root gets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::{Mutex, PoisonError};

/// The two demos take turns: each starts seven processes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `netsim demo` with `extra` arguments; returns what it printed, after checking it
/// succeeded and walked through every step.
fn demo(extra: &[&str]) -> String {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let bin = mesh_tests::netsim::bin_dir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let out = Command::new(bin.join("netsim"))
        .arg("demo")
        .arg("--run-dir")
        .arg(run.path())
        .arg("--bin-dir")
        .arg(&bin)
        .args(["--size-mib", "4"])
        .args(extra)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "netsim demo failed:\n{printed}");
    for step in 1..=7 {
        assert!(
            printed.contains(&format!("== {step}. ")),
            "step {step} missing:\n{printed}"
        );
    }
    assert!(
        printed.contains("same bytes, same BLAKE3"),
        "the demo did not check the bytes read back:\n{printed}"
    );
    printed
}

#[test]
fn the_demo_runs_across_three_emulated_clouds() {
    assert!(
        mesh_netsim::netns::have_privileges(),
        "this test needs root and /dev/net/tun (the demo's default mode when root)"
    );
    let printed = demo(&[]);
    // The holders are listed with their zone and the RTT the writer measured to them: a
    // holder in another cloud is tens of milliseconds away.
    let remote_rtts: Vec<f64> = printed
        .lines()
        .filter(|l| l.contains(" holds ") && (l.contains("gcp/") || l.contains("azure/")))
        .filter_map(|l| {
            let after = l.split("RTT").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert!(
        remote_rtts.iter().any(|&rtt| rtt >= 20.0),
        "no holder in another cloud with a WAN RTT:\n{printed}"
    );
}

#[test]
fn the_demo_runs_on_loopback_without_the_wan() {
    let printed = demo(&["--loopback"]);
    assert!(
        printed.contains("loopback mode emulates no latency"),
        "the demo did not say what loopback mode leaves out:\n{printed}"
    );
}
