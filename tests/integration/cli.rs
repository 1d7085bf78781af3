//! The command line: client commands against a running server, config validation, and
//! start-up errors that name what is wrong.

use crate::common::{bin, Server};
use serde_json::Value;
use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("CRUCIBLE_API_TOKEN")
        .env_remove("CRUCIBLE_URL")
        .env_remove("CRUCIBLE_LISTEN");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run crucible");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_and_status_talk_to_the_server() {
    let s = Server::start("").await;
    let file = s.path("hello.py");
    std::fs::write(&file, "import sys\nprint('hello', sys.stdin.read())\n").expect("write");
    let stdin = s.path("in.txt");
    std::fs::write(&stdin, "world").expect("write");
    let url = format!("http://{}", s.addr);
    let (code, out, err) = tokio::task::spawn_blocking({
        let (f, i, u) = (file.clone(), stdin.clone(), url.clone());
        move || {
            run(
                &[
                    "submit",
                    f.to_str().expect("path"),
                    "--wait",
                    "--stdin-file",
                    i.to_str().expect("path"),
                    "--server",
                    &u,
                ],
                &[],
            )
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{out}{err}");
    let rec: Value = serde_json::from_str(&out).expect("record json");
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["output"], "hello world\n");
    let id = rec["eval_id"].as_str().expect("id").to_string();

    // `status` finds the server through CRUCIBLE_URL.
    let (code, out, _) =
        tokio::task::spawn_blocking(move || run(&["status", &id], &[("CRUCIBLE_URL", &url)]))
            .await
            .expect("join");
    assert_eq!(code, 0);
    let again: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(again, rec);

    let sh = s.path("fail.sh");
    std::fs::write(&sh, "echo no >&2; exit 4\n").expect("write");
    let url = format!("http://{}", s.addr);
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        run(
            &[
                "submit",
                sh.to_str().expect("path"),
                "--wait",
                "--server",
                &url,
            ],
            &[],
        )
    })
    .await
    .expect("join");
    assert_eq!(code, 1, "a failed evaluation exits non-zero");
    let rec: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (rec["language"].as_str(), rec["exit_code"].as_i64()),
        (Some("sh"), Some(4))
    );

    let (code, _, err) = run(
        &["status", "nope", "--server", &format!("http://{}", s.addr)],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not_found"), "{err}");
}

#[test]
fn config_errors_name_the_key_and_exit_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "workers = 0\n").expect("write");
    let (code, _, err) = run(&["check-config", "--config", cfg.to_str().expect("p")], &[]);
    assert_eq!(code, 78);
    assert!(err.contains("workers"), "{err}");
    let (code, _, err) = run(&["serve", "--config", cfg.to_str().expect("p")], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("workers"), "{err}");
    std::fs::write(&cfg, "listen = \"127.0.0.1:9\"\n[limits]\nmemory_mb = 64\n").expect("write");
    let (code, out, err) = run(
        &["check-config", "--config", cfg.to_str().expect("p")],
        &[("CRUCIBLE_API_TOKEN", "topsecret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memory_mb = 64"), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:9\""), "{out}");
    assert!(!out.contains("topsecret"), "the token is masked");
    let (code, _, err) = run(&["check-config"], &[("CRUCIBLE_EXECUTOR", "podman")]);
    assert_eq!(code, 78);
    assert!(err.contains("CRUCIBLE_EXECUTOR"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused_clearly() {
    let s = Server::start("").await;
    let data = s.data_dir();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().expect("p"),
            ],
            &[],
        )
    })
    .await
    .expect("join");
    assert_eq!(code, 1);
    assert!(err.contains("in use by another crucible process"), "{err}");
    // The first one is unaffected.
    assert_eq!(s.get("/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_read_the_servers_config_for_address_and_token() {
    let s = Server::start_with("", &[("CRUCIBLE_API_TOKEN", "s3cret-token")]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("write");
    // The server's configuration as an operator has it: its address and a token file.
    let cfg = dir.path().join("crucible.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = {:?}\napi_token_file = {:?}\n",
            s.addr,
            token_file.display().to_string()
        ),
    )
    .expect("write");
    let code_file = dir.path().join("x.py");
    std::fs::write(&code_file, "print(6 * 7)\n").expect("write");
    let (c, f) = (
        cfg.to_str().expect("p").to_string(),
        code_file.to_str().expect("p").to_string(),
    );
    let (code, out, err) = tokio::task::spawn_blocking({
        let (c, f) = (c.clone(), f.clone());
        move || run(&["submit", &f, "--wait", "--config", &c], &[])
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{out}{err}");
    let rec: Value = serde_json::from_str(&out).expect("record json");
    assert_eq!(rec["output"], "42\n");

    // Precedence: --token over the environment over the file; --server and
    // CRUCIBLE_URL over the file's address.
    let (code, _, err) = tokio::task::spawn_blocking({
        let (c, f) = (c.clone(), f.clone());
        move || run(&["submit", &f, "--config", &c, "--token", "wrong"], &[])
    })
    .await
    .expect("join");
    assert_eq!(code, 1);
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    let (code, _, err) = tokio::task::spawn_blocking({
        let (c, f) = (c.clone(), f.clone());
        move || {
            run(
                &["submit", &f, "--config", &c],
                &[("CRUCIBLE_API_TOKEN", "wrong")],
            )
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 1, "the environment's token wins over the file: {err}");
    let (code, _, err) = tokio::task::spawn_blocking({
        let (c, f) = (c.clone(), f.clone());
        move || {
            run(
                &["submit", &f, "--config", &c],
                &[("CRUCIBLE_URL", "http://127.0.0.1:9")],
            )
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 1);
    assert!(
        err.contains("127.0.0.1:9"),
        "CRUCIBLE_URL wins over the file: {err}"
    );
    // An explicit config that cannot be read is an error, not a silent default.
    let (code, _, err) = run(&["status", "x", "--config", "/nonexistent/c.toml"], &[]);
    assert_eq!(code, 78, "{err}");
}
