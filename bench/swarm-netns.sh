#!/usr/bin/env bash
# The swarm against the physical limit S/B and against every host fetching from the
# uploader, on links shaped by tc, each agent in its own network namespace (release build;
# needs root, iproute2 and curl, installed here if missing). Defaults: 16 hosts, 256 MiB,
# 100 Mbit/s; set SHOAL_BENCH_HOSTS, SHOAL_BENCH_MIB, SHOAL_BENCH_MBIT to change them.
# The namespaces are deleted at the end. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "network namespaces and tc need root" >&2
  exit 2
fi
for tool in ip:iproute2 tc:iproute2 curl:curl; do
  if ! command -v "${tool%%:*}" >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${tool##*:}"
  fi
done
# What an interrupted earlier run left.
for ns in $(ip netns list | awk '/^shoal-bench-/ {print $1}'); do ip netns del "$ns"; done
exec cargo bench -p shoal-agent --bench swarm_netns "$@"
