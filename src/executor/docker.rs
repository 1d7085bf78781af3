//! The `docker` backend: one hardened container per evaluation, through bollard.
//!
//! Nothing a request carries reaches Docker except the code and stdin, and those only as
//! bytes on the container's stdin: the image comes from the operator's allow-list per
//! language, and every container gets the same profile: no network, read-only root,
//! a size-capped noexec tmpfs on /tmp, a non-root user, all capabilities dropped,
//! no-new-privileges, a pids limit, memory = memory+swap limit, a CPU quota, a high OOM
//! score, no host binds, no logging driver, labels naming this node and the evaluation.
//!
//! The code goes in through stdin behind its length (`N\n<code><stdin>`): a two-line
//! bootstrap (`read -r n; head -c "$n" > /tmp/FILE; exec CMD`) writes it inside the
//! container and hands the rest of stdin to the program. No host file is ever written.
//!
//! Containers are removed after each run; at start-up those left by a crash (this node's
//! label) are removed. With `warm_pool > 0`, containers are created ahead of time and each
//! serves exactly one evaluation.

use super::cgroup::{DockerParent, DockerParents};
use super::Usage;
use super::{
    read_capped_stream, BoxFuture, CompileJob, CompileOutput, Executor, ExecutorHealth, Job,
    LanguageInfo, LanguageState, RunOutput, Termination,
};
use crate::config::Config;
use crate::model::RunLimits;
use crate::ops::worker::{Runner, State, Worker};
use bollard::models::{ContainerCreateBody, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Inodes of the container's /tmp (a loop creating files must hit a limit).
const TMP_INODES: u64 = 16384;

/// Label carrying the node id; orphan reaping selects on it.
pub const LABEL_NODE: &str = "crucible.node";
/// Label carrying the eval_id (`warm` for a pool container not yet used).
pub const LABEL_EVAL: &str = "crucible.eval_id";
/// Label carrying the language the container was made for.
pub const LABEL_LANGUAGE: &str = "crucible.language";

#[derive(Debug, Clone)]
struct Lang {
    name: String,
    image: String,
    /// The main file's name.
    file: String,
    run: Vec<String>,
    compile: Option<Vec<String>>,
    env: Vec<String>,
}

/// The bootstrap of every container: read the command (sh-quoted, by length), a tar of
/// /code and one of /build (the compiled program; length 0 for none), then exec the
/// command; the rest of stdin is the program's. The same script serves warm containers,
/// which wait for all of it.
const RUN_SCRIPT: &str = "IFS= read -r n && head -c \"$n\" > /tmp/.argv && \
    IFS= read -r n && head -c \"$n\" | tar -xf - -C /code && \
    IFS= read -r n && { [ \"$n\" -eq 0 ] || head -c \"$n\" | tar -xf - -C /build; } && \
    eval \"set -- $(cat /tmp/.argv)\" && cd /tmp && exec \"$@\"";

/// The compile bootstrap: the command and /code as for a run; the compiler's output goes
/// to files, then a frame (see [`super::build`]) goes to stdout: how it ended, its output,
/// a tar of /build made inside the container (the host never opens a path of the build).
fn compile_script(cap: u64) -> String {
    format!(
        "IFS= read -r n && head -c \"$n\" > /tmp/.argv && \
         IFS= read -r n && head -c \"$n\" | tar -xf - -C /code && \
         eval \"set -- $(cat /tmp/.argv)\" && cd /tmp && \
         {{ \"$@\" < /dev/null > /tmp/.out 2> /tmp/.err; rc=$?; \
         printf '{magic}\\nstatus exited %d\\n' \"$rc\"; \
         head -c {cap} /tmp/.out > /tmp/.o; head -c {cap} /tmp/.err > /tmp/.e; \
         printf 'stdout %d\\n' $(($(wc -c < /tmp/.o))); cat /tmp/.o; \
         printf 'stderr %d\\n' $(($(wc -c < /tmp/.e))); cat /tmp/.e; \
         printf 'tar *\\n'; tar -cf - -C /build .; }}",
        magic = super::build::MAGIC,
    )
}

/// What goes into a container and how long it may take.
struct DockerRun<'a> {
    /// The command, the tars and the program's stdin (see [`RUN_SCRIPT`]).
    payload: Vec<u8>,
    timeout: Duration,
    limits: &'a RunLimits,
    /// Bytes of stdout kept (a compile step's frame is bigger than a run's output).
    cap: usize,
}

/// Engine state for /health.
#[derive(Debug, Clone, Default)]
struct EngineState {
    reachable: bool,
    version: Option<String>,
    last_error: Option<String>,
    checked: Option<Instant>,
}

/// Counters for /metrics and the benchmark.
#[derive(Debug, Default)]
pub struct DockerStats {
    /// Runs in which the kernel (or, without a parent of ours, the engine) recorded an
    /// OOM kill.
    pub oom_kills: AtomicU64,
    pub created: AtomicU64,
    pub warm_hits: AtomicU64,
    pub warm_misses: AtomicU64,
    pub create_retries: AtomicU64,
}

/// A container created for one run (or ahead of time, for the warm pool), with the
/// cgroup parent the appliance owns for it, if any.
struct Slot {
    id: String,
    parent: Option<DockerParent>,
}

