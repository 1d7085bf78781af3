#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis: the real binary,
# started with an API token on a loopback port with a throwaway data directory; every
# operation, every check, about 50 examples per operation, a fixed seed. It must report
# nothing: any failure, error or warning fails the run (exceptions are listed below, each
# with its reason).
#
#   tests/schemathesis.sh                 # uses target/debug/crucible (built if missing)
#   CRUCIBLE_BIN=path/to/crucible tests/schemathesis.sh
#
# schemathesis runs from its own virtualenv under target/ (PyPI, pinned version); Debian's
# python3-venv is installed when missing. Reports (JUnit) go to target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5            # schemathesis, pinned: a new release adds checks on its own schedule
SEED=20261201             # fixed, so a run is reproducible and CI time stays stable
EXAMPLES=50               # per operation and phase
OUT=$PWD/target/schemathesis
VENV=$PWD/target/schemathesis-venv

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
  echo "tests/schemathesis.sh: installing python3-venv"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $VERSION" ]; then
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi

BIN=${CRUCIBLE_BIN:-$PWD/target/debug/crucible}
if [ -z "${CRUCIBLE_BIN:-}" ]; then cargo build --quiet --bin crucible; fi

mkdir -p "$OUT"
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
# The limits the hooks (tests/schemathesis_hooks.py) need for the rules that relate
# several fields, written here and exported to them.
export CRUCIBLE_MAX_EVAL_SECS=600 CRUCIBLE_DEFAULT_TIMEOUT=2 CRUCIBLE_MAX_CODE_BYTES=65536
cat > "$work/crucible.toml" <<EOF
log_format = "human"
log_level = "warn"
[limits]
default_timeout_secs = $CRUCIBLE_DEFAULT_TIMEOUT
# A read with ?wait= waits for the evaluation to end (or max_wait_secs): keep both short,
# well inside schemathesis' request timeout.
max_timeout_secs = 5
max_wait_secs = 1
max_code_bytes = $CRUCIBLE_MAX_CODE_BYTES
[judge]
max_eval_secs = $CRUCIBLE_MAX_EVAL_SECS
EOF
CRUCIBLE_API_TOKEN=$token "$BIN" serve --config "$work/crucible.toml" --data-dir "$work/data" \
  --listen 127.0.0.1:0 > "$OUT/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do [ -s "$work/data/listen.addr" ] && break; sleep 0.1; done
[ -s "$work/data/listen.addr" ] || { echo "the server did not start:" >&2; cat "$OUT/server.log" >&2; exit 1; }
base="http://$(cat "$work/data/listen.addr")"

# Real evaluations, for the operations that take one's id in the path (`{id}`): without
# them every id schemathesis makes up names nothing (404), and only its stateful phase,
# following the links from a submission, ever reads a record. How many links that phase
# covers moves with the ids the server hands out (they begin with the time): 5 to 14 of 22
# with the same seed; when it missed GET /api/eval-status/{id}, schemathesis warned "Missing
# test data" and the run failed at random. So each such path is given (below, in the
# configuration) the id of an evaluation made here through the API and waited for until
# it ended: every phase then reads a real record, whatever the stateful phase reaches.
# Each path gets an outcome of its own, so that the record's shapes are all checked
# against the schema. A terminal evaluation never changes, so the answers stay the same
# for the whole run, and no other operation can undo them (a paused queue, say). The
# stateful phase uses these ids too (a configured value wins over the one a link
# supplies): its read or cancel after a submission reads or cancels these, not the new one.
api() {
  curl -sS --fail-with-body --max-time 10 -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' "$@"
}
field() { /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
submit() { api -d "$1" "$base/api/eval" | field eval_id; }
ended() {  # ended ID STATUS: waits (?wait= holds the answer up to max_wait_secs) for STATUS
  local status=
  for _ in $(seq 1 30); do
    status=$(api "$base/api/eval/$1?wait=1" | field status)
    case $status in queued|running) ;; *) break ;; esac
  done
  [ "$status" = "$2" ] || { echo "evaluation $1 ended $status, not $2" >&2; exit 1; }
}
completed_id=$(submit '{"code": "print(\"hello\")", "language": "python"}')
ended "$completed_id" completed
failed_id=$(submit '{"code": "import sys; sys.exit(3)", "language": "python"}')
ended "$failed_id" failed
judged_id=$(submit '{"code": "print(int(input()) * 2)", "language": "python",
  "tests": [{"name": "double", "stdin": "21", "expected_output": "42"},
            {"name": "wrong", "stdin": "1", "expected_output": "3"}]}')
ended "$judged_id" completed
# Cancelled while it sleeps; cancelling it again is 409 already_terminal (documented).
cancelled_id=$(submit '{"code": "import time; time.sleep(5)", "language": "python", "timeout": 5}')
api -X POST "$base/api/eval/$cancelled_id/cancel" > /dev/null
ended "$cancelled_id" cancelled

# Project configuration: every warning fails the run, except where an operation says why.
cat > "$work/schemathesis.toml" <<'EOF'
request-timeout = 10

[warnings]
fail-on = true

# An invalid body larger than http.max_body_bytes is refused for its size before it is
# read (413, documented on every operation with a body); schemathesis's default list of
# rejections lacks 413.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# The event stream never ends: read a few events, or stop waiting after a second.
[[operations]]
include-path = "/api/events"
request-timeout = 1
max-stream-events = 10

# A replay needs the name of a configured sink and a seq inside the retained log, which
# move with the server's state; no document can name them, so every generated call is a
# 404 (no such sink) or a 422 (outside the window), as documented.
[[operations]]
include-path = "/api/admin/sinks/{name}/replay"
warnings = { display = [], fail-on = false }
EOF
# The evaluations made above, one per path that takes an id (see there).
cat >> "$work/schemathesis.toml" <<EOF

[[operations]]
include-path = "/api/eval/{id}"
parameters = { "path.id" = "$completed_id" }

[[operations]]
include-path = "/api/eval-status/{id}"
parameters = { "path.id" = "$failed_id" }

[[operations]]
include-path = "/api/eval/{id}/status"
parameters = { "path.id" = "$judged_id" }

[[operations]]
include-path = "/api/eval/{id}/cancel"
parameters = { "path.id" = "$cancelled_id" }
EOF

echo "== schemathesis $VERSION against $base (seed $SEED, $EXAMPLES examples per operation)"
# From $OUT: schemathesis keeps its cache (.schemathesis/) in the working directory.
cd "$OUT"
SCHEMATHESIS_HOOKS=$PWD/../../tests/schemathesis_hooks.py \
"$VENV/bin/schemathesis" --config-file "$work/schemathesis.toml" run "$base/api/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --report junit --report-dir "$OUT" \
  --output-sanitize true
echo "== schemathesis: nothing to report"
