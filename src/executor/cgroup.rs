//! Per-evaluation cgroups: one cgroup per run, created before the code starts and holding
//! every process of the run, so memory (memory + swap), processes and CPU are capped for
//! the whole tree, its usage is read from the kernel's own counters, and the whole group
//! is killed at once. Both hierarchies sit behind one interface:
//!
//! - cgroup v2 (current distributions): under systemd with `Delegate=yes` the appliance
//!   owns its service cgroup; it moves itself into a leaf (`appliance/`), hands the
//!   memory, pids and cpu controllers to its children and creates each run under
//!   `runs/`. Run as root elsewhere, it does the same in its own cgroup, or makes a
//!   subtree of its own at the top (`/sys/fs/cgroup/crucible-<node>`).
//! - cgroup v1 (memory, pids, cpu, cpuacct, freezer mounted separately), as root: a
//!   `crucible-<node>` directory under the appliance's own cgroup in each hierarchy.
//!
//! What the kernel recorded is what counts: `memory.events`/`memory.oom_control`'s
//! `oom_kill` (or, for a parent whose children belong to another program, an OOM
//! notification registered on it), `memory.peak`/`memory.max_usage_in_bytes`, and
//! `cpu.stat`/`cpuacct.usage`. This module never follows anything a run can write: it
//! only touches cgroup files the kernel creates.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers a run uses; memory and pids are required.
const V1_CONTROLLERS: [&str; 5] = ["memory", "pids", "cpu", "cpuacct", "freezer"];

/// Which hierarchy is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The caps of one run's cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    /// memory and memory + swap, in bytes.
    pub memory_bytes: u64,
    /// Processes and threads of the whole tree.
    pub max_processes: u64,
    /// CPU quota, in CPUs (1.0 = one core).
    pub cpus: f64,
}

/// What the kernel counted for a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// Peak memory of the whole tree, if the kernel keeps it (v2 needs Linux 5.19+).
    pub memory_peak_bytes: Option<u64>,
    /// CPU time (user + system) of the whole tree, in microseconds.
    pub cpu_usec: Option<u64>,
    /// Processes the OOM killer killed in the group (or OOM events on it).
    pub oom_kills: u64,
}

/// One directory of a run (v2: the only one; v1: one per hierarchy) and the controllers
/// it carries.
#[derive(Debug, Clone)]
struct Dir {
    path: PathBuf,
    controllers: Vec<&'static str>,
}

impl Dir {
    fn has(&self, c: &str) -> bool {
        self.controllers.contains(&c)
    }
}

/// The appliance's cgroup subtree: where runs are created.
#[derive(Debug)]
pub struct Cgroups {
    version: Version,
    /// v2: one directory holding the runs; v1: the `crucible-<node>` directory of each
    /// hierarchy.
    bases: Vec<Dir>,
}

