//! The command line: `serve`, `check-config`, and client commands that talk to a running
//! server (`submit`, `status`, `replay`).

use crate::client::Client;
use crate::config::{Config, Overrides};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Exit code for configuration errors (EX_CONFIG), so systemd does not restart-loop.
pub const EXIT_CONFIG: i32 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "crucible",
    version,
    about = "Self-hosted code-evaluation appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    /// TOML config file (defaults are embedded; env overrides the file; flags override env).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address (env CRUCIBLE_LISTEN).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory (env CRUCIBLE_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// The configuration file of the packaged service, read by the client commands.
pub const SYSTEM_CONFIG: &str = "/etc/crucible/crucible.toml";

#[derive(clap::Args, Debug, Clone)]
struct ServerArgs {
    /// Server URL. Default: CRUCIBLE_URL, else the `listen` address of the server's
    /// configuration (--config, else /etc/crucible/crucible.toml when readable; with
    /// CRUCIBLE_LISTEN over the file), else http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// API token. Default: CRUCIBLE_API_TOKEN, else the configuration's `api_token` or
    /// `api_token_file`.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The server's configuration file, for its address and token (default
    /// /etc/crucible/crucible.toml, when it exists and is readable).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the appliance.
    Serve(ServeArgs),
    /// Validate the configuration and print the effective values (token masked).
    CheckConfig(ServeArgs),
    /// Submit a file for evaluation.
    Submit {
        /// The code file ("-" for stdin).
        file: PathBuf,
        /// Language; default from the extension (.py python, .sh sh, .c c, .cpp/.cc cpp,
        /// .js javascript, .java java, .go go, .rs rust), else python.
        #[arg(long, short)]
        language: Option<String>,
        /// Another source file, placed beside FILE under its own name (repeatable).
        #[arg(long = "file", value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Test cases: a JSON array of {"name"?, "stdin"?, "expected_output"?, "timeout"?}.
        #[arg(long, value_name = "TESTS.json")]
        tests: Option<PathBuf>,
        /// How outputs are compared with expected_output: exact, trimmed, tokens, float.
        #[arg(long)]
        compare: Option<String>,
        /// Arguments for the program (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
        /// Wall-clock timeout in seconds.
        #[arg(long, short)]
        timeout: Option<f64>,
        /// File whose content is the program's stdin.
        #[arg(long, value_name = "FILE")]
        stdin_file: Option<PathBuf>,
        /// Wait for the result and print the record (exit 0 only if it succeeded: completed,
        /// and with tests, every test accepted).
        #[arg(long, short)]
        wait: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print an evaluation record.
    Status {
        /// The eval_id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Ask the running server for a consistent copy of its store in NAME, a directory
    /// inside its backup_dir (default <data_dir>/backups); without NAME: the current time.
    /// Prints where the backup went.
    Backup {
        name: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Read the event stream from Redis.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Move a sink's cursor back so it redelivers events from a seq.
    Replay {
        /// Sink name (e.g. `file`).
        sink: String,
        /// First seq to deliver again.
        #[arg(long)]
        from_seq: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Follow the Redis stream through a consumer group: print each event as one JSON line
    /// and acknowledge it. Entries left unacknowledged by a crash are printed first.
    Tail {
        /// Consumer group.
        #[arg(long, default_value = "crucible-tail")]
        group: String,
        /// Consumer name within the group (default: tail-<hostname>).
        #[arg(long)]
        consumer: Option<String>,
        /// Redis URL (default REDIS_URL, else redis://127.0.0.1:6379).
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Stream key.
        #[arg(long, default_value = "crucible:events")]
        stream: String,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Take over entries other consumers left unacknowledged this long (ms).
        #[arg(long, default_value_t = 60_000)]
        claim_idle_ms: u64,
    },
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(a),
        Command::CheckConfig(a) => match load(&a) {
            Ok(cfg) => {
                print!("{}", cfg.to_redacted_toml());
                0
            }
            Err(code) => code,
        },
        Command::Submit {
            file,
            language,
            files,
            tests,
            compare,
            args,
            timeout,
            stdin_file,
            wait,
            server,
        } => client_cmd(server, move |c| {
            let extra = Extra {
                files,
                tests,
                compare,
                args,
            };
            submit(c, file, language, extra, timeout, stdin_file, wait)
        }),
        Command::Status { id, server } => client_cmd(server, move |c| status(c, id)),
        Command::Replay {
            sink,
            from_seq,
            server,
        } => client_cmd(server, move |c| replay(c, sink, from_seq)),
        Command::Backup { name, server } => client_cmd(server, move |c| backup(c, name)),
        Command::Events {
            command:
                EventsCommand::Tail {
                    group,
                    consumer,
                    redis,
                    stream,
                    count,
                    claim_idle_ms,
                },
        } => {
            let opts = crate::client::tail::TailOptions {
                url: redis
                    .or_else(|| std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()))
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
                stream,
                group,
                consumer: consumer.unwrap_or_else(default_consumer),
                count,
                claim_idle_ms,
            };
            tail(opts)
        }
    }
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("tail-{host}")
}

fn tail(opts: crate::client::tail::TailOptions) -> i32 {
    let rt = match small_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            s.cancel();
        });
        let mut out = std::io::stdout();
        match crate::client::tail::tail(opts, &mut out, stop).await {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("crucible: {e}");
                1
            }
        }
    })
}

