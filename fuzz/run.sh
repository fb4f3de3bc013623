#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a time budget, one after the other, niced.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 300; TARGETs default to all of them. Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). The growing corpus is kept
# in fuzz/corpus/<target> (not in git); the seeds in git are read from fuzz/seeds/<target>,
# the AppSpec corpus in agent/tests/data/appspec-corpus and the hostile bundle catalogue
# (written by agent/tests/bundle_safety.rs when SHOAL_BUNDLE_SEEDS is set). libFuzzer's
# output goes to fuzz/logs/<target>.log; a crash leaves its input in fuzz/artifacts/<target>
# and makes this script fail. See docs/fuzzing.md.
set -euo pipefail

cd "$(dirname "$0")"
budget="${1:-300}"
shift || true
all=(appspec_parse bundle_tar bundle_tar_gz bundle_tar_zst bundle_zip bundle_dir mesh_frame)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The example guests (a dependency of the agent) are built with the pinned toolchain: the
# nightly may lack the Wasm targets (examples/artifacts/build.rs).
export SHOAL_GUESTS_PINNED=1
# Safe Rust: no sanitizer needed, and a much faster build and run.
nice -n 19 cargo +nightly fuzz build -s none

mkdir -p logs
seeds_for() {
  case "$1" in
    appspec_parse) echo "seeds/appspec_parse ../agent/tests/data/appspec-corpus" ;;
    bundle_tar | bundle_tar_gz | bundle_tar_zst | bundle_dir) echo "seeds/bundle_tar" ;;
    bundle_zip) echo "seeds/bundle_zip" ;;
    mesh_frame) echo "seeds/mesh_frame" ;;
  esac
}

status=0
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "== $target: ${budget}s"
  # shellcheck disable=SC2046
  if ! nice -n 19 cargo +nightly fuzz run -s none "$target" "corpus/$target" $(seeds_for "$target") -- \
      -max_total_time="$budget" -max_len=65536 -rss_limit_mb=2048 -timeout=20 \
      -artifact_prefix="artifacts/$target/" -print_final_stats=1 \
      >"logs/$target.log" 2>&1; then
    echo "   $target FAILED: see fuzz/logs/$target.log and fuzz/artifacts/$target/"
    status=1
  fi
  grep -E '^#[0-9]+.*(DONE|pulse|NEW)' "logs/$target.log" | tail -1 || true
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "logs/$target.log" || true
done
exit "$status"
