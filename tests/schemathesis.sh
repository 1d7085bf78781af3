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
