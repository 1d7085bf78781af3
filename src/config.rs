//! Configuration: embedded defaults < TOML file < environment < command-line flags.
//!
//! This module owns parsing and validation only. It never opens files other than the
//! config file itself and the optional token file, and it never starts anything.
//! Every key is documented here and in `packaging/crucible.toml`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Which executor backend runs evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Linux namespaces + rlimits, no daemon needed (the embedded default).
    Sandbox,
    /// One hardened container per evaluation through the Docker engine.
    Docker,
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sandbox" => Ok(Self::Sandbox),
            "docker" => Ok(Self::Docker),
            other => Err(format!(
                "unknown executor `{other}` (expected `sandbox` or `docker`)"
            )),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when `JOURNAL_STREAM` is set (running under systemd), human text otherwise.
    Auto,
    /// Human-readable lines on stderr.
    Human,
    /// One JSON object per line on stderr.
    Json,
    /// Native journald records with structured fields.
    Journald,
}

/// The whole configuration. Unknown keys are rejected so typos do not pass silently.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on. Env `CRUCIBLE_LISTEN`, flag `--listen`.
    pub listen: SocketAddr,
    /// Directory holding the sled store and the sandbox work area. Env `CRUCIBLE_DATA_DIR`.
    pub data_dir: PathBuf,
    /// The only directory backups are written to (`POST /api/admin/backup`, `crucible
    /// backup NAME`); default `<data_dir>/backups`.
    pub backup_dir: Option<PathBuf>,
    /// `sandbox` (default) or `docker`. Env `CRUCIBLE_EXECUTOR`.
    pub executor: ExecutorKind,
    /// Evaluations running at once.
    pub workers: usize,
    /// Queue depth; beyond it `POST /api/eval` answers 503 with `Retry-After`.
    pub max_queued: usize,
    /// Bearer token required on `/api/*` and `/metrics` when set. Env `CRUCIBLE_API_TOKEN`.
    pub api_token: Option<String>,
    /// File whose first line is the API token (keeps the secret out of this file).
    pub api_token_file: Option<PathBuf>,
    /// Name of this node in events; generated once and kept in the store when unset.
    pub node_id: Option<String>,
    /// `auto`, `human`, `json` or `journald`.
    pub log_format: LogFormat,
    /// Default log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log_level: String,
    /// Seconds to let running evaluations finish at shutdown before they are killed and
    /// recorded as `failed` with `failure_reason = "interrupted"`. Keep it below systemd's
    /// `TimeoutStopSec`.
    pub shutdown_grace_secs: u64,
    /// Start with the queue paused (submissions are accepted, nothing is started).
    pub start_paused: bool,
    /// HTTP limits.
    pub http: HttpConfig,
    /// Per-evaluation limits.
    pub limits: Limits,
    /// The embedded sled store.
    pub store: StoreConfig,
    /// Outbox relays, retention and dead letters.
    pub outbox: OutboxConfig,
    /// Sandbox executor settings.
    pub sandbox: SandboxConfig,
    /// Languages by name (`python`, `sh`, ...).
    pub languages: BTreeMap<String, Language>,
    /// Event sinks fed by the outbox.
    pub sinks: SinksConfig,
    /// Redis: delivery of every event (PUBLISH + XADD) and request/reply.
    pub redis: RedisConfig,
    /// PostgreSQL: a queryable copy of every evaluation and event.
    pub postgres: PostgresConfig,
    /// The Docker executor (`executor = "docker"`).
    pub docker: DockerConfig,
    /// Test cases, compilation and the compile cache.
    pub judge: JudgeConfig,
    /// The file this configuration was loaded from (re-read on reload); not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[judge]`: test cases, compiled languages and the compile cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeConfig {
    /// Most test cases per evaluation.
    pub max_tests: usize,
    /// Most the tests' timeouts of one evaluation may add up to, in seconds.
    pub max_eval_secs: f64,
    /// Bytes of each test's stdout and stderr kept in the record (the comparison uses the
    /// whole output up to `max_output_bytes`).
    pub test_output_bytes: usize,
    /// Bytes the compile cache may hold on disk (least recently used entries go first).
    pub compile_cache_mb: u64,
    /// Size of the build directory a compile step writes (its output, given to runs).
    pub build_mb: u64,
    /// Size of the compile step's private /tmp (Go keeps its build cache there).
    pub compile_tmp_mb: u64,
    /// Most source files beside `code`.
    pub max_files: usize,
    /// Most command-line arguments.
    pub max_args: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            max_tests: 100,
            max_eval_secs: 600.0,
            test_output_bytes: 4096,
            compile_cache_mb: 256,
            build_mb: 64,
            compile_tmp_mb: 512,
            max_files: 32,
            max_args: 64,
        }
    }
}

/// `[docker]`: one hardened container per evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Engine address: `unix:///var/run/docker.sock` or `tcp://127.0.0.1:2375` (a socket
    /// proxy). Env `DOCKER_HOST` overrides it. Empty: the engine's default socket.
    pub host: String,
    /// `uid:gid` the code runs as inside the container (never root).
    pub user: String,
    /// CPU quota per evaluation, in CPUs.
    pub cpus: f64,
    /// Pull an allow-listed image that is missing (when the engine can reach a registry).
    pub pull: bool,
    /// Containers kept created and ready per language, so an evaluation skips the create
    /// step. A container is never used twice. 0 turns the pool off.
    pub warm_pool: usize,
    /// Attempts to create a container when the engine answers with a transient error.
    pub create_attempts: u32,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: String::new(),
            user: "65534:65534".into(),
            cpus: 1.0,
            pull: true,
            warm_pool: 0,
            create_attempts: 3,
        }
    }
}

