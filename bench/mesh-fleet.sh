#!/usr/bin/env bash
# Mesh propagation, failure detection and idle cost with real agents on loopback, against
# an agent without the mesh in the same run. See docs/benchmarks.md.
# SHOAL_BENCH_FLEETS=10,50 (the default) picks the fleet sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
exec cargo bench -p shoal-agent --bench mesh_fleet "$@"