fn read_trim(p: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

fn write(p: &Path, value: &str) -> io::Result<()> {
    // One write() call: cgroup files take a value per write.
    let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
    f.write_all(value.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

fn mkdir(p: &Path) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A value of a `key value` file (`memory.events`, `cpu.stat`, `memory.oom_control`).
fn keyed(p: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(p).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl Cgroups {
    /// Find a hierarchy this process may manage and prepare the appliance's subtree, or
    /// say why there is none (then runs are limited by rlimits and a watchdog only).
    pub fn detect(node: &str) -> Result<Cgroups, String> {
        if Path::new(ROOT).join("cgroup.controllers").exists() {
            return Self::setup_v2(node);
        }
        if Path::new(ROOT)
            .join("memory")
            .join("memory.limit_in_bytes")
            .exists()
        {
            return Self::setup_v1(node);
        }
        Err(format!("no usable cgroup hierarchy is mounted at {ROOT}"))
    }

    /// `cgroup2` or `cgroup1` (the `/health` name).
    pub fn label(&self) -> &'static str {
        match self.version {
            Version::V1 => "cgroup1",
            Version::V2 => "cgroup2",
        }
    }

    /// The hierarchy in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Where runs are created (for logs).
    pub fn location(&self) -> String {
        self.bases
            .iter()
            .map(|d| d.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn setup_v2(node: &str) -> Result<Cgroups, String> {
        let own = own_path_v2()?;
        let root = Path::new(ROOT);
        let mut why = Vec::new();
        if own != "/" {
            let base = root.join(own.trim_start_matches('/'));
            match take_over_v2(&base) {
                Ok(runs) => return Ok(runs),
                Err(e) => why.push(format!(
                    "cannot manage its own cgroup {}: {e}",
                    base.display()
                )),
            }
        }
        if is_root() {
            match top_level_v2(&root.join(format!("crucible-{node}"))) {
                Ok(runs) => return Ok(runs),
                Err(e) => why.push(format!("cannot create a subtree at the top: {e}")),
            }
        } else {
            why.push("not root, so it cannot create a subtree of its own".into());
        }
        Err(format!("cgroup v2: {}", why.join("; ")))
    }

    fn setup_v1(node: &str) -> Result<Cgroups, String> {
        if !is_root() {
            return Err("cgroup v1 needs root (the hierarchies are root's)".into());
        }
        let hierarchies = v1_hierarchies()?;
        let mut bases: Vec<Dir> = Vec::new();
        for ctrl in V1_CONTROLLERS {
            let Some((dir, _)) = hierarchies.iter().find(|(_, cs)| cs.contains(&ctrl)) else {
                if ctrl == "memory" || ctrl == "pids" {
                    return Err(format!("cgroup v1: the {ctrl} controller is not mounted"));
                }
                continue;
            };
            let base = dir.join(format!("crucible-{node}"));
            if let Some(d) = bases.iter_mut().find(|d| d.path == base) {
                d.controllers.push(ctrl);
                continue;
            }
            mkdir(&base).map_err(|e| format!("cgroup v1: {e}"))?;
            bases.push(Dir {
                path: base,
                controllers: vec![ctrl],
            });
        }
        Ok(Cgroups {
            version: Version::V1,
            bases,
        })
    }

    /// Create the cgroup of one run (empty, with its limits set).
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> io::Result<RunCgroup> {
        let mut dirs = Vec::new();
        for b in &self.bases {
            let path = b.path.join(name);
            mkdir(&path)?;
            dirs.push(Dir {
                path,
                controllers: b.controllers.clone(),
            });
        }
        let run = RunCgroup {
            version: self.version,
            dirs,
            oom_watch: None,
            oom_seen: Default::default(),
        };
        if let Err(e) = run.set_limits(limits) {
            run.remove_now();
            return Err(e);
        }
        Ok(run)
    }

    /// Remove runs left by a crash (killing what still runs in them). Returns how many.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        if let Some(first) = self.bases.first() {
            let names: Vec<String> = std::fs::read_dir(&first.path)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            for name in names {
                let run = RunCgroup {
                    version: self.version,
                    dirs: self
                        .bases
                        .iter()
                        .map(|b| Dir {
                            path: b.path.join(&name),
                            controllers: b.controllers.clone(),
                        })
                        .collect(),
                    oom_watch: None,
                    oom_seen: Default::default(),
                };
                run.remove_now();
                n += 1;
            }
        }
        n
    }
}

/// The appliance's own cgroup (v2), from /proc/self/cgroup (`0::/path`).
fn own_path_v2() -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| "no cgroup v2 entry in /proc/self/cgroup".to_string())
}

/// The controllers to hand to children: memory and pids (required), cpu if present.
fn v2_controllers(dir: &Path) -> Result<Vec<&'static str>, String> {
    let avail = read_trim(&dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let avail: Vec<&str> = avail.split_whitespace().collect();
    let mut out = Vec::new();
    for c in ["memory", "pids", "cpu"] {
        if avail.contains(&c) {
            out.push(c);
        } else if c != "cpu" {
            return Err(format!(
                "the {c} controller is not available in {} (it has: {})",
                dir.display(),
                avail.join(" ")
            ));
        }
    }
    Ok(out)
}

fn enable(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let spec: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
    write(&dir.join("cgroup.subtree_control"), &spec.join(" "))
}

/// Manage our own cgroup `base`: move this process into `base/appliance` (a cgroup with
/// controllers enabled for its children may not hold processes itself), enable the
/// controllers for the children, and create runs under `base/runs`.
fn take_over_v2(base: &Path) -> Result<Cgroups, String> {
    let controllers = v2_controllers(base)?;
    let leaf = base.join("appliance");
    mkdir(&leaf).map_err(|e| e.to_string())?;
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
        .map_err(|e| e.to_string())?;
    enable(base, &controllers).map_err(|e| e.to_string())?;
    let runs = base.join("runs");
    mkdir(&runs).map_err(|e| e.to_string())?;
    enable(&runs, &controllers).map_err(|e| e.to_string())?;
    Ok(Cgroups {
        version: Version::V2,
        bases: vec![Dir {
            path: runs,
            controllers,
        }],
    })
}

/// A subtree of our own at the top of the hierarchy (as root, outside systemd).
fn top_level_v2(base: &Path) -> Result<Cgroups, String> {
    let root = Path::new(ROOT);
    let controllers = v2_controllers(root)?;
    enable(root, &controllers).map_err(|e| e.to_string())?;
    mkdir(base).map_err(|e| e.to_string())?;
    enable(base, &controllers).map_err(|e| e.to_string())?;
    Ok(Cgroups {
        version: Version::V2,
        bases: vec![Dir {
            path: base.to_path_buf(),
            controllers,
        }],
    })
}

/// Each mounted v1 hierarchy: the directory of this process's own cgroup in it, and the
/// controllers it carries.
fn v1_hierarchies() -> Result<Vec<(PathBuf, Vec<&'static str>)>, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mut out = Vec::new();
    for line in mounts.lines() {
        // id parent major:minor root mount-point options ... - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let supers: Vec<&str> = r.nth(1).unwrap_or("").split(',').collect();
        let l: Vec<&str> = left.split_whitespace().collect();
        if l.len() < 5 {
            continue;
        }
        let (mount_root, mount_point) = (l[3], l[4]);
        let ctrls: Vec<&'static str> = V1_CONTROLLERS
            .into_iter()
            .filter(|c| supers.contains(c))
            .collect();
        if ctrls.is_empty() {
            continue;
        }
        // This process's path in that hierarchy: `N:memory:/path` (or `cpu,cpuacct`).
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, p) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',')
                .any(|c| ctrls.contains(&c))
                .then(|| p.to_string())
        });
        let path = path.unwrap_or_else(|| "/".into());
        let rel = path
            .strip_prefix(mount_root)
            .unwrap_or(&path)
            .trim_start_matches('/');
        out.push((Path::new(mount_point).join(rel), ctrls));
    }
    Ok(out)
}

