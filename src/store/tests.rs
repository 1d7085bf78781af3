//! Store invariants, against a real sled database in a temporary directory.

use super::*;
use crate::events::EventType;
use crate::model::{FailureReason, NewEvaluation};
use std::time::Duration;

fn open(dir: &std::path::Path) -> Arc<Store> {
    Store::open(StoreOptions {
        path: dir.join("store"),
        cache_bytes: 8 * 1024 * 1024,
        flush_window: Duration::ZERO,
        max_batch: 64,
        node_id: None,
        min_free_bytes: 0,
    })
    .expect("open store")
}

/// Open again after `close()` in the same process: sled's background threads may hold the
/// old database (and its file lock) a moment longer, so wait for the lock, not a time.
async fn reopen(dir: &std::path::Path) -> Arc<Store> {
    let started = std::time::Instant::now();
    loop {
        match Store::open(StoreOptions {
            path: dir.join("store"),
            cache_bytes: 8 * 1024 * 1024,
            flush_window: Duration::ZERO,
            max_batch: 64,
            node_id: None,
            min_free_bytes: 0,
        }) {
            Ok(s) => return s,
            Err(e) if e.to_string().contains("in use") => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "lock never released"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

fn new_eval(code: &str) -> NewEvaluation {
    NewEvaluation {
        timeout: 5.0,
        ..NewEvaluation::for_tests(code)
    }
}

async fn submit_one(s: &Store, code: &str) -> String {
    s.submit(vec![new_eval(code)], None, 1000)
        .await
        .expect("submit")
        .remove(0)
        .eval_id
}

fn done(status: Status) -> Finish {
    Finish {
        status,
        exit_code: Some(0),
        output: "out".into(),
        stderr: String::new(),
        output_truncated: false,
        failure_reason: None,
        error: None,
        runtime_ms: Some(3),
        cpu_ms: None,
        memory_peak_kb: None,
        compile: None,
        tests: Vec::new(),
        verdict: None,
        score: None,
    }
}

#[tokio::test]
async fn a_change_and_its_event_are_written_together_with_gapless_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let a = submit_one(&s, "print(1)").await;
    let b = submit_one(&s, "print(2)").await;
    s.start(&a).await.expect("start");
    s.finish(&a, done(Status::Completed)).await.expect("finish");
    assert_eq!(s.head(), 4);
    let events = s.events(0, s.head(), 100).expect("events");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventType::Queued,
            EventType::Queued,
            EventType::Started,
            EventType::Completed
        ]
    );
    // Each event carries the record as it was after the change.
    let rec_a = s.get(&a).await.expect("get").expect("exists");
    assert_eq!(events[3].data, rec_a);
    assert_eq!(rec_a.version, 3);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.eval_id == a)
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        s.get(&b).await.expect("get").expect("exists").created_seq,
        2
    );
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 4, "event ids are unique");
}

#[tokio::test]
async fn state_machine_refuses_illegal_transitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let a = submit_one(&s, "x").await;
    assert!(matches!(
        s.finish(&a, done(Status::Completed)).await,
        Err(StoreError::WrongState("queued", "running"))
    ));
    s.start(&a).await.expect("start");
    assert!(matches!(s.start(&a).await, Err(StoreError::WrongState(..))));
    s.finish(&a, done(Status::Failed)).await.expect("finish");
    assert!(matches!(
        s.finish(&a, done(Status::Completed)).await,
        Err(StoreError::AlreadyTerminal("failed"))
    ));
    assert!(matches!(
        s.cancel(&a).await,
        Err(StoreError::AlreadyTerminal("failed"))
    ));
    assert!(matches!(s.start("nope").await, Err(StoreError::NotFound)));
    let head = s.head();
    // Refused operations leave no trace in the log.
    assert_eq!(
        s.events(0, u64::MAX, 100).expect("events").len() as u64,
        head
    );
    assert_eq!(
        s.get(&a).await.expect("get").expect("exists").status,
        Status::Failed
    );
}

#[tokio::test]
async fn cancel_queued_and_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let q = submit_one(&s, "q").await;
    let r = submit_one(&s, "r").await;
    s.start(&r).await.expect("start");
    assert_eq!((s.queue_depth(), s.running_count()), (1, 1));
    let (rec, prev) = s.cancel(&q).await.expect("cancel");
    assert_eq!((rec.status, prev), (Status::Cancelled, Status::Queued));
    let (rec, prev) = s.cancel(&r).await.expect("cancel");
    assert_eq!((rec.status, prev), (Status::Cancelled, Status::Running));
    assert_eq!((s.queue_depth(), s.running_count()), (0, 0));
    // The worker's late finish is refused: terminal states never change.
    assert!(matches!(
        s.finish(&r, done(Status::Completed)).await,
        Err(StoreError::AlreadyTerminal("cancelled"))
    ));
    assert!(s
        .next_queued(&HashSet::new(), 10)
        .expect("queue")
        .is_empty());
}

