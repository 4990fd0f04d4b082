//! The broker-state tests: the inventory, the descriptor poll, the heuristics and the history.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use brokerscope_common::state::AT_FDCWD;

use super::fds::{self, FdPoll, tests::Placed};
use super::history::MAX_CHANGES;
use super::inventory::Inventory;
use super::polling::{FdWatch, MAX_LINKS_PER_POLL, POLL_PACE, paced};
use super::view::KafkaState;
use super::*;
use crate::broker::{Broker, tests::broker};
use crate::files::ProcessRoot;
use crate::probes::state::StateSignal;

#[test]
fn numbers_names_and_readiness_follow_strimzi() {
    let all = [
        (KafkaState::NotRunning, 0, false),
        (KafkaState::Starting, 1, false),
        (KafkaState::Recovery, 2, false),
        (KafkaState::Running, 3, true),
        (KafkaState::PendingControlledShutdown, 6, true),
        (KafkaState::ShuttingDown, 7, true),
        (KafkaState::Unknown, 127, false),
    ];
    for (s, n, ready) in all {
        assert_eq!((s.number(), s.is_ready()), (n, ready), "{}", s.name());
    }
}

#[test]
fn listen_lines() {
    let l = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
    assert_eq!(listen_port(l), Some(0x1F90));
    let e = "   1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0";
    assert_eq!(listen_port(e), None);
    assert_eq!(listen_port("garbage"), None);
}

#[test]
fn inventory_counts_logs_and_segments_over_every_dir_and_opens_decrease_them() {
    let root = tempfile::tempdir().unwrap();
    let mk = |p: &str| {
        let p = root.path().join(p.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    };
    mk("/d1/t-0/0.log");
    mk("/d1/t-0/10.log");
    mk("/d1/t-0/0.index");
    mk("/d1/t-1/0.log");
    mk("/d1/meta.properties");
    mk("/d1/empty-0/x.index");
    mk("/d2/u-0/0.log");
    let dirs = vec![
        "/d1/".to_string(),
        "/d2".to_string(),
        "/missing".to_string(),
    ];
    let confined = ProcessRoot::at(root.path(), None, crate::files::confine::Resolver::Auto);
    let mut inv = Inventory::take(&confined, &dirs);
    assert_eq!(inv.recovery(), rec(3, 4));
    assert!(inv.opened("/d1/t-0/0.log"));
    assert!(!inv.opened("/d1/t-0/0.log"), "counted once");
    assert!(!inv.opened("/d1/t-0/0.index"));
    assert_eq!(inv.recovery(), rec(3, 3));
    assert!(inv.opened("/d1/t-0/10.log"));
    assert_eq!(inv.recovery(), rec(2, 2));
    assert!(inv.opened("/d2/u-0/0.log"));
    assert!(inv.opened("/d1/t-1/0.log"));
    assert_eq!(inv.recovery(), rec(0, 0));
    assert!(inv.under_log_dirs("/d1/new-0/5.log"));
    assert!(!inv.under_log_dirs("/d10/x"));
}

fn rec(logs: i32, segments: i32) -> Recovery {
    Recovery {
        remaining_logs_to_recover: logs,
        remaining_segments_to_recover: segments,
    }
}

/// Log dirs `d1` (logs t-0 with 3 segments, t-1 with 2) and `d2` (u-0 with 3) under `dir`,
/// each segment with an index beside it; the 8 segments in the order the tests open them.
fn log_dirs(dir: &std::path::Path) -> (Vec<String>, Vec<PathBuf>) {
    let mut segments = Vec::new();
    for (part, n) in [("d1/t-0", 3), ("d1/t-1", 2), ("d2/u-0", 3)] {
        let part = dir.join(part);
        std::fs::create_dir_all(&part).unwrap();
        for i in 0..n {
            let segment = part.join(format!("{:020}.log", i * 100));
            std::fs::write(&segment, b"segment").unwrap();
            std::fs::write(segment.with_extension("index"), b"").unwrap();
            segments.push(segment);
        }
    }
    std::fs::write(dir.join("d1/meta.properties"), b"node.id=7\n").unwrap();
    let dirs = vec![
        format!("{}/d1", dir.display()),
        format!("{}/d2/", dir.display()),
    ];
    (dirs, segments)
}

/// This test process as a broker with `log_dirs` and one listener on a port nobody listens
/// on (until the test does): the port, to listen on.
fn own_broker(log_dirs: Vec<String>) -> (Broker, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let pid = std::process::id();
    let mut b = broker("7", pid, 1, &[("PLAINTEXT", port)]);
    b.start_time_ticks = fds::start_ticks(pid).unwrap();
    b.log_dirs = log_dirs;
    (b, port)
}

/// A tracker that polls on every tick, however long a poll took (ticks here come back to
/// back, on a machine maybe loaded).
fn unpaced() -> StateTracker {
    StateTracker {
        pace: false,
        wait_listing: Duration::from_secs(10),
        files: crate::files::Workers::new("test-files", 4),
        sigterm_observed: true,
        ..StateTracker::default()
    }
}

#[test]
fn slow_polls_are_paced() {
    let now = Instant::now();
    assert_eq!(paced(now, Duration::from_millis(1)), None);
    assert_eq!(paced(now, POLL_TICK / POLL_PACE), None);
    // 10,000 descriptors listed in 9 ms: the next poll 180 ms after this one began.
    assert_eq!(
        paced(now, Duration::from_millis(9)),
        Some(now + Duration::from_millis(180))
    );
}

fn recovering(logs: i32, segments: i32) -> StateView {
    StateView::recovering(rec(logs, segments))
}

fn plain(state: KafkaState) -> StateView {
    StateView::of(state)
}

fn watch(t: &StateTracker) -> &'static str {
    match t.by_id["7"].process.as_ref().map(|p| &p.fds) {
        None => "no process",
        Some(FdWatch::Idle) => "idle",
        Some(FdWatch::Polling(_)) => "polling",
        Some(FdWatch::Stopped) => "stopped",
    }
}

