//! Tests of the redb log store: openraft's own conformance suite, reopening, snapshots, and
//! crashes (a child process killed with SIGKILL while it writes).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openraft::storage::{RaftLogStorageExt, StorageHelper};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Membership, RaftLogReader};
use tempfile::TempDir;

use super::*;
use crate::fleet::log::state::{
    Command, DeploymentState, HostState, NewDeployment, PlannedHost, Verdict,
};
use crate::fleet::plan::{DeploymentConfig, Health, Revision};

/// Builds a fresh store in a temporary directory for each of the suite's tests.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("a temporary directory");
        let (log, sm) = open(&dir.path().join("raft")).expect("opening a new log");
        Ok((dir, log, sm))
    }
}

/// openraft's storage conformance suite (`openraft::testing::Suite`, 35 cases: log state,
/// append, truncate, purge, vote, committed, membership, initial state with re-applying the
/// committed entries, apply, snapshots built and installed on another store).
#[test]
fn openraft_conformance_suite() {
    Suite::test_all(Builder).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn command_entry(term: u64, index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(command),
    }
}

fn create(id: &str, hosts: &[&str], intent_len: usize) -> Command {
    Command::CreateDeployment(NewDeployment {
        id: id.to_owned(),
        app: "inference".to_owned(),
        group: "inference".to_owned(),
        targets: "role=inference".to_owned(),
        revision: "rev-2".to_owned(),
        config: DeploymentConfig::default(),
        rollout: Default::default(),
        rollback_to: None,
        rollback_of: None,
        hosts: hosts
            .iter()
            .map(|h| PlannedHost {
                name: h.to_string(),
                health: Health::Healthy,
                revision: Revision::Known("rev-1".to_owned()),
                zone: None,
            })
            .collect(),
        signed_intent: vec![7; intent_len],
        created_at_ms: 1,
        origin: None,
        catch_up: None,
    })
}

fn start(id: &str, hosts: &[&str]) -> Command {
    Command::StartHosts {
        deployment: id.to_owned(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    }
}

fn succeeded(id: &str, host: &str) -> Command {
    Command::HostResult {
        deployment: id.to_owned(),
        host: host.to_owned(),
        verdict: Verdict::Succeeded,
        report: Default::default(),
    }
}

/// A deployment's life: created, a membership change, two hosts started, results (one
/// repeated, one for a deployment that does not exist), stopped.
fn a_deployments_entries() -> Vec<Entry> {
    let members = Membership::new(vec![BTreeSet::from([1, 2, 3])], None);
    vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(members),
        },
        command_entry(1, 3, create("d1", &["a", "b", "c"], 64)),
        command_entry(1, 4, start("d1", &["a", "b"])),
        command_entry(2, 5, succeeded("d1", "a")),
        command_entry(2, 6, succeeded("d1", "a")),
        command_entry(2, 7, succeeded("d9", "a")),
        command_entry(
            2,
            8,
            Command::Stop {
                deployment: "d1".into(),
                rollback: false,
            },
        ),
    ]
}

fn check_deployment_applied(state: &DeploymentsState) {
    let d = state.get("d1").expect("d1 is in the state");
    assert_eq!(d.status, DeploymentState::Stopped);
    assert_eq!(d.hosts["a"].state, HostState::Succeeded);
    assert_eq!(
        d.hosts["b"].state,
        HostState::InProgress {
            fence: Fence { term: 1, index: 4 }
        }
    );
    assert_eq!(d.hosts["c"].state, HostState::Skipped);
    assert_eq!(state.len(), 1);
}

#[test]
fn what_was_written_is_there_after_reopening() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft");
    runtime().block_on(async {
        let (mut log, _sm) = open(&path).unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        log.blocking_append(a_deployments_entries()).await.unwrap();
        log.truncate(log_id(2, 8)).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
        log.save_committed(Some(log_id(2, 6))).await.unwrap();
    });
    // Everything above is dropped: the database is closed.
    runtime().block_on(async {
        let (mut log, _sm) = open(&path).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 6)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(2, 7)));
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        let expected: Vec<_> = a_deployments_entries()[2..7].to_vec();
        assert_eq!(entries, expected);
    });
}