/// The Docker executor.
pub struct DockerExecutor {
    docker: Docker,
    node: String,
    languages: HashMap<String, Lang>,
    /// The most (and the default) a run of each language gets.
    max_limits: HashMap<String, RunLimits>,
    user: String,
    nano_cpus: i64,
    tmp_bytes: u64,
    max_file_bytes: i64,
    max_open_files: i64,
    /// Cgroup parents owned by the appliance (root, cgroupfs driver): the kernel's own OOM
    /// record, peak memory and CPU time of each container. `None`: the engine's word.
    parents: Option<DockerParents>,
    /// Why the appliance owns no parents (for /health).
    parents_reason: Mutex<Option<String>>,
    /// The sandbox's syscall filter as a Docker profile (JSON).
    seccomp_profile: String,
    judge: crate::config::JudgeConfig,
    pull: bool,
    create_attempts: u32,
    warm_target: usize,
    /// Memory the engine may hand out at once (see [`memory_budget`]).
    memory_budget_bytes: u64,
    warm: Mutex<HashMap<String, VecDeque<Slot>>>,
    /// Language -> when the warm pool may try it again after it could not create one (an
    /// image that is missing and cannot be pulled must not hold up the other languages,
    /// nor fill the log every few seconds).
    warm_retry: Mutex<HashMap<String, Instant>>,
    refill: Notify,
    /// The warm-pool worker, stopped at shutdown so nothing it creates outlives the process.
    pool: Arc<Runner>,
    /// Background removals of finished containers.
    removals: tokio_util::task::TaskTracker,
    /// Set once this node's leftover containers were removed, at the first contact with
    /// the engine (which may come long after start-up if the engine was down then).
    reaped: tokio::sync::Mutex<bool>,
    /// Language -> why its image cannot be used (for /health); absent when fine.
    image_problems: Mutex<HashMap<String, String>>,
    state: Mutex<EngineState>,
    pub stats: DockerStats,
}

/// Memory the engine may hand out at once: each worker's run at the largest language
/// limit, plus every warm container at its language's limit.
fn memory_budget(workers: usize, warm_pool: usize, limits: &HashMap<String, RunLimits>) -> u64 {
    let largest = limits.values().map(|l| l.memory_mb).max().unwrap_or(0);
    let warm: u64 = limits.values().map(|l| l.memory_mb).sum::<u64>() * warm_pool as u64;
    (workers as u64 * largest + warm) * 1024 * 1024
}

/// The container's own memory limit sits this far above its parent's, so that the tree
/// always reaches the parent's limit first: the OOM is then an event of the parent, where
/// the appliance registered for it, and not only of the container's cgroup, which is gone
/// by the time the engine reports the exit.
const CONTAINER_MEMORY_HEADROOM: u64 = 4 * 1024 * 1024;

/// Quote one argument for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn docker_err(e: bollard::errors::Error) -> String {
    e.to_string()
}

/// MemTotal of /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn remove_container(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    if let Err(e) = docker.remove_container(id, Some(opts)).await {
        if !e.to_string().contains("No such container") {
            tracing::warn!(container = %id, error = %e, "cannot remove container");
        }
    }
}

impl DockerExecutor {
    /// Connect (lazily: the engine may be down now and come up later) and prepare the
    /// language table from the allow-list.
    pub fn new(
        cfg: &Config,
        node: &str,
        shutdown: CancellationToken,
    ) -> Result<Arc<DockerExecutor>, String> {
        let docker = if cfg.docker.host.is_empty() {
            Docker::connect_with_local_defaults()
        } else {
            Docker::connect_with_host(&cfg.docker.host)
        }
        .map_err(|e| format!("docker.host `{}`: {e}", cfg.docker.host))?;
        let mut languages = HashMap::new();
        for (name, lang) in &cfg.languages {
            languages.insert(
                name.clone(),
                Lang {
                    name: name.clone(),
                    image: lang.image.clone().unwrap_or_default(),
                    file: lang.file.clone(),
                    run: lang.run.clone(),
                    compile: lang.compile.clone(),
                    env: lang.env.clone(),
                },
            );
        }
        let l = &cfg.limits;
        let max_limits = cfg
            .languages
            .keys()
            .map(|n| (n.clone(), cfg.max_limits(n)))
            .collect();
        let (parents, parents_reason) = match DockerParents::detect(node) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        let memory_budget = memory_budget(cfg.workers, cfg.docker.warm_pool, &max_limits);
        Ok(Arc::new(DockerExecutor {
            docker,
            node: node.to_string(),
            languages,
            max_limits,
            user: cfg.docker.user.clone(),
            nano_cpus: (cfg.docker.cpus * 1e9) as i64,
            tmp_bytes: l.tmp_mb * 1024 * 1024,
            max_file_bytes: (l.max_file_mb * 1024 * 1024) as i64,
            max_open_files: l.max_open_files as i64,
            parents,
            parents_reason: Mutex::new(parents_reason),
            seccomp_profile: super::seccomp::docker_profile(),
            judge: cfg.judge.clone(),
            pull: cfg.docker.pull,
            create_attempts: cfg.docker.create_attempts,
            warm_target: cfg.docker.warm_pool,
            memory_budget_bytes: memory_budget,
            warm: Mutex::new(HashMap::new()),
            warm_retry: Mutex::new(HashMap::new()),
            refill: Notify::new(),
            pool: Runner::new(shutdown),
            removals: tokio_util::task::TaskTracker::new(),
            reaped: tokio::sync::Mutex::new(false),
            image_problems: Mutex::new(HashMap::new()),
            state: Mutex::new(EngineState::default()),
            stats: DockerStats::default(),
        }))
    }

