"""The run's summary: every evaluated replicate, the sweep choices, and the regime x view
table over replicate seeds (mean, sample std and a 95 % Student-t confidence interval).

``summary.json`` is what the report notebooks read::

    {"run_name", "regimes": {<regime>: {"runs": [{"seed", "variant", "train_variant",
     "metrics", "predictions", "history", "train_summary",
     "benchmarks": {"train", "evaluate"}}], "selection": null | select/<regime>.json}},
     "rows": [{"regime", "view", "metric", "n", "mean", "std", "ci95_low", "ci95_high",
               "values"}], "provenance"}

Paths are as the workflow names them (relative to its working directory); top-1/top-5 are
fractions. With one replicate, std and the interval are null: one seed says nothing about
the spread. Every metrics.json and train summary is read checked
(:mod:`finegrained.report.records`): a value out of range or of the wrong type stops the
summary, naming the file and the key.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from finegrained.fileio import atomic_output, read_json, sha256_file, write_json
from finegrained.plan.jobs import VIEWS
from finegrained.provenance import provenance
from finegrained.report.records import count, read_metrics, read_train_summary

METRICS = ("top1", "top5")
CONFIDENCE = 0.95
FRACTION = (0.0, 1.0)     # the range of an accuracy
CSV_FIELDS = ("regime", "protocol", "view", "metric", "n", "mean", "std", "ci95_low",
              "ci95_high", "values")


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE,
            bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """``n``, ``mean``, sample ``std`` (ddof 1) and the two-sided Student-t interval of the
    mean at ``confidence``, cut to ``bounds``, the range the quantity can take (an accuracy
    of 0.95 ± 0.06 over 3 seeds has an interval up to 1.0, not 1.01: the cut interval holds
    the true mean whenever the whole one does); std and interval are None for fewer than
    two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
    from scipy.stats import t   # scipy comes with jax; imported here so the Snakefile stays light

    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_low": max(mean - half, bounds[0]),
            "ci95_high": min(mean + half, bounds[1])}


def protocol_label(metrics: Mapping) -> str:
    """How an evaluated model was chosen and what it was trained on, in a few words
    (``val_top1, train`` or ``val_loss, refit on train+val``)."""
    protocol = metrics.get("protocol") or {"select_by": "val_top1", "refit": False}
    return (f"{protocol['select_by']}, "
            + ("refit on train+val" if protocol.get("refit") else "train"))


def summarize(metrics_by_regime: Mapping[str, Sequence[Mapping]]) -> list[dict]:
    """One row per regime, view and metric over the regime's replicates (metrics.json dicts),
    regimes in the given order, views in :data:`VIEWS` (then any others); each row names
    the protocol of its runs (:func:`protocol_label`)."""
    rows = []
    for regime, runs in metrics_by_regime.items():
        if not runs:
            continue
        protocol = "; ".join(dict.fromkeys(protocol_label(run) for run in runs))
        names = [v for v in runs[0]["views"] if all(v in run["views"] for run in runs)]
        for view in sorted(names, key=lambda v: (VIEWS + (v,)).index(v)):
            for metric in METRICS:
                values = [float(run["views"][view][metric]) for run in runs]
                rows.append({"regime": regime, "protocol": protocol, "view": view,
                             "metric": metric, **mean_ci(values, bounds=FRACTION),
                             "values": values})
    return rows


def _percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def markdown_table(rows: Sequence[Mapping], metric: str) -> str:
    """Regimes x views of ``metric`` in percent: ``mean ± std [CI low, high]``, n and the
    protocol (selection rule, training data) per row."""
    picked = [r for r in rows if r["metric"] == metric]
    regimes = list(dict.fromkeys(r["regime"] for r in picked))
    views = list(dict.fromkeys(r["view"] for r in picked))
    cell = {(r["regime"], r["view"]): r for r in picked}
    protocol = {r["regime"]: r.get("protocol", "") for r in picked}
    lines = [f"| regime | protocol | seeds | {' | '.join(views)} |",
             "|---|---|---:|" + "---:|" * len(views)]
    for regime in regimes:
        cells, n = [], None
        for view in views:
            row = cell.get((regime, view))
            if row is None:
                cells.append("")
                continue
            n = row["n"]
            text = _percent(row["mean"])
            if row["std"] is not None:
                text += (f" ± {_percent(row['std'])} "
                         f"[{_percent(row['ci95_low'])}, {_percent(row['ci95_high'])}]")
            cells.append(text)
        lines.append(f"| {regime} | {protocol[regime]} | {n} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping], csv_path: str | os.PathLike,
                 md_path: str | os.PathLike) -> None:
    """The rows as CSV (one per regime, view and metric; values ``;``-joined) and as
    Markdown (top-1 and top-5 tables, percent)."""
    with atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS},
                             "values": ";".join(repr(v) for v in row["values"])})
    text = ("Test accuracy (%) per regime and test-time view: mean ± sample std "
            f"[{int(CONFIDENCE * 100)} % Student-t confidence interval] over the replicate "
            "seeds; a single seed shows its value only. Protocol: the rule that chose epochs "
            "and grid points on validation, and whether the evaluated model was refitted on "
            "train + validation.\n\n## Top-1\n\n"
            + markdown_table(rows, "top1") + "\n## Top-5\n\n" + markdown_table(rows, "top5"))
    with atomic_output(md_path) as tmp:
        Path(tmp).write_text(text)


