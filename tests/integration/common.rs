//! The test fixture: start the real binary, wait for its health check, talk to it over
//! HTTP, kill it (-9) or stop it (SIGTERM), restart it on the same data directory.
//! Deadlines here only turn a hang into a failure with the server log attached; no test
//! depends on how fast anything is.

#![allow(dead_code)]

use crucible::client::{Client, Reply};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous upper bound for anything to happen; reaching it fails the test.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub client: Client,
    pub addr: String,
    token: Option<String>,
    env: Vec<(String, String)>,
    starts: u32,
    /// Run the server as this (uid, gid) instead of the test's own user.
    user: Option<(u32, u32)>,
    /// Start the server in a session keyring of its own holding a `user` key
    /// `crucible-test` with this secret (what a host secret in the keyring looks like).
    session_key: Option<String>,
}

/// The Docker image of the Docker tests (built by tests/images.sh).
pub fn test_image() -> String {
    std::env::var("CRUCIBLE_TEST_IMAGE").unwrap_or_else(|_| "crucible-test-base:bookworm".into())
}

/// Config for the Docker executor with the test image for both languages.
pub fn docker_config(extra: &str) -> String {
    let img = test_image();
    format!(
        "executor = \"docker\"\n{extra}\n[languages.python]\nimage = \"{img}\"\n[languages.sh]\nimage = \"{img}\"\n"
    )
}

/// The test config: human logs at info level unless `extra` says otherwise.
fn config_text(extra: &str) -> String {
    let mut text = String::new();
    if !extra.contains("log_format") {
        text.push_str("log_format = \"human\"\n");
    }
    if !extra.contains("log_level") {
        text.push_str("log_level = \"info\"\n");
    }
    text.push_str(extra);
    text.push('\n');
    text
}

/// The binary under test: `CRUCIBLE_BIN` (e.g. the static release build from
/// packaging/build.sh), else the one cargo built for this test run.
pub fn bin() -> String {
    std::env::var("CRUCIBLE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_crucible").to_string())
}

impl Server {
    /// A server with the embedded defaults plus `extra_toml`.
    pub async fn start(extra_toml: &str) -> Server {
        Self::start_with(extra_toml, &[]).await
    }

    /// Same, with extra environment variables for the server process.
    pub async fn start_with(extra_toml: &str, env: &[(&str, &str)]) -> Server {
        let mut s = Server::start_deferred(extra_toml);
        s.token = env
            .iter()
            .find(|(k, _)| *k == "CRUCIBLE_API_TOKEN")
            .map(|(_, v)| v.to_string());
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.spawn().await;
        s
    }

    /// A server whose data dir is prepared by `setup` (given its path, created) before
    /// the first start: e.g. a small filesystem mounted there.
    pub async fn start_prepared(extra_toml: &str, setup: impl FnOnce(&Path)) -> Server {
        let mut s = Server::start_deferred(extra_toml);
        std::fs::create_dir_all(s.data_dir()).expect("data dir");
        setup(&s.data_dir());
        s.spawn().await;
        s
    }

