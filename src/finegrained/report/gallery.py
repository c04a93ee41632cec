"""Figures made of crops: the most-confused species pairs with test examples, and a grid of
training views drawn by the real augmentation code (:mod:`finegrained.train.augment`, so
JAX is imported there, on first use).
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from finegrained.data.manifest import read_classes
from finegrained.data.shards import ShardReader
from finegrained.report import records
from finegrained.report.figures import STYLE, save
from finegrained.plan.augment import is_augmented

#: The view whose predictions the confusion figure shows (that of metrics.json's pairs).
CONFUSION_VIEW = "ten_crop"


def _wrap(name: str, width: int = 32) -> str:
    return "\n".join(textwrap.wrap(name, width)) or name


def _show(ax, image: np.ndarray, title: str | None = None, colour: str | None = None) -> None:
    ax.imshow(np.clip(image, 0, 255).astype(np.uint8), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_color(colour)
            spine.set_linewidth(2)
    if title:
        ax.set_title(title, fontsize=7, pad=2)


# ---------------------------------------------------------------------------- confusions

def confusion_examples(predictions: Mapping[str, list], pairs: Sequence, class_names: Sequence[str],
                       *, view: str = CONFUSION_VIEW, n_pairs: int = 5, n_wrong: int = 3,
                       n_right: int = 2) -> list[dict]:
    """For the ``n_pairs`` most frequent ``[true name, predicted name, count]`` pairs: the
    image ids of up to ``n_wrong`` test images of the true class predicted as the other
    (most confident first) and of ``n_right`` correctly predicted images of the other
    class (what it looks like)."""
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray(predictions["label"])
    top = predictions[f"{view}_top5_labels"]
    probs = predictions[f"{view}_top5_probs"]
    predicted = np.asarray([row[0] for row in top])
    confidence = np.asarray([row[0] for row in probs])
    ids = list(predictions["image_id"])
    out = []
    for true_name, predicted_name, count in list(pairs)[:n_pairs]:
        a, b = index[true_name], index[predicted_name]
        wrong = np.flatnonzero((labels == a) & (predicted == b))
        right = np.flatnonzero((labels == b) & (predicted == b))
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:n_wrong]
        right = right[np.argsort(-confidence[right], kind="stable")][:n_right]
        out.append({"true": true_name, "predicted": predicted_name, "count": int(count),
                    "wrong": [ids[i] for i in wrong], "right": [ids[i] for i in right],
                    "wrong_confidence": [float(confidence[i]) for i in wrong]})
    return out


def confused_pairs(metrics: Mapping, predictions_path, test_index, classes_path, stem, *,
                   regime_label: str | None = None, n_pairs: int = 5, n_wrong: int = 3,
                   n_right: int = 2):
    """The most-confused species pairs of one evaluated run (``metrics.json``'s
    ``confused_pairs``, 10-crop view): per row, test crops of the true species that the model
    called the other one (red frame, with its confidence), then correctly recognised crops
    of that other species (green frame). Crops come from the test shards."""
    names = read_classes(classes_path).column("common_name").to_pylist()
    predictions = pq.read_table(records.checked_predictions(predictions_path, metrics)).to_pydict()
    examples = confusion_examples(predictions, metrics.get("confused_pairs") or [], names,
                                  view=metrics.get("summary_view", CONFUSION_VIEW),
                                  n_pairs=n_pairs, n_wrong=n_wrong, n_right=n_right)
    reader = ShardReader(test_index)
    position = {image_id: i for i, image_id in enumerate(reader.meta.column("image_id").to_pylist())}
    cols = n_wrong + n_right
    with plt.rc_context(STYLE):
        rows = max(len(examples), 1)
        fig, axes = plt.subplots(rows, cols + 1, figsize=(1.25 * cols + 2.4, 1.45 * rows + 0.5),
                                 squeeze=False, gridspec_kw={"width_ratios": [1.7] + [1] * cols})
        for r in range(rows):
            for ax in axes[r]:
                ax.axis("off")
        for r, ex in enumerate(examples):
            images_word = "image" if ex["count"] == 1 else "images"
            axes[r, 0].text(0.0, 0.5, f"{_wrap(ex['true'])}\n-> {_wrap(ex['predicted'])}\n"
                            f"({ex['count']} test {images_word})", va="center", ha="left",
                            fontsize=7.5, transform=axes[r, 0].transAxes)
            chosen = [(i, "wrong") for i in ex["wrong"]] + [(i, "right") for i in ex["right"]]
            images = reader.gather(np.asarray([position[i] for i, _ in chosen], np.int64)) if chosen else []
            for c, ((image_id, kind), image) in enumerate(zip(chosen, images)):
                ax = axes[r, 1 + (c if kind == "wrong" else n_wrong + c - len(ex["wrong"]))]
                ax.axis("on")
                if kind == "wrong":
                    p = ex["wrong_confidence"][c]
                    _show(ax, image, f"{100 * p:.0f} % sure", "#c44e52")
                else:
                    _show(ax, image, None, "#55a868")
        if not examples:
            axes[0, 0].text(0.5, 0.5, "no confusions on the test split", ha="center",
                            va="center", transform=axes[0, 0].transAxes)
        height = fig.get_figheight()
        top = 1 - 0.8 / height
        fig.tight_layout(rect=(0, 0, 1, top))
        header_y = axes[0, 1].get_position().y1 + 0.2 / height
        for first, last, text in ((1, n_wrong, "true species, taken for the other\n"
                                                "(red; the model's confidence)"),
                                  (n_wrong + 1, cols, "the species it was taken for\n"
                                                      "(green: recognised correctly)")):
            if first > last:
                continue
            left = axes[0, first].get_position().x0
            right = axes[0, last].get_position().x1
            fig.text((left + right) / 2, header_y, text, ha="center", va="bottom", fontsize=7.5)
        suffix = f" ({regime_label})" if regime_label else ""
        fig.suptitle(f"Most-confused species pairs{suffix}", fontsize=9,
                     y=header_y + 0.4 / height, va="bottom")
        save(fig, stem)
    return fig


# ---------------------------------------------------------------------------- augmentation

def augmentation_recipe(train_summary: Mapping) -> tuple[dict, int, str] | None:
    """``(augment dict, image_size, phase name)`` of the last augmented phase of a train job
    (its ``summary.json``), or None when no phase augments."""
    for phase in reversed(train_summary["settings"]["phases"]):
        train_settings = phase.get("train_settings")
        if train_settings and is_augmented(train_settings.get("augment", {})):
            return dict(train_settings["augment"]), int(train_settings["image_size"]), phase["name"]
    return None


def describe_recipe(augment: Mapping) -> str:
    """The recipe in one line: only what is switched on."""
    parts = []
    area, aspect = augment.get("crop_area"), augment.get("aspect_ratio")
    if area and tuple(area) != (1.0, 1.0):
        parts.append(f"crop area {area[0]:g}-{area[1]:g}")
    if aspect and tuple(aspect) != (1.0, 1.0):
        parts.append(f"aspect {aspect[0]:.2g}-{aspect[1]:.2g}")
    for key in ("scale_jitter", "rotation", "flip", "brightness", "contrast", "saturation", "hue",
                "pca_lighting"):
        value = augment.get(key, 0) or 0
        if value:
            unit = " deg" if key == "rotation" else ""
            parts.append(f"{key.replace('_', ' ')} {value:g}{unit}")
    return ", ".join(parts) or "none"


def augmentation_grid(train_index, stats_path, augment: Mapping, image_size: int, stem, *,
                      n_images: int = 4, n_draws: int = 6, seed: int = 0,
                      regime_label: str | None = None):
    """Rows: ``n_images`` training crops of different species; first column the stored crop,
    then ``n_draws`` random training views of it made by
    :func:`finegrained.train.augment.augment_batch` with ``augment`` (the run's resolved
    recipe) and the split's PCA lighting, at the network's input size."""
    import jax

    from finegrained.train.augment import Augmentation, augment_batch, lighting_from_stats
    from finegrained.fileio import read_json

    reader = ShardReader(train_index)
    labels = reader.labels
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:n_images]
    images = reader.gather(np.asarray(first, np.int64))
    augmentation = Augmentation.from_dict(augment)
    lighting = (lighting_from_stats(read_json(stats_path)) if augmentation.pca_lighting > 0
                else None)
    draw = jax.jit(lambda x, key: augment_batch(x, key, augmentation, image_size, lighting))
    views = [np.asarray(draw(images, jax.random.fold_in(jax.random.key(seed), d)))
             for d in range(n_draws)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(first), n_draws + 1,
                                 figsize=(1.15 * (n_draws + 1), 1.2 * len(first) + 0.7),
                                 squeeze=False)
        for r in range(len(first)):
            _show(axes[r, 0], images[r], f"stored crop ({images.shape[1]} px)" if r == 0 else None)
            for d in range(n_draws):
                _show(axes[r, d + 1], views[d][r],
                      f"view {d + 1} ({image_size} px)" if r == 0 else None)
        suffix = f" of {regime_label}" if regime_label else ""
        fig.suptitle(f"Training augmentation{suffix}: "
                     + "\n".join(textwrap.wrap(describe_recipe(augment), 90)), fontsize=8)
        fig.tight_layout()
        save(fig, stem)
    return fig


def showcase_run(runs: Mapping[str, list[dict]], regime: str | None = None) -> tuple[str, dict] | None:
    """``(regime, run)`` whose crops a figure shows: the first run of ``regime``, or of the
    regime best on validation (mean ``best_val_top1`` of its runs; the test split chooses
    nothing)."""
    def val(regime_runs):
        scores = [(r.get("train_summary_data") or {}).get("best_val_top1") for r in regime_runs]
        scores = [s for s in scores if s is not None]
        return float(np.mean(scores)) if scores else -1.0

    candidates = {r: rr for r, rr in runs.items() if rr and (regime is None or r == regime)}
    if not candidates:
        return None
    best = max(candidates, key=lambda r: val(candidates[r]))
    return best, candidates[best][0]


def augmented_run(runs: Mapping[str, list[dict]], regime: str | None = None):
    """``(regime, run, (augment, image_size, phase))`` of the first run (of ``regime``, or of
    the first regime in order) whose training augments, or None."""
    for name, regime_runs in runs.items():
        if regime is not None and name != regime:
            continue
        for run in regime_runs:
            summary = run.get("train_summary_data")
            recipe = augmentation_recipe(summary) if summary else None
            if recipe is not None:
                return name, run, recipe
    return None


def augmentation_of_runs(runs: Mapping[str, list[dict]], train_index, stats_path, stem, *,
                         regime: str | None = None, **kw):
    """:func:`augmentation_grid` with the recipe of :func:`augmented_run`; when no run
    augments, a figure that says so (the output exists either way)."""
    found = augmented_run(runs, regime)
    if found is None:
        with plt.rc_context(STYLE):
            fig, ax = plt.subplots(figsize=(4, 1))
            ax.axis("off")
            ax.text(0.5, 0.5, "no regime of this run augments its training inputs",
                    ha="center", va="center")
            save(fig, stem)
        return fig
    name, _, (augment, image_size, phase) = found
    return augmentation_grid(train_index, stats_path, augment, image_size, stem,
                             regime_label=f"{name} (phase {phase})", **kw)


__all__ = ["augmentation_grid", "augmentation_of_runs", "augmentation_recipe", "augmented_run",
           "confused_pairs", "confusion_examples", "describe_recipe", "showcase_run"]
