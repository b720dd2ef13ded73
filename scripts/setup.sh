#!/usr/bin/env bash
# Installs what flowexport needs to build and run, idempotently: Debian
# packages, the nightly toolchain's rust-src, bpf-linker, and a bpffs mount.
# With --test, also what the tests need: the Tansu Kafka broker, cargo-fuzz
# and cargo-deb.
# Run as root on Debian 12. Safe to run again: every step checks first.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

for_tests=false
case "${1:-}" in
    --test) for_tests=true ;;
    "") ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh: run as root (it installs packages and loads BPF programs)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------
# llvm-22 + polly/zstd/zlib: bpf-linker links against LLVM 22 (nightly's LLVM).
# iproute2: namespaces/veth for tests; util-linux: setpriv for the
# unprivileged-user test; protobuf-compiler: prost-build compiles proto/flow.proto;
# build-essential: librdkafka, which the rdkafka crate builds from source.
PKGS=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 util-linux
      build-essential pkg-config ca-certificates protobuf-compiler)
# Tests only: real third-party NetFlow/IPFIX decoders (nfcapd/nfdump, tshark)
# and exporters (softflowd, fprobe, pmacct's pmacctd/nfacctd); Prometheus,
# which the pipeline test runs with the shipped scrape config; trafgen
# (netsniff-ng), which sends the many-flow traffic of the scale tests;
# systemd (systemd-analyze verify), adduser and procps for the package test.
if $for_tests; then
    PKGS+=(nfdump tshark softflowd fprobe pmacct prometheus netsniff-ng systemd adduser procps)
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Rust toolchains -------------------------------------------------------
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "==> rustup toolchain install nightly"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    echo "==> rustup component add rust-src (nightly)"
    rustup component add rust-src --toolchain nightly
fi
for c in clippy rustfmt; do
    rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

# --- bpf-linker (built against LLVM 22) ------------------------------------
if ! bpf-linker --version 2>/dev/null | grep -q "0.13.0"; then
    echo "==> cargo install bpf-linker 0.13.0 (a few minutes, once per machine)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --locked \
        --no-default-features --features llvm-22
fi

# --- Tansu (tests only): a Kafka-protocol broker with SQLite storage --------
# Apache Kafka itself is not installable here; Tansu is, from crates.io.
if $for_tests && ! tansu --version 2>/dev/null | grep -q "0.6.0"; then
    echo "==> cargo install tansu 0.6.0 (20-30 minutes on 2 cores, once per machine)"
    cargo install tansu --version 0.6.0 --locked --features libsql
fi

# --- cargo-fuzz (tests only): the decoders' fuzz targets run in CI ----------
if $for_tests && ! cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
    echo "==> cargo install cargo-fuzz 0.13.2"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

# --- cargo-deb (tests only): `cargo xtask deb` builds the .deb the package
# test installs; also what an operator needs to build the package ----------
if $for_tests && ! cargo deb --version 2>/dev/null | grep -q "3.8.0"; then
    echo "==> cargo install cargo-deb 3.8.0"
    cargo install cargo-deb --version 3.8.0 --locked
fi

# --- bpffs -----------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi
echo "==> setup complete"
