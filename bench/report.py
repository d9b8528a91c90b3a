"""Showing a run: the rich table, the JSON document, the plot, the targets.

A contender whose counters drifted is shown as WRONG, never with a ratio: a
wrong counter is not a fast one.

``hot`` measures throughput, not time: it gets a table of its own ("hot: N
workers on 1 parent": committed transactions per second, committed and
failed counts summed over the runs, ratio of committed/s to ``none``, higher
is better), its own JSON fields (``tx_per_s``, ``committed``, ``failed``,
``ratio``, plus per-run lists and the failure kinds) and its own panel in the
plot.

Behind the latency proxy (``--latency-ms``) every measured cell also shows
its round trips per transaction (median of runs): ``0.412 x1.21 3.0rt`` in
the table, a column of its own in the ``hot`` table, ``round_trips_per_txn``
in the JSON. Without the proxy there is nothing counted, and nothing shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .runner import Cell, Run


@dataclass
class Target:
    """One of the project's performance targets (set on PostgreSQL)."""

    name: str
    value: float | None
    limit: float | None
    met: bool | None  # None: cannot be judged in this run
    note: str = ""
    #: the cells' runs' scatter, combined (relative; see :attr:`Cell.spread`):
    #: a value nearer the limit than this is within the noise of the run
    noise: float | None = None

    @property
    def within_noise(self) -> bool:
        return (self.value is not None and self.limit is not None and self.noise is not None
                and abs(self.value - self.limit) <= self.noise * self.value)


def _noise(run: Run, workload: str, contenders: list[str]) -> float | None:
    """Combined relative scatter of the cells a ratio divides (root of the sum of squares)."""
    spreads = [run.cells[(workload, c)].spread for c in contenders if (workload, c) in run.cells]
    if not spreads or any(s is None for s in spreads):
        return None
    return sum(s * s for s in spreads) ** 0.5  # type: ignore[operator]


def _ratio(run: Run, workload: str, contender: str) -> float | None:
    cell = run.cells.get((workload, contender))
    return cell.ratio if cell is not None and cell.status == "ok" else None


def targets(run: Run) -> list[Target]:
    """The project targets, evaluated on this run (ratios to ``none``)."""
    from countercache.config import STRATEGIES

    found: list[Target] = []

    def ceiling(name: str, workload: str, contender: str, limit: float, against: str | None = None) -> None:
        if workload not in run.workloads or contender not in run.contenders:
            return
        cell = run.cells[(workload, contender)]
        if cell.status == "WRONG":
            found.append(Target(name, None, limit, False, "WRONG: counters drifted"))
            return
        value = _ratio(run, workload, contender)
        if against is not None:
            other = _ratio(run, workload, against) if against in run.contenders else None
            if value is None or other is None:
                found.append(Target(name, None, limit, None, f"{against} not measured"))
                return
            value = value / other
        if value is None:
            found.append(Target(name, None, limit, None, cell.note or "not measured"))
            return
        involved = [contender, "none"] if against is None else [contender, against]  # (none cancels out)
        found.append(Target(name, value, limit, value <= limit, noise=_noise(run, workload, involved)))

    for workload, limit in (("batch", 1.05), ("txn", 1.10), ("delete", 1.15), ("move", 1.20)):
        ceiling(f"bulk {workload} <= x{limit:.2f}", workload, "bulk", limit)
    for workload in ("batch", "delete"):
        for other in ("pg_row_trigger", "pg_statement_trigger", "aggregated"):
            if workload not in run.workloads or "bulk" not in run.contenders or other not in run.contenders:
                continue
            mine, theirs = _ratio(run, workload, "bulk"), _ratio(run, workload, other)
            name = f"bulk {workload} below {other}"
            if mine is None or theirs is None:
                missing = other if theirs is None else "bulk"
                found.append(Target(name, None, None, None, f"{missing}: {run.cells[(workload, missing)].note or 'not measured'}"))
            else:
                found.append(Target(name, mine, theirs, mine < theirs, noise=_noise(run, workload, ["bulk", other])))
    for workload in ("batch", "txn", "delete", "move"):
        ceiling(f"per_row {workload} <= 1.10 x listener", workload, "per_row", 1.10, against="listener")
    # small transactions: no more than the same statements written by hand
    ceiling("bulk txn <= flush_listener", "txn", "bulk", 1.0, against="flush_listener")
    ceiling("deferred txn <= x1.10", "txn", "deferred", 1.10)
    for strategy in STRATEGIES:
        ceiling(f"{strategy} noop <= x1.02", "noop", strategy, 1.02)
    if "hot" in run.workloads and "sharded" in run.contenders:
        found.extend(_hot_targets(run))
    return found