/// `[postgres]`. Enabled when `url` is set (env `DATABASE_URL`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db` (or key=value form). Env `DATABASE_URL`
    /// overrides it ("" disables). No TLS in this build: use a local or tunnelled server.
    pub url: Option<String>,
}

/// `[redis]`. Enabled when `url` is set (env `REDIS_URL`); without it nothing talks to Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`. Env `REDIS_URL` overrides it ("" disables).
    pub url: Option<String>,
    /// Stream every event is added to (XADD), for consumers that must not miss one.
    pub stream: String,
    /// Approximate cap of the stream (`XADD ... MAXLEN ~ N`).
    pub stream_maxlen: u64,
    /// Also PUBLISH each event on its seed channel (`evaluation:queued`, ...).
    pub publish: bool,
    /// What each PUBLISH carries: `envelope` (the event: `event_id`, `seq`, `type`, ...,
    /// the record under `data`) or `seed` (the seed platform's flat message, for its
    /// existing consumers; `evaluation:started` is then also published on
    /// `evaluation:running`). The stream always carries the envelope.
    pub payload: RedisPayload,
    /// Channel of the request/reply responder; "" turns the responder off.
    pub request_channel: String,
    /// Requests handled at once; more wait (and may be dropped by the subscriber buffer).
    pub max_inflight_requests: usize,
    /// Messages the subscriber buffers for the responder; beyond it they are dropped
    /// (counted in `crucible_redis_requests_dropped_total`).
    pub subscriber_buffer: usize,
}

/// The shape of the messages PUBLISHed on the seed channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisPayload {
    /// The event as it is everywhere else (the record under `data`).
    #[default]
    Envelope,
    /// The record's fields at the top level (`eval_id`, `status`, `code`, `output`,
    /// `error`, `exit_code`, ...), as the seed platform's storage worker reads them.
    Seed,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            stream: "crucible:events".into(),
            stream_maxlen: 1_000_000,
            publish: true,
            payload: RedisPayload::Envelope,
            request_channel: "crucible.request".into(),
            max_inflight_requests: 64,
            subscriber_buffer: 4096,
        }
    }
}

/// HTTP server limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Connections served at once; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Memory budget for request bodies being read or processed at once, in MiB; a request
    /// waits for its share before its body is read (back-pressure instead of growth).
    pub max_inflight_body_mb: u64,
    /// Seconds between keep-alive comments on `/api/events` streams.
    pub sse_keepalive_secs: u64,
    /// Seconds a client has to send a request's headers (slowloris); the connection is
    /// closed after that.
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a whole request body (408 after that).
    pub body_timeout_secs: u64,
}

/// Limits applied to every evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest `code` in bytes (422 beyond it).
    pub max_code_bytes: usize,
    /// Largest `stdin` in bytes (422 beyond it).
    pub max_stdin_bytes: usize,
    /// Largest serialized `metadata` object in bytes (422 beyond it).
    pub max_metadata_bytes: usize,
    /// Wall-clock timeout in seconds when a request gives none.
    pub default_timeout_secs: f64,
    /// Largest accepted `timeout` in seconds (422 beyond it).
    pub max_timeout_secs: f64,
    /// Bytes of stdout and of stderr kept per evaluation; the rest is read and dropped,
    /// and `output_truncated` is set.
    pub max_output_bytes: usize,
    /// Memory (memory + swap) of an evaluation's whole process tree, in MiB: its cgroup's
    /// limit (the Docker container's). The default, and the most a request may ask for;
    /// `[languages.X] memory_mb` overrides it for one language.
    pub memory_mb: u64,
    /// CPU time (user + system) of an evaluation's whole process tree, in milliseconds:
    /// the default and the most a request may ask for (`limits.cpu_ms`).
    pub max_cpu_ms: u64,
    /// Processes (and threads) an evaluation's whole tree may have at once (its cgroup's
    /// pids limit; also RLIMIT_NPROC). The default and the most a request may ask for.
    pub max_processes: u64,
    /// Largest file the evaluation may write, in MiB (RLIMIT_FSIZE).
    pub max_file_mb: u64,
    /// Size of the private writable /tmp, in MiB.
    pub tmp_mb: u64,
    /// Open files per process (RLIMIT_NOFILE).
    pub max_open_files: u64,
    /// The longest a read with `?wait=` is held, in seconds (longer asks are cut to it).
    pub max_wait_secs: u64,
}

