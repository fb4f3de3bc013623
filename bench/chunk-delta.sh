#!/usr/bin/env bash
# Issue 13: bytes moved for a model with a tenth changed (content-defined chunks at several
# sizes, fixed blocks, whole file) and chunking throughput against the revision id alone,
# in the same run. SHOAL_BENCH_MIB sets the model's size (default 256). See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p shoal-agent --bench chunk_delta "$@"