    fn set_state(&self, reachable: bool, version: Option<String>, error: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            let was = s.reachable;
            s.reachable = reachable;
            if version.is_some() {
                s.version = version;
            }
            if reachable {
                s.last_error = None;
            } else if let Some(e) = error {
                if was || s.last_error.is_none() {
                    tracing::warn!(error = %e, "docker engine unreachable; evaluations wait in the queue");
                }
                s.last_error = Some(e);
            }
            if reachable && !was {
                tracing::info!("docker engine reachable");
            }
            s.checked = Some(Instant::now());
        }
    }

    /// Ask the engine (negotiating nothing: bollard speaks a version every engine since
    /// 2019 accepts; the engine's own version is reported in /health).
    async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(3), self.docker.version()).await {
            Ok(Ok(v)) => {
                let version = format!(
                    "{} (API {})",
                    v.version.unwrap_or_default(),
                    v.api_version.unwrap_or_default()
                );
                // Nothing runs before the engine is reachable, so the first contact is
                // where crash leftovers go, before any new container exists.
                if let Err(e) = self.reap_once().await {
                    self.set_state(false, None, Some(e.clone()));
                    return Err(e);
                }
                self.set_state(true, Some(version), None);
                Ok(())
            }
            Ok(Err(e)) => {
                let msg = format!("docker engine: {e}");
                self.set_state(false, None, Some(msg.clone()));
                Err(msg)
            }
            Err(_) => {
                let msg = "docker engine: no answer within 3 s".to_string();
                self.set_state(false, None, Some(msg.clone()));
                Err(msg)
            }
        }
    }

    /// Start-up: reach the engine (which removes this node's containers left by a crash),
    /// check the images, and start the warm pool. An engine that is down now is fine: the
    /// same happens when it first answers.
    pub async fn start(self: &Arc<Self>) {
        // Warm containers carry the full memory limit: they count against the budget.
        let budget_mb = self.memory_budget_bytes / (1024 * 1024);
        tracing::info!(
            memory_budget_mb = budget_mb,
            warm_pool = self.warm_target,
            "docker executor: running plus warm containers may use up to this much memory"
        );
        if let Some(total) = host_memory_bytes() {
            if self.memory_budget_bytes > total {
                tracing::warn!(
                    memory_budget_mb = budget_mb,
                    host_memory_mb = total / (1024 * 1024),
                    "workers x the largest memory_mb + warm_pool x every language's memory_mb exceeds this host's memory; lower one of them, or disable languages you do not use"
                );
            }
        }
        if self.probe().await.is_ok() {
            for lang in self.languages.values() {
                if let Err(e) = self.check_image(lang).await {
                    tracing::warn!(language = %lang.name, "{e}");
                }
            }
        }
        if self.warm_target > 0 {
            self.pool.spawn(WarmPool {
                docker: self.clone(),
                last_probe: Instant::now(),
            });
        }
    }

    /// Shutdown, after the last evaluation ended: stop the warm pool and remove every
    /// container of this node, so a stopped appliance leaves nothing behind.
    pub async fn stop(&self) {
        // The pool ends on the shutdown token; a create in flight finishes first. Its
        // containers are removed below, with every other one of this node.
        self.pool.stop(Duration::from_secs(10)).await;
        self.removals.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.removals.wait()).await;
        if self.reachable() {
            if let Ok(n) = self.reap().await {
                if n > 0 {
                    tracing::info!(count = n, "removed this node's containers at shutdown");
                }
            }
        }
    }

    /// Make sure the language's image is there (pulling it if allowed); /health shows
    /// the outcome.
    async fn check_image(&self, lang: &Lang) -> Result<(), String> {
        let result = self.ensure_image(&lang.image).await;
        if let Ok(mut p) = self.image_problems.lock() {
            match &result {
                Ok(()) => p.remove(&lang.name),
                Err(e) => p.insert(lang.name.clone(), e.clone()),
            };
        }
        result
    }

    /// Remove this node's leftover containers once, at the first contact with the engine.
    async fn reap_once(&self) -> Result<(), String> {
        let mut done = self.reaped.lock().await;
        if !*done {
            let n = self.reap().await?;
            if n > 0 {
                tracing::warn!(
                    count = n,
                    "removed containers left by an earlier run of this node"
                );
            }
            if let Some(p) = &self.parents {
                p.reap();
            }
            *done = true;
        }
        Ok(())
    }

    /// Remove every container carrying this node's label (crash leftovers, old pool).
    async fn reap(&self) -> Result<usize, String> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.node)],
        );
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| format!("docker engine: cannot list this node's containers: {e}"))?;
        let mut n = 0;
        for c in list {
            let Some(id) = c.id else { continue };
            let eval = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_EVAL).cloned())
                .unwrap_or_default();
            self.remove(&id).await;
            tracing::info!(container = %id, label_eval_id = %eval, "removed a container of this node");
            n += 1;
        }
        Ok(n)
    }

    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        if !self.pull {
            return Err(format!(
                "image `{image}` is not present and docker.pull is off"
            ));
        }
        tracing::info!(image, "pulling missing image");
        let opts = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                return Err(format!(
                    "image `{image}` is not present and cannot be pulled: {e}"
                ));
            }
        }
        Ok(())
    }

    fn body(
        &self,
        lang: &Lang,
        eval: &str,
        limits: &RunLimits,
        parent: Option<&DockerParent>,
        compile: bool,
    ) -> ContainerCreateBody {
        let tmp_bytes = match compile {
            true => self.judge.compile_tmp_mb * 1024 * 1024,
            false => self.tmp_bytes,
        };
        let script = match compile {
            true => compile_script(limits.max_output_bytes),
            false => RUN_SCRIPT.to_string(),
        };
        let mut memory = limits.memory_mb * 1024 * 1024;
        if parent.is_some() {
            memory += CONTAINER_MEMORY_HEADROOM;
        }
        let mut labels = HashMap::new();
        labels.insert(LABEL_NODE.to_string(), self.node.clone());
        labels.insert(LABEL_EVAL.to_string(), eval.to_string());
        labels.insert(LABEL_LANGUAGE.to_string(), lang.name.clone());
        let mut tmpfs = HashMap::new();
        tmpfs.insert(
            "/tmp".to_string(),
            format!("rw,noexec,nosuid,nodev,size={tmp_bytes},nr_inodes={TMP_INODES},mode=1777"),
        );
        // The submitted files (not executable), and the compiled program (executable):
        // written by the container itself from what arrives on stdin, never a host bind.
        tmpfs.insert(
            "/code".to_string(),
            format!(
                "rw,noexec,nosuid,nodev,size={},nr_inodes={TMP_INODES},mode=1777",
                self.tmp_bytes
            ),
        );
        tmpfs.insert(
            "/build".to_string(),
            format!(
                "rw,exec,nosuid,nodev,size={},nr_inodes={TMP_INODES},mode=1777",
                self.judge.build_mb * 1024 * 1024
            ),
        );
        let host = HostConfig {
            network_mode: Some("none".into()),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec![
                "no-new-privileges".into(),
                format!("seccomp={}", self.seccomp_profile),
            ]),
            pids_limit: Some(limits.max_processes as i64),
            memory: Some(memory as i64),
            memory_swap: Some(memory as i64),
            cgroup_parent: parent.map(|p| p.cgroup_parent.clone()),
            nano_cpus: Some(self.nano_cpus),
            oom_score_adj: Some(1000),
            // /dev/shm is writable in every container: cap it like /tmp.
            shm_size: Some(self.tmp_bytes as i64),
            ipc_mode: Some("private".into()),
            ulimits: Some(vec![
                ResourcesUlimits {
                    name: Some("nofile".into()),
                    soft: Some(self.max_open_files),
                    hard: Some(self.max_open_files),
                },
                ResourcesUlimits {
                    name: Some("fsize".into()),
                    soft: Some(self.max_file_bytes),
                    hard: Some(self.max_file_bytes),
                },
                ResourcesUlimits {
                    name: Some("core".into()),
                    soft: Some(0),
                    hard: Some(0),
                },
            ]),
            log_config: Some(bollard::models::HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(lang.image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), script]),
            env: Some(
                [
                    "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
                    "HOME=/tmp".to_string(),
                    "LANG=C.UTF-8".to_string(),
                ]
                .into_iter()
                .chain(lang.env.iter().cloned())
                .collect(),
            ),
            user: Some(self.user.clone()),
            working_dir: Some("/tmp".into()),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            network_disabled: Some(true),
            labels: Some(labels),
            host_config: Some(host),
            ..Default::default()
        }
    }

    /// The cgroup parent of a new container, when the appliance owns parents.
    fn new_parent(&self, limits: &RunLimits) -> Result<Option<DockerParent>, String> {
        let Some(parents) = &self.parents else {
            return Ok(None);
        };
        let run = format!("run-{}", uuid::Uuid::new_v4().simple());
        parents
            .create(&run, limits.memory_mb * 1024 * 1024)
            .map(Some)
            .map_err(|e| format!("cannot create the run's cgroup parent: {e}"))
    }

    /// Create a container (and its cgroup parent), retrying transient engine errors a few
    /// times.
    async fn create(
        &self,
        lang: &Lang,
        eval: &str,
        limits: &RunLimits,
        compile: bool,
    ) -> Result<Slot, String> {
        let parent = self.new_parent(limits)?;
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=self.create_attempts {
            let name = format!("crucible-{}-{}", self.node, uuid::Uuid::new_v4().simple());
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            let body = self.body(lang, eval, limits, parent.as_ref(), compile);
            match self.docker.create_container(Some(opts), body).await {
                Ok(r) => {
                    self.stats.created.fetch_add(1, Ordering::Relaxed);
                    return Ok(Slot { id: r.id, parent });
                }
                Err(e) => {
                    let text = docker_err(e);
                    if text.contains("No such image") || text.contains("not found") {
                        self.check_image(lang).await?;
                    }
                    last = text;
                    if attempt < self.create_attempts {
                        self.stats.create_retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
        if let Some(p) = parent {
            tokio::task::spawn_blocking(move || p.remove());
        }
        Err(format!(
            "cannot create a container from `{}`: {last}",
            lang.image
        ))
    }

    async fn remove(&self, id: &str) {
        remove_container(&self.docker, id).await;
    }

    /// Remove a finished run's container in the background: the result does not wait for
    /// the engine's clean-up. `stop` waits for these, and a crash leaves nothing that the
    /// next first contact does not reap.
    fn remove_later(&self, slot: Slot) {
        let docker = self.docker.clone();
        self.removals.spawn(async move {
            remove_container(&docker, &slot.id).await;
            if let Some(p) = slot.parent {
                let _ = tokio::task::spawn_blocking(move || p.remove()).await;
            }
        });
    }

    async fn kill(&self, id: &str) {
        let opts = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        let _ = self.docker.kill_container(id, Some(opts)).await;
    }

    fn take_warm(&self, language: &str) -> Option<Slot> {
        let got = self
            .warm
            .lock()
            .ok()
            .and_then(|mut w| w.get_mut(language).and_then(|q| q.pop_front()));
        self.refill.notify_one();
        got
    }

    /// Create (and start) warm containers until every language has `warm_pool` of them.
    async fn fill_pool(&self, stop: &CancellationToken) {
        /// How long a language whose warm container could not be made is left alone.
        const WARM_RETRY: Duration = Duration::from_secs(60);
        for (name, lang) in &self.languages {
            let later = self
                .warm_retry
                .lock()
                .ok()
                .and_then(|r| r.get(name).copied())
                .is_some_and(|at| at > Instant::now());
            if later {
                continue;
            }
            loop {
                let have = self
                    .warm
                    .lock()
                    .map(|w| w.get(name).map(|q| q.len()).unwrap_or(0))
                    .unwrap_or(self.warm_target);
                if have >= self.warm_target || stop.is_cancelled() || !self.reachable() {
                    break;
                }
                // Created AND started: the bootstrap waits for its code on stdin, so an
                // evaluation skips both steps.
                let Some(limits) = self.max_limits.get(name).copied() else {
                    break;
                };
                let ready = match self.create(lang, "warm", &limits, false).await {
                    Ok(slot) => match self.docker.start_container(&slot.id, None).await {
                        Ok(()) => Ok(slot),
                        Err(e) => {
                            self.remove_later(slot);
                            Err(format!("start: {e}"))
                        }
                    },
                    Err(e) => Err(e),
                };
                match ready {
                    Ok(slot) => {
                        if let Ok(mut w) = self.warm.lock() {
                            w.entry(name.clone()).or_default().push_back(slot);
                        }
                        if let Ok(mut r) = self.warm_retry.lock() {
                            r.remove(name);
                        }
                    }
                    Err(e) => {
                        let again = self
                            .warm_retry
                            .lock()
                            .map(|mut r| r.insert(name.clone(), Instant::now() + WARM_RETRY))
                            .ok()
                            .flatten()
                            .is_some();
                        if again {
                            tracing::debug!(language = %name, error = %e, "warm pool: still cannot create");
                        } else {
                            tracing::warn!(
                                language = %name,
                                error = %e,
                                retry_secs = WARM_RETRY.as_secs(),
                                "warm pool: cannot create; the other languages are not held up"
                            );
                        }
                        break;
                    }
                }
            }
        }
    }

    fn reachable(&self) -> bool {
        self.state.lock().map(|s| s.reachable).unwrap_or(false)
    }

    async fn run_lang(&self, lang: &Lang, job: &Job, cancel: CancellationToken) -> RunOutput {
        let started = Instant::now();
        let mut warm = None;
        // Warm containers carry the language's full limits: a run that asks for less
        // gets a container of its own.
        let default = self.max_limits.get(&job.language) == Some(&job.limits);
        if let Some(slot) = default.then(|| self.take_warm(&job.language)).flatten() {
            // A warm container waits on stdin; one the engine stopped meanwhile (an
            // engine restart, say) is dropped for a fresh one.
            let running = self
                .docker
                .inspect_container(&slot.id, None)
                .await
                .ok()
                .and_then(|c| c.state)
                .and_then(|s| s.running)
                .unwrap_or(false);
            if running {
                warm = Some(slot);
            } else {
                self.remove_later(slot);
            }
        }
        let prestarted = warm.is_some();
        let slot = match warm {
            Some(slot) => {
                self.stats.warm_hits.fetch_add(1, Ordering::Relaxed);
                slot
            }
            None => {
                if self.warm_target > 0 {
                    self.stats.warm_misses.fetch_add(1, Ordering::Relaxed);
                }
                match self.create(lang, &job.eval_id, &job.limits, false).await {
                    Ok(slot) => slot,
                    Err(e) => return RunOutput::executor_error(e, started.elapsed()),
                }
            }
        };
        // A warm container keeps its `crucible.eval_id=warm` label (labels are fixed at
        // creation); this record pairs it with the evaluation.
        tracing::debug!(eval_id = %job.eval_id, container = %slot.id, "evaluation runs in container");
        let payload = match self.run_payload(lang, job) {
            Ok(p) => p,
            Err(e) => {
                self.remove_later(slot);
                return RunOutput::executor_error(e, started.elapsed());
            }
        };
        let run = DockerRun {
            payload,
            timeout: job.timeout,
            limits: &job.limits,
            cap: job.limits.max_output_bytes as usize,
        };
        let out = self.run_in(&slot, run, cancel, started, prestarted).await;
        self.remove_later(slot);
        out
    }

    /// The command (placeholders expanded), sh-quoted, behind its length.
    fn argv_section(
        lang: &Lang,
        template: &[String],
        files: &[(String, String)],
        memory_mb: u64,
        args: &[String],
    ) -> Vec<u8> {
        let ext = std::path::Path::new(&lang.file).extension();
        let mut argv: Vec<String> = Vec::new();
        for a in template {
            if a == "{sources}" {
                argv.extend(
                    files
                        .iter()
                        .filter(|(n, _)| std::path::Path::new(n).extension() == ext)
                        .map(|(n, _)| format!("/code/{n}")),
                );
            } else {
                argv.push(
                    a.replace("{file}", &format!("/code/{}", lang.file))
                        .replace("{memory_mb}", &memory_mb.to_string()),
                );
            }
        }
        argv.extend(args.iter().cloned());
        let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        let text = quoted.join(" ");
        let mut out = format!("{}\n", text.len()).into_bytes();
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// A tar of the submitted files (main file first), behind its length.
    fn files_section(files: &[(String, String)]) -> Result<Vec<u8>, String> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for (name, content) in files {
            let mut parent = std::path::Path::new(name).parent();
            let mut chain = Vec::new();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                chain.push(p.to_path_buf());
                parent = p.parent();
            }
            for d in chain.into_iter().rev() {
                if dirs.insert(d.clone()) {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, &d, std::io::empty())
                        .map_err(|e| format!("cannot pack the files: {e}"))?;
                }
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(content.len() as u64);
            b.append_data(&mut h, name, content.as_bytes())
                .map_err(|e| format!("cannot pack the files: {e}"))?;
        }
        let tar = b
            .into_inner()
            .map_err(|e| format!("cannot pack the files: {e}"))?;
        let mut out = format!("{}\n", tar.len()).into_bytes();
        out.extend(tar);
        Ok(out)
    }

    fn job_files(
        lang: &Lang,
        code: &str,
        files: &[crate::model::SourceFile],
    ) -> Vec<(String, String)> {
        std::iter::once((lang.file.clone(), code.to_string()))
            .chain(files.iter().map(|f| (f.name.clone(), f.content.clone())))
            .collect()
    }

    /// What a run's container reads on stdin.
    fn run_payload(&self, lang: &Lang, job: &Job) -> Result<Vec<u8>, String> {
        let files = Self::job_files(lang, &job.code, &job.files);
        let mut payload =
            Self::argv_section(lang, &lang.run, &files, job.limits.memory_mb, &job.args);
        payload.extend(Self::files_section(&files)?);
        match &job.artifact {
            // The compiled program, from the cache the appliance wrote (re-read without
            // following links all the same).
            Some(dir) => {
                let tar = super::build::archive(dir, self.judge.build_mb * 1024 * 1024)
                    .map_err(|e| format!("cannot read the compiled program: {e}"))?;
                payload.extend(format!("{}\n", tar.len()).into_bytes());
                payload.extend(tar);
            }
            None => payload.extend(b"0\n"),
        }
        if let Some(s) = &job.stdin {
            payload.extend_from_slice(s.as_bytes());
        }
        Ok(payload)
    }

    async fn compile_lang(
        &self,
        lang: &Lang,
        job: &CompileJob,
        cancel: CancellationToken,
    ) -> CompileOutput {
        let started = Instant::now();
        let fail = |e: String| CompileOutput {
            run: RunOutput::executor_error(e, started.elapsed()),
            build: None,
        };
        let Some(template) = &lang.compile else {
            return fail(format!("`{}` is not a compiled language", lang.name));
        };
        let files = Self::job_files(lang, &job.code, &job.files);
        let mut payload = Self::argv_section(lang, template, &files, job.limits.memory_mb, &[]);
        match Self::files_section(&files) {
            Ok(f) => payload.extend(f),
            Err(e) => return fail(e),
        }
        let slot = match self.create(lang, &job.eval_id, &job.limits, true).await {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let run = DockerRun {
            payload,
            timeout: job.timeout,
            limits: &job.limits,
            cap: (self.judge.build_mb * 1024 * 1024 + 2 * job.limits.max_output_bytes + 4096)
                as usize,
        };
        let mut out = self.run_in(&slot, run, cancel, started, false).await;
        self.remove_later(slot);
        match (&out.termination, super::build::parse(&out.stdout)) {
            (Termination::Exited(0), Some(frame)) => {
                out.termination = match frame.status {
                    super::build::Status::Exited(c) if (129..=192).contains(&c) => {
                        Termination::Signaled(c - 128)
                    }
                    super::build::Status::Exited(c) => Termination::Exited(c),
                    super::build::Status::Signaled(s) => Termination::Signaled(s),
                    super::build::Status::Failed => {
                        Termination::ExecutorError("the compiler could not be started".into())
                    }
                };
                out.stdout = frame.stdout;
                out.stderr = frame.stderr;
                CompileOutput {
                    run: out,
                    build: Some(frame.tar),
                }
            }
            _ => {
                out.stdout.clear();
                CompileOutput {
                    run: out,
                    build: None,
                }
            }
        }
    }

    /// The slot's parent, if the engine really put the container under it (it does not
    /// with the systemd cgroup driver, or an engine on another host); said once.
    fn effective_parent<'a>(&self, slot: &'a Slot) -> Option<&'a DockerParent> {
        let p = slot.parent.as_ref()?;
        if p.holds(&slot.id) {
            return Some(p);
        }
        if let Ok(mut r) = self.parents_reason.lock() {
            if r.is_none() {
                let why = "the engine did not put the container under the appliance's cgroup \
                           parent (systemd cgroup driver, or an engine on another host): memory \
                           verdicts rely on the engine's OOMKilled flag";
                tracing::warn!("{why}");
                *r = Some(why.to_string());
            }
        }
        None
    }

    async fn run_in(
        &self,
        slot: &Slot,
        job: DockerRun<'_>,
        cancel: CancellationToken,
        started: Instant,
        prestarted: bool,
    ) -> RunOutput {
        let attach = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let id = slot.id.as_str();
        let attached = match self.docker.attach_container(id, Some(attach)).await {
            Ok(a) => a,
            Err(e) => return RunOutput::executor_error(format!("attach: {e}"), started.elapsed()),
        };
        let bollard::container::AttachContainerResults { output, mut input } = attached;
        if !prestarted {
            if let Err(e) = self.docker.start_container(id, None).await {
                return RunOutput::executor_error(format!("start: {e}"), started.elapsed());
            }
        }
        let run_started = Instant::now();
        let payload = job.payload;
        let feeder = tokio::spawn(async move {
            let _ = input.write_all(&payload).await;
            let _ = input.shutdown().await;
        });
        let cap = job.cap;
        let reader = tokio::spawn(read_capped_stream(output, cap));
        let parent = self.effective_parent(slot);

        let mut wait = self.docker.wait_container(id, None);
        let mut termination = None;
        let mut exit_code: Option<i64> = None;
        let deadline = job
            .timeout
            .saturating_sub(run_started.duration_since(started).min(job.timeout));
        tokio::select! {
            r = wait.next() => {
                exit_code = Some(match r {
                    Some(Ok(w)) => w.status_code,
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                    Some(Err(e)) => {
                        termination = Some(Termination::ExecutorError(format!("wait: {e}")));
                        -1
                    }
                    None => -1,
                });
            }
            _ = tokio::time::sleep(deadline) => termination = Some(Termination::TimedOut),
            _ = cancel.cancelled() => termination = Some(Termination::Cancelled),
            _ = cpu_watch(parent, job.limits.cpu_ms) => termination = Some(Termination::CpuLimit),
        }
        if termination.is_some() {
            self.kill(id).await;
        }
        feeder.abort();
        let ((stdout, stderr), (stdout_truncated, stderr_truncated)) =
            match tokio::time::timeout(Duration::from_secs(5), reader).await {
                Ok(Ok(r)) => r,
                _ => ((Vec::new(), Vec::new()), (false, false)),
            };
        let truncated = stdout_truncated || stderr_truncated;
        let duration = started.elapsed();
        // What the kernel recorded in the parent the appliance owns: OOM events, peak
        // memory and CPU time of the container's whole tree.
        let counted = parent.map(|p| p.usage());
        let usage = Usage {
            cpu_ms: counted.and_then(|u| u.cpu_usec).map(|us| us / 1000),
            memory_peak_kb: counted.and_then(|u| u.memory_peak_bytes).map(|b| b / 1024),
        };
        if let Some(t) = termination {
            return RunOutput {
                termination: t,
                stdout,
                stderr,
                truncated,
                stdout_truncated,
                duration,
                memory_exceeded: counted.is_some_and(|u| u.oom_kills > 0),
                usage,
            };
        }
        let inspect = self.docker.inspect_container(id, None).await.ok();
        let st = inspect.and_then(|i| i.state);
        let oom = match counted {
            Some(u) => u.oom_kills > 0,
            // Without a parent of ours, the engine's flag is all there is (some engines
            // never set it; /health says which way verdicts are made).
            None => st.as_ref().and_then(|s| s.oom_killed).unwrap_or(false),
        };
        if oom {
            self.stats.oom_kills.fetch_add(1, Ordering::Relaxed);
        }
        let code = st
            .as_ref()
            .and_then(|s| s.exit_code)
            .or(exit_code)
            .unwrap_or(-1);
        let termination = if (128..128 + 65).contains(&code) {
            Termination::Signaled((code - 128) as i32)
        } else if code < 0 {
            Termination::ExecutorError("the container ended without an exit code".into())
        } else {
            Termination::Exited(code as i32)
        };
        RunOutput {
            termination,
            stdout,
            stderr,
            truncated,
            stdout_truncated,
            duration,
            memory_exceeded: oom,
            usage,
        }
    }
}

/// Completes when the container's tree used up its CPU time (read from the parent the
/// appliance owns); pending without one.
async fn cpu_watch(parent: Option<&DockerParent>, cpu_ms: u64) {
    let Some(p) = parent else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if p.usage().cpu_usec.unwrap_or(0) > cpu_ms * 1000 {
            return;
        }
    }
}

