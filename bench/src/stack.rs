//! The servers one benchmark run talks to: a private `nats-server` (temporary store, free
//! port), a fresh PostgreSQL database on `DATABASE_URL`, and the real `parley up` binary as a
//! child process with abuse limits off.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use parley_test_support::{NatsServer, TestDb, free_port};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// NATS, PostgreSQL and a running Parley; everything is stopped and dropped with it.
pub struct Stack {
    pub nats: NatsServer,
    pub db: TestDb,
    pub pg: PgPool,
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub parley: Parley,
    bin: PathBuf,
}

impl Stack {
    pub async fn start(parley_bin: PathBuf) -> anyhow::Result<Stack> {
        let nats = NatsServer::start().await;
        let db = TestDb::create().await;
        let pg = PgPoolOptions::new()
            .max_connections(8)
            .connect(&db.url)
            .await
            .context("connect to the bench database")?;
        let client = async_nats::connect(nats.url()).await?;
        let js = async_nats::jetstream::new(client.clone());
        let parley = Parley::spawn(&parley_bin, &nats.url(), &db.url, "up").await?;
        Ok(Stack {
            nats,
            db,
            pg,
            js,
            client,
            parley,
            bin: parley_bin,
        })
    }

    /// Waits until every durable consumer of every stream has taken and acknowledged all
    /// there is: the projectors have worked off earlier scenarios' events.
    pub async fn settle(&self, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let mut behind = 0u64;
            for name in ["CHATS", "USERS", "RECEIPTS"] {
                let stream = self.js.get_stream(name).await?;
                let mut consumers = std::pin::pin!(stream.consumers());
                while let Some(info) = consumers.next().await {
                    let info = info?;
                    behind += info.num_pending + info.num_ack_pending as u64;
                }
            }
            if behind == 0 {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!("the projectors are still {behind} events behind after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The `parley` binary the bench runs.
    pub fn bin(&self) -> &std::path::Path {
        &self.bin
    }

    /// Stops the running Parley and starts `parley <role>` (`up` or `command-api`) instead, on
    /// the same NATS and database.
    pub async fn restart_parley(&mut self, role: &str) -> anyhow::Result<()> {
        self.parley.stop().await;
        self.parley = Parley::spawn(&self.bin, &self.nats.url(), &self.db.url, role).await?;
        Ok(())
    }
}

/// `parley up` as a child process; killed on drop.
pub struct Parley {
    child: tokio::process::Child,
    pub base: String,
    pub port: u16,
    pub pid: u32,
}

impl Parley {
    /// Starts `parley <role>` on `nats_url` and `db_url` and waits for its `/healthz`.
    pub async fn spawn(
        bin: &std::path::Path,
        nats_url: &str,
        db_url: &str,
        role: &str,
    ) -> anyhow::Result<Parley> {
        if !bin.exists() {
            bail!(
                "{} not found: build it first with `cargo build --release --bin parley` (./dev bench does)",
                bin.display()
            );
        }
        let port = free_port();
        // `ulimit -n` then exec: the idle-connections scenario holds thousands of sockets, and
        // exec keeps the pid, so /proc/<pid> is the gateway's own memory.
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$1\"")
            .arg(bin)
            .arg(role)
            .env("NATS_URL", nats_url)
            .env("DATABASE_URL", db_url)
            .env("PARLEY_ADDR", format!("127.0.0.1:{port}"))
            .env("PARLEY_COMMAND_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                std::env::var("PARLEY_BENCH_LOG").unwrap_or("warn".into()),
            )
            // Every client of a run comes from 127.0.0.1: the per-address limits would bite.
            .envs(parley_test_support::LOAD_TEST_SETTINGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id().context("parley exited at once")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("parley up exited during start-up: {status}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("parley up did not answer /healthz within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Parley {
            child,
            base,
            port,
            pid,
        })
    }

    /// Resident memory of the parley process, in KiB (VmRSS of /proc/<pid>/status).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }

    /// CPU time the parley process has used so far, in ms.
    pub fn cpu_ms(&self) -> Option<f64> {
        cpu_ms(self.pid)
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// CPU time (user and system) a process has used so far, in ms: fields 14 and 15 of
/// `/proc/<pid>/stat`, in clock ticks of 10 ms (Linux's `USER_HZ` of 100).
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are numbers.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10.0)
}

/// CPU time the whole machine has been busy so far (every core, every process: user, nice,
/// system, interrupts), in ms: the first line of `/proc/stat`, in ticks of 10 ms. Beside a
/// process's own [`cpu_ms`] it shows what the servers it talks to (nats-server, PostgreSQL)
/// spent on the same work.
pub fn machine_busy_ms() -> Option<f64> {
    machine_ticks().map(|t| t.busy * 10.0)
}

/// The machine's CPU ticks so far, busy and in all (every core).
#[derive(Clone, Copy, Debug)]
struct Ticks {
    busy: f64,
    total: f64,
}

fn machine_ticks() -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let sum = |fields: &[usize]| fields.iter().filter_map(|&i| ticks.get(i)).sum::<f64>();
    Some(Ticks {
        busy: sum(&[0, 1, 2, 5, 6, 7]),
        total: sum(&[0, 1, 2, 3, 4, 5, 6, 7]),
    })
}

/// The share of the machine's CPU (all cores) busy between two readings, in percent.
fn busy_percent(before: Ticks, after: Ticks) -> f64 {
    let total = after.total - before.total;
    if total <= 0.0 {
        return 100.0;
    }
    100.0 * (after.busy - before.busy) / total
}

/// A window the machine counts as quiet when at most this share of its CPU was busy. An idle
/// machine here shows 0–3 % (the other servers the sandbox starts); a phase that just ended
/// (sockets closing, a projector finishing its receipts, autovacuum) shows 20–100 %.
const QUIET_PERCENT: f64 = 10.0;

/// How long one reading of [`settle`] looks: 20 ticks of 10 ms per core.
const SETTLE_WINDOW: Duration = Duration::from_millis(200);

/// How [`settle`] went: how long it waited, and the busy share of its last window.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    pub waited: Duration,
    pub busy_percent: f64,
}

impl Settled {
    /// The last window was quiet (100 % busy stands for "no reading", which is never quiet).
    pub fn quiet(&self) -> bool {
        self.busy_percent <= QUIET_PERCENT
    }
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.quiet() {
            write!(f, "machine quiet after {:.1} s", self.waited.as_secs_f64())
        } else {
            write!(
                f,
                "machine still {:.0} % busy after {:.1} s",
                self.busy_percent,
                self.waited.as_secs_f64()
            )
        }
    }
}