fn load(a: &ServeArgs) -> Result<Config, i32> {
    let o = Overrides {
        listen: a.listen,
        data_dir: a.data_dir.clone(),
    };
    Config::load(a.config.as_deref(), &o).map_err(|e| {
        eprintln!("crucible: configuration error: {e}");
        EXIT_CONFIG
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("crucible")
        .build()
        .map_err(|e| {
            eprintln!("crucible: cannot start the runtime: {e}");
            1
        })
}

/// A single-threaded runtime for the client commands.
fn small_runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("crucible: cannot start the runtime: {e}");
            1
        })
}

fn serve(a: ServeArgs) -> i32 {
    let cfg = match load(&a) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::ops::logging::init(cfg.log_format, &cfg.log_level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        if let Err(e) = crate::ops::signals::install(shutdown.clone()) {
            eprintln!("crucible: cannot install signal handlers: {e}");
            return 1;
        }
        // A stop always ends: grace for the running evaluations plus 10 s for the rest.
        // Whatever could not be written by then (a full or failing disk) is what a crash
        // would leave: the store is consistent, and runs are recorded interrupted at the
        // next start.
        let limit = Duration::from_secs(cfg.shutdown_grace_secs + 10);
        let token = shutdown.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            let _ = std::thread::Builder::new()
                .name("stop-deadline".into())
                .spawn(move || {
                    std::thread::sleep(limit);
                    tracing::error!(
                        after_secs = limit.as_secs(),
                        "shutdown did not finish in time; exiting now (the store is consistent)"
                    );
                    eprintln!("crucible: shutdown did not finish in time; exiting");
                    std::process::exit(1);
                });
        });
        match crate::app::serve(cfg, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "crucible failed");
                eprintln!("crucible: {e:#}");
                if e.downcast_ref::<crate::app::HostUnfit>().is_some() {
                    EXIT_CONFIG
                } else {
                    1
                }
            }
        }
    })
}

/// Where a client command finds the server and its token: the flag, else the
/// environment, else the server's own configuration.
fn server_config(s: &ServerArgs) -> Result<Option<Config>, String> {
    let (path, explicit) = match &s.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(SYSTEM_CONFIG), false),
    };
    if !explicit && !path.exists() {
        return Ok(None);
    }
    match Config::load(Some(&path), &Overrides::default()) {
        Ok(c) => Ok(Some(c)),
        Err(e) if explicit => Err(e.to_string()),
        // The system file may be unreadable for this user (its token file is, often):
        // the flags and the environment still work.
        Err(_) => Ok(None),
    }
}

fn server_url(s: &ServerArgs, cfg: Option<&Config>) -> String {
    if let Some(u) = &s.server {
        return u.clone();
    }
    if let Ok(u) = std::env::var("CRUCIBLE_URL") {
        if !u.is_empty() {
            return u;
        }
    }
    if let Some(c) = cfg {
        // A server listening on every address is reached on loopback.
        let mut addr = c.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        return format!("http://{addr}");
    }
    if let Ok(l) = std::env::var("CRUCIBLE_LISTEN") {
        return format!("http://{l}");
    }
    "http://127.0.0.1:8080".to_string()
}

