//! Real processes for crash tests: any program under a shell watchdog (SIGKILLed on `kill`, or
//! when the test binary dies), and a private PostgreSQL cluster that can be shut down
//! "immediate" (no checkpoint: crash recovery on restart), on free ports with temporary data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{eventually_result, free_port};

/// The argon2id cost every test Parley hashes passwords at (`PARLEY_ARGON2_PARAMS`; the
/// cheapest argon2 allows): sign-ups are a test's setup, and the cost has its own tests.
pub const CHEAP_PASSWORD_HASHES: &str = "m=8,t=1,p=1";

/// Settings for a `parley` child process driven by a load test: command-api's abuse limits
/// off, and the cheapest password hashes argon2 allows, since sign-ups are the setup of such a
/// test, not what it measures (the limits and the hash cost have their own tests).
pub const LOAD_TEST_SETTINGS: [(&str, &str); 8] = [
    ("PARLEY_RATE_SEND_PER_USER", "off"),
    ("PARLEY_RATE_SEND_PER_IP", "off"),
    ("PARLEY_RATE_SIGNUP_PER_IP", "off"),
    ("PARLEY_RATE_LOGIN_PER_IP", "off"),
    ("PARLEY_RATE_LOGIN_PER_HANDLE", "off"),
    ("PARLEY_FLOOD_MAX_CHATS", "1000000"),
    ("PARLEY_WS_MAX_CONNECTIONS_PER_IP", "off"),
    ("PARLEY_ARGON2_PARAMS", CHEAP_PASSWORD_HASHES),
];

/// A program run under `sh`: closing the watchdog's stdin sends `signal` to the program.
pub struct Watched {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    signal: &'static str,
    log: Option<PathBuf>,
    child: Option<Child>,
}