fn changes(t: &StateTracker) -> Vec<&'static str> {
    t.changes("7").iter().map(|c| c.to).collect()
}

/// Ticks until the broker is RUNNING (the listening check is reused for 250 ms).
fn tick_until_running(t: &mut StateTracker, b: &Broker) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.tick(b) != plain(KafkaState::Running) {
        assert!(
            Instant::now() < deadline,
            "not RUNNING: {:?}",
            t.current("7")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn recovery_is_seen_from_open_descriptors_with_exact_counts_and_polling_stops_after() {
    let dir = tempfile::tempdir().unwrap();
    let (dirs, segments) = log_dirs(dir.path());
    let (b, port) = own_broker(dirs);
    let mut t = unpaced();
    t.sync(std::slice::from_ref(&b));
    assert_eq!(t.tick(&b), plain(KafkaState::Starting));
    assert_eq!((watch(&t), t.polling()), ("polling", true));

    // Opened one by one, kept open (as Kafka keeps each loaded segment's FileChannel), with
    // the index beside each opened and closed: every tick sees exactly what was opened.
    // Kept ones on numbers of this test's own (see `Placed`).
    let logs_left = [3, 3, 2, 2, 1, 1, 1, 0];
    let mut open = Vec::new();
    for (k, segment) in segments.iter().enumerate() {
        open.push(Placed::new(
            std::fs::File::open(segment).unwrap(),
            940 + k as i32,
        ));
        drop(std::fs::File::open(segment.with_extension("index")).unwrap());
        let left = 8 - (k as i32 + 1);
        assert_eq!(
            t.tick(&b),
            recovering(logs_left[k], left),
            "after {}",
            k + 1
        );
        if k == 2 {
            // Closing a counted segment does not count it back, nor does opening it again.
            drop(open.remove(0));
            assert_eq!(t.tick(&b), recovering(2, 5));
            open.push(Placed::new(std::fs::File::open(&segments[0]).unwrap(), 950));
            assert_eq!(t.tick(&b), recovering(2, 5));
        }
    }
    // Recovered, not listening: RECOVERY 0/0, and the poll stops on the next tick.
    assert!(t.polling());
    assert_eq!(t.tick(&b), recovering(0, 0));
    assert_eq!((watch(&t), t.polling()), ("stopped", false));

    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    tick_until_running(&mut t, &b);
    assert_eq!(changes(&t), ["STARTING", "RECOVERY", "RUNNING"]);
    assert!(!t.polling());
}

#[test]
fn a_process_seen_mid_recovery_counts_the_segments_it_already_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (dirs, segments) = log_dirs(dir.path());
    let held: Vec<_> = (960..)
        .zip(&segments[..4])
        .map(|(fd, s)| Placed::new(std::fs::File::open(s).unwrap(), fd))
        .collect();
    let (b, _port) = own_broker(dirs);
    let mut t = unpaced();
    t.sync(std::slice::from_ref(&b));
    // The inventory is taken first (8 segments), then the first poll finds 4 held.
    assert_eq!(t.tick(&b), recovering(2, 4));
    // The kernel path (the opt-in openat hooks) feeds the same inventory; an open both saw
    // counts once.
    for path in [&segments[3], &segments[4]] {
        let open = StateSignal::Open {
            tgid: b.pid,
            dfd: AT_FDCWD,
            path: path.display().to_string(),
        };
        assert_eq!(t.on_signal(&open).as_deref(), Some("7"));
    }
    assert_eq!(t.evaluate(&b, true), recovering(1, 3));
    let also = Placed::new(std::fs::File::open(&segments[4]).unwrap(), 965);
    assert_eq!(t.tick(&b), recovering(1, 3));
    assert!(t.polling());
    drop((held, also));
}

#[test]
fn a_broker_listening_when_first_seen_is_running_and_its_descriptors_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let (dirs, segments) = log_dirs(dir.path());
    let held: Vec<_> = segments
        .iter()
        .map(|s| std::fs::File::open(s).unwrap())
        .collect();
    let (b, port) = own_broker(dirs);
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut t = unpaced();
    t.sync(std::slice::from_ref(&b));
    assert_eq!(t.tick(&b), plain(KafkaState::Running));
    assert_eq!((watch(&t), t.polling()), ("stopped", false));
    // Its listeners were read when it was first seen: RUNNING straight away.
    assert_eq!(changes(&t), ["RUNNING"]);
    for _ in 0..3 {
        assert_eq!(t.tick(&b), plain(KafkaState::Running));
    }
    // Every segment is held open, and none was counted: no descriptor was read.
    let p = t.by_id["7"].process.as_ref().unwrap();
    assert_eq!(p.inventory.recovery(), rec(3, 8));
    assert!(!p.recovery_seen);
    drop(held);
}

