#!/usr/bin/env bash
# Whether link-time optimisation pays for the release binary: size, and the time of two
# CPU-bound commands (packing a 128 MiB revision; compiling and running a hook with a cold
# cache), each run alternately with the `release` (LTO, one codegen unit) and
# `release-no-lto` (neither) builds in the same run; the fastest run of each is reported.
# Usage: bench/release-lto.sh [RUNS]   (builds both profiles first if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
for profile in release-no-lto release; do
  [ -x "target/$profile/shoal" ] || cargo build --profile "$profile" --bin shoal
done
hook=$(ls target/shoal-examples/wasm32-wasip2/release/sandbox_probe.wasm 2>/dev/null || true)
if [ -z "$hook" ]; then
  cargo build -p shoal-examples >/dev/null  # the guests are built by its build script
  hook=target/shoal-examples/wasm32-wasip2/release/sandbox_probe.wasm
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rev"
head -c $((128 * 1024 * 1024)) /dev/urandom >"$work/rev/model.bin"
printf 'version: 0.0\nos: linux\nfiles:\n  - source: model.bin\n    destination: /srv/m\n' >"$work/rev/appspec.yml"

now() { date +%s.%N; }
declare -A pack hookrun
# The fastest of the runs: the least disturbed by the rest of the machine.
min() { if [ "$1" = none ] || [ "$(echo "$2 < $1" | bc)" = 1 ]; then echo "$2"; else echo "$1"; fi; }
for profile in release-no-lto release; do pack[$profile]=none; hookrun[$profile]=none; done
for i in $(seq "$runs"); do
  for profile in release-no-lto release; do
    bin="target/$profile/shoal"
    t0=$(now); "$bin" bundle create "$work/rev" -o "$work/b.tar.zst" >/dev/null; t1=$(now)
    pack[$profile]=$(min "${pack[$profile]}" "$(echo "$t1 - $t0" | bc)")
    rm -rf "$work/cache"; mkdir -p "$work/cache"
    t0=$(now); XDG_CACHE_HOME="$work/cache" "$bin" hook run "$hook" >/dev/null 2>&1; t1=$(now)
    hookrun[$profile]=$(min "${hookrun[$profile]}" "$(echo "$t1 - $t0" | bc)")
  done
done
printf '%-15s %12s %18s %22s\n' profile "size (MB)" "pack 128 MiB (s)" "hook, cold cache (s)"
for profile in release-no-lto release; do
  size=$(stat -c %s "target/$profile/shoal")
  printf '%-15s %12.1f %18.3f %22.3f\n' "$profile" "$(echo "$size / 1000000" | bc -l)" \
    "${pack[$profile]}" "${hookrun[$profile]}"
done
printf 'ratio lto/plain: size %.2f, pack %.2f, hook %.2f\n' \
  "$(echo "$(stat -c %s target/release/shoal) / $(stat -c %s target/release-no-lto/shoal)" | bc -l)" \
  "$(echo "${pack[release]} / ${pack[release-no-lto]}" | bc -l)" \
  "$(echo "${hookrun[release]} / ${hookrun[release-no-lto]}" | bc -l)"