impl Watched {
    /// Starts `program args…` with `env` added; `kill` sends SIGKILL.
    pub fn start(program: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> Watched {
        Self::start_with(program, args, env, "KILL", None)
    }

    /// As `start`, with the signal `kill` sends (`KILL`, `QUIT`, `TERM`) and an optional log
    /// file for stdout and stderr (appended across restarts).
    pub fn start_with(
        program: impl AsRef<Path>,
        args: &[&str],
        env: &[(&str, &str)],
        signal: &'static str,
        log: Option<&Path>,
    ) -> Watched {
        let mut w = Watched {
            program: program.as_ref().to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            signal,
            log: log.map(Path::to_path_buf),
            child: None,
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        // "$0" "$@" runs the program with its arguments unquoted by nobody: no shell injection.
        // The watchdog reads stdin in the background (through fd 3: a background job's own
        // stdin is /dev/null) and the shell waits for the program, so the shell exits when the
        // program does and `exited` sees it. With the read in the foreground, a program that
        // gave up on its own left its shell waiting, and no supervisor ever restarted it.
        let script = format!(
            "exec 3<&0; \"$0\" \"$@\" & pid=$!; \
             {{ read _ <&3; kill -{} $pid 2>/dev/null; }} & wait $pid",
            self.signal
        );
        let (out, err) = match &self.log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap_or_else(|e| panic!("open log {}: {e}", p.display()));
                let f2 = f.try_clone().unwrap_or_else(|e| panic!("dup log: {e}"));
                (Stdio::from(f), Stdio::from(f2))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// Signals the program (SIGKILL unless made otherwise) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the program itself, not its watchdog shell: a
    /// `STOP` freezes a server the way a long stall would, with its sockets open.
    pub fn signal(&self, signal: &str) {
        let shell = self.child.as_ref().expect("the program runs").id();
        let children = format!("/proc/{shell}/task/{shell}/children");
        let pids = std::fs::read_to_string(&children)
            .unwrap_or_else(|e| panic!("cannot read {children}: {e}"));
        let pid = pids
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("{} has no process under its shell", self.program.display()));
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid)
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(sent.success(), "kill -{signal} {pid} failed: {sent}");
    }

    /// Kills, then starts the same command again.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether `kill` stopped the program (and no `restart` ran since).
    pub fn killed(&self) -> bool {
        self.child.is_none()
    }

    /// Whether the program has exited on its own (a supervisor would restart it).
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL cluster of our own (`initdb` in a temporary directory, a free port), run as the
/// `postgres` OS user when we are root. `crash` is an immediate shutdown: no checkpoint, so the
/// restart runs crash recovery from the WAL, exactly what a power cut leaves.
pub struct PrivatePostgres {
    port: u16,
    server: Watched,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("temporary PostgreSQL directory");
        let data = dir.path().join("data");
        let as_root = is_root();
        if as_root {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()));
        }
        let mut initdb = pg_command(as_root, &bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(&mut initdb);
        let port = free_port();
        let port_s = port.to_string();
        let socket_dir = dir.path().display().to_string();
        let data_s = data.display().to_string();
        let postgres = bin.join("postgres");
        let mut args: Vec<&str> = Vec::new();
        let program: PathBuf = if as_root {
            args.extend(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
            args.push(postgres.to_str().expect("utf-8 path"));
            PathBuf::from("setpriv")
        } else {
            postgres.clone()
        };
        args.extend([
            "-D",
            &data_s,
            "-p",
            &port_s,
            "-k",
            &socket_dir,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=200",
        ]);
        // SIGQUIT is PostgreSQL's immediate shutdown.
        let server = Watched::start_with(program, &args, &[], "QUIT", None);
        let pg = PrivatePostgres {
            port,
            server,
            _dir: dir,
        };
        pg.wait_ready().await;
        pg
    }

    /// A superuser URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Immediate shutdown, as a crash: in-flight transactions are lost, committed ones are not.
    pub fn crash(&mut self) {
        self.server.kill();
    }

    /// Starts again after `crash` (crash recovery runs) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.server.restart();
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let url = self.url("postgres");
        let ready: Result<(), sqlx::Error> = eventually_result(Duration::from_secs(30), || async {
            use sqlx::Connection;
            let c = sqlx::PgConnection::connect(&url).await?;
            c.close().await
        })
        .await;
        if let Err(e) = ready {
            panic!(
                "private PostgreSQL on port {} did not start: {e}",
                self.port
            );
        }
    }
}

fn pg_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("no PostgreSQL server binaries under {}", root.display()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pg_command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `parley <role> --addr 127.0.0.1:<free port>` child process (the binary under test), with
/// the abuse limits off and a small pool; SIGKILLed on drop. For tests that need the process
/// itself: its pid for memory figures, or a kill that runs no shutdown code.
pub struct ParleyChild {
    child: Child,
    port: u16,
}

impl ParleyChild {
    /// Starts it and waits (20 s at most) until `/healthz` answers.
    pub async fn start(bin: &str, role: &str, nats_url: &str, database_url: &str) -> ParleyChild {
        Self::start_with(bin, role, nats_url, database_url, &[]).await
    }

    /// As `start`, with more environment (applied last, so it can turn a limit back on).
    pub async fn start_with(
        bin: &str,
        role: &str,
        nats_url: &str,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> ParleyChild {
        let port = free_port();
        let child = Command::new(bin)
            .args([role, "--addr", &format!("127.0.0.1:{port}")])
            .env("NATS_URL", nats_url)
            .env("DATABASE_URL", database_url)
            .env("PARLEY_PG_MAX_CONNECTIONS", "4")
            .env("RUST_LOG", "warn")
            .envs(LOAD_TEST_SETTINGS)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let p = ParleyChild { child, port };
        let url = format!("{}/healthz", p.base());
        let http = reqwest::Client::new();
        crate::eventually(
            Duration::from_secs(20),
            &format!("parley {role} to answer /healthz"),
            || async {
                let res = http.get(&url).send().await.ok()?;
                res.status().is_success().then_some(())
            },
        )
        .await;
        p
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or the OOM killer would: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ParleyChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A memory figure of a process from `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
