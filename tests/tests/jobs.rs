#![allow(clippy::unwrap_used)]
//! Jobs on in-process clusters: a validate + dedup pipeline against a reference computed
//! here, locality of map tasks, a killed worker and a restarted coordinator leaving the
//! output unchanged, dead letters, registered commands and bad specs.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use mesh_proto::JobId;
use mesh_proto::ObjectId;
use mesh_proto::api::PutResponse;
use mesh_proto::job::{JobState, JobStatus, SubmitResponse};
use mesh_tests::{Cluster, TestNode, api_client, wait_for_value, wait_until};

use serde_json::{Value, json};

const JOIN: Duration = Duration::from_secs(60);
const JOB: Duration = Duration::from_secs(120);

async fn start(n: usize, configure: impl Fn(usize, &mut mesh_node::config::Config)) -> Cluster {
    let cluster = Cluster::start(n, |i, config| {
        config.jobs.task_slots = 2;
        config.jobs.max_load = 1.0;
        configure(i, config);
    })
    .await
    .unwrap();
    cluster.wait_joined(JOIN).await.unwrap();
    cluster
}

async fn put(node: &TestNode, query: &str, data: &[u8]) -> ObjectId {
    let response = mesh_tests::api_put(node, query, data.to_vec())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.json::<PutResponse>().await.unwrap().id
}

async fn get(node: &TestNode, id: &ObjectId) -> Vec<u8> {
    let response = mesh_tests::api_get(node, id).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    response.bytes().await.unwrap().to_vec()
}