#[tokio::test]
async fn queue_is_fifo_bounded_and_batches_are_all_or_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let ids: Vec<String> = s
        .submit(vec![new_eval("1"), new_eval("2"), new_eval("3")], None, 4)
        .await
        .expect("submit")
        .into_iter()
        .map(|x| x.eval_id)
        .collect();
    assert_eq!(s.next_queued(&HashSet::new(), 10).expect("queue"), ids);
    let claimed: HashSet<String> = [ids[0].clone()].into_iter().collect();
    assert_eq!(
        s.next_queued(&claimed, 1).expect("queue"),
        vec![ids[1].clone()]
    );
    let err = s
        .submit(vec![new_eval("4"), new_eval("5")], None, 4)
        .await
        .expect_err("full");
    assert!(matches!(err, StoreError::QueueFull { depth: 3, max: 4 }));
    assert_eq!(s.head(), 3, "a refused batch writes nothing");
    submit_one(&s, "4").await;
    assert_eq!(s.queue_depth(), 4);
}

fn idem(key: &str, fingerprint: &str) -> IdemKey {
    IdemKey {
        key: key.into(),
        fingerprint: fingerprint.into(),
    }
}

#[tokio::test]
async fn idempotency_key_returns_the_same_evaluation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let a = s
        .submit(vec![new_eval("x")], Some(idem("k1", "f1")), 10)
        .await
        .expect("submit");
    let b = s
        .submit(vec![new_eval("x")], Some(idem("k1", "f1")), 10)
        .await
        .expect("submit");
    assert_eq!(a[0].eval_id, b[0].eval_id);
    assert!(!a[0].existing && b[0].existing);
    assert_eq!(s.head(), 1);
    // Concurrent retries with one key, likely in one batch, still create one evaluation.
    let mut handles = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            s.submit(vec![new_eval("y")], Some(idem("k2", "f2")), 100)
                .await
                .expect("submit")[0]
                .eval_id
                .clone()
        }));
    }
    let mut ids = HashSet::new();
    for h in handles {
        ids.insert(h.await.expect("join"));
    }
    assert_eq!(ids.len(), 1);
    // The same key with another request is a conflict, and changes nothing.
    let head = s.head();
    let e = s
        .submit(vec![new_eval("z")], Some(idem("k1", "other")), 10)
        .await
        .expect_err("conflict");
    assert!(matches!(e, StoreError::IdempotencyConflict(ref id) if *id == a[0].eval_id));
    assert_eq!(s.head(), head);
    assert_eq!(s.head(), 2);
}

#[tokio::test]
async fn reopening_recovers_head_queue_node_and_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, a, b) = {
        let s = open(dir.path());
        let a = submit_one(&s, "a").await;
        let b = submit_one(&s, "b").await;
        s.start(&a).await.expect("start");
        let node = s.node_id().to_string();
        s.close().await;
        (node, a, b)
    };
    let s = reopen(dir.path()).await;
    assert_eq!(s.node_id(), node);
    assert_eq!(s.head(), 3);
    assert_eq!((s.queue_depth(), s.running_count()), (1, 1));
    assert_eq!(s.interrupt_running().await.expect("interrupt"), 1);
    let rec = s.get(&a).await.expect("get").expect("exists");
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.failure_reason, Some(FailureReason::Interrupted));
    assert_eq!(s.next_queued(&HashSet::new(), 5).expect("queue"), vec![b]);
    let next = submit_one(&s, "c").await;
    assert_eq!(
        s.get(&next)
            .await
            .expect("get")
            .expect("exists")
            .created_seq,
        5
    );
}

#[tokio::test]
async fn list_merges_statuses_newest_first_with_cursors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(submit_one(&s, &i.to_string()).await);
    }
    s.start(&ids[1]).await.expect("start");
    s.start(&ids[4]).await.expect("start");
    s.finish(&ids[4], done(Status::Completed))
        .await
        .expect("finish");
    s.cancel(&ids[5]).await.expect("cancel");
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = s.list(None, 3, after.as_deref(), 0).await.expect("list");
        all.extend(page.into_iter().map(|r| r.eval_id));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut want = ids.clone();
    want.reverse();
    assert_eq!(all, want);
    let (q, _) = s
        .list(Some(Status::Queued), 10, None, 0)
        .await
        .expect("list");
    let q: Vec<String> = q.into_iter().map(|r| r.eval_id).collect();
    assert_eq!(
        q,
        vec![
            ids[6].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[0].clone()
        ]
    );

    // Offsets step over entries; counts follow every transition.
    let (p, next) = s.list(None, 2, None, 5).await.expect("offset");
    let p: Vec<String> = p.into_iter().map(|r| r.eval_id).collect();
    assert_eq!((p, next), (vec![ids[1].clone(), ids[0].clone()], None));
    let (p, _) = s
        .list(Some(Status::Queued), 10, None, 3)
        .await
        .expect("offset");
    assert_eq!(p.len(), 1);
    let (p, _) = s.list(None, 10, None, 100).await.expect("past the end");
    assert!(p.is_empty());
    let counts: Vec<u64> = Status::ALL.iter().map(|st| s.count(Some(*st))).collect();
    assert_eq!(
        counts,
        vec![4, 1, 1, 0, 1],
        "queued running completed failed cancelled"
    );
    assert_eq!(s.count(None), 7);
    s.close().await;
    drop(s);
    let s = reopen(dir.path()).await;
    let again: Vec<u64> = Status::ALL.iter().map(|st| s.count(Some(*st))).collect();
    assert_eq!(again, counts, "recounted at open");
}

