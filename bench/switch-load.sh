#!/usr/bin/env bash
# Zero-downtime switching under load (release build): rolling updates of the example
# inference app on three agents, switched and in place, with at least
# SHOAL_BENCH_REQUESTS (default 20000) requests during the updates; and the latency
# through the switch against straight to the service. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p shoal-agent --bench switch_load "$@"
