//! End-to-end tests of the `meshctl` binary against a real node running in this process.
//!
//! Each test starts its own node (temporary data directory, API on an OS-assigned port) and
//! runs the built binary as a child process on a blocking thread, so the node keeps serving on
//! the test's runtime meanwhile.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mesh_proto::api::{
    DeleteResponse, ObjectSummary, PeersResponse, PutResponse, StatResponse, StatusResponse,
};
use mesh_proto::{ChunkerSpec, ObjectId, RecordFormat};
use mesh_tests::{TestNode, random_bytes};

/// One finished run of the binary.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }

    /// Asserts success and returns stdout as text.
    fn ok(&self) -> String {
        assert_eq!(self.code, 0, "meshctl failed: {}", self.stderr);
        self.stdout_text()
    }

    /// Asserts exit `code` and an error line on stderr that contains `needle`.
    fn fails(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code,
            code,
            "stdout: {}\nstderr: {}",
            self.stdout_text(),
            self.stderr
        );
        assert!(
            self.stderr.starts_with("meshctl: error: "),
            "{}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "expected {needle:?} in {:?}",
            self.stderr
        );
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

/// A `meshctl` invocation being put together.
#[derive(Debug, Default)]
struct Meshctl {
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    cwd: Option<PathBuf>,
}

impl Meshctl {
    /// No preset options.
    fn bare() -> Self {
        Self::default()
    }

    /// With `--api` and `--token` of `node`.
    fn on(node: &TestNode) -> Self {
        Self::bare().args(["--api", &node.api_url(), "--token", &node.token()])
    }

    fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    fn arg(self, arg: impl Into<OsString>) -> Self {
        self.args([arg])
    }

    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    async fn run(self) -> Output {
        tokio::task::spawn_blocking(move || {
            let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
            command
                .args(&self.args)
                .env_remove("MESH_API")
                .env_remove("MESH_API_TOKEN")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(if self.stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(dir) = &self.cwd {
                command.current_dir(dir);
            }
            let mut child = command.spawn().unwrap();
            // Fed from its own thread, so a child that fills its stdout pipe cannot deadlock
            // against a parent still writing to its stdin.
            let feeder = self.stdin.map(|bytes| {
                let mut pipe = child.stdin.take().unwrap();
                std::thread::spawn(move || {
                    let _ = pipe.write_all(&bytes);
                })
            });
            let output = child.wait_with_output().unwrap();
            if let Some(feeder) = feeder {
                feeder.join().unwrap();
            }
            Output {
                code: output.status.code().unwrap_or(-1),
                stdout: output.stdout,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        })
        .await
        .unwrap()
    }
}

async fn put_file(node: &TestNode, path: &Path, extra: &[&str]) -> ObjectId {
    let out = Meshctl::on(node)
        .arg("put")
        .arg(path)
        .args(extra)
        .run()
        .await
        .ok();
    out.trim().parse().unwrap()
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A port on which nothing listens (bound by the OS, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

const UNKNOWN_ID: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_chunk_file_round_trips_through_put_and_get() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir().join("work");
    std::fs::create_dir(&dir).unwrap();
    let data = random_bytes(5 << 20, 1);
    let input = dir.join("in.bin");
    std::fs::write(&input, &data).unwrap();

    let put: PutResponse = Meshctl::on(&node)
        .args(["--json", "put"])
        .arg(&input)
        .run()
        .await
        .json();
    assert_eq!(put.size, data.len() as u64);
    assert!(
        put.chunks > 1,
        "5 MiB with the default cdc chunker is several chunks: {put:?}"
    );

    let output = dir.join("out.bin");
    let printed = Meshctl::on(&node)
        .args(["get", &put.id.to_string(), "-o"])
        .arg(&output)
        .run()
        .await
        .ok();
    assert_eq!(printed.trim(), output.display().to_string());
    assert!(
        std::fs::read(&output).unwrap() == data,
        "downloaded bytes differ"
    );
    assert_eq!(
        listing(&dir),
        ["in.bin", "out.bin"],
        "no temporary file is left behind"
    );

    let stat: StatResponse = Meshctl::on(&node)
        .args(["stat", "--json", &put.id.to_string()])
        .run()
        .await
        .json();
    assert_eq!(stat.object.name.as_deref(), Some("in.bin"));
    assert_eq!(stat.object.size, data.len() as u64);
    assert_eq!(stat.chunker, ChunkerSpec::DEFAULT_CDC);
    assert_eq!(stat.chunks.len() as u64, put.chunks);
    let mut offset = 0;
    for chunk in &stat.chunks {
        assert_eq!(chunk.offset, offset);
        offset += u64::from(chunk.len);
    }
    assert_eq!(offset, data.len() as u64);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_goes_in_and_stdout_comes_out() {
    let node = TestNode::start().await.unwrap();
    let data = random_bytes(3 << 20 | 123, 2);

    let id = Meshctl::on(&node)
        .args(["put", "-"])
        .stdin(data.clone())
        .run()
        .await
        .ok();
    let id: ObjectId = id.trim().parse().unwrap();
    let out = Meshctl::on(&node)
        .args(["get", &id.to_string(), "-o", "-"])
        .run()
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout == data, "stdout differs from what went in");

    let listed: Vec<ObjectSummary> = Meshctl::on(&node).args(["ls", "--json"]).run().await.json();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].name, None, "stdin has no name");

    // Without -o and without a name, the file is named after the id.
    let cwd = node.scratch_dir().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    Meshctl::on(&node)
        .args(["get", &id.to_string()])
        .cwd(&cwd)
        .run()
        .await
        .ok();
    assert!(std::fs::read(cwd.join(id.to_string())).unwrap() == data);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_comes_from_the_flag_the_environment_or_the_data_dir() {
    let node = TestNode::start().await.unwrap();
    let api = node.api_url();

    let by_data_dir = Meshctl::bare()
        .args(["--api", &api, "--data-dir"])
        .arg(node.data_dir())
        .arg("status")
        .run()
        .await;
    assert!(by_data_dir.ok().contains("node id"));

    let by_env = Meshctl::bare()
        .args(["--api", &api, "status", "--json"])
        .env("MESH_API_TOKEN", &node.token())
        .run()
        .await;
    let status: StatusResponse = by_env.json();
    assert_eq!(status.objects, 0);

    // The flag comes first: a wrong --token is refused even when the data dir has the right one.
    Meshctl::bare()
        .args(["--api", &api, "--token", "wrong", "--data-dir"])
        .arg(node.data_dir())
        .arg("status")
        .run()
        .await
        .fails(5, "token was refused");

    let empty = node.scratch_dir().join("no-token-here");
    std::fs::create_dir(&empty).unwrap();
    let out = Meshctl::bare()
        .args(["--api", &api, "--data-dir"])
        .arg(&empty)
        .arg("ls")
        .run()
        .await;
    out.fails(1, "no API token");
    for hint in ["--token", "MESH_API_TOKEN", "--data-dir", "api.token"] {
        assert!(
            out.stderr.contains(hint),
            "{hint} missing from {}",
            out.stderr
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_overwrites_an_existing_file_only_with_force() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir();
    let input = dir.join("data.bin");
    let data = random_bytes(700_000, 3);
    std::fs::write(&input, &data).unwrap();
    let id = put_file(&node, &input, &[]).await.to_string();

    let target = dir.join("existing.bin");
    std::fs::write(&target, b"keep me").unwrap();
    let out = Meshctl::on(&node)
        .args(["get", &id, "-o"])
        .arg(&target)
        .run()
        .await;
    out.fails(
        1,
        &format!("{} exists; pass --force to overwrite it", target.display()),
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");

    // The name from the manifest is refused the same way.
    let out = Meshctl::on(&node).args(["get", &id]).cwd(dir).run().await;
    out.fails(1, "data.bin exists; pass --force");
    assert!(std::fs::read(&input).unwrap() == data);

    Meshctl::on(&node)
        .args(["get", &id, "--force", "-o"])
        .arg(&target)
        .run()
        .await
        .ok();
    assert!(std::fs::read(&target).unwrap() == data);
    assert_eq!(
        listing(dir)
            .iter()
            .filter(|n| n.ends_with(".mesh-tmp"))
            .count(),
        0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_names_the_file_after_the_object_but_only_in_the_current_directory() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir();
    let input = dir.join("x");
    std::fs::write(&input, b"a,b\n1,2\n").unwrap();
    let id = put_file(
        &node,
        &input,
        &["--name", "../../outside/report.csv", "--records", "csv"],
    )
    .await
    .to_string();

    let cwd = dir.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let printed = Meshctl::on(&node)
        .args(["get", &id])
        .cwd(&cwd)
        .run()
        .await
        .ok();
    assert_eq!(printed.trim(), "report.csv");
    assert_eq!(
        std::fs::read(cwd.join("report.csv")).unwrap(),
        b"a,b\n1,2\n"
    );
    assert_eq!(listing(&cwd), ["report.csv"]);

    let stat: StatResponse = Meshctl::on(&node)
        .args(["--json", "stat", &id])
        .run()
        .await
        .json();
    assert_eq!(stat.chunker, ChunkerSpec::records(RecordFormat::Csv));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_object_id_is_a_usage_error() {
    for args in [["get", "xyz"], ["stat", "not-an-id"], ["rm", "abc"]] {
        let out = Meshctl::bare()
            .args(["--token", "t"])
            .args(args)
            .run()
            .await;
        out.fails(2, "64 hex characters");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_object_is_not_found() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir();
    let target = dir.join("never.bin");
    let out = Meshctl::on(&node)
        .args(["get", UNKNOWN_ID, "-o"])
        .arg(&target)
        .run()
        .await;
    out.fails(3, &format!("object {UNKNOWN_ID} not found"));
    assert!(!target.exists());
    assert_eq!(
        listing(dir)
            .iter()
            .filter(|n| n.ends_with(".mesh-tmp"))
            .count(),
        0
    );

    Meshctl::on(&node)
        .args(["stat", UNKNOWN_ID])
        .run()
        .await
        .fails(3, "not found");
    Meshctl::on(&node)
        .args(["rm", UNKNOWN_ID])
        .run()
        .await
        .fails(3, "not found");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_is_reported_with_how_to_start_it() {
    let api = format!("http://127.0.0.1:{}", closed_port());
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("in.bin");
    std::fs::write(&input, b"bytes").unwrap();

    let out = Meshctl::bare()
        .args([
            "--api",
            &api,
            "--token",
            "t",
            "--data-dir",
            "/srv/mesh",
            "status",
        ])
        .run()
        .await;
    out.fails(4, &format!("cannot reach meshd at {api}"));
    assert!(
        out.stderr
            .contains("is it running? start it with `meshd --data-dir /srv/mesh`")
    );

    let out = Meshctl::bare()
        .args(["--api", &api, "--token", "t", "put"])
        .arg(&input)
        .run()
        .await;
    out.fails(4, "cannot reach meshd");
    let out = Meshctl::bare()
        .args(["--api", &api, "--token", "t", "get", UNKNOWN_ID])
        .run()
        .await;
    out.fails(4, "cannot reach meshd");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused() {
    let node = TestNode::start().await.unwrap();
    let input = node.scratch_dir().join("in.bin");
    std::fs::write(&input, random_bytes(2 << 20, 4)).unwrap();
    let api = node.api_url();
    for args in [vec!["status"], vec!["ls"], vec!["stat", UNKNOWN_ID]] {
        let out = Meshctl::bare()
            .args(["--api", &api, "--token", "wrong"])
            .args(args)
            .run()
            .await;
        out.fails(5, "the API token was refused");
    }
    let out = Meshctl::bare()
        .args(["--api", &api, "--token", "wrong", "put"])
        .arg(&input)
        .run()
        .await;
    out.fails(5, "the API token was refused");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ls_stat_rm_and_status_speak_text_and_json() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir();
    let small = dir.join("small.txt");
    std::fs::write(&small, b"hello mesh\n").unwrap();
    let fixed = dir.join("fixed.bin");
    std::fs::write(&fixed, random_bytes(200_000, 5)).unwrap();
    let small_id = put_file(&node, &small, &[]).await;
    let fixed_id = put_file(
        &node,
        &fixed,
        &["--chunker", "fixed:64KiB", "--redundancy", "rep:1"],
    )
    .await;

    let table = Meshctl::on(&node).arg("ls").run().await.ok();
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for column in ["ID", "SIZE", "CHUNKS", "REDUNDANCY", "NAME"] {
        assert!(header.contains(column), "{header}");
    }
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{table}");
    let fixed_row = rows
        .iter()
        .find(|r| r.starts_with(&fixed_id.to_string()))
        .unwrap();
    assert!(
        fixed_row.contains("195.3 KiB") && fixed_row.contains("rep:1"),
        "{fixed_row}"
    );
    assert!(fixed_row.ends_with("fixed.bin"), "{fixed_row}");

    let mut listed: Vec<ObjectSummary> =
        Meshctl::on(&node).args(["ls", "--json"]).run().await.json();
    listed.sort_by_key(|o| o.name.clone());
    assert_eq!(
        listed.iter().map(|o| o.id).collect::<Vec<_>>(),
        [fixed_id, small_id]
    );
    assert_eq!(listed[0].chunks, 4);

    let stat: StatResponse = Meshctl::on(&node)
        .args(["stat", &fixed_id.to_string(), "--json"])
        .run()
        .await
        .json();
    let lens: Vec<u32> = stat.chunks.iter().map(|c| c.len).collect();
    assert_eq!(lens, [65_536, 65_536, 65_536, 3_392]);
    let text = Meshctl::on(&node)
        .args(["stat", &fixed_id.to_string()])
        .run()
        .await
        .ok();
    for needle in [
        "fixed.bin",
        "fixed:65536",
        "rep:1",
        "OFFSET",
        "HOLDERS",
        "196608",
        "target",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }

    let status_text = Meshctl::on(&node).arg("status").run().await.ok();
    for key in [
        "node id",
        "version",
        "objects",
        "disk",
        "default redundancy",
        "zone",
        "listen addresses",
        "external addresses",
        "0 alive of 0 known",
    ] {
        assert!(
            status_text.contains(key),
            "{key} missing from\n{status_text}"
        );
    }
    let status: StatusResponse = Meshctl::on(&node)
        .args(["status", "--json"])
        .run()
        .await
        .json();
    assert_eq!(status.objects, 2);
    assert_eq!((status.peers, status.peers_alive), (0, 0));

    let removed: DeleteResponse = Meshctl::on(&node)
        .args(["--json", "rm", &fixed_id.to_string()])
        .run()
        .await
        .json();
    assert_eq!(removed.id, fixed_id);
    let text = Meshctl::on(&node)
        .args(["rm", &small_id.to_string()])
        .run()
        .await
        .ok();
    assert!(
        text.starts_with(&format!("removed {small_id}: freed ")),
        "{text}"
    );
    Meshctl::on(&node)
        .args(["rm", &small_id.to_string()])
        .run()
        .await
        .fails(3, "not found");

    let listed: Vec<ObjectSummary> = Meshctl::on(&node).args(["--json", "ls"]).run().await.json();
    assert!(listed.is_empty(), "{listed:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_on_a_lone_node_says_how_to_add_some() {
    let node = TestNode::start().await.unwrap();
    let text = Meshctl::on(&node).arg("peers").run().await.ok();
    assert_eq!(
        text,
        "no peers known; start other nodes with --bootstrap <addr>\n"
    );
    let peers: PeersResponse = Meshctl::on(&node)
        .args(["peers", "--json"])
        .run()
        .await
        .json();
    assert!(peers.peers.is_empty(), "{peers:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_below_its_write_quorum_fails_with_the_nodes_message() {
    let node = TestNode::start().await.unwrap();
    let input = node.scratch_dir().join("in.bin");
    std::fs::write(&input, random_bytes(100_000, 8)).unwrap();

    // A lone node holds one copy; rep:2's default quorum is two.
    let out = Meshctl::on(&node)
        .args(["put", "--redundancy", "rep:2"])
        .arg(&input)
        .run()
        .await;
    out.fails(1, "reached 1 of the 2 holders the write quorum needs");
    assert!(out.stdout.is_empty(), "{}", out.stdout_text());

    // Bad quorums are usage errors, caught before anything is sent.
    Meshctl::on(&node)
        .args(["put", "--quorum", "0"])
        .arg(&input)
        .run()
        .await
        .fails(2, "--quorum");
    Meshctl::on(&node)
        .args(["put", "--redundancy", "rep:2", "--quorum", "3"])
        .arg(&input)
        .run()
        .await
        .fails(2, "--quorum 3 is more than the 2 holders rep:2");

    // With a quorum of one the put succeeds, below its target.
    let id = put_file(&node, &input, &["--redundancy", "rep:2", "--quorum", "1"])
        .await
        .to_string();
    let stat: StatResponse = Meshctl::on(&node)
        .args(["--json", "stat", &id])
        .run()
        .await
        .json();
    assert!(!stat.meets_target);
    for chunk in &stat.chunks {
        assert_eq!(chunk.holders.len(), 1, "{chunk:?}");
        assert!(
            chunk.placed.iter().any(|h| h.liveness == "self"),
            "{chunk:?}"
        );
    }
    let text = Meshctl::on(&node).args(["stat", &id]).run().await.ok();
    for needle in ["NOT met", "fewer than 2 holders", "1/2", "self"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_output_fails_cleanly() {
    let node = TestNode::start().await.unwrap();
    let dir = node.scratch_dir().join("work");
    std::fs::create_dir(&dir).unwrap();
    let input = dir.join("in.bin");
    std::fs::write(&input, random_bytes(300_000, 6)).unwrap();
    let id = put_file(&node, &input, &[]).await.to_string();

    // Tests run as root, where permission bits do not stop writes; a parent that is a regular
    // file does.
    let blocker = dir.join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let target = blocker.join("out.bin");
    for force in [false, true] {
        let mut cmd = Meshctl::on(&node).args(["get", &id, "-o"]).arg(&target);
        if force {
            cmd = cmd.arg("--force");
        }
        cmd.run().await.fails(1, &target.display().to_string());
    }
    assert_eq!(listing(&dir), ["blocker", "in.bin"]);

    // A directory is not a file to write.
    Meshctl::on(&node)
        .args(["get", &id, "--force", "-o"])
        .arg(&dir)
        .run()
        .await
        .fails(1, "is a directory");

    // The input side names its path too.
    let missing = dir.join("missing.bin");
    let out = Meshctl::on(&node).arg("put").arg(&missing).run().await;
    out.fails(1, &missing.display().to_string());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_the_node_refuses_mid_upload_shows_its_message() {
    let node = TestNode::start().await.unwrap();
    let input = node.scratch_dir().join("in.bin");
    std::fs::write(&input, random_bytes(4 << 20, 7)).unwrap();
    // The node answers before it has read the body, while meshctl is still sending it.
    let long_name = "n".repeat(mesh_proto::manifest::MAX_NAME_LEN + 1);
    let out = Meshctl::on(&node)
        .args(["put", "--name", &long_name])
        .arg(&input)
        .run()
        .await;
    out.fails(1, "object name is longer than");
    assert!(out.stderr.contains("400 Bad Request"), "{}", out.stderr);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_subcommand_prints_help_and_is_a_usage_error() {
    let out = Meshctl::bare().run().await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("Usage: meshctl"), "{}", out.stderr);
    assert!(
        !out.stderr.starts_with("meshctl: meshctl"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_policies_fail_early_with_protos_message() {
    for (flag, value, message) in [
        (
            "--redundancy",
            "raid5",
            "expected rep:N (e.g. rep:3) or ec:K+M",
        ),
        (
            "--redundancy",
            "rep:0",
            "the replica count must be a number from 1 to 16",
        ),
        (
            "--redundancy",
            "ec:4",
            "K (data shards) and M (parity shards)",
        ),
        (
            "--chunker",
            "fixed:10",
            "the fixed chunk size must be between",
        ),
        ("--chunker", "rabin", "expected cdc or fixed:SIZE"),
        ("--records", "xml", "expected jsonl or csv"),
    ] {
        let out = Meshctl::bare()
            .args(["--token", "t", "put", "-", flag, value])
            .run()
            .await;
        out.fails(2, message);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn help_documents_the_exit_codes() {
    let out = Meshctl::bare().arg("--help").run().await;
    let text = out.ok();
    for line in [
        "1  error (including a put that did not reach its write quorum)",
        "3  object not found",
        "4  cannot reach meshd",
        "5  the API token was refused",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    let text = Meshctl::bare().args(["put", "--help"]).run().await.ok();
    assert!(text.contains("--quorum <N>"), "{text}");
    let text = Meshctl::bare().arg("--help").run().await.ok();
    assert!(text.contains("peers"), "{text}");
}
