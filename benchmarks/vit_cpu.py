"""ViT-S/16 and ViT-B/16 beside ResNet-50 on this machine's default backend (a CPU here): the
training step and feature extraction, images/s at 224 pixels, float32.

The training step is the pipeline's own (``train_step.py``'s ``prepare_step``: the jitted
step of ``loop.prepare``, centre view, forward, loss, backward, update), each model with its
own full fine-tuning recipe: ResNet-50 with momentum SGD, the ViTs with AdamW and layer-wise
decay (the schema's ViT preset). Feature extraction is the features rule's own jitted pass
(``train.features``: centre crop, the frozen backbone to its pooled output, a ViT's class
token) over uint8 batches of stored 256-pixel crops. After one compiling call, ``--repeats``
timed calls each: images/s as median, min, max; FLOPs per image from XLA's cost analysis.
The GPU rows (ViT-B/16 train step >= 3,000 images/s, DINOv2 ViT-S/14 features >= 10,000) are
the device check's (``device_check.py``).

    python benchmarks/vit_cpu.py [--batch 8] [--repeats 3]

Writes ``benchmarks/results/vit_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from _common import RESULTS, rates, summary, write_result
from train_step import NUM_CLASSES, STORED, compile_step, prepare_step, step_seconds

TITLE = "ViT-S/16 and ViT-B/16 beside ResNet-50 on the CPU: training step and features"
ARCHS = ("vit_small_patch16", "vit_base_patch16", "resnet50")


def recipe(arch: str) -> dict:
    """The full fine-tuning recipe of ``arch`` as the schema resolves it (ViT presets)."""
    from finegrained.plan.regimes import job_settings
    from finegrained.plan.schema import load_config

    config = load_config(overrides={"backbone": {"arch": arch}})
    settings = job_settings(config, "full_finetune")["phases"][-1]["train_settings"]
    return {k: settings[k] for k in ("optimizer", "lr", "weight_decay", "param_groups")}


def feature_pass(arch: str, batch: int, seed: int = 0):
    """``(extract, args)``: the features rule's jitted pass for ``arch`` and one batch."""
    from flax import nnx

    from finegrained.models import assign_state, build_model
    from finegrained.train.features import _extract_fn

    model = nnx.eval_shape(lambda: build_model(arch, NUM_CLASSES, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    assign_state(model, {"/".join(map(str, p)): rng.normal(0, 0.02, v.get_value().shape)
                         for p, v in nnx.to_flat_state(nnx.state(model))})
    model.eval()
    layer = model.stage_names[-2]
    extract = _extract_fn(model, [layer], 224, 0.875, None, None)
    images = rng.integers(0, 256, (batch, STORED, STORED, 3), np.uint8)
    return extract, (images, jax.random.key(seed))


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "vit_cpu.json")
    args = parser.parse_args(argv)

    results = {}
    for arch in args.archs:
        step, step_args = prepare_step(arch, args.batch, "float32", recipe=recipe(arch))
        step, flops = compile_step(step, step_args)
        train = step_seconds(step, step_args, args.repeats)
        del step, step_args
        extract, extract_args = feature_pass(arch, args.batch)
        features = step_seconds(extract, extract_args, args.repeats)
        results[arch] = {
            "train_step_images_per_s": rates(train, args.batch),
            "train_step_seconds": summary(train),
            "train_gflops_per_image": round(flops / 1e9 / args.batch, 2) if flops else None,
            "features_images_per_s": rates(features, args.batch),
            "recipe": {k: v for k, v in recipe(arch).items() if k != "param_groups"}}
        print(f"{arch}: train {results[arch]['train_step_images_per_s']['median']} images/s, "
              f"features {results[arch]['features_images_per_s']['median']} images/s",
              file=sys.stderr)
    payload = {"backend": jax.default_backend(), "batch": args.batch, "repeats": args.repeats,
               "stored_size": STORED, "image_size": 224, "num_classes": NUM_CLASSES,
               "dtype": "float32", "results": results}
    out = write_result("vit_cpu", TITLE, payload, argv=argv, started=started, out=args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
