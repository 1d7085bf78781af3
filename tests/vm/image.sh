#!/usr/bin/env bash
# Builds, once, the bootable Debian 12 (bookworm) VM that tests/vm/run.sh boots: a
# debootstrap root with Debian's own kernel, systemd as PID 1 (cgroup v2, Debian's
# default), python3 and curl, made into an ext4 image WITHOUT loop mounts
# (mkfs.ext4 -d ROOTDIR), plus the kernel and initrd copied out of the root's /boot.
#
# No getty anywhere: the tests run from crucible-vm-test.service at boot. That unit
# mounts the second disk (/dev/vdb, made by run.sh), runs its entry.sh with output on the
# serial console, and powers the VM off whatever happens. Everything test-specific lives
# on that disk, so changing the tests does not rebuild the image.
#
# Cache: ${CRUCIBLE_VM_CACHE:-/var/cache/crucible-test-vm}/<hash of this script>/ holds
# root.raw, vmlinuz, initrd.img and a "ready" stamp. Any edit to this script rebuilds;
# a cache hit only hashes this file. Older builds are removed after a successful build.
# Prints the directory on the last line of stdout ("image: DIR").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CRUCIBLE_VM_CACHE:-/var/cache/crucible-test-vm}
MIRROR=http://deb.debian.org/debian
SUITE=bookworm
SIZE=4G
KEY=$(sha256sum "$HERE/image.sh" | cut -c1-16)
OUT=$CACHE/$KEY

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "tests/vm/image.sh: $*" >&2; }

cached() {
  if [ -e "$OUT/ready" ]; then
    say "cached VM image $OUT (built $(cat "$OUT/ready"))"
    echo "image: $OUT"
    exit 0
  fi
}
cached

# The build runs as root (debootstrap, chroot); re-exec through sudo when needed.
if [ "$(id -u)" -ne 0 ]; then exec sudo -E "$0" "$@"; fi
# One build at a time; whoever waited finds the other's result.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
cached

start=$(date +%s)
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v unshare >/dev/null || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# mkfs.ext4 -d needs e2fsprogs >= 1.43 (device nodes, hard links since 1.47 are fine).
mkfs.ext4 -V 2>&1 | head -1 >&2

BUILD=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
ROOT=$BUILD/root

say "debootstrap $SUITE (minbase) into $ROOT"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,kmod,procps,iproute2,python3,curl,e2fsprogs,util-linux \
  "$SUITE" "$ROOT" "$MIRROR" >"$BUILD/debootstrap.log" 2>&1 \
  || { tail -50 "$BUILD/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }

# Configuration before the kernel goes in (the initramfs is built at its install).
echo crucible-vm > "$ROOT/etc/hostname"
cat > "$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	crucible-vm
::1		localhost ip6-localhost ip6-loopback
EOF
cat > "$ROOT/etc/fstab" <<'EOF'
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/vda	/	ext4	rw,errors=remount-ro	0	1
EOF
# One machine-id for the image: no first-boot logic (systemd-firstboot would prompt).
tr -d - < /proc/sys/kernel/random/uuid > "$ROOT/etc/machine-id"
# The initramfs must find the root on virtio: name the modules (MODULES=most has them,
# this makes it explicit) and check the result below.
mkdir -p "$ROOT/etc/initramfs-tools"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$ROOT/etc/initramfs-tools/modules"
# Nothing may start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
EOF

say "kernel (linux-image-amd64) and initramfs"
# A private mount namespace: /proc, /sys and /dev for the chroot vanish with it.
unshare --mount --propagation private bash -euo pipefail -c '
  ROOT=$1
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sysfs "$ROOT/sys"
  mount --bind /dev "$ROOT/dev"
  chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
    apt-get install -y -q --no-install-recommends linux-image-amd64 initramfs-tools
  chroot "$ROOT" apt-get clean
' _ "$ROOT" >"$BUILD/kernel.log" 2>&1 \
  || { tail -50 "$BUILD/kernel.log" >&2; say "kernel install failed"; exit 1; }

vmlinuz=$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -1)
kver=${vmlinuz##*/vmlinuz-}
initrd=$ROOT/boot/initrd.img-$kver
[ -s "$initrd" ] || { say "no initrd for $kver"; exit 1; }
chroot "$ROOT" lsinitramfs "/boot/initrd.img-$kver" > "$BUILD/initrd.list"
for m in virtio_pci virtio_blk ext4; do
  grep -Eq "/$m\.ko(\.[gx]z|\.zst)?\$" "$BUILD/initrd.list" \
    || { say "initramfs of $kver lacks $m.ko"; exit 1; }
done
say "kernel $kver; initramfs has virtio_pci, virtio_blk, ext4"

say "systemd units: no getty, no timers, the test runner"
rm -f "$ROOT/usr/sbin/policy-rc.d"
for u in getty@.service serial-getty@.service autovt@.service console-getty.service \
         systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
         dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         systemd-networkd-wait-online.service; do
  ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
done
cat > "$ROOT/usr/local/sbin/crucible-vm-test" <<'EOF'
#!/bin/bash
# Baked into the test VM image (tests/vm/image.sh): runs the tests from the second disk.
# Output goes to the serial console (the unit's StandardOutput=tty on /dev/ttyS0).
echo "crucible-vm-test: booted in $(cut -d' ' -f1 /proc/uptime) s (kernel $(uname -r))"
mkdir -p /mnt/test
if ! mount /dev/vdb /mnt/test; then
  echo "crucible-vm-test: cannot mount /dev/vdb"; exit 1
fi
cd /mnt/test && bash ./entry.sh
rc=$?
cd / && sync && umount /mnt/test
exit $rc
EOF
chmod 0755 "$ROOT/usr/local/sbin/crucible-vm-test"
cat > "$ROOT/etc/systemd/system/crucible-vm-test.service" <<'EOF'
[Unit]
Description=Crucible VM test (tests/vm/run.sh): run the tests, then power off
After=multi-user.target
# Power off whatever the outcome: run.sh reads the verdict from the console.
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/crucible-vm-test
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=2h

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/crucible-vm-test.service \
  "$ROOT/etc/systemd/system/multi-user.target.wants/crucible-vm-test.service"

say "ext4 image ($SIZE, mkfs.ext4 -d, no loop mount)"
cp "$vmlinuz" "$BUILD/vmlinuz"
cp "$initrd" "$BUILD/initrd.img"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
mkfs.ext4 -q -F -L crucible-root -d "$ROOT" "$BUILD/root.raw" "$SIZE"
echo "$kver" > "$BUILD/kernel-version"

rm -rf "$OUT"
mkdir -p "$OUT"
mv "$BUILD/root.raw" "$BUILD/vmlinuz" "$BUILD/initrd.img" "$BUILD/kernel-version" "$OUT/"
date -u +%FT%TZ > "$OUT/ready"
# Older builds (other hashes of this script) are of no use any more.
for d in "$CACHE"/*/; do
  d=${d%/}
  [ "$d" = "$OUT" ] || [ ! -e "$d/ready" ] || rm -rf "$d"
done
say "built $OUT in $(( $(date +%s) - start )) s"
echo "image: $OUT"
