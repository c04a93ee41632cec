"""The ``systems`` section of a run's report: training systems compared on the same recipe
(config ``systems:``; jobs ``train/<regime>+system=<name>[+seed=N]/``).

- :func:`collect`: per regime and system, the histories of its replicates;
- :func:`summary_rows`: final validation top-1 and training loss per system over the seeds
  (mean, std, 95 % interval), parameter and optimizer-state bytes, communication rounds,
  median step time;
- :func:`curves`: validation top-1 and training loss against steps and against
  communication rounds, one line per system (mean over seeds);
- :func:`markdown`: the table.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from finegrained.report.figures import PALETTE, STYLE, read_history, save
from finegrained.report.records import checked_history
from finegrained.report.tables import FRACTION, mean_ci


def collect(train_root: str | os.PathLike, regimes: Sequence[str], systems: Sequence[str],
            variants: Sequence[str]) -> dict[str, dict[str, list[dict]]]:
    """``{regime: {system: [history columns of each replicate]}}`` from
    ``<train_root>/<regime>+system=<name><replicate>/history.parquet`` (``variants``: the
    replicate suffixes, '' and '+seed=N'; the seed comes first in a variant), each checked
    against the hash its summary records."""
    out: dict[str, dict[str, list[dict]]] = {}
    for regime in regimes:
        for system in systems:
            runs = []
            for variant in variants:
                path = Path(train_root) / f"{regime}{variant}+system={system}" / "history.parquet"
                runs.append(read_history(checked_history(path)))
            out.setdefault(regime, {})[system] = runs
    return out


def _main(history: Mapping[str, list]) -> dict[str, list]:
    """The rows of the last phase (two-stage's second; single-phase runs whole)."""
    phases = history.get("phase")
    if not phases:
        return dict(history)
    keep = [i for i, p in enumerate(phases) if p == phases[-1]]
    return {k: [v[i] for i in keep] for k, v in history.items()}


def summary_rows(histories: Mapping[str, Mapping[str, list[dict]]]) -> list[dict]:
    """One row per regime and system: final val top-1 / train loss over the replicates
    (``mean_ci``: n, mean, std, ci95), bytes, communication rounds and steps of the run,
    median seconds per step."""
    rows = []
    for regime, systems in histories.items():
        for system, runs in systems.items():
            mains = [_main(h) for h in runs]
            last = [{k: v[-1] for k, v in h.items()} for h in mains]
            step_seconds = [s / max(b, 1) for h in mains
                            for s, b in zip(h["seconds"], np.diff([0] + list(h["step"])))]
            rows.append({
                "regime": regime, "system": system,
                "val_top1": mean_ci([r["val_top1"] for r in last], bounds=FRACTION),
                "train_loss": mean_ci([r["train_loss"] for r in last], bounds=(0.0, math.inf)),
                "param_bytes": last[0]["param_bytes"],
                "opt_state_bytes": last[0]["opt_state_bytes"],
                "steps": last[0]["step"],
                "communication_rounds": last[0]["communication_rounds"],
                "seconds_per_step": float(np.median(step_seconds)) if step_seconds else None,
            })
    return rows


def _cell(stats: Mapping) -> str:
    text = f"{100 * stats['mean']:.1f}"
    if stats["std"] is not None:
        text += (f" ± {100 * stats['std']:.1f} "
                 f"[{100 * stats['ci95_low']:.1f}, {100 * stats['ci95_high']:.1f}]")
    return text


def markdown(rows: Sequence[Mapping]) -> str:
    lines = ["| regime | system | seeds | final val top-1 (%) | final train loss | param bytes "
             "| opt-state bytes | steps | communication rounds | s / step (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        loss = r["train_loss"]
        loss_text = f"{loss['mean']:.4f}" + (f" ± {loss['std']:.4f}" if loss["std"] is not None
                                              else "")
        step = "–" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"
        lines.append(f"| {r['regime']} | {r['system']} | {r['val_top1']['n']} | "
                     f"{_cell(r['val_top1'])} | {loss_text} | {r['param_bytes']:,} | "
                     f"{r['opt_state_bytes']:,} | {r['steps']} | {r['communication_rounds']} "
                     f"| {step} |")
    return "\n".join(lines) + "\n"


def curves(histories: Mapping[str, Mapping[str, list[dict]]], stem: str | os.PathLike):
    """Per regime (a row of panels): validation top-1 and training loss against the step
    and against communication rounds, one line per system (the mean over its replicates,
    the band their min..max)."""
    regimes = list(histories)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(regimes), 4, figsize=(13, 2.8 * len(regimes)),
                                 squeeze=False)
        for row, regime in enumerate(regimes):
            for k, (system, runs) in enumerate(histories[regime].items()):
                mains = [_main(h) for h in runs]
                n = min(len(h["step"]) for h in mains)
                colour = PALETTE[k % len(PALETTE)]
                for col, (xkey, ykey, scale) in enumerate((
                        ("step", "val_top1", 100), ("step", "train_loss", 1),
                        ("communication_rounds", "val_top1", 100),
                        ("communication_rounds", "train_loss", 1))):
                    x = np.asarray(mains[0][xkey][:n], float)
                    y = np.asarray([h[ykey][:n] for h in mains], float) * scale
                    ax = axes[row, col]
                    ax.plot(x, y.mean(0), marker="o", ms=3, color=colour, label=system)
                    if len(mains) > 1:
                        ax.fill_between(x, y.min(0), y.max(0), color=colour, alpha=0.15)
                    ax.set_xlabel("steps" if xkey == "step" else "communication rounds")
                    ax.set_ylabel("val top-1 (%)" if ykey == "val_top1" else "train loss")
                    if xkey == "communication_rounds":
                        ax.set_xscale("symlog", linthresh=1)
            axes[row, 0].set_title(regime, loc="left")
        axes[0, -1].legend(loc="upper right")
        fig.tight_layout()
    save(fig, stem)
    return fig
