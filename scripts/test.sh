#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh --test: build tools and the Tansu
# Kafka broker) and runs every check and test:
# formatting, clippy (-D warnings), the kernel object build, unit tests and the
# veth/network-namespace and Kafka integration tests. Run as root.
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
echo "==> cargo build --bins"
cargo build --workspace --bins
echo "==> cargo test"
cargo test --workspace
