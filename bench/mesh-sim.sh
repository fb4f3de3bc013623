#!/usr/bin/env bash
# The mesh simulations at the sizes issue 9 asks for (CI runs smaller ones): 10,000 host
# tables and 2,000 membership cores, in a release build. See docs/benchmarks.md.
# SHOAL_SIM_HOSTS and SHOAL_SIM_MEMBERS override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOAL_SIM_HOSTS="${SHOAL_SIM_HOSTS:-10000}" SHOAL_SIM_MEMBERS="${SHOAL_SIM_MEMBERS:-2000}"
exec cargo test --release -p shoal-agent --test hoststate_simulation --test membership_simulation \
  -- --nocapture --test-threads 1