def _hot_targets(run: Run) -> list[Target]:
    """``sharded`` on a hot parent: near the floor, and ahead of the database doing the same."""
    cell = run.cells[("hot", "sharded")]
    floor_name, ahead_name = "sharded hot >= x0.90 none", "sharded hot ahead of pg_sharded_trigger"
    if cell.status == "WRONG":
        return [Target(floor_name, None, 0.90, False, "WRONG: counters drifted"),
                Target(ahead_name, None, None, False, "WRONG: counters drifted")]
    if cell.ratio is None:
        note = cell.note or "not measured"
        return [Target(floor_name, None, 0.90, None, note), Target(ahead_name, None, None, None, note)]
    found = [Target(floor_name, cell.ratio, 0.90, cell.ratio >= 0.90,
                    noise=_noise(run, "hot", ["sharded", "none"]))]
    if "pg_sharded_trigger" in run.contenders:
        theirs = _ratio(run, "hot", "pg_sharded_trigger")
        if theirs is None:
            other = run.cells[("hot", "pg_sharded_trigger")]
            found.append(Target(ahead_name, None, None, None,
                                f"pg_sharded_trigger: {other.note or 'not measured'}"))
        else:
            found.append(Target(ahead_name, cell.ratio, theirs, cell.ratio > theirs,
                                noise=_noise(run, "hot", ["sharded", "pg_sharded_trigger"])))
    return found


def _cell_text(cell: Cell) -> str:
    if cell.status == "WRONG":
        return f"[bold red]WRONG[/bold red] ({cell.drift} off)"
    if cell.status in ("skipped", "unavailable"):
        return "[dim]-[/dim]"
    if cell.status == "error":
        return "[red]error[/red]"
    seconds = cell.seconds
    if seconds is None:
        return "[dim]-[/dim]"
    ratio = f" x{cell.ratio:.2f}" if cell.ratio is not None else ""
    return f"{seconds:.3f}{ratio}{_trips_text(cell)}"


def _trips_text(cell: Cell) -> str:
    per_txn = cell.trips_per_txn
    return f" {per_txn:.1f}rt" if per_txn is not None else ""


def _latency_text(run: Run) -> str:
    return f", latency {run.latency_ms:g} ms each way" if run.latency_ms is not None else ""


def _timed_workloads(run: Run) -> list[str]:
    return [w for w in run.workloads if w != "hot"]


def _hot_text(cell: Cell) -> list[str]:
    """tx/s, committed, failed, ratio."""
    if cell.status in ("skipped", "unavailable") or not cell.rates:
        dash = "[red]error[/red]" if cell.status == "error" else "[dim]-[/dim]"
        return [dash, "-", "-", "-", "-"]
    rate = f"{cell.tx_per_s:,.1f}"
    if cell.status == "WRONG":
        rate = f"[bold red]WRONG[/bold red] (off by {cell.drift_total}) {rate}"
    failed = sum(cell.failed)
    ratio = f"x{cell.ratio:.2f}" if cell.ratio is not None and cell.status == "ok" else "-"
    trips = f"{cell.trips_per_txn:.2f}" if cell.trips_per_txn is not None else "-"
    return [rate, f"{sum(cell.committed):,}", f"[yellow]{failed:,}[/yellow]" if failed else "0", ratio, trips]


def _hot_workers(run: Run) -> str:
    """``8 processes`` or ``8 threads of one process``."""
    return f"{run.sizes.workers} {'threads of one process' if run.sizes.threads else 'processes'}"