#[test]
fn sigterm_or_exit_stops_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let (dirs, segments) = log_dirs(dir.path());
    let (mut b, _port) = own_broker(dirs);
    let mut t = unpaced();
    t.sync(std::slice::from_ref(&b));
    assert_eq!(t.tick(&b), plain(KafkaState::Starting));
    assert!(t.polling());
    t.on_signal(&StateSignal::Sigterm { tgid: b.pid });
    assert_eq!(t.tick(&b), plain(KafkaState::ShuttingDown));
    assert_eq!((watch(&t), t.polling()), ("stopped", false));
    let late = std::fs::File::open(&segments[0]).unwrap();
    assert_eq!(t.tick(&b), plain(KafkaState::ShuttingDown));
    assert_eq!(
        t.by_id["7"]
            .process
            .as_ref()
            .unwrap()
            .inventory
            .segments_remaining,
        8
    );

    // A new process of the broker starts polling again; its exit ends it.
    b.start_time_ticks += 1;
    t.sync(std::slice::from_ref(&b));
    // Its start time is not this process's: the listing refuses it (the pid names another
    // process), so it is never polled, and what it does cannot be seen.
    assert_eq!(
        t.tick(&b),
        StateView::unknown("log dirs could not be listed")
    );
    assert_eq!((watch(&t), t.polling()), ("idle", false));
    b.state = crate::broker::ProcessStatus::NotRunning;
    t.sync(std::slice::from_ref(&b));
    assert_eq!(t.tick(&b), plain(KafkaState::NotRunning));
    assert_eq!((watch(&t), t.polling()), ("no process", false));
    drop(late);
}

