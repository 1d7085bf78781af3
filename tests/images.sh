#!/usr/bin/env bash
# Builds the Docker images the tests need, offline from a registry's point of view: Debian
# 12 minbase roots made by debootstrap from Debian's mirror, imported with `docker import`.
# Cached: an image that exists is not built again.
#   crucible-test-base:bookworm   python3 (the Docker executor and packaging tests)
#   crucible-test-gcc:bookworm    python3, gcc, libc6-dev (a compiled language in Docker)
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

build() {
  local image=$1 include=$2
  if docker image inspect "$image" >/dev/null 2>&1; then
    return 0
  fi
  command -v debootstrap >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  local rootfs
  rootfs=$(mktemp -d)
  echo "tests/images.sh: building $image with debootstrap (once)"
  local started=$SECONDS
  as_root debootstrap --variant=minbase --include="$include" bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  as_root tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
  as_root rm -rf "$rootfs"
  echo "tests/images.sh: $image ready ($((SECONDS - started)) s)"
}

build "${CRUCIBLE_TEST_IMAGE:-crucible-test-base:bookworm}" python3
build "${CRUCIBLE_TEST_GCC_IMAGE:-crucible-test-gcc:bookworm}" python3,gcc,libc6-dev
