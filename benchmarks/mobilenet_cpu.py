"""MobileNetV2 on the CPU: grouped vs shifted-sum depthwise convolutions (issue #11).

``shifted`` is the CPU form of ``backbone.depthwise_impl``: depthwise convs as shifted sums
and 1x1 convs as matmuls; ``grouped`` keeps every convolution as ``nnx.Conv`` runs it.

Times MobileNetV2 1.0 (width 64) in float32 on the CPU backend, with each depthwise
implementation (``finegrained.models.depthwise``): the eval forward pass and a train step
(forward + backward + SGD update, one ``jax.jit``), at each image size; the median of
``--repeats`` timed calls after a warm-up call that compiles, with min and max. Then the
share of each step spent in depthwise convolutions, by ablation (see ``METHOD``). Writes
``benchmarks/results/mobilenet_cpu.json`` and prints a table.

    python benchmarks/mobilenet_cpu.py [--batch 16] [--sizes 160 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from _common import RESULTS, cpu_name, summary, time_calls, write_result
from finegrained.models import build_model
from finegrained.models import depthwise
from finegrained.train.steps import cross_entropy

IMPLS = ("grouped", "shifted")
METHOD = (
    "Ablation: the same step timed once more with every depthwise conv replaced by the "
    "cheapest op of the same output shape (the strided identity x[:, ::s, ::s] plus the "
    "bias), so everything else (stem, 1x1 convs, ReLU6, residual adds, head, loss, "
    "optimizer) is unchanged; depthwise_fraction = 1 - time_without / time_with, for each "
    "implementation.")


def timed(fn, *args, repeats: int) -> dict:
    """Seconds per call: compile + first call, then median/min/max of ``repeats`` calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    stats = summary(time_calls(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=0),
                    digits=None)
    return {"median_s": stats["median"], "min_s": stats["min"], "max_s": stats["max"],
            "first_call_s": first}


def throughput(seconds: dict, batch: int) -> dict:
    """Images/s (median; min and max from the slowest and fastest repeat)."""
    return {"images_per_s": round(batch / seconds["median_s"], 2),
            "images_per_s_min": round(batch / seconds["max_s"], 2),
            "images_per_s_max": round(batch / seconds["min_s"], 2),
            "step_s": round(seconds["median_s"], 4),
            "compile_and_first_call_s": round(seconds["first_call_s"], 2)}


def model_steps(model: nnx.Module, lr: float = 0.01):
    """Jitted ``forward(params, images) -> logits`` (eval) and ``train(params, opt_state,
    images, labels) -> (params, opt_state, loss)`` (cross-entropy, plain SGD)."""
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(lr)

    def logits(params, images):
        return nnx.merge(graphdef, params, others)(images)

    def train(params, opt_state, images, labels):
        def loss_fn(params):
            return jnp.mean(cross_entropy(logits(params, images), labels))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, tx.init(params), jax.jit(logits), jax.jit(train)


@contextlib.contextmanager
def depthwise_skipped():
    """Every MobileNetV2 depthwise conv traced inside runs as the strided identity (+ bias):
    the model without its depthwise work, for the ablation in ``METHOD``."""
    def skip(x, kernel, stride=1, *, bias=None, dtype=None):
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        y = x[:, ::sh, ::sw, :]
        return y if bias is None else y + bias.astype(y.dtype)

    original, depthwise.shifted_depthwise_conv = depthwise.shifted_depthwise_conv, skip
    try:
        with depthwise.override("shifted"):
            yield
    finally:
        depthwise.shifted_depthwise_conv = original


def measure(size: int, batch: int, classes: int, width: int, repeats: int, impl: str,
            skip_depthwise: bool = False) -> tuple[dict, dict]:
    """Seconds of the eval forward and of the train step (see ``timed``)."""
    rng = np.random.default_rng(size)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), np.uint8))
    labels = jnp.asarray(rng.integers(0, classes, batch))
    model = build_model("mobilenet_v2", classes, width=width,
                        rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), depthwise_impl=impl)
    with depthwise_skipped() if skip_depthwise else contextlib.nullcontext():
        params, opt_state, forward, train = model_steps(model)
        return (timed(forward, params, images, repeats=repeats),
                timed(train, params, opt_state, images, labels, repeats=repeats))


