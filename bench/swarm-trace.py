#!/usr/bin/env python3
"""Where a swarm run's time went, from the agents' logs that
`SHOAL_BENCH_TRACE=dir bash bench/swarm-netns.sh` keeps in `dir` (each chunk that came:
from whom, how long after it was asked).

For every chunk a host got from a peer, its lag: from when the first host got it from the
uploader to when this host stored it, split into "until asked" and "asked to come". The lag
by when the uploader sent the chunk shows whether the hosts keep up with the uploader or
fall behind it (what the end of a run is made of). Also: the hosts' end times, and what
the mesh did meanwhile (members declared down, rejoins, sources avoided).

Usage: python3 bench/swarm-trace.py DIR [MODE]   (MODE: swarm, the default, or origin-only)
"""
import collections
import datetime
import glob
import re
import sys

CAME = re.compile(
    r"^(\S+) DEBUG .*a chunk came chunk=(\d+) peer=(\S+) batch=(\d+) waited_ms=(\d+) got=(\w+)"
)


def quantiles(values):
    values = sorted(values)
    if not values:
        return "none"
    n = len(values)
    return " ".join(
        "p%d %.2f s" % (p, values[min(n - 1, n * p // 100)]) for p in (10, 50, 90, 99)
    )


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    root, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "swarm")
    came = {}
    counts = collections.Counter()
    for path in sorted(glob.glob("%s/*-%s.log" % (root, mode))):
        host = path.rsplit("/", 1)[-1][: -len("-%s.log" % mode)]
        rows = []
        for line in open(path, errors="replace"):
            if "declared this agent down" in line:
                counts["rejoined after being declared down"] += 1
            elif "member is dead" in line:
                counts["members declared dead"] += 1
            elif "avoided from now on" in line:
                counts["chunk sources avoided"] += 1
            m = CAME.match(line)
            if m:
                at = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                rows.append((at.timestamp(), int(m.group(2)), m.group(3),
                             int(m.group(5)) / 1000, m.group(6)))
        if host != "uploader":
            came[host] = rows
    rows = [r for v in came.values() for r in v]
    if not rows:
        sys.exit("no `a chunk came` events in %s (was SHOAL_BENCH_TRACE set?)" % root)
    t0 = min(at - waited for at, _, _, waited, _ in rows)
    first = {}
    for at, chunk, peer, _, got in rows:
        if peer == "uploader" and got == "Stored":
            first[chunk] = min(first.get(chunk, at), at)
    lag, asked, coming = [], [], []
    by_time = collections.defaultdict(list)
    ends = []
    for host, v in came.items():
        seen = {}
        for at, chunk, peer, waited, got in v:
            if got != "Stored" or chunk in seen:
                continue
            seen[chunk] = at
            if peer != "uploader" and chunk in first:
                lag.append(at - first[chunk])
                coming.append(waited)
                asked.append(at - waited - first[chunk])
                by_time[int(first[chunk] - t0) // 3 * 3].append(at - first[chunk])
        if seen:
            ends.append(max(seen.values()) - t0)
    if not first:
        sys.exit("no chunk came from the uploader in %s: nothing to measure the lag from" % root)
    print("chunks the uploader sent: %d, of them distinct: %d" % (
        sum(1 for r in rows if r[2] == "uploader"), len(first)))
    print("lag, first from the uploader to stored here: %s" % quantiles(lag))
    print("  until asked:                            %s" % quantiles(asked))
    print("  asked to come:                          %s" % quantiles(coming))
    print("lag by when the uploader sent the chunk (s after the first request):")
    for k in sorted(by_time):
        v = sorted(by_time[k])
        print("  %2d-%2d s: %5d chunks, median %.2f s, p90 %.2f s" % (
            k, k + 3, len(v), v[len(v) // 2], v[len(v) * 9 // 10]))
    print("last chunk from the uploader at %.1f s" % (max(first.values()) - t0))
    print("hosts' last chunk at (s): %s" % ", ".join("%.1f" % e for e in sorted(ends)))
    for what, n in sorted(counts.items()):
        print("%s: %d" % (what, n))


if __name__ == "__main__":
    main()
