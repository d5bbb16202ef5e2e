//! `parley replay`: what was stored comes out byte for byte, in order, filtered as asked.

use std::time::Duration;

use chrono::SecondsFormat;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{expect_exit, spawn_app};

fn lines(stdout: &str) -> Vec<&str> {
    stdout.lines().collect()
}

fn joined(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(p);
        out.push(b'\n');
    }
    out
}

#[tokio::test]
async fn replay_writes_every_stored_event_once_in_order_byte_for_byte() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let chat = app.group(&ada, &[&bob]).await;
    for i in 0..25 {
        app.message(&ada, &chat, &format!("m{i} \"quoted\" ✓"))
            .await;
    }
    for stream in ["CHATS", "USERS"] {
        let stored = app.stored(stream).await;
        let out = app.parley(&["replay", "--stream", stream]).await;
        expect_exit(&out, 0);
        assert_eq!(
            out.stdout,
            joined(&stored),
            "{stream}: same bytes, same order"
        );
    }
    // To a file, the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    let out = app
        .parley(&["replay", "--stream", "chats", "-o", path.to_str().unwrap()])
        .await;
    assert!(expect_exit(&out, 0).is_empty(), "nothing on stdout");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        joined(&app.stored("CHATS").await)
    );
}

#[tokio::test]
async fn replay_selects_by_chat_type_user_and_sequence_range() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let bob = app.signup("bob").await;
    let one = app.group(&ada, &[&bob]).await;
    let two = app.group(&bob, &[&ada]).await;
    let a1 = app.message(&ada, &one, "a1").await;
    let b1 = app.message(&bob, &one, "b1").await;
    let a2 = app.message(&ada, &two, "a2").await;

    let out = app.parley(&["replay", "--chat", &one]).await;
    let text = expect_exit(&out, 0);
    let events: Vec<Value> = lines(&text)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "created + 2 messages of chat one");
    assert!(events.iter().all(|e| e["subject"] == one.as_str()));
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    let out = app
        .parley(&[
            "replay",
            "--stream",
            "CHATS",
            "--type",
            "parley.chat.message_sent.v2",
        ])
        .await;
    let text = expect_exit(&out, 0);
    // Bodies are sealed (ADR 7): the messages are told apart by chat and sequence.
    let sent: Vec<(String, u64)> = lines(&text)
        .iter()
        .map(|l| {
            let e = serde_json::from_str::<Value>(l).unwrap();
            (
                e["subject"].as_str().unwrap().to_owned(),
                e["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sent,
        vec![(one.clone(), a1), (one.clone(), b1), (two.clone(), a2)]
    );

    // --user on CHATS: the events the user caused.
    let out = app
        .parley(&[
            "replay",
            "--stream",
            "CHATS",
            "--user",
            &bob.user_id,
            "--type",
            "parley.chat.message_sent.v2",
        ])
        .await;
    let text = expect_exit(&out, 0);
    assert_eq!(lines(&text).len(), 1);
    let only: Value = serde_json::from_str(lines(&text)[0]).unwrap();
    assert_eq!(
        (only["subject"].as_str(), only["sequence"].as_u64()),
        (Some(one.as_str()), Some(b1))
    );

    // --user alone: that user's USERS subject.
    let out = app.parley(&["replay", "--user", &ada.user_id]).await;
    let text = expect_exit(&out, 0);
    assert_eq!(lines(&text).len(), 2, "registered + device added: {text}");
    assert!(lines(&text).iter().all(|l| l.contains(&ada.user_id)));

    // Stream sequences 2..=3 of CHATS.
    let stored = app.stored("CHATS").await;
    let out = app
        .parley(&[
            "replay",
            "--stream",
            "CHATS",
            "--from-seq",
            "2",
            "--to-seq",
            "3",
        ])
        .await;
    assert_eq!(out.stdout, joined(&stored[1..3]));
}

#[tokio::test]
async fn replay_selects_by_the_time_jetstream_stored_each_event() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let chat = app.group(&ada, &[]).await;
    for i in 0..6 {
        app.message(&ada, &chat, &format!("m{i}")).await;
    }
    let mut stream = app.js.get_stream("CHATS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(last, 7);
    let stored_at = |seq| {
        let stream = stream.clone();
        async move {
            let m = stream.get_raw_message(seq).await.unwrap();
            parley_nats::replay::from_nats_time(m.time.unix_timestamp_nanos())
        }
    };
    // Events 3 to 5 by their stored times (nanosecond precision, so bounds are exact).
    let since = stored_at(3)
        .await
        .to_rfc3339_opts(SecondsFormat::Nanos, true);
    let until = stored_at(5)
        .await
        .to_rfc3339_opts(SecondsFormat::Nanos, true);
    let out = app
        .parley(&[
            "replay", "--stream", "CHATS", "--since", &since, "--until", &until,
        ])
        .await;
    let stored = app.stored("CHATS").await;
    assert_eq!(
        out.stdout,
        joined(&stored[2..5]),
        "exactly events 3, 4 and 5"
    );

    // A window before everything holds nothing; a relative one ("1h" ago) holds everything.
    let out = app
        .parley(&[
            "replay",
            "--stream",
            "CHATS",
            "--until",
            "2000-01-01T00:00:00Z",
        ])
        .await;
    assert!(expect_exit(&out, 0).is_empty());
    let out = app
        .parley(&["replay", "--stream", "CHATS", "--since", "1h"])
        .await;
    assert_eq!(out.stdout, joined(&stored));
}

#[tokio::test]
async fn replay_follow_writes_the_stored_events_then_each_new_one() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    let chat = app.group(&ada, &[]).await;
    app.message(&ada, &chat, "before").await;
    let mut child = app
        .command(&["replay", "--chat", &chat, "--follow"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), out.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("replay still running")
    };
    let sequence =
        |line: String| serde_json::from_str::<Value>(&line).unwrap()["sequence"].as_u64();
    assert!(next().await.contains("parley.chat.created.v1"));
    assert_eq!(sequence(next().await), Some(2), "the stored message");
    let after = app.message(&ada, &chat, "after").await;
    assert_eq!(sequence(next().await), Some(after), "the new one, live");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn bad_replay_input_exits_2_and_writes_nothing() {
    let app = spawn_app().await;
    let ada = app.signup("ada").await;
    app.group(&ada, &[]).await;
    let cases: &[&[&str]] = &[
        &["replay", "--stream", "MESSAGES"],
        &[
            "replay",
            "--stream",
            "CHATS",
            "--type",
            "parley.chat.nope.v1",
        ],
        &["replay", "--chat", "not-a-uuid"],
        &[
            "replay",
            "--stream",
            "CHATS",
            "--from-seq",
            "5",
            "--to-seq",
            "2",
        ],
        &[
            "replay",
            "--stream",
            "CHATS",
            "--since",
            "2026-01-02T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
        &["replay", "--stream", "CHATS", "--since", "last tuesday"],
        &["replay"],
    ];
    for args in cases {
        let out = app.parley(args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
        assert!(!out.stderr.is_empty(), "{args:?} said nothing");
    }
}