#[test]
fn reads_take_any_range_bounds() {
    let dir = TempDir::new().unwrap();
    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path()).unwrap();
        log.blocking_append(a_deployments_entries()).await.unwrap();
        let indexes =
            |entries: Vec<Entry>| -> Vec<u64> { entries.iter().map(|e| e.log_id.index).collect() };
        let read = |start, end| {
            let mut log = log.clone();
            async move { indexes(log.try_get_log_entries((start, end)).await.unwrap()) }
        };
        use Bound::{Excluded, Included, Unbounded};
        assert_eq!(
            read(Unbounded, Unbounded).await,
            (1..=8).collect::<Vec<_>>()
        );
        assert_eq!(read(Excluded(2), Included(4)).await, vec![3, 4]);
        assert_eq!(read(Included(7), Unbounded).await, vec![7, 8]);
        assert_eq!(read(Included(5), Excluded(5)).await, Vec::<u64>::new());
        assert_eq!(read(Included(6), Excluded(2)).await, Vec::<u64>::new());
        assert_eq!(read(Excluded(u64::MAX), Unbounded).await, Vec::<u64>::new());
        assert_eq!(read(Included(8), Included(u64::MAX)).await, vec![8]);
        assert_eq!(log.try_get_log_entries(20..30).await.unwrap(), vec![]);
    });
}

#[test]
fn applied_state_round_trips_through_a_snapshot() {
    let dir = TempDir::new().unwrap();
    let (leader_dir, follower_dir) = (dir.path().join("leader"), dir.path().join("follower"));
    runtime().block_on(async {
        let (_log, mut sm) = open(&leader_dir).unwrap();
        let responses = sm.apply(a_deployments_entries()).await.unwrap();
        assert_eq!(responses[0], Response::Internal);
        assert_eq!(
            responses[3],
            Response::Applied {
                fence: Fence { term: 1, index: 4 }
            }
        );
        assert_eq!(responses[5], Response::Unchanged);
        assert!(matches!(responses[6], Response::Refused(_)));
        check_deployment_applied(&sm.reader().read(|s| s.clone()));

        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(2, 8)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);

        // Installed on another voter, it gives the same state.
        let (_flog, mut follower) = open(&follower_dir).unwrap();
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        *receiving = *current.snapshot;
        follower
            .install_snapshot(&current.meta, receiving)
            .await
            .unwrap();
        let (last, membership) = follower.applied_state().await.unwrap();
        assert_eq!(last, Some(log_id(2, 8)));
        assert_eq!(membership.log_id(), &Some(log_id(1, 2)));
        check_deployment_applied(&follower.reader().read(|s| s.clone()));
        assert_eq!(follower.reader().last_applied(), Some(log_id(2, 8)));
    });
    // And each comes back from its own snapshot after reopening.
    for dir in [&leader_dir, &follower_dir] {
        let (_log, sm) = open(dir).unwrap();
        assert_eq!(sm.reader().last_applied(), Some(log_id(2, 8)));
        check_deployment_applied(&sm.reader().read(|s| s.clone()));
    }
}

#[test]
fn a_restarted_node_re_applies_committed_entries_after_its_snapshot() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft");
    runtime().block_on(async {
        let (mut log, mut sm) = open(&path).unwrap();
        // A real log starts at index 0 (openraft's initial membership).
        let mut entries = vec![Entry {
            log_id: log_id(0, 0),
            payload: EntryPayload::Blank,
        }];
        entries.extend(a_deployments_entries());
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..5].to_vec()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // Applied further in memory, then the process ends: that part is not in the file.
        sm.apply(entries[5..].to_vec()).await.unwrap();
        log.save_committed(Some(log_id(2, 8))).await.unwrap();
    });
    runtime().block_on(async {
        let (mut log, mut sm) = open(&path).unwrap();
        assert_eq!(
            sm.reader().last_applied(),
            Some(log_id(1, 4)),
            "the snapshot"
        );
        StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap();
        assert_eq!(sm.reader().last_applied(), Some(log_id(2, 8)));
        check_deployment_applied(&sm.reader().read(|s| s.clone()));
    });
}

