//! The crash tests' process watchdog: a program that exits on its own is seen as exited (so a
//! supervisor can restart it), and `kill` stops a running one.

use std::path::Path;
use std::time::Duration;

use parley_test_support::{Watched, eventually};

/// The pid a `sh -c 'echo $$ > file; exec …'` program wrote, once it has.
async fn pid_in(file: &Path) -> u32 {
    eventually(
        Duration::from_secs(10),
        "the program's pid file",
        || async { std::fs::read_to_string(file).ok()?.trim().parse().ok() },
    )
    .await
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_program_that_exits_on_its_own_is_seen_as_exited_and_restart_runs_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let script = format!("echo run >> {}; exit 3", runs.display());
    let mut w = Watched::start("sh", &["-c", &script], &[]);
    eventually(
        Duration::from_secs(10),
        "the program seen as exited",
        || std::future::ready(w.exited().then_some(())),
    )
    .await;
    w.restart();
    eventually(Duration::from_secs(10), "a second run", || async {
        let text = std::fs::read_to_string(&runs).unwrap_or_default();
        (text.lines().count() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_running_program_is_not_exited_and_kill_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let mut w = Watched::start("sh", &["-c", &script], &[]);
    let pid = pid_in(&pid_file).await;
    assert!(alive(pid));
    assert!(!w.exited(), "a running program is not exited");
    w.kill();
    // `kill` returns once the watchdog has reaped the program.
    assert!(!alive(pid), "the program is gone after kill");
    assert!(w.exited());
}
