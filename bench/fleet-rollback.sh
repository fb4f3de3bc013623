#!/usr/bin/env bash
# Gate to rollback with real agents on loopback (release build): a canary of half the
# fleet takes a revision whose monitor fails, the gate trips while baking, and the
# deployment rolls itself back; timed beside an operator's redeploy of the good revision
# to the same hosts. SHOAL_BENCH_FLEETS (default 5,20) and SHOAL_BENCH_ROUNDS (default 3).
# See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
exec cargo bench -p shoal-agent --bench fleet_rollback "$@"