/// The sled store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled page-cache cap in MiB (sled's own default is 1 GiB: too much for a 1 GB box).
    pub cache_mb: u64,
    /// Group-commit window in microseconds: after the first pending write arrives, the
    /// writer waits this long for more before one flush covers them all. 0 = flush as soon
    /// as the channel is drained (concurrent writers still share flushes).
    pub flush_window_us: u64,
    /// Most writes applied and flushed as one batch.
    pub max_batch: usize,
    /// Free space (MiB) the data dir's filesystem must keep. Below it new submissions
    /// (HTTP and Redis request/reply) are refused with 507 `insufficient_storage` and no
    /// new run is started, while running evaluations still record their results and sinks
    /// still advance. Work resumes by itself once space is back. 0 turns the reserve off.
    pub min_free_mb: u64,
    /// Terminal evaluations (completed, failed, cancelled) older than this many seconds
    /// are removed (record, status index, idempotency key), but only once every sink has
    /// delivered all their events. 0 keeps them forever.
    pub retain_evaluations_secs: u64,
    /// At most this many evaluations are kept: beyond it the oldest terminal ones are
    /// removed first (same conditions as above). 0: no limit.
    pub max_evaluations: u64,
}

/// Outbox relays.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Events read and delivered per relay round.
    pub batch_size: usize,
    /// Keep delivered events this many seconds for replay and `Last-Event-ID` resumption.
    pub retain_secs: u64,
    /// Seconds between pruning rounds.
    pub prune_interval_secs: u64,
    /// Failed attempts on the same event before it moves to the dead-letter list.
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubles each failure, with jitter).
    pub backoff_initial_ms: u64,
    /// Retry delay cap in milliseconds.
    pub backoff_max_ms: u64,
    /// Relays also poll this often (milliseconds) in case a wake-up was missed.
    pub poll_interval_ms: u64,
}

/// The largest `[limits] max_wait_secs`: an hour.
pub const MAX_WAIT_SECS: u64 = 3600;

/// Sandbox executor settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Host uid the sandboxed code runs as when crucible itself runs as root.
    pub uid: u32,
    /// Host gid the sandboxed code runs as when crucible itself runs as root.
    pub gid: u32,
    /// Host directories mounted read-only at the same path (missing ones are skipped).
    pub ro_dirs: Vec<String>,
    /// Files or directories under /etc exposed read-only (secrets in /etc never are).
    pub etc_files: Vec<String>,
    /// `PATH` inside the sandbox.
    pub path: String,
    /// Work area for sandbox roots; default `<data_dir>/sandbox`.
    pub work_dir: Option<PathBuf>,
    /// CPU quota per evaluation, in CPUs (its cgroup's cpu.max / cfs quota).
    pub cpus: f64,
    /// Refuse to start when no cgroup can be had for the runs (instead of running with
    /// per-process rlimits and a memory watchdog, loudly). The .deb's config sets it.
    pub require_cgroup: bool,
    /// Install the syscall filter in every run (README, "Sandbox"). Turn off only to debug
    /// a program the filter stops; every other protection stays.
    pub seccomp: bool,
    /// Sandboxes prepared ahead of their run (namespaces, root, cgroup), each used once:
    /// a run takes a ready one and only its files and limits are put in place. Default
    /// (unset): one per worker. 0 prepares every sandbox when its run starts.
    pub pool: Option<usize>,
}

/// One language: how the sandbox compiles and runs it and which image the Docker
/// backend uses. In commands, `{file}` is the main file (`/code/<file>`), `{sources}` every
/// submitted file with the main file's extension (one argument each), `{memory_mb}` the
/// run's memory limit; compiled programs are written to, and run from, `/build`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Language {
    /// How a program runs: the program and its arguments (`command` is accepted too).
    #[serde(alias = "command")]
    pub run: Vec<String>,
    /// How a program compiles into `/build` (compiled languages only).
    #[serde(default)]
    pub compile: Option<Vec<String>>,
    /// A command whose first line of output is the toolchain's version (`/api/languages`).
    #[serde(default)]
    pub version: Option<Vec<String>>,
    /// Name of the main file inside the sandbox.
    #[serde(default = "default_file_name")]
    pub file: String,
    /// The Docker backend's allow-listed image for this language.
    #[serde(default)]
    pub image: Option<String>,
    /// Debian package that provides the toolchain (named when it is missing).
    #[serde(default)]
    pub package: Option<String>,
    /// This language's memory limit in MiB, instead of `[limits] memory_mb` (the JVM
    /// needs more).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// This language's process limit, instead of `[limits] max_processes`.
    #[serde(default)]
    pub max_processes: Option<u64>,
    /// Wall-clock time the compile step may take, in seconds (default 30).
    #[serde(default)]
    pub compile_timeout_secs: Option<f64>,
    /// Memory of the compile step, in MiB (default 512; its /tmp counts too).
    #[serde(default)]
    pub compile_memory_mb: Option<u64>,
    /// Extra environment (`NAME=value`) for the compile step and the runs.
    #[serde(default)]
    pub env: Vec<String>,
}

impl Language {
    /// Whether programs are compiled first.
    pub fn compiled(&self) -> bool {
        self.compile.is_some()
    }

    fn builtin(file: &str, run: &[&str], package: &str, image: &str) -> Language {
        Language {
            run: run.iter().map(|s| s.to_string()).collect(),
            compile: None,
            version: None,
            file: file.into(),
            image: Some(image.into()),
            package: Some(package.into()),
            memory_mb: None,
            max_processes: None,
            compile_timeout_secs: None,
            compile_memory_mb: None,
            env: Vec::new(),
        }
    }

    fn compiled_with(mut self, compile: &[&str]) -> Language {
        self.compile = Some(compile.iter().map(|s| s.to_string()).collect());
        self
    }

    fn version_from(mut self, cmd: &[&str]) -> Language {
        self.version = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }
}