#[test]
fn a_log_of_another_format_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft");
    drop(open(&path).unwrap());
    {
        let db = Database::create(path.join(FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        write_meta(&txn, FORMAT_KEY, &(FORMAT + 1), "format").unwrap();
        txn.commit().unwrap();
    }
    let err = open(&path).err().expect("refused");
    assert!(
        format!("{err:#}").contains(&format!("format {FORMAT}")),
        "{err:#}"
    );
}

#[test]
fn a_second_open_of_the_same_log_is_refused() {
    let dir = TempDir::new().unwrap();
    let _first = open(dir.path()).unwrap();
    assert!(open(dir.path()).is_err());
}

// ---- crashes -------------------------------------------------------------------------

/// Where the child process writes, and what it does there.
const CHILD_DIR: &str = "SHOAL_TEST_RAFT_CHILD_DIR";
const CHILD_MODE: &str = "SHOAL_TEST_RAFT_CHILD_MODE";
const CHILD_TEST: &str = "fleet::log::store::tests::crash_child";

/// Not a test on its own: the body of the child process the crash tests start and kill.
/// Without its environment it does nothing.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let mode = std::env::var(CHILD_MODE).unwrap_or_default();
    let dir = Path::new(&dir);
    runtime().block_on(async {
        match mode.as_str() {
            "uncommitted" => child_leaves_a_transaction_open(dir).await,
            _ => child_writes_until_killed(dir).await,
        }
    });
}

/// Prints a line to the real stdout (past the test harness's capture) and flushes it. It
/// starts with a newline, since the harness leaves its own line unfinished.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{line}").unwrap();
    out.flush().unwrap();
}

/// Appends batches of entries, raising the vote now and then, applying, snapshotting and
/// purging now and then, and prints what each durable write acknowledged.
async fn child_writes_until_killed(dir: &Path) {
    let (mut log, mut sm) = open(dir).unwrap();
    let mut term = log
        .read_vote()
        .await
        .unwrap()
        .map_or(1, |v| v.leader_id.term);
    let mut next = log
        .get_log_state()
        .await
        .unwrap()
        .last_log_id
        .map_or(1, |l| l.index + 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let batch = 1 + round % 4;
        let entries: Vec<Entry> = (next..next + batch)
            .map(|i| command_entry(term, i, create(&format!("d{i}"), &["a", "b"], 700)))
            .collect();
        log.blocking_append(entries).await.unwrap();
        next += batch;
        say(&format!("acked {}", next - 1));
        if round.is_multiple_of(16) {
            term += 1;
            log.save_vote(&Vote::new(term, 1)).await.unwrap();
            say(&format!("vote {term}"));
        }
        if round.is_multiple_of(40) {
            let from = sm.reader().last_applied().map_or(0, |l| l.index + 1);
            let entries = log.try_get_log_entries(from..next).await.unwrap();
            sm.apply(entries).await.unwrap();
            let snapshot = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            let upto = snapshot.meta.last_log_id.unwrap();
            if upto.index > 20 {
                let purge_to = log.try_get_log_entries(upto.index - 20..upto.index - 19);
                let purge_to = purge_to.await.unwrap()[0].log_id;
                log.save_committed(Some(upto)).await.unwrap();
                log.purge(purge_to).await.unwrap();
            }
        }
    }
}

/// Appends ten entries durably, then leaves a large write transaction open and waits to be
/// killed.
async fn child_leaves_a_transaction_open(dir: &Path) {
    let (mut log, _sm) = open(dir).unwrap();
    let entries: Vec<Entry> = (1..=10)
        .map(|i| command_entry(1, i, create(&format!("d{i}"), &["a"], 100)))
        .collect();
    log.blocking_append(entries).await.unwrap();
    let txn = log.db.begin_write().unwrap();
    {
        let mut table = txn.open_table(LOG).unwrap();
        for i in 11..=2_000u64 {
            let entry = command_entry(1, i, create(&format!("d{i}"), &["a"], 4_000));
            table
                .insert(i, postcard::to_allocvec(&entry).unwrap().as_slice())
                .unwrap();
        }
    }
    say("uncommitted");
    std::thread::sleep(Duration::from_secs(60));
    drop(txn);
}

