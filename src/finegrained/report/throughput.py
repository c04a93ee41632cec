"""The throughput table: training speed from the histories, wall time, CPU time and memory
of every job from Snakemake's benchmark files (``benchmark:`` TSVs: ``s`` wall seconds,
``cpu_time`` CPU seconds, ``max_rss`` MB).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from finegrained.fileio import atomic_output

#: Columns of the table, with the header a reader sees.
COLUMNS = {
    "job": "job",
    "epochs": "epochs",
    "images_per_second": "train images/s (median epoch)",
    "input_wait_percent": "input wait (% of epoch)",
    "train_wall_s": "train wall (s)",
    "train_cpu_s": "train CPU (s)",
    "train_max_rss_mb": "train max RSS (MB)",
    "eval_wall_s": "evaluate wall (s)",
    "eval_cpu_s": "evaluate CPU (s)",
    "eval_max_rss_mb": "evaluate max RSS (MB)",
    "note": "note",
}


def read_benchmark(path: str | os.PathLike | None) -> dict[str, float] | None:
    """The last row of a Snakemake benchmark TSV (one row per repeat) as numbers, or None
    when there is no such file."""
    if not path or not Path(path).exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return None
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def history_speed(history: Mapping[str, list] | None) -> tuple[float | None, float | None, int]:
    """(median images/s, mean input-wait fraction, epochs) of a training history. The first
    epoch of each phase includes compiling the step, so it is left out when the phase has
    more. An L-BFGS probe has no images/s: (None, None, fits)."""
    if not history:
        return None, None, 0
    n = len(history.get("epoch", []))
    speeds = history.get("images_per_second") or [None] * n
    waits = history.get("input_wait_fraction") or [None] * n
    phases = history.get("phase") or ["main"] * n
    keep = [i for i in range(n) if speeds[i] is not None and not math.isnan(speeds[i])]
    later = [i for i in keep if i > 0 and phases[i - 1] == phases[i]]
    first_only = {phases[i] for i in keep} - {phases[i] for i in later}
    chosen = later + [i for i in keep if phases[i] in first_only]
    if not chosen:
        return None, None, n
    wait = [waits[i] for i in chosen if waits[i] is not None]
    return (float(np.median([speeds[i] for i in chosen])),
            float(np.mean(wait)) if wait else None, n)


def throughput_rows(runs: Mapping[str, list[dict]], root: str | os.PathLike = ".",
                    extra_benchmarks: Mapping[str, str | os.PathLike | tuple] | None = None
                    ) -> list[dict]:
    """One row per evaluated run (``regime`` + its train variant), from
    :func:`finegrained.report.figures.load_runs`'s runs and their benchmark files, then one
    per ``extra_benchmarks`` job (name -> TSV, or (TSV, note): pretraining, the feature
    cache) with only the wall/CPU/memory columns."""
    root = Path(root)
    rows = []
    for regime, regime_runs in runs.items():
        for run in regime_runs:
            history = run.get("history_data")
            speed, wait, epochs = history_speed(history)
            probe = bool(history) and "l2" in history and speed is None
            bench = run.get("benchmarks") or {}
            train = read_benchmark(root / bench["train"]) if bench.get("train") else None
            ev = read_benchmark(root / bench["evaluate"]) if bench.get("evaluate") else None
            rows.append({
                "job": regime + (run.get("train_variant") or run.get("variant") or ""),
                "epochs": None if probe else epochs,
                "note": f"L-BFGS on cached features, {epochs} L2 strengths" if probe else "",
                "images_per_second": speed,
                "input_wait_percent": None if wait is None else 100 * wait,
                **_benchmark_columns("train", train), **_benchmark_columns("eval", ev)})
    for name, path in (extra_benchmarks or {}).items():
        path, note = path if isinstance(path, tuple) else (path, "")
        bench = read_benchmark(root / path)
        if bench is not None:
            rows.append({"job": name, "epochs": None, "images_per_second": None,
                         "input_wait_percent": None, **_benchmark_columns("train", bench),
                         **_benchmark_columns("eval", None), "note": note})
    return rows


def _benchmark_columns(prefix: str, bench: Mapping | None) -> dict:
    bench = bench or {}
    return {f"{prefix}_wall_s": bench.get("s"), f"{prefix}_cpu_s": bench.get("cpu_time"),
            f"{prefix}_max_rss_mb": bench.get("max_rss")}


def _format(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key in ("job", "note"):
        return str(value)
    if key == "epochs":
        return str(int(value))
    if key == "input_wait_percent":
        return f"{value:.2f}"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def write_throughput(rows: Sequence[Mapping], csv_path, md_path) -> None:
    """The rows as CSV (machine-readable, raw numbers) and as a Markdown table (rounded; an
    empty cell: not applicable)."""
    for path in (csv_path, md_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(COLUMNS))
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row.get(k) for k in COLUMNS])
    lines = ["| " + " | ".join(COLUMNS.values()) + " |",
             "|" + "|".join("---" if k in ("job", "note") else "---:" for k in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_format(k, row.get(k)) for k in COLUMNS) + " |" for row in rows]
    with atomic_output(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


__all__ = ["COLUMNS", "history_speed", "read_benchmark", "throughput_rows", "write_throughput"]
