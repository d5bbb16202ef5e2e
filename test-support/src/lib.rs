//! Test harness: a private `nats-server -js` per test on a free port with a temporary store,
//! a fresh PostgreSQL database per test, and `eventually` for deadline-bounded waits.
//!
//! Nothing here is a fake: tests talk to real servers. If a server cannot be started the test
//! panics with the reason; it is never skipped.

// A harness for tests: failing to start a server must panic loudly, so expect() is the point.
#![allow(clippy::expect_used)]

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub mod api;
pub mod process;
pub use api::{Api, User};
pub use process::{
    CHEAP_PASSWORD_HASHES, LOAD_TEST_SETTINGS, ParleyChild, PrivatePostgres, Watched,
    proc_status_kib,
};
use sqlx::{ConnectOptions, Connection, PgPool};

/// A `nats-server` child process with JetStream, killed (and its store removed) on drop.
///
/// The server runs under the [`Watched`] shell watchdog, which kills it when our stdin pipe
/// closes, so a test binary that dies without running destructors leaves no server behind.
pub struct NatsServer {
    server: Watched,
    port: u16,
    /// The HTTP monitoring port (`/connz`, `/jsz`, …).
    monitor_port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a fresh server on a free loopback port; panics loudly if it cannot.
    pub async fn start() -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        Self::start_on(store).await
    }

    /// Starts a server on a copy of another's store (`image`, from [`NatsServer::store`] after
    /// [`NatsServer::kill`]): the same streams, messages and consumers, as often as needed.
    pub async fn start_from(image: &Path) -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(image.join("."))
            .arg(store.path())
            .status()
            .unwrap_or_else(|e| panic!("cannot run cp: {e}"));
        assert!(
            copied.success(),
            "cp of {} failed: {copied}",
            image.display()
        );
        Self::start_on(store).await
    }

    /// The server's JetStream store directory.
    pub fn store(&self) -> &Path {
        self.store.path()
    }

    async fn start_on(store: tempfile::TempDir) -> NatsServer {
        let port = free_port();
        let monitor_port = std::iter::repeat_with(free_port)
            .find(|&p| p != port)
            .expect("a second free port");
        let (port_s, monitor_s, store_s) = (
            port.to_string(),
            monitor_port.to_string(),
            store.path().display().to_string(),
        );
        let server = Watched::start(
            "nats-server",
            &[
                "-a",
                "127.0.0.1",
                "-p",
                &port_s,
                "-m",
                &monitor_s,
                "-js",
                "-sd",
                &store_s,
            ],
            &[],
        );
        let server = NatsServer {
            server,
            port,
            monitor_port,
            store,
        };
        server.wait_ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's client connections as its monitoring endpoint lists them (`/connz`):
    /// what a test sees of how a process uses its connections.
    pub async fn connections(&self) -> Vec<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/connz", self.monitor_port);
        let connz: serde_json::Value = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
        connz["connections"].as_array().cloned().unwrap_or_default()
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Freezes the server (SIGSTOP) until [`NatsServer::resume`]: its sockets stay open and
    /// nothing is answered, as in a long stall of the process or its disk.
    pub fn pause(&self) {
        self.server.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.server.signal("CONT");
    }

    /// Starts the server again on the same port with the same store, after `kill`.
    pub async fn restart(&mut self) {
        self.server.restart();
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        if let Err(e) = jetstream_ready(&self.url()).await {
            panic!(
                "nats-server on port {} did not start with JetStream: {e}",
                self.port
            );
        }
    }
}

/// A 3-node (or n-node) JetStream cluster on loopback, for R3 streams; each node a watched
/// child process like `NatsServer`, killed on drop.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

struct ClusterNode {
    name: String,
    port: u16,
    server: Watched,
}

impl NatsCluster {
    /// Starts `n` clustered servers and waits until JetStream has a meta leader.
    pub async fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temporary cluster directory");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let (mut configs, mut nodes) = (Vec::new(), Vec::new());
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            // A 2.9-compatible node config; nats/cluster/ holds the documented ones.
            let config = format!(
                "server_name: {name}\nhost: 127.0.0.1\nport: {port}\n\
                 jetstream {{ store_dir: '{}' }}\n\
                 cluster {{ name: parley-test\n listen: 127.0.0.1:{cluster_port}\n routes: [{}] }}\n",
                store.display(),
                routes.join(", ")
            );
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, config).expect("write node config");
            configs.push((name, *port, path));
        }
        // Every config is written before the first node starts: each names all the routes.
        for (name, port, path) in configs {
            let path = path.display().to_string();
            nodes.push(ClusterNode {
                name,
                port,
                server: Watched::start("nats-server", &["-c", &path], &[]),
            });
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_ready().await;
        cluster
    }

    /// Every node's client URL, comma-separated, as NATS clients take a server list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `server_name` (`n1`, `n2`, …).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// SIGKILLs node `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].server.kill();
    }

    /// Starts node `i` again with its store, after `kill`.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].server.restart();
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        for node in self.nodes.iter().filter(|n| !n.server.killed()) {
            let url = format!("nats://127.0.0.1:{}", node.port);
            if let Err(e) = jetstream_ready(&url).await {
                panic!(
                    "cluster node {} did not get JetStream ready: {e}",
                    node.name
                );
            }
        }
    }
}

