#!/usr/bin/env bash
# The cluster suites against the reference object store: a three-node Garage cluster
# (replication 3) on 127.0.0.1, then the same with one Garage node killed (reads and
# writes must go on). CI runs them against s3s-fs instead (README, "Tests"): Garage
# takes long to build. Needs garage 2.x (`cargo install --locked garage@2.5.0`, or
# GARAGE=/path/to/garage), PostgreSQL, FUSE and what .ci/run installs.
#   tests/garage.sh                 both passes
#   tests/garage.sh --test cluster  one suite (cargo test arguments)
# Stops every Garage node and removes its data on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
[ -x "$GARAGE" ] || { echo "garage not found: cargo install --locked garage@2.5.0" >&2; exit 1; }
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(--test cluster --test mount --test cli --test notify --test security)

dir=$(mktemp -d /var/tmp/sharefs-garage.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

secret=$(openssl rand -hex 32)
for i in 1 2 3; do
    mkdir -p "$dir/n$i/meta" "$dir/n$i/data"
    cat > "$dir/n$i/garage.toml" <<EOF
metadata_dir = "$dir/n$i/meta"
data_dir = "$dir/n$i/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$((39000 + i * 10 + 1))"
rpc_public_addr = "127.0.0.1:$((39000 + i * 10 + 1))"
rpc_secret = "$secret"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$((39000 + i * 10))"
root_domain = ".s3.garage.localhost"
EOF
    "$GARAGE" -c "$dir/n$i/garage.toml" server > "$dir/n$i/log" 2>&1 &
    pids+=($!)
done
g() { "$GARAGE" -c "$dir/n1/garage.toml" "$@"; }
for _ in $(seq 150); do g status > /dev/null 2>&1 && break; sleep 0.2; done
g status > /dev/null

# One cluster: node 1 connects to the others, each gets a role in one zone.
for i in 2 3; do
    g node connect "$("$GARAGE" -c "$dir/n$i/garage.toml" node id -q)"
done
for i in 1 2 3; do
    id=$("$GARAGE" -c "$dir/n$i/garage.toml" node id -q)
    g layout assign -z dc1 -c 1G "${id%%@*}"
done
g layout apply --version 1 > /dev/null
for _ in $(seq 150); do
    [ "$(g status 2>/dev/null | grep -c 'dc1')" -ge 3 ] && break
    sleep 0.2
done

keys=$(g key create sharefs-test)
key=$(grep -oE 'GK[0-9a-f]{24}' <<< "$keys" | head -1)
secret_key=$(grep -oE '\b[0-9a-f]{64}\b' <<< "$keys" | head -1)
[ -n "$key" ] && [ -n "$secret_key" ] || { echo "cannot read the key: $keys" >&2; exit 1; }

export SHAREFS_TEST_BACKEND=cluster
export SHAREFS_TEST_S3_ENDPOINT=http://127.0.0.1:39010
export SHAREFS_TEST_S3_KEY=$key SHAREFS_TEST_S3_SECRET=$secret_key
export SHAREFS_TEST_S3_MAKE_BUCKET="'$GARAGE' -c '$dir/n1/garage.toml' bucket create \"\$1\" > /dev/null \
    && '$GARAGE' -c '$dir/n1/garage.toml' bucket allow --read --write --owner \"\$1\" --key sharefs-test > /dev/null"
export SHAREFS_REQUIRE_FUSE=1 SHAREFS_REQUIRE_TOOLS=1

# Garage as `cargo install --debug` builds it writes every block three times at a few
# MiB/s on a small machine: the tests' bounds on a wait are five times the usual.
export SHAREFS_TEST_TIME_SCALE=${SHAREFS_TEST_TIME_SCALE:-5}
echo "garage.sh: the suites against three Garage nodes" >&2
cargo test --workspace "${suites[@]}"

# One node down (kill -9): replication 3 keeps a quorum of two; reads and writes go on.
kill -9 "${pids[2]}"
echo "garage.sh: the suites with Garage node 3 killed" >&2
cargo test --workspace "${suites[@]}"
echo "garage.sh: both passes passed" >&2
