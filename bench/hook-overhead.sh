#!/usr/bin/env bash
# Hook call overhead against spawning `sh -c true`, in the same run. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p shoal-agent --bench hook_overhead "$@"
