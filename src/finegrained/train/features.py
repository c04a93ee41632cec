"""The feature cache: the frozen backbone run once over a split, its outputs kept on disk.

For each layer a job extracts, the cache holds one float16 (or float32) NPY in the job's
folder plus an ``index.json`` (shape, dtype and sha256 of each array file it wrote, the
sha256 of the weights and of the shard index it read, the view and the labels' file). The
workflow runs one job for the pooled layers of a split and one per boundary map
(``plan.paths.cache_index``)::

    features/train/stage4.npy                  [V*N, C]      pooled output of stage4
    features/train/labels.npy                  [V*N] int32
    features/train/index.json
    features/train/stage3.map/stage3.map.npy   [V*N, h, w, C] full activation after stage3
    features/train/stage3.map/labels.npy, index.json

A layer named ``<stage>`` is the globally average-pooled output of that stage (what a
linear probe reads); ``<stage>:map`` is the activation itself (the boundary of a frozen
lower part, read by a partially fine-tuned model). Rows are the split's images in shard
order; with ``V`` views per image (training only) view ``v`` of image ``i`` is row
``v * N + i``. View 0..V-1 are random training views drawn with the ``augment`` config
from ``fold_in(key(seed), v)``; a single un-augmented view is the evaluation view
(centre crop at ``eval_crop_fraction``), which is also what an un-augmented training step
sees, so a cached run and an online run read the same inputs.

:class:`FeatureReader` serves one layer with the ShardReader interface (``len``,
``labels``, ``gather``), memory-mapped; with ``verify`` (``shards.verify``, as for the
shards) it first checks the array and labels files against the sha256 the index records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from finegrained.data.manifest import class_names
from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import (HashingWriter, atomic_output, check_sha256, read_json,
                                sha256_file, write_json)
from finegrained.locks import exclusive
from finegrained.models import loading
from finegrained.plan.paths import MAP_SUFFIX, layer_stem
from finegrained.train.augment import (Augmentation, Lighting, augment_batch, center_crop,
                                       lighting_from_stats)
from finegrained.train.validation import require_examples


def layer_file(layer: str) -> str:
    """File name of a layer's array (``stage3:map`` -> ``stage3.map.npy``)."""
    return layer_stem(layer) + ".npy"


def parse_layer(layer: str) -> tuple[str, bool]:
    """``(stage, is_map)`` of a layer name."""
    if layer.endswith(MAP_SUFFIX):
        return layer[:-len(MAP_SUFFIX)], True
    return layer, False