def run_record(results_dir: str, metrics_path: str, metrics: Mapping) -> dict:
    """Where one evaluated replicate's files are, from its metrics.json."""
    regime = metrics["regime"]
    variant = metrics.get("variant", "")
    train_variant = metrics.get("train_variant", variant)
    train = f"{results_dir}/train/{regime}{train_variant}"
    summary_path = Path(train, "summary.json")
    summary = read_train_summary(summary_path)
    seed = count((summary.get("settings") or {}).get("seed"), summary_path, "settings.seed")
    return {"seed": seed, "variant": variant,
            "train_variant": train_variant, "metrics": metrics_path,
            "predictions": str(Path(metrics_path).with_name("predictions.parquet")),
            "history": f"{train}/history.parquet", "train_summary": f"{train}/summary.json",
            "benchmarks": {"train": f"{results_dir}/benchmarks/train/{regime}{train_variant}.tsv",
                           "evaluate": f"{results_dir}/benchmarks/evaluate/{regime}{variant}.tsv"}}


def write_summary(*, run_name: str, results_dir: str, metrics_paths: Sequence[str],
                  selection_paths: Sequence[str], out_dir: str | os.PathLike) -> dict:
    """summary.json and tables/regime_views.{csv,md} of a run from its evaluations and
    sweep selections (regimes in the order of ``metrics_paths``)."""
    selections = {}
    for path in selection_paths:
        selection = read_json(path, "sweep selection")
        selections[selection["regime"]] = selection
    regimes: dict[str, dict] = {}
    metrics_by_regime: dict[str, list] = {}
    for path in metrics_paths:
        metrics = read_metrics(path)
        regime = metrics["regime"]
        entry = regimes.setdefault(regime, {"runs": [], "selection": selections.get(regime)})
        entry["runs"].append(run_record(results_dir, str(path), metrics))
        metrics_by_regime.setdefault(regime, []).append(metrics)
    rows = summarize(metrics_by_regime)
    out_dir = Path(out_dir)
    write_tables(rows, out_dir / "tables" / "regime_views.csv",
                 out_dir / "tables" / "regime_views.md")
    summary = {"run_name": run_name, "regimes": regimes, "rows": rows,
               "provenance": {**provenance(device=False),
                              "metrics_sha256": {str(p): sha256_file(p) for p in metrics_paths}}}
    write_json(out_dir / "summary.json", summary)
    return summary


def run_answer(run_dir: str | os.PathLike, report_command: str | None = None) -> str:
    """What a finished run says in a few lines: its top-1 table (regime x view), where the
    figures and tables are, and how to build the HTML report."""
    run_dir = Path(run_dir)
    tables, figures = run_dir / "report" / "tables", run_dir / "report" / "figures"
    text = (tables / "regime_views.md").read_text()
    top1 = text.split("## Top-1", 1)[1].split("## Top-5", 1)[0].strip()
    names = ", ".join(sorted(p.stem for p in figures.glob("*.png")))
    command = report_command or f"snakemake --configfile <your config> --report {run_dir}/report.html"
    return "\n".join([f"Test top-1 (%) of run {run_dir.name}, per regime and test-time view:",
                      "", top1, "", f"Figures (PNG, SVG): {figures}/ ({names})",
                      f"Tables: {tables}/ (regime_views, throughput; CSV and Markdown)",
                      f"HTML report with every figure: {command}"])
