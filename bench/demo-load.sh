#!/usr/bin/env bash
# The demo's load by phase (release build): `shoal demo --json` several times, requests and
# failed requests per phase as its load generator counted them. SHOAL_BENCH_ROUNDS
# (default 3). See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p shoal-agent --bench demo_load "$@"
