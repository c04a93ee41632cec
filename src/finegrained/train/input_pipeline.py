"""Data in, batches out: sources, the data order, and the background input thread.

A *source* is anything with ``len()``, ``labels`` (int [N]) and ``gather(indices) ->
array``: ``ShardReader`` (uint8 pixels), ``FeatureReader`` (cached float features) or
:class:`ArraySource`. The training loop owns the data order, a permutation per (seed,
epoch) (:func:`epoch_batches`), so a run resumed at step ``s`` reads exactly the batches an
uninterrupted run reads from ``s`` on. :class:`Prefetcher` assembles batches and puts them
on the device on a background thread, ahead of the steps that use them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np


class ArraySource:
    """In-memory ``(images, labels)`` with the source interface of the loop."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = np.asarray(images), np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices)]


class ConcatSource:
    """Several sources read as one (a refit's train + validation splits): rows of the first,
    then of the second, ...; ``gather`` returns rows in the order asked."""

    def __init__(self, *sources: Any):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = [as_source(s) for s in sources]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.labels = np.concatenate([np.asarray(s.labels, np.int32) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        parts, out = [], None
        for i, source in enumerate(self.sources):
            rows = np.nonzero(which == i)[0]
            if len(rows):
                parts.append((rows, source.gather(indices[rows] - self.offsets[i])))
        for rows, values in parts:
            if out is None:
                out = np.empty((len(indices),) + values.shape[1:], values.dtype)
            out[rows] = values
        return out

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        loaded = [s.load_all() for s in self.sources]
        return np.concatenate([x for x, _ in loaded]), np.concatenate([y for _, y in loaded])


def as_source(source: Any):
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return ArraySource(*source)
    if hasattr(source, "gather") and hasattr(source, "labels"):
        return source
    raise TypeError(f"expected a source (len, labels, gather) or (images, labels), "
                    f"got {type(source)}")


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent shuffling seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index arrays of one training epoch: a seeded permutation cut into full batches
    (the last partial batch is dropped)."""
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
    steps = n // batch_size
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


class Prefetcher:
    """Runs ``load(item)`` for each item of ``items`` on a background thread, at most
    ``depth`` results ahead of the consumer (a bounded queue). ``load`` assembles a batch
    and puts it on the device, so the training thread only dispatches steps.
    ``wait_seconds`` is the time the consumer spent blocked waiting for input."""

    _END = object()

    def __init__(self, items: Iterable, load: Callable[[Any], Any], depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._work, args=(iter(items), load),
                                        daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterator, load: Callable) -> None:
        try:
            for item in items:
                if self._stop.is_set() or not self._put(("ok", load(item))):
                    return
            self._put(("end", None))
        except BaseException as exc:   # handed to the consumer, raised there
            self._put(("error", exc))

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            kind, value = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)