    /// A server run as an unprivileged user (`nobody`): no cgroup hierarchy of its own
    /// can be had, as for a `cargo run` by an ordinary user.
    pub async fn start_unprivileged(extra_toml: &str) -> Server {
        let mut s = Server::start_deferred(extra_toml);
        s.user = Some((65534, 65534));
        std::fs::create_dir_all(s.data_dir()).expect("data dir");
        for p in [s.dir.path().to_path_buf(), s.data_dir()] {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).expect("chown");
        }
        s.spawn().await;
        s
    }

    /// A server whose session keyring holds a secret (`user` key `crucible-test`).
    pub async fn start_with_session_key(extra_toml: &str, secret: &str) -> Server {
        let mut s = Server::start_deferred(extra_toml);
        s.session_key = Some(secret.to_string());
        s.spawn().await;
        s
    }

    /// A server with its directory and config written, not started yet.
    fn start_deferred(extra_toml: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("crucible.toml"), config_text(extra_toml))
            .expect("write config");
        Server {
            child: None,
            dir,
            client: Client::new("http://127.0.0.1:1", None).expect("client"),
            addr: String::new(),
            token: None,
            env: Vec::new(),
            starts: 0,
            user: None,
            session_key: None,
        }
    }

    /// Start the server and expect it to refuse: returns its exit status and log.
    pub async fn start_refused(extra_toml: &str, unprivileged: bool) -> (i32, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("crucible.toml"), config_text(extra_toml))
            .expect("write config");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        if unprivileged {
            for p in [dir.path(), data.as_path()] {
                std::os::unix::fs::chown(p, Some(65534), Some(65534)).expect("chown");
            }
        }
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.path().join("crucible.toml"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        if unprivileged {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("run crucible");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code().unwrap_or(-1), log)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    /// Everything the server wrote to stderr (all runs).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.dir.path().join(format!("server-{i}.log"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let addr_file = self.data_dir().join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("crucible.toml"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env_remove("CRUCIBLE_API_TOKEN")
            .env_remove("CRUCIBLE_LISTEN")
            .env_remove("CRUCIBLE_DATA_DIR")
            .env_remove("CRUCIBLE_EXECUTOR")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        if let Some(secret) = &self.session_key {
            join_session_with_key(&mut cmd, secret);
        }
        let mut child = cmd.spawn().expect("spawn crucible");
        let started = Instant::now();
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if a.ends_with('\n') {
                    break a.trim().to_string();
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("crucible exited early with {status}:\n{}", self.log());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "server did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.addr = addr.clone();
        self.client = Client::new(&format!("http://{addr}"), self.token.clone()).expect("client");
        self.child = Some(child);
        loop {
            if let Ok(r) = self.client.get("/health").await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "server not healthy:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        self.wait_exit()
    }

    /// Wait for the server to exit (after SIGTERM, or on its own at a failpoint abort)
    /// and return how.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        let started = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if started.elapsed() > DEADLINE {
                let _ = c.kill();
                panic!("server did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Change an environment variable for the next start (`None` removes it).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Replace the extra config for the next start.
    pub fn set_config(&mut self, extra_toml: &str) {
        std::fs::write(
            self.dir.path().join("crucible.toml"),
            config_text(extra_toml),
        )
        .expect("write config");
    }

    /// Start again on the same data directory and config.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.client.get(path).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.client.post_json(path, body).await.expect("POST")
    }

    /// POST /api/eval with an Idempotency-Key; the error when the server died mid-request.
    pub async fn submit_keyed(
        &self,
        body: &Value,
        key: &str,
    ) -> Result<Reply, crucible::client::ClientError> {
        let bytes = bytes::Bytes::from(body.to_string());
        self.client
            .request(
                http::Method::POST,
                "/api/eval",
                Some(("application/json", bytes)),
                &[("Idempotency-Key", key)],
            )
            .await
    }

    /// Submit and return the eval_id (asserts 202).
    pub async fn submit(&self, body: Value) -> String {
        let r = self.post("/api/eval", &body).await;
        assert_eq!(r.status, 202, "submit failed: {}", r.text());
        let v = r.json().expect("json");
        assert_eq!(v["status"], "queued");
        v["eval_id"].as_str().expect("eval_id").to_string()
    }

    pub async fn record(&self, id: &str) -> Value {
        let r = self.get(&format!("/api/eval/{id}")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), self.log());
        r.json().expect("json")
    }

    /// Poll until the evaluation is terminal and return the record.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_until(id, |r| {
            matches!(
                r["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }

    /// Poll until the evaluation has `status`.
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_until(id, |r| r["status"] == status).await
    }

    async fn wait_until(&self, id: &str, f: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let r = self.record(id).await;
            if f(&r) {
                return r;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "evaluation {id} stuck at {}:\n{}",
                r["status"],
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// GET /health as JSON.
    pub async fn health(&self) -> Value {
        self.get("/health").await.json().expect("health json")
    }

    /// A Prometheus value from /metrics: the sum over the series of `name` whose labels
    /// contain `labels` (e.g. `route="/api/eval/{id}"`; "" for every series), or `None`
    /// when there is no such series.
    pub async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let text = self.get("/metrics").await.text();
        let values: Vec<f64> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (series_labels, value) = match rest.strip_prefix('{') {
                    Some(r) => r.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                series_labels.contains(labels).then_some(value)
            })
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("metric {name}: value `{v}`: {e}"))
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Wait until `sink` has delivered everything up to the durable head; returns it.
    pub async fn wait_sink_caught_up(&self, sink: &str) -> u64 {
        let started = Instant::now();
        loop {
            let h = self.health().await;
            let head = h["store"]["head_seq"].as_u64().unwrap_or(0);
            if h["sinks"][sink]["cursor"].as_u64() == Some(head) {
                return head;
            }
            assert!(started.elapsed() < DEADLINE, "sink {sink} stuck: {h}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every evaluation, all pages of GET /api/evaluations.
    pub async fn all_records(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut path = "/api/evaluations?limit=100".to_string();
        loop {
            let v = self.get(&path).await.json().expect("json");
            out.extend(v["evaluations"].as_array().cloned().unwrap_or_default());
            match v["next_cursor"].as_str() {
                Some(c) => path = format!("/api/evaluations?limit=100&cursor={c}"),
                None => return out,
            }
        }
    }

    /// Run one evaluation to its end.
    pub async fn run(&self, body: Value) -> Value {
        let id = self.submit(body).await;
        self.wait_terminal(&id).await
    }

    /// Run Python code with a timeout.
    pub async fn run_py(&self, code: &str, timeout: f64) -> Value {
        self.run(json!({"code": code, "language": "python", "timeout": timeout}))
            .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Make `cmd` start in a new session keyring holding a `user` key `crucible-test` with
/// `secret` (only async-signal-safe syscalls between fork and exec).
pub fn join_session_with_key(cmd: &mut Command, secret: &str) {
    use std::os::unix::process::CommandExt;
    let payload = secret.as_bytes().to_vec();
    // SAFETY: only raw syscalls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let name = c"crucible-test-session";
            if libc::syscall(libc::SYS_keyctl, 1, name.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c"crucible-test".as_ptr(),
                payload.as_ptr(),
                payload.len(),
                -3i64,
            );
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The sum of `size` over the files under `p` (directories walked, links not followed).
fn dir_sum(p: &Path, size: &dyn Fn(&std::fs::Metadata) -> u64) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                total += dir_sum(&e.path(), size);
            } else if let Ok(m) = e.metadata() {
                total += size(&m);
            }
        }
    }
    total
}

/// Apparent size of the files under `p`, in bytes.
pub fn dir_size(p: &Path) -> u64 {
    dir_sum(p, &|m| m.len())
}

/// Blocks allocated to the files under `p` (what `du` counts), in bytes.
pub fn dir_allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    dir_sum(p, &|m| m.blocks() * 512)
}

/// The names in a directory (none when it is missing).
pub fn dir_entries(dir: &Path) -> std::collections::HashSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Lines of a JSON-lines file, parsed; torn or blank lines are errors.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// A throwaway redis-server on a loopback port, with its own directory. AOF with
/// `appendfsync always`, so whatever Redis acknowledged survives a kill -9 and restart.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// AOF with fsync on every write (tests); off for benchmarks.
    durable: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port(), true)
    }

    /// Without persistence, on `port` (benchmarks: the same setup as redis-benchmark's).
    pub fn start_volatile(port: u16) -> RedisServer {
        Self::start_on(port, false)
    }

    fn start_on(port: u16, durable: bool) -> RedisServer {
        let mut port = port;
        for _ in 0..20 {
            let mut r = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().expect("tempdir"),
                durable,
            };
            if r.spawn() {
                return r;
            }
            port = free_port();
        }
        panic!("cannot start redis-server");
    }

    /// Start on `self.port`; false if it exited (port taken).
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install the Debian package redis-server; tests/run.sh does)");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok() {
                    if let Ok(n) = s.read(&mut buf) {
                        if buf[..n].starts_with(b"+PONG") {
                            return true;
                        }
                    }
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            assert!(started.elapsed() < DEADLINE, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// PID of redis-server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Send a command line with redis-cli.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and directory (the AOF is replayed).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server could not restart on port {}",
            self.port
        );
    }

    /// A connected fred client.
    pub async fn client(&self) -> fred::prelude::Client {
        use fred::prelude::ClientLike;
        let cfg = fred::prelude::Config::from_url(&self.url()).expect("url");
        let c = fred::prelude::Builder::from_config(cfg)
            .build()
            .expect("client");
        c.init().await.expect("connect to test redis");
        c
    }

    /// Every entry of a stream as (event_id, event JSON).
    pub async fn stream(&self, key: &str) -> Vec<(String, Value)> {
        use fred::prelude::StreamsInterface;
        let c = self.client().await;
        let raw: Vec<(String, std::collections::HashMap<String, String>)> =
            c.xrange(key, "-", "+", None).await.expect("XRANGE");
        raw.into_iter()
            .map(|(_, f)| {
                let id = f.get("event_id").cloned().unwrap_or_default();
                let ev = serde_json::from_str(f.get("event").map(|s| s.as_str()).unwrap_or(""))
                    .expect("event JSON in the stream");
                (id, ev)
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway PostgreSQL cluster on a loopback port with its own data directory
/// (initdb as the `postgres` system user when the tests run as root).
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
    /// Extra `-c name=value` settings.
    settings: Vec<String>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn pg_bin(name: &str) -> String {
    // Debian installs one major version; find whichever is there.
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        versions.sort();
        if let Some(v) = versions.last() {
            return v.join("bin").join(name).to_string_lossy().into_owned();
        }
    }
    format!("{PG_BIN}/{name}")
}

fn as_pg_user(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with(&[])
    }

    /// With extra server settings (`["shared_buffers=64MB", ...]`).
    pub fn start_with(settings: &[&str]) -> PgServer {
        let dir = tempfile::tempdir().expect("tempdir");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(st.success(), "chown the PostgreSQL dir to postgres");
        }
        let data = dir.path().join("data");
        let out = as_pg_user(&pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "crucible", "--no-sync"])
            .output()
            .expect("initdb (install the Debian package postgresql; tests/run.sh does)");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = PgServer {
            port: free_port(),
            dir,
            running: false,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..20 {
            if pg.spawn() {
                return pg;
            }
            pg.port = free_port();
        }
        panic!("cannot start PostgreSQL");
    }

    fn spawn(&mut self) -> bool {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("pg.log");
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        for s in &self.settings {
            opts.push_str(&format!(" -c {s}"));
        }
        let st = as_pg_user(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl");
        self.running = st.success();
        self.running
    }

    pub fn url(&self) -> String {
        format!("postgres://crucible@127.0.0.1:{}/postgres", self.port)
    }

    /// PID of the postmaster.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
    }

    /// Stop at once, as a crash would (no checkpoint).
    pub fn kill(&mut self) {
        if self.running {
            let _ = as_pg_user(&pg_bin("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .status();
            self.running = false;
        }
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "PostgreSQL could not restart on port {}",
            self.port
        );
    }

    /// A connected client.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to test PostgreSQL");
        tokio::spawn(conn);
        c
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// Hostile-code helpers shared by hostile.rs (sandbox) and docker.rs.

/// Python helpers shared by the programs below: `sleeper(marker)` forks a child that
/// becomes `/usr/bin/sleep <marker>` (it never runs the rest of the program);
/// `write(path, size)` answers "ok" or the errno's name; `tmp_limits(res)` records in
/// `res` a write of 3 MiB to /tmp (`big`) and /tmp filled 1 MiB at a time (`fill`).
pub const PRELUDE: &str = r#"
import errno, json, os, socket, sys

def sleeper(marker):
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/usr/bin/sleep", ["sleep", marker])
        finally:
            os._exit(127)
    return pid

def write(path, size):
    try:
        with open(path, "wb") as f:
            f.write(b"x" * size)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def tmp_limits(res):
    res["big"] = write("/tmp/big", 3 << 20)
    os.remove("/tmp/big")
    res["fill"] = "never full"
    for n in range(64):
        r = write("/tmp/fill%d" % n, 1 << 20)
        if r != "ok":
            res["fill"] = r
            break
"#;

/// A program: the prelude, then `body` with each placeholder replaced by its value.
pub fn program(body: &str, vars: &[(&str, &str)]) -> String {
    let body = vars
        .iter()
        .fold(body.to_string(), |b, (k, v)| b.replace(k, v));
    format!("{PRELUDE}\n{body}")
}

/// A sleep duration no other process on the host has in its command line.
pub fn marker(tag: u32) -> String {
    format!("3600.{}{tag:03}", std::process::id())
}

/// Host processes whose command line contains `marker` ("pid: cmdline").
pub fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("read host /proc")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes may exit while we scan; a missing cmdline is simply not a match.
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

/// Fork sleepers until the process limit refuses, print how many, then keep hammering
/// the limit for a while and exit (so the run ends without a race). `MARKER`: see [`marker`].
pub const FORK_BOMB: &str = r#"
forks = 0
while True:
    try:
        sleeper("MARKER")
        forks += 1
    except OSError:
        break
print(forks, flush=True)
for _ in range(2000):
    try:
        sleeper("MARKER")
    except OSError:
        pass
"#;

/// CHILDREN processes of MIB MiB each, every one touched and held at the same time
/// (each far below a per-process limit, together far above the run's allowance). The
/// parent sums what the children report resident and prints `total_rss_kb N`.
pub const MEMORY_HOG: &str = r#"
import time
r, w = os.pipe()
kids = []
for _ in range(CHILDREN):
    pid = os.fork()
    if pid == 0:
        b = bytearray(MIB << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        rss = int(open("/proc/self/statm").read().split()[1]) * 4
        os.write(w, b"%d\n" % rss)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
os.close(w)
total = sum(int(x) for x in os.fdopen(r).read().split())
for k in kids:
    os.waitpid(k, 0)
print("total_rss_kb", total)
"#;

pub fn assert_no_host_process_with(marker: &str) {
    let left = host_processes_with(marker);
    assert!(
        left.is_empty(),
        "sandboxed processes outlived their evaluation: {left:?}"
    );
}