/// Keeps `warm_pool` started containers per language, and checks the engine every 5 s.
struct WarmPool {
    docker: Arc<DockerExecutor>,
    last_probe: Instant,
}

impl Worker for WarmPool {
    fn name(&self) -> String {
        "docker-warm-pool".into()
    }

    fn work<'a>(&'a mut self, stop: &'a CancellationToken) -> BoxFuture<'a, Result<State, String>> {
        Box::pin(async move {
            if self.last_probe.elapsed() >= Duration::from_secs(5) {
                self.last_probe = Instant::now();
                let _ = self.docker.probe().await;
            }
            self.docker.fill_pool(stop).await;
            Ok(State::Idle)
        })
    }

    fn wait_for_work(&mut self) -> BoxFuture<'_, ()> {
        let wait = Duration::from_secs(5).saturating_sub(self.last_probe.elapsed());
        Box::pin(async move {
            tokio::select! {
                _ = self.docker.refill.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        })
    }
}

impl DockerExecutor {
    /// The warm pool's runner (for /health).
    pub fn runner(&self) -> Arc<Runner> {
        self.pool.clone()
    }
}

impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn language_state(&self, language: &str) -> LanguageState {
        if self.languages.contains_key(language) {
            LanguageState::Available
        } else {
            LanguageState::Unknown
        }
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let fresh = self
                .state
                .lock()
                .ok()
                .and_then(|s| s.checked.map(|t| (s.reachable, t.elapsed())));
            match fresh {
                Some((true, age)) if age < Duration::from_millis(500) => Ok(()),
                _ => self.probe().await,
            }
        })
    }

    fn run<'a>(&'a self, job: &'a Job, cancel: CancellationToken) -> BoxFuture<'a, RunOutput> {
        Box::pin(async move {
            match self.languages.get(&job.language) {
                Some(lang) => self.run_lang(lang, job, cancel).await,
                None => RunOutput::executor_error(
                    format!("unknown language `{}`", job.language),
                    Duration::ZERO,
                ),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.stop())
    }

    fn compile<'a>(
        &'a self,
        job: &'a CompileJob,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, CompileOutput> {
        Box::pin(async move {
            match self.languages.get(&job.language) {
                Some(lang) => self.compile_lang(lang, job, cancel).await,
                None => CompileOutput {
                    run: RunOutput::executor_error(
                        format!("unknown language `{}`", job.language),
                        Duration::ZERO,
                    ),
                    build: None,
                },
            }
        })
    }

    fn languages(&self) -> BoxFuture<'_, Vec<LanguageInfo>> {
        Box::pin(async move {
            let problems = self
                .image_problems
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            let mut out: Vec<LanguageInfo> = self
                .languages
                .values()
                .map(|l| LanguageInfo {
                    name: l.name.clone(),
                    // The image decides; it is named instead of asked.
                    version: Some(format!("image {}", l.image)),
                    compiled: l.compile.is_some(),
                    file: l.file.clone(),
                    available: !problems.contains_key(&l.name),
                    reason: problems.get(&l.name).cloned(),
                    limits: self.max_limits.get(&l.name).copied().unwrap_or(RunLimits {
                        memory_mb: 0,
                        cpu_ms: 0,
                        max_processes: 0,
                        max_output_bytes: 0,
                    }),
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            out
        })
    }

    fn metrics(&self, e: &mut crate::ops::metrics::Exposition) {
        let st = &self.stats;
        e.counter(
            "crucible_oom_kills_total",
            "Runs in which a process was OOM-killed (the kernel's record in the run's cgroup parent, or the engine's flag).",
            st.oom_kills.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_docker_containers_created_total",
            "Containers created (per evaluation or for the warm pool).",
            st.created.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_docker_warm_hits_total",
            "Evaluations that started in a warm container.",
            st.warm_hits.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_docker_warm_misses_total",
            "Evaluations that found the warm pool empty.",
            st.warm_misses.load(Ordering::Relaxed),
        );
        e.counter(
            "crucible_docker_create_retries_total",
            "Container creations retried after a transient engine error.",
            st.create_retries.load(Ordering::Relaxed),
        );
        let warm: usize = self
            .warm
            .lock()
            .map(|w| w.values().map(|q| q.len()).sum())
            .unwrap_or(0);
        e.gauge(
            "crucible_docker_warm_containers",
            "Warm containers ready.",
            warm as f64,
        );
        e.gauge(
            "crucible_docker_memory_budget_bytes",
            "(workers + warm containers) x the memory limit per container.",
            self.memory_budget_bytes as f64,
        );
        e.flag(
            "crucible_docker_engine_up",
            "1 when the Docker engine answered the last check.",
            self.reachable(),
        );
    }

    fn health(&self) -> BoxFuture<'_, ExecutorHealth> {
        Box::pin(async move {
            let _ = self.ready().await;
            let st = self.state.lock().map(|s| s.clone()).unwrap_or_default();
            let mut languages = BTreeMap::new();
            let problems = self
                .image_problems
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            for (name, lang) in &self.languages {
                let state = match problems.get(name) {
                    Some(why) => format!("unavailable: {why}"),
                    None => format!("available (image {})", lang.image),
                };
                languages.insert(name.clone(), state);
            }
            let warm: usize = self
                .warm
                .lock()
                .map(|w| w.values().map(|q| q.len()).sum())
                .unwrap_or(0);
            let limits_reason = self.parents_reason.lock().ok().and_then(|r| r.clone());
            ExecutorHealth {
                // The engine caps each container's tree with a cgroup either way; the reason
                // says when OOM verdicts come from the engine's flag instead of a parent of ours.
                limits: match &self.parents {
                    Some(p) => p.label(),
                    None if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                        "cgroup2"
                    }
                    None => "cgroup1",
                },
                limits_reason,
                work_dir: None,
                pool: None,
                backend: "docker",
                ok: st.reachable,
                detail: if st.reachable {
                    format!(
                        "engine {} reachable; warm containers: {warm}",
                        st.version.unwrap_or_default()
                    )
                } else {
                    st.last_error
                        .unwrap_or_else(|| "engine not reached yet".into())
                },
                languages,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn host_memory_is_read() {
        assert!(super::host_memory_bytes().is_some_and(|b| b > 1 << 20));
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
        assert_eq!(sh_quote("/tmp/main.py"), "'/tmp/main.py'");
    }
}
