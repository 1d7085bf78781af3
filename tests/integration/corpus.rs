//! The hostile-code corpus shared by the backends: each case is a program an attacker
//! would submit and what the record must say afterwards. `hostile.rs` runs the list in the
//! sandbox, `docker.rs` in containers; controls (the same programs where the protection
//! is off) live with the tests that need them.

use crate::common::{program, MEMORY_HOG};
use serde_json::Value;

/// One attack.
pub struct Case {
    pub name: &'static str,
    pub code: String,
    /// Limits to ask for (JSON), if any.
    pub limits: Option<Value>,
    pub check: fn(&Value) -> Result<(), String>,
}

/// Probes one syscall of each family the filter denies, with arguments that would
/// succeed (or fail differently) without it, and prints `{family: "ok" | errno name}`.
/// Calls that could succeed are made harmless: a successful clone child exits at once.
pub const SYSCALL_FAMILIES: &str = r#"
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return r, ctypes.get_errno()
def name(r, e):
    return "ok" if r >= 0 else errno.errorcode.get(e, str(e))
res = {}
# keyrings: read the session keyring's id, add a key to it.
res["keyctl"] = name(*sc(250, 0, -3, 0))
res["add_key"] = name(*sc(248, b"user", b"crucible-probe", b"v", 1, -3))
# namespaces: a nested user namespace, the same through clone, setns, clone3.
res["unshare"] = name(*sc(272, 0x10000000))
pid = os.getpid()
r, e = sc(56, 0x10000000 | 17, 0, 0, 0, 0)
if r == 0 and os.getpid() != pid:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
res["clone_newuser"] = name(r, e)
fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
res["setns"] = name(*sc(308, fd, 0))
res["clone3"] = name(*sc(435, 0, 0))
# mounts
res["mount"] = name(*sc(165, b"none", b"/tmp", b"tmpfs", 0, 0))
res["pivot_root"] = name(*sc(155, b"/tmp", b"/tmp"))
# io_uring: a valid setup call (params zeroed).
params = ctypes.create_string_buffer(120)
res["io_uring_setup"] = name(*sc(425, 1, params))
# userfaultfd in user mode only (allowed unprivileged since Linux 5.11).
res["userfaultfd"] = name(*sc(323, 1))
# perf: a software clock on this process (allowed at perf_event_paranoid <= 2).
attr = ctypes.create_string_buffer(128)
ctypes.memmove(attr, (1).to_bytes(4, "little") + (128).to_bytes(4, "little"), 8)
ctypes.memmove(ctypes.addressof(attr) + 40, (1 << 5 | 1 << 6).to_bytes(8, "little"), 8)
res["perf_event_open"] = name(*sc(298, attr, 0, -1, -1, 0))
# ptrace and cross-process memory, on itself.
res["ptrace"] = name(*sc(101, 0, 0, 0, 0))
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
res["process_vm_readv"] = name(*sc(310, os.getpid(), iov, 1, iov, 1, 0))
res["bpf"] = name(*sc(321, 0, 0, 0))
# the machine
res["init_module"] = name(*sc(175, 0, 0, b""))
res["kexec_load"] = name(*sc(246, 0, 0, 0, 0xdead0000))
res["reboot"] = name(*sc(169, 0, 0, 0, 0))
res["swapon"] = name(*sc(167, b"/nonexistent", 0))
# x32 ABI numbers share x86_64's audit arch: getpid through x32.
res["x32"] = name(*sc(0x40000000 | 39))
res["getpid"] = name(*sc(39))
print(json.dumps(res))
"#;

/// What the filter answers, per family.
pub fn expected_denials() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<(&str, &str)> = [
        "keyctl",
        "add_key",
        "unshare",
        "clone_newuser",
        "setns",
        "mount",
        "pivot_root",
        "io_uring_setup",
        "userfaultfd",
        "perf_event_open",
        "ptrace",
        "process_vm_readv",
        "bpf",
        "init_module",
        "kexec_load",
        "reboot",
        "swapon",
    ]
    .into_iter()
    .map(|f| (f, "EPERM"))
    .collect();
    v.push(("clone3", "ENOSYS"));
    v.push(("getpid", "ok"));
    v
}

fn probe_output(r: &Value) -> Result<Value, String> {
    if r["status"] != "completed" {
        return Err(format!("the probe did not complete: {r:#}"));
    }
    let out = r["output"].as_str().unwrap_or("");
    serde_json::from_str(out.trim()).map_err(|e| format!("probe output {out:?}: {e}"))
}

fn denials_hold(r: &Value) -> Result<(), String> {
    let p = probe_output(r)?;
    let mut wrong: Vec<String> = expected_denials()
        .into_iter()
        .filter(|(f, want)| p[f] != *want)
        .map(|(f, want)| format!("{f}: {} (want {want})", p[f]))
        .collect();
    // x32 numbers: refused by the filter (EPERM) or by a kernel without x32 (ENOSYS),
    // never run.
    if p["x32"] != "EPERM" && p["x32"] != "ENOSYS" {
        wrong.push(format!("x32: {}", p["x32"]));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("syscall families not denied: {wrong:?}; all: {p}"))
    }
}

/// The keyring an attacker would reach: search the session keyring for the key the
/// host put into the appliance's (`crucible-test` of type `user`), then read it.
pub const KEYRING_SEARCH: &str = r#"
import ctypes, errno, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
KEYCTL_SEARCH, KEYCTL_READ = 10, 11
r = libc.syscall(ctypes.c_long(250), ctypes.c_long(KEYCTL_SEARCH), ctypes.c_long(-3), b"user", b"crucible-test", ctypes.c_long(0))
if r < 0:
    print(json.dumps({"search": errno.errorcode.get(ctypes.get_errno(), "?")}))
else:
    buf = ctypes.create_string_buffer(256)
    n = libc.syscall(ctypes.c_long(250), ctypes.c_long(KEYCTL_READ), ctypes.c_long(r), buf, ctypes.c_long(256))
    print(json.dumps({"search": "ok", "secret": buf.raw[:max(n, 0)].decode(errors="replace")}))
"#;

fn keyring_unreachable(r: &Value) -> Result<(), String> {
    let p = probe_output(r)?;
    match p["search"].as_str() {
        Some("EPERM") => Ok(()),
        other => Err(format!("the session keyring was searchable: {other:?} {p}")),
    }
}

fn tree_memory_capped(r: &Value) -> Result<(), String> {
    if r["status"] == "failed" && r["failure_reason"] == "memory_limit" {
        Ok(())
    } else {
        Err(format!(
            "12 x 40 MiB under a 128 MiB limit was not stopped: {r:#}"
        ))
    }
}

/// The corpus.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "syscall families the filter denies",
            code: SYSCALL_FAMILIES.to_string(),
            limits: None,
            check: denials_hold,
        },
        Case {
            name: "the session keyring",
            code: KEYRING_SEARCH.to_string(),
            limits: None,
            check: keyring_unreachable,
        },
        Case {
            name: "12 processes that together exceed the memory limit",
            code: program(MEMORY_HOG, &[("CHILDREN", "12"), ("MIB", "40")]),
            limits: Some(serde_json::json!({"memory_mb": 128})),
            check: tree_memory_capped,
        },
    ]
}
