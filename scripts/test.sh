#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh --test: build tools and the Tansu
# Kafka broker) and runs every check and test:
# formatting, clippy and rustdoc (-D warnings), the kernel object build, unit
# tests and the veth/network-namespace and Kafka integration tests. Run as
# root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/setup.sh --test
echo "==> cargo fmt --check"
cargo fmt --all -- --check
(cd flowexport-ebpf && cargo +nightly fmt -- --check)
echo "==> cargo xtask build-ebpf"
cargo xtask build-ebpf
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd flowexport-ebpf && cargo +nightly clippy --release -- -D warnings)
(cd flowexport-ebpf && cargo +nightly clippy --release --features bench -- -D warnings)
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
echo "==> cargo build --bins"
cargo build --workspace --bins
# Each decoder's fuzz target for a bounded time (FUZZ_SECONDS, default 30);
# a panic or an input slower than 10 s fails the run. BENCHMARKS.md has
# longer runs.
echo "==> cargo fuzz (${FUZZ_SECONDS:-30}s per target)"
for target in netflow sflow protobuf json; do
    log=$(mktemp)
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="${FUZZ_SECONDS:-30}" -timeout=10 \
        > "$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $target failed (reproducer in fuzz/artifacts/$target/)"
        exit 1
    fi
    echo "$target: $(grep -E '^Done' "$log")"
    rm -f "$log"
done
# The package test (tests/tests/service.rs) installs this .deb.
echo "==> cargo xtask deb"
cargo xtask deb
echo "==> cargo test (unit tests)"
cargo test
echo "==> cargo xtask integration-test"
cargo xtask integration-test
