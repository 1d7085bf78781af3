//! Relay behaviour against a real store, with an in-process sink whose failures are
//! scripted (the relay logic is under test here; real sinks have their own tests).

use super::*;
use crate::store::StoreOptions;
use std::collections::HashSet;
use std::time::Instant;

#[derive(Default)]
struct Scripted {
    delivered: Mutex<Vec<Event>>,
    /// Fail this many calls with `Unavailable` first.
    outage_calls: AtomicU64,
    /// Refuse these seqs (attributed to the event).
    poison: HashSet<u64>,
    /// Refuse batches containing these seqs without saying which event failed.
    opaque: HashSet<u64>,
    calls: AtomicU64,
}

impl Sink for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn deliver<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self
                .outage_calls
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SinkError::Unavailable("connection refused".into()));
            }
            if events.iter().any(|e| self.opaque.contains(&e.seq)) {
                return Err(SinkError::Failed("something in this batch".into()));
            }
            let mut out = self.delivered.lock().expect("lock");
            for (i, e) in events.iter().enumerate() {
                if self.poison.contains(&e.seq) {
                    return Err(SinkError::Rejected {
                        index: i,
                        message: format!("cannot take seq {}", e.seq),
                    });
                }
                out.push(e.clone());
            }
            Ok(())
        })
    }
}

fn cfg() -> OutboxConfig {
    OutboxConfig {
        batch_size: 4,
        retain_secs: 3600,
        prune_interval_secs: 3600,
        max_attempts: 3,
        backoff_initial_ms: 1,
        backoff_max_ms: 5,
        poll_interval_ms: 20,
    }
}

async fn setup(n: usize) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreOptions {
        path: dir.path().join("store"),
        cache_bytes: 8 * 1024 * 1024,
        flush_window: Duration::ZERO,
        max_batch: 64,
        node_id: Some("test-node".into()),
        min_free_bytes: 0,
    })
    .expect("open");
    for i in 0..n {
        store
            .submit(
                vec![crate::model::NewEvaluation::for_tests(&format!(
                    "print({i})"
                ))],
                None,
                1000,
            )
            .await
            .expect("submit");
    }
    (dir, store)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn run(store: &Arc<Store>, sink: Arc<Scripted>) -> (Arc<Outbox>, Arc<Runner>) {
    let outbox = Outbox::new(store.clone(), cfg(), (0, 0), vec![sink as Arc<dyn Sink>]);
    let runner = Runner::new(CancellationToken::new());
    outbox.start(&runner);
    (outbox, runner)
}

fn seqs(sink: &Scripted) -> Vec<u64> {
    sink.delivered
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test]
async fn delivers_everything_in_order_and_saves_the_cursor() {
    let (_d, store) = setup(10).await;
    let sink = Arc::new(Scripted::default());
    let (outbox, runner) = run(&store, sink.clone());
    until("delivery", || seqs(&sink).len() == 10).await;
    assert_eq!(seqs(&sink), (1..=10).collect::<Vec<_>>());
    until("cursor", || {
        store.cursor("scripted").ok().flatten() == Some(10)
    })
    .await;
    // New events wake the relay.
    store
        .submit(
            vec![crate::model::NewEvaluation::for_tests("x")],
            None,
            1000,
        )
        .await
        .expect("submit");
    until("wake-up", || seqs(&sink).len() == 11).await;
    // The report follows the cursor save, a moment after the sink saw the batch.
    until("report", || {
        let r = &outbox.reports()[0];
        (r.backlog, r.delivered, r.dead_letters) == (0, 11, 0)
    })
    .await;
    assert!(runner.stop(Duration::from_secs(30)).await);
}

#[tokio::test]
async fn an_outage_is_retried_and_never_dead_lettered() {
    let (_d, store) = setup(6).await;
    let sink = Arc::new(Scripted {
        outage_calls: AtomicU64::new(10),
        ..Scripted::default()
    });
    let (outbox, runner) = run(&store, sink.clone());
    until("recovery", || seqs(&sink).len() == 6).await;
    assert_eq!(seqs(&sink), (1..=6).collect::<Vec<_>>());
    assert_eq!(store.dead_letter_count("scripted"), 0);
    until("report", || {
        let r = &outbox.reports()[0];
        r.retries >= 10 && r.ok
    })
    .await;
    runner.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_poison_event_is_parked_after_max_attempts_and_the_rest_flows() {
    let (_d, store) = setup(9).await;
    let sink = Arc::new(Scripted {
        poison: [5].into_iter().collect(),
        ..Scripted::default()
    });
    let (outbox, runner) = run(&store, sink.clone());
    until("the rest", || seqs(&sink).len() == 8).await;
    assert_eq!(seqs(&sink), vec![1, 2, 3, 4, 6, 7, 8, 9]);
    let dl = store
        .dead_letters(Some("scripted"), 10)
        .expect("dead letters");
    assert_eq!(dl.len(), 1);
    assert_eq!((dl[0].seq, dl[0].attempts), (5, 3));
    assert!(dl[0].error.contains("seq 5"));
    until("cursor", || {
        store.cursor("scripted").ok().flatten() == Some(9)
    })
    .await;
    until("report", || outbox.reports()[0].dead_letters == 1).await;
    runner.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn an_unattributed_batch_failure_is_narrowed_to_one_event() {
    let (_d, store) = setup(8).await;
    let sink = Arc::new(Scripted {
        opaque: [3].into_iter().collect(),
        ..Scripted::default()
    });
    let (_outbox, runner) = run(&store, sink.clone());
    until("the rest", || seqs(&sink).len() == 7).await;
    assert_eq!(seqs(&sink), vec![1, 2, 4, 5, 6, 7, 8]);
    let dl = store
        .dead_letters(Some("scripted"), 10)
        .expect("dead letters");
    assert_eq!(dl.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![3]);
    runner.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn replay_redelivers_the_same_event_ids() {
    let (_d, store) = setup(5).await;
    let sink = Arc::new(Scripted::default());
    let (outbox, runner) = run(&store, sink.clone());
    until("delivery", || seqs(&sink).len() == 5).await;
    let first: Vec<String> = sink
        .delivered
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(outbox.replay("scripted", 3).await.expect("replay"), 2);
    until("redelivery", || seqs(&sink).len() == 8).await;
    let again: Vec<String> = sink.delivered.lock().expect("lock")[5..]
        .iter()
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(again, first[2..].to_vec());
    assert!(matches!(
        outbox.replay("nosuch", 1).await,
        Err(ReplayError::UnknownSink(_))
    ));
    assert!(matches!(
        outbox.replay("scripted", 99).await,
        Err(ReplayError::Store(StoreError::ReplayOutOfWindow { .. }))
    ));
    runner.stop(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn pruning_waits_for_every_sink_and_the_window() {
    let (_d, store) = setup(6).await;
    let mut c = cfg();
    c.retain_secs = 0;
    let sink = Arc::new(Scripted::default());
    let outbox = Outbox::new(
        store.clone(),
        c,
        (0, 0),
        vec![sink.clone() as Arc<dyn Sink>],
    );
    // Nothing delivered yet: nothing may be pruned.
    assert_eq!(outbox.prune_once().await.expect("prune"), 0);
    let runner = Runner::new(CancellationToken::new());
    outbox.start(&runner);
    until("cursor", || {
        store.cursor("scripted").ok().flatten() == Some(6)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(outbox.prune_once().await.expect("prune"), 6);
    assert_eq!(store.oldest_seq().expect("oldest"), 7);
    runner.stop(Duration::from_secs(30)).await;
}
