"""Training step throughput: MobileNetV2 and ResNet-50 at 224 pixels, float32 and bfloat16,
on this machine's default JAX backend, with the model FLOPs of each step.

The step is the pipeline's own (``finegrained.train.loop.prepare``: the jitted
``train_step`` of ``steps.py`` with the momentum optimizer, weight decay and the cosine
schedule), fed uint8 batches of stored 256-pixel crops as the loader delivers them; the
view is the un-augmented one (the 224-pixel centre window, resampled on the device), so
the figure is the model's step (``augment_cpu.py`` adds the augmentation). After one
compiling call, ``--repeats`` timed steps: images/s as median, min, max.

FLOPs per step come from XLA's cost analysis of the compiled step
(``jit(...).lower(...).compile().cost_analysis()["flops"]``, a multiply-add counted as 2);
achieved FLOP/s = FLOPs / median step time. MFU needs the device's peak: for this CPU it is
an estimate (cores x clock x 32 float32 FLOPs/cycle for two 256-bit FMA pipes, AVX2 Zen 3;
no native bfloat16, so the same peak), printed with the assumption. The GPU figures
(ResNet-50 bf16 on one H100, target >= 5,000 images/s) are not measured here: no GPU was
available; the FLOPs count gives what that target would demand.

    python benchmarks/train_step.py [--batch 8] [--repeats 3] [--archs mobilenet_v2 resnet50]

Writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from _common import RESULTS, rates, summary, time_calls, write_result

TITLE = "Training step: MobileNetV2 and ResNet-50 at 224"
STORED = 256
NUM_CLASSES = 555
#: H100 SXM dense bfloat16 tensor-core peak (NVIDIA datasheet), for the target's arithmetic.
H100_BF16_PEAK = 989e12
GPU_TARGET_RESNET50_BF16 = 5000.0


def cpu_peak_flops() -> dict | None:
    """Estimated float32 peak of this CPU: cores x nominal MHz x 32 FLOPs/cycle (AVX2 with
    FMA: two 256-bit FMA pipes). None if the clock or the AVX2/FMA flags are unknown."""
    import os
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    if not mhz or " avx2" not in flags or " fma" not in flags:
        return None
    cores = len(os.sched_getaffinity(0))
    per_cycle = 64 if " avx512f" in flags else 32
    return {"flops": cores * max(mhz) * 1e6 * per_cycle, "cores": cores, "mhz": max(mhz),
            "flops_per_cycle_per_core": per_cycle,
            "assumption": f"{per_cycle} float32 FLOPs/cycle/core (2 FMA pipes x "
                          f"{per_cycle // 4} lanes x 2), nominal clock, no turbo"}


def prepare_step(arch: str, batch: int, compute_dtype: str, augment=None, lighting=None,
                 seed: int = 0, recipe: dict | None = None):
    """``(step, args)``: the pipeline's jitted train step for ``arch`` and one batch
    (``recipe``: settings other than the schema's defaults, e.g. a ViT's optimizer)."""
    from flax import nnx
    from finegrained.models import build_model
    from finegrained.train.augment import Augmentation
    from finegrained.train.loop import prepare
    from finegrained.train.settings import default_settings
    from finegrained.train.sharding import shard_batch

    model = build_model(arch, NUM_CLASSES, rngs=nnx.Rngs(seed))
    settings = default_settings(epochs=1, batch_size=batch, compute_dtype=compute_dtype,
                                image_size=224, augment=augment or Augmentation.none(),
                                num_devices=1, **(recipe or {}))
    run = prepare(model, batch * 10, settings, lighting=lighting)
    rng = np.random.default_rng(seed)
    data = shard_batch({"image": rng.integers(0, 256, (batch, STORED, STORED, 3), np.uint8),
                        "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)},
                       run.mesh)
    return run.train_step, (run.state, data, jax.random.key(seed))


def step_seconds(step, args, repeats: int) -> list[float]:
    """Seconds of each timed step (the state is not advanced: every call is the same step)."""
    return time_calls(lambda: jax.block_until_ready(step(*args)), repeats, warmup=1)


def compile_step(step, args):
    """``(compiled step, FLOPs per call or None)``: compiled once, ahead of time; the
    timings call the same executable."""
    compiled = step.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):          # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return compiled, (float(flops) if flops else None)


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    peak = cpu_peak_flops() if backend == "cpu" else None

    results = {}
    for arch in args.archs:
        for dtype in args.dtypes:
            step, step_args = prepare_step(arch, args.batch, dtype)
            step, flops = compile_step(step, step_args)
            seconds = step_seconds(step, step_args, args.repeats)
            row = {"arch": arch, "compute_dtype": dtype, "batch": args.batch,
                   "images_per_s": rates(seconds, args.batch), "step_seconds": summary(seconds),
                   "gflops_per_step": round(flops / 1e9, 2) if flops else None,
                   "gflops_per_image": round(flops / 1e9 / args.batch, 3) if flops else None}
            if flops:
                achieved = flops / summary(seconds)["median"]
                row["achieved_gflops_per_s"] = round(achieved / 1e9, 2)
                if peak:
                    row["mfu_estimated"] = round(achieved / peak["flops"], 4)
            results[f"{arch} {dtype}"] = row
            print(f"{arch} {dtype}: {row['images_per_s']['median']} images/s, "
                  f"{row['gflops_per_image']} GFLOPs/image", file=sys.stderr)
            del step, step_args

    rn50 = next((r for r in results.values()
                 if r["arch"] == "resnet50" and r["compute_dtype"] == "bfloat16"), None)
    gpu = {"measured": False,
           "why": "no GPU in this session; the GPU rows of issue #10 are not measured",
           "target_images_per_s": GPU_TARGET_RESNET50_BF16, "h100_bf16_peak_flops": H100_BF16_PEAK}
    if rn50 and rn50["gflops_per_image"]:
        need = GPU_TARGET_RESNET50_BF16 * rn50["gflops_per_image"] * 1e9
        gpu.update(target_needs_tflops_per_s=round(need / 1e12, 1),
                   target_needs_h100_mfu=round(need / H100_BF16_PEAK, 3))
    payload = {"backend": backend, "batch": args.batch, "repeats": args.repeats,
               "stored_size": STORED, "image_size": 224, "num_classes": NUM_CLASSES,
               "step": "loop.prepare's jitted train_step: centre view, forward, cross-entropy, "
                       "backward, momentum + weight decay, cosine schedule",
               "flops_source": "XLA cost_analysis of the compiled step (multiply-add = 2)",
               "cpu_peak_estimate": peak, "results": results, "gpu": gpu}
    out = write_result("train_step", TITLE, payload, argv=argv, started=started, out=args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
