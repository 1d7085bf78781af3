//! Wiring: open the store, build the executor, sinks, outbox and queue, serve HTTP, and
//! shut everything down in order. `run` takes an already bound listener and a shutdown
//! token, so tests and embedders can run the real server in-process.

use crate::config::{Config, ExecutorKind};
use crate::executor::cgroup::Cgroups;
use crate::executor::docker::DockerExecutor;
use crate::executor::sandbox::{default_work_dir, Containment, SandboxExecutor};
use crate::executor::{Executor, ExecutorReport};
use crate::gateway::{self, HttpStats, State};
use crate::judge::cache::CompileCache;
use crate::judge::Judge;
use crate::ops::report::{NotConfigured, Report, Reporters};
use crate::ops::worker::{self, Backoff, Runner, Worker, WorkersReport};
use crate::outbox::{Outbox, Sink};
use crate::queue::Queue;
use crate::redis::Redis;
use crate::redis_rr::Responder;
use crate::service::Service;
use crate::sinks::file::FileSink;
use crate::sinks::postgres::{Postgres, PostgresSink};
use crate::sinks::redis::RedisSink;
use crate::store::{Store, StoreOptions};
use crate::BoxFuture;
use anyhow::{anyhow, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// File in the data dir holding the bound address while the server runs.
pub const ADDR_FILE: &str = "listen.addr";

/// Bind `cfg.listen` and run until `shutdown` fires.
pub async fn serve(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    run(cfg, listener, shutdown).await
}

/// Run the appliance on `listener` until `shutdown` fires, then stop in order: stop
/// accepting, let running evaluations finish (or record them interrupted), stop the
/// relays, flush and close the store.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store = Store::open(StoreOptions {
        path: cfg.data_dir.join("store"),
        cache_bytes: cfg.store.cache_mb * 1024 * 1024,
        flush_window: Duration::from_micros(cfg.store.flush_window_us),
        max_batch: cfg.store.max_batch,
        node_id: cfg.node_id.clone(),
        min_free_bytes: cfg.store.min_free_mb * 1024 * 1024,
    })
    .map_err(|e| anyhow!("{e}"))?;
    let mut runners = Vec::new();
    let (executor, executor_runner) = build_executor(&cfg, &store, &shutdown).await?;
    runners.extend(executor_runner);

    let interrupted = store
        .interrupt_running()
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if interrupted > 0 {
        tracing::warn!(
            count = interrupted,
            "evaluations that were running when the appliance stopped are now failed (interrupted)"
        );
    }

    let sinks = build_sinks(&cfg)?;
    let outbox = Outbox::new(
        store.clone(),
        cfg.outbox.clone(),
        (cfg.store.retain_evaluations_secs, cfg.store.max_evaluations),
        sinks.sinks,
    );
    let cache = CompileCache::open(
        &compile_cache_dir(&cfg, store.node_id()),
        cfg.judge.compile_cache_mb * 1024 * 1024,
        is_root(),
    )
    .map_err(|e| anyhow!(e))?;
    let judge = Arc::new(Judge::new(executor.clone(), cache, cfg.clone()));
    let queue = Queue::new(store.clone(), executor.clone(), judge.clone(), cfg.clone());
    // Relays outlive the queue at shutdown: the last results must still be delivered.
    let relays = Runner::new(CancellationToken::new());
    outbox.start(&relays);
    queue.start();
    let background = Runner::new(shutdown.clone());
    runners.extend([queue.runner(), relays.clone(), background.clone()]);
    // Outlives the background group: space coming back must still reopen the store while
    // the last results are recorded at shutdown.
    relays.spawn(crate::store::DiskWatch::new(
        store.clone(),
        Duration::from_secs(1),
    ));

    let addr = listener.local_addr()?;
    let addr_file = cfg.data_dir.join(ADDR_FILE);
    write_atomic(&addr_file, &format!("{addr}\n"))?;
    tracing::info!(
        listen = %addr,
        node = store.node_id(),
        executor = executor.name(),
        workers = cfg.workers,
        data_dir = %cfg.data_dir.display(),
        queued = store.queue_depth(),
        head_seq = store.head(),
        sinks = %outbox.sink_names().join(","),
        "crucible is ready"
    );

    let live = Arc::new(crate::ops::reload::LiveConfig::new(cfg.clone()));
    if let Err(e) = crate::ops::reload::on_sighup(live.clone(), cfg.source.clone()) {
        tracing::warn!(error = %e, "cannot listen for SIGHUP: reload is off");
    }
    let service = Arc::new(Service {
        cfg: cfg.clone(),
        live,
        store: store.clone(),
        executor: executor.clone(),
        queue: queue.clone(),
        outbox: outbox.clone(),
        shutdown: shutdown.clone(),
        accepted: std::sync::atomic::AtomicU64::new(0),
    });
    if let Some(r) = &sinks.redis {
        background.spawn(crate::redis::RedisProbe(r.clone()));
    }
    if let Some(pg) = &sinks.postgres {
        background.spawn(crate::sinks::postgres::PostgresProbe(pg.clone()));
    }
    if let Some(r) = &sinks.redis {
        if !cfg.redis.request_channel.is_empty() {
            match Responder::new(r.clone(), service.clone()) {
                Ok(responder) => background.spawn(responder),
                Err(e) => tracing::error!(error = %e, "redis request/reply is off"),
            }
        }
    }
    // Registered in the order of their /health entries.
    let mut reporters = Reporters::default();
    reporters.add(store.clone());
    reporters.add(queue.clone());
    reporters.add(Arc::new(ExecutorReport(executor.clone())));
    reporters.add(judge.clone());
    reporters.add(outbox.clone());
    for r in sinks.reporters {
        reporters.add(r);
    }
    reporters.add(Arc::new(WorkersReport(runners)));
    let state = Arc::new(State {
        service: service.clone(),
        reporters,
        cfg: cfg.clone(),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        stats: HttpStats::default(),
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            (cfg.http.max_inflight_body_mb as usize).saturating_mul(1024),
        )),
        conns: Default::default(),
        openapi: Default::default(),
    });
    crate::ops::systemd::notify(&format!("READY=1\nSTATUS=serving on {addr}"));
    if let Some(every) = crate::ops::systemd::watchdog_interval() {
        background.spawn(Watchdog {
            store: store.clone(),
            tick: every / 3,
        });
    }
    gateway::serve(state, listener, Duration::from_secs(5)).await;
    crate::ops::systemd::notify("STOPPING=1\nSTATUS=stopping");

    background.stop(Duration::from_secs(5)).await;
    tracing::info!("HTTP stopped; finishing running evaluations");
    queue
        .shutdown(Duration::from_secs(cfg.shutdown_grace_secs))
        .await;
    executor.shutdown().await;
    if !relays.stop(Duration::from_secs(5)).await {
        tracing::warn!("relays did not stop in time");
    }
    if let Some(r) = &sinks.redis {
        r.quit().await;
    }
    store.close().await;
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("crucible stopped cleanly");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where compiled programs are kept: in the data dir; as root, beside the sandbox work
/// dir, because the sandbox helper (running as `sandbox.uid`) must be able to reach it
/// and the data dir stays root's alone.
fn compile_cache_dir(cfg: &Config, node: &str) -> PathBuf {
    if is_root() {
        std::env::temp_dir().join(format!("crucible-cache-{node}"))
    } else {
        cfg.data_dir.join("compile-cache")
    }
}