/// A child process running [`crash_child`] in `mode` on `dir`, its stdout read line by line.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Child {
    fn start(dir: &Path, mode: &str) -> Child {
        let mut process = std::process::Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR, dir)
            .env(CHILD_MODE, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child {
            process,
            lines,
            reader,
        }
    }

    /// Waits for a line starting with `prefix`; returns every line read until then.
    fn wait_for(&self, prefix: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("the child never said {prefix:?} ({e}): {seen:?}"));
            let found = line.starts_with(prefix);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }

    /// SIGKILLs it and returns the rest of what it printed.
    fn kill(mut self) -> Vec<String> {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
        self.reader.join().unwrap();
        self.lines.try_iter().collect()
    }
}

/// The highest number printed after `prefix` in `lines`.
fn highest(lines: &[String], prefix: &str) -> Option<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .max()
}

/// Kill -9 at varied moments while appending, voting, snapshotting and purging; after each,
/// the log reopens, holds every acknowledged entry and vote, has no hole, and its snapshot
/// and purge point agree.
#[test]
fn a_kill_at_any_moment_loses_nothing_acknowledged() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft");
    let mut acked = 0;
    let mut voted = 0;
    for (round, delay_ms) in [0u64, 7, 23, 61, 3, 150, 90, 37, 250, 11]
        .into_iter()
        .enumerate()
    {
        let child = Child::start(&path, "write");
        let mut lines = child.wait_for("acked ");
        std::thread::sleep(Duration::from_millis(delay_ms));
        lines.extend(child.kill());
        acked = acked.max(highest(&lines, "acked ").unwrap());
        voted = voted.max(highest(&lines, "vote ").unwrap_or(0));

        runtime().block_on(async {
            let (mut log, mut sm) = open(&path)
                .unwrap_or_else(|e| panic!("round {round}: reopening after kill -9: {e:#}"));
            let state = log.get_log_state().await.unwrap();
            let last = state.last_log_id.unwrap();
            assert!(last.index >= acked, "round {round}: {last} < acked {acked}");
            let vote = log
                .read_vote()
                .await
                .unwrap()
                .map_or(0, |v| v.leader_id.term);
            assert!(vote >= voted, "round {round}: vote {vote} < acked {voted}");

            let first = state.last_purged_log_id.map_or(1, |p| p.index + 1);
            let entries = log.try_get_log_entries(0..=last.index).await.unwrap();
            let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
            let expected: Vec<u64> = (first..=last.index).collect();
            assert_eq!(indexes, expected, "round {round}: a hole or a stray entry");
            assert!(
                entries.windows(2).all(|w| w[0].log_id <= w[1].log_id),
                "round {round}: terms go backwards"
            );

            if let Some(snapshot) = sm.get_current_snapshot().await.unwrap() {
                assert!(snapshot.meta.last_log_id <= Some(last), "round {round}");
                assert!(state.last_purged_log_id <= snapshot.meta.last_log_id);
                assert_eq!(sm.reader().last_applied(), snapshot.meta.last_log_id);
            } else {
                assert_eq!(state.last_purged_log_id, None, "round {round}");
            }
        });
    }
    assert!(acked > 10, "the children wrote something ({acked})");
}

/// A write transaction open when the process is killed leaves no trace.
#[test]
fn an_uncommitted_transaction_is_not_there_after_a_kill() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("raft");
    let child = Child::start(&path, "uncommitted");
    child.wait_for("uncommitted");
    child.kill();
    runtime().block_on(async {
        let (mut log, _sm) = open(&path).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 10)));
        let entries = log.try_get_log_entries(0..).await.unwrap();
        assert_eq!(entries.len(), 10);
        assert_eq!(entries[9].log_id, log_id(1, 10));
    });
}