/// `POST /v1/jobs`: the answer's status and body.
async fn submit(node: &TestNode, spec: &Value) -> (u16, String) {
    let response = api_client(node)
        .unwrap()
        .post(format!("{}/v1/jobs", node.api_url()))
        .json(spec)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn submit_ok(node: &TestNode, spec: &Value) -> JobId {
    let (status, body) = submit(node, spec).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<SubmitResponse>(&body).unwrap().id
}

async fn status(node: &TestNode, job: &JobId) -> JobStatus {
    api_client(node)
        .unwrap()
        .get(format!("{}/v1/jobs/{job}", node.api_url()))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_ended(node: &TestNode, job: &JobId) -> JobStatus {
    wait_until(JOB, "the job to end", || {
        let report = status(node, job);
        async move { Ok(report.await.state != JobState::Running) }
    })
    .await
    .unwrap();
    status(node, job).await
}

async fn forget(node: &TestNode, job: &JobId) {
    let response = api_client(node)
        .unwrap()
        .delete(format!("{}/v1/jobs/{job}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
}

fn lines(bytes: &[u8]) -> Vec<Value> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

/// Small chunks, so that a few MB make many map tasks.
const SMALL_RECORDS: &str = "records=jsonl&chunker=cdc:16384:65536:262144";

/// 120k user records: some ids repeat with other timestamps, some records are invalid
/// (a missing or mistyped field), a few lines are not JSON at all.
fn users() -> (Vec<u8>, usize, usize) {
    let mut out = Vec::new();
    let (mut invalid, mut garbage) = (0, 0);
    for i in 0u64..120_000 {
        let id = i % 90_000; // ids 0..30k appear twice
        let ts = (i * 7919) % 1_000_003;
        if i % 997 == 0 {
            out.extend_from_slice(b"{not json\n");
            garbage += 1;
            continue;
        }
        let record = if i % 53 == 0 {
            invalid += 1;
            json!({"id": format!("u{id}"), "ts": ts, "age": "old"})
        } else if i % 59 == 0 {
            invalid += 1;
            json!({"id": format!("u{id}"), "age": 30})
        } else {
            let city = ["Oslo", "Lima", "Pune"][(i % 3) as usize];
            json!({"id": format!("u{id}"), "ts": ts, "age": i % 90, "city": city})
        };
        out.extend_from_slice(record.to_string().as_bytes());
        out.push(b'\n');
    }
    (out, invalid, garbage)
}

const USER_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["id", "ts"],
  "properties": {
    "id": {"type": "string"},
    "ts": {"type": "integer"},
    "age": {"type": "integer", "minimum": 0}
  }
}"#;

/// The reference: valid records, one per id, the latest by `ts`, ties by the larger
/// compact encoding.
fn expected_dedup(input: &[u8]) -> Vec<Value> {
    let mut best: HashMap<String, Value> = HashMap::new();
    for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let valid = v["id"].is_string()
            && v["ts"].is_u64()
            && (v.get("age").is_none() || v["age"].is_u64());
        if !valid {
            continue;
        }
        let id = v["id"].as_str().unwrap().to_owned();
        let replace = match best.get(&id) {
            None => true,
            Some(old) => {
                let (a, b) = (v["ts"].as_u64(), old["ts"].as_u64());
                let (new_text, old_text) = (v.to_string(), old.to_string());
                a > b || (a == b && new_text > old_text)
            }
        };
        if replace {
            best.insert(id, v);
        }
    }
    let mut out: Vec<Value> = best.into_values().collect();
    out.sort_by_key(|v| v.to_string());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_validate_and_dedup_job_outputs_exactly_the_reference_records() {
    let cluster = start(3, |_, _| {}).await;
    let (input, invalid, garbage) = users();
    let id = put(&cluster.nodes[0], SMALL_RECORDS, &input).await;
    let spec = json!({
        "stages": [
            {"processor": "validate", "params": {"schema": USER_SCHEMA}},
            {"processor": "dedup", "params": {"key": "id", "ts": "ts"}}
        ],
        "inputs": [id.to_string()],
        "partitions": 4
    });
    let job = submit_ok(&cluster.nodes[1], &spec).await;
    // The same spec again is the same job.
    let (code, body) = submit(&cluster.nodes[1], &spec).await;
    assert_eq!(code, 200);
    let again: SubmitResponse = serde_json::from_str(&body).unwrap();
    assert_eq!((again.id, again.new), (job, false));

    let report = wait_ended(&cluster.nodes[1], &job).await;
    assert_eq!(report.state, JobState::Succeeded, "{report:?}");
    // Another node answers for the job by asking its coordinator.
    let relayed = status(&cluster.nodes[0], &job).await;
    assert_eq!(relayed.output, report.output);
    assert_eq!(
        relayed.coordinator,
        cluster.nodes[1].node().peer_id().to_string()
    );
    assert!(report.map_tasks >= 8, "{} map tasks", report.map_tasks);
    assert_eq!(report.reduce_tasks, 4);
    assert_eq!(report.records_in, 120_000);

    let output = get(&cluster.nodes[2], &report.output.unwrap()).await;
    let mut got = lines(&output);
    got.sort_by_key(|v| v.to_string());
    let want = expected_dedup(&input);
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want, "the output differs from the reference");
    assert_eq!(report.records_out, want.len() as u64);

    let rejects = lines(&get(&cluster.nodes[0], &report.rejects.unwrap()).await);
    assert_eq!(rejects.len(), invalid + garbage);
    assert_eq!(report.rejected, (invalid + garbage) as u64);
    let mistyped = rejects
        .iter()
        .filter(|r| r["record"]["age"] == json!("old"))
        .count();
    assert_eq!(
        mistyped,
        (0..120_000u64)
            .filter(|i| i % 53 == 0 && i % 997 != 0)
            .count()
    );
    for r in &rejects {
        let reason = r["reason"].as_str().unwrap();
        if r["record"]["age"] == json!("old") {
            assert!(reason.contains("age"), "{reason}");
        } else if r.get("record").is_some_and(|v| v.is_object()) {
            assert!(reason.contains("ts"), "{reason}");
        }
    }
    // The report has per-stage figures and names a bottleneck.
    assert!(report.stages.iter().any(|s| s.stage == "validate"));
    assert!(report.bottleneck.is_some());
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn map_tasks_run_where_their_input_chunk_is() {
    let cluster = start(3, |_, _| {}).await;
    // One input per node, stored only there.
    let mut inputs = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let mut data = Vec::new();
        for i in 0..40_000u64 {
            data.extend_from_slice(
                json!({"n": n, "i": i, "pad": "x".repeat(40)})
                    .to_string()
                    .as_bytes(),
            );
            data.push(b'\n');
        }
        inputs.push(put(node, &format!("{SMALL_RECORDS}&redundancy=rep:1"), &data).await);
    }
    let spec = json!({
        "processor": "filter",
        "params": {"where": "i >= 0"},
        "inputs": inputs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "output": "rep:1"
    });
    let job = submit_ok(&cluster.nodes[0], &spec).await;
    let report = wait_ended(&cluster.nodes[0], &job).await;
    assert_eq!(report.state, JobState::Succeeded, "{report:?}");
    assert!(report.map_tasks >= 15, "{} map tasks", report.map_tasks);
    assert!(
        report.locality >= 0.9,
        "only {:.0}% of map tasks ran where their input is: {:?}",
        report.locality * 100.0,
        report.nodes
    );
    assert_eq!(
        report.nodes.len(),
        3,
        "every node took work: {:?}",
        report.nodes
    );
    assert_eq!(report.records_out, 120_000);
    cluster.stop().await;
}

/// A command that takes a while per task, so a node can be stopped mid-task.
fn slow_cat() -> mesh_node::config::ExecConfig {
    mesh_node::config::ExecConfig::new(vec![
        "/bin/sh".into(),
        "-c".into(),
        "sleep 0.4; tr a-z A-Z".into(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_or_a_restarted_coordinator_leaves_the_output_unchanged() {
    let mut cluster = start(4, |_, config| {
        config.processors.insert("upper".into(), slow_cat());
    })
    .await;
    let mut data = Vec::new();
    for i in 0..60_000u64 {
        data.extend_from_slice(
            format!("{{\"line\":{i},\"text\":\"some words here\"}}\n").as_bytes(),
        );
    }
    // Written on node 3, which so holds every chunk and is granted tasks at once: a node that
    // held none would wait out the locality delay, which a fast job can outlast.
    let input = put(&cluster.nodes[3], SMALL_RECORDS, &data).await;
    let spec = json!({
        "processor": "exec:upper",
        "inputs": [input.to_string()],
        "lease": "2s",
        "max_attempts": 5
    });
    let expected = String::from_utf8(data.clone())
        .unwrap()
        .to_uppercase()
        .into_bytes();

    // Undisturbed.
    let job = submit_ok(&cluster.nodes[0], &spec).await;
    let clean = wait_ended(&cluster.nodes[0], &job).await;
    assert_eq!(clean.state, JobState::Succeeded, "{clean:?}");
    let output = clean.output.unwrap();
    assert_eq!(get(&cluster.nodes[1], &output).await, expected);
    forget(&cluster.nodes[0], &job).await;

    // A worker dies while it runs tasks: they finish elsewhere, the output is the same.
    let again = submit_ok(&cluster.nodes[0], &spec).await;
    assert_eq!(again, job);
    wait_until(JOB, "node 3 to run a task", || {
        let running = cluster.nodes[3].node().jobs().worker.running();
        async move { Ok(running > 0) }
    })
    .await
    .unwrap();
    let victim = cluster.nodes.remove(3);
    drop(victim);
    let disturbed = wait_ended(&cluster.nodes[0], &job).await;
    assert_eq!(disturbed.state, JobState::Succeeded, "{disturbed:?}");
    assert!(disturbed.lease_expiries >= 1, "{disturbed:?}");
    assert_eq!(disturbed.output, Some(output));
    forget(&cluster.nodes[0], &job).await;

    // The coordinator restarts mid-job: it resumes from its store.
    submit_ok(&cluster.nodes[0], &spec).await;
    wait_until(JOB, "a few tasks to finish", || {
        let s = status(&cluster.nodes[0], &job);
        async move { Ok(s.await.tasks.done >= 2) }
    })
    .await
    .unwrap();
    let before = status(&cluster.nodes[0], &job).await;
    assert_eq!(
        before.state,
        JobState::Running,
        "the job ended before the restart"
    );
    let coordinator = cluster.nodes.remove(0);
    let coordinator = coordinator.restart().await.unwrap();
    let resumed = wait_ended(&coordinator, &job).await;
    assert_eq!(resumed.state, JobState::Succeeded, "{resumed:?}");
    assert_eq!(resumed.output, Some(output));
    assert_eq!(get(&coordinator, &output).await, expected);
    cluster.nodes.insert(0, coordinator);
    cluster.stop().await;
}

/// Smaller chunks still: many map tasks, so that a node can be caught between two of them.
const TINY_RECORDS: &str = "records=jsonl&chunker=cdc:4096:16384:65536";

/// Shuffle outputs have one copy, on the node that ran the map task. That node dies after
/// its map tasks are done and before any reduce task reads them: the reduce tasks find them
/// gone, the coordinator runs those map tasks again, and the output is the same as an
/// undisturbed run's.
///
/// The disturbed run comes first. Map outputs are deterministic, so a run before it would
/// leave the same shuffle chunks on whichever nodes ran those map tasks then; a reduce task
/// on such a node reads its own copy first, and the loss would go unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shuffle_outputs_lost_with_a_node_are_made_again() {
    let mut cluster = start(4, |_, _| {}).await;
    let (input, _, _) = users();
    // Node 3 writes the input, so it holds a copy of every chunk and runs map tasks from the
    // start. Written elsewhere, it might hold none (placement is free to leave it out), and
    // delay scheduling would then keep it waiting while the holders run the whole map phase.
    let id = put(&cluster.nodes[3], TINY_RECORDS, &input).await;
    let spec = json!({
        "stages": [
            {"processor": "validate", "params": {"schema": USER_SCHEMA}},
            {"processor": "dedup", "params": {"key": "id", "ts": "ts"}}
        ],
        "inputs": [id.to_string()],
        "partitions": 3,
        "lease": "2s"
    });

    // Stop the coordinator as soon as a worker has map outputs, long before the map phase is
    // over, so that no reduce task has started; that worker is gone when the coordinator is
    // back. Any worker will do: the input keeps two copies without it. The status is polled
    // without backoff, because the whole map phase takes only a second or two on a fast
    // machine; node 3 is usually first, as it hears of the job and holds every chunk.
    let job = submit_ok(&cluster.nodes[0], &spec).await;
    let workers: Vec<String> = cluster.nodes[1..]
        .iter()
        .map(|n| n.node().peer_id().to_string())
        .collect();
    let victim = wait_for_value(
        JOB,
        Duration::from_millis(10),
        "a worker to finish a map task",
        || {
            let report = status(&cluster.nodes[0], &job);
            let workers = &workers;
            async move {
                let r = report.await;
                anyhow::ensure!(
                    r.tasks.pending >= 20,
                    "the map phase got too far before a worker was seen done with a task: {:?} {:?}",
                    r.tasks,
                    r.nodes
                );
                Ok(workers
                    .iter()
                    .position(|w| r.nodes.iter().any(|n| &n.node == w && n.tasks >= 1))
                    .map(|i| i + 1))
            }
        },
    )
    .await
    .unwrap();
    let coordinator = cluster.nodes.remove(0).park().await;
    let coordinator = {
        // The coordinator's store says what the victim had done; nothing ran a reduce task.
        drop(cluster.nodes.remove(victim - 1));
        coordinator.start().await.unwrap()
    };
    let disturbed = wait_ended(&coordinator, &job).await;
    assert_eq!(disturbed.state, JobState::Succeeded, "{disturbed:?}");
    assert!(
        disturbed.lost_outputs >= 1,
        "no map output was found lost: {disturbed:?}"
    );
    let output = disturbed.output.unwrap();
    let mut got = lines(&get(&cluster.nodes[0], &output).await);
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, expected_dedup(&input));

    // The same job on the nodes left, undisturbed: the same output.
    forget(&coordinator, &job).await;
    assert_eq!(submit_ok(&coordinator, &spec).await, job);
    let clean = wait_ended(&coordinator, &job).await;
    assert_eq!(clean.state, JobState::Succeeded, "{clean:?}");
    assert_eq!(clean.lost_outputs, 0);
    assert_eq!(clean.output, Some(output));
    cluster.nodes.insert(0, coordinator);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_commands_and_bad_specs() {
    let cluster = start(3, |i, config| {
        config.processors.insert(
            "fail".into(),
            mesh_node::config::ExecConfig::new(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo broken input >&2; exit 3".into(),
            ]),
        );
        if i == 1 {
            config.processors.insert(
                "upper".into(),
                mesh_node::config::ExecConfig::new(vec!["tr".into(), "a-z".into(), "A-Z".into()]),
            );
        }
    })
    .await;
    let mut data = Vec::new();
    for i in 0..30_000u64 {
        data.extend_from_slice(format!("{{\"i\":{i},\"s\":\"abc\"}}\n").as_bytes());
    }
    let input = put(&cluster.nodes[0], SMALL_RECORDS, &data).await;

    // A task that always fails ends in the dead letters; the job ends, it does not hang.
    let job = submit_ok(
        &cluster.nodes[0],
        &json!({"processor": "exec:fail", "inputs": [input.to_string()], "max_attempts": 2}),
    )
    .await;
    let failed = wait_ended(&cluster.nodes[0], &job).await;
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    assert!(!failed.dead_letters.is_empty());
    let letter = &failed.dead_letters[0];
    assert_eq!(letter.attempts, 2);
    assert!(letter.error.contains("broken input"), "{}", letter.error);
    assert!(failed.output.is_none());

    // A job cancelled through another node than its coordinator ends at once.
    let slow = submit_ok(
        &cluster.nodes[0],
        &json!({"processor": "exec:fail", "inputs": [input.to_string()], "max_attempts": 9}),
    )
    .await;
    wait_until(JOIN, "node 2 to hear of the job", || {
        let known = cluster.nodes[2].node().jobs().worker.coordinator_of(&slow);
        async move { Ok(known.is_some()) }
    })
    .await
    .unwrap();
    let response = api_client(&cluster.nodes[2])
        .unwrap()
        .post(format!(
            "{}/v1/jobs/{slow}/cancel",
            cluster.nodes[2].api_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let cancelled: JobStatus = response.json().await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        status(&cluster.nodes[0], &slow).await.state,
        JobState::Cancelled
    );

    // A command only node 1 registers runs only there.
    let node1 = cluster.nodes[1].node().peer_id().to_string();
    wait_until(JOIN, "node 0 to hear that node 1 offers exec:upper", || {
        let offered = cluster.nodes[0].node().network().peers().iter().any(|p| {
            p.id.to_string() == node1
                && p.load
                    .as_ref()
                    .is_some_and(|l| l.processors.iter().any(|n| n == "upper"))
        });
        async move { Ok(offered) }
    })
    .await
    .unwrap();
    let job = submit_ok(
        &cluster.nodes[0],
        &json!({"processor": "exec:upper", "inputs": [input.to_string()]}),
    )
    .await;
    let upper = wait_ended(&cluster.nodes[0], &job).await;
    assert_eq!(upper.state, JobState::Succeeded, "{upper:?}");
    assert_eq!(upper.nodes.len(), 1, "{:?}", upper.nodes);
    assert_eq!(upper.nodes[0].node, node1);
    let expected = String::from_utf8(data.clone()).unwrap().to_uppercase();
    assert_eq!(
        String::from_utf8(get(&cluster.nodes[2], &upper.output.unwrap()).await).unwrap(),
        expected
    );

    // Bad specs are refused at submit, naming the problem.
    let missing = ObjectId::of(b"no such object");
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"processor": "exec:nope", "inputs": [input.to_string()]}),
            "exec:nope",
        ),
        (
            json!({"processor": "frobnicate", "inputs": [input.to_string()]}),
            "frobnicate",
        ),
        (
            json!({"processor": "dedup", "inputs": [input.to_string()]}),
            "key",
        ),
        (
            json!({"processor": "validate", "params": {"schema": "{\"type\": 12}"}, "inputs": [input.to_string()]}),
            "schema",
        ),
        (
            json!({"processor": "filter", "params": {"where": "i >= 0"}, "inputs": [missing.to_string()]}),
            "not found",
        ),
        (
            json!({"processor": "filter", "params": {"where": "i >= 0"}, "inputs": []}),
            "input",
        ),
        (
            json!({"processor": "filter", "params": {"where": "i >= 0"}, "inputs": [input.to_string()], "lease": "soon"}),
            "soon",
        ),
    ];
    for (spec, needle) in cases {
        let (code, body) = submit(&cluster.nodes[0], &spec).await;
        assert_eq!(code, 400, "{spec}: {body}");
        assert!(
            body.contains(needle),
            "{spec}: {body} does not name {needle:?}"
        );
    }
    // A listing shows the jobs this node coordinates.
    let list: mesh_proto::job::JobList = api_client(&cluster.nodes[0])
        .unwrap()
        .get(format!("{}/v1/jobs", cluster.nodes[0].api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.jobs.len(), 3);
    let states: BTreeMap<String, usize> = list.jobs.iter().fold(BTreeMap::new(), |mut m, j| {
        *m.entry(j.state.to_string()).or_default() += 1;
        m
    });
    assert_eq!(states.get("failed"), Some(&1));
    assert_eq!(states.get("succeeded"), Some(&1));
    assert_eq!(states.get("cancelled"), Some(&1));
    cluster.stop().await;
}
