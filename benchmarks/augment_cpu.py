"""Augmentation on the device (the CPU here): images/s of the default recipe and its share
of a training step.

The recipe is the schema's default ``augment`` block of the training regimes (random-resized
crop of 25-100 % of the area at aspect 3/4-4/3, flip 0.5, brightness/contrast/saturation
0.2, PCA lighting 0.1; read from ``config/config.yaml`` through the schema, so it follows
the defaults), applied by ``augment_batch`` to uint8 batches of stored 256-pixel crops,
224 pixels out, jitted alone; beside it the un-augmented view (``center_crop``). Then the
share of a training step: the pipeline's train step (``train_step.prepare_step``) with the
recipe and without it (the centre view), same model, same batch, timed side by side:
``share = 1 - step_without / step_with``.

    python benchmarks/augment_cpu.py [--batch 16] [--step-batch 8] [--arch resnet50]

Writes ``benchmarks/results/augment_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from _common import REPO, RESULTS, rates, ratios, summary, time_calls, write_result
from train_step import compile_step, prepare_step

TITLE = "Augmentation on the device"
STORED, OUT = 256, 224
#: AlexNet's ImageNet RGB PCA (Krizhevsky et al. 2012), eigenvalues on the 0..255 scale:
#: a stand-in for a split's stats.json (the lighting cost does not depend on the values).
EIGVAL = np.array([0.2175, 0.0188, 0.0045]) * 255 ** 2
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])


def default_recipe() -> dict:
    """The schema's default augmentation of a training regime (``full_finetune``)."""
    from finegrained.plan.schema import load_config
    config = load_config(REPO / "config" / "config.yaml")
    return dict(config["regime_settings"]["full_finetune"]["augment"])


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="batch of the augmentation alone")
    parser.add_argument("--step-batch", type=int, default=8, help="batch of the train steps")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "augment_cpu.json")
    args = parser.parse_args(argv)
    from finegrained.train.augment import Augmentation, Lighting, augment_batch, center_crop

    recipe = default_recipe()
    augmentation = Augmentation.from_dict(recipe)
    lighting = Lighting(EIGVAL.astype(np.float32), EIGVEC.astype(np.float32))
    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (args.batch, STORED, STORED, 3), np.uint8))
    augment = jax.jit(lambda x, key: augment_batch(x, key, augmentation, OUT, lighting))
    centre = jax.jit(lambda x: center_crop(x, OUT, 0.875))

    def run(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))

    key = jax.random.key(0)
    alone = {"augment_default": time_calls(run(augment, images, key), args.repeats),
             "center_crop": time_calls(run(centre, images), args.repeats)}
    print({k: args.batch / summary(v)["median"] for k, v in alone.items()}, file=sys.stderr)

    # The step with and without the recipe, alternated so load noise hits both alike.
    steps = {}
    for name, step_augment in (("with_augment", augmentation), ("without_augment", None)):
        step, step_args = prepare_step(args.arch, args.step_batch, args.dtype,
                                       augment=step_augment, lighting=lighting)
        compiled, _ = compile_step(step, step_args)
        jax.block_until_ready(compiled(*step_args))
        steps[name] = (compiled, step_args)
    seconds = {name: [] for name in steps}
    for _ in range(args.step_repeats):
        for name, (compiled, step_args) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*step_args))
            seconds[name].append(time.perf_counter() - start)
    share = [1 - b / a for a, b in zip(seconds["with_augment"], seconds["without_augment"])]
    augment_per_image = summary(alone["augment_default"])["median"] / args.batch
    step_per_image = summary(seconds["with_augment"])["median"] / args.step_batch
    payload = {
        "recipe": recipe, "stored_size": STORED, "output_size": OUT, "batch": args.batch,
        "repeats": args.repeats, "backend": jax.default_backend(),
        "alone_images_per_s": {k: rates(v, args.batch) for k, v in alone.items()},
        "step": {"arch": args.arch, "compute_dtype": args.dtype, "batch": args.step_batch,
                 "repeats": args.step_repeats,
                 "images_per_s": {k: rates(v, args.step_batch) for k, v in seconds.items()},
                 "slowdown_with_augment": ratios(seconds["with_augment"],
                                                 seconds["without_augment"])},
        "augment_share_of_step": summary(share, digits=3),
        "augment_alone_over_step_time": round(augment_per_image / step_per_image, 4),
        "notes": ["share = 1 - step_without / step_with per repetition (the un-augmented "
                  "step still resamples the centre window); a share near 0 is within the "
                  "noise of a shared machine and can come out negative",
                  "augment_alone_over_step_time: the recipe jitted alone (per image) over "
                  "the augmented step (per image), batch sizes as given"],
    }
    out = write_result("augment_cpu", TITLE, payload, argv=argv, started=started, out=args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