/// Waits, up to `deadline`, until the machine is quiet (a [`SETTLE_WINDOW`] with at most
/// [`QUIET_PERCENT`] of its CPU busy), so that a phase does not start while the last one's
/// tail still runs: the floor's 5,000 sockets closing, Parley's projectors finishing the
/// receipts of the last messages. Both the floor and the figure start this way, so neither
/// pays for the other (docs/benchmarks.md, "Session 21"). Without `/proc/stat` it returns at
/// once, not quiet.
pub async fn settle(deadline: Duration) -> Settled {
    let start = Instant::now();
    let mut settled = Settled {
        waited: Duration::ZERO,
        busy_percent: 100.0,
    };
    // Each window's closing reading opens the next one.
    let mut before = machine_ticks();
    while let Some(opening) = before {
        tokio::time::sleep(SETTLE_WINDOW).await;
        before = machine_ticks();
        if let Some(closing) = before {
            settled.busy_percent = busy_percent(opening, closing);
        }
        settled.waited = start.elapsed();
        if settled.quiet() || settled.waited >= deadline {
            break;
        }
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::{Ticks, busy_percent, cpu_ms, machine_busy_ms, settle};
    use std::time::{Duration, Instant};

    /// Computes until this process's CPU counter shows 50 ms more (five ticks), within a
    /// deadline: a reader that never saw it move, or read the wrong fields, fails here.
    fn compute_50_ms() {
        let me = std::process::id();
        let before = cpu_ms(me).expect("this process's /proc stat");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut now = before;
        while now - before < 50.0 {
            assert!(
                Instant::now() < deadline,
                "{before} ms, still {now} ms after 20 s"
            );
            spin(1_000_000);
            now = cpu_ms(me).expect("this process's /proc stat");
        }
    }

    /// `rounds` steps of arithmetic the optimiser cannot drop: the tests' way to use CPU.
    fn spin(rounds: u32) {
        let mut x = 0u64;
        for _ in 0..rounds {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn a_process_cpu_time_grows_while_it_computes() {
        compute_50_ms();
        assert_eq!(cpu_ms(u32::MAX), None, "no such process");
    }

    #[test]
    fn the_machine_is_busy_at_least_while_this_process_computes() {
        let machine = machine_busy_ms().expect("/proc/stat");
        compute_50_ms();
        // The machine counts this process's ticks too (less a tick of rounding per counter).
        let grew = machine_busy_ms().expect("/proc/stat") - machine;
        assert!(
            grew >= 30.0,
            "the machine was busy {grew} ms while this process computed 50"
        );
    }

    #[test]
    fn the_busy_share_is_busy_ticks_over_all_ticks_of_the_window() {
        let at = |busy, total| Ticks { busy, total };
        assert_eq!(busy_percent(at(100.0, 1000.0), at(104.0, 1040.0)), 10.0);
        assert_eq!(busy_percent(at(100.0, 1000.0), at(140.0, 1040.0)), 100.0);
        assert_eq!(busy_percent(at(100.0, 1000.0), at(100.0, 1040.0)), 0.0);
        // No tick counted in the window: nothing says the machine was quiet.
        assert_eq!(busy_percent(at(100.0, 1000.0), at(100.0, 1000.0)), 100.0);
    }

    /// While a thread per core computes, the machine is never quiet: `settle` gives up at its
    /// deadline and says so. (That it returns at once on an idle machine is not asserted: the
    /// test binaries around it keep the machine busy.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn settle_waits_out_a_busy_machine_until_its_deadline_and_says_it_was_busy() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let burners: Vec<_> = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        spin(10_000);
                    }
                })
            })
            .collect();
        let settled = settle(Duration::from_millis(600)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for b in burners {
            b.join().expect("burner thread");
        }
        assert!(!settled.quiet(), "{settled}");
        assert!(settled.busy_percent > 50.0, "{settled}");
        assert!(settled.waited >= Duration::from_millis(600), "{settled}");
        assert!(
            settled.to_string().starts_with("machine still"),
            "{settled}"
        );
    }
}
