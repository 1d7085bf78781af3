#!/usr/bin/env bash
# The one test command: installs what the tests need (Debian packages, when missing),
# then checks formatting and lints, runs every test (unit + integration, which start the
# real binary on loopback ports), builds and checks the package, and boots it in a VM.
# Used by .ci/run.
#
# Named stages, run in this order: deps fmt clippy test packaging vm. When one fails, the
# stage and the stages that did not run are named, and the exit status is non-zero.
#   tests/run.sh                 # every stage
#   tests/run.sh packaging vm    # only these (in the order above; deps is up to you)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

STAGES=(deps fmt clippy test packaging vm)

# deps: Debian packages, user namespaces, Docker and its base image.
stage_deps() {
  # The sandbox runs the host's interpreters read-only: python3 and sh (dash). The Redis
  # and PostgreSQL tests start their own servers on loopback ports.
  local missing=() missing_vm=()
  [ -x /usr/bin/python3 ] || missing+=(python3)
  [ -x /bin/sh ] || missing+=(dash)
  # The judging tests compile and run every built-in language with the host's toolchains.
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  command -v g++ >/dev/null || missing+=(g++)
  command -v node >/dev/null || missing+=(nodejs)
  command -v javac >/dev/null || missing+=(default-jdk-headless)
  command -v go >/dev/null || missing+=(golang-go)
  [ -x /usr/bin/rustc ] || missing+=(rustc-web)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-benchmark >/dev/null || missing+=(redis-tools)
  # The PostgreSQL tests run their own cluster (initdb + pg_ctl) on a loopback port.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  # The web UI tests drive a headless Chromium over WebDriver.
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v promtool >/dev/null || missing+=(prometheus)   # promtool checks /metrics
  command -v gnuplot >/dev/null || missing+=(gnuplot-nox)    # benches/soak.rs plots its PNG
  command -v curl >/dev/null || missing+=(curl)   # tests/schemathesis.sh makes its evaluations
  # The VM test (tests/vm/): qemu, an image built with debootstrap, ext4 disks made
  # without mounting (mkfs.ext4 -d) and read back with debugfs. No recommends (qemu's
  # would pull a GUI).
  command -v qemu-system-x86_64 >/dev/null || missing_vm+=(qemu-system-x86)
  command -v qemu-img >/dev/null || missing_vm+=(qemu-utils)
  command -v debootstrap >/dev/null || missing_vm+=(debootstrap)
  { command -v mkfs.ext4 && command -v debugfs; } >/dev/null || missing_vm+=(e2fsprogs)
  if [ "${#missing[@]}" -gt 0 ] || [ "${#missing_vm[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} ${missing_vm[*]}"
    as_root apt-get update -qq
    # policy-rc.d 101: do not start the packaged services; tests run their own instances.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
      as_root chmod +x /usr/sbin/policy-rc.d
      REMOVE_POLICY_RC=1
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    if [ "${#missing_vm[@]}" -gt 0 ]; then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing_vm[@]}"
    fi
    remove_policy_rc
  fi

  # The sandbox needs unprivileged user namespaces; say so plainly if they are off.
  if command -v unshare >/dev/null && ! unshare --user --map-root-user true 2>/dev/null; then
    echo "tests/run.sh: user namespaces are not available here (see README, 'Requirements')" >&2
    return 1
  fi

  # The Docker tests (and the packaging tests) need a Debian image with python3; no
  # registry is reachable, so it is built with debootstrap and cached.
  command -v docker >/dev/null || { echo "tests/run.sh: the tests need Docker" >&2; return 1; }
  tests/images.sh
}

stage_fmt() { cargo fmt --all -- --check; }

stage_clippy() { cargo clippy --all-targets -- -D warnings; }

stage_test() {
  cargo test -- --test-threads="${TEST_THREADS:-2}"
  echo "   UI screenshots of each step: target/test-artifacts/ui/"
  tests/schemathesis.sh
}

# packaging: static musl binary, .deb, unit, install/upgrade/purge in a throwaway root.
stage_packaging() { tests/packaging.sh; }

# vm: the .debs of the packaging stage in a Debian 12 VM with systemd and cgroup v2.
stage_vm() { tests/vm/run.sh; }

REMOVE_POLICY_RC=
remove_policy_rc() {
  if [ -n "$REMOVE_POLICY_RC" ]; then as_root rm -f /usr/sbin/policy-rc.d; REMOVE_POLICY_RC=; fi
}

selected=("${STAGES[@]}")
if [ $# -gt 0 ]; then
  for s in "$@"; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "tests/run.sh: unknown stage '$s' (stages: ${STAGES[*]})" >&2; exit 2; }
  done
  selected=()
  for s in "${STAGES[@]}"; do [[ " $* " == *" $s "* ]] && selected+=("$s"); done
fi

current=
not_run=()
on_exit() {
  local rc=$?
  remove_policy_rc
  if [ -n "$current" ]; then
    echo >&2
    echo "tests/run.sh: stage '$current' FAILED (exit $rc)" >&2
    if [ "${#not_run[@]}" -gt 0 ]; then
      echo "tests/run.sh: stages not run: ${not_run[*]}" >&2
    fi
    [ "$rc" -ne 0 ] || rc=1
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for i in "${!selected[@]}"; do
  current=${selected[$i]}
  not_run=("${selected[@]:$((i + 1))}")
  echo "== stage $current"
  t0=$(date +%s)
  "stage_$current"
  echo "== stage $current passed ($(( $(date +%s) - t0 )) s)"
done
current=
echo "== all tests passed (stages: ${selected[*]})"
