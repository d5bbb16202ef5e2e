//! A 100 MiB attachment through a real `parley up` process, up and back down: the process
//! streams it in chunks, so its resident memory grows by far less than the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parley_test_support::{NatsServer, ParleyChild, TestDb, proc_status_kib};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;

/// Documented in docs/adr/0010 (with the measured figure): how much one 100 MiB round trip may add
/// to the process's resident memory.
const RSS_GROWTH_BOUND_KIB: u64 = 40 * 1024;

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_round_trip_keeps_the_process_memory_flat() {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let up = ParleyChild::start(env!("CARGO_BIN_EXE_parley"), "up", &nats.url(), &db.url).await;
    let base = up.base();
    let http = reqwest::Client::new();
    post(
        &http,
        format!("{base}/v1/users"),
        None,
        json!({"handle": "ada", "display_name": "Ada", "password": "correct horse"}),
    )
    .await;
    let session = post(
        &http,
        format!("{base}/v1/sessions"),
        None,
        json!({"handle": "ada", "password": "correct horse", "device_name": "d"}),
    )
    .await;
    let token = session["token"].as_str().unwrap().to_owned();

    // An mp4 header, then a pattern: exactly the default video limit.
    let mut bytes = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom".to_vec();
    bytes.extend((bytes.len()..100 * MIB).map(|i| (i % 253) as u8));
    let sha = hex::encode(Sha256::digest(&bytes));

    // Warm up the upload path (allocator arenas, connections) before the baseline.
    let res = http
        .post(format!("{base}/v1/attachments"))
        .bearer_auth(&token)
        .header("content-type", "video/mp4")
        .body(bytes[..MIB].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    let pid = up.pid();
    let baseline = proc_status_kib(pid, "VmRSS:");
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        async move {
            while !sampling.is_cancelled() {
                peak.fetch_max(proc_status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let res = http
        .post(format!("{base}/v1/attachments"))
        .bearer_auth(&token)
        .header("content-type", "video/mp4")
        .query(&[("filename", "big.mp4")])
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let up_answer: Value = res.json().await.unwrap();
    assert_eq!(up_answer["sha256"], sha);
    assert_eq!(up_answer["size"], 100 * MIB);
    let id = up_answer["attachment_id"].as_str().unwrap();

    let mut res = http
        .get(format!("{base}/v1/attachments/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut hasher = Sha256::new();
    let mut got = 0usize;
    while let Some(chunk) = res.chunk().await.unwrap() {
        got += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(got, 100 * MIB);
    assert_eq!(hex::encode(hasher.finalize()), sha);

    sampling.cancel();
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "parley up RSS: baseline {baseline} KiB, peak growth {growth} KiB over a 100 MiB round trip"
    );
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB)"
    );
}
