"""The result figures of a run, drawn from the files the workflow wrote.

Every function takes already-read inputs (the run's ``report/summary.json`` and the files it
names, read with :func:`load_runs`), draws one matplotlib figure, writes it as
``<stem>.png`` and ``<stem>.svg`` (:func:`save`) and returns it. Accuracies are plotted in
percent; one colour per regime, the same in every figure.

- :func:`learning_curves`: per regime, training/validation loss and top-1 against the epoch
  (the phases of a multi-phase regime shaded), the linear probe's against its L2 strength.
- :func:`regime_view_bars`: test top-1 per regime and test-time view, mean over seeds with
  error bars (std or 95 % CI, from the summary rows; none for a single seed).
- :func:`tta_gain`: what the 10-crop and multi-scale views add to the centre crop, per regime.
- :func:`taxonomy_levels`: top-1 at each level of the taxonomy, coarse to fine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from finegrained.fileio import atomic_output, read_json
from finegrained.report import records

#: Test-time views in reading order, with the names a reader sees.
VIEW_LABELS = {"center": "centre crop", "ten_crop": "10-crop", "multi_scale": "multi-scale"}
#: Views whose gain over the centre crop the TTA figure shows.
TTA_VIEWS = ("ten_crop", "multi_scale")
#: Matplotlib settings of every figure: text kept as text in the SVG (searchable, smaller),
#: and no run-dependent ids or dates, so equal inputs give byte-identical files.
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "finegrained", "font.size": 9,
         "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10,
         "legend.fontsize": 8, "legend.frameon": False}
PALETTE = plt.get_cmap("tab10").colors


# ---------------------------------------------------------------------------- inputs

def read_history(path: str | os.PathLike) -> dict[str, list]:
    """A ``history.parquet`` as columns (one row per epoch, or per L2 strength for L-BFGS)."""
    return pq.read_table(path).to_pydict()


def load_runs(summary: Mapping, root: str | os.PathLike = ".") -> dict[str, list[dict]]:
    """Per regime (summary order), its evaluated runs with their files read: each run of
    ``summary["regimes"][regime]["runs"]`` plus ``metrics_data``, ``history_data`` and
    ``train_summary_data`` (paths in the summary are relative to ``root``, the project
    root), each checked (:mod:`finegrained.report.records`: the metrics' types and ranges,
    the history against the hash its summary records); a file that is missing reads as
    None."""
    root = Path(root)

    def read(path, reader):
        if not path or not (root / path).exists():
            return None
        return reader(root / path)

    out = {}
    for regime, entry in summary["regimes"].items():
        out[regime] = [dict(run, metrics_data=read(run.get("metrics"), records.read_metrics),
                            history_data=read(run.get("history"), lambda p: read_history(
                                records.checked_history(p))),
                            train_summary_data=read(run.get("train_summary"),
                                                    records.read_train_summary))
                       for run in entry["runs"]]
    return out


def regime_colours(regimes: Sequence[str]) -> dict[str, tuple]:
    return {regime: PALETTE[i % len(PALETTE)] for i, regime in enumerate(regimes)}


def swept_values(run: Mapping) -> str:
    """The values of the chosen sweep variant (``lr=0.01``), without the seed; "" if none."""
    return " ".join(part for part in (run.get("train_variant") or "").split("+")
                    if part and not part.startswith("seed="))


def run_label(run: Mapping) -> str:
    """``seed 1`` (+ the swept values of the chosen variant, e.g. ``lr=0.01``)."""
    return " ".join(filter(None, [f"seed {run.get('seed', 0)}", swept_values(run)]))


def save(fig, stem: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` (150 dpi) and ``<stem>.svg``; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    with plt.rc_context(STYLE), atomic_output(paths[0]) as png, atomic_output(paths[1]) as svg:
        fig.savefig(png, format="png", dpi=150, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(svg, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None})
    return paths


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for fewer than two values: no error bar)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def chance_percent(runs: Mapping[str, list[dict]]) -> float | None:
    """100 / number of classes (from a train summary), the top-1 of guessing."""
    for regime_runs in runs.values():
        for run in regime_runs:
            classes = (run.get("train_summary_data") or {}).get("num_classes")
            if classes:
                return 100.0 / classes
    return None


def selection_markdown(summary: Mapping) -> str:
    """What each regime's sweep chose on validation, and from what (every grid point with
    its mean validation top-1 and loss over the seeds), as a Markdown table; "" without
    sweeps."""
    lines = []
    for regime, entry in summary["regimes"].items():
        selection = entry.get("selection")
        if not selection:
            continue
        candidates = ", ".join(
            f"{c['variant']} ({100 * c['val_top1_mean']:.1f} %, loss {c['val_loss_mean']:.3f})"
            if isinstance(c, Mapping) else str(c)
            for c in selection.get("candidates", []))
        lines.append(f"| {regime} | {selection.get('chosen')} | {selection.get('select_by')} "
                     f"| {candidates} |")
    if not lines:
        return ""
    return "\n".join(["| regime | chosen | by (mean over seeds) | candidates (mean) |",
                      "|---|---|---|---|"] + lines) + "\n"


# ---------------------------------------------------------------------------- learning curves

def _phase_spans(history: Mapping[str, list]) -> list[tuple[str, int, int]]:
    """``(phase, first x, last x)`` per phase, on the x axis that numbers epochs across
    phases (1..total)."""
    phases = history.get("phase") or ["main"] * len(history["epoch"])
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((phases[start], start + 1, i))
            start = i
    return spans


def _is_probe(history: Mapping[str, list]) -> bool:
    return "l2" in history and not any(v is not None for v in history.get("images_per_second", []))


def _log_axis(ax) -> None:
    """Log y axis with plain numbers (0.5, 1, 2, not 2 x 10^0); the 2 and 5 between powers of
    ten are labelled too when the data span less than two decades."""
    from matplotlib import ticker

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if high / max(low, 1e-12) < 100:
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    else:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def learning_curves(runs: Mapping[str, list[dict]], stem, *, title: str | None = None):
    """Per regime (columns): the cross-entropy loss (top, log scale) and top-1 (bottom) on the
    validation split (solid) and the training batches (dashed) against the epoch counted
    across phases, one line per seed (the first opaque), the kept epoch circled. Phases after
    the first are shaded and every phase named (two-stage: ``head`` then ``main``). The L-BFGS
    linear probe has no epochs: its panel shows the same quantities against the L2 strength
    it chose from."""
    from matplotlib.lines import Line2D

    regimes = [r for r, rr in runs.items() if any(run.get("history_data") for run in rr)]
    colours = regime_colours(list(runs))
    seeds = max((len(runs[r]) for r in regimes), default=1)
    with plt.rc_context(STYLE):
        ncols = max(len(regimes), 1)
        fig, axes = plt.subplots(2, ncols, figsize=(2.9 * ncols, 5.4), squeeze=False,
                                 sharex="col", constrained_layout=True)
        for col, regime in enumerate(regimes):
            ax_loss, ax_top1 = axes[0, col], axes[1, col]
            probe = False
            for i, run in enumerate(runs[regime]):
                h = run.get("history_data")
                if not h:
                    continue
                style = {"color": colours[regime], "alpha": 1.0 if i == 0 else 0.45}
                probe = _is_probe(h)
                marker = {"marker": "o", "ms": 3} if probe else {}
                x = np.asarray(h["l2"] if probe else np.arange(1, len(h["epoch"]) + 1), float)
                ax_loss.plot(x, h["val_loss"], "-", lw=1.4, **style, **marker)
                ax_loss.plot(x, h["train_loss"], "--", lw=1.1, **style)
                val = 100 * np.asarray(h["val_top1"], float)
                ax_top1.plot(x, val, "-", lw=1.4, **style, **marker)
                ax_top1.plot(x, 100 * np.asarray(h["train_top1"], float), "--", lw=1.1, **style)
                best = int(np.nanargmax(val))
                ax_top1.plot(x[best], val[best], "o", mfc="none", mec="black", ms=7, mew=1.0)
                if not probe and i == 0:
                    spans = _phase_spans(h)
                    for j, (name, first, last) in enumerate(spans if len(spans) > 1 else []):
                        if j > 0:
                            for ax in (ax_loss, ax_top1):
                                ax.axvspan(first - 0.5, last + 0.5, color="0.92", zorder=0)
                        ax_loss.text((first + last) / 2, 1.0, f"{name} phase", ha="center",
                                     va="bottom", transform=ax_loss.get_xaxis_transform(),
                                     fontsize=7.5, color="0.35")
            if probe:
                for ax in (ax_loss, ax_top1):
                    ax.set_xscale("log")
                ax_top1.set_xlabel("L2 strength (one L-BFGS fit each)")
            else:
                ax_top1.set_xlabel("epoch")
                ax_top1.xaxis.get_major_locator().set_params(integer=True)
            _log_axis(ax_loss)
            swept = sorted({swept_values(run) for run in runs[regime]} - {""})
            ax_loss.set_title(regime.replace("_", " ") + (f"\n({', '.join(swept)})" if swept else ""),
                              pad=14)
            ax_top1.set_ylim(0, 102)
            if col == 0:
                ax_loss.set_ylabel("cross-entropy loss (log scale)")
                ax_top1.set_ylabel("top-1 (%)")
        handles = [Line2D([], [], color="0.2", ls="-", lw=1.4, label="validation split"),
                   Line2D([], [], color="0.2", ls="--", lw=1.1, label="training batches"),
                   Line2D([], [], ls="none", marker="o", mfc="none", mec="black", ms=7,
                          label="kept (best validation top-1)")]
        if seeds > 1:
            handles.append(Line2D([], [], color="0.2", alpha=0.45, lw=1.4,
                                  label="further seeds (lighter)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        if title:
            fig.suptitle(title)
        save(fig, stem)
    return fig


# ---------------------------------------------------------------------------- regime x view

def regime_view_bars(rows: Sequence[Mapping], stem, *, metric: str = "top1", error: str = "std",
                     regimes: Sequence[str] | None = None, chance: float | None = None,
                     title: str | None = None):
    """Test accuracy (``metric``) per regime (groups) and view (bars) from the summary rows:
    the mean over seeds, with error bars of ``error`` (``std``: +- one sample std;
    ``ci95``: the rows' 95 % confidence interval); a row of one seed has no error bar.
    ``chance`` (percent) draws a dotted line."""
    if error not in ("std", "ci95"):
        raise ValueError(f"error must be 'std' or 'ci95', not {error!r}")
    rows = [r for r in rows if r["metric"] == metric]
    regimes = list(regimes or dict.fromkeys(r["regime"] for r in rows))
    views = [v for v in VIEW_LABELS if any(r["view"] == v for r in rows)]
    views += [v for v in dict.fromkeys(r["view"] for r in rows) if v not in views]
    by_key = {(r["regime"], r["view"]): r for r in rows}
    width = 0.8 / max(len(views), 1)
    shades = plt.get_cmap("Blues")(np.linspace(0.45, 0.9, max(len(views), 1)))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.5 + 1.45 * len(regimes), 3.8), constrained_layout=True)
        for j, view in enumerate(views):
            xs, means, lows, highs = [], [], [], []
            for i, regime in enumerate(regimes):
                row = by_key.get((regime, view))
                if row is None:
                    continue
                mean = 100 * row["mean"]
                low, high = _error_extent(row, error)
                xs.append(i + (j - (len(views) - 1) / 2) * width)
                means.append(mean)
                lows.append(0.0 if low is None else mean - 100 * low)
                highs.append(0.0 if high is None else 100 * high - mean)
            bars = ax.bar(xs, means, width * 0.95, color=shades[j],
                          label=VIEW_LABELS.get(view, view))
            has_error = [lo > 0 or hi > 0 for lo, hi in zip(lows, highs)]
            if any(has_error):
                ax.errorbar([x for x, e in zip(xs, has_error) if e],
                            [m for m, e in zip(means, has_error) if e],
                            yerr=[[lo for lo, e in zip(lows, has_error) if e],
                                  [hi for hi, e in zip(highs, has_error) if e]],
                            fmt="none", ecolor="black", elinewidth=1, capsize=2.5)
            for bar, mean, high in zip(bars, means, highs):
                ax.text(bar.get_x() + bar.get_width() / 2, mean + high + 0.8, f"{mean:.1f}",
                        ha="center", va="bottom", fontsize=6.5)
        if chance is not None:
            ax.axhline(chance, color="0.4", ls=":", lw=1, label=f"chance ({chance:.0f} %)")
        ax.set_xticks(range(len(regimes)), [r.replace("_", " ") for r in regimes])
        ax.set_ylim(0, 112)
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel(f"test {_metric_name(metric)} (%)")
        seeds = _seeds_phrase([int(r["n"]) for r in rows],
                              "+- 1 std" if error == "std" else "95 % CI")
        ax.set_title(title or f"Test {_metric_name(metric)} by regime and test-time view ({seeds})")
        ax.legend(loc="upper left", ncols=len(views) + (chance is not None))
        save(fig, stem)
    return fig


def _seeds_phrase(counts: Sequence[int], spread: str = "+- 1 std") -> str:
    """``mean of 3 seeds, +- 1 std`` / ``mean of 1-3 seeds, ...`` / ``one seed``."""
    counts = sorted(set(counts))
    if not counts or counts[-1] < 2:
        return "one seed, no error bars"
    n = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else f"{counts[0]}"
    return f"mean of {n} seeds, {spread}"


def _metric_name(metric: str) -> str:
    return {"top1": "top-1", "top5": "top-5"}.get(metric, metric)


def _error_extent(row: Mapping, error: str) -> tuple[float | None, float | None]:
    """(low, high) of the error bar as fractions, or (None, None) when there is none."""
    if int(row.get("n", 1)) < 2:
        return None, None
    if error == "std":
        std = row.get("std")
        if std is None or math.isnan(std):
            return None, None
        return row["mean"] - std, row["mean"] + std
    low, high = row.get("ci95_low"), row.get("ci95_high")
    if low is None or high is None:
        return None, None
    return low, high


# ---------------------------------------------------------------------------- TTA gain

def tta_gains(runs: Mapping[str, list[dict]], metric: str = "top1") -> dict[str, dict[str, list[float]]]:
    """Per regime and view of :data:`TTA_VIEWS`: ``view - center`` of every run, in points."""
    out = {}
    for regime, regime_runs in runs.items():
        gains = {view: [] for view in TTA_VIEWS}
        for run in regime_runs:
            views = (run.get("metrics_data") or {}).get("views", {})
            if "center" not in views:
                continue
            for view in TTA_VIEWS:
                if view in views:
                    gains[view].append(100 * (views[view][metric] - views["center"][metric]))
        if any(gains.values()):
            out[regime] = gains
    return out


def tta_gain(runs: Mapping[str, list[dict]], stem, *, metric: str = "top1",
             title: str | None = None):
    """Per regime, test ``metric`` of the 10-crop and the multi-scale view minus that of the
    centre crop, in percentage points (mean over seeds, +- 1 std with two or more)."""
    gains = tta_gains(runs, metric)
    regimes = list(gains)
    width = 0.38
    shades = {"ten_crop": "#4c72b0", "multi_scale": "#dd8452"}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(regimes), 3.4), constrained_layout=True)
        low, top = 0.0, 0.0
        for j, view in enumerate(TTA_VIEWS):
            for i, regime in enumerate(regimes):
                mean, std = _mean_std(gains[regime][view])
                if math.isnan(mean):
                    continue
                x = i + (j - 0.5) * width
                ax.bar(x, mean, width * 0.95, color=shades[view],
                       label=f"{VIEW_LABELS[view]} - centre crop" if i == 0 else None)
                if std is not None:
                    ax.errorbar(x, mean, yerr=std, fmt="none", ecolor="black", elinewidth=1,
                                capsize=2.5)
                reach = (std or 0.0) + 0.3
                ax.text(x, mean + reach if mean >= 0 else mean - reach, f"{mean:+.1f}",
                        ha="center", va="bottom" if mean >= 0 else "top", fontsize=7)
                top = max(top, mean + (std or 0.0))
                low = min(low, mean - (std or 0.0))
        ax.axhline(0, color="black", lw=0.8)
        pad = max(1.0, 0.25 * (top - low))
        ax.set_ylim(low - (pad if low < 0 else 0.5), top + pad)
        ax.set_xticks(range(len(regimes)), [r.replace("_", " ") for r in regimes])
        ax.set_ylabel(f"gain in test {_metric_name(metric)} (points)")
        seeds = _seeds_phrase([len(v) for g in gains.values() for v in g.values() if v])
        ax.set_title(title or f"Test-time augmentation gain over the centre crop ({seeds})")
        ax.legend(loc="upper left", ncols=2)
        save(fig, stem)
    return fig


# ---------------------------------------------------------------------------- taxonomy levels

def _level_order(levels) -> list[str]:
    """``level1``, ``level2``, ... (coarse to fine) then ``leaf``."""
    def key(name):
        if name == "leaf":
            return (1, 0)
        digits = "".join(c for c in name if c.isdigit())
        return (0, int(digits) if digits else 0)
    return sorted(levels, key=key)


def level_label(level: str, last: bool = False) -> str:
    if level == "leaf":
        return "leaf\n(species)"
    digits = "".join(c for c in level if c.isdigit())
    text = f"level {digits}" if digits else level
    return text + ("\n(coarsest)" if digits == "1" else "")


def taxonomy_levels(runs: Mapping[str, list[dict]], stem, *, title: str | None = None):
    """Test top-1 (10-crop view) at each taxonomy level, one line per regime: a prediction is
    right at a level when it shares the true class's ancestor there (mean over seeds, +- 1
    std with two or more)."""
    colours = regime_colours(list(runs))
    levels: list[str] = []
    per_regime = {}
    for regime, regime_runs in runs.items():
        values: dict[str, list[float]] = {}
        for run in regime_runs:
            for level, top1 in ((run.get("metrics_data") or {}).get("per_level") or {}).items():
                if top1 is not None:
                    values.setdefault(level, []).append(100 * top1)
        if values:
            per_regime[regime] = values
            levels += [lv for lv in values if lv not in levels]
    levels = _level_order(levels)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(2.0 + 1.1 * max(len(levels), 2), 3.6), constrained_layout=True)
        offsets = np.linspace(-0.12, 0.12, max(len(per_regime), 1))
        for k, (regime, values) in enumerate(per_regime.items()):
            xs, means, stds = [], [], []
            for i, level in enumerate(levels):
                if level in values:
                    mean, std = _mean_std(values[level])
                    xs.append(i + offsets[k])
                    means.append(mean)
                    stds.append(std or 0.0)
            ax.errorbar(xs, means, yerr=stds if any(stds) else None, color=colours[regime],
                        marker="o", ms=4, lw=1.4, capsize=2.5, label=regime.replace("_", " "))
        ax.set_xticks(range(len(levels)), [level_label(lv) for lv in levels])
        ax.set_xlim(-0.4, len(levels) - 0.6)
        ax.set_ylim(0, 102)
        ax.set_ylabel("test top-1 at the level (%)")
        ax.set_xlabel("taxonomy level, coarse to fine")
        ax.set_title(title or "Accuracy per taxonomy level (10-crop view)")
        ax.legend(loc="lower left", ncols=2)
        save(fig, stem)
    return fig


__all__ = ["VIEW_LABELS", "load_runs", "read_history", "read_json", "save", "learning_curves",
           "regime_view_bars", "selection_markdown", "chance_percent", "tta_gains", "tta_gain", "taxonomy_levels"]
