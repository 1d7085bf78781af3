#!/usr/bin/env bash
# The VM test (a stage of tests/run.sh): boots Debian 12's own kernel with systemd as PID 1
# and cgroup v2 under qemu (KVM, else TCG), installs the project's .deb there and checks
# the service for real (tests/vm/guest.sh: install, READY=1, cgroup containment under
# Delegate=, stop/crash/upgrade/purge).
#
#   tests/vm/run.sh [OLD.deb NEW.deb]
#
# Default packages: the two that tests/packaging.sh leaves in target/debian/. The root
# image comes from tests/vm/image.sh (built once, cached); the VM boots a throwaway qcow2
# overlay of it, so the cache stays pristine. The test disk (/dev/vdb, ext4 made with
# mkfs.ext4 -d) carries the .debs, guest.sh and entry.sh; the VM has no network device.
# The guest prints to the serial console (target/vm-test/console.log); afterwards its
# guest.log, journal and dmesg are copied out of the test disk into target/vm-test/.
# Exit 0 only if guest.sh printed its final success marker.
#
# Environment: CRUCIBLE_VM_TIMEOUT (seconds for the whole VM run; default 900 with KVM,
# 3600 with TCG), CRUCIBLE_VM_ACCEL (kvm|tcg, default: kvm when it can boot the image's
# kernel, probed once) and CRUCIBLE_VM_CPU (qemu -cpu),
# CRUCIBLE_VM_CHECKS (space-separated check names of guest.sh to run, default all),
# CRUCIBLE_VM_CACHE (see image.sh), CRUCIBLE_VM_ARTIFACTS (default target/vm-test).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
t_start=$(date +%s%N)
MARKER_PASS="CRUCIBLE-VM-TEST: PASS"
OLD=${1:-target/debian/crucible_0.1.0-0test1_amd64.deb}
NEW=${2:-target/debian/crucible_0.1.0-1_amd64.deb}
ART=${CRUCIBLE_VM_ARTIFACTS:-$ROOT/target/vm-test}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { printf '== tests/vm/run.sh: %s\n' "$*"; }
secs() { awk -v ns="$1" 'BEGIN { printf "%.1f", ns / 1e9 }'; }
for f in "$OLD" "$NEW"; do
  [ -f "$f" ] || { echo "tests/vm/run.sh: $f not found (run tests/packaging.sh first)" >&2; exit 1; }
done

# What this needs on the host (tests/run.sh installs the same list up front).
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || missing+=(e2fsprogs)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

image=$(tests/vm/image.sh | sed -n 's/^image: //p')
[ -n "$image" ] && [ -e "$image/ready" ] || { echo "tests/vm/run.sh: no VM image" >&2; exit 1; }

# The accelerator. An openable /dev/kvm is not enough: some hosts' KVM only runs special
# guests (e.g. PVM, kvm_pvm, which needs a PVM-built guest kernel), and some reject
# `-cpu host` (qemu 7.2 on nested KVM: "failed to set MSR 0x10a"). So the image's kernel
# is booted once without a root (it must print its banner and panic within seconds); the
# first CPU model that works is used, else TCG with a longer timeout. The verdict is
# cached next to the image, per host kernel and qemu version.
probe_kvm() {
  local cpu log
  [ -c /dev/kvm ] && (exec 3<>/dev/kvm) 2>/dev/null || return 1
  for cpu in host host,-arch-capabilities; do
    log=$(mktemp)
    timeout 20 qemu-system-x86_64 -accel kvm -cpu "$cpu" -m 256 -nodefaults -no-user-config \
      -display none -no-reboot -serial "file:$log" -kernel "$image/vmlinuz" \
      -append "console=ttyS0 panic=-1" </dev/null >/dev/null 2>&1
    if grep -q "Linux version" "$log" && grep -q "Kernel panic" "$log"; then
      rm -f "$log"; echo "$cpu"; return 0
    fi
    rm -f "$log"
  done
  return 1
}
accel=${CRUCIBLE_VM_ACCEL:-}
cpu=${CRUCIBLE_VM_CPU:-}
if [ -z "$accel" ]; then
  verdict=$image/accel.$( (uname -r; qemu-system-x86_64 --version | head -1) | sha256sum | cut -c1-12)
  if [ ! -s "$verdict" ]; then
    say "probing KVM with the image's kernel"
    if kvm_cpu=$(probe_kvm); then echo "kvm $kvm_cpu" > "$verdict"; else echo "tcg max" > "$verdict"; fi
  fi
  read -r accel probed_cpu < "$verdict"
  cpu=${cpu:-$probed_cpu}
