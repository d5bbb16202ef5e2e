//! Attachments through the public API: upload, send with a message, see the metadata live and
//! in history, download as a member, 404 for anyone else; limits per kind, type checks and
//! the rules of a message's attachment list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestApp, User, spawn_app, spawn_app_with};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A PNG signature followed by `len - 8` bytes of a repeating pattern.
fn png(len: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend((0..len.saturating_sub(8)).map(|i| (i * 7 % 251) as u8));
    b
}

const PDF: &[u8] = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << >> endobj\n";

async fn upload(
    app: &TestApp,
    user: &User,
    content_type: Option<&str>,
    filename: Option<&str>,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let mut req = app
        .http
        .post(format!("{}/v1/attachments", app.base))
        .bearer_auth(&user.token)
        .body(bytes);
    if let Some(t) = content_type {
        req = req.header("content-type", t);
    }
    if let Some(f) = filename {
        req = req.query(&[("filename", f)]);
    }
    let res = req.send().await.expect("upload");
    let status = res.status().as_u16();
    if status >= 400 {
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "errors are problem+json"
        );
    }
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn upload_ok(app: &TestApp, user: &User, content_type: &str, bytes: Vec<u8>) -> String {
    let (s, b) = upload(app, user, Some(content_type), None, bytes).await;
    assert_eq!(s, 201, "{b}");
    b["attachment_id"].as_str().unwrap().to_owned()
}

/// Sends a body with `Transfer-Encoding: chunked` (no `Content-Length`, so the server cannot
/// refuse it up front) over a raw socket; the answer's status.
async fn upload_chunked(app: &TestApp, user: &User, content_type: &str, bytes: &[u8]) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/attachments HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {}\r\n\
         content-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        user.token
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    for chunk in bytes.chunks(4096) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // The server may answer 413 and close before the whole body is sent.
        if tcp.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// Every message of the `attachments` object store's stream: chunks and info records.
