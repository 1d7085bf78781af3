#!/bin/bash
# The checks inside the test VM (tests/vm/run.sh boots it; Debian 12's kernel, systemd as
# PID 1, cgroup v2, no network). Runs as root from the test disk, next to old.deb and
# new.deb. Prints one line per assertion, `ok - <what>` or `not ok - <what>` followed by
# the evidence (lines starting with "#"), then a summary and the final marker
# `CRUCIBLE-VM-TEST: PASS` (or FAIL) that run.sh looks for.
#
# Adding a check: write a function check_<name> that calls ok/not_ok (as many times as
# it has assertions) and add <name> to CHECKS below, in order. Checks share state through
# globals (EVAL_C: the id of the first evaluation) and run even after an earlier failure;
# a check that needs the service calls `need_service <what> || return 0`.
set -u
DIR=$(cd "$(dirname "$0")" && pwd)
OLD_DEB=$DIR/old.deb
NEW_DEB=$DIR/new.deb
URL=http://127.0.0.1:8080
W=/root/vm-test
mkdir -p "$W"
cd "$W"

CHECKS=(
  cgroup2_and_systemd      # a
  install_old              # b
  submit_print             # c
  health_and_cgroups       # d
  containment              # e
  judged_sessions          # e2
  journald_fields          # f
  security_exposure        # g
  stop_while_running       # h
  crash_restart            # i
  upgrade                  # j
  purge                    # k
)

PASSED=0
FAILED=0
FAILURES=()
ok() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
# not_ok WHAT [EVIDENCE...]: each evidence argument (and stdin, when not a terminal and
# no argument is given) is printed indented under "#".
not_ok() {
  local what=$1; shift
  FAILED=$((FAILED + 1))
  FAILURES+=("$what")
  echo "not ok - $what"
  if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi | sed 's/^/#   /'
}
# check WHAT EVIDENCE-COMMAND -- TEST-COMMAND...: ok when the test command succeeds,
# else not ok with the evidence command's output.
check() {
  local what=$1 evidence=$2; shift 3
  if "$@"; then ok "$what"; else not_ok "$what" "$(eval "$evidence" 2>&1)"; fi
}
note() { echo "# $*"; }

# Reads a value from a JSON file: jv FILE a.b.c (strings raw, null as "null").
jv() {
  python3 - "$@" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"<not json: {e}>"); sys.exit(0)
for k in sys.argv[2].split("."):
    d = d.get(k) if isinstance(d, dict) else None
