#!/usr/bin/env bash
# Mesh propagation, failure detection and idle cost with real agents on loopback, against
# an agent without the mesh in the same run. See docs/benchmarks.md.
# SHOAL_BENCH_FLEETS=10,50,100 (the default) picks the fleet sizes. Packets are counted by
# nftables, installed here when missing (root and apt-get needed; otherwise not counted).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends nftables; } ||
    echo "nftables could not be installed: packets will not be counted"
fi
ulimit -n 65536 2>/dev/null || true
exec cargo bench -p shoal-agent --bench mesh_fleet "$@"
