#!/usr/bin/env bash
# Fleet deployments with real agents on loopback (release build): trigger to all Succeeded
# (AllAtOnce) beside one host's `deploy local`, the per-batch overhead (OneAtATime), and
# coordinator failovers (kill -9 of the log's leader mid-deployment) with every host's
# lifecycle runs counted. See docs/benchmarks.md.
# SHOAL_BENCH_AGENTS (default 20) is the fleet size; SHOAL_BENCH_FAILOVERS the number of
# failovers (20 here; the benchmark alone defaults to 5).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
export SHOAL_BENCH_FAILOVERS="${SHOAL_BENCH_FAILOVERS:-20}"
exec cargo bench -p shoal-agent --bench fleet_deploy "$@"