def main(argv=None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--width", type=int, default=64, help="64 = MobileNetV2 1.0")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "mobilenet_cpu.json")
    args = parser.parse_args(argv)
    if jax.default_backend() != "cpu":
        print(f"skipping: the default backend is {jax.default_backend()}, not cpu",
              file=sys.stderr)
        return 0

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results, rows = {}, []
    for size in args.sizes:
        common = dict(size=size, batch=args.batch, classes=args.classes, width=args.width,
                      repeats=args.repeats)
        bare_fwd, bare_step = measure(**common, impl="shifted", skip_depthwise=True)
        by = results[str(size)] = {"without_depthwise": {
            "forward_eval": throughput(bare_fwd, args.batch),
            "train_step": throughput(bare_step, args.batch)}}
        for impl in IMPLS:
            fwd, step = measure(**common, impl=impl)
            entry = by[impl] = {
                "forward_eval": throughput(fwd, args.batch),
                "train_step": throughput(step, args.batch),
                "depthwise_fraction": {
                    "forward_eval": round(1 - bare_fwd["median_s"] / fwd["median_s"], 3),
                    "train_step": round(1 - bare_step["median_s"] / step["median_s"], 3)},
            }
            rows.append((size, impl, entry))
            print(f"{size}px {impl}: forward {entry['forward_eval']['images_per_s']} img/s, "
                  f"train {entry['train_step']['images_per_s']} img/s", file=sys.stderr)
        by["speedup_shifted_vs_grouped"] = {
            kind: round(by["shifted"][kind]["images_per_s"]
                        / by["grouped"][kind]["images_per_s"], 2)
            for kind in ("forward_eval", "train_step")}
        # what any depthwise implementation could reach: grouped vs no depthwise at all
        by["speedup_bound_if_depthwise_were_free"] = {
            kind: round(by["without_depthwise"][kind]["images_per_s"]
                        / by["grouped"][kind]["images_per_s"], 2)
            for kind in ("forward_eval", "train_step")}

    report = {
        "title": "MobileNetV2 on the CPU: grouped vs shifted depthwise",
        "model": f"mobilenet_v2 width {args.width} (multiplier {args.width / 64:g}), "
                 f"{args.classes} classes, batch_norm false (the pretrained layout)",
        "dtype": "float32", "batch": args.batch, "repeats": args.repeats,
        "timing": "median of the timed calls after one compiling warm-up call; min/max "
                  "images/s from the slowest/fastest call",
        "train_step": "forward + cross-entropy + backward + optax.sgd update, one jax.jit",
        "depthwise_fraction_method": METHOD,
        "results": results,
        "environment": {"python": platform.python_version(), "jax": jax.__version__,
                        "backend": jax.default_backend(), "cpu": cpu_name(),
                        "load_average_at_start": load_at_start,
                        "cores": len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else os.cpu_count()},
    }
    write_result("mobilenet_cpu", report.pop("title"), report, argv=argv, started=started,
                 out=args.out)

    print(f"MobileNetV2 width {args.width}, float32, batch {args.batch}, CPU "
          f"({report['environment']['cores']} cores); images/s, median [min-max]")
    print(f"{'size':>5} {'depthwise':>9} {'forward (eval)':>24} {'train step':>24} "
          f"{'depthwise share fwd / train':>28}")
    for size, impl, entry in rows:
        cells = [f"{e['images_per_s']:.1f} [{e['images_per_s_min']:.1f}-"
                 f"{e['images_per_s_max']:.1f}]"
                 for e in (entry["forward_eval"], entry["train_step"])]
        share = entry["depthwise_fraction"]
        print(f"{size:>5} {impl:>9} {cells[0]:>24} {cells[1]:>24} "
              f"{share['forward_eval']:>19.0%} / {share['train_step']:.0%}")
    for size in args.sizes:
        speed = results[str(size)]["speedup_shifted_vs_grouped"]
        bound = results[str(size)]["speedup_bound_if_depthwise_were_free"]
        print(f"{size}px shifted vs grouped: forward x{speed['forward_eval']}, "
              f"train step x{speed['train_step']} (with no depthwise cost at all: "
              f"x{bound['forward_eval']}, x{bound['train_step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
