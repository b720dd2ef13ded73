#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), builds flowexport in release mode
# and runs the agent on the interface you name; records go to stdout as JSON
# lines, logs to stderr. Extra arguments go to `flowexport agent`.
#   scripts/run-agent.sh eth0 [--idle-timeout 10s ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ $# -lt 1 ]; then
    echo "usage: scripts/run-agent.sh IFACE [flowexport agent flags...]" >&2
    exit 2
fi
iface=$1
shift
scripts/setup.sh >&2
cargo xtask build-ebpf >&2
cargo build --release --bin flowexport >&2
exec target/release/flowexport agent --iface "$iface" "$@"
