"""The persistent compilation cache: how long a train job waits before its first step, the
first time (compiling) and the second (loading the compiled step from the cache).

Each job is a fresh process started through the workflow's launcher
(``python -m finegrained.launch --compilation-cache DIR``), as every JAX job of a run is: it
builds the model, prepares the train state and runs ``fit`` for one short epoch; the figure
is the history's ``first_step_seconds`` (from ``prepare`` to the return of the first step:
tracing plus compiling, or loading). For each model, ``--repeats`` times: a fresh cache
folder, a cold job, then an identical warm job; the ratio cold / warm is taken per
repetition. Target (issue #16): the second job spends at least 5x less time before its first
step than the first.

    python benchmarks/compile_cache.py [--repeats 2] [--models resnet18-64 resnet50-224]

Writes ``benchmarks/results/compile_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, ratios, summary, write_result

TITLE = "Compilation cache: time to the first step, cold and warm"
TARGET = 5.0
#: name -> (arch, width, image size, batch): the demo's network and the real run's.
MODELS = {"resnet18-64": ("resnet18", 16, 64, 16), "resnet50-224": ("resnet50", 64, 224, 8)}

CHILD = """
import json, sys, time
started = time.perf_counter()
import numpy as np
from flax import nnx
from finegrained.models import build_model
from finegrained.train.loop import fit
from finegrained.train.settings import default_settings
arch, width, image, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (2 * batch, image * 8 // 7, image * 8 // 7, 3), dtype=np.uint8)
labels = rng.integers(0, 10, 2 * batch).astype(np.int32)
settings = default_settings(epochs=1, batch_size=batch, image_size=image, num_devices=1,
                            log_every_steps=0, warmup_epochs=0, augment={"pca_lighting": 0.0})
result = fit(build_model(arch, 10, width=width, rngs=nnx.Rngs(0)), (images, labels),
             (images[:batch], labels[:batch]), settings, log_fn=None)
print(json.dumps({"first_step_seconds": result.history[0]["first_step_seconds"],
                  "process_seconds": time.perf_counter() - started}))
"""


def job(model: str, cache: Path) -> dict:
    arch, width, image, batch = MODELS[model]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "finegrained.launch", "--gpus", "0", "--compilation-cache",
         str(cache), "--", sys.executable, "-c", CHILD, arch, str(width), str(image),
         str(batch)], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.time()
    results = {}
    for model in args.models:
        cold, warm, cache_mb = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="jax-cache-") as folder:
                cache = Path(folder) / "cache"
                cold.append(job(model, cache)["first_step_seconds"])
                warm.append(job(model, cache)["first_step_seconds"])
                cache_mb.append(sum(f.stat().st_size for f in cache.iterdir()) / 1e6)
        ratio = ratios(cold, warm)
        results[model] = {
            "arch_width_image_batch": MODELS[model], "cold_first_step_s": summary(cold),
            "warm_first_step_s": summary(warm), "cold_over_warm": ratio,
            "cache_mb": summary(cache_mb),
            "target_met_in_every_repetition": min(ratio["values"]) >= TARGET}
        print(model, results[model], flush=True)
    import jax  # the machine's device, for the envelope (the jobs ran in their own processes)
    payload = {"target_cold_over_warm": TARGET, "models": results,
               "backend": jax.default_backend()}
    print(write_result("compile_cache", TITLE, payload, argv=argv, started=started,
                       out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