/// A `[languages.NAME]` table as written in the file: every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanguagePatch {
    #[serde(alias = "command")]
    run: Option<Vec<String>>,
    compile: Option<Vec<String>>,
    version: Option<Vec<String>>,
    file: Option<String>,
    image: Option<String>,
    package: Option<String>,
    memory_mb: Option<u64>,
    max_processes: Option<u64>,
    compile_timeout_secs: Option<f64>,
    compile_memory_mb: Option<u64>,
    env: Option<Vec<String>>,
    enabled: Option<bool>,
}

/// The built-in languages, each enabled when its toolchain is on the host.
fn builtin_languages() -> BTreeMap<String, Language> {
    let mut m = BTreeMap::new();
    let mut add = |name: &str, l: Language| {
        m.insert(name.to_string(), l);
    };
    add(
        "python",
        Language::builtin(
            "main.py",
            &["python3", "-E", "-s", "-B", "{file}"],
            "python3",
            "python:3.12-slim",
        )
        .version_from(&["python3", "--version"]),
    );
    add(
        "sh",
        Language::builtin("main.sh", &["sh", "{file}"], "dash", "busybox:stable").version_from(&[
            "sh",
            "-c",
            "readlink -f /bin/sh",
        ]),
    );
    add(
        "c",
        Language::builtin("main.c", &["/build/main"], "gcc", "gcc:12")
            .compiled_with(&[
                "gcc",
                "-O2",
                "-pipe",
                "-std=gnu17",
                "-o",
                "/build/main",
                "{sources}",
                "-lm",
            ])
            .version_from(&["gcc", "-dumpfullversion"]),
    );
    add(
        "cpp",
        Language::builtin("main.cpp", &["/build/main"], "g++", "gcc:12")
            .compiled_with(&[
                "g++",
                "-O2",
                "-pipe",
                "-std=gnu++17",
                "-o",
                "/build/main",
                "{sources}",
            ])
            .version_from(&["g++", "-dumpfullversion"]),
    );
    add(
        "javascript",
        Language::builtin("main.js", &["node", "{file}"], "nodejs", "node:20-slim")
            .version_from(&["node", "--version"]),
    );
    let mut java = Language::builtin(
        "Main.java",
        &[
            "java",
            "-XX:MaxRAM={memory_mb}m",
            "-XX:MaxRAMPercentage=100",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            "/build",
            "Main",
        ],
        "default-jdk-headless",
        "eclipse-temurin:17",
    )
    .compiled_with(&[
        "javac",
        "-J-XX:MaxRAM={memory_mb}m",
        "-J-XX:+UseSerialGC",
        "-J-XX:TieredStopAtLevel=1",
        "-encoding",
        "UTF-8",
        "-d",
        "/build",
        "{sources}",
    ])
    .version_from(&["java", "-version"]);
    java.memory_mb = Some(512);
    java.max_processes = Some(128);
    java.compile_memory_mb = Some(1024);
    add("java", java);
    let mut go = Language::builtin("main.go", &["/build/main"], "golang-go", "golang:1.19")
        .compiled_with(&["go", "build", "-o", "/build/main", "{file}"])
        .version_from(&["go", "version"]);
    go.env = vec![
        "GOCACHE=/tmp/go-cache".into(),
        "GOPATH=/tmp/go".into(),
        "GO111MODULE=off".into(),
        "CGO_ENABLED=0".into(),
    ];
    go.compile_memory_mb = Some(1024);
    go.compile_timeout_secs = Some(120.0);
    add("go", go);
    let mut rust = Language::builtin("main.rs", &["/build/main"], "rustc", "rust:1-slim")
        .compiled_with(&["rustc", "-O", "-o", "/build/main", "{file}"])
        .version_from(&["rustc", "--version"]);
    rust.compile_memory_mb = Some(1024);
    rust.compile_timeout_secs = Some(60.0);
    add("rust", rust);
    m
}

fn default_file_name() -> String {
    "main".to_string()
}

/// Event sinks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// Append-only JSON-lines file: one event per line, fsynced before the cursor moves.
    pub file: Option<FileSinkConfig>,
}

/// `[sinks.file]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Path of the JSON-lines file (created if missing).
    pub path: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        let languages = builtin_languages();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./crucible-data"),
            backup_dir: None,
            executor: ExecutorKind::Sandbox,
            workers: 2,
            max_queued: 10_000,
            api_token: None,
            api_token_file: None,
            node_id: None,
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            shutdown_grace_secs: 10,
            start_paused: false,
            http: HttpConfig::default(),
            limits: Limits::default(),
            store: StoreConfig::default(),
            outbox: OutboxConfig::default(),
            sandbox: SandboxConfig::default(),
            languages,
            sinks: SinksConfig::default(),
            redis: RedisConfig::default(),
            postgres: PostgresConfig::default(),
            docker: DockerConfig::default(),
            judge: JudgeConfig::default(),
            source: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_connections: 1024,
            max_inflight_body_mb: 64,
            sse_keepalive_secs: 15,
            header_timeout_secs: 5,
            body_timeout_secs: 30,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_code_bytes: 512 * 1024,
            max_stdin_bytes: 256 * 1024,
            max_metadata_bytes: 16 * 1024,
            default_timeout_secs: 10.0,
            max_timeout_secs: 300.0,
            max_output_bytes: 256 * 1024,
            memory_mb: 256,
            max_cpu_ms: 60_000,
            max_processes: 64,
            max_file_mb: 16,
            tmp_mb: 16,
            max_open_files: 256,
            max_wait_secs: 60,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_mb: 16,
            flush_window_us: 0,
            max_batch: 256,
            min_free_mb: 128,
            retain_evaluations_secs: 0,
            max_evaluations: 0,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            retain_secs: 24 * 3600,
            prune_interval_secs: 60,
            max_attempts: 5,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            poll_interval_ms: 1000,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            uid: 65534,
            gid: 65534,
            ro_dirs: ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            etc_files: [
                "alternatives",
                "ld.so.cache",
                "ld.so.conf",
                "ld.so.conf.d",
                "localtime",
                "mime.types",
                "python3",
                "python3.11",
                // The JVM's own configuration (security properties; no secrets).
                "java-17-openjdk",
                "java-21-openjdk",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            work_dir: None,
            cpus: 1.0,
            require_cgroup: false,
            seccomp: true,
            pool: None,
        }
    }
}

