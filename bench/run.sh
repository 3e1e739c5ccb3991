#!/usr/bin/env bash
# The sharefs benchmark: local disk vs sshfs vs sharefs, same machine, same disk.
#   bench/run.sh            full run (about 10-15 minutes), writes BENCHMARKS.md
#   bench/run.sh --short    small sizes, one round (< 3 minutes), writes bench/short-results.md;
#                           it proves the benchmark runs, so it uses the debug build the
#                           tests made instead of building a release
# Installs what it needs (Debian packages: sshfs, openssh-server, fio, fuse3, dbus, openssl),
# builds sharefs (in release mode for a full run), and
# removes every process and mount it started, also on failure. Run as root (it drops the
# page cache between cold runs).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in sshfs:sshfs sshd:openssh-server fio:fio fusermount3:fuse3 dbus-daemon:dbus openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "bench: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

profile=release
for arg in "$@"; do
    [ "$arg" != --short ] || profile=debug
done
cargo build --quiet --bins -p sharefs-server -p sharefs-client -p sharefs-tests \
    $([ "$profile" = release ] && echo --release)
exec python3 bench/bench.py --target-dir "${CARGO_TARGET_DIR:-target}/$profile" "$@"