/// Waits (30 s at most) until the server at `url` answers JetStream API requests; a loaded
/// machine can take seconds, a cluster longer (it needs a meta leader).
async fn jetstream_ready(url: &str) -> Result<(), async_nats::Error> {
    eventually_result(Duration::from_secs(30), || async {
        let client = async_nats::connect(url).await?;
        let info = client.request("$JS.API.INFO", "".into()).await?;
        let text = String::from_utf8_lossy(&info.payload);
        if text.contains("account_info_response") && !text.contains("\"error\"") {
            Ok::<(), async_nats::Error>(())
        } else {
            Err(format!("JetStream not ready: {text}").into())
        }
    })
    .await
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A fresh, migrated-by-the-caller PostgreSQL database, dropped when the test ends.
pub struct TestDb {
    pub url: String,
    name: String,
    admin: PgConnectOptions,
}

impl TestDb {
    /// Creates `parley_test_<uuid>` on the server named by `DATABASE_URL`.
    pub async fn create() -> TestDb {
        Self::create_with(None).await
    }

    /// A copy of `template` (PostgreSQL's `CREATE DATABASE … TEMPLATE`), which nobody may be
    /// connected to meanwhile.
    pub async fn create_from(template: &TestDb) -> TestDb {
        Self::create_with(Some(&template.name)).await
    }

    async fn create_with(template: Option<&str>) -> TestDb {
        let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!("DATABASE_URL is not set: run the tests with ./dev test (see README)")
        });
        let admin: PgConnectOptions = base
            .parse()
            .unwrap_or_else(|e| panic!("DATABASE_URL {base:?} is not a PostgreSQL URL: {e}"));
        let name = format!("parley_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = admin
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {base}: {e}"));
        let template = template.map_or(String::new(), |t| format!(" TEMPLATE {t}"));
        sqlx::query(&format!("CREATE DATABASE {name}{template}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;
        let url = admin.clone().database(&name).to_url_lossy().to_string();
        TestDb { url, name, admin }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(5)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside or outside a runtime; a plain thread with its own runtime works in both.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(mut conn) = admin.connect().await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The last message stored on `subject` in `stream`, straight from JetStream (what the write
/// side holds, whatever the projectors have applied); `None` while there is none. Any other
/// failure panics: a test's streams exist.
pub async fn last_stored(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let stream = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(msg) => Some(msg),
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => None,
        Err(e) => panic!("the last message on {subject}: {e}"),
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retries a fallible `attempt` until it succeeds or `deadline` passes, returning the last error.
pub async fn eventually_result<T, E, F, Fut>(deadline: Duration, mut attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// A private NATS server, a fresh database, and the connected `Infra` on top of them.
pub struct TestStack {
    pub nats: NatsServer,
    pub db: TestDb,
    pub infra: parley_platform::Infra,
    pub config: parley_platform::InfraConfig,
}

impl TestStack {
    pub async fn start() -> TestStack {
        let nats = NatsServer::start().await;
        let db = TestDb::create().await;
        let config = parley_platform::InfraConfig {
            nats_url: nats.url(),
            database_url: db.url.clone(),
            pg_max_connections: 8,
            ..Default::default()
        };
        let infra =
            parley_platform::Infra::connect(&config, tokio_util::sync::CancellationToken::new())
                .await
                .expect("connect the test stack");
        TestStack {
            nats,
            db,
            infra,
            config,
        }
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.infra.shutdown.cancel();
    }
}

/// Appends `MessageSent` events of `sender` to `chat` straight onto its subject, with the
/// aggregate sequences `sequences`, pipelined 2,000 at a time, as command-api would store them:
/// how a test or the cold-load benchmark makes a chat of a million events in seconds.
pub async fn fill_chat(
    js: &async_nats::jetstream::Context,
    chat: &str,
    sender: parley_schemas::UserId,
    sequences: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<()> {
    use parley_schemas::cloudevent::{EventMeta, encode};
    use parley_schemas::events::MessageSent;
    use parley_schemas::{ChatEvent, EventId, MessageId};
    let subject = format!("chats.{chat}");
    let (first, last) = sequences.into_inner();
    for start in (first..=last).step_by(2000) {
        let mut acks = Vec::with_capacity(2000);
        for sequence in start..=last.min(start + 1999) {
            let meta = EventMeta {
                id: EventId::new(),
                subject: chat.to_owned(),
                time: chrono::Utc::now(),
                sequence,
                actor: sender,
            };
            let event = ChatEvent::MessageSent(MessageSent {
                message_id: MessageId::new(),
                sender_id: sender,
                body: format!("fill {sequence}"),
                reply_to: None,
                attachments: vec![],
                thread_root: None,
                mentions: vec![],
            });
            acks.push(
                js.publish(subject.clone(), encode(&meta, &event).into())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
    }
    Ok(())
}
