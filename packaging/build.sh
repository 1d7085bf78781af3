#!/usr/bin/env bash
# Builds the release binary as a static musl executable, checks it, and builds the .deb
# into target/debian/. Every step runs here, on a fresh Debian 12 machine too:
#
#   1. installs Debian's Rust 1.96 (rustc-web, with std's source), musl-tools and LLVM's
#      libunwind when missing (rustup cannot add the musl target on these machines);
#   2. builds std for x86_64-unknown-linux-musl (-Zbuild-std), linked by musl-gcc, with a
#      libunwind.a made of LLVM's objects plus a one-function shim for glibc's
#      __fprintf_chk (the only symbol LLVM's libunwind needs that musl lacks), and gcc's
#      libgcc.a last on the line (C code such as mimalloc calls its helpers, e.g.
#      __popcountdi2);
#   3. checks the result: `file` says static, `ldd` says not dynamic, the binary runs and
#      resolves a name from /etc/hosts (musl's resolver);
#   4. builds the .deb with cargo-deb (installed with cargo when missing).
#
# If the musl build cannot be made, it falls back to a glibc +crt-static build, loudly.
# Options (env): FEATURES="mimalloc" to build with another allocator; DEB_VERSION to set
# the package version (default: Cargo.toml's); SKIP_DEB=1 to stop after the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SHIM=$TARGET_DIR/musl-shim
BIN=$TARGET_DIR/$TARGET/release/crucible

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { printf '\n== %s\n' "$*"; }

say "packages"
need=(rustc-web cargo-web rust-web-src musl-tools libunwind-14-dev file binutils dpkg-dev)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

say "libunwind shim"
mkdir -p "$SHIM/objs"
cat > "$SHIM/fprintf_chk.c" <<'EOF'
#include <stdarg.h>
#include <stdio.h>
/* glibc's fortified fprintf, referenced by LLVM's libunwind; musl has no _chk variants. */
int __fprintf_chk(FILE *f, int flag, const char *fmt, ...) {
    (void)flag;
    va_list ap;
    va_start(ap, fmt);
    int r = vfprintf(f, fmt, ap);
    va_end(ap);
    return r;
}
EOF
musl-gcc -O2 -c -o "$SHIM/fprintf_chk.o" "$SHIM/fprintf_chk.c"
(cd "$SHIM/objs" && rm -f ./*.o && ar x /usr/lib/llvm-14/lib/libunwind.a)
rm -f "$SHIM/libunwind.a"
ar rcs "$SHIM/libunwind.a" "$SHIM"/objs/*.o "$SHIM/fprintf_chk.o"

say "static musl build (Debian rustc $(/usr/bin/rustc --version | cut -d' ' -f2))"
features=()
if [ -n "${FEATURES:-}" ]; then features=(--features "$FEATURES"); fi
static_ok=1
if ! RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=musl-gcc \
  CC_x86_64_unknown_linux_musl=musl-gcc \
  RUSTFLAGS="-C link-self-contained=no -C target-feature=+crt-static -C relocation-model=static -L $SHIM -C link-arg=-lgcc" \
  /usr/bin/cargo build --release --locked "${features[@]}" \
    -Zbuild-std=std,panic_abort --target "$TARGET"; then
  static_ok=0
fi

if [ "$static_ok" -eq 0 ]; then
  cat >&2 <<'EOF'

!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! The musl build FAILED. Falling back to a glibc +crt-static build: static, but
!! glibc's resolver (NSS) does not work in a static binary beyond /etc/hosts and
!! DNS. This is NOT the product's supported build; fix the musl build.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
EOF
  TARGET=x86_64-unknown-linux-gnu
  BIN=$TARGET_DIR/$TARGET/release/crucible
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked "${features[@]}" --target "$TARGET"
fi

say "checks"
file "$BIN"
file "$BIN" | grep -Eq "statically linked|static-pie linked" || { echo "not statically linked" >&2; exit 1; }
if { ldd "$BIN" 2>&1 || true; } | grep -q "not a dynamic executable"; then
  echo "ldd: not a dynamic executable"
else
  ldd "$BIN" >&2 || true
  echo "ldd reports dynamic dependencies" >&2
  exit 1
fi
ls -l "$BIN"
"$BIN" --version
# The binary runs and resolves a name from /etc/hosts: a client command against a real
# server addressed as "localhost".
data=$(mktemp -d)
"$BIN" serve --listen 127.0.0.1:0 --data-dir "$data" >"$data/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do [ -s "$data/listen.addr" ] && break; sleep 0.1; done
port=$(cut -d: -f2 < "$data/listen.addr")
grep -q "^127.0.0.1[[:space:]].*localhost" /etc/hosts || echo "warning: /etc/hosts has no localhost line"
if { "$BIN" status no-such-id --server "http://localhost:$port" 2>&1 || true; } | grep -q "not_found"; then
  echo "resolved localhost through /etc/hosts and reached the server: ok"
else
  echo "the static binary could not reach http://localhost:$port" >&2
  cat "$data/log" >&2
  kill "$pid"; exit 1
fi
kill -TERM "$pid"; wait "$pid" || true
rm -rf "$data"

if [ -n "${SKIP_DEB:-}" ]; then exit 0; fi

say "deb"
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version "^2"
fi
version_args=()
if [ -n "${DEB_VERSION:-}" ]; then version_args=(--deb-version "$DEB_VERSION"); fi
cargo deb --no-build --no-strip --target "$TARGET" "${version_args[@]}" --output target/debian/
ls -l target/debian/*.deb
