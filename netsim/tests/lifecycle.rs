//! `netsim up` and friends through real namespaces, with stand-in `meshd` and `mesh-bootstrap`
//! scripts that print the start lines netsim waits for and then sleep: this tests the
//! harness (namespaces, addresses, the control socket, kill/restart, crash cleanup) without
//! building the node. Needs root: without it these tests fail (they do not skip).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_netsim::state::{self, ProcessState};

const FAKE_BOOTSTRAP: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --listen) listen=$2; shift;; esac; shift; done
echo "INFO mesh_bootstrap: mesh-bootstrap started; join with --bootstrap $listen/p2p/12D3KooFakeBootstrap" >&2
exec sleep 600
"#;

const FAKE_MESHD: &str = r#"#!/bin/sh
if [ "$1" = init ]; then touch "$3"; exit 0; fi
echo "INFO mesh_node: meshd started peer=12D3KooFake$$ api=x" >&2
exec sleep 600
"#;

fn require_root() {
    assert!(
        mesh_netsim::netns::have_privileges(),
        "this test needs root and /dev/net/tun (network namespaces and TUN devices)"
    );
}

fn fake_bin_dir(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for (name, script) in [("mesh-bootstrap", FAKE_BOOTSTRAP), ("meshd", FAKE_MESHD)] {
        let path = bin.join(name);
        std::fs::write(&path, script).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    bin
}

fn topology() -> PathBuf {
    mesh_netsim::topology::shipped("three-clouds.toml")
}

fn netsim(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netsim"))
        .args(args)
        .env("NETSIM_RUN_DIR", run_dir)
        .output()
        .expect("run netsim")
}

fn start_up(run_dir: &Path, bin: &Path) -> Child {
    start_topology(run_dir, bin, &topology())
}

fn start_topology(run_dir: &Path, bin: &Path, topology: &Path) -> Child {
    up_command(run_dir, bin, topology)
        .stdout(Stdio::null())
        .spawn()
        .expect("start netsim up")
}

/// `netsim up TOPOLOGY` on `run_dir` with the stand-in binaries; standard error discarded.
fn up_command(run_dir: &Path, bin: &Path, topology: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_netsim"));
    command
        .arg("up")
        .arg(topology)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--bin-dir")
        .arg(bin)
        .stderr(Stdio::null());
    command
}

/// Waits until `check` holds, failing after `limit`.
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_running(run_dir: &Path) -> bool {
    state::load(run_dir).is_ok_and(|s| {
        s.nodes.iter().all(|n| n.state == ProcessState::Running)
            && state::socket_path(run_dir).exists()
    })
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn up_commands_crash_and_cleanup() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = fake_bin_dir(dir.path());
    let run_dir = dir.path().join("run");

    let mut up = start_up(&run_dir, &bin);
    wait_for("every process to start", Duration::from_secs(30), || {
        all_running(&run_dir)
    });
    let run = state::load(&run_dir).expect("state");
    assert_eq!(run.nodes.len(), 7);
    for ns in &run.namespaces {
        assert!(mesh_netsim::netns::exists(ns), "{ns}");
    }

    // The node's own address is on its TUN, inside its namespace.
    let out = netsim(
        &run_dir,
        &[
            "exec",
            "gcp-us-central1-1",
            "--",
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "tun0",
        ],
    );
    assert!(text(&out).contains("10.77.2.1/16"), "{}", text(&out));

    let out = netsim(&run_dir, &["kill", "aws-us-east-1-2"]);
    assert!(out.status.success(), "{}", text(&out));
    let killed = state::load(&run_dir).expect("state");
    assert_eq!(
        killed.node("aws-us-east-1-2").map(|n| n.state.clone()),
        Some(ProcessState::Killed)
    );
    let out = netsim(&run_dir, &["restart", "aws-us-east-1-2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(all_running(&run_dir));

    let out = netsim(
        &run_dir,
        &[
            "partition",
            "azure/westeurope",
            "--from",
            "aws/us-east-1,gcp/us-central1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = netsim(
        &run_dir,
        &["partition", "mars/olympus", "--from", "aws/us-east-1"],
    );
    assert!(
        !out.status.success() && text(&out).contains("no region named"),
        "{}",
        text(&out)
    );
    let out = netsim(&run_dir, &["heal"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = netsim(
        &run_dir,
        &[
            "up",
            topology().to_str().expect("utf-8"),
            "--bin-dir",
            bin.to_str().expect("utf-8"),
        ],
    );
    assert!(text(&out).contains("already up"), "{}", text(&out));

    // A crash of netsim takes its children along (parent-death signal) ...
    let pids: Vec<u32> = state::load(&run_dir)
        .expect("state")
        .nodes
        .iter()
        .filter_map(|n| n.pid)
        .collect();
    up.kill().expect("kill -9 netsim up");
    let _ = up.wait();
    wait_for(
        "children to die with netsim",
        Duration::from_secs(5),
        || pids.iter().all(|pid| !state::process_alive(*pid, "sleep")),
    );
    // ... and `down` removes the namespaces it left.
    let out = netsim(&run_dir, &["down"]);
    assert!(text(&out).contains("had crashed"), "{}", text(&out));
    for ns in &run.namespaces {
        assert!(!mesh_netsim::netns::exists(ns), "{ns} is left");
    }

    // A clean run and a clean `down`.
    let mut up = start_up(&run_dir, &bin);
    wait_for("every process to start", Duration::from_secs(30), || {
        all_running(&run_dir)
    });
    let second = state::load(&run_dir).expect("state");
    let out = netsim(&run_dir, &["down"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(up.wait().expect("up exits").success());
    for ns in &second.namespaces {
        assert!(!mesh_netsim::netns::exists(ns), "{ns} is left");
    }
    assert!(!state::state_path(&run_dir).exists());
}

#[test]
fn scripted_events_kill_restart_partition_and_heal_on_time() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = fake_bin_dir(dir.path());
    let run_dir = dir.path().join("run");
    let mut text = std::fs::read_to_string(topology()).expect("three-clouds");
    text.push_str(
        r#"
[[event]]
at = "1s"
action = "kill"
node = "aws-us-east-1-2"

[[event]]
at = "2s"
action = "partition"
regions = ["azure/westeurope"]
from = ["aws/us-east-1", "gcp/us-central1"]

[[event]]
at = "4s"
action = "restart"
node = "aws-us-east-1-2"

[[event]]
at = "5s"
action = "heal"
"#,
    );
    let scripted = dir.path().join("scripted.toml");
    std::fs::write(&scripted, text).expect("write topology");

    let mut up = start_topology(&run_dir, &bin, &scripted);
    wait_for("every process to start", Duration::from_secs(30), || {
        all_running(&run_dir)
    });
    let first_pid = state::load(&run_dir)
        .expect("state")
        .node("aws-us-east-1-2")
        .and_then(|n| n.pid);
    // Each event's effect shows in the run's state, in order.
    let node_state = || {
        state::load(&run_dir)
            .ok()
            .and_then(|s| s.node("aws-us-east-1-2").map(|n| (n.state.clone(), n.pid)))
    };
    wait_for("the scripted kill", Duration::from_secs(15), || {
        node_state().is_some_and(|(s, _)| s == ProcessState::Killed)
    });
    wait_for("the scripted partition", Duration::from_secs(15), || {
        state::load(&run_dir).is_ok_and(|s| {
            s.partitions
                .iter()
                .any(|(a, b)| a == &["azure/westeurope"] && b.len() == 2)
        })
    });
    wait_for("the scripted restart", Duration::from_secs(15), || {
        node_state().is_some_and(|(s, pid)| s == ProcessState::Running && pid != first_pid)
    });
    wait_for("the scripted heal", Duration::from_secs(15), || {
        state::load(&run_dir).is_ok_and(|s| s.partitions.is_empty())
    });
    let out = netsim(&run_dir, &["down"]);
    assert!(out.status.success(), "{}", self::text(&out));
    assert!(up.wait().expect("up exits").success());
}

#[test]
fn sigterm_tears_down_and_the_next_up_cleans_a_crashed_run() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = fake_bin_dir(dir.path());
    let run_dir = dir.path().join("run");

    // SIGTERM (a service manager stopping it; Ctrl-C is SIGINT, handled the same way) takes
    // every process and namespace along, and `up` exits by itself.
    let mut up = start_up(&run_dir, &bin);
    wait_for("every process to start", Duration::from_secs(30), || {
        all_running(&run_dir)
    });
    let first = state::load(&run_dir).expect("state");
    let pids: Vec<u32> = first.nodes.iter().filter_map(|n| n.pid).collect();
    assert_eq!(pids.len(), 7);
    let sent = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    wait_for(
        "netsim up to exit after SIGTERM",
        Duration::from_secs(30),
        || matches!(up.try_wait(), Ok(Some(_))),
    );
    assert!(
        pids.iter().all(|pid| !state::process_alive(*pid, "sleep")),
        "a child outlived netsim up"
    );
    for ns in &first.namespaces {
        assert!(
            !mesh_netsim::netns::exists(ns),
            "{ns} is left after SIGTERM"
        );
    }
    assert!(
        !state::state_path(&run_dir).exists(),
        "the state file is left"
    );

    // A crash (SIGKILL) cannot clean up: its children die with it, its namespaces stay ...
    let mut up = start_up(&run_dir, &bin);
    wait_for("every process to start", Duration::from_secs(30), || {
        all_running(&run_dir)
    });
    let crashed = state::load(&run_dir).expect("state");
    up.kill().expect("kill -9 netsim up");
    let _ = up.wait();
    assert!(
        crashed
            .namespaces
            .iter()
            .all(|ns| mesh_netsim::netns::exists(ns)),
        "a crash left no namespaces to clean"
    );
    // ... and the next `up` removes them before it starts its own run.
    let up = up_command(&run_dir, &bin, &topology())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netsim up");
    // (The crashed run's state file says "running" too until the new run replaces it.)
    wait_for("the new run to start", Duration::from_secs(30), || {
        state::load(&run_dir).is_ok_and(|s| s.run != crashed.run) && all_running(&run_dir)
    });
    for ns in &crashed.namespaces {
        assert!(
            !mesh_netsim::netns::exists(ns),
            "{ns} of the crashed run is left"
        );
    }
    let third = state::load(&run_dir).expect("state");
    let out = netsim(&run_dir, &["down"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = up.wait_with_output().expect("up exits");
    let printed = text(&printed);
    assert!(
        printed.contains(&format!("cleaned up after run {}", crashed.run)),
        "{printed}"
    );
    for ns in &third.namespaces {
        assert!(!mesh_netsim::netns::exists(ns), "{ns} is left");
    }
}
