"""Source pretraining: train a backbone from scratch on the source dataset's shards and
write its weights (safetensors, with class names and recipe in the metadata) and metrics.

The first user of the training foundation: ``TrainConfig`` with no ``param_groups`` (every
parameter trains at the base learning rate) is "from scratch"; the transfer regimes later
reuse ``fit`` with other groups.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from finegrained.data.shards import ShardReader
from finegrained.errors import DataError
from finegrained.fileio import write_json
from finegrained.models import build_model, flatten_state
from finegrained.models.transfer import model_options
from finegrained.models.weights import save_weights, weights_metadata
from finegrained.train.augment import lighting_from_stats
from finegrained.train.loop import TrainConfig, fit


def class_names_by_label(*readers: ShardReader) -> list[str]:
    """``names[label]`` from the readers' ``class_name`` metadata column; labels must be
    0..K-1 and every label must carry one name."""
    names: dict[int, str] = {}
    for reader in readers:
        meta = reader.meta
        if "class_name" not in meta.column_names:
            raise DataError(reader.index_path, "shard metadata has no class_name column")
        for label, name in zip(meta.column("label").to_pylist(),
                               meta.column("class_name").to_pylist()):
            if names.setdefault(int(label), name) != name:
                raise DataError(reader.index_path, f"label {label} has two class names",
                                value=(names[int(label)], name))
    if not names:
        raise DataError(readers[0].index_path, "no images")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise DataError(readers[0].index_path,
                        f"labels are not 0..{max(names)}: missing {missing[:10]}")
    return [names[i] for i in range(len(names))]


def pretrain(train_index: str | os.PathLike, val_index: str | os.PathLike,
             stats_json: str | os.PathLike, *, arch: str, width: int, cfg: TrainConfig,
             out_weights: str | os.PathLike, out_metrics: str | os.PathLike,
             stage_depths: Sequence[int] | None = None,
             log_fn: Callable[[str], None] | None = print) -> dict:
    """Train ``arch`` from scratch on ``train_index``, validate on ``val_index``; write the
    weights and a metrics JSON; return the metrics."""
    t0 = time.perf_counter()
    log = log_fn or (lambda _: None)
    train, val = ShardReader(train_index), ShardReader(val_index)
    class_names = class_names_by_label(train, val)
    num_classes = len(class_names)
    with open(stats_json) as f:
        stats = json.load(f)
    lighting = lighting_from_stats(stats) if cfg.augment.pca_lighting > 0 else None

    options = model_options(arch, None)  # from scratch: MobileNetV2 trains with batch norm
    model = build_model(arch, num_classes, width=width, stage_depths=stage_depths,
                        rngs=nnx.Rngs(cfg.seed), **options)
    log(f"pretrain {arch} width {width}: {len(train)} train / {len(val)} val images, "
        f"{num_classes} classes, stored {train.image_size}px -> crops {cfg.image_size}px, "
        f"{jax.device_count()} x {jax.devices()[0].platform}")
    history = fit(model, train, val, cfg, log_fn=log, lighting=lighting)

    recipe = {"pixels": "RGB uint8 or float 0..255, NHWC",
              "normalisation": getattr(model.input_recipe, "name", str(model.input_recipe)),
              "train_image_size": cfg.image_size, "stored_image_size": train.image_size,
              "eval_crop_fraction": cfg.eval_crop_fraction}
    metadata = weights_metadata(
        arch=arch, num_classes=num_classes, class_names=class_names,
        input_recipe=getattr(model.input_recipe, "name", str(model.input_recipe)),
        source="pretrain", width=str(width),
        stage_depths=json.dumps(list(stage_depths) if stage_depths else None),
        image_size=str(cfg.image_size), input=json.dumps(recipe),
        train_config=json.dumps(cfg.to_dict()), **options)
    save_weights(out_weights, flatten_state(model), metadata=metadata)

    wall = time.perf_counter() - t0
    later = [h["train_images_per_second"] for h in history[1:]] or \
            [h["train_images_per_second"] for h in history]
    metrics = {
        "arch": arch, "width": width, "num_classes": num_classes,
        "num_train": len(train), "num_val": len(val),
        "final_val_top1": history[-1].get("val_top1") if history else None,
        "best_val_top1": max((h.get("val_top1", 0.0) for h in history), default=None),
        "wall_seconds": wall,
        # after the first epoch, which includes compilation
        "train_images_per_second": float(np.median(later)),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "config": cfg.to_dict(),
        "history": history,
    }
    write_json(out_metrics, metrics)
    log(f"wrote {out_weights} and {out_metrics}: val top-1 {metrics['final_val_top1']:.4f}, "
        f"{wall:.1f}s")
    return metrics