/// The cgroup of one run.
#[derive(Debug)]
pub struct RunCgroup {
    version: Version,
    dirs: Vec<Dir>,
    oom_watch: Option<OwnedFd>,
    /// OOM notifications read from `oom_watch` so far.
    oom_seen: std::sync::atomic::AtomicU64,
}

impl RunCgroup {
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.has(controller))
            .map(|d| d.path.as_path())
    }

    /// Set (or change) the caps. A pooled sandbox's group gets its run's caps when the
    /// run is assigned to it.
    pub fn set_limits(&self, l: &CgroupLimits) -> io::Result<()> {
        let period: u64 = 100_000;
        let quota = ((l.cpus * period as f64).round() as u64).max(1_000);
        match self.version {
            Version::V2 => {
                let d = &self.dirs[0];
                write(&d.path.join("memory.max"), &l.memory_bytes.to_string())?;
                let swap = d.path.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&d.path.join("pids.max"), &l.max_processes.to_string())?;
                if d.has("cpu") {
                    write(&d.path.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
            Version::V1 => {
                if let Some(m) = self.dir("memory") {
                    let limit = m.join("memory.limit_in_bytes");
                    let memsw = m.join("memory.memsw.limit_in_bytes");
                    let value = l.memory_bytes.to_string();
                    // memory + swap may never be below memory: raise memory + swap first
                    // (a pooled group gets its run's larger limit), lower memory first.
                    if memsw.exists() {
                        if write(&memsw, &value).is_ok() {
                            write(&limit, &value)?;
                        } else {
                            write(&limit, &value)?;
                            write(&memsw, &value)?;
                        }
                    } else {
                        write(&limit, &value)?;
                    }
                }
                if let Some(p) = self.dir("pids") {
                    write(&p.join("pids.max"), &l.max_processes.to_string())?;
                }
                if let Some(c) = self.dir("cpu") {
                    write(&c.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Move a process (and its future children) into the run.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for d in &self.dirs {
            write(&d.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Count OOM events of this group itself through an eventfd (cgroup v1), for a group
    /// whose processes live in child cgroups that another program owns and removes (a
    /// Docker container's): its own `oom_kill` counter stays 0 there. Register before
    /// anything runs; [`RunCgroup::usage`] adds the count.
    pub fn watch_oom(&mut self) -> io::Result<()> {
        if self.version != Version::V1 {
            return Ok(());
        }
        let Some(m) = self.dir("memory").map(Path::to_path_buf) else {
            return Ok(());
        };
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let control = std::fs::File::open(m.join("memory.oom_control"))?;
        write(
            &m.join("cgroup.event_control"),
            &format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
        )?;
        self.oom_watch = Some(efd);
        Ok(())
    }

    /// OOM notifications so far (reading the eventfd resets it: the total is kept).
    fn watched_ooms(&self) -> u64 {
        let Some(fd) = &self.oom_watch else { return 0 };
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            self.oom_seen
                .fetch_add(u64::from_ne_bytes(buf), std::sync::atomic::Ordering::SeqCst);
        }
        self.oom_seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Start counting a run in a group that already holds processes (a pooled sandbox):
    /// the peak memory starts again where the kernel lets it be reset (v1), and the CPU
    /// time and OOM kills so far are returned, for the run's own to be counted from them.
    pub fn begin(&self) -> CgroupUsage {
        if self.peak_resets() {
            if let Some(m) = self.dir("memory") {
                let _ = write(&m.join("memory.max_usage_in_bytes"), "0");
            }
        }
        self.usage()
    }

    /// Whether [`RunCgroup::begin`] restarts the peak memory (cgroup v1; v2's
    /// `memory.peak` cannot be reset before Linux 6.12).
    pub fn peak_resets(&self) -> bool {
        self.version == Version::V1
    }

    /// What the kernel counted so far.
    pub fn usage(&self) -> CgroupUsage {
        let mut u = CgroupUsage::default();
        match self.version {
            Version::V2 => {
                let d = &self.dirs[0].path;
                u.memory_peak_bytes = read_trim(&d.join("memory.peak"))
                    .ok()
                    .and_then(|v| v.parse().ok());
                u.cpu_usec = keyed(&d.join("cpu.stat"), "usage_usec");
                u.oom_kills = keyed(&d.join("memory.events"), "oom_kill").unwrap_or(0);
            }
            Version::V1 => {
                if let Some(m) = self.dir("memory") {
                    u.memory_peak_bytes = read_trim(&m.join("memory.max_usage_in_bytes"))
                        .ok()
                        .and_then(|v| v.parse().ok());
                    u.oom_kills = keyed(&m.join("memory.oom_control"), "oom_kill").unwrap_or(0);
                }
                if let Some(c) = self.dir("cpuacct") {
                    u.cpu_usec = read_trim(&c.join("cpuacct.usage"))
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(|ns| ns / 1000);
                }
            }
        }
        u.oom_kills = u.oom_kills.max(self.watched_ooms());
        u
    }

    /// Processes in the group (of its first hierarchy).
    fn procs(&self) -> Vec<i32> {
        let Some(d) = self.dirs.first() else {
            return Vec::new();
        };
        std::fs::read_to_string(d.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any process is left in the group.
    pub fn is_empty(&self) -> bool {
        self.procs().is_empty()
    }

    /// Kill every process of the group at once (v2: `cgroup.kill`; v1: freeze, kill, thaw,
    /// so nothing can fork while it is being killed).
    pub fn kill(&self) {
        // An empty group stays empty: nothing is left in it that could fork.
        if self.is_empty() {
            return;
        }
        if self.version == Version::V2 {
            let k = self.dirs[0].path.join("cgroup.kill");
            if k.exists() && write(&k, "1").is_ok() {
                return;
            }
        }
        let freezer = self.dir("freezer").map(Path::to_path_buf);
        if let Some(f) = &freezer {
            let _ = write(&f.join("freezer.state"), "FROZEN");
            let deadline = Instant::now() + Duration::from_millis(200);
            while Instant::now() < deadline {
                match read_trim(&f.join("freezer.state")) {
                    Ok(s) if s == "FROZEN" => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => break,
                }
            }
        }
        for _ in 0..50 {
            let pids = self.procs();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) on a pid read from the group's own cgroup.procs.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
            if freezer.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(f) = &freezer {
            let _ = write(&f.join("freezer.state"), "THAWED");
        }
    }

    /// Kill what is left and remove the group (retrying while the last processes exit).
    pub fn remove_now(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !self.is_empty() {
                self.kill();
            }
            let mut left = false;
            for d in &self.dirs {
                match std::fs::remove_dir(&d.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => left = true,
                }
            }
            if !left || Instant::now() > deadline {
                if left {
                    tracing::warn!(cgroup = %self.dirs[0].path.display(), "a run's cgroup could not be removed");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Cgroup parents for Docker containers, owned by the appliance: with Docker's cgroupfs
/// driver a container's cgroup is created under its `CgroupParent`, and a container's own
/// cgroup is gone by the time the engine reports its exit. The parent stays ours: it holds
/// the run's memory limit (so an OOM is an event of the parent, where the appliance
/// registered for it) and keeps the tree's peak memory and CPU time after the container
/// is gone. Root only (the parents sit at the top of each hierarchy, where the engine
/// resolves `CgroupParent`).
#[derive(Debug)]
pub struct DockerParents {
    version: Version,
    /// `crucible-<node>-docker`.
    top: String,
    /// Root of every mounted hierarchy (v1: each cgroup mount; v2: the one mount).
    hierarchies: Vec<(PathBuf, Vec<&'static str>)>,
}

/// One run's parent.
#[derive(Debug)]
pub struct DockerParent {
    /// The `CgroupParent` to give the container.
    pub cgroup_parent: String,
    group: RunCgroup,
    /// The parent's directory in every hierarchy (the engine creates those we did not).
    all: Vec<PathBuf>,
}

impl DockerParents {
    /// Whether this host lets the appliance own parents for its containers.
    pub fn detect(node: &str) -> Result<DockerParents, String> {
        if !is_root() {
            return Err("owning cgroup parents for containers needs root".into());
        }
        let top = format!("crucible-{node}-docker");
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            let controllers = v2_controllers(root)?;
            enable(root, &controllers).map_err(|e| e.to_string())?;
            let base = root.join(&top);
            mkdir(&base).map_err(|e| e.to_string())?;
            enable(&base, &controllers).map_err(|e| e.to_string())?;
            return Ok(DockerParents {
                version: Version::V2,
                top,
                hierarchies: vec![(root.to_path_buf(), controllers)],
            });
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mut hierarchies = Vec::new();
        for line in mounts.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut r = right.split_whitespace();
            if r.next() != Some("cgroup") {
                continue;
            }
            let supers: Vec<&str> = r.nth(1).unwrap_or("").split(',').collect();
            let l: Vec<&str> = left.split_whitespace().collect();
            if l.len() < 5 || l[3] != "/" {
                continue;
            }
            let ctrls: Vec<&'static str> = V1_CONTROLLERS
                .into_iter()
                .filter(|c| supers.contains(c))
                .collect();
            hierarchies.push((PathBuf::from(l[4]), ctrls));
        }
        if !hierarchies.iter().any(|(_, c)| c.contains(&"memory")) {
            return Err("cgroup v1: the memory controller is not mounted".into());
        }
        for (dir, ctrls) in &hierarchies {
            if ctrls.contains(&"memory") || ctrls.contains(&"cpuacct") {
                mkdir(&dir.join(&top)).map_err(|e| e.to_string())?;
            }
        }
        Ok(DockerParents {
            version: Version::V1,
            top,
            hierarchies,
        })
    }

    /// `cgroup2` or `cgroup1`.
    pub fn label(&self) -> &'static str {
        match self.version {
            Version::V1 => "cgroup1",
            Version::V2 => "cgroup2",
        }
    }

    /// The parent of one run, holding `memory_bytes` (memory + swap) for the container's
    /// whole tree, with its OOM notification registered.
    pub fn create(&self, run: &str, memory_bytes: u64) -> io::Result<DockerParent> {
        let mut dirs = Vec::new();
        let mut all = Vec::new();
        for (root, ctrls) in &self.hierarchies {
            let path = root.join(&self.top).join(run);
            all.push(path.clone());
            let wanted: Vec<&'static str> = ctrls
                .iter()
                .copied()
                .filter(|c| matches!(*c, "memory" | "cpuacct" | "pids" | "cpu"))
                .collect();
            if self.version == Version::V1
                && !(ctrls.contains(&"memory") || ctrls.contains(&"cpuacct"))
            {
                continue;
            }
            mkdir(&path)?;
            dirs.push(Dir {
                path,
                controllers: wanted,
            });
        }
        let mut group = RunCgroup {
            version: self.version,
            dirs,
            oom_watch: None,
            oom_seen: Default::default(),
        };
        let set = || -> io::Result<()> {
            match self.version {
                Version::V2 => {
                    let d = &group.dirs[0];
                    enable(&d.path, &d.controllers)?;
                    write(&d.path.join("memory.max"), &memory_bytes.to_string())?;
                    let swap = d.path.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                Version::V1 => {
                    if let Some(m) = group.dir("memory") {
                        write(&m.join("memory.limit_in_bytes"), &memory_bytes.to_string())?;
                        let memsw = m.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &memory_bytes.to_string())?;
                        }
                    }
                }
            }
            Ok(())
        };
        let res = set().and_then(|_| group.watch_oom());
        let parent = DockerParent {
            cgroup_parent: format!("/{}/{run}", self.top),
            group,
            all,
        };
        if let Err(e) = res {
            parent.remove();
            return Err(e);
        }
        Ok(parent)
    }

    /// Remove parents left by a crash (after the engine removed their containers).
    pub fn reap(&self) {
        for (root, _) in &self.hierarchies {
            if let Ok(rd) = std::fs::read_dir(root.join(&self.top)) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        remove_tree(&e.path());
                    }
                }
            }
        }
    }
}

/// Remove an empty cgroup directory and its empty subdirectories, deepest first.
fn remove_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

impl DockerParent {
    /// Whether the engine put the container `id` under this parent (it does not when it
    /// uses another cgroup driver or another host's cgroups).
    pub fn holds(&self, id: &str) -> bool {
        let Some(d) = self.group.dir("memory") else {
            return false;
        };
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                        && e.file_name().to_string_lossy().contains(id)
                })
            })
            .unwrap_or(false)
    }

    /// What the kernel counted for the container's whole tree.
    pub fn usage(&self) -> CgroupUsage {
        self.group.usage()
    }

    /// Remove the parent in every hierarchy (call once the container is removed).
    pub fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for p in &self.all {
                remove_tree(p);
            }
            if self.all.iter().all(|p| !p.exists()) || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("memory.events");
        std::fs::write(&p, "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n").expect("write");
        assert_eq!(keyed(&p, "oom_kill"), Some(2));
        assert_eq!(keyed(&p, "oom"), Some(3));
        assert_eq!(keyed(&p, "missing"), None);
    }
}