#[test]
fn what_cannot_be_observed_is_unknown_never_running() {
    let dir = tempfile::tempdir().unwrap();
    let (dirs, _segments) = log_dirs(dir.path());
    let (base, _port) = own_broker(dirs);
    let check = |b: &Broker, want: StateView| {
        let mut t = unpaced();
        t.sync(std::slice::from_ref(b));
        assert_eq!(t.tick(b), want, "{b:?}");
        assert!(!t.tick(b).state.is_ready());
    };
    // No listener known (properties unreadable, no configured ports): listening cannot be
    // told, so neither can RUNNING.
    let mut b = base.clone();
    b.listeners.clear();
    check(&b, StateView::unknown("no listener port known"));
    b.listeners = base.listeners.clone();
    b.listeners[0].port = 0;
    check(&b, StateView::unknown("no listener port known"));
    // Not listening, and a recovery could not be seen.
    let mut b = base.clone();
    b.log_dirs.clear();
    check(
        &b,
        StateView::unknown("log dirs unknown (properties not read)"),
    );
    let mut b = base.clone();
    b.evidence.files_stalled = true;
    check(
        &b,
        StateView::unknown("the broker's files could not be read in time"),
    );
    let mut b = base.clone();
    b.pid = u32::MAX - 1;
    check(&b, StateView::unknown("listening sockets unreadable"));
    // All known and not listening: STARTING.
    check(&base, plain(KafkaState::Starting));
}

#[test]
fn unknown_says_why_in_the_brokers_view_only() {
    let v =
        serde_json::to_value(StateView::unknown("log dirs unknown (properties not read)")).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"name": "UNKNOWN", "number": 127, "unknown": "log dirs unknown (properties not read)"})
    );
}

/// Not a check: what polling costs for a broker holding 10,000 segments (100 logs of 100),
/// through the tracker ticking every [`POLL_TICK`] as the agent's thread does (budgeted,
/// paced polls), and through [`FdPoll`] alone (unbudgeted). Run in release for the agent's
/// figures.
#[test]
#[ignore = "a measurement: cargo test --release fd_poll_cost -- --ignored --nocapture"]
fn fd_poll_cost_with_10k_open_segments() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let segments = hundred_logs_of_hundred(&data);
    let (b, _port) = own_broker(vec![data.display().to_string()]);
    let mut t = StateTracker {
        sigterm_observed: true,
        ..StateTracker::default()
    };
    let at = Instant::now();
    t.sync(std::slice::from_ref(&b));
    let inventory = at.elapsed();
    t.tick(&b);
    let held: Vec<_> = (970..)
        .zip(&segments)
        .map(|(fd, s)| Placed::new(std::fs::File::open(s).unwrap(), fd))
        .collect();
    let (all_seen, first) = timed_ticks(&mut t, &b, &|v| v == recovering(0, 0), 100);
    assert_eq!(t.tick(&b), recovering(0, 0));
    // Steady state: the same process, nothing new to read (a second tracker).
    let mut steady = StateTracker {
        sigterm_observed: true,
        ..StateTracker::default()
    };
    let (mut b2, _port) = own_broker(vec![format!("{}/none", dir.path().display())]);
    b2.id = "7".into();
    steady.sync(std::slice::from_ref(&b2));
    timed_ticks(&mut steady, &b, &|_| false, 30);
    let (over, ticks) = timed_ticks(&mut steady, &b, &|_| false, 20);
    let polled: Vec<_> = ticks.iter().filter(|(_, p)| *p).map(|(d, _)| *d).collect();
    let first_polled = first.iter().filter(|(_, p)| *p).count();
    let busy: Duration = ticks.iter().map(|(d, _)| *d).sum();

    let ((full_time, full), (again_time, again)) = unbudgeted_polls();
    eprintln!(
        "10,000 open segments, {} links a poll at most, pace {POLL_PACE}:\n\
         inventory {inventory:?}\n\
         opened -> all seen in {all_seen:?}, {first_polled} polls; ticks: {first:?}\n\
         steady: {} polls in {} ticks over {over:?}, {polled:?} each, {:.1}% of a core\n\
         FdPoll alone: first unbudgeted poll {full_time:?} ({full:?}), then {again_time:?} \
         ({again:?})",
        MAX_LINKS_PER_POLL,
        polled.len(),
        ticks.len(),
        busy.as_secs_f64() * 100.0 / over.as_secs_f64(),
    );
    drop(held);
}

