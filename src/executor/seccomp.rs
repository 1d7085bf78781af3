//! The syscall filter of every sandboxed run, installed by the helper as the last step
//! before `execve` of the program (after the rlimits and `no_new_privs`), with the
//! [seccompiler](https://crates.io/crates/seccompiler) crate (pure Rust: the static build
//! stays self-contained).
//!
//! A deny list on top of everything else the sandbox does: each group below is what
//! untrusted code has no use for and what most sandbox escapes of recent years went
//! through. Compared with Docker's default profile (moby/profiles/seccomp/default.json),
//! it denies the same groups that matter for a run that needs no privileges, plus
//! io_uring (Docker also blocks it since 25.0); it does not restrict `personality` or
//! NUMA calls (runtimes use them; they grant nothing here).
//!
//! | group | syscalls | why |
//! |---|---|---|
//! | keyrings | keyctl, add_key, request_key | keyrings are not namespaced: a run could read the host's keys or leave some for the next run |
//! | namespaces | unshare, setns, clone with any `CLONE_NEW*` flag; clone3 answers ENOSYS (glibc then falls back to clone, whose flags can be checked) | a nested user namespace gives full capabilities inside it: mounts, pivot_root, the kernel's less-tested paths |
//! | mounts | mount, umount2, pivot_root, move_mount, open_tree, fsopen, fsconfig, fsmount, fspick, mount_setattr | rebuilding the view of the filesystem |
//! | io_uring | io_uring_setup, io_uring_enter, io_uring_register | a large attack surface with a record of privilege escalations |
//! | kernel debugging and introspection | userfaultfd, perf_event_open, bpf, ptrace, process_vm_readv, process_vm_writev, kcmp, lookup_dcookie | race amplification (userfaultfd), kernel and process introspection |
//! | handles | name_to_handle_at, open_by_handle_at | opening files by handle bypasses the mount view ("shocker") |
//! | the machine | kexec_load, kexec_file_load, init_module, finit_module, delete_module, reboot, swapon, swapoff, acct, quotactl, quotactl_fd, settimeofday, clock_settime, clock_adjtime, adjtimex, ioperm, iopl, syslog | administration of the host |
//! | obsolete | uselib, _sysctl, nfsservctl, sysfs, ustat | unused interfaces with old bugs |
//!
//! Every denied call returns EPERM (clone3: ENOSYS). Syscalls of another ABI (i386 via
//! `int 0x80`) kill the process; x32 syscall numbers answer EPERM.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// `CLONE_NEW*` flags refused in `clone`'s flags argument.
const NAMESPACE_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// Every syscall denied outright, by group (the README's table).
#[cfg(target_arch = "x86_64")]
pub const DENIED: &[(&str, &[(&str, libc::c_long)])] = &[
    (
        "keyrings",
        &[
            ("keyctl", libc::SYS_keyctl),
            ("add_key", libc::SYS_add_key),
            ("request_key", libc::SYS_request_key),
        ],
    ),
    (
        "namespaces",
        &[("unshare", libc::SYS_unshare), ("setns", libc::SYS_setns)],
    ),
    (
        "mounts",
        &[
            ("mount", libc::SYS_mount),
            ("umount2", libc::SYS_umount2),
            ("pivot_root", libc::SYS_pivot_root),
            ("move_mount", libc::SYS_move_mount),
            ("open_tree", libc::SYS_open_tree),
            ("fsopen", libc::SYS_fsopen),
            ("fsconfig", libc::SYS_fsconfig),
            ("fsmount", libc::SYS_fsmount),
            ("fspick", libc::SYS_fspick),
            ("mount_setattr", libc::SYS_mount_setattr),
        ],
    ),
    (
        "io_uring",
        &[
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("io_uring_enter", libc::SYS_io_uring_enter),
            ("io_uring_register", libc::SYS_io_uring_register),
        ],
    ),
    (
        "kernel debugging and introspection",
        &[
            ("userfaultfd", libc::SYS_userfaultfd),
            ("perf_event_open", libc::SYS_perf_event_open),
            ("bpf", libc::SYS_bpf),
            ("ptrace", libc::SYS_ptrace),
            ("process_vm_readv", libc::SYS_process_vm_readv),
            ("process_vm_writev", libc::SYS_process_vm_writev),
            ("kcmp", libc::SYS_kcmp),
            ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ],
    ),
    (
        "handles",
        &[
            ("name_to_handle_at", libc::SYS_name_to_handle_at),
            ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ],
    ),
    (
        "the machine",
        &[
            ("kexec_load", libc::SYS_kexec_load),
            ("kexec_file_load", libc::SYS_kexec_file_load),
            ("init_module", libc::SYS_init_module),
            ("finit_module", libc::SYS_finit_module),
            ("delete_module", libc::SYS_delete_module),
            ("reboot", libc::SYS_reboot),
            ("swapon", libc::SYS_swapon),
            ("swapoff", libc::SYS_swapoff),
            ("acct", libc::SYS_acct),
            ("quotactl", libc::SYS_quotactl),
            ("quotactl_fd", 443),
            ("settimeofday", libc::SYS_settimeofday),
            ("clock_settime", libc::SYS_clock_settime),
            ("clock_adjtime", libc::SYS_clock_adjtime),
            ("adjtimex", libc::SYS_adjtimex),
            ("ioperm", libc::SYS_ioperm),
            ("iopl", libc::SYS_iopl),
            ("syslog", libc::SYS_syslog),
        ],
    ),
    (
        "obsolete",
        &[
            ("uselib", libc::SYS_uselib),
            ("_sysctl", libc::SYS__sysctl),
            ("nfsservctl", libc::SYS_nfsservctl),
            ("sysfs", libc::SYS_sysfs),
            ("ustat", libc::SYS_ustat),
        ],
    ),
];

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;