def print_hot_table(run: Run, console: Any, with_targets: bool = True) -> None:
    from rich.table import Table

    table = Table(
        title=(
            f"hot: {_hot_workers(run)} on 1 parent, {run.backend} {run.server_version}, "
            f"{run.sizes.seconds:g} s per run, median of {run.repeat}{_latency_text(run)}"
        ),
        caption=(
            "committed transactions per second (median of runs) and ratio to `none` in this run: "
            f"HIGHER is better; committed and failed summed over the {run.repeat} run(s); drift checked after every run"
        ),
    )
    table.add_column("contender")
    table.add_column("committed/s", justify="right")
    table.add_column("committed", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("x none (higher better)", justify="right")
    if run.latency_ms is not None:  # (measured through the proxy only)
        table.add_column("round trips/txn", justify="right")
    table.add_column("drift", justify="right")
    table.add_column("notes")
    for contender in run.contenders:
        cell = run.cells[("hot", contender)]
        if cell.drift is not None:
            drift = str(cell.drift)
        else:
            drift = "[dim]not kept[/dim]" if contender == "none" else "-"
        notes = [cell.note] if cell.note and cell.status != "WRONG" else []
        notes += [f"{n}x {kind}" for kind, n in cell.errors.most_common(3)]
        columns = _hot_text(cell)
        if run.latency_ms is None:
            del columns[4]
        table.add_row(contender, *columns, drift, "; ".join(notes))
    console.print(table)
    console.print(f"  [bold]hot[/bold]: {run.descriptions['hot']}")
    if with_targets and not _timed_workloads(run):  # else the timed table's targets include these
        _print_targets(run, console, targets(run))


def print_table(run: Run, console: Any, with_targets: bool = True) -> None:
    if _timed_workloads(run):
        _print_timed_table(run, console, with_targets)
    if "hot" in run.workloads:
        print_hot_table(run, console, with_targets)


def _print_timed_table(run: Run, console: Any, with_targets: bool = True) -> None:
    from rich.table import Table

    workloads = _timed_workloads(run)
    title = (
        f"countercache bench on {run.backend} {run.server_version}: "
        f"{run.sizes.children:,} children over {run.sizes.parents:,} parents, "
        f"median of {run.repeat}{_latency_text(run)}"
    )
    caption = "seconds and ratio to `none` in this run; drift checked after every run"
    if run.latency_ms is not None:
        caption += "; Nrt: round trips per transaction through the proxy"
    table = Table(title=title, caption=caption)
    table.add_column("contender")
    for workload in workloads:
        table.add_column(workload, justify="right")
    table.add_column("drift", justify="right")
    table.add_column("notes")
    for contender in run.contenders:
        cells = [run.cells[(w, contender)] for w in workloads]
        drifts = [c.drift for c in cells if c.drift is not None]
        drift = str(max(drifts)) if drifts else ("[dim]not kept[/dim]" if contender == "none" else "-")
        notes = sorted({c.note for c in cells if c.note and c.status != "WRONG"})
        table.add_row(contender, *(_cell_text(c) for c in cells), drift, "; ".join(notes))
    console.print(table)
    for workload in workloads:
        floor = run.cells.get((workload, "none"))
        spread = floor.spread if floor is not None else None
        scatter = f" (runs of `none` scatter ±{spread:.0%})" if spread is not None else ""
        console.print(f"  [bold]{workload}[/bold]: {run.descriptions[workload]}{scatter}")
    if with_targets:
        _print_targets(run, console, targets(run))


def _print_targets(run: Run, console: Any, found: list[Target]) -> None:
    from rich.table import Table

    if not found:
        return
    checks = Table(title=f"project targets (set on PostgreSQL; this run: {run.backend})")
    checks.add_column("target")
    checks.add_column("measured", justify="right")
    checks.add_column("limit", justify="right")
    checks.add_column("noise", justify="right")
    checks.add_column("")
    for t in found:
        verdict = {True: "[green]met[/green]", False: "[bold red]MISSED[/bold red]", None: "[dim]n/a[/dim]"}[t.met]
        if t.within_noise:
            verdict += " [yellow](within noise)[/yellow]"
        checks.add_row(
            t.name,
            f"{t.value:.3f}" if t.value is not None else "-",
            f"{t.limit:.3f}" if t.limit is not None else "-",
            f"±{t.noise:.0%}" if t.noise is not None else "-",
            verdict + (f" {t.note}" if t.note else ""),
        )
    console.print(checks)
    console.print("  noise: a typical run's distance from the median (median absolute deviation),\n"
                  "  combined over the cells compared; a ratio nearer its limit than that can come\n"
                  "  out on either side in another run")


def as_json(run: Run) -> dict[str, Any]:
    return {
        "backend": run.backend,
        "server_version": run.server_version,
        "url": run.url,
        "sizes": {
            "children": run.sizes.children,
            "parents": run.sizes.parents,
            "repeat": run.repeat,
            "workloads": {
                w: {"rows": _rows(run, w), "description": run.descriptions[w]} for w in run.workloads
            },
            **({"workers": run.sizes.workers, "seconds": run.sizes.seconds,
                "mode": "threads" if run.sizes.threads else "processes"} if "hot" in run.workloads else {}),
            "latency_ms": run.latency_ms,
        },
        "workloads": run.workloads,
        "contenders": run.contenders,
        "results": [
            {
                "workload": w,
                "contender": c,
                "status": cell.status,
                "note": cell.note,
                "seconds": cell.seconds,
                "ratio": cell.ratio,
                "drift": cell.drift,
                "drift_total": cell.drift_total,
                "times": cell.times,
                "spread": cell.spread,
                **({"round_trips_per_txn": cell.trips_per_txn, "round_trips": cell.round_trips}
                   if run.latency_ms is not None else {}),
                **(_hot_json(cell) if w == "hot" else {}),
            }
            for w in run.workloads
            for c in run.contenders
            for cell in (run.cells[(w, c)],)
        ],
        "targets": [{**t.__dict__, "within_noise": t.within_noise} for t in targets(run)],
    }


def _hot_json(cell: Cell) -> dict[str, Any]:
    """``hot``: ``ratio`` is committed/s over that of ``none`` (higher is better)."""
    measured = bool(cell.rates)
    return {
        "tx_per_s": cell.tx_per_s,
        "committed": sum(cell.committed) if measured else None,
        "failed": sum(cell.failed) if measured else None,
        "runs": [
            {"committed": c, "failed": f, "tx_per_s": r}
            for c, f, r in zip(cell.committed, cell.failed, cell.rates, strict=True)
        ],
        "errors": dict(cell.errors),
    }


def _rows(run: Run, workload: str) -> int | None:
    from .workloads import WORKLOADS

    return WORKLOADS[workload].rows(run.sizes)


def plot(run: Run, path: str) -> None:
    """Grouped bars of the ratios to ``none``, one group per workload (PNG).

    ``hot`` (a throughput ratio, higher is better) gets a panel of its own.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = _timed_workloads(run)
    hot = ["hot"] if "hot" in run.workloads else []
    contenders = [c for c in run.contenders if any(run.cells[(w, c)].measured for w in run.workloads)]
    panels = [p for p in (timed, hot) if p]
    widths = [1.6 * len(p) + 2 for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(6.0, sum(widths)), 4.5), squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for ax, workloads in zip(axes[0], panels, strict=True):
        _bars(ax, run, workloads, contenders)
        if workloads is hot:
            ax.set_ylabel("committed/s / committed/s of `none` (higher is better)")
            ax.set_xticks([0], [f"hot ({_hot_workers(run)}, 1 parent)"])
        else:
            ax.set_ylabel("time / time of `none` (same run)")
    what = []
    if timed:
        what.append(f"{run.sizes.children:,} children / {run.sizes.parents:,} parents")
    if hot:
        what.append(f"hot: {_hot_workers(run)} x {run.sizes.seconds:g} s{_latency_text(run)}")
    fig.suptitle(
        f"countercache bench, {run.backend} {run.server_version}: "
        f"{'; '.join(what)}, median of {run.repeat}",
        fontsize=9,
    )
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _bars(ax: Any, run: Run, workloads: list[str], contenders: list[str]) -> None:
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(contenders))
    colors = plt.get_cmap("tab10")
    highest = 1.0
    for i, contender in enumerate(contenders):
        xs, ys, wrong = [], [], []
        for j, workload in enumerate(workloads):
            cell = run.cells[(workload, contender)]
            if not cell.measured or cell.ratio is None:
                continue
            xs.append(j + (i - (len(contenders) - 1) / 2) * width)
            ys.append(cell.ratio)
            wrong.append(cell.status == "WRONG")
            highest = max(highest, cell.ratio)
        bars = ax.bar(xs, ys, width, label=contender, color=colors(i % 10))
        for bar, is_wrong in zip(bars, wrong, strict=True):
            if is_wrong:
                bar.set_hatch("xx")
                bar.set_edgecolor("red")
                ax.annotate("WRONG", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, color="red", rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8)
    if highest > 4:
        ax.set_yscale("log")
        ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= highest * 1.2]
        ax.set_yticks(ticks, [f"x{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xticks(range(len(workloads)), workloads)
