//! A 100 MiB attachment through a real `parley up` process, up and back down: the process
//! streams it in chunks, so its resident memory grows by far less than the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parley_test_support::{NatsServer, TestDb, eventually, free_port};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;

/// Documented in docs/adr/0009 (with the measured figure): how much one 100 MiB round trip may add
/// to the process's resident memory.
const RSS_GROWTH_BOUND_KIB: u64 = 40 * 1024;

/// A `parley up` child, killed on drop.
struct Parley {
    child: Child,
    port: u16,
}

impl Drop for Parley {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(nats: &NatsServer, db: &TestDb) -> Parley {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["up", "--addr", &format!("127.0.0.1:{port}")])
        .env("NATS_URL", nats.url())
        .env("DATABASE_URL", &db.url)
        .env("PARLEY_PG_MAX_CONNECTIONS", "4")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the parley binary");
    let p = Parley { child, port };
    let url = format!("http://127.0.0.1:{port}/healthz");
    let http = reqwest::Client::new();
    eventually(WAIT, "parley up to answer /healthz", || async {
        let res = http.get(&url).send().await.ok()?;
        res.status().is_success().then_some(())
    })
    .await;
    p
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

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
    let up = start(&nats, &db).await;
    let base = format!("http://127.0.0.1:{}", up.port);
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

    let pid = up.child.id();
    let baseline = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        async move {
            while !sampling.is_cancelled() {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
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
