//! The `meshd` binary: configuration errors, data-directory problems, the directory lock and
//! graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn meshd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshd"));
    // Keep the developer's environment out of the test.
    for (key, _) in std::env::vars() {
        if key.starts_with("MESH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs meshd expecting it to exit at once with an error; returns stderr.
fn start_error(args: &[&str]) -> String {
    let out = meshd().args(args).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "meshd {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts meshd on `data_dir` with JSON logs and waits for its "meshd started" line.
fn start(data_dir: &Path) -> (Child, String) {
    let mut child = meshd()
        .args([
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--api-addr",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "meshd started"
            {
                let _ = tx.send(v["fields"]["api"].as_str().unwrap_or_default().to_owned());
                sent = true;
            }
        }
    });
    let api = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("meshd did not report that it started");
    (child, api)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "meshd did not exit within {timeout:?}"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn invalid_config_files_are_refused_with_the_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("colour = \"blue\"\n", "colour"),
        ("[store]\nmin_blob_size = \"huge\"\n", "huge"),
        ("redundancy = \"rep:0\"\n", "rep:0"),
        ("redundancy = \"ec:70+2\"\n", "K+M <= 64"),
        ("api_addr = \"not an address\"\n", "api_addr"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = start_error(&[
            "--config",
            path.to_str().unwrap(),
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ]);
        assert!(
            err.contains(expected),
            "config {text:?}: stderr {err:?} should mention {expected:?}"
        );
        assert!(
            err.contains(path.to_str().unwrap()),
            "stderr {err:?} should name the file"
        );
    }
    let err = start_error(&["--redundancy", "rep:99"]);
    assert!(err.contains("rep:99"), "{err}");
    let err = start_error(&["--bootstrap", "/ip4/10.0.0.1/udp/4001/quic-v1"]);
    assert!(
        err.contains("net.bootstrap") && err.contains("/p2p/"),
        "a bootstrap address without a peer id: {err}"
    );
    let err = start_error(&["--listen", "not-a-multiaddr"]);
    assert!(err.contains("net.listen"), "{err}");
    let err = start_error(&["--cluster-key-file", "/nonexistent/cluster.key"]);
    assert!(err.contains("/nonexistent/cluster.key"), "{err}");
}

#[test]
fn environment_overrides_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshd()
        .env("MESH_STORE__MIN_BLOB_SIZE", "lots")
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MESH_STORE__MIN_BLOB_SIZE") && err.contains("lots"),
        "{err}"
    );
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let data_dir = file.join("data");
    let err = start_error(&[
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--api-addr",
        "127.0.0.1:0",
    ]);
    assert!(
        err.contains("cannot use data directory") && err.contains(data_dir.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn a_second_meshd_on_the_same_data_dir_is_refused_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut first, api) = start(&data);
    assert!(api.starts_with("127.0.0.1:"), "{api}");

    let err = start_error(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--api-addr",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("in use by another meshd"), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");

    let token_path = data.join("api.token");
    let token = std::fs::read_to_string(&token_path).unwrap();
    let key = std::fs::read(data.join("identity.key")).unwrap();

    sigterm(&first);
    let status = wait_exit(&mut first, Duration::from_secs(30));
    assert!(
        status.success(),
        "meshd exited with {status:?} after SIGTERM"
    );

    // A restart reuses the identity and token, and takes the lock again.
    let (mut second, _) = start(&data);
    assert_eq!(std::fs::read_to_string(&token_path).unwrap(), token);
    assert_eq!(std::fs::read(data.join("identity.key")).unwrap(), key);
    sigterm(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(30)).success());
}