/// The configured executor, checked on this host (and the Docker warm pool's runner).
async fn build_executor(
    cfg: &Config,
    store: &Store,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Executor>, Option<Arc<Runner>>)> {
    match cfg.executor {
        ExecutorKind::Sandbox => {
            let work_dir = default_work_dir(cfg, store.node_id());
            let containment = containment(cfg, store.node_id())?;
            let sandbox =
                SandboxExecutor::new(cfg, work_dir, containment).map_err(|e| anyhow!(e))?;
            for (lang, why) in sandbox.unavailable() {
                tracing::warn!(language = %lang, "{why}");
            }
            sandbox.self_test().await.map_err(|e| {
                anyhow!(HostUnfit(format!(
                    "the sandbox executor cannot run on this host: {e}"
                )))
            })?;
            let sandbox = Arc::new(sandbox);
            // Each toolchain's version, for /api/languages, and the sandbox pool, in the
            // background.
            sandbox.start_background();
            Ok((sandbox, None))
        }
        ExecutorKind::Docker => {
            let docker = DockerExecutor::new(cfg, store.node_id(), shutdown.clone())
                .map_err(|e| anyhow!(e))?;
            // Removes this node's containers left by a crash; their evaluations are
            // resolved next (interrupted). An engine that is down now is fine: work
            // waits in the queue until it answers.
            docker.start().await;
            let runner = docker.runner();
            Ok((docker, Some(runner)))
        }
    }
}