/// First syscall number of the x32 ABI (same audit arch as x86_64).
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn filter_err(e: impl std::fmt::Display) -> String {
    format!("cannot build the syscall filter: {e}")
}

/// The filters, in the order they are installed: the deny list (EPERM), then clone3
/// (ENOSYS).
pub fn programs() -> Result<Vec<BpfProgram>, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, calls) in DENIED {
        for (_, nr) in *calls {
            rules.insert(*nr, Vec::new());
        }
    }
    // clone(flags, ...): refused when any namespace flag is set in flags (arg 0).
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(filter_err)?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(filter_err)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )
    .map_err(filter_err)?;
    let mut deny: BpfProgram = deny.try_into().map_err(filter_err)?;
    deny_x32(&mut deny);

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(filter_err)?;
    let clone3: BpfProgram = clone3.try_into().map_err(filter_err)?;
    Ok(vec![deny, clone3])
}

/// After seccompiler's architecture check (3 instructions: load arch, compare, kill),
/// answer EPERM to x32 syscall numbers, which share x86_64's audit arch and would
/// otherwise bypass the per-number rules.
#[cfg(target_arch = "x86_64")]
fn deny_x32(prog: &mut BpfProgram) {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    let nr_offset = 0; // seccomp_data.nr
    let check = [
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: nr_offset,
        },
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
    ];
    let at = 3.min(prog.len());
    prog.splice(at..at, check);
}

/// Install the filters on the calling thread (which must have `no_new_privs` set, or
/// CAP_SYS_ADMIN; the helper's child has both). Nothing else may run in between: call it
/// right before `execve`.
pub fn install(programs: &[BpfProgram]) -> Result<(), String> {
    for p in programs {
        seccompiler::apply_filter(p)
            .map_err(|e| format!("cannot install the syscall filter: {e}"))?;
    }
    Ok(())
}

/// The same rules as a Docker seccomp profile (`HostConfig.SecurityOpt` `seccomp=<json>`),
/// for the Docker backend: deny list, every ABI of the host (x86_64, i386, x32), the
/// same errnos. It replaces the engine's default profile, which leaves io_uring and
/// ptrace open on older engines.
pub fn docker_profile() -> String {
    use serde_json::json;
    let names: Vec<&str> = DENIED
        .iter()
        .flat_map(|(_, calls)| calls.iter().map(|(n, _)| *n))
        .collect();
    let mut syscalls = vec![json!({
        "names": names,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::EPERM,
    })];
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::ENOSYS,
    }));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_build_and_start_with_the_arch_and_x32_checks() {
        let p = programs().expect("build");
        assert_eq!(p.len(), 2);
        // load arch, jeq, kill; then our x32 check.
        assert_eq!(p[0][3].k, 0);
        assert_eq!(p[0][4].k, X32_SYSCALL_BIT);
        assert_eq!(p[0][5].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
        let names: Vec<&str> = DENIED
            .iter()
            .flat_map(|(_, c)| c.iter().map(|(n, _)| *n))
            .collect();
        for must in [
            "keyctl",
            "unshare",
            "mount",
            "io_uring_setup",
            "bpf",
            "kexec_load",
        ] {
            assert!(names.contains(&must), "{must}");
        }
    }
}
