"""Tiny training problems: a small CNN, coloured squares, one-shard splits and class tables."""

from __future__ import annotations

import json

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from finegrained.train.augment import Augmentation
from finegrained.train.settings import default_settings
from finegrained.train.steps import StepOptions


def crop_and_flip(**more) -> Augmentation:
    """A random-resized crop (area 0.25-1, aspect 3/4-4/3) and a flip, nothing else unless
    ``more`` names it: the augmentation most tests of the machinery use."""
    return Augmentation.none().replace(**{"crop_area": (0.25, 1.0),
                                          "aspect_ratio": (3 / 4, 4 / 3), "flip": 0.5, **more})


def step_options(**changes) -> StepOptions:
    """The step options of the schema's default settings in float32 with
    :func:`crop_and_flip`, with ``changes``."""
    options = default_settings(compute_dtype="float32", augment=crop_and_flip()).step_options()
    return dataclasses.replace(options, **changes)


def optimizer(**changes):
    """Momentum SGD without weight decay or L2-SP (the plain optimizer the step tests assert
    against), with ``changes``."""
    from finegrained.train.optim import OptimizerSettings
    return dataclasses.replace(OptimizerSettings(
        optimizer="momentum", momentum=0.9, nesterov=False, weight_decay=0.0,
        regularizer="weight_decay", l2_sp_alpha=0.0, l2_sp_beta=0.0), **changes)


def train_state(model, *, lr: float, schedule: str = "cosine", total_steps: int = 1,
                param_groups=None, precision=None, **changes):
    """``create_train_state`` with :func:`optimizer` (``changes``) and a ``schedule`` of
    ``total_steps`` from ``lr`` (cosine over one step: ``lr`` at step 0)."""
    from finegrained.train.optim import make_schedule
    from finegrained.train.precision import FLOAT32
    from finegrained.train.steps import create_train_state
    return create_train_state(model, param_groups=param_groups,
                              schedule=make_schedule(lr, schedule, total_steps),
                              optimizer=optimizer(**changes), precision=precision or FLOAT32)


class TinyNet(nnx.Module):
    """stem -> stage1 -> head, with BatchNorm (or without: ``batch_norm=False``); takes
    uint8/float 0..255 NHWC pixels."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, batch_norm: bool = True):
        self.dtype = jnp.float32
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs) if batch_norm else (lambda x: x)
        self.stage1 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.stage1_bn = nnx.BatchNorm(16, rngs=rngs) if batch_norm else (lambda x: x)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = (x.astype(jnp.float32) / 255.0 - 0.5) * 4.0
        x = x.astype(self.dtype)
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.relu(self.stage1_bn(self.stage1(x)))
        return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def coloured_squares(n: int, size: int = 24, classes: int = 4, seed: int = 0):
    """Class k: a bright square of colour k at a random place on a noisy grey background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 230], [230, 220, 40]])
    images = rng.integers(90, 150, (n, size, size, 3)).astype(np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int32)
    side = size // 2
    for i, k in enumerate(labels):
        y, x = rng.integers(0, size - side, 2)
        images[i, y:y + side, x:x + side] = colours[k]
    return images, labels


