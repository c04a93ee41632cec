#!/usr/bin/env python
"""Train a backbone from scratch on the source dataset's shards; write weights + metrics."""

from __future__ import annotations

import argparse
import sys

from finegrained.errors import ConfigError, DataError, WeightsError
from finegrained.train.augment import AugmentConfig
from finegrained.train.loop import TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    io = p.add_argument_group("files")
    io.add_argument("--train-index", required=True, help="shard index of the training split")
    io.add_argument("--val-index", required=True, help="shard index of the validation split")
    io.add_argument("--stats", required=True, help="colour statistics JSON of the training crops")
    io.add_argument("--classes", required=True, help="classes.parquet of the source manifests")
    io.add_argument("--out-weights", required=True, help=".safetensors to write")
    io.add_argument("--out-metrics", required=True, help="metrics JSON to write")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="resnet18")
    m.add_argument("--width", type=int, default=64)
    m.add_argument("--stage-depths", type=int, nargs="+", default=None)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--eval-batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--warmup-epochs", type=float, default=1.0)
    t.add_argument("--optimizer", choices=["momentum", "sgd", "adamw"], default="momentum")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--image-size", type=int, default=224, help="side of the training crops")
    t.add_argument("--eval-crop-fraction", type=float, default=0.875)
    t.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-devices", type=int, default=None)
    t.add_argument("--log-every-steps", type=int, default=0)
    a = p.add_argument_group("augmentation (0 disables each)")
    a.add_argument("--crop-area", type=float, nargs=2, default=(0.25, 1.0), metavar=("MIN", "MAX"))
    a.add_argument("--aspect-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3),
                   metavar=("MIN", "MAX"))
    a.add_argument("--scale-jitter", type=float, default=0.0)
    a.add_argument("--flip", type=float, default=0.5)
    a.add_argument("--brightness", type=float, default=0.2)
    a.add_argument("--contrast", type=float, default=0.2)
    a.add_argument("--saturation", type=float, default=0.2)
    a.add_argument("--pca-lighting", type=float, default=0.1)
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    augment = AugmentConfig(
        crop_area=tuple(args.crop_area), aspect_ratio=tuple(args.aspect_ratio),
        scale_jitter=args.scale_jitter, flip=args.flip, brightness=args.brightness,
        contrast=args.contrast, saturation=args.saturation, pca_lighting=args.pca_lighting)
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        base_lr=args.lr, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, augment=augment,
        compute_dtype=args.compute_dtype, image_size=args.image_size,
        eval_crop_fraction=args.eval_crop_fraction, seed=args.seed,
        num_devices=args.num_devices, log_every_steps=args.log_every_steps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from finegrained.train.pretrain import pretrain   # after argparse: --help stays fast
    try:
        pretrain(args.train_index, args.val_index, args.stats, args.classes, arch=args.arch,
                 width=args.width, stage_depths=args.stage_depths, cfg=train_config(args),
                 out_weights=args.out_weights, out_metrics=args.out_metrics,
                 log_fn=lambda s: print(s, flush=True))
    except (ConfigError, DataError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
