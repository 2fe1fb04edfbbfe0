//! The `mesh-bootstrap` binary as an operator runs it: its first log line names the address to
//! join with, that address survives a restart, and bad flags end it with a clear error.
//!
//! This test also makes `cargo test --workspace` build the binary, which the netsim latency
//! tests in `tests/` start inside network namespaces.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest the bootstrap peer may take to print its join address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a loopback port chosen by the OS and returns it with the address it
/// says nodes should pass to `--bootstrap`.
fn start(data_dir: &Path) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-bootstrap"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg("/ip4/127.0.0.1/udp/0/quic-v1")
        .env("NO_COLOR", "1")
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mesh-bootstrap");
    let stderr = child.stderr.take().expect("stderr is piped");
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .expect("mesh-bootstrap printed its join address");
        if let Some((_, addr)) = line.split_once("join with --bootstrap ") {
            return (running, addr.trim().to_string());
        }
    }
}

fn peer_id(addr: &str) -> &str {
    addr.rsplit_once("/p2p/")
        .map(|(_, id)| id)
        .unwrap_or_else(|| panic!("{addr} has no /p2p/ part"))
}

#[test]
fn prints_a_join_address_that_keeps_its_peer_id_across_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, addr) = start(dir.path());
    assert!(
        addr.starts_with("/ip4/127.0.0.1/udp/") && addr.contains("/quic-v1/p2p/12D3KooW"),
        "join address {addr:?} is not a full QUIC multiaddr with a peer id"
    );
    let id = peer_id(&addr).to_string();
    drop(first);

    let (_second, again) = start(dir.path());
    assert_eq!(
        peer_id(&again),
        id,
        "the peer id changed across a restart with the same data directory"
    );
    assert!(dir.path().join("identity.key").is_file());
}

#[test]
fn a_listen_address_that_is_not_a_multiaddr_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-bootstrap"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--listen")
        .arg("0.0.0.0:4001")
        .output()
        .expect("run mesh-bootstrap");
    assert!(!out.status.success(), "a bad --listen was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mesh-bootstrap: error:") && stderr.contains("0.0.0.0:4001"),
        "the error does not name the bad address: {stderr}"
    );
}
