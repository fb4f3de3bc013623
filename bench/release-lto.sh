#!/usr/bin/env bash
# Whether link-time optimisation pays for the release binary: size, and the time of two
# CPU-bound commands (packing a 128 MiB revision; compiling and running a hook with a cold
# cache), each run alternately with the `release` (LTO) and `release-no-lto` builds in the
# same run.
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
for profile in release-no-lto release; do pack[$profile]=0; hookrun[$profile]=0; done
for i in $(seq "$runs"); do
  for profile in release-no-lto release; do
    bin="target/$profile/shoal"
    t0=$(now); "$bin" bundle create "$work/rev" -o "$work/b.tar.zst" >/dev/null; t1=$(now)
    pack[$profile]=$(echo "${pack[$profile]} + $t1 - $t0" | bc)
    rm -rf "$work/cache"; mkdir -p "$work/cache"
    t0=$(now); XDG_CACHE_HOME="$work/cache" "$bin" hook run "$hook" >/dev/null 2>&1 || true; t1=$(now)
    hookrun[$profile]=$(echo "${hookrun[$profile]} + $t1 - $t0" | bc)
  done
done
printf '%-12s %12s %18s %22s\n' profile "size (MB)" "pack 128 MiB (s)" "hook, cold cache (s)"
for profile in release-no-lto release; do
  size=$(stat -c %s "target/$profile/shoal")
  printf '%-12s %12.1f %18.2f %22.2f\n' "$profile" "$(echo "$size / 1000000" | bc -l)" \
    "$(echo "${pack[$profile]} / $runs" | bc -l)" "$(echo "${hookrun[$profile]} / $runs" | bc -l)"
done
printf 'ratio lto/plain: size %.2f, pack %.2f, hook %.2f\n' \
  "$(echo "$(stat -c %s target/release/shoal) / $(stat -c %s target/release-no-lto/shoal)" | bc -l)" \
  "$(echo "${pack[release]} / ${pack[release-no-lto]}" | bc -l)" \
  "$(echo "${hookrun[release]} / ${hookrun[release-no-lto]}" | bc -l)"