fi
if [ "$accel" = kvm ]; then cpu=${cpu:-host}; timeout_s=${CRUCIBLE_VM_TIMEOUT:-900}
else
  cpu=${cpu:-max}; timeout_s=${CRUCIBLE_VM_TIMEOUT:-3600}
  [ -n "${CRUCIBLE_VM_ACCEL:-}" ] || say "KVM cannot boot the image's kernel here: TCG (slow)"
fi

work=$(mktemp -d)
qpid=
tailpid=
cleanup() {
  [ -z "$qpid" ] || kill "$qpid" 2>/dev/null || true
  [ -z "$tailpid" ] || kill "$tailpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The throwaway root: a qcow2 overlay on the cached raw image (opened read-only by qemu).
qemu-img create -q -f qcow2 -F raw -b "$image/root.raw" "$work/root.qcow2"

# The test disk.
mkdir -p "$work/disk/out"
cp "$OLD" "$work/disk/old.deb"
cp "$NEW" "$work/disk/new.deb"
cp tests/vm/guest.sh "$work/disk/guest.sh"
cat > "$work/disk/entry.sh" <<EOF
#!/bin/bash
# Run by the image's crucible-vm-test.service from the test disk's root (/mnt/test).
# Kernel messages (OOM kills of the containment checks...) stay off the console while
# the tests print; they are in dmesg.txt and journal.txt.
dmesg -n 1
# Nor systemd's "Starting/Stopping ..." lines (SIGRTMIN+21: systemd.show_status=0).
kill -s RTMIN+21 1
export CRUCIBLE_VM_CHECKS="${CRUCIBLE_VM_CHECKS:-}"
bash ./guest.sh 2>&1 | tee out/guest.log
rc=\${PIPESTATUS[0]}
journalctl -b --no-pager -o short-monotonic > out/journal.txt 2>&1
dmesg > out/dmesg.txt 2>&1
exit \$rc
EOF
chmod +x "$work/disk/guest.sh" "$work/disk/entry.sh"
mkfs.ext4 -q -F -L crucible-test -d "$work/disk" "$work/test.img" 256M >/dev/null

mkdir -p "$ART"
rm -rf "$ART/out" "$ART/console.log" "$ART/console.txt" "$ART/qemu.log"
console=$ART/console.log
: > "$console"

say "booting $(cat "$image/kernel-version") ($accel -cpu $cpu, -m 2048 -smp 2, no network, timeout ${timeout_s} s)"
t_boot=$(date +%s%N)
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
  -accel "$accel" -cpu "$cpu" -m 2048 -smp 2 \
  -nodefaults -no-user-config -display none -nic none -no-reboot \
  -serial "file:$console" \
  -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 panic=1" \
  -drive "file=$work/root.qcow2,if=virtio,format=qcow2,discard=unmap" \
  -drive "file=$work/test.img,if=virtio,format=raw" \
  </dev/null > "$ART/qemu.log" 2>&1 &
qpid=$!
# Live view: the console from the moment the runner starts, CRs dropped; the host time at
# which the runner's first line appears marks the end of the boot. Ends with qemu.
( tail --pid="$qpid" -n +1 -F "$console" 2>/dev/null | while IFS= read -r line; do
    line=${line%$'\r'}
    if [[ $line == "crucible-vm-test: booted"* ]]; then date +%s%N > "$work/booted"; on=1; fi
    [ -z "${on:-}" ] || printf '%s\n' "$line"
  done ) &
tailpid=$!
set +e
wait "$qpid"
qrc=$?
set -e
qpid=
t_end=$(date +%s%N)
wait "$tailpid" 2>/dev/null || true
tailpid=

# The guest's files (guest.log, journal.txt, dmesg.txt) out of the test disk, no mount.
debugfs -R "rdump /out $ART" "$work/test.img" >/dev/null 2>&1 || true
tr -d '\r' < "$console" > "$ART/console.txt"

echo
if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
  say "TIMEOUT: the VM did not power off within ${timeout_s} s"
elif [ $qrc -ne 0 ]; then
  say "qemu exited with $qrc:"; cat "$ART/qemu.log"
fi
if [ -e "$work/booted" ]; then
  boot_ns=$(( $(cat "$work/booted") - t_boot ))
  guest_boot=$(sed -n 's/^crucible-vm-test: booted in \([0-9.]*\) s.*/\1/p' "$ART/console.txt" | head -1)
  say "boot: $(secs $boot_ns) s from qemu start to the test runner (guest uptime ${guest_boot} s)"
else
  say "the test runner never started; the end of the console:"
  tail -40 "$ART/console.txt"
fi
say "VM: $(secs $((t_end - t_boot))) s from qemu start to power-off; whole VM test: $(secs $((t_end - t_start))) s"
say "artifacts: $ART (console.txt, out/guest.log, out/journal.txt, out/dmesg.txt)"
if grep -qx "$MARKER_PASS" "$ART/console.txt"; then
  say "PASSED"
  exit 0
fi
say "FAILED"
exit 1
