//! The control API of one node, exercised over HTTP against a node running in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mesh_node::store::MetaStore;
use mesh_proto::api::{
    DeleteResponse, ErrorBody, ListResponse, PutResponse, StatResponse, StatusResponse,
};
use mesh_proto::{ChunkId, Manifest, ObjectId};
use mesh_tests::{TestNode, api_client, random_bytes, wait_until};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn put(client: &reqwest::Client, node: &TestNode, query: &str, data: Vec<u8>) -> PutResponse {
    let response = client
        .post(format!("{}/v1/objects?{query}", node.api_url()))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.text().await
    );
    response.json().await.unwrap()
}

async fn get(client: &reqwest::Client, node: &TestNode, id: &ObjectId) -> Vec<u8> {
    let response = client
        .get(format!("{}/v1/objects/{id}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn put_then_get_returns_the_same_bytes_and_dedups() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let data = random_bytes(9 * 1024 * 1024 + 77, 1);
    let put1 = put(&client, &node, "name=data.bin", data.clone()).await;
    assert_eq!(put1.size, data.len() as u64);
    assert!(
        put1.chunks >= 3,
        "9 MiB makes several chunks, got {}",
        put1.chunks
    );
    assert_eq!(put1.new_chunks, put1.chunks);
    assert_eq!(get(&client, &node, &put1.id).await, data);

    // The same bytes again: a new object (new creation time), no new chunks.
    let put2 = put(&client, &node, "name=copy.bin", data.clone()).await;
    assert_ne!(put2.id, put1.id);
    assert_eq!((put2.new_chunks, put2.new_bytes), (0, 0));

    // The manifest route serves the canonical bytes the id is the hash of.
    let raw = client
        .get(format!(
            "{}/v1/objects/{}/manifest",
            node.api_url(),
            put1.id
        ))
        .send()
        .await
        .unwrap();
    let manifest = Manifest::decode_verified(&put1.id, &raw.bytes().await.unwrap()).unwrap();
    assert_eq!(manifest.name.as_deref(), Some("data.bin"));
    assert_eq!(manifest.size, data.len() as u64);

    // Fixed chunking and an empty object.
    let fixed = put(&client, &node, "chunker=fixed:1MiB", data.clone()).await;
    assert_eq!(fixed.chunks, 10);
    let empty = put(&client, &node, "", Vec::new()).await;
    assert_eq!((empty.size, empty.chunks), (0, 0));
    assert!(get(&client, &node, &empty.id).await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_are_served() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let data = random_bytes(3 * 1024 * 1024, 2);
    let id = put(&client, &node, "chunker=fixed:1MiB", data.clone())
        .await
        .id;
    let url = format!("{}/v1/objects/{id}", node.api_url());
    for (header, expected) in [
        ("bytes=0-9", &data[0..10]),
        ("bytes=1048570-1048580", &data[1048570..1048581]),
        ("bytes=3000000-", &data[3000000..]),
        ("bytes=-5", &data[data.len() - 5..]),
    ] {
        let response = client
            .get(&url)
            .header("range", header)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{header}");
        assert!(
            response.headers()["content-range"]
                .to_str()
                .unwrap()
                .ends_with(&format!("/{}", data.len()))
        );
        assert_eq!(response.bytes().await.unwrap(), expected, "{header}");
    }
    let response = client
        .get(&url)
        .header("range", "bytes=99999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_token_are_refused() {
    let node = TestNode::start().await.unwrap();
    let plain = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/v1/objects"),
        ("POST", "/v1/objects"),
        ("GET", "/v1/status"),
    ] {
        let url = format!("{}{path}", node.api_url());
        let no_token = plain
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(
            no_token.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        let body = no_token.text().await.unwrap();
        assert!(
            !body.contains(&node.token()),
            "the 401 must not leak detail"
        );
        let wrong = plain
            .request(method.parse().unwrap(), &url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        plain
            .get(format!("{}/health", node.api_url()))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let metrics = plain
        .get(format!("{}/metrics", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("mesh_api_errors_total{code=\"unauthorized\"}")
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_ids_and_unknown_objects_get_clear_errors() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let bad = client
        .get(format!("{}/v1/objects/not-an-id", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = bad.json().await.unwrap();
    assert!(
        body.message.contains("not-an-id") && body.message.contains("64 hex"),
        "{}",
        body.message
    );

    let unknown = ObjectId::of(b"nothing");
    for path in [
        format!("/v1/objects/{unknown}"),
        format!("/v1/objects/{unknown}/stat"),
    ] {
        let response = client
            .get(format!("{}{path}", node.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: ErrorBody = response.json().await.unwrap();
        assert!(body.message.contains(&unknown.to_string()));
    }
    let response = client
        .delete(format!("{}/v1/objects/{unknown}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    for query in [
        "redundancy=rep:0",
        "chunker=rabin",
        "records=xml",
        "redundancy=ec:4+2",
        "bogus=1",
    ] {
        let response = client
            .post(format!("{}/v1/objects?{query}", node.api_url()))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_stat_delete_and_status() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let shared = random_bytes(1 << 20, 3);
    let mut a_bytes = shared.clone();
    a_bytes.extend(random_bytes(1 << 20, 4));
    let mut b_bytes = shared.clone();
    b_bytes.extend(random_bytes(1 << 20, 5));
    // A lone node accepts rep:2 only with a quorum of one; the object is then below target.
    let a = put(
        &client,
        &node,
        "name=a&chunker=fixed:1MiB&redundancy=rep:2&quorum=1",
        a_bytes,
    )
    .await;
    let b = put(
        &client,
        &node,
        "name=b&chunker=fixed:1MiB&redundancy=rep:1",
        b_bytes.clone(),
    )
    .await;
    assert_eq!(b.new_chunks, 1, "the first MiB is shared with a");

    let page: ListResponse = client
        .get(format!("{}/v1/objects?limit=1", node.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page.objects.len(), 1);
    let next = page.next.expect("a second page");
    let page2: ListResponse = client
        .get(format!("{}/v1/objects?after={next}", node.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2.objects.len(), 1);
    assert!(page2.next.is_none());
    let mut ids = vec![page.objects[0].id, page2.objects[0].id];
    ids.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(ids, want);

    let stat: StatResponse = client
        .get(format!("{}/v1/objects/{}/stat", node.api_url(), b.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stat.chunks.len(), 2);
    assert_eq!(stat.chunks[1].offset, 1 << 20);
    assert_eq!(
        stat.chunks[0].holders,
        vec![node.node().peer_id().to_string()]
    );
    assert!(stat.meets_target, "rep:1 is met by one node");
    let stat_a: StatResponse = client
        .get(format!("{}/v1/objects/{}/stat", node.api_url(), a.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!stat_a.meets_target, "rep:2 is not met by one node");

    let status: StatusResponse = client
        .get(format!("{}/v1/status", node.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (status.objects, status.chunks, status.stored_bytes),
        (2, 3, 3 << 20)
    );
    assert_eq!(status.objects_below_target, 1);
    assert_eq!(status.node_id, node.node().peer_id().to_string());
    assert!(status.disk_total_bytes > 0);

    let deleted: DeleteResponse = client
        .delete(format!("{}/v1/objects/{}", node.api_url(), a.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((deleted.freed_chunks, deleted.freed_bytes), (1, 1 << 20));
    assert_eq!(
        get(&client, &node, &b.id).await,
        b_bytes,
        "the shared chunk survives"
    );
    let gone = client
        .get(format!("{}/v1/objects/{}", node.api_url(), a.id))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);

    let metrics = reqwest::get(format!("{}/metrics", node.api_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "mesh_puts_total 2",
        "mesh_deletes_total 1",
        "mesh_objects 1",
        // The chunk only `a` used waits out gc_grace (an hour here) before it goes.
        "mesh_chunks 3",
        "mesh_api_request_duration_seconds_bucket",
    ] {
        assert!(
            metrics.contains(series),
            "metrics lack {series:?}:\n{metrics}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_off_halfway_leaves_nothing_behind() {
    let node = TestNode::start().await.unwrap();
    let store = node.node().store().clone();
    let addr = node.node().api_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let declared = 20 * 1024 * 1024;
    let head = format!(
        "POST /v1/objects?name=cut&chunker=fixed:1MiB HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-length: {declared}\r\n\r\n",
        node.token()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&random_bytes(6 * 1024 * 1024, 6))
        .await
        .unwrap();
    // Wait until the node has stored some of the chunks, then hang up.
    wait_until(
        Duration::from_secs(20),
        "chunks of the partial upload",
        || {
            let store = store.clone();
            async move { Ok(store.stats()?.chunks >= 3) }
        },
    )
    .await
    .unwrap();
    drop(stream);
    wait_until(
        Duration::from_secs(20),
        "the partial upload's chunks to be released",
        || {
            let store = store.clone();
            async move { Ok(store.stats()?.chunks == 0) }
        },
    )
    .await
    .unwrap();
    assert!(
        store.list_objects(None, 10).unwrap().is_empty(),
        "no object is visible"
    );
    assert_eq!(store.stats().unwrap().objects, 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_chunk_is_never_served() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let data = random_bytes(2 << 20, 7);
    let id = put(&client, &node, "chunker=fixed:1MiB", data.clone())
        .await
        .id;
    let second = ChunkId::of(&data[1 << 20..]);
    let mut rotten = data[1 << 20..].to_vec();
    rotten[100] ^= 1;
    node.node()
        .store()
        .overwrite_chunk_unchecked(&second, &rotten)
        .unwrap();

    let response = client
        .get(format!("{}/v1/objects/{id}", node.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "headers go out before the bad chunk is read"
    );
    let mut received = Vec::new();
    let mut body = response;
    let outcome = loop {
        match body.chunk().await {
            Ok(Some(part)) => received.extend_from_slice(&part),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(outcome.is_err(), "the transfer must fail, not complete");
    assert!(
        received.len() <= 1 << 20,
        "only the good first chunk was sent"
    );
    assert_eq!(&received[..], &data[..received.len()]);

    let metrics = reqwest::get(format!("{}/metrics", node.api_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("mesh_corrupt_chunks_total 1"), "{metrics}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_mode_keeps_records_whole_and_rejects_giant_records() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let mut jsonl = Vec::new();
    for i in 0..60_000 {
        jsonl.extend_from_slice(
            format!("{{\"id\":{i},\"v\":\"{}\"}}\n", "y".repeat(i % 97)).as_bytes(),
        );
    }
    let put_jsonl = put(&client, &node, "records=jsonl", jsonl.clone()).await;
    let raw = client
        .get(format!(
            "{}/v1/objects/{}/manifest",
            node.api_url(),
            put_jsonl.id
        ))
        .send()
        .await
        .unwrap();
    let manifest = Manifest::decode(&raw.bytes().await.unwrap()).unwrap();
    let mut offset = 0usize;
    for chunk in &manifest.chunks {
        offset += chunk.len as usize;
        assert_eq!(jsonl[offset - 1], b'\n', "chunk ends at a record boundary");
    }
    assert_eq!(get(&client, &node, &put_jsonl.id).await, jsonl);

    let mut giant = b"{\"a\":1}\n".to_vec();
    giant.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    let response = client
        .post(format!("{}/v1/objects?records=jsonl", node.api_url()))
        .body(giant)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = response.json().await.unwrap();
    assert!(
        body.message.contains("starting at byte 8"),
        "{}",
        body.message
    );
    assert_eq!(node.node().store().stats().unwrap().objects, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_keeps_its_identity_and_objects() {
    let node = TestNode::start().await.unwrap();
    let client = api_client(&node).unwrap();
    let data = random_bytes(3 << 20, 8);
    let id = put(&client, &node, "", data.clone()).await.id;
    let peer = node.node().peer_id();
    let token = node.token();
    let node = node.restart().await.unwrap();
    assert_eq!(node.node().peer_id(), peer);
    assert_eq!(node.token(), token);
    let client = api_client(&node).unwrap();
    assert_eq!(get(&client, &node, &id).await, data);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_an_upload_in_flight_finish() {
    let node = TestNode::start().await.unwrap();
    let addr = node.node().api_addr();
    let token = node.token();
    let data = random_bytes(4 << 20, 9);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/objects?chunker=fixed:256KiB HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        data.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&data[..1 << 20]).await.unwrap();
    let store = node.node().store().clone();
    wait_until(Duration::from_secs(20), "the upload to start", || {
        let store = store.clone();
        async move { Ok(store.stats()?.chunks >= 1) }
    })
    .await
    .unwrap();
    let stopping = tokio::spawn(node.stop());
    stream.write_all(&data[1 << 20..]).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    stopping.await.unwrap();
    assert_eq!(store.stats().unwrap().objects, 1);
}