/// This host (or the unit around the process) cannot run evaluations as configured: a
/// restart cannot fix it, so `serve` exits with EX_CONFIG (78), which the unit's
/// RestartPreventExitStatus= turns into one clear failure instead of a restart loop.
#[derive(Debug)]
pub struct HostUnfit(pub String);

impl std::fmt::Display for HostUnfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostUnfit {}

/// One cgroup per run if this host lets the appliance have one; else, loudly, rlimits and
/// the memory watchdog (or a refusal to start with `[sandbox] require_cgroup`).
fn containment(cfg: &Config, node: &str) -> anyhow::Result<Containment> {
    match Cgroups::detect(node) {
        Ok(c) => {
            tracing::info!(
                limits = c.label(),
                location = %c.location(),
                "each run gets its own cgroup: memory, processes and CPU are limited for its whole process tree"
            );
            Ok(Containment::Cgroup(Arc::new(c)))
        }
        Err(why) => {
            const FIX: &str = "run it under systemd with the shipped unit (Delegate=yes), in a \
                delegated scope (`systemd-run --user --scope -p Delegate=yes crucible serve ...`), \
                or as root";
            if cfg.sandbox.require_cgroup {
                return Err(anyhow!(HostUnfit(format!(
                    "no cgroup can be had for the runs ({why}), and [sandbox] require_cgroup = \
                     true refuses to run without one: {FIX}"
                ))));
            }
            tracing::warn!(
                reason = %why,
                limits = "rlimit",
                "NO CGROUP FOR THE RUNS: memory, processes and CPU are limited per process \
                 (rlimits) and by a memory watchdog, not for the whole process tree. To fix: \
                 {FIX}; set [sandbox] require_cgroup = true to refuse to start instead"
            );
            Ok(Containment::Rlimit(why))
        }
    }
}

/// The configured sinks, the reporters of their connections, and the Redis connection
/// (shared with the request/reply transport).
struct Sinks {
    sinks: Vec<Arc<dyn Sink>>,
    reporters: Vec<Arc<dyn Report>>,
    redis: Option<Arc<Redis>>,
    postgres: Option<Arc<Postgres>>,
}

fn build_sinks(cfg: &Config) -> anyhow::Result<Sinks> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(f) = &cfg.sinks.file {
        sinks.push(Arc::new(FileSink::open(&f.path).map_err(|e| anyhow!(e))?));
    }
    let pg = match &cfg.postgres.url {
        Some(_) => {
            let pg = Postgres::new(&cfg.postgres).map_err(|e| anyhow!(e))?;
            sinks.push(Arc::new(PostgresSink::new(pg.clone())));
            Some(pg)
        }
        None => None,
    };
    let postgres: Arc<dyn Report> = match &pg {
        Some(p) => p.clone(),
        None => Arc::new(NotConfigured("postgres")),
    };
    let redis = match &cfg.redis.url {
        Some(_) => {
            let r = Redis::start(&cfg.redis).map_err(|e| anyhow!(e))?;
            sinks.push(Arc::new(RedisSink::new(r.clone())));
            Some(r)
        }
        None => None,
    };
    let redis_report: Arc<dyn Report> = match &redis {
        Some(r) => r.clone(),
        None => Arc::new(NotConfigured("redis")),
    };
    Ok(Sinks {
        sinks,
        reporters: vec![redis_report, postgres],
        redis,
        postgres: pg,
    })
}

/// WATCHDOG=1 only while the store writer answers: a writer stuck on a dead disk gets
/// the service restarted instead of hanging forever.
struct Watchdog {
    store: Arc<Store>,
    tick: Duration,
}

impl Worker for Watchdog {
    fn name(&self) -> String {
        "watchdog".into()
    }

    fn work<'a>(
        &'a mut self,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<worker::State, String>> {
        Box::pin(async move {
            match tokio::time::timeout(self.tick, self.store.ping()).await {
                Ok(Ok(())) => {
                    crate::ops::systemd::notify("WATCHDOG=1");
                    Ok(worker::State::Idle)
                }
                _ => Err("store writer did not answer; withholding the watchdog ping".into()),
            }
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(self.tick))
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.tick,
            max: self.tick,
        }
    }
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