fn client_cmd<F, Fut>(s: ServerArgs, f: F) -> i32
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<i32, String>>,
{
    let cfg = match server_config(&s) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crucible: configuration error: {e}");
            return EXIT_CONFIG;
        }
    };
    // The environment is already applied over the file by Config::load.
    let token = s
        .token
        .clone()
        .or_else(|| {
            std::env::var("CRUCIBLE_API_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        })
        .or_else(|| cfg.as_ref().and_then(|c| c.api_token.clone()));
    let client = match Client::new(&server_url(&s, cfg.as_ref()), token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crucible: {e}");
            return 2;
        }
    };
    let rt = match small_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(f(client)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crucible: {e}");
            1
        }
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn answer(r: &crate::client::Reply) -> Result<Value, String> {
    let v = r.json().map_err(|e| e.to_string())?;
    if r.status >= 400 {
        return Err(format!(
            "{} {}: {}",
            r.status,
            v["error"]["code"].as_str().unwrap_or("error"),
            v["error"]["message"].as_str().unwrap_or("")
        ));
    }
    Ok(v)
}

/// What `submit` adds to a plain submission.
struct Extra {
    files: Vec<PathBuf>,
    tests: Option<PathBuf>,
    compare: Option<String>,
    args: Vec<String>,
}

/// The language a file's extension names.
fn language_of(file: &std::path::Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("sh") => "sh",
        Some("c") => "c",
        Some("cpp" | "cc" | "cxx") => "cpp",
        Some("js" | "mjs") => "javascript",
        Some("java") => "java",
        Some("go") => "go",
        Some("rs") => "rust",
        _ => "python",
    }
}

async fn submit(
    c: Client,
    file: PathBuf,
    language: Option<String>,
    extra: Extra,
    timeout: Option<f64>,
    stdin_file: Option<PathBuf>,
    wait: bool,
) -> Result<i32, String> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let code = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        s
    } else {
        read(&file)?
    };
    let language = language.unwrap_or_else(|| language_of(&file).to_string());
    let mut body = json!({"code": code, "language": language});
    if let Some(t) = timeout {
        body["timeout"] = json!(t);
    }
    if let Some(p) = stdin_file {
        body["stdin"] = json!(read(&p)?);
    }
    if !extra.files.is_empty() {
        let mut files = Vec::new();
        for f in &extra.files {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("{} has no usable file name", f.display()))?;
            files.push(json!({"name": name, "content": read(f)?}));
        }
        body["files"] = json!(files);
    }
    if let Some(t) = &extra.tests {
        let tests: Value = serde_json::from_str(&read(t)?)
            .map_err(|e| format!("{} is not JSON: {e}", t.display()))?;
        body["tests"] = tests;
    }
    if let Some(c) = &extra.compare {
        body["compare"] = json!(c);
    }
    if !extra.args.is_empty() {
        body["args"] = json!(extra.args);
    }
    let r = c
        .post_json("/api/eval", &body)
        .await
        .map_err(|e| e.to_string())?;
    let v = answer(&r)?;
    if !wait {
        print_json(&v);
        return Ok(0);
    }
    let id = v["eval_id"].as_str().unwrap_or_default().to_string();
    // The server holds each read until the evaluation ends (or 30 s pass): no polling.
    loop {
        let r = c
            .get(&format!("/api/eval/{id}?wait=30"))
            .await
            .map_err(|e| e.to_string())?;
        let rec = answer(&r)?;
        match rec["status"].as_str() {
            Some("completed") => {
                print_json(&rec);
                // With tests, `completed` only means every test was judged.
                return Ok(if rec["success"] == true { 0 } else { 1 });
            }
            Some("failed") | Some("cancelled") => {
                print_json(&rec);
                return Ok(1);
            }
            _ => {}
        }
    }
}

async fn status(c: Client, id: String) -> Result<i32, String> {
    let r = c
        .get(&format!("/api/eval/{id}"))
        .await
        .map_err(|e| e.to_string())?;
    print_json(&answer(&r)?);
    Ok(0)
}

async fn backup(c: Client, name: Option<String>) -> Result<i32, String> {
    let mut body = json!({});
    if let Some(n) = name {
        body["path"] = json!(n);
    }
    let r = c
        .post_json("/api/admin/backup", &body)
        .await
        .map_err(|e| e.to_string())?;
    let v = answer(&r)?;
    eprintln!(
        "crucible: backup written to {}",
        v["path"].as_str().unwrap_or("?")
    );
    print_json(&v);
    Ok(0)
}

async fn replay(c: Client, sink: String, from_seq: u64) -> Result<i32, String> {
    let r = c
        .post_json(
            &format!("/api/admin/sinks/{sink}/replay"),
            &json!({ "from_seq": from_seq }),
        )
        .await
        .map_err(|e| e.to_string())?;
    print_json(&answer(&r)?);
    Ok(0)
}
