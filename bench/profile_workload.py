"""Profile one contender on one workload: where the time of the timed part goes.

    .venv/bin/python -m bench.profile_workload CONTENDER WORKLOAD [--url URL]
        [--children N] [--parents N] [--top N] [--repeat N]

Runs the same set-up as ``countercache bench`` (untimed), then the timed part
under cProfile, and prints the countercache functions (``countercache/*``) by
cumulative and by own time, with the wall time of the run, of an unprofiled
run, and of the same workload with no counter. cProfile inflates
Python-heavy code: read the shares, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
from typing import Any

from .contenders import all_contenders
from .main import default_url
from .runner import run_one
from .workloads import WORKLOADS, Sizes


def _library_rows(stats: pstats.Stats) -> list[tuple[str, int, float, float]]:
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "/countercache/" in filename.replace("\\", "/"):
            short = filename.replace("\\", "/").split("/countercache/", 1)[1]
            rows.append((f"countercache/{short}:{line} {name}", ncalls, tottime, cumtime))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_workload")
    ap.add_argument("contender")
    ap.add_argument("workload", choices=list(WORKLOADS))
    ap.add_argument("--url", default=None)
    ap.add_argument("--children", type=int, default=10_000)
    ap.add_argument("--parents", type=int, default=100)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3, help="unprofiled runs for the wall times")
    args = ap.parse_args(argv)
    url = args.url or default_url()
    sizes = Sizes(args.children, args.parents)
    by_name = {c.name: c for c in all_contenders()}
    contender, floor = by_name[args.contender], by_name["none"]

    plain = {name: [] for name in ("none", contender.name)}  # type: dict[str, list[float]]
    for _ in range(args.repeat):
        for c in (floor, contender):
            plain[c.name].append(run_one(url, c, args.workload, sizes)[0])

    profiler = cProfile.Profile()

    def around(timed: Any) -> None:
        profiler.enable()
        try:
            timed()
        finally:
            profiler.disable()

    profiled, drift = run_one(url, contender, args.workload, sizes, around=around)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = _library_rows(stats)
    own = sum(r[2] for r in rows)
    none_s = statistics.median(plain["none"])
    mine_s = statistics.median(plain[contender.name])
    print(f"{contender.name} on {args.workload} ({WORKLOADS[args.workload].describe(sizes)}), {url}")
    print(f"  unprofiled median of {args.repeat}: {mine_s:.3f}s vs none {none_s:.3f}s "
          f"(x{mine_s / none_s:.2f}, +{mine_s - none_s:.3f}s); drift {drift}")
    print(f"  profiled: {profiled:.3f}s wall ({total:.3f}s profiled); "
          f"own time of countercache functions {own:.3f}s ({own / total:.0%})")
    for title, key in (("cumulative (includes SQL run from inside)", 3), ("own time", 2)):
        print(f"  top countercache functions by {title}:")
        print(f"    {'calls':>8} {'own s':>8} {'cum s':>8}  function")
        for name, ncalls, tottime, cumtime in sorted(rows, key=lambda r: r[key], reverse=True)[: args.top]:
            print(f"    {ncalls:>8} {tottime:>8.3f} {cumtime:>8.3f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
