"""Test metrics from predicted scores (numpy): top-k, taxonomy levels, calibration (ECE),
per-class accuracy and the most confused pairs."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

ECE_BINS = 15


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best labels ``int32 [N, k]`` and their scores ``[N, k]``, best first (ties:
    the lower label first)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(probs, order, axis=-1)


def top_k_accuracy(top_labels: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is among the first ``k`` of ``top_labels``."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    hits = np.any(np.asarray(top_labels)[:, :k] == labels[:, None], axis=1)
    return float(np.mean(hits))


def level_chains(ancestor_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Root-first ancestor chains from ``classes.parquet``'s ``ancestor_ids`` (parent first,
    root last)."""
    return [list(reversed(list(chain))) for chain in ancestor_ids]


def level_names(chains: Sequence[Sequence[int]]) -> list[str]:
    """``level1`` (the root side) ... ``levelD`` for the deepest chain, then ``leaf``."""
    depth = max((len(c) for c in chains), default=0)
    return [f"level{d + 1}" for d in range(depth)] + ["leaf"]


def taxonomy_accuracy(predicted: np.ndarray, labels: np.ndarray,
                      ancestor_ids: Sequence[Sequence[int]]) -> dict[str, float]:
    """Top-1 accuracy at every level of the class hierarchy.

    A prediction is right at level ``d`` (``level1`` = the ancestors nearest the root) when
    the predicted class has the true class's ancestor at that depth: chains are compared
    root first, index ``d - 1`` of each. Chains may differ in length (NABirds leaves sit at
    depth 3 or 4): a level counts only the images whose true class has an ancestor at that
    depth, and a predicted class whose chain is too short to have one is wrong there.
    ``leaf`` is plain top-1. Without a hierarchy (CUB: empty chains) only ``leaf`` is given.
    Levels no test image reaches are left out.
    """
    chains = level_chains(ancestor_ids)
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    result = {}
    for d, name in enumerate(level_names(chains)[:-1]):
        # The ancestor at depth d of each class, -1 where the chain is too short (ids >= 0).
        at_depth = np.array([c[d] if len(c) > d else -1 for c in chains], np.int64)
        true, pred = at_depth[labels], at_depth[predicted]
        counted = true >= 0
        if counted.any():
            result[name] = float(np.mean(true[counted] == pred[counted]))
    result["leaf"] = top_k_accuracy(predicted[:, None], labels, 1)
    return result


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): confidences in ``bins`` equal-width bins ``((m-1)/M, m/M]``
    (0 joins the first), the mean over bins, weighted by their share of samples, of
    ``|accuracy - mean confidence|``."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    n = len(confidence)
    if n == 0:
        return float("nan")
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.sum() / n * gap
    return float(ece)


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, float | None]:
    """Top-1 per true class, by name (None for a class without test images)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    result = {}
    for label, name in enumerate(class_names):
        members = labels == label
        result[name] = float(np.mean(predicted[members] == label)) if members.any() else None
    return result


def confused_pairs(predicted: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   top: int = 20) -> list[list]:
    """The ``top`` most frequent mistakes ``[true_name, predicted_name, count]``, most
    frequent first (ties by true, then predicted label)."""
    counts = Counter((int(t), int(p)) for t, p in zip(labels, predicted) if t != p)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [[class_names[t], class_names[p], count] for (t, p), count in ranked]