#[tokio::test]
async fn cursors_dead_letters_pruning_and_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    for i in 0..5 {
        submit_one(&s, &i.to_string()).await;
    }
    assert_eq!(s.cursor("a").expect("cursor"), None);
    s.set_cursor("a", 3).await.expect("cursor");
    s.set_cursor("b", 1).await.expect("cursor");
    let future = "9999-01-01T00:00:00.000Z".to_string();
    // Only what every sink has delivered goes.
    let p = s
        .prune(vec!["a".into(), "b".into()], future.clone(), 100)
        .await
        .expect("prune");
    assert_eq!(
        p,
        Pruned {
            removed: 1,
            oldest: 2
        }
    );
    // Nothing newer than the cut-off goes, whatever the cursors say.
    let p = s
        .prune(vec!["a".into()], "2000-01-01T00:00:00.000Z".into(), 100)
        .await
        .expect("prune");
    assert_eq!(p.removed, 0);
    // A poison event: parked, and the cursor passes it.
    let ev = s.event(4).expect("event").expect("exists");
    s.dead_letter("b", ev.clone(), "bad".into(), 5)
        .await
        .expect("dead");
    assert_eq!(s.cursor("b").expect("cursor"), Some(4));
    let dl = s.dead_letters(Some("b"), 10).expect("dead letters");
    assert_eq!(dl.len(), 1);
    assert_eq!(
        (dl[0].seq, dl[0].attempts, dl[0].event.event_id.clone()),
        (4, 5, ev.event_id)
    );
    assert_eq!(s.dead_letter_count("a"), 0);
    // Replay stays inside the retained window.
    assert!(matches!(
        s.replay("a", 1).await,
        Err(StoreError::ReplayOutOfWindow { oldest: 2, .. })
    ));
    assert!(matches!(
        s.replay("a", 7).await,
        Err(StoreError::ReplayOutOfWindow { .. })
    ));
    assert_eq!(s.replay("a", 2).await.expect("replay"), 1);
    assert_eq!(s.cursor("a").expect("cursor"), Some(1));
    let p = s
        .prune(vec!["a".into(), "b".into()], future, 100)
        .await
        .expect("prune");
    assert_eq!(
        p.removed, 0,
        "replay moved the cursor back: nothing more may go"
    );
    // Seqs keep rising after pruning everything, even across a reopen.
    s.set_cursor("a", 5).await.expect("cursor");
    s.set_cursor("b", 5).await.expect("cursor");
    let p = s
        .prune(
            vec!["a".into(), "b".into()],
            "9999-01-01T00:00:00.000Z".into(),
            100,
        )
        .await
        .expect("prune");
    assert_eq!(
        p,
        Pruned {
            removed: 4,
            oldest: 6
        }
    );
    s.close().await;
    drop(s);
    let s = reopen(dir.path()).await;
    assert_eq!(s.head(), 5);
    assert_eq!(s.oldest_seq().expect("oldest"), 6);
    let id = submit_one(&s, "again").await;
    assert_eq!(
        s.get(&id).await.expect("get").expect("exists").created_seq,
        6
    );
}

#[tokio::test]
async fn many_concurrent_writers_share_flushes_and_every_answer_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let mut handles = Vec::new();
    for t in 0..32 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                ids.push(submit_one(&s, &format!("{t}-{i}")).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.extend(h.await.expect("join"));
    }
    assert_eq!(ids.len(), 640);
    assert_eq!(s.head(), 640);
    let stats = &s.shared().stats;
    assert_eq!(stats.events.load(Ordering::Relaxed), 640);
    s.close().await;
    drop(s);
    let s = reopen(dir.path()).await;
    for id in &ids {
        assert!(s.get(id).await.expect("get").is_some(), "{id} lost");
    }
    let seqs: Vec<u64> = s
        .events(0, 640, 1000)
        .expect("events")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=640).collect::<Vec<_>>());
}