def write_split(root, name, images, labels, class_names):
    """A one-shard split in the ShardReader index format (npy images + Parquet metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from finegrained.fileio import sha256_file
    root.mkdir(parents=True, exist_ok=True)
    meta, npy = root / f"{name}-00000.parquet", root / f"{name}-00000.npy"
    pq.write_table(pa.table({"label": labels, "class_name": [class_names[k] for k in labels]}),
                   meta)
    np.save(npy, images)
    index = {"split": name, "image_size": images.shape[1], "format": "npy",
             "count": len(labels), "shards": [
                 {"meta": meta.name, "meta_sha256": sha256_file(meta), "images": npy.name,
                  "images_sha256": sha256_file(npy), "count": len(labels)}]}
    path = root / f"{name}.json"
    path.write_text(json.dumps(index))
    return path


def write_classes(path, names):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from finegrained.data.readers import CLASSES_SCHEMA
    n = len(names)
    pq.write_table(pa.table({
        "label": list(range(n)), "class_id": list(range(1, n + 1)), "name": names,
        "common_name": names, "ancestor_ids": [[]] * n, "ancestor_names": [[]] * n,
        "depth": [0] * n}, schema=CLASSES_SCHEMA), path)


# --- one train job's inputs ---------------------------------------------------------------

JOB_CLASSES = ["Red Bird", "Green Bird", "Blue Bird", "Yellow Bird"]
NO_AUGMENT = {"crop_area": [1.0, 1.0], "aspect_ratio": [1.0, 1.0], "flip": 0.0,
              "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "pca_lighting": 0.0}


def tiny_job_config(protocol=None, **regime_settings) -> dict:
    """A validated config for jobs on :func:`job_inputs`: a tiny ResNet at 32 px, one
    device, float32, two epochs of batches of 16 without augmentation unless overridden."""
    from finegrained.plan.schema import validate_config
    return validate_config({
        "backbone": {"arch": "resnet18", "width": 8, "stage_depths": [1, 1, 1, 1]},
        "train": {"image_size": 32, "compute_dtype": "float32", "log_every_steps": 0,
                  "num_devices": 1},
        "protocol": protocol or {},
        "regime_settings": {name: {"batch_size": 16, "epochs": 2, "warmup_epochs": 0,
                                   "augment": NO_AUGMENT, **values}
                            for name, values in regime_settings.items()},
    })


def job_inputs(root) -> dict:
    """run_job's inputs under ``root``: 48 train / 16 val coloured squares of 4 classes,
    their class table, colour statistics and a target init (seed 0)."""
    from finegrained.models.transfer import write_target_init
    classes = root / "classes.parquet"
    write_classes(classes, JOB_CLASSES)
    init = root / "init.safetensors"
    write_target_init(classes, init, root / "init.json", arch="resnet18", width=8,
                      stage_depths=[1, 1, 1, 1], seed=0)
    stats = root / "stats.json"
    stats.write_text(json.dumps({"eigval": [1.0, 0.5, 0.1], "eigvec": np.eye(3).tolist()}))
    return {"train_index": write_split(root, "train", *coloured_squares(48, size=36, seed=0),
                                       JOB_CLASSES),
            "val_index": write_split(root, "val", *coloured_squares(16, size=36, seed=1),
                                     JOB_CLASSES),
            "stats": stats, "classes": classes, "init_weights": init}


# --- one pretrain job's inputs ------------------------------------------------------------

def pretrain_inputs(root, names) -> list[str]:
    """The pretrain script's input arguments: 48 train / 10 val coloured squares of the
    classes ``names`` under ``root``, their class table and colour statistics."""
    train = write_split(root / "shards", "train", *coloured_squares(48, seed=7), names)
    val = write_split(root / "shards", "val", *coloured_squares(10, seed=8), names)
    classes = root / "classes.parquet"
    write_classes(classes, names)
    stats = root / "stats.json"
    stats.write_text(json.dumps({"mean": [120.0] * 3, "std": [40.0] * 3,
                                 "eigenvalues": [900.0, 50.0, 10.0],
                                 "eigenvectors": np.eye(3).tolist(), "num_images": 48}))
    return ["--train-index", str(train), "--val-index", str(val), "--stats", str(stats),
            "--classes", str(classes)]


def pretrain_settings_json(**pretrain) -> str:
    """The pretrain job's ``--settings`` as the workflow makes them from the config: a
    ResNet-18 of width 4 and one block per stage, one epoch of batches of 16 at 16 px on one
    device, float32; ``pretrain`` overrides keys of the config's ``pretrain:`` section."""
    from finegrained.plan.schema import load_config
    from finegrained.plan.regimes import pretrain_settings
    config = load_config(overrides={"backbone": {"arch": "resnet18", "width": 4,
                                                 "stage_depths": [1, 1, 1, 1]},
                                    "pretrain": {"epochs": 1, "batch_size": 16, "lr": 0.05,
                                                 "image_size": 16, "warmup_epochs": 0,
                                                 "num_devices": 1, "compute_dtype": "float32",
                                                 **pretrain}})
    return json.dumps(pretrain_settings(config))


def feature_indexes(features_dir, config, regime, variant=""):
    """``{layer: {split: index.json}}`` of the caches a job of ``regime`` reads under
    ``features_dir``, as its rule passes them (``plan.targets.feature_indexes``)."""
    from pathlib import Path

    from finegrained.plan.paths import cache_index
    from finegrained.plan.regimes import cached_layers
    return {layer: {split: Path(features_dir) / cache_index(split, layer)
                    for split in ("train", "val")}
            for layer in cached_layers(config, regime, variant)}


# --- damage, as a disk, a copy or a hand can do it -----------------------------------------

def overwrite_tensor(path, name: str, fill: int = 0x7F) -> None:
    """Overwrite the bytes of tensor ``name`` in a safetensors file in place (the header,
    and so the file's size and layout, unchanged)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        start, stop = json.loads(f.read(size))[name]["data_offsets"]
        f.seek(8 + size + start)
        f.write(bytes([fill]) * (stop - start))


def flip_bytes(path, offset: int = -64, count: int = 16) -> None:
    """Invert ``count`` bytes of a file from ``offset`` (negative: from its end)."""
    with open(path, "r+b") as f:
        f.seek(offset, 2 if offset < 0 else 0)
        where = f.tell()
        data = bytes(b ^ 0xFF for b in f.read(count))
        f.seek(where)
        f.write(data)
