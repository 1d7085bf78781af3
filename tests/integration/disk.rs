//! A full disk is a state, not a failure: the data dir on a small tmpfs, filled by another
//! writer. Below the reserve new work is refused with 507 and nothing new starts while the
//! running evaluation still records its result; with no space at all writes fail with a
//! plain message; once space is back the store recovers by itself, without a restart; and
//! a SIGTERM while nothing can be written still ends the process in bounded time, the run
//! then recorded `interrupted` at the next start.

use crate::common::{Server, DEADLINE};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs of `mib` MiB mounted on a directory; lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount (the disk test runs as root)");
        assert!(st.success(), "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .expect("stat -f");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    it.next().unwrap_or(0) * it.next().unwrap_or(0)
}

/// Write zeros into `path` until the filesystem has at most `leave` bytes free (0: until
/// it refuses).
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    let dir = path.parent().expect("parent");
    loop {
        let free = free_bytes(dir);
        if free <= leave {
            break;
        }
        let n = ((free - leave) as usize).min(chunk.len());
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

async fn submit(s: &Server) -> crucible::client::Reply {
    s.post("/api/eval", &json!({"code": "print('x')"})).await
}

/// The message of an error answer must read as words, not a Debug-formatted OS error.
fn assert_plain(r: &crucible::client::Reply) {
    let text = r.text();
    for debug in ["Os {", "kind:", "Custom {", "StorageFull"] {
        assert!(!text.contains(debug), "Debug-formatted error: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_work_recovers_by_itself_and_stops_in_bounded_time() {
    let mut mount = None;
    // The reserve must hold what one flush can write, and with records of 200 kB that is
    // well over 8 MiB: sled rewrites whole leaves of up to 17 entries (3.4 MB here), and
    // a split, a merge or its segment cleaner rewrite more (the store's bound for a small
    // update next to them is about 15 MiB). A reserve of 48 MiB keeps a 24 MiB ballast.
    let cfg = "workers = 1\nshutdown_grace_secs = 2\n[store]\nmin_free_mb = 48\ncache_mb = 4";
    let mut s = Server::start_prepared(cfg, |dir| mount = Some(Tmpfs::mount(dir, 96))).await;
    let _mount = mount;
    let data = s.data_dir();
    let filler = data.join("filler");

    let h = s.health().await;
    assert_eq!(h["store"]["min_free_bytes"], 48 * 1024 * 1024, "{h}");
    assert!(
        h["store"]["free_bytes"].as_u64().unwrap_or(0) > 48 << 20,
        "{h}"
    );

    // One runs, one waits in the queue (workers = 1).
    let running = s
        .submit(json!({"code": "import time; time.sleep(3); print('done')", "timeout": 60}))
        .await;
    s.wait_status(&running, "running").await;
    let queued = s.submit(json!({"code": "print('later')"})).await;
    // Large records whose cancellation needs real space later.
    let pad = format!("# {}\nprint('big')\n", "x".repeat(200_000));
    let mut big = Vec::new();
    for _ in 0..6 {
        big.push(s.submit(json!({"code": pad})).await);
    }

    // Below the reserve (but not full): 507 for new work, the running one finishes.
    fill(&filler, 2 << 20);
    let started = Instant::now();
    let r = loop {
        let r = submit(&s).await;
        if r.status == 507 || started.elapsed() > DEADLINE {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("insufficient_storage"));
    assert!(r.headers.contains_key("retry-after"));
    assert_plain(&r);
    let batch = s
        .post(
            "/api/eval-batch",
            &json!({"evaluations": [{"code": "print(1)"}]}),
        )
        .await;
    assert_eq!(batch.status, 507, "{}", batch.text());
    let done = s.wait_terminal(&running).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"], "done\n");
    let h = s.health().await;
    assert_eq!(h["store"]["low_space"], true, "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    // Nothing new starts while space is low.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.record(&queued).await["status"], "queued");

    // No space at all: the store gives back its ballast so that writes in flight can
    // still be made; past that a write is refused before it reaches sled, in plain words.
    fill(&filler, 0);
    let mut refused = 0;
    for id in &big {
        let r = s.post(&format!("/api/eval/{id}/cancel"), &json!({})).await;
        assert_plain(&r);
        match r.status {
            200 => {}
            500 => {
                assert_eq!(
                    r.error_code().as_deref(),
                    Some("store_error"),
                    "{}",
                    r.text()
                );
                refused += 1;
            }
            other => panic!("cancel answered {other}: {}", r.text()),
        }
    }
    let during = s.health().await;
    // sled itself never met the full disk: nothing to reopen.
    assert_eq!(during["store"]["ok"], true, "{during}");
    assert_eq!(during["store"]["reopens"], 0, "{during}");
    assert!(during["store"]["last_error"]
        .as_str()
        .is_none_or(|m| !m.contains("Os {")));
    eprintln!(
        "full disk: {refused} of {} cancellations refused",
        big.len()
    );

    // Space comes back: the store recovers by itself (no restart).
    std::fs::remove_file(&filler).expect("free space");
    let started = Instant::now();
    let id = loop {
        let r = submit(&s).await;
        if r.status == 202 {
            break r.json().expect("json")["eval_id"]
                .as_str()
                .expect("id")
                .to_string();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no recovery: {} {}\n{}",
            r.status,
            r.text(),
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "recovered {:.1} s after space came back (health during: {})",
        started.elapsed().as_secs_f64(),
        during["store"]
    );
    assert_eq!(s.wait_terminal(&id).await["status"], "completed");
    let h = s.health().await;
    assert_eq!(h["store"]["ok"], true, "{h}");
    assert_eq!(h["store"]["low_space"], false, "{h}");
    for id in &big {
        let r = s.wait_terminal(id).await;
        assert!(
            matches!(r["status"].as_str(), Some("completed" | "cancelled")),
            "{r}"
        );
    }
    // The queued one (if its cancel did not go through) runs now.
    let q = s.wait_terminal(&queued).await;
    assert!(
        matches!(q["status"].as_str(), Some("completed" | "cancelled")),
        "{q}"
    );

    // A stop while nothing can be written ends in bounded time (grace 2 s + 10 s).
    let last = s
        .submit(json!({"code": "import time; time.sleep(60)", "timeout": 120}))
        .await;
    s.wait_status(&last, "running").await;
    fill(&filler, 0);
    let t = Instant::now();
    s.terminate();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2 + 10 + 5),
        "stop took {took:?}:\n{}",
        s.log()
    );
    std::fs::remove_file(&filler).expect("free space");
    s.restart().await;
    let rec = s.wait_terminal(&last).await;
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_eq!(rec["failure_reason"], "interrupted", "{rec}");
    let _: Value = rec;
}
