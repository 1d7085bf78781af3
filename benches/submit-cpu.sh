#!/usr/bin/env bash
# The server's CPU time per durable submission, independent of how busy the machine is:
# starts BIN with the queue paused on a throwaway data dir, sends 200 warm-up submissions,
# then N sequential ones on one keep-alive connection (Python's http.client) while
# `perf stat -e task-clock` counts the server process's CPU time (every thread: HTTP,
# the store writer, sled's flush).
#
#   benches/submit-cpu.sh target/x86_64-unknown-linux-musl/release/crucible [N] [PORT]
set -euo pipefail
bin=$1
n=${2:-20000}
port=${3:-18950}
d=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$d"' EXIT
printf 'start_paused = true\nmax_queued = 100000000\nlog_level = "warn"\nlog_format = "human"\n' > "$d/c.toml"
"$bin" serve --config "$d/c.toml" --data-dir "$d/data" --listen "127.0.0.1:$port" > "$d/log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s "$d/data/listen.addr" ] && break; sleep 0.1; done
cat > "$d/load.py" <<'EOF'
import http.client, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
body = json.dumps({"code": "print(1)", "language": "python", "timeout": 5})
t = time.time()
for _ in range(n):
    c.request("POST", "/api/eval", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 202, r.status
print(f"{n / (time.time() - t):.0f} submissions/s")
EOF
python3 "$d/load.py" "$port" 200 > /dev/null
perf stat -e task-clock -p "$pid" -o "$d/perf.txt" &
perf=$!
python3 "$d/load.py" "$port" "$n"
kill -INT "$perf"
wait "$perf" 2>/dev/null || true
awk -v n="$n" '/task-clock/ {printf "server CPU %.1f us per submission\n", $1 * 1000 / n}' "$d/perf.txt"