async fn stored_objects(app: &TestApp) -> u64 {
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("OBJ_attachments").await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn send_with(app: &TestApp, user: &User, chat: &str, attachments: Value) -> (u16, Value) {
    app.post(
        &format!("/v1/chats/{chat}/messages"),
        Some(&user.token),
        json!({"body": "see attached", "attachments": attachments}),
    )
    .await
}

#[tokio::test]
async fn an_attachment_reaches_a_members_socket_history_and_download_but_not_a_stranger() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let eve = app.signup("eve").await;
    let chat = app.group(&ada, &[&bob]).await;
    let mut bob_socket = app.socket(&bob.token).await;

    // Several chunks (128 KiB each) and a partial last one.
    let bytes = png(300 * 1024 + 5);
    let sha = hex::encode(Sha256::digest(&bytes));
    let (s, up) = upload(
        &app,
        &ada,
        Some("image/png"),
        Some("chat cat.png"),
        bytes.clone(),
    )
    .await;
    assert_eq!(s, 201, "{up}");
    assert_eq!(up["size"], bytes.len());
    assert_eq!(up["content_type"], "image/png");
    assert_eq!(up["sha256"], sha);
    let id = up["attachment_id"].as_str().unwrap().to_owned();

    let (s, sent) = send_with(&app, &ada, &chat, json!([id])).await;
    assert_eq!(s, 201, "{sent}");
    let seq = sent["sequence"].as_u64().unwrap();
    let expected = json!([{
        "attachment_id": id, "content_type": "image/png", "size": bytes.len(), "filename": "chat cat.png"
    }]);

    let frame = bob_socket.event_at(seq, WAIT).await;
    assert_eq!(frame["type"], "newMessage", "{frame}");
    assert_eq!(frame["message"]["attachments"], expected);

    let (s, history) = app
        .get(
            &format!("/v1/chats/{chat}/messages?min_sequence={seq}"),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 200, "{history}");
    let last = history["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(last["attachments"], expected);

    for reader in [&bob, &ada] {
        let res = app
            .http
            .get(format!("{}/v1/attachments/{id}", app.base))
            .bearer_auth(&reader.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let h = res.headers().clone();
        assert_eq!(h["content-type"], "image/png");
        assert_eq!(h["content-length"], bytes.len().to_string().as_str());
        assert_eq!(h["etag"], format!("\"{sha}\"").as_str());
        assert!(
            h["content-disposition"]
                .to_str()
                .unwrap()
                .contains("filename=\"chat cat.png\""),
            "{h:?}"
        );
        let got = res.bytes().await.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&got)), sha);
    }

    let (s, problem) = app
        .get(&format!("/v1/attachments/{id}"), Some(&eve.token))
        .await;
    assert_eq!(s, 404, "{problem}");
    let (s, _) = app
        .get(
            &format!("/v1/attachments/{}", uuid::Uuid::now_v7()),
            Some(&bob.token),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = app.get(&format!("/v1/attachments/{id}"), None).await;
    assert_eq!(s, 401);

    // Bob can see it, so Bob may forward it; then Eve, a member where it was forwarded, may
    // download it too.
    let bob_eve = app.group(&bob, &[&eve]).await;
    let (s, b) = send_with(&app, &bob, &bob_eve, json!([id])).await;
    assert_eq!(s, 201, "{b}");
    parley_test_support::eventually(
        WAIT,
        "eve may download the forwarded attachment",
        || async {
            let (s, _) = app
                .get(&format!("/v1/attachments/{id}"), Some(&eve.token))
                .await;
            // A 404 is not JSON, so only the status matters; 200 has no JSON body either.
            (s == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn someone_elses_attachment_in_a_message_is_422_and_appends_nothing() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let eve = app.signup("eve").await;
    let chat = app.group(&eve, &[&ada]).await;
    let adas = upload_ok(&app, &ada, "text/plain", b"private notes".to_vec()).await;
    let before = app.last_event("CHATS", &format!("chats.{chat}")).await;
    let (s, b) = send_with(&app, &eve, &chat, json!([adas])).await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = send_with(&app, &eve, &chat, json!([uuid::Uuid::now_v7()])).await;
    assert_eq!(s, 422, "{b}");
    let after = app.last_event("CHATS", &format!("chats.{chat}")).await;
    assert_eq!(before["id"], after["id"], "nothing was appended");
    let (s, _) = app
        .get(&format!("/v1/attachments/{adas}"), Some(&eve.token))
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn eleven_attachments_or_a_repeated_one_are_422_and_ten_are_fine() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    let mut ids = Vec::new();
    for i in 0..11 {
        ids.push(upload_ok(&app, &ada, "text/plain", format!("note {i}").into_bytes()).await);
    }
    let before = app.last_event("CHATS", &format!("chats.{chat}")).await;
    let (s, b) = send_with(&app, &ada, &chat, json!(ids)).await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = send_with(&app, &ada, &chat, json!([ids[0], ids[0]])).await;
    assert_eq!(s, 422, "{b}");
    let after = app.last_event("CHATS", &format!("chats.{chat}")).await;
    assert_eq!(before["id"], after["id"], "nothing was appended");
    let (s, b) = send_with(&app, &ada, &chat, json!(ids[..10])).await;
    assert_eq!(s, 201, "{b}");
    let event = app.last_event("CHATS", &format!("chats.{chat}")).await;
    assert_eq!(event["type"], "parley.chat.message_sent.v2");
    assert_eq!(event["data"]["attachments"], json!(ids[..10]));
    assert_eq!(
        event["data"]["attachment_details"][9]["content_type"],
        "text/plain"
    );
}

#[tokio::test]
async fn uploads_over_the_limit_for_their_kind_are_413_and_leave_nothing_stored() {
    let app = spawn_app_with(|s| {
        s.command.attachment_limits.image = 200 * 1024;
        s.command.attachment_limits.document = 1024;
    })
    .await;
    let ada = app.signup("ada").await;
    // Refused from Content-Length, before a byte is read.
    let (s, b) = upload(&app, &ada, Some("image/png"), None, png(200 * 1024 + 1)).await;
    assert_eq!(s, 413, "{b}");
    // Refused while streaming (chunked, no Content-Length), after chunks were written.
    assert_eq!(
        upload_chunked(&app, &ada, "image/png", &png(600 * 1024)).await,
        413
    );
    assert_eq!(
        upload_chunked(&app, &ada, "text/plain", &[b'a'; 1025]).await,
        413
    );
    assert_eq!(stored_objects(&app).await, 0, "aborted chunks are purged");
    // Exactly at the limit is fine, streamed or not; the limit is per kind.
    assert_eq!(
        upload_chunked(&app, &ada, "image/png", &png(200 * 1024)).await,
        201
    );
    let (s, b) = upload(&app, &ada, Some("text/plain"), None, vec![b'a'; 1024]).await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn mistyped_unsupported_or_empty_uploads_are_refused_and_leave_nothing_stored() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let cases: [(Option<&str>, Vec<u8>, u16); 7] = [
        (Some("image/png"), PDF.to_vec(), 422),
        (
            Some("image/png"),
            b"plain words, not a picture".to_vec(),
            422,
        ),
        (Some("text/plain"), png(64), 422),
        (Some("application/pdf"), png(64), 422),
        (Some("application/x-msdownload"), b"MZ\x90\0".to_vec(), 415),
        (None, png(64), 415),
        (Some("image/png"), Vec::new(), 422),
    ];
    for (content_type, bytes, want) in cases {
        let (s, b) = upload(&app, &ada, content_type, None, bytes).await;
        assert_eq!(s, want, "{content_type:?}: {b}");
    }
    for bad in ["", "a/b.png", "dir\\x", "tab\there"] {
        let (s, b) = upload(&app, &ada, Some("image/png"), Some(bad), png(64)).await;
        assert_eq!(s, 422, "filename {bad:?}: {b}");
    }
    assert_eq!(stored_objects(&app).await, 0);
    // The declared type's parameters are ignored; the essence is what is stored.
    let (s, b) = upload(&app, &ada, Some("application/PDF; x=1"), None, PDF.to_vec()).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["content_type"], "application/pdf");
}