def _extract_fn(model, layers: Sequence[str], image_size: int, crop_fraction: float,
                augment: Augmentation | None, lighting: Lighting | None):
    """A jitted ``(images uint8, key) -> {layer: array}`` running the backbone once."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    parsed = [parse_layer(layer) for layer in layers]
    order = list(model.stage_names)
    last = max(order.index(stage) for stage, _ in parsed)

    @jax.jit
    def extract(state, images, key):
        net = nnx.merge(graphdef, state)
        if augment is None:
            x = center_crop(images, image_size, crop_fraction)
        else:
            x = augment_batch(images, key, augment, image_size, lighting)
        outputs = {}
        x = net.input_recipe.apply(x, net.dtype)
        for stage in order[:last + 1]:
            x = net.run_stage(stage, x)
            for layer, (name, is_map) in zip(layers, parsed):
                if name == stage:
                    outputs[layer] = x if is_map else net.pool(x)
        return outputs

    return lambda images, key: extract(state, images, key)


@exclusive("out_dir")
def run_features_job(settings: Mapping, *, shard_index, init_weights, stats, classes, out_dir,
                     log_fn: Callable[[str], None] | None = print) -> dict:
    """The features rule: the frozen pretrained backbone over one split (settings:
    :func:`finegrained.plan.jobs.features`); writes the cache, returns its index."""
    model = loading.load(init_weights, settings["model"], len(class_names(classes)))
    augment = Augmentation.from_dict(settings["augment"])
    lighting = (lighting_from_stats(read_json(stats, "colour statistics"))
                if augment.pca_lighting > 0 else None)
    return extract_features(
        model, shard_index, out_dir, layers=settings["layers"],
        image_size=settings["image_size"], eval_crop_fraction=settings["eval_crop_fraction"],
        views=settings["views"], augment=augment, lighting=lighting, seed=settings["seed"],
        batch_size=settings["batch_size"], dtype=settings["dtype"],
        weights_sha256=sha256_file(init_weights), verify=settings["verify_shards"],
        log_fn=log_fn)


def extract_features(model, shard_index: str | os.PathLike, out_dir: str | os.PathLike, *,
                     layers: Sequence[str], image_size: int, eval_crop_fraction: float,
                     views: int = 0, augment: Augmentation | None = None,
                     lighting: Lighting | None = None, seed: int = 0, batch_size: int = 128,
                     dtype: str = "float16", weights_sha256: str | None = None,
                     verify: bool = False,
                     log_fn: Callable[[str], None] | None = None) -> dict:
    """Run ``model`` (eval mode) over a split once and write the cache; return the index.

    ``views`` > 0: that many random training views per image (``augment``); 0: the one
    evaluation view. Files are written atomically, the index last.
    """
    log = log_fn or (lambda _: None)
    reader = ShardReader(shard_index, verify=verify)
    require_examples(len(reader), shard_index, reader.index.get("split"))
    model.eval()
    n = len(reader)
    num_views = max(views, 1)
    aug = augment if views > 0 else None
    fn = _extract_fn(model, layers, image_size, eval_crop_fraction, aug, lighting)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype)
    arrays: dict[str, np.ndarray] = {}
    base_key = jax.random.key(seed)
    for v in range(num_views):
        key_v = jax.random.fold_in(base_key, v)
        for b, start in enumerate(range(0, n, batch_size)):
            idx = np.arange(start, min(start + batch_size, n))
            images = reader.gather(idx)
            pad = batch_size - len(idx)
            if pad:   # one compiled shape for every batch
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
            outputs = jax.device_get(fn(images, jax.random.fold_in(key_v, b)))
            for layer, value in outputs.items():
                if layer not in arrays:
                    arrays[layer] = np.empty((num_views * n,) + value.shape[1:], np_dtype)
                arrays[layer][v * n + start:v * n + start + len(idx)] = value[:len(idx)]
        log(f"features: view {v + 1}/{num_views} of {n} images done")
    labels = np.tile(reader.labels, num_views).astype(np.int32)

    files = {layer: {"file": layer_file(layer), "shape": list(arrays[layer].shape),
                     "dtype": np_dtype.name,
                     "sha256": _save_array(out_dir / layer_file(layer), arrays[layer])}
             for layer in layers}
    index = {
        "layers": files, "labels": "labels.npy",
        "labels_sha256": _save_array(out_dir / "labels.npy", labels),
        "count": int(n), "views": num_views,
        "augmented": aug is not None, "image_size": image_size,
        "eval_crop_fraction": eval_crop_fraction, "seed": seed, "arch": model.arch,
        "weights_sha256": weights_sha256,
        "shard_index": os.fspath(shard_index), "shard_index_sha256": sha256_file(shard_index),
    }
    write_json(out_dir / "index.json", index)
    return index


def _save_array(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as an NPY atomically; the sha256 of the bytes written."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            writer = HashingWriter(f)
            np.save(writer, array)
    return writer.hexdigest()


class FeatureReader:
    """One cached layer of a split, with the source interface of the training loop.

    ``weights`` and ``shard_index``, when given, are the files the reading job was given:
    a cache made from other weights or another version of the split is refused (as a shard
    whose bytes changed is), so a cache left over from before a change is never trained on.
    With ``verify`` the layer's array and the labels must have the sha256 the index records
    (the features job hashed them as it wrote them).
    """

    def __init__(self, index_path: str | os.PathLike, layer: str, *,
                 weights: str | os.PathLike | None = None,
                 shard_index: str | os.PathLike | None = None, verify: bool = False):
        self.index_path = Path(index_path)
        self.index = read_json(self.index_path, "feature index")
        for what, path, key in (("weights", weights, "weights_sha256"),
                                ("shard index", shard_index, "shard_index_sha256")):
            if path is not None and self.index.get(key) != (got := sha256_file(path)):
                raise DataError(self.index_path, f"this feature cache was made from {what} with "
                                f"sha256 {self.index.get(key)}, but the job reads {path} "
                                f"(sha256 {got}): the cache is stale; rebuild it (snakemake "
                                f"--forcerun features feature_map)")
        if layer not in self.index["layers"]:
            raise DataError(self.index_path, f"layer {layer!r} is not cached here; cached: "
                            f"{sorted(self.index['layers'])}")
        self.layer = layer
        entry = self.index["layers"][layer]
        if verify:
            remedy = "rebuild the cache (snakemake --forcerun features feature_map)"
            check_sha256(self.index_path.parent / entry["file"], entry.get("sha256"),
                         self.index_path, remedy)
            check_sha256(self.index_path.parent / self.index["labels"],
                         self.index.get("labels_sha256"), self.index_path, remedy)
        self.features = np.load(self.index_path.parent / entry["file"], mmap_mode="r")
        self.labels = np.load(self.index_path.parent / self.index["labels"])
        if len(self.features) != len(self.labels) or list(self.features.shape) != entry["shape"]:
            raise DataError(self.index_path.parent / entry["file"],
                            f"shape {self.features.shape} differs from the index {entry['shape']}")

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices),) + self.features.shape[1:], self.features.dtype)
        out[order] = self.features[indices[order]]
        return out

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.features), self.labels
