"""One pass over a validation split during training: top-1 and mean loss, every example
counted once (the test split's views and metrics are :mod:`finegrained.evaluate`'s)."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from finegrained.errors import DataError
from finegrained.train.input_pipeline import Prefetcher, as_source
from finegrained.train.sharding import local_rows, shard_batch
from finegrained.train.steps import TrainState


def round_up(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k`` (a batch every device gets rows of)."""
    return int(math.ceil(n / k) * k)


def require_examples(count: int, index_path, split: str | None) -> None:
    """Refuse a split with no images, naming its index: a validation split is empty when no
    class has the two training images it takes to give one to validation, and an empty split
    would score every epoch 0 (or fail deep in the features job)."""
    if count == 0:
        why = (" (no class has 2 or more training images, so dataset.val_fraction put none "
               "in validation: use classes with more images)" if split == "val" else "")
        raise DataError(index_path, f"the {split} split has no images{why}")


def validate(state: TrainState, source: Any, eval_metrics: Callable, batch_size: int,
             mesh=None, depth: int = 3) -> dict:
    """Top-1 and mean cross-entropy over every example of ``source`` exactly once.

    The last batch is padded to ``batch_size`` (static shapes, divisible by the devices)
    and masked out of every count. Batches are prepared ahead on the input thread; the
    per-batch sums stay on the device and are fetched once at the end. With several
    processes each one reads only its rows of every batch.
    """
    source = as_source(source)
    n, labels = len(source), np.asarray(source.labels, np.int32)
    rows = local_rows(batch_size, mesh) if mesh is not None else slice(None)

    def load(start):
        positions = np.arange(start, start + batch_size)[rows]
        idx = positions[positions < n]
        # A process whose rows are all padding still needs the image shape: one row, cut.
        images = source.gather(idx) if len(idx) else source.gather(np.zeros(1, np.int64))[:0]
        y = labels[idx]
        pad = len(positions) - len(idx)
        mask = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            y = np.concatenate([y, np.zeros(pad, np.int32)])
        batch = {"image": images, "label": y, "mask": mask}
        return (shard_batch(batch, mesh, batch_size) if mesh is not None
                else jax.device_put(batch))

    sums = []
    prefetch = Prefetcher(range(0, n, batch_size), load, depth)
    try:
        for batch in prefetch:
            sums.append(eval_metrics(state, batch))
    finally:
        prefetch.close()
    sums = jax.device_get(sums)
    correct = float(sum(float(s["correct"]) for s in sums))
    loss = float(sum(float(s["loss"]) for s in sums))
    count = int(round(sum(float(s["count"]) for s in sums)))
    return {"top1": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}
