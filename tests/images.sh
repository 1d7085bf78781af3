#!/usr/bin/env bash
# Builds the Docker image the tests need, offline from a registry's point of view: a
# Debian 12 minbase root with python3 made by debootstrap from Debian's mirror, imported
# as crucible-test-base:bookworm. Cached: does nothing when the image exists.
set -euo pipefail
IMAGE=${CRUCIBLE_TEST_IMAGE:-crucible-test-base:bookworm}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
command -v debootstrap >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
rootfs=$(mktemp -d)
trap 'as_root rm -rf "$rootfs"' EXIT
echo "tests/images.sh: building $IMAGE with debootstrap (once)"
as_root debootstrap --variant=minbase --include=python3 bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
as_root tar -C "$rootfs" -c . | docker import - "$IMAGE" >/dev/null
echo "tests/images.sh: $IMAGE ready"