/// Command-line overrides (highest precedence).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Load the file (if any), apply the environment and the flags, then validate.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_with_env(path, overrides, &env)
    }

    /// Same as [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        cfg.source = path.map(|p| p.to_path_buf());
        cfg.apply_env(env)?;
        if let Some(l) = overrides.listen {
            cfg.listen = l;
        }
        if let Some(d) = &overrides.data_dir {
            cfg.data_dir = d.clone();
        }
        cfg.resolve_token_file()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a TOML file on top of the embedded defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parse TOML text on top of the embedded defaults. Each `[languages.NAME]` table is
    /// merged key by key onto the built-in entry of that name (so `image = "..."` alone is
    /// enough to change the Docker image of `python`); `enabled = false` removes a language.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let langs = root.remove("languages");
        let mut cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        let mut merged = builtin_languages();
        if let Some(langs) = langs {
            let table = match langs {
                toml::Value::Table(t) => t,
                _ => return Err("`languages` must be a table of [languages.NAME]".into()),
            };
            for (name, entry) in table {
                let patch: LanguagePatch = entry
                    .try_into()
                    .map_err(|e: toml::de::Error| format!("languages.{name}: {e}"))?;
                if patch.enabled == Some(false) {
                    merged.remove(&name);
                    continue;
                }
                let mut lang = merged.remove(&name).unwrap_or(Language {
                    run: Vec::new(),
                    compile: None,
                    version: None,
                    file: default_file_name(),
                    image: None,
                    package: None,
                    memory_mb: None,
                    max_processes: None,
                    compile_timeout_secs: None,
                    compile_memory_mb: None,
                    env: Vec::new(),
                });
                let LanguagePatch {
                    run,
                    compile,
                    version,
                    file,
                    image,
                    package,
                    memory_mb,
                    max_processes,
                    compile_timeout_secs,
                    compile_memory_mb,
                    env,
                    enabled: _,
                } = patch;
                lang.run = run.unwrap_or(lang.run);
                lang.compile = compile.or(lang.compile);
                lang.version = version.or(lang.version);
                lang.file = file.unwrap_or(lang.file);
                lang.image = image.or(lang.image);
                lang.package = package.or(lang.package);
                lang.memory_mb = memory_mb.or(lang.memory_mb);
                lang.max_processes = max_processes.or(lang.max_processes);
                lang.compile_timeout_secs = compile_timeout_secs.or(lang.compile_timeout_secs);
                lang.compile_memory_mb = compile_memory_mb.or(lang.compile_memory_mb);
                lang.env = env.unwrap_or(lang.env);
                merged.insert(name, lang);
            }
        }
        cfg.languages = merged;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        if let Some(v) = env.get("CRUCIBLE_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|e| invalid("CRUCIBLE_LISTEN", format!("`{v}` is not an address: {e}")))?;
        }
        if let Some(v) = env.get("CRUCIBLE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env.get("CRUCIBLE_EXECUTOR") {
            self.executor = v
                .parse()
                .map_err(|e: String| invalid("CRUCIBLE_EXECUTOR", e))?;
        }
        if let Some(v) = env.get("DOCKER_HOST") {
            self.docker.host = v.clone();
        }
        if let Some(v) = env.get("DATABASE_URL") {
            self.postgres.url = if v.is_empty() { None } else { Some(v.clone()) };
        }
        if let Some(v) = env.get("REDIS_URL") {
            self.redis.url = if v.is_empty() { None } else { Some(v.clone()) };
        }
        if let Some(v) = env.get("CRUCIBLE_API_TOKEN") {
            self.api_token = if v.is_empty() { None } else { Some(v.clone()) };
        }
        Ok(())
    }

    fn resolve_token_file(&mut self) -> Result<(), ConfigError> {
        if self.api_token.is_some() {
            return Ok(());
        }
        if let Some(p) = &self.api_token_file {
            let text = std::fs::read_to_string(p).map_err(|e| {
                invalid(
                    "api_token_file",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                return Err(invalid(
                    "api_token_file",
                    format!("{} is empty", p.display()),
                ));
            }
            self.api_token = Some(token);
        }
        Ok(())
    }

    /// Check every value; the message names the key and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.executor == ExecutorKind::Docker {
            let d = &self.docker;
            let user_ok = d.user.split_once(':').is_some_and(|(u, g)| {
                u.parse::<u32>().is_ok_and(|u| u != 0) && g.parse::<u32>().is_ok()
            });
            if !user_ok {
                return Err(invalid(
                    "docker.user",
                    "must be numeric `uid:gid` with a uid other than 0",
                ));
            }
            if !(d.cpus.is_finite() && d.cpus > 0.0 && d.cpus <= 64.0) {
                return Err(invalid("docker.cpus", "must be above 0 and at most 64"));
            }
            if d.warm_pool > 16 {
                return Err(invalid(
                    "docker.warm_pool",
                    "must be at most 16 per language",
                ));
            }
            if d.create_attempts == 0 {
                return Err(invalid("docker.create_attempts", "must be at least 1"));
            }
            if !(d.host.is_empty()
                || d.host.starts_with("unix://")
                || d.host.starts_with("tcp://")
                || d.host.starts_with("http://"))
            {
                return Err(invalid(
                    "docker.host",
                    "must be unix:///path or tcp://host:port (TLS is not part of this build)",
                ));
            }
            for (name, lang) in &self.languages {
                if lang.image.as_deref().unwrap_or("").is_empty() {
                    return Err(invalid(
                        &format!("languages.{name}.image"),
                        "the docker executor needs an image for every language",
                    ));
                }
            }
        }
        if self.workers == 0 || self.workers > 256 {
            return Err(invalid("workers", "must be between 1 and 256"));
        }
        if self.max_queued == 0 {
            return Err(invalid("max_queued", "must be at least 1"));
        }
        if let Some(t) = &self.api_token {
            if t.trim().is_empty() || t.len() > 4096 {
                return Err(invalid(
                    "api_token",
                    "must be 1 to 4096 non-blank characters",
                ));
            }
        }
        if let Some(n) = &self.node_id {
            if n.is_empty() || n.len() > 64 || !n.chars().all(is_name_char) {
                return Err(invalid(
                    "node_id",
                    "must be 1 to 64 characters of [A-Za-z0-9._-]",
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self
            .backup_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("backup_dir", "must not be empty"));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(invalid("http.max_body_bytes", "must be at least 1024"));
        }
        if (self.http.max_inflight_body_mb as usize).saturating_mul(1024 * 1024)
            < self.http.max_body_bytes
        {
            return Err(invalid(
                "http.max_inflight_body_mb",
                "must hold at least one body of http.max_body_bytes",
            ));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if self.http.sse_keepalive_secs == 0 {
            return Err(invalid("http.sse_keepalive_secs", "must be at least 1"));
        }
        if !(1..=600).contains(&self.http.header_timeout_secs) {
            return Err(invalid(
                "http.header_timeout_secs",
                "must be between 1 and 600",
            ));
        }
        if !(1..=3600).contains(&self.http.body_timeout_secs) {
            return Err(invalid(
                "http.body_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        let l = &self.limits;
        if l.max_code_bytes == 0 || l.max_code_bytes > self.http.max_body_bytes {
            return Err(invalid(
                "limits.max_code_bytes",
                "must be at least 1 and at most http.max_body_bytes",
            ));
        }
        if !(l.max_timeout_secs.is_finite()
            && l.max_timeout_secs >= 1.0
            && l.max_timeout_secs <= 86_400.0)
        {
            return Err(invalid(
                "limits.max_timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        if !(l.default_timeout_secs.is_finite()
            && l.default_timeout_secs > 0.0
            && l.default_timeout_secs <= l.max_timeout_secs)
        {
            return Err(invalid(
                "limits.default_timeout_secs",
                "must be above 0 and at most limits.max_timeout_secs",
            ));
        }
        if l.max_output_bytes < 64 {
            return Err(invalid("limits.max_output_bytes", "must be at least 64"));
        }
        if l.memory_mb < 16 {
            return Err(invalid("limits.memory_mb", "must be at least 16"));
        }
        if l.max_processes == 0 {
            return Err(invalid("limits.max_processes", "must be at least 1"));
        }
        if l.max_cpu_ms < 10 {
            return Err(invalid("limits.max_cpu_ms", "must be at least 10"));
        }
        if !(self.sandbox.cpus.is_finite()
            && self.sandbox.cpus >= 0.01
            && self.sandbox.cpus <= 256.0)
        {
            return Err(invalid("sandbox.cpus", "must be between 0.01 and 256"));
        }
        if self.sandbox.pool.is_some_and(|n| n > 64) {
            return Err(invalid("sandbox.pool", "must be between 0 and 64"));
        }
        if l.tmp_mb == 0 || l.max_file_mb == 0 {
            return Err(invalid(
                "limits.tmp_mb",
                "tmp_mb and max_file_mb must be at least 1",
            ));
        }
        if l.max_wait_secs > MAX_WAIT_SECS {
            return Err(invalid("limits.max_wait_secs", "must be at most 3600"));
        }
        if l.max_open_files < 16 {
            return Err(invalid("limits.max_open_files", "must be at least 16"));
        }
        if self.store.cache_mb < 4 {
            return Err(invalid("store.cache_mb", "must be at least 4"));
        }
        if self.store.max_batch == 0 {
            return Err(invalid("store.max_batch", "must be at least 1"));
        }
        if self.store.flush_window_us > 100_000 {
            return Err(invalid(
                "store.flush_window_us",
                "must be at most 100000 (0.1 s)",
            ));
        }
        let o = &self.outbox;
        if o.batch_size == 0 || o.batch_size > 10_000 {
            return Err(invalid("outbox.batch_size", "must be between 1 and 10000"));
        }
        if o.max_attempts == 0 {
            return Err(invalid("outbox.max_attempts", "must be at least 1"));
        }
        if o.backoff_initial_ms == 0 || o.backoff_max_ms < o.backoff_initial_ms {
            return Err(invalid(
                "outbox.backoff_max_ms",
                "backoff_initial_ms must be >= 1 and backoff_max_ms >= backoff_initial_ms",
            ));
        }
        if o.poll_interval_ms == 0 || o.prune_interval_secs == 0 {
            return Err(invalid(
                "outbox.poll_interval_ms",
                "poll_interval_ms and prune_interval_secs must be at least 1",
            ));
        }
        let j = &self.judge;
        if j.max_tests == 0 || j.max_tests > 10_000 {
            return Err(invalid("judge.max_tests", "must be between 1 and 10000"));
        }
        if !(j.max_eval_secs.is_finite() && j.max_eval_secs >= 1.0) {
            return Err(invalid("judge.max_eval_secs", "must be at least 1"));
        }
        if j.test_output_bytes < 64 {
            return Err(invalid("judge.test_output_bytes", "must be at least 64"));
        }
        if j.build_mb == 0 || j.compile_tmp_mb == 0 {
            return Err(invalid(
                "judge.build_mb",
                "build_mb and compile_tmp_mb must be at least 1",
            ));
        }
        if j.compile_cache_mb < j.build_mb {
            return Err(invalid(
                "judge.compile_cache_mb",
                "must hold at least one build (judge.build_mb)",
            ));
        }
        if self.languages.is_empty() {
            return Err(invalid("languages", "at least one language is required"));
        }
        for (name, lang) in &self.languages {
            let key = format!("languages.{name}");
            if name.is_empty() || name.len() > 32 || !name.chars().all(is_name_char) {
                return Err(invalid(
                    &key,
                    "language names are 1 to 32 characters of [A-Za-z0-9._-]",
                ));
            }
            if lang.run.is_empty() || lang.run[0].is_empty() {
                return Err(invalid(&format!("{key}.run"), "must name a program"));
            }
            if lang
                .compile
                .as_ref()
                .is_some_and(|c| c.is_empty() || c[0].is_empty())
            {
                return Err(invalid(&format!("{key}.compile"), "must name a program"));
            }
            if lang
                .compile_timeout_secs
                .is_some_and(|t| !(t.is_finite() && t > 0.0 && t <= 3600.0))
            {
                return Err(invalid(
                    &format!("{key}.compile_timeout_secs"),
                    "must be above 0 and at most 3600",
                ));
            }
            if lang.compile_memory_mb.is_some_and(|m| m < 16) {
                return Err(invalid(
                    &format!("{key}.compile_memory_mb"),
                    "must be at least 16",
                ));
            }
            if lang
                .env
                .iter()
                .any(|e| !e.contains('=') || e.starts_with('='))
            {
                return Err(invalid(&format!("{key}.env"), "entries are NAME=value"));
            }
            if lang.memory_mb.is_some_and(|m| m < 16) {
                return Err(invalid(&format!("{key}.memory_mb"), "must be at least 16"));
            }
            if lang.max_processes == Some(0) {
                return Err(invalid(
                    &format!("{key}.max_processes"),
                    "must be at least 1",
                ));
            }
            if lang.file.is_empty()
                || lang.file.len() > 64
                || !lang.file.chars().all(is_name_char)
                || lang.file.starts_with('.')
            {
                return Err(invalid(
                    &format!("{key}.file"),
                    "must be a plain file name of [A-Za-z0-9._-]",
                ));
            }
        }
        if let Some(f) = &self.sinks.file {
            if f.path.as_os_str().is_empty() {
                return Err(invalid("sinks.file.path", "must not be empty"));
            }
        }
        if let Some(u) = &self.redis.url {
            if !(u.starts_with("redis://") || u.starts_with("redis-cluster://")) {
                return Err(invalid(
                    "redis.url",
                    format!("`{u}` must start with redis:// (TLS is not part of this build)"),
                ));
            }
        }
        if let Some(u) = &self.postgres.url {
            if u.parse::<tokio_postgres::Config>().is_err() {
                return Err(invalid(
                    "postgres.url",
                    "is not a PostgreSQL connection string (postgres://user:pass@host:port/db)",
                ));
            }
        }
        if self.redis.stream.is_empty() {
            return Err(invalid("redis.stream", "must not be empty"));
        }
        if self.redis.max_inflight_requests == 0 || self.redis.subscriber_buffer == 0 {
            return Err(invalid(
                "redis.max_inflight_requests",
                "max_inflight_requests and subscriber_buffer must be at least 1",
            ));
        }
        for d in &self.sandbox.ro_dirs {
            if !d.starts_with('/') || d == "/" || d.contains("..") {
                return Err(invalid(
                    "sandbox.ro_dirs",
                    format!("`{d}` must be an absolute path other than /"),
                ));
            }
        }
        for f in &self.sandbox.etc_files {
            if f.is_empty() || f.starts_with('/') || f.contains("..") {
                return Err(invalid(
                    "sandbox.etc_files",
                    format!("`{f}` must be a path relative to /etc"),
                ));
            }
        }
        Ok(())
    }

    /// The most (and the default) an evaluation in `language` may use: `[limits]`, with
    /// the language's own overrides.
    pub fn max_limits(&self, language: &str) -> crate::model::RunLimits {
        let l = &self.limits;
        let lang = self.languages.get(language);
        crate::model::RunLimits {
            memory_mb: lang.and_then(|x| x.memory_mb).unwrap_or(l.memory_mb),
            cpu_ms: l.max_cpu_ms,
            max_processes: lang
                .and_then(|x| x.max_processes)
                .unwrap_or(l.max_processes),
            max_output_bytes: l.max_output_bytes as u64,
        }
    }

    /// Where backups go.
    pub fn backup_dir(&self) -> PathBuf {
        let dir = self
            .backup_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("backups"));
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// Where sandbox roots are created.
    pub fn sandbox_work_dir(&self) -> PathBuf {
        self.sandbox
            .work_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sandbox"))
    }

    /// The configuration as TOML with the token masked (for `check-config` and logs).
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        if c.api_token.is_some() {
            c.api_token = Some("<redacted>".into());
        }
        c.postgres.url = c.postgres.url.map(|u| redact_url(&u));
        c.redis.url = c.redis.url.map(|u| redact_url(&u));
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// `scheme://user:secret@host/...` -> `scheme://user:<redacted>@host/...`; `password=...`
/// in key=value strings too.
pub fn redact_url(u: &str) -> String {
    if let Some((scheme, rest)) = u.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            let user = creds.split(':').next().unwrap_or("");
            if creds.contains(':') {
                return format!("{scheme}://{user}:<redacted>@{host}");
            }
        }
        return u.to_string();
    }
    u.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=<redacted>".to_string()
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_brief() {
        let c = Config::load_with_env(None, &Overrides::default(), &env(&[])).expect("valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./crucible-data"));
        assert_eq!(c.executor, ExecutorKind::Sandbox);
        assert_eq!(c.workers, 2);
        assert_eq!(c.max_queued, 10_000);
        assert!(c.languages.contains_key("python"));
        assert!(c.languages.contains_key("sh"));
    }

    #[test]
    fn precedence_file_then_env_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/from/file\"\nworkers = 3\n[languages.python]\nimage = \"python:3.12-slim\"\ncommand = [\"python3\", \"{file}\"]\nfile = \"main.py\"\n",
        )
        .expect("write");
        let c = Config::load_with_env(Some(&p), &Overrides::default(), &env(&[])).expect("ok");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.workers, 3);
        assert!(
            c.languages.contains_key("sh"),
            "other default languages kept"
        );
        let c = Config::load_with_env(
            Some(&p),
            &Overrides::default(),
            &env(&[
                ("CRUCIBLE_LISTEN", "127.0.0.1:9001"),
                ("CRUCIBLE_DATA_DIR", "/from/env"),
            ]),
        )
        .expect("ok");
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.data_dir, PathBuf::from("/from/env"));
        let o = Overrides {
            listen: Some("127.0.0.1:9002".parse().expect("addr")),
            data_dir: Some("/from/flag".into()),
        };
        let c = Config::load_with_env(Some(&p), &o, &env(&[("CRUCIBLE_LISTEN", "127.0.0.1:9001")]))
            .expect("ok");
        assert_eq!(c.listen.port(), 9002);
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("workers = 0", "workers"),
            ("max_queued = 0", "max_queued"),
            ("[limits]\nmemory_mb = 1", "limits.memory_mb"),
            (
                "[limits]\ndefault_timeout_secs = 1000.0",
                "limits.default_timeout_secs",
            ),
            ("[languages.x]\nrun = []", "languages.x.run"),
            ("[languages.x]\ncommand = []", "languages.x.run"),
            (
                "executor = \"docker\"\n[docker]\nuser = \"0:0\"",
                "docker.user",
            ),
            (
                "executor = \"docker\"\n[docker]\nhost = \"ssh://x\"",
                "docker.host",
            ),
        ] {
            let c = Config::from_toml(text).expect("parses");
            let err = c.validate().expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        // `command` is still accepted for `run` (config files written before `run`).
        let c = Config::from_toml("[languages.py2]\ncommand = [\"python3\", \"{file}\"]")
            .expect("alias");
        assert_eq!(c.languages["py2"].run, vec!["python3", "{file}"]);
        let err = Config::from_toml("wrokers = 2").expect_err("unknown key");
        assert!(err.contains("wrokers"), "{err}");
        let err = Config::load_with_env(
            None,
            &Overrides::default(),
            &env(&[("CRUCIBLE_EXECUTOR", "podman")]),
        )
        .expect_err("bad executor")
        .to_string();
        assert!(err.contains("CRUCIBLE_EXECUTOR"), "{err}");
    }

    #[test]
    fn token_file_and_redaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tf = dir.path().join("token");
        std::fs::write(&tf, "s3cret\n").expect("write");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            format!("api_token_file = {:?}\n", tf.display().to_string()),
        )
        .expect("write");
        let c = Config::load_with_env(Some(&p), &Overrides::default(), &env(&[])).expect("ok");
        assert_eq!(c.api_token.as_deref(), Some("s3cret"));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<redacted>"));
    }
}
