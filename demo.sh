#!/usr/bin/env bash
# Builds sharefs, starts a local server on the embedded default storage (./sharefs-data,
# plain files + JSON) with two users, and mounts it at ./Share as user "demo".
# Ctrl-C unmounts and stops the server.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v fusermount3 >/dev/null 2>&1; then
    echo "demo: fusermount3 not found; install it first: sudo apt-get install fuse3" >&2
    exit 1
fi
cargo build --release --bins
bin=${CARGO_TARGET_DIR:-target}/release
data=${SHAREFS_DATA:-./sharefs-data}
mnt=${1:-./Share}
# The port: SHAREFS_DEMO_PORT (default 7070), for a machine where 7070 is taken.
addr=127.0.0.1:${SHAREFS_DEMO_PORT:-7070}

if [ ! -f "$data/users.json" ]; then
    echo demo | "$bin/sharefs-server" user add demo --data "$data" --password-stdin
    echo friend | "$bin/sharefs-server" user add friend --data "$data" --password-stdin
fi

mkdir -p "$mnt"
"$bin/sharefs-server" serve --data "$data" --listen "$addr" >"$data.ready" 2>"$data.log" &
server=$!
cleanup() {
    fusermount3 -u "$mnt" 2>/dev/null || true
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$data.ready"
}
trap cleanup EXIT
for _ in $(seq 100); do
    grep -q listening "$data.ready" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$data.log" >&2; exit 1; }
    sleep 0.1
done

export SHAREFS_SERVER=$addr
# TLS is on: the client pins the demo server's self-signed certificate on first use. The
# pin lives with the demo data, so a fresh ./sharefs-data (new certificate) starts clean.
export SHAREFS_KNOWN_SERVERS=$data/known_servers
# A small tree from "friend", so there is something to browse and download.
(
    export SHAREFS_USER=friend SHAREFS_PASSWORD=friend
    "$bin/sharefs" put -r docs
    "$bin/sharefs" put README.md docs/welcome.md
) >/dev/null 2>&1 || true

echo
echo "sharefs is mounted at $mnt as user 'demo' (password 'demo'); server log: $data.log"
echo "  ls $mnt                 users"
echo "  cp somefile $mnt/demo/  upload"
echo "  cp -r somedir $mnt/demo/  upload a tree"
echo "  cat $mnt/friend/docs/welcome.md   download (friend gets a notification)"
echo "Press Ctrl-C to unmount and stop."
SHAREFS_USER=demo SHAREFS_PASSWORD=demo "$bin/sharefs" mount "$mnt" --foreground
