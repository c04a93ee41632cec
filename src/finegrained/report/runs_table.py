"""The regime x view table of one or more runs, from their result files (no JAX).

A run is a ``results/<run_name>/`` folder. For each evaluation there (``<regime>``, with
``+seed=N`` for a replicate) the table reads

- ``eval/<regime>/metrics.json``: top-1/top-5 of every test-time view, top-1 per taxonomy
  level (on the ``summary_view``), the number of test images;
- ``benchmarks/train/<job>.tsv``, ``benchmarks/refit/<regime>.tsv`` (``protocol.refit``)
  and ``benchmarks/evaluate/<regime>.tsv``: the wall time (Snakemake's ``s`` column) of
  the train (+ refit) and evaluate jobs;
- ``train/<job>/summary.json``: the best validation top-1 (model selection).

Each file is read checked (:mod:`finegrained.report.records`): a value out of its range or
of the wrong type is an error naming the file and the key, never a cell of the table.

``<job>`` is the training job the evaluation read: ``<regime>`` (with its seed), or for a swept regime the
grid point chosen on validation (``train_variant`` of the metrics, e.g.
``full_finetune+epochs=10``), which the regime cell names.

Runs are given in order with a label (e.g. the weights they start from); rows follow the
runs, then the regimes in the order of ``finegrained.plan.regimes.REGIMES``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from finegrained.errors import DataError
from finegrained.plan.jobs import VIEWS
from finegrained.report import tables
from finegrained.report.records import (count, fraction, read_metrics, read_train_summary,
                                        seconds)
from finegrained.report.throughput import read_benchmark
from finegrained.plan.regimes import REGIMES

VIEW_TITLES = {"center": "centre", "ten_crop": "10-crop", "multi_scale": "multi-scale"}


def benchmark_seconds(path: str | os.PathLike) -> float | None:
    """Wall seconds of a job from its Snakemake benchmark TSV (None when absent)."""
    bench = read_benchmark(path)
    return None if bench is None or "s" not in bench else seconds(bench["s"], path, "s")


def _val_top1(summary: Path) -> float | None:
    if not summary.exists():
        return None
    return read_train_summary(summary).get("best_val_top1")


def _regimes(run_dir: Path) -> list[str]:
    found = {p.parent.name for p in (run_dir / "eval").glob("*/metrics.json")}
    known = [r for r in REGIMES if r in found]
    return known + sorted(found - set(known))


def run_rows(label: str, run_dir: str | os.PathLike) -> list[dict]:
    """One row per evaluated regime of ``run_dir``: ``run``, ``regime``, ``n_test``,
    ``<view>_top1``/``<view>_top5`` (fractions), ``per_level`` ({level: top-1}),
    ``val_top1``, ``train_seconds``, ``eval_seconds``, ``train_variant`` ('' unswept)."""
    run_dir = Path(run_dir)
    rows = []
    for name in _regimes(run_dir):
        metrics = read_metrics(run_dir / "eval" / name / "metrics.json")
        regime = name.partition("+")[0]
        replicate = name[len(regime):]               # '' or '+seed=N'
        chosen = metrics.get("train_variant") or ""
        variant = chosen if chosen != replicate else ""
        job = regime + (chosen or replicate)
        refit = bool((metrics.get("protocol") or {}).get("refit"))
        bench = run_dir / "benchmarks"
        row = {"run": label, "regime": name, "train_variant": variant,
               "n_test": metrics["n_test"],
               "per_level": dict(metrics.get("per_level") or {}),
               "val_top1": _val_top1(run_dir / "train" / job / "summary.json"),
               "train_seconds": _total(
                   benchmark_seconds(bench / "train" / f"{job}.tsv"),
                   benchmark_seconds(bench / "refit" / f"{name}.tsv") if refit else 0.0),
               "eval_seconds": benchmark_seconds(run_dir / "benchmarks/evaluate" / f"{name}.tsv")}
        for view in VIEWS:
            scores = metrics["views"].get(view, {})
            row[f"{view}_top1"], row[f"{view}_top5"] = scores.get("top1"), scores.get("top5")
        rows.append(row)
    return rows


def _total(*seconds: float | None) -> float | None:
    """The sum, or None when a part is missing."""
    return None if any(s is None for s in seconds) else float(sum(seconds))


def collect_rows(runs: Iterable[tuple[str, str | os.PathLike]]) -> list[dict]:
    """:func:`run_rows` of every ``(label, run_dir)``, in order."""
    return [row for label, run_dir in runs for row in run_rows(label, run_dir)]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _secs(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min"


def markdown_table(rows: Sequence[Mapping], levels: Sequence[str] = ()) -> str:
    """The regime x view table in Markdown: top-1 / top-5 (%) per view, top-1 per taxonomy
    ``levels`` (on the summary view), best validation top-1, train and evaluate wall time."""
    head = (["weights / run", "regime"]
            + [f"{VIEW_TITLES[v]} top-1 / top-5" for v in VIEWS]
            + [f"{level} top-1" for level in levels]
            + ["val top-1", "train", "evaluate"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        variant = f" (`{row['train_variant']}`)" if row["train_variant"] else ""
        cells = [row["run"], f"`{row['regime']}`{variant}"]
        cells += [f"{_pct(row[f'{v}_top1'])} / {_pct(row[f'{v}_top5'])}" for v in VIEWS]
        cells += [_pct(row["per_level"].get(level)) for level in levels]
        cells += [_pct(row["val_top1"]), _secs(row["train_seconds"]), _secs(row["eval_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def job_seconds(run_dir: str | os.PathLike) -> dict[str, float]:
    """Wall seconds of every job of a run that left a benchmark file, by the file's path
    under ``benchmarks/`` without ``.tsv`` (``train/linear_probe``, ``features/train``, ...)."""
    root = Path(run_dir) / "benchmarks"
    out = {}
    for path in sorted(root.rglob("*.tsv")):
        seconds = benchmark_seconds(path)
        if seconds is not None:
            out[path.relative_to(root).with_suffix("").as_posix()] = seconds
    return out


def markdown_job_times(runs: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """One row per run: the wall time of its data phase (manifests, crops, indexes, colour
    statistics, target init), of each feature, train and evaluate job, and the sum."""
    lines = ["| weights / run | data jobs (sum) | feature, train, refit and evaluate jobs "
             "| sum of all jobs |", "|---|---|---|---|"]
    model_jobs = ("features", "train", "refit", "evaluate")
    for label, run_dir in runs:
        times = job_seconds(run_dir)
        data = sum(s for job, s in times.items() if job.split("/")[0] not in model_jobs)
        jobs = ", ".join(f"{job} {_secs(s)}" for job, s in times.items()
                         if job.split("/")[0] in model_jobs)
        lines.append(f"| {label} | {_secs(data)} | {jobs or '–'} "
                     f"| {_secs(sum(times.values()))} |")
    return "\n".join(lines) + "\n"


def replicate_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's replicate table (``report/tables/regime_views.csv``: mean, std
    and 95 % interval over its seeds, per regime, view and metric), each number checked:
    ``n`` a whole number >= 1, the rest fractions (std and interval empty for one seed)."""
    path = Path(run_dir) / "report" / "tables" / "regime_views.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(path, "replicate table not found") from None
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line}"

        def number(key, parse):
            text = row.get(key)
            try:
                return None if text == "" else parse(text)
            except (TypeError, ValueError):
                raise DataError(where, f"{key} is {text!r}, not a number") from None
        parsed = {"n": count(number("n", int), where, "n", minimum=1)}
        for key in ("mean", "std", "ci95_low", "ci95_high"):
            parsed[key] = fraction(number(key, float), where, key, optional=key != "mean")
        out.append({**row, **parsed})
    return out


def markdown_replicates(runs: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """Per run, its top-1 table over the seeds (``mean ± std [95 % interval]``, %)."""
    return "\n".join(f"{label} (top-1 %, over the seeds):\n\n"
                     + tables.markdown_table(replicate_rows(run_dir), "top1")
                     for label, run_dir in runs)


def replace_between(text: str, block: str, begin: str, end: str) -> str:
    """``text`` with everything between the marker lines ``begin`` and ``end`` replaced by
    ``block`` (markers kept); an error when a marker is missing."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"markers {begin!r} ... {end!r} not found in order")
    head = text[:start + len(begin)]
    return head + "\n" + block + text[stop:]
