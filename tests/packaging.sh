#!/usr/bin/env bash
# Packaging tests (part of tests/run.sh): build the static binary and the .deb, check the
# package (contents, conffiles, control fields, maintainer scripts), verify the systemd
# unit and its exposure score, then install it into a throwaway Debian 12 root (a Docker
# image built offline with debootstrap, cached as crucible-test-base:bookworm) and run the
# installed binary there: serve, submit, read the result; upgrade to a newer build and
# check that the evaluation and the edited config survive; purge removes both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=crucible-test-base:bookworm
fail() { echo "packaging test FAILED: $*" >&2; exit 1; }
say() { printf '\n== %s\n' "$*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

say "build: static binary and two package versions (previous, new)"
DEB_VERSION=0.1.0-0test1 ./packaging/build.sh
OLD=$(ls target/debian/crucible_0.1.0-0test1_amd64.deb)
cargo deb --no-build --no-strip --target x86_64-unknown-linux-musl \
  --deb-version 0.1.0-1 --output target/debian/ >/dev/null
NEW=$(ls target/debian/crucible_0.1.0-1_amd64.deb)

say "package contents"
contents=$(dpkg-deb -c "$NEW")
for f in usr/bin/crucible lib/systemd/system/crucible.service etc/crucible/crucible.toml \
         usr/share/doc/crucible/README.md usr/share/doc/crucible/copyright \
         usr/share/doc/crucible/examples/redis-1gb.conf; do
  grep -Eq " (\./)?$f\$" <<<"$contents" || fail "missing $f"
done
grep -Eq -- "^-rwxr-xr-x 0/0 .* (\./)?usr/bin/crucible$" <<<"$contents" \
  || fail "/usr/bin/crucible is not 0755 root:root"
ctl=$(mktemp -d)
dpkg-deb -e "$NEW" "$ctl"
[ "$(cat "$ctl/conffiles")" = "/etc/crucible/crucible.toml" ] || fail "conffiles: $(cat "$ctl/conffiles")"
grep -q "^Package: crucible$" "$ctl/control" || fail "Package"
grep -q "^Version: 0.1.0-1$" "$ctl/control" || fail "Version"
! grep -q "^Recommends:.*docker" "$ctl/control" || fail "Recommends must not pull in Docker"
grep -q "^Suggests:.*docker.io" "$ctl/control" || fail "Suggests docker.io"
grep -q "^Description: " "$ctl/control" || fail "Description"
for s in postinst postrm prerm; do
  [ -x "$ctl/$s" ] || fail "$s missing or not executable"
  ! grep -q "#DEBHELPER#" "$ctl/$s" || fail "$s still has #DEBHELPER#"
done
grep -q "rm -rf /var/lib/private/crucible /var/lib/crucible" "$ctl/postrm" || fail "purge does not remove state"
ex=$(mktemp -d)
dpkg-deb -x "$NEW" "$ex"
file "$ex/usr/bin/crucible" | grep -q "statically linked" || fail "packaged binary is not static"

say "systemd unit: verify and exposure"
grep -q "^Type=notify$" "$ex/lib/systemd/system/crucible.service" || fail "Type=notify"
grep -q "^WatchdogSec=" "$ex/lib/systemd/system/crucible.service" || fail "WatchdogSec"
# verify needs the ExecStart binary: overlay the package's /usr/bin in a private mount ns.
unshare -m sh -c "mount -t overlay overlay -o lowerdir=$ex/usr/bin:/usr/bin /usr/bin && \
  systemd-analyze verify $ex/lib/systemd/system/crucible.service" || fail "systemd-analyze verify"
score=$(systemd-analyze security --offline=true "$ex/lib/systemd/system/crucible.service" 2>&1 \
  | sed -n 's/.*Overall exposure level for crucible.service: \([0-9.]*\).*/\1/p')
echo "exposure: $score"
# 2.1: 1.9 before Delegate= (the cgroup subtree of the runs, which ProtectControlGroups=
# would make read-only); every other setting is as strict as the sandbox allows.
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.1) }' || fail "exposure $score > 2.1"

say "throwaway root: $IMAGE"
CRUCIBLE_TEST_IMAGE=$IMAGE tests/images.sh

work=$(mktemp -d)
cp "$OLD" "$work/old.deb"
cp "$NEW" "$work/new.deb"
cat > "$work/inside.sh" <<'EOF'
#!/bin/sh
# Runs inside the container (no systemd there: the service is started by hand, as root).
set -eu
start() {
  rm -f /var/lib/crucible/listen.addr
  mkdir -p /var/lib/crucible
  crucible serve --config /etc/crucible/crucible.toml >/tmp/serve.log 2>&1 &
  echo $! > /tmp/serve.pid
  i=0; while [ ! -s /var/lib/crucible/listen.addr ]; do
    i=$((i+1)); [ $i -lt 600 ] || { cat /tmp/serve.log; exit 1; }; sleep 0.1
  done
}
stop() { kill -TERM "$(cat /tmp/serve.pid)"; while kill -0 "$(cat /tmp/serve.pid)" 2>/dev/null; do sleep 0.1; done; }

dpkg -i /work/old.deb
[ "$(dpkg-query -W -f='${Version}' crucible)" = "0.1.0-0test1" ]
crucible check-config --config /etc/crucible/crucible.toml >/dev/null
start
printf 'print("from the package")\n' > /tmp/hello.py
crucible submit /tmp/hello.py --wait > /tmp/rec.json
grep -q '"status": "completed"' /tmp/rec.json
grep -q 'from the package' /tmp/rec.json
id=$(sed -n 's/.*"eval_id": "\(.*\)".*/\1/p' /tmp/rec.json)
stop
# An operator edit that the upgrade must keep (conffile).
sed -i 's/^workers = 2$/workers = 3/' /etc/crucible/crucible.toml

dpkg -i /work/new.deb
[ "$(dpkg-query -W -f='${Version}' crucible)" = "0.1.0-1" ]
grep -q '^workers = 3$' /etc/crucible/crucible.toml
start
crucible status "$id" > /tmp/after.json
grep -q '"status": "completed"' /tmp/after.json
grep -q 'from the package' /tmp/after.json
# The web UI is inside the static binary.
python3 - <<'PY'
import urllib.request
addr = open("/var/lib/crucible/listen.addr").read().strip()
page = urllib.request.urlopen(f"http://{addr}/").read()
assert b"<title>Crucible</title>" in page, page[:200]
js = urllib.request.urlopen(f"http://{addr}/ui/app.js")
assert js.headers["Content-Type"].startswith("text/javascript"), js.headers
PY
stop

dpkg --purge crucible
[ ! -e /var/lib/crucible ] && [ ! -e /etc/crucible ] && [ ! -e /usr/bin/crucible ]
echo "inside: all checks passed"
EOF
chmod +x "$work/inside.sh"
# The shipped config requires a cgroup per run: give the container the host's cgroup
# hierarchies (as root inside, the appliance makes its runs' cgroups there).
docker run --rm --security-opt seccomp=unconfined --security-opt systempaths=unconfined \
  --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  -v "$work:/work" "$IMAGE" /work/inside.sh || fail "install/upgrade/purge in $IMAGE"
rm -rf "$work" "$ctl" "$ex"
say "packaging tests passed"