print("null" if d is None else d if isinstance(d, str) else json.dumps(d))
PY
}
# wait_until SECONDS COMMAND...: polls every 0.2 s.
wait_until() {
  local deadline=$(( $(date +%s%N) + $1 * 1000000000 )); shift
  until "$@"; do
    [ "$(date +%s%N)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
is_active() { [ "$(systemctl is-active crucible 2>/dev/null)" = active ]; }
service_cgroup() { echo "/sys/fs/cgroup$(systemctl show -p ControlGroup --value crucible)"; }
main_pid() { systemctl show -p MainPID --value crucible; }
unit_log() { journalctl -u crucible --no-pager -n "${1:-15}" -o short-monotonic 2>&1; }
need_service() {
  if is_active; then return 0; fi
  not_ok "$1 (skipped: crucible is not active)" "$(systemctl status crucible --no-pager 2>&1 | head -20)"
  return 1
}
# submit NAME TIMEOUT: submits $W/NAME.py with the CLI, waits, leaves the record in
# $W/NAME.json and the CLI's exit code in $W/NAME.rc.
submit() {
  local name=$1 timeout=$2
  timeout 180 crucible submit "$W/$name.py" --language python --timeout "$timeout" --wait \
    > "$W/$name.json" 2> "$W/$name.err"
  echo $? > "$W/$name.rc"
}
# record NAME: the record's interesting fields, for evidence.
record() {
  python3 - "$W/$1.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    print(open(sys.argv[1]).read()[:2000]); sys.exit(0)
for k in ("eval_id", "status", "failure_reason", "exit_code", "runtime_ms", "cpu_ms",
          "memory_peak_kb", "error", "limits"):
    print(f"{k}: {json.dumps(r.get(k))}")
print("output: " + json.dumps((r.get("output") or "")[-400:]))
print("stderr: " + json.dumps((r.get("stderr") or "")[-600:]))
PY
  [ -s "$W/$1.err" ] && sed 's/^/cli stderr: /' "$W/$1.err" | head -5
}
api() { curl -sS --max-time 10 "$@"; }
# eval_status ID: the status of an evaluation, read over HTTP.
eval_status() { api "$URL/api/eval/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))' 2>/dev/null; }

# ---------------------------------------------------------------------------------------
# a. The kernel is cgroup v2 and PID 1 is systemd.
check_cgroup2_and_systemd() {
  note "kernel $(uname -r), systemd $(systemctl --version | head -1 | cut -d' ' -f2)"
  check "kernel booted the cgroup v2 unified hierarchy (/sys/fs/cgroup/cgroup.controllers)" \
    'grep cgroup /proc/mounts; cat /proc/cmdline' -- \
    test -f /sys/fs/cgroup/cgroup.controllers -a "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs
  check "cgroup v2 has the memory, pids and cpu controllers" \
    'cat /sys/fs/cgroup/cgroup.controllers' -- \
    bash -c 'for c in memory pids cpu; do grep -qw $c /sys/fs/cgroup/cgroup.controllers || exit 1; done'
  check "PID 1 is systemd" 'ls -l /proc/1/exe; cat /proc/1/comm' -- \
    bash -c '[ "$(cat /proc/1/comm)" = systemd ] && readlink /proc/1/exe | grep -q systemd'
}

# b. Offline install of the old package; the unit starts and reports READY=1.
check_install_old() {
  check "the VM has no network device (only lo): the install is offline" 'ip -o link' -- \
    bash -c '[ "$(ip -o link | grep -cv " lo:")" -eq 0 ]'
  local out rc
  out=$(DEBIAN_FRONTEND=noninteractive dpkg -i "$OLD_DEB" </dev/null 2>&1); rc=$?
  if [ $rc -eq 0 ]; then ok "dpkg -i old.deb installs with only what is in the image"
  else not_ok "dpkg -i old.deb installs with only what is in the image" "exit $rc" "$out"; fi
  check "installed version is 0.1.0-0test1" "dpkg -l crucible" -- \
    test "$(dpkg-query -W -f='${Version}' crucible 2>/dev/null)" = 0.1.0-0test1
  if wait_until 60 is_active; then
    ok "systemctl is-active crucible: active (Type=notify: READY=1 arrived)"
  else
    not_ok "systemctl is-active crucible: active (Type=notify: READY=1 arrived)" \
      "$(systemctl status crucible --no-pager 2>&1 | head -20)" "$(unit_log 30)"
  fi
  local st
  st=$(systemctl show -p StatusText --value crucible)
  note "StatusText=$st"
  if grep -q serving <<<"$st"; then ok "StatusText mentions \"serving\""
  else not_ok "StatusText mentions \"serving\"" "StatusText=$st"; fi
}

# c. A first evaluation through the CLI.
EVAL_C=
check_submit_print() {
  need_service "crucible submit print(1) --wait completes" || return 0
  echo 'print(1)' > "$W/c.py"
  submit c 10
  EVAL_C=$(jv "$W/c.json" eval_id)
  note "eval_id $EVAL_C"
  if [ "$(cat "$W/c.rc")" = 0 ] && [ "$(jv "$W/c.json" status)" = completed ] \
     && [ "$(jv "$W/c.json" output)" = 1 ] \
     && python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["output"] != "1\n")' "$W/c.json"; then
    ok "crucible submit print(1) --wait: completed, output \"1\\n\""
  else
    not_ok "crucible submit print(1) --wait: completed, output \"1\\n\"" \
      "cli exit $(cat "$W/c.rc")" "$(record c)"
  fi
}

# d. /health says cgroup2; the delegated subtree has appliance/ (the main PID) and runs/.
check_health_and_cgroups() {
  need_service "/health and the service's cgroup subtree" || return 0
  api "$URL/health" > "$W/health.json"
  local limits
  limits=$(jv "$W/health.json" executor.limits)
  if [ "$limits" = cgroup2 ]; then ok "GET /health: executor.limits is cgroup2"
  else not_ok "GET /health: executor.limits is cgroup2" "executor.limits=$limits" \
    "$(jv "$W/health.json" executor)"; fi
  local cg pid
  cg=$(service_cgroup); pid=$(main_pid)
  note "service cgroup $cg, main PID $pid"
  check "the service's cgroup has runs/ and appliance/" "ls -la $cg" -- \
    test -d "$cg/runs" -a -d "$cg/appliance"
  check "the main PID is in appliance/" \
    "echo /proc/$pid/cgroup:; cat /proc/$pid/cgroup; echo appliance/cgroup.procs:; cat $cg/appliance/cgroup.procs" -- \
    grep -qx "$pid" "$cg/appliance/cgroup.procs"
  check "the delegated subtree enables memory, pids and cpu for runs/" \
    "echo runs/cgroup.controllers: \$(cat $cg/runs/cgroup.controllers)" -- \
    bash -c "for c in memory pids cpu; do grep -qw \$c $cg/runs/cgroup.controllers || exit 1; done"
}

# e. Containment of a run's whole process tree by its cgroup.
check_containment() {
  need_service "cgroup containment of runs" || return 0
  local cg=$(service_cgroup)

  # (0) The run's cgroup while it runs: memory.max, memory.swap.max, pids.max, cpu.max.
  cat > "$W/e0.py" <<'EOF'
import time
time.sleep(4)
print("done")
EOF
  submit e0 20 &
  local spid=$! run=
  # The pooled sandboxes wait in run-* cgroups of their own with small limits; the one
  # that took this run has the run's limits.
  wait_until 10 bash -c "grep -lx $((256 * 1024 * 1024)) $cg/runs/run-*/memory.max >/dev/null 2>&1" \
    && run=$(dirname "$(grep -lx $((256 * 1024 * 1024)) "$cg"/runs/run-*/memory.max | head -1)")
  if [ -n "$run" ]; then
    local mem swap pids cpu
    mem=$(cat "$run/memory.max" 2>&1); swap=$(cat "$run/memory.swap.max" 2>&1)
    pids=$(cat "$run/pids.max" 2>&1); cpu=$(cat "$run/cpu.max" 2>&1)
    note "${run#/sys/fs/cgroup}: memory.max=$mem memory.swap.max=$swap pids.max=$pids cpu.max=$cpu"
    if [ "$mem" = $((256 * 1024 * 1024)) ] && [ "$swap" = 0 ] && [ "$pids" = 66 ] \
       && [ "$(awk '{print $1 / $2}' <<<"$cpu")" = 1 ]; then
      ok "a run's cgroup (runs/run-*): memory.max 256 MiB, memory.swap.max 0, pids.max 66, cpu.max 1 CPU"
    else
      not_ok "a run's cgroup (runs/run-*): memory.max 256 MiB, memory.swap.max 0, pids.max 66, cpu.max 1 CPU" \
        "memory.max=$mem memory.swap.max=$swap pids.max=$pids cpu.max=$cpu"
    fi
  else
    not_ok "a run's cgroup appears under runs/ while it runs" "$(ls -la "$cg/runs" 2>&1)"
  fi
  wait $spid

  # (1) 12 children x 200 MiB, touched: the tree's cap (256 MiB) is what stops them.
  cat > "$W/e1.py" <<'EOF'
import os, sys, time
kids = []
for i in range(12):
    pid = os.fork()
    if pid == 0:
        b = b"\x01" * (200 << 20)   # allocated and written: 200 MiB resident
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
bad = 0
for pid in kids:
    _, status = os.waitpid(pid, 0)
    bad += status != 0
print(f"{bad} of 12 children failed")
sys.exit(1 if bad else 0)
EOF
  submit e1 60
  local st fr peak
  st=$(jv "$W/e1.json" status); fr=$(jv "$W/e1.json" failure_reason); peak=$(jv "$W/e1.json" memory_peak_kb)
  note "12 x 200 MiB: status=$st failure_reason=$fr memory_peak_kb=$peak"
  if [ "$st" = failed ] && [ "$fr" = memory_limit ]; then
    ok "12 children x 200 MiB: failed with failure_reason memory_limit"
  else
    not_ok "12 children x 200 MiB: failed with failure_reason memory_limit" "$(record e1)"
  fi
  if [[ $peak =~ ^[0-9]+$ ]] && [ "$peak" -le $((256 * 1024 + 8192)) ]; then
    ok "12 children x 200 MiB: memory_peak_kb $peak <= 256 MiB + 8 MiB"
  else
    not_ok "12 children x 200 MiB: memory_peak_kb <= 256 MiB + 8 MiB" "$(record e1)"
  fi

  # (2) A fork bomb of sleepers stops below max_processes + 2.
  cat > "$W/e2.py" <<'EOF'
import os, time
n = 0
try:
    while n < 10000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.strerror)
else:
    print(n, "never failed")
EOF
  submit e2 30
  local out n
  out=$(jv "$W/e2.json" output); n=${out%% *}
  note "fork bomb: output=${out//$'\n'/ } status=$(jv "$W/e2.json" status) runtime_ms=$(jv "$W/e2.json" runtime_ms)"
  if [[ $n =~ ^[0-9]+$ ]] && [ "$n" -lt 66 ] && [ "$n" -gt 0 ] && ! grep -q never <<<"$out"; then
    ok "fork bomb stopped at $n processes (< 64 + 2)"
  else
    not_ok "fork bomb stopped below 64 + 2 processes" "$(record e2)"
  fi

  # (3) 8 processes burning CPU for 2 s of wall time: the 1-CPU quota holds (2 vCPUs).
  cat > "$W/e3.py" <<'EOF'
import os, time
for i in range(8):
    if os.fork() == 0:
        end = time.time() + 2
        while time.time() < end:
            pass
        os._exit(0)
for i in range(8):
    os.wait()
print("burnt")
EOF
  submit e3 30
  local cpu rt
  cpu=$(jv "$W/e3.json" cpu_ms); rt=$(jv "$W/e3.json" runtime_ms)
  note "8 burners: cpu_ms=$cpu runtime_ms=$rt status=$(jv "$W/e3.json" status)"
  if [[ $cpu =~ ^[0-9]+$ ]] && [[ $rt =~ ^[0-9]+$ ]] && [ "$cpu" -gt 0 ] \
     && [ $((cpu * 2)) -le $((rt * 3)) ] && [ "$(jv "$W/e3.json" status)" = completed ]; then
    ok "8 CPU burners: cpu_ms $cpu <= 1.5 x runtime_ms $rt (1-CPU quota)"
  else
    not_ok "8 CPU burners: cpu_ms <= 1.5 x runtime_ms (1-CPU quota)" "$(record e3)"
  fi

  # (4) Timeout: the whole tree dies, even a setsid'd child, and the cgroup goes away.
  local marker="3600.$$$RANDOM"
  cat > "$W/e4.py" <<EOF
import subprocess
subprocess.Popen(["sleep", "$marker"], start_new_session=True)
while True:
    pass
EOF
  submit e4 1
  st=$(jv "$W/e4.json" status); fr=$(jv "$W/e4.json" failure_reason)
  if [ "$st" = failed ] && [ "$fr" = timeout ]; then
    ok "timeout 1 with a background child and a busy loop: failed with failure_reason timeout"
  else
    not_ok "timeout 1 with a background child and a busy loop: failed with failure_reason timeout" "$(record e4)"
  fi
  # (matched on the exact argv, so that neither this shell nor pgrep match themselves)
  local left='ps -eo pid=,ppid=,cgroup=,args= | awk -v m="'$marker'" '"'"'$4 == "sleep" && $5 == m'"'"
  if wait_until 5 bash -c "[ -z \"\$($left)\" ]"; then
    ok "no process left behind by the timed-out run (sleep $marker)"
  else
    not_ok "no process left behind by the timed-out run (sleep $marker)" "$(bash -c "$left")"
  fi
  # Left: only the pool's waiting sandboxes (at most one per worker, 2 here), none with
  # a run's limits.
  if wait_until 5 bash -c "! grep -lx $((256 * 1024 * 1024)) $cg/runs/run-*/memory.max >/dev/null 2>&1 \
       && [ \$(ls -d $cg/runs/run-* 2>/dev/null | wc -l) -le 2 ]"; then
    ok "the run's cgroup is removed (runs/ holds only the pool's waiting sandboxes)"
  else
    not_ok "the run's cgroup is removed (runs/ holds only the pool's waiting sandboxes)" \
      "$(for d in "$cg"/runs/run-*; do echo "$d: procs=[$(cat "$d/cgroup.procs" | tr '\n' ' ')] events=[$(tr '\n' ' ' < "$d/cgroup.events")]"; done)"
  fi

  # (5) CPU accounting: a 200 ms busy loop.
  cat > "$W/e5.py" <<'EOF'
import time
t = time.process_time()
while time.process_time() - t < 0.2:
    pass
print("200ms")
EOF
  submit e5 10
  cpu=$(jv "$W/e5.json" cpu_ms)
  if [[ $cpu =~ ^[0-9]+$ ]] && [ "$cpu" -ge 150 ] && [ "$cpu" -le 1000 ]; then
    ok "200 ms busy loop: cpu_ms $cpu in [150, 1000]"
  else
    not_ok "200 ms busy loop: cpu_ms in [150, 1000]" "$(record e5)"
  fi

  # (6) With a cgroup the address-space rlimit is lifted: reserving 8 GiB works.
  cat > "$W/e6.py" <<'EOF'
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
MAP_NORESERVE = 0x4000
PROT_NONE = 0                # (the mmap module has no PROT_NONE)
p = libc.mmap(None, 8 << 30, PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
if p is None or p == ctypes.c_void_p(-1).value:
    print("mmap failed, errno", ctypes.get_errno())
    sys.exit(1)
print("reserved 8 GiB")
EOF
  submit e6 10
  if [ "$(jv "$W/e6.json" status)" = completed ] && grep -q "reserved 8 GiB" <<<"$(jv "$W/e6.json" output)"; then
    ok "8 GiB PROT_NONE reservation completes (no address-space rlimit under a cgroup)"
  else
    not_ok "8 GiB PROT_NONE reservation completes (no address-space rlimit under a cgroup)" "$(record e6)"
  fi
}

# e2. An evaluation's tests in one sandbox under cgroup v2: per-test verdicts, a fresh /tmp
# per test, and per-test peaks (v2 cannot reset memory.peak: the test's largest process).
check_judged_sessions() {
  need_service "judged tests in one sandbox" || return
  cat > "$W/s1.py" <<'EOF'
import os, sys
mode = sys.stdin.read().strip()
seen = sorted(os.listdir("/tmp"))
open("/tmp/left-by-a-test", "w").write("x")
if mode == "big":
    data = b"\x01" * (100 << 20)
elif mode == "hog":
    chunks = []
    while True:
        chunks.append(b"\x01" * (1 << 20))
print(mode, seen)
EOF
  cat > "$W/s1.tests.json" <<'EOF'
[{"stdin": "big", "expected_output": "big []"},
 {"stdin": "small", "expected_output": "small []"},
 {"stdin": "hog", "expected_output": "never"},
 {"stdin": "small", "expected_output": "small []"}]
EOF
  timeout 180 crucible submit "$W/s1.py" --language python --tests "$W/s1.tests.json" \
    --timeout 20 --wait > "$W/s1.json" 2> "$W/s1.err"
  local got v1 v2 v3 v4 p1 p2
  got=$(python3 - "$W/s1.json" <<'PY'
import json, sys
try:
    t = json.load(open(sys.argv[1])).get("tests") or []
except Exception:
    t = []
print(" ".join(str(x.get("verdict")) for x in t), *(x.get("memory_peak_kb") for x in t))
PY
)
  note "judged in one sandbox: $got"
  read -r v1 v2 v3 v4 p1 p2 _ <<<"$got"
  if [ "$v1 $v2 $v3 $v4" = "accepted accepted memory_limit accepted" ]; then
    ok "four tests: accepted, accepted (fresh /tmp), memory_limit, accepted after it"
  else
    not_ok "four tests: accepted, accepted (fresh /tmp), memory_limit, accepted after it" \
      "$got" "$(record s1)"
  fi
  if [[ $p1 =~ ^[0-9]+$ && $p2 =~ ^[0-9]+$ ]] && [ "$p1" -ge $((100 * 1024)) ] \
    && [ "$p2" -lt $((50 * 1024)) ]; then
    ok "per-test peaks: $p1 KiB for the 100 MiB test, $p2 KiB for the next"
  else
    not_ok "per-test peaks: >= 100 MiB, then < 50 MiB" "$got"
  fi
}

# f. Structured logs: journald fields without a prefix.
check_journald_fields() {
  if [ -z "$EVAL_C" ] || [ "$EVAL_C" = null ]; then
    not_ok "journalctl -u crucible EVAL_ID=<id> (skipped: no evaluation from (c))"; return 0
  fi
  local n
  n=$(journalctl -u crucible --no-pager -o cat "EVAL_ID=$EVAL_C" 2>/dev/null | wc -l)
  if [ "$n" -ge 1 ]; then
    ok "journalctl -u crucible EVAL_ID=$EVAL_C: $n lines"
  else
    local why="no line for EVAL_ID=$EVAL_C"
    if journalctl -u crucible --no-pager -o cat "F_EVAL_ID=$EVAL_C" 2>/dev/null | grep -q .; then
      why="$why, but F_EVAL_ID=$EVAL_C matches: the fields carry an F_ prefix"
    fi
    not_ok "journalctl -u crucible EVAL_ID=<id of (c)> returns at least one line" \
      "$why; the fields of the journal entries that carry the id:" \
      "$(journalctl -u crucible --no-pager -o json | grep -F "$EVAL_C" | head -2 \
         | python3 -c 'import json,sys
for l in sys.stdin:
    e = json.loads(l)
    print({k: v for k, v in e.items() if not k.startswith("_") and k not in ("__CURSOR", "__REALTIME_TIMESTAMP", "__MONOTONIC_TIMESTAMP")})')"
  fi
}

# g. The unit's exposure, as systemd itself rates the installed unit.
check_security_exposure() {
  local out score
  out=$(systemd-analyze security crucible --no-pager 2>&1)
  score=$(sed -n 's/.*Overall exposure level for crucible.service: \([0-9.]*\).*/\1/p' <<<"$out")
  if [ -n "$score" ]; then
    ok "systemd-analyze security crucible: exposure $score (offline score of the unit: 2.1)"
  else
    not_ok "systemd-analyze security crucible prints the exposure" "$(tail -5 <<<"$out")"
  fi
}

# h. systemctl stop with a running evaluation: it is recorded interrupted.
EVAL_H=
check_stop_while_running() {
  need_service "stop with a running evaluation" || return 0
  local id st t0 t1 rc
  id=$(api -X POST "$URL/api/eval" -H 'Content-Type: application/json' \
    -d '{"code": "import time\ntime.sleep(60)\n", "language": "python", "timeout": 120}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["eval_id"])' 2>&1)
  EVAL_H=$id
  note "eval_id $id"
  if wait_until 20 eval "[ \"\$(eval_status $id)\" = running ]"; then
    ok "the 60 s sleep is running"
  else
    not_ok "the 60 s sleep is running" "$(api "$URL/api/eval/$id")"
  fi
  t0=$(date +%s%N)
  timeout 60 systemctl stop crucible; rc=$?
  t1=$(date +%s%N)
  local ms=$(( (t1 - t0) / 1000000 ))
  if [ $rc -eq 0 ] && [ $ms -le 35000 ]; then
    ok "systemctl stop returned in ${ms} ms (TimeoutStopSec=30 + 5 s margin)"
  else
    not_ok "systemctl stop returns within TimeoutStopSec=30 + 5 s margin" "exit $rc after ${ms} ms" "$(unit_log 20)"
  fi
  note "after stop: $(systemctl show -p Result -p ExecMainStatus crucible | tr '\n' ' ')"
  systemctl start crucible
  if wait_until 60 is_active; then ok "crucible starts again"
  else not_ok "crucible starts again" "$(unit_log 30)"; fi
  api "$URL/api/eval/$id" > "$W/h.json"
  st=$(jv "$W/h.json" status)
  if [ "$st" = failed ] && [ "$(jv "$W/h.json" failure_reason)" = interrupted ]; then
    ok "the evaluation running at stop is failed/interrupted"
  else
    not_ok "the evaluation running at stop is failed/interrupted" "$(record h)"
  fi
}

# i. kill -9 of the main PID: Restart=on-failure brings it back with its data.
check_crash_restart() {
  need_service "kill -9 and restart" || return 0
  local pid new n0 n1
  pid=$(main_pid); n0=$(systemctl show -p NRestarts --value crucible)
  kill -9 "$pid"
  if wait_until 30 bash -c "[ \"\$(systemctl is-active crucible)\" = active ] && p=\$(systemctl show -p MainPID --value crucible) && [ \"\$p\" != 0 ] && [ \"\$p\" != $pid ]"; then
    new=$(main_pid); n1=$(systemctl show -p NRestarts --value crucible)
    ok "after kill -9 of $pid systemd restarted crucible (main PID $new, NRestarts $n0 -> $n1)"
  else
    not_ok "after kill -9 systemd restarts crucible (Restart=on-failure)" "$(systemctl status crucible --no-pager 2>&1 | head -15)" "$(unit_log 20)"
    return 0
  fi
  if [ -n "$EVAL_C" ] && timeout 30 crucible status "$EVAL_C" > "$W/i_old.json" 2>&1 \
     && [ "$(jv "$W/i_old.json" status)" = completed ]; then
    ok "the earlier record ($EVAL_C) is still there, completed"
  else
    not_ok "the earlier record from (c) is still there, completed" "$(cat "$W/i_old.json")"
  fi
  if [ -n "$EVAL_H" ] && api "$URL/api/eval/$EVAL_H" > "$W/i_h.json" \
     && [ "$(jv "$W/i_h.json" failure_reason)" = interrupted ]; then
    ok "the record interrupted in (h) is still there, failed/interrupted"
  else
    not_ok "the record interrupted in (h) is still there, failed/interrupted" "$(cat "$W/i_h.json" 2>&1)"
  fi
  echo 'print("after the crash")' > "$W/i.py"
  submit i 10
  if [ "$(cat "$W/i.rc")" = 0 ] && [ "$(jv "$W/i.json" output)" = "after the crash" ]; then
    ok "a new submission completes after the restart"
  else
    not_ok "a new submission completes after the restart" "$(record i)"
  fi
}

# j. Upgrade to the new package: conffile edit kept, service back, data kept.
check_upgrade() {
  local conf=/etc/crucible/crucible.toml out rc
  sed -i 's/^workers = 2$/workers = 3/' "$conf"
  check "operator edit in $conf: workers = 3" "grep -n '^workers' $conf" -- grep -qx 'workers = 3' "$conf"
  out=$(DEBIAN_FRONTEND=noninteractive dpkg -i "$NEW_DEB" </dev/null 2>&1); rc=$?
  if [ $rc -eq 0 ]; then ok "dpkg -i new.deb (upgrade) succeeds"
  else not_ok "dpkg -i new.deb (upgrade) succeeds" "exit $rc" "$out"; fi
  check "installed version is 0.1.0-1" "dpkg -l crucible" -- \
    test "$(dpkg-query -W -f='${Version}' crucible 2>/dev/null)" = 0.1.0-1
  check "the conffile edit is kept (workers = 3)" "grep -n '^workers' $conf; ls -l /etc/crucible" -- \
    grep -qx 'workers = 3' "$conf"
  if wait_until 60 is_active; then ok "crucible is active again after the upgrade"
  else not_ok "crucible is active again after the upgrade" "$(unit_log 30)"; return 0; fi
  api "$URL/health" > "$W/j_health.json"
  check "the running service uses the edit (/health queue.workers = 3)" \
    "cat $W/j_health.json" -- test "$(jv "$W/j_health.json" queue.workers)" = 3
  if [ -n "$EVAL_C" ] && timeout 30 crucible status "$EVAL_C" > "$W/j_old.json" 2>&1 \
     && [ "$(jv "$W/j_old.json" status)" = completed ] && [ "$(jv "$W/j_old.json" output)" = 1 ]; then
    ok "the record from (c) survives the upgrade"
  else
    not_ok "the record from (c) survives the upgrade" "$(cat "$W/j_old.json")"
  fi
}

# k. Purge: unit, state and configuration are gone.
check_purge() {
  local out rc
  out=$(DEBIAN_FRONTEND=noninteractive dpkg --purge crucible </dev/null 2>&1); rc=$?
  if [ $rc -eq 0 ]; then ok "dpkg --purge crucible succeeds"
  else not_ok "dpkg --purge crucible succeeds" "exit $rc" "$out"; fi
  check "the service is gone (not active, no unit file)" \
    'systemctl status crucible --no-pager 2>&1 | head -5; systemctl list-unit-files crucible.service' -- \
    bash -c '! systemctl is-active -q crucible && [ -z "$(systemctl list-unit-files --no-legend crucible.service)" ] && [ ! -e /lib/systemd/system/crucible.service ]'
  check "no crucible process is left" 'ps -eo pid,args | grep -i [c]rucible' -- \
    bash -c '! pgrep -x crucible >/dev/null'
  check "/var/lib/crucible and /var/lib/private/crucible are gone" \
    'ls -la /var/lib/crucible /var/lib/private/crucible' -- \
    test ! -e /var/lib/crucible -a ! -e /var/lib/private/crucible
  check "/etc/crucible is gone" 'ls -la /etc/crucible' -- test ! -e /etc/crucible
  check "/usr/bin/crucible is gone" 'ls -l /usr/bin/crucible' -- test ! -e /usr/bin/crucible
}

# ---------------------------------------------------------------------------------------
only=${CRUCIBLE_VM_CHECKS:-}
for c in "${CHECKS[@]}"; do
  if [ -n "$only" ] && ! grep -qw "$c" <<<"$only"; then continue; fi
  echo "# --- $c"
  t0=$(date +%s%N)
  "check_$c"
  note "$c took $(( ($(date +%s%N) - t0) / 1000000 )) ms"
done

echo
echo "# $((PASSED + FAILED)) assertions: $PASSED ok, $FAILED not ok"
for f in "${FAILURES[@]}"; do echo "#   not ok - $f"; done
if [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]; then
  echo "CRUCIBLE-VM-TEST: PASS"
  exit 0
fi
echo "CRUCIBLE-VM-TEST: FAIL"
exit 1