/// 100 partition dirs `topic-NNN` of 100 empty segments each under `data`: the segments.
fn hundred_logs_of_hundred(data: &std::path::Path) -> Vec<PathBuf> {
    let mut segments = Vec::new();
    for p in 0..100 {
        let part = data.join(format!("topic-{p:03}"));
        std::fs::create_dir_all(&part).unwrap();
        for i in 0..100 {
            let s = part.join(format!("{:020}.log", i * 1000));
            std::fs::write(&s, b"").unwrap();
            segments.push(s);
        }
    }
    segments
}

/// Ticks `t` over broker `b` as the agent's thread runs them, at most `ticks` times or until
/// a view satisfies `until`: the time it all took, and each tick's time with whether it polled.
fn timed_ticks(
    t: &mut StateTracker,
    b: &Broker,
    until: &dyn Fn(StateView) -> bool,
    ticks: usize,
) -> (Duration, Vec<(Duration, bool)>) {
    let mut times = Vec::new();
    let begun = Instant::now();
    for _ in 0..ticks {
        let polls = |t: &StateTracker| match &t.by_id["7"].process.as_ref().unwrap().fds {
            FdWatch::Polling(w) => w.polls,
            _ => 0,
        };
        let before = polls(t);
        let at = Instant::now();
        let view = t.tick(b);
        times.push((at.elapsed(), polls(t) > before));
        if until(view) {
            break;
        }
        std::thread::sleep(POLL_TICK.saturating_sub(at.elapsed()));
    }
    (begun.elapsed(), times)
}

/// [`FdPoll`] alone over this process, unbudgeted: the first poll's time and figures, then a
/// poll's on average over 20 more with the last one's figures.
fn unbudgeted_polls() -> ((Duration, fds::PollStats), (Duration, fds::PollStats)) {
    let pid = std::process::id();
    let mut poll = FdPoll::open(pid, fds::start_ticks(pid).unwrap()).unwrap();
    let at = Instant::now();
    let full = poll.poll(usize::MAX, |_| true).unwrap();
    let full_time = at.elapsed();
    let rounds = 20;
    let at = Instant::now();
    let mut again = fds::PollStats::default();
    for _ in 0..rounds {
        again = poll.poll(usize::MAX, |_| true).unwrap();
    }
    let again_time = at.elapsed() / rounds;
    ((full_time, full), (again_time, again))
}

#[test]
fn a_stopped_broker_is_not_running_and_changes_are_bounded() {
    let mut t = StateTracker {
        sigterm_observed: true,
        ..StateTracker::default()
    };
    let mut b = broker("1", u32::MAX - 1, 1, &[]);
    for i in 0..(MAX_CHANGES * 2) {
        b.state = if i % 2 == 0 {
            crate::broker::ProcessStatus::NotRunning
        } else {
            crate::broker::ProcessStatus::Running
        };
        b.start_time_ticks = i as u64;
        t.sync(std::slice::from_ref(&b));
    }
    assert_eq!(t.changes("1").len(), MAX_CHANGES);
    b.state = crate::broker::ProcessStatus::NotRunning;
    t.sync(std::slice::from_ref(&b));
    assert_eq!(t.current("1"), Some(KafkaState::NotRunning));
    t.sync(&[]);
    assert_eq!(t.current("1"), None);
}
