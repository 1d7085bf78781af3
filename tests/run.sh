#!/usr/bin/env bash
# The one test command: installs what the tests need (Debian packages, when missing),
# then checks formatting and lints and runs every test (unit + integration, which start
# the real binary on loopback ports). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The sandbox runs the host's interpreters read-only: python3 and sh (dash). The Redis
# and PostgreSQL tests start their own servers on loopback ports.
missing=()
[ -x /usr/bin/python3 ] || missing+=(python3)
[ -x /bin/sh ] || missing+=(dash)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
# The PostgreSQL tests run their own cluster (initdb + pg_ctl) on a loopback port.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# The web UI tests drive a headless Chromium over WebDriver.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v promtool >/dev/null || missing+=(prometheus)   # promtool checks /metrics
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  as_root apt-get update -qq
  # policy-rc.d 101: do not start the packaged services; tests run their own instances.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The sandbox needs unprivileged user namespaces; say so plainly if they are off.
if command -v unshare >/dev/null && ! unshare --user --map-root-user true 2>/dev/null; then
  echo "tests/run.sh: user namespaces are not available here (see README, 'Requirements')" >&2
  exit 1
fi

# The Docker tests (and the packaging tests) need a Debian image with python3; no registry
# is reachable, so it is built with debootstrap and cached.
command -v docker >/dev/null || { echo "tests/run.sh: the tests need Docker" >&2; exit 1; }
tests/images.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test -- --test-threads="${TEST_THREADS:-2}"
tests/schemathesis.sh
echo "   UI screenshots of each step: target/test-artifacts/ui/"
echo "== packaging (static musl binary, .deb, unit, install/upgrade/purge in a throwaway root)"
tests/packaging.sh
echo "== all tests passed"
